"""Where a decode step's time goes: whole-model ``GraphDecoder`` decode timed with parts of the decode
kernels' work removed, on one CUDA GPU.

    python -m mmf.bench.decode_breakdown [--sizes 13b] [--batch 1] [--variants base nopro nowait nopro_nowait base]
        [--gemm-variants base noprepass ... base] [--extra OLD_KERNEL.py ...] [--sweep base ...] [--no-check]
        [--json-out decode_breakdown.json]

Each variant is a copy of an installed kernel module with a text edit; every edited variant runs the
schedules tuned once on the real kernel, so only the edit differs. At batch 1 the edits are to the decode
GEMV (``mmf.kernels.ternary_gemv``, ``--variants``):

    base           the kernel as installed
    nopro          no prologue: the activations already in the scratch are used (stale; timing only)
    nowait         no ``gdc_wait``: each kernel starts without waiting for the previous one (results
                   wrong; timing only): what the dependency between kernels costs
    nopro_nowait   both: the weight stream, launches and epilogues alone
    late           ``PARAMS_EARLY = False``: the prologue's constant loads after the wait
    nostore        the prologue's scratch stores masked off (timing only): what the round trip
                   through the scratch costs; nostore_nobar also drops the barrier after them

At batches whose steps take the GEMV (``GraphDecoder.gemv_path``: batch 1, and batch 2 in models narrower than
``ternary_gemv.GEMV2_MAX_K``) those edits apply; at the others they are to the pre-pass + int8 tensor-core GEMM
path (``mmf.kernels.ternary_gemm``, ``--gemm-variants``; every edit is timing only):

    base           the kernels as installed
    noprepass      no pre-pass launched: each GEMM reads its scratch as the decoder allocated it
    noquant        the pre-pass launched but doing nothing (no wait either): its launch alone
    nowait         the GEMM does not wait for its pre-pass (``gdc_wait`` removed from the GEMM)
    nounpack       the GEMM multiplies the packed bytes as they are (no shift and mask per digit plane)
    noepiload      the GEMM's epilogue takes s_x, sum(xq) and s_w as constants (its residual still
                   loaded): what those loads after the K loop cost
    nogemm         the GEMM launched, waiting and releasing the next kernel, doing nothing else

A decoder runs every projection of a step on one path, so each edit reaches all of them (370m's 2816-wide
down projection takes the GEMV at batch 2 like the others).

``--extra FILE`` adds another kernel module (e.g. ``git show COMMIT:kernels/ternary_gemv.py``) as the
variant ``extra:<file name>`` at batch 1, tuned afresh as the decoder would tune it. ``--sweep NAME`` first
times every candidate schedule of that variant on the 13b shapes, with the compiled kernel's registers and
spills. Every decode variant starts from the zero state, so its first step's logits are compared with
the first variant's (equal unless the variant is a timing-only one). Before timing, the installed
kernels are checked against the torch references on small shapes (``--no-check`` skips it).

Install the package (``pip install --no-deps .``) and run from outside the source folder, so that the
installed kernels are the ones edited. Prints a table (with each figure's ratio to the same batch's base,
and to batch 1's base where batch 1 ran) and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
import time

EDITED_VARIANTS = ("base", "nopro", "nowait", "nopro_nowait", "late", "nostore", "nostore_nobar")
DEFAULT_VARIANTS = ("base", "nopro", "nowait", "nopro_nowait")
GEMM_VARIANTS = ("base", "noprepass", "noquant", "nowait", "nounpack", "noepiload", "nogemm")
SHAPES = [(5120, 5120, "norm"), (5120, 5120, "res"), (13824, 5120, "glu"), (5120, 13824, "res")]  # 13b (N, K)


def _edits():
    """Variant name -> list of (old text or regex, replacement[, "optional"]) applied to the GEMV module's
    source; each edit not marked optional must apply."""
    nopro = [("    if PRO != 4:\n", "    if PRO == 99:\n"),  # the second edit: older kernels
             ("    if PRO == 4:  # already quantised", "    if True:  # already quantised", "optional")]
    nowait = [(re.compile(r"^(\s*)gdc_wait\(\)$", re.M), r"\1pass")]
    nostore = [("word, mask=wmask)", "word, mask=wmask & (M < 0))")]
    return {"base": [], "nopro": nopro, "nowait": nowait, "nopro_nowait": nopro + nowait,
            "late": [(re.compile(r"^PARAMS_EARLY = .*$", re.M), "PARAMS_EARLY = False")],
            "nostore": nostore, "nostore_nobar": nostore + [("        tl.debug_barrier()\n", "")]}


def _gemm_edits():
    """``GEMM_VARIANTS`` -> edits of ``ternary_gemm``'s source (as ``_edits``)."""
    return {
        "base": [],
        "noprepass": [("    for _ in range(1 if spin or chunks == 1 else 3):", "    for _ in range(0):")],
        "noquant": [("    _quant_row(m, seg, X, sxm, G, sgm,",
                     "    if M < 0:\n        _quant_row(m, seg, X, sxm, G, sgm,")],
        "nowait": [(re.compile(r"^(\s*)gdc_wait\(\)$", re.M), r"\1pass")],
        "nounpack": [(re.compile(r"(def _codes\(wb, s: tl\.constexpr, USE_ASM: tl\.constexpr\):\n)"
                                 r".*?\n    return c\n", re.S), r"\1    return wb.to(tl.int8, bitcast=True)\n")],
        "noepiload": [("    sumx = _row_sums(SUMX, RED, seg, M, rm, NCH)\n"
                       "    sx = tl.load(SX + seg * M + rm, mask=rm < M, other=1.0)\n",
                       "    sumx = rm * 0\n    sx = (rm * 0 + 1).to(tl.float32)\n"),
                      ("    return sumx, sx, tl.load(SW + seg)\n", "    return sumx, sx, 1.0\n")],
        "nogemm": [("    _gemm_tile(tl.program_id(0), tl.program_id(1),",
                    "    if PDL:\n        gdc_wait()\n        gdc_launch_dependents()\n"
                    "    if M < 0:\n        _gemm_tile(tl.program_id(0), tl.program_id(1),")],
    }


