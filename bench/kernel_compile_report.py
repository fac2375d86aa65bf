"""Registers, spills and PTX size of the decode GEMM kernels, compiled for a GPU that is not here.

Compiles ``kernels.ternary_gemm``'s decode kernels with the installed Triton for ``--arch`` (default sm_90a,
Hopper), as the JIT specialises them for the decoder's shapes (pointers and row strides divisible by 16),
and runs the ``ptxas`` that Triton bundles with ``-v`` on the PTX: registers per thread, bytes of spill
stores, shared memory, PTX instructions, CTA barriers. No GPU is needed, so a kernel change can be checked for spills,
and for code that a refactor changed, before a GPU session. Variants (``--variants``):

* ``default`` — ``_gemm_kernel`` as the pre-pass path launches it;
* ``stats`` — with the epilogue leaving its output's row statistics (``RowStats``: sum(out²) per column
  tile, ``STATS=1``), as where the next pre-pass splits rows;
* ``stats-max`` — also max|out · w| (``STATS=2``), as before the down projection's pre-pass.

``--early-weights`` compiles instead the 16-row schedules whose programs load their one K block's weights before
the wait (``WEARLY``, ``ternary_gemm.EARLY_WEIGHTS``), at the split counts (K blocks) of the 370m, 1.3b and 13b
projections, which set how many parts the tile's last program adds (schedule "... xN").

    python -m mmf.bench.kernel_compile_report --rows 16,64 --max-schedules 6 --json-out F

Prints a table (one row per schedule, epilogue and variant); the JSON is written at the end.

Compile with the Triton version the GPU runs (e.g. ``pip install --target DIR triton==3.6.0`` and
``PYTHONPATH=DIR``): two sources that compile alike with one version can differ with another. A one-row
prologue tile that Triton 3.9 compiled to the same instructions as the kernel before it gained barriers and
shared-memory round trips under 3.6, and cost 5 % of the 13b batch-1 step on the GPU (d76ff69).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

VARIANTS = {"default": {}, "stats": {"STATS": 1}, "stats-max": {"STATS": 2}}  # constexprs
# pointer arguments by name (their element types) and integer arguments the JIT sees divisible by 16
_PTR = {"XQ": "*i8", "SX": "*fp32", "SUMX": "*i32", "RED": "*fp32", "W0": "*u8", "W1": "*u8", "W2": "*u8",
        "SW": "*fp32", "OUT": "*bf16", "RES": "*bf16", "WS": "*i32", "CTR": "*i32", "SS": "*fp32", "SSW": "*bf16"}
_FLOAT = {"eps_model", "eps_bl", "eps_q", "eps_qm"}
_DIV16 = {"so_m", "sr_m", "P", "PB", "KS", "sxm", "sgm", "K", "QP", "QPW"}


def ptxas_path() -> str | None:
    """The ptxas Triton bundles (the Blackwell-era one first: it reads the newest PTX), or None."""
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(base, name)):
            return os.path.join(base, name)
    return None


def compile_report(fn, consts: dict, num_warps: int, num_stages: int, arch: str = "sm_90a") -> dict:
    """Compile jit function ``fn`` with these constexprs (the others at their defaults) for ``arch``:
    {registers, spill_bytes, shared_bytes, ptx_instructions}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(fn.fn).parameters
    names = list(params)
    consts = dict(consts)
    for n, p in params.items():
        if n not in consts and p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation):
            consts[n] = p.default
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in _PTR:
            sig[n], attrs[(i,)] = _PTR[n], [["tt.divisibility", 16]]
        elif n in _FLOAT:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n in _DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    cap = int(re.sub(r"\D", "", arch))
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in consts.items()}, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    if regs is None:
        raise RuntimeError(f"ptxas: {r.stderr.strip()[-300:]}")
    body = [ln.strip() for ln in ptx.split(".section")[0].splitlines()
            if ln.strip() and not ln.strip().startswith(("//", ".", "$", "{", "}"))]
    return dict(registers=int(regs.group(1)), spill_bytes=int(spills.group(1)) if spills else 0,
                shared_bytes=int(kernel.metadata.shared), ptx_instructions=len(body),
                barriers=sum(ln.startswith(("bar.sync", "barrier.sync")) for ln in body))


def gemm_consts(cfg, epi: int, variant: dict) -> dict:
    """``_gemm_kernel``'s constexprs at schedule ``cfg``, epilogue ``epi`` and a ``VARIANTS`` entry."""
    bm, bn, bk = cfg[:3]
    wearly = bool(cfg[7]) if len(cfg) > 7 else False  # one K block per program: the split is the shape's blocks
    return dict(EPI=epi, BM=bm, BN=bn, BK=bk, GROUP=8, USE_ASM=True, SWAP=cfg[5] if len(cfg) > 5 else 0, PDL=True,
                SPLIT=cfg[6] if len(cfg) > 6 and not wearly else 1, NCH=1, STATS=0, WEARLY=wearly) | variant