class _Variants:
    """The kernel modules of the variants, each loaded from its (edited) source on first use: edits of the
    GEMV module ``mod`` (``ternary_gemv``), or with ``gemm`` of the GEMM module (``ternary_gemm``)."""

    def __init__(self, mod, extras: dict[str, str], gemm: bool = False):
        self.real, self.extras, self.gemm, self.mods = mod, extras, gemm, {}
        self.edits = _gemm_edits() if gemm else _edits()
        self.src = open(mod.__file__).read()
        self.saved = (mod.quantize, mod.gemm) if gemm else (mod.gemv,)

    def _load(self, name, src):
        ident = ("tg_" if self.gemm else "tv_") + re.sub(r"[^A-Za-z0-9_]", "_", name)
        path = os.path.join(tempfile.mkdtemp(), f"{ident}.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f"mmf.kernels.{ident}", path)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "mmf.kernels"
        spec.loader.exec_module(mod)
        return mod

    def module(self, name):
        if name not in self.mods:
            if name in self.extras:
                with open(self.extras[name]) as f:
                    self.mods[name] = self._load(name, f.read())
            else:
                src, applied, required = self.src, 0, 0
                for old, new, *optional in self.edits[name]:
                    if isinstance(old, str):
                        n = src.count(old)
                        src = src.replace(old, new)
                    else:
                        src, n = old.subn(new, src)
                    applied += n
                    if not optional and not n:
                        required += 1
                if required or (self.edits[name] and not applied):
                    raise SystemExit(f"decode_breakdown: variant {name}: its edits do not apply to "
                                     f"{self.real.__file__} (the kernel changed); drop the variant or update its edit")
                self.mods[name] = self._load(name, src)
        return self.mods[name]

    def use(self, name, tuned):
        """Make the decoder call variant ``name``: edited variants run the base's schedules, extra
        kernels are tuned afresh."""
        mod = self.module(name)
        mod._TUNED.clear()
        if name in self.edits:
            mod._TUNED.update(tuned)
        if self.gemm:
            self.real.quantize, self.real.gemm = mod.quantize, mod.gemm
        else:
            self.real.gemv = mod.gemv

    def restore(self):
        """The installed module's own functions back."""
        if self.gemm:
            self.real.quantize, self.real.gemm = self.saved
        else:
            self.real.gemv, = self.saved


class _Recorder:
    """Stands in for a module's ``_gemv_kernel`` and keeps the compiled kernel of the last launch."""

    def __init__(self, kernel):
        self.kernel, self.last = kernel, None

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.last = launch(*args, **kw)
            return self.last
        return run


def _parser():
    ap = argparse.ArgumentParser(prog="python -m mmf.bench.decode_breakdown",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "),
                                 epilog="Variants at batch 1: " + ", ".join(EDITED_VARIANTS) + ", extra:<file name>; "
                                 "above: " + ", ".join(GEMM_VARIANTS) + ".")
    ap.add_argument("--sizes", nargs="+", default=["13b"], help="model presets to decode (default: 13b)")
    ap.add_argument("--batch", default="1", help="comma-separated decode batches, 1-64 (default: 1)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="variants timed at batch 1, in this order (default: "
                         + " ".join(DEFAULT_VARIANTS) + ", the --extra modules, base again)")
    ap.add_argument("--gemm-variants", nargs="+", default=None,
                    help="variants timed at batches above 1, in this order (default: " + " ".join(GEMM_VARIANTS)
                         + " base)")
    ap.add_argument("--extra", nargs="+", default=[], metavar="FILE",
                    help="other kernel modules to time as variants extra:<file name> (default: none)")
    ap.add_argument("--sweep", nargs="+", default=[], metavar="VARIANT",
                    help="variants whose every candidate schedule is timed on the 13b shapes first (default: none)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks of the installed kernels")
    ap.add_argument("--json-out", default="decode_breakdown.json", metavar="FILE",
                    help="write every figure as JSON here (default: decode_breakdown.json)")
    return ap


def _bad_arguments(args, names, gemm_names, extras) -> str | None:
    """The one-line complaint about the arguments, or None."""
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or not all(1 <= b <= 64 for b in batches):
        return f"--batch {args.batch}: give batches 1-64, comma-separated"
    known = set(EDITED_VARIANTS) | set(extras)
    for n in set(names) | set(args.sweep):
        if n not in known:
            return (f"unknown variant {n!r}; use one of {', '.join(sorted(known))} "
                    "(extra:<file name> needs --extra FILE)")
    for n in gemm_names:
        if n not in GEMM_VARIANTS:
            return f"--gemm-variants: unknown variant {n!r}; use one of {', '.join(GEMM_VARIANTS)}"
    for p in args.extra:
        if not os.path.isfile(p):
            return f"--extra {p}: no such file; give the path of a kernel module"
    return None


def _sweep(res, name, variants, tv, bw, log):
    """Every candidate schedule of GEMV variant ``name`` on the 13b shapes, with registers and spills."""
    import torch

    from mmf.bench import kernel_bench as kb

    mod = variants.module(name)
    rec = _Recorder(mod._gemv_kernel)
    mod._gemv_kernel = rec
    tv.gemv = mod.gemv
    for n, k, kind in SHAPES:
        for cfg in mod._configs(1, mod.words_per_row(k)):
            row = dict(variant=name, shape=f"{k}->{n}", kind=kind, config=str(cfg))
            try:
                r = kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=128 << 20, config=cfg)
                ck = rec.last
                row.update(us=r["us"], pct_copy_bw=r["pct_copy_bw"], regs=getattr(ck, "n_regs", None),
                           spills=getattr(ck, "n_spills", None), smem=getattr(ck.metadata, "shared", None))
            except Exception as e:  # noqa: BLE001 - a schedule that does not fit is reported, not fatal
                row["error"] = repr(e)[:120]
            res["sweep"].append(row)
            log(f"sweep {name:22s} {row['shape']:>11s} {kind:5s} {row['config']:12s} "
                + (f"{row['us']:7.2f} us {row['pct_copy_bw']:5.1f} % regs {row['regs']} spills {row['spills']}"
                   if "us" in row else row["error"]))
    mod._gemv_kernel = rec.kernel
    variants.restore()


def _print_tables(res):
    from tabulate import tabulate

    base = {}  # the first base of each model and batch
    for r in res["decode"]:
        if r["variant"] == "base":
            base.setdefault((r["model"], r["batch"]), r["ms_per_step"])
    base1 = {model: ms for (model, batch), ms in base.items() if batch == 1}
    rows = [[r["model"], r["batch"], r["variant"], f"{r['ms_per_step']:.3f}", f"{r['floor_ms']:.3f}",
             f"{r['ms_per_step'] / base[(r['model'], r['batch'])]:.2f}" if (r["model"], r["batch"]) in base else "",
             f"{r['ms_per_step'] / base1[r['model']]:.2f}" if r["model"] in base1 else ""] for r in res["decode"]]
    print(tabulate(rows, headers=["model", "batch", "variant", "ms/step", "floor ms", "÷ base", "÷ batch-1 base"],
                   tablefmt="github"))
    for r in res["sweep"]:
        print(f"{r['variant']:22s} {r['shape']:>11s} {r['kind']:5s} {r['config']:12s} "
              + (f"{r['us']:7.2f} {r['pct_copy_bw']:5.1f} regs {r['regs']} spills {r['spills']}" if "us" in r
                 else "error"))
    if res["gemv"]:
        print(f"{'variant':26s} {'shape':>14s} {'kind':5s} {'us':>7s} {'%bw':>5s}")
    for r in res["gemv"]:
        print(f"{r['variant']:26s} {r['shape']:>14s} {r['kind']:5s} {r['us']:7.2f} {r['pct_copy_bw']:5.1f}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    extras = {"extra:" + os.path.basename(p): p for p in args.extra}
    names = args.variants or list(DEFAULT_VARIANTS) + list(extras) + ["base"]
    gemm_names = args.gemm_variants or list(GEMM_VARIANTS) + ["base"]
    bad = _bad_arguments(args, names, gemm_names, extras)
    if bad:
        print(f"decode_breakdown: {bad}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch.split(",")]
    from mmf.config import MMFConfig, model_preset
    from mmf.errors import MMFError

    try:
        configs = {size: model_preset(size) for size in args.sizes}
    except MMFError as e:
        print(f"decode_breakdown: --sizes: {e}", file=sys.stderr)
        return 2
    if not all(isinstance(c, MMFConfig) for c in configs.values()):
        print("decode_breakdown: --sizes takes MatMul-free presets (370m, 1.3b, 2.7b, 13b)", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        print("decode_breakdown: needs a CUDA GPU; run it on a machine with one", file=sys.stderr)
        return 2
    from mmf.bench import kernel_bench as kb
    from mmf.bench import write_json
    from mmf.bench.model_variants import build_mmf_random
    from mmf.decode_graph import GraphDecoder
    from mmf.kernels import schedule_cache
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    t0 = time.time()

    def log(*a):
        print(f"[{time.time() - t0:5.0f}s]", *a, flush=True)

    gemv_variants, gemm_variants = _Variants(tv, extras), _Variants(tg, {}, gemm=True)
    # Every variant, base too, is a loaded copy of the kernel module running the schedules given to it;
    # the decoder's refinement would act on the installed module only, so it stays off, and every
    # variant is tuned in this run, never read from an earlier one.
    GraphDecoder.REFINE = False
    schedule_cache.ENABLED = False
    res = {"command": "python -m mmf.bench.decode_breakdown " + " ".join(sys.argv[1:] if argv is None else argv),
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "copy_GB_s": None, "decode": [], "gemv": [], "sweep": []}
    if not args.no_check:  # the installed kernels against the references, quick shapes
        tv.TUNE = False
        res["checks"] = kb.check_kernels(True) + kb.check_decoder(True)
        kb.table(res["checks"], "correctness: Triton vs torch reference on the GPU (installed kernels)")
        tv.TUNE = True
        tv._TUNED.clear()
    bw = kb.copy_bandwidth()
    res["copy_GB_s"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for name in args.sweep:
        _sweep(res, name, gemv_variants, tv, bw, log)

    for size in args.sizes:
        model = build_mmf_random(configs[size], "cuda", torch.float16)
        for batch in batches:
            nxt = torch.full((batch,), 7, device="cuda")
            tv._TUNED.clear()  # tune on the real kernels, in the decoder's setting, once per batch
            tg._TUNED.clear()
            dec = GraphDecoder(model, batch, use_graph=False)
            on_gemv = dec.gemv_path  # the path every projection of this batch's steps takes
            variants = gemv_variants if on_gemv else gemm_variants
            dec.step(nxt)
            if size == "13b" and batch == 1:
                for n, k, kind in SHAPES:
                    kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=256 << 20)
            tuned = dict(variants.real._TUNED)
            del dec
            log(f"{size} batch {batch}: tuned " + "; ".join(f"{k}: {v}" for k, v in tuned.items()))
            ref_logits = None
            for name in (names if on_gemv else gemm_names):
                variants.use(name, tuned)
                torch.cuda.empty_cache()
                dec = GraphDecoder(model, batch)
                first = dec.step(nxt).clone()
                ref_logits = first if ref_logits is None else ref_logits
                for _ in range(4):
                    dec.step(nxt)
                torch.cuda.synchronize()
                ts = tv.event_times(lambda: dec.step(nxt), 3, 100)  # ms per step in each of 3 runs of 100 steps
                floor = dec.bytes_per_token() / bw * 1e3
                same = bool(torch.equal(first, ref_logits))
                res["decode"].append(dict(model=size, batch=batch, variant=name, ms_per_step=min(ts), runs=ts,
                                          floor_ms=floor, first_logits_equal_first_variant=same,
                                          tuned={str(k): v for k, v in variants.module(name)._TUNED.items()}))
                log(f"decode {size} batch {batch} {name:24s} {min(ts):.3f} ms/step (runs "
                    f"{', '.join(f'{t:.3f}' for t in ts)}; floor {floor:.3f}; first logits equal the first "
                    f"variant's: {same})")
                del dec
                if size == "13b" and batch == 1:
                    for n, k, kind in SHAPES:
                        r = kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=256 << 20)
                        r["variant"] = name
                        res["gemv"].append(r)
                        log(f"  gemv {r['shape']:>14s} {kind:5s} {r['us']:7.2f} us {r['pct_copy_bw']:5.1f} %")
            variants.restore()
        del model
        torch.cuda.empty_cache()

    _print_tables(res)
    write_json(args.json_out, res, indent=1)
    log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