def early_weight_cases(sizes=("370m", "1.3b", "13b")) -> list:
    """(schedule, epilogue, split) of each ``EARLY_WEIGHTS`` schedule at the decoder's projections of these
    presets (``kernel_bench.decoder_projections``): the split is the projection's number of K blocks, which sets
    how many parts ``_split_sum`` adds."""
    from mmf.bench.kernel_bench import decoder_projections
    from mmf.config import model_preset
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels.ternary_gemv import packed_bytes

    cases = []
    for size in sizes:
        c = model_preset(size)
        for _, _, _, k, _, epi in decoder_projections(c.hidden_size, c.ffn_size):
            for cfg in tg._EARLY_WEIGHT_CONFIGS:
                case = (cfg, epi, -(-packed_bytes(k) // cfg[2]))
                if case not in cases:
                    cases.append(case)
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmf.bench.kernel_compile_report",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} "
                    "(default: all)")
    ap.add_argument("--rows", default="16,64",
                    help="row counts whose candidate schedules are compiled (default: 16,64)")
    ap.add_argument("--max-schedules", type=int, default=4, help="first N candidates per row count (default: 4)")
    ap.add_argument("--epilogues", default="store,glu",
                    help="store, residual, glu, comma-separated (default: store,glu)")
    ap.add_argument("--early-weights", action="store_true",
                    help="instead of --rows' candidates: the schedules that load their one K block's weights before "
                         "the wait (ternary_gemm.EARLY_WEIGHTS), at the split counts of the 370m, 1.3b and 13b "
                         "projections (default: off)")
    ap.add_argument("--row-tile", type=int, default=None,
                    help="least row tile (BM) of decode batches, ternary_gemm.DECODE_ROW_TILE_MIN: --rows up to 16 "
                         "compile at max(this, next power of two), --early-weights at this (default: the module's)")
    ap.add_argument("--arch", default="sm_90a", help="ptxas architecture (default: sm_90a)")
    ap.add_argument("--json-out", default=None, help="JSON output (default: none)")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    epis = {"store": 0, "residual": 1, "glu": 2}
    bad = [v for v in variants if v not in VARIANTS] + [e for e in args.epilogues.split(",") if e not in epis]
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        rows = []
    tile_ok = args.row_tile is None or args.row_tile in (1, 2, 4, 8, 16)
    if bad or not rows or args.max_schedules < 1 or not tile_ok or not re.fullmatch(r"sm_\d+a?", args.arch):
        print(f"kernel_compile_report: {', '.join(bad) or 'arguments'}: give variants of {', '.join(VARIANTS)}, "
              "epilogues of store, residual, glu, row counts, --max-schedules 1 or more, --row-tile 1, 2, 4, 8 or 16, "
              "--arch like sm_90a",
              file=sys.stderr)
        return 2
    if ptxas_path() is None:
        print("kernel_compile_report: the installed Triton bundles no ptxas; install triton with its NVIDIA backend",
              file=sys.stderr)
        return 2
    import triton
    from tabulate import tabulate

    from mmf.bench import write_json
    from mmf.kernels import ternary_gemm as tg

    least = tg.DECODE_ROW_TILE_MIN if args.row_tile is None else args.row_tile
    out = dict(triton=triton.__version__, arch=args.arch, row_tile_min=least, rows=[])
    names = {e: n for n, e in epis.items()}

    def tiled(m, cfg):  # the candidate at the row tile of --row-tile
        return (tg.decode_row_tile(m, least),) + tuple(cfg[1:]) if m <= 16 else cfg
    if args.early_weights:
        cases = [(least, tiled(least, cfg), epi, split) for cfg, epi, split in early_weight_cases()]
    else:
        cases = [(m, tiled(m, cfg), epis[e], None) for m in rows for cfg in tg._gemm_configs(m)[:args.max_schedules]
                 for e in args.epilogues.split(",")]
    for m, cfg, epi, split in cases:
        for v in variants:
            consts = gemm_consts(cfg, epi, VARIANTS[v]) | ({"SPLIT": split} if split else {})
            rep = compile_report(tg._gemm_kernel, consts, cfg[3], cfg[4], args.arch)
            out["rows"].append(dict(rows=m, schedule=str(tuple(cfg)) + (f" x{split}" if split else ""),
                                    epilogue=names[epi], variant=v, **rep))
            print(out["rows"][-1], flush=True)
    print(tabulate([[r["rows"], r["schedule"], r["epilogue"], r["variant"], r["registers"], r["spill_bytes"],
                     r["shared_bytes"], r["ptx_instructions"], r["barriers"]] for r in out["rows"]],
                   headers=["rows", "schedule", "epilogue", "variant", "registers", "spill bytes", "shared bytes",
                            "PTX instr.", "barriers"]))
    if args.json_out:
        write_json(args.json_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
