"""Batched GPU decode: GraphDecoder step time against batch, beside the batch-1 step (issue 19).

For each model size (random packed weights, ``build_mmf_random``), one GraphDecoder per batch; the step
is timed as CUDA-graph replays (best of 3 runs of ``--steps``). Batch 1 (and 2 in models narrower than
``ternary_gemv.GEMV2_MAX_K``, ``ternary_gemv.uses_gemv``) runs the GEMV path; larger batches the quantisation
pre-pass plus the int8 tensor-core GEMM (``ternary_gemm``); ``--both-paths`` times both at batch 1 to
``ternary_gemv.GEMV_MAX_ROWS``. Then GraphDecoder's greedy tokens against the eager model at batch 1, 2, 4 and 6
(``kernel_bench.check_decoder``).

    python -m mmf.bench.batched_decode --sizes 370m,1.3b,13b --batches 1,2,4,8,16,64 --json out.json [--profile]

``--fixed-schedules`` skips tuning (first candidate schedules): an A/B of two kernel versions in two such
runs compares the kernels, not the tuner's luck, and costs seconds per build instead of a minute.
``--variants`` times each batch under several decoder choices in one process (``VARIANTS``, joined with
``+``), e.g. ``--variants default,no-row-stats,split-rows``.

Prints a table; the JSON is rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mmf.bench import mmf_preset_or_none, overridden, write_json
from mmf.bench.model_variants import build_mmf_random
from mmf.config import model_preset


# decoder choices a run can compare (``--variants``): (module, attribute) -> value while the decoder is built
VARIANTS = {
    "default": {},
    "no-row-stats": {("mmf.decode_graph:GraphDecoder", "ROW_STATS"): "never"},  # split rows reduce their own
    "whole-row-stats": {("mmf.decode_graph:GraphDecoder", "ROW_STATS"): "always"},  # whole rows read them too
    "whole-rows": {("mmf.kernels.ternary_gemm", "QUANT_SPLIT_MIN_K"): 1 << 30},  # pre-pass rows never split
    "split-rows": {("mmf.kernels.ternary_gemm", "QUANT_SPLIT_MIN_K"): 0,  # split at every width and batch
                   ("mmf.kernels.ternary_gemm", "QUANT_SPLIT_MAX_ROWS"): 64},
    # schedules with one K block per program, its weights loaded before the wait, offered at every width or at
    # none (the default: widths up to ``GraphDecoder.EARLY_WEIGHTS_MAX_D``)
    "early-weights": {("mmf.kernels.ternary_gemm", "EARLY_WEIGHTS"): True},
    "no-early-weights": {("mmf.kernels.ternary_gemm", "EARLY_WEIGHTS"): False},
}


def variant(name: str):
    """A context that sets the attributes of the ``+``-joined ``VARIANTS`` ``name`` and restores them after."""
    import importlib

    settings = {}
    for part in name.split("+"):
        for (where, attr), value in VARIANTS[part].items():
            mod, _, cls = where.partition(":")
            obj = importlib.import_module(mod)
            settings[(getattr(obj, cls) if cls else obj, attr)] = value
    return overridden(settings)


def step_ms(dec, steps, reps=3):
    from mmf.kernels import ternary_gemv as tv

    ids = torch.randint(3, dec.V, (dec.batch, 8), device="cuda")
    nxt = dec.prefill(ids).argmax(-1)
    for _ in range(5):
        dec.step(nxt)
    torch.cuda.synchronize()
    return min(tv.event_times(lambda: dec.step(nxt), reps, steps))


def kernel_breakdown(dec, steps: int = 5) -> dict:
    """GPU time per step of each kernel (by name) in eager steps under the profiler: where the step's
    time goes (the captured step adds only the gaps between kernels)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, dec.V, (dec.batch,), device="cuda")
    graph, dec.graph = dec.graph, None  # eager steps
    try:
        for _ in range(3):
            dec.step(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.step(ids)
            torch.cuda.synchronize()
    finally:
        dec.graph = graph
    ms, launches = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("(")[0][:48]
            ms[name] = ms.get(name, 0.0) + e.device_time_total / 1e3 / steps
            launches[name] = launches.get(name, 0) + 1 / steps
    return {k: dict(ms=ms[k], launches=round(launches[k])) for k in sorted(ms, key=ms.get, reverse=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmf.bench.batched_decode",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--sizes", default="1.3b,13b,370m", help="MatMul-free presets (default: 1.3b,13b,370m)")
    ap.add_argument("--batches", default="1,2,4,8,16,64", help="decode batches (default: 1,2,4,8,16,64)")
    ap.add_argument("--steps", type=int, default=50, help="steps per timing run (default: 50)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="activations (default: bf16)")
    ap.add_argument("--json", default=None, help="JSON output (default: none)")
    ap.add_argument("--no-checks", action="store_true", help="skip the GraphDecoder vs eager check (default: run)")
    ap.add_argument("--profile", action="store_true",
                    help="also time each kernel of eager steps under the profiler (default: off)")
    ap.add_argument("--both-paths", action="store_true",
                    help="at batch 1 to ternary_gemv.GEMV_MAX_ROWS time the GEMV and the GEMM path (default: the "
                         "decoder's choice)")
    ap.add_argument("--fixed-schedules", action="store_true",
                    help="no tuning: every kernel on its first candidate schedule. Builds take seconds instead "
                         "of a minute, for A/B runs of kernel changes; not the decoder's speed (default: tuned)")
    ap.add_argument("--variants", default="default",
                    help=f"decoder choices timed at each batch, comma-separated, each one of {', '.join(VARIANTS)} "
                         "or several joined with + (default: default)")
    ap.add_argument("--dump-after", type=float, default=0,
                    help="print every thread's stack every this many s, 0 never (default: 0)")
    args = ap.parse_args(argv)
    for size in args.sizes.split(","):
        if mmf_preset_or_none("batched_decode", "--sizes", size) is None:
            return 2
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or not all(1 <= b <= 64 for b in batches):
        print(f"batched_decode: --batches {args.batches}: give batches 1-64, comma-separated", file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    bad = [v for v in variants if not v or any(p not in VARIANTS for p in v.split("+"))]
    if bad:
        print(f"batched_decode: --variants {','.join(bad)}: unknown; give {', '.join(VARIANTS)} "
              "(comma-separated, + joins)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("batched_decode: needs a CUDA GPU; run it on a machine with one", file=sys.stderr)
        return 2
    if args.dump_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_after, repeat=True)
    from mmf.bench.kernel_bench import check_decoder, check_gemm_variants, check_row_stats, row_stats_errors
    from mmf.decode_graph import GraphDecoder
    from mmf.kernels import ternary_gemv as tv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.fixed_schedules:
        tv.TUNE = False
        GraphDecoder.REFINE = False
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                   steps=args.steps, fixed_schedules=args.fixed_schedules, variants=variants, checks=[], rows=[])
    import triton
    results["triton"] = triton.__version__

    def save():
        if args.json:
            write_json(args.json, results)

    print(f"{'size':>6} {'batch':>5} {'path':>10} {'variant':>14} {'ms/step':>8} {'x batch1':>8} {'tok/s':>9} "
          f"{'build s':>7}", flush=True)
    for size in args.sizes.split(","):
        cfg = model_preset(size)
        model = build_mmf_random(cfg, "cuda", dtype)
        torch.cuda.synchronize()
        base = None
        for b in batches:
            for path in (["gemv", "gemm"] if b <= tv.GEMV_MAX_ROWS else ["gemm"]) if args.both_paths else [None]:
                for var in variants:
                    t0 = time.time()
                    with variant(var):
                        dec = GraphDecoder(model, b, gemv=None if path is None else path == "gemv")
                    kind = "gemv" if dec.gemv_path else "gemm"
                    build = time.time() - t0
                    ms = step_ms(dec, args.steps)
                    if b == 1 and kind == "gemv" and base is None:
                        base = ms
                    ratio = ms / base if base else float("nan")
                    row = dict(size=size, batch=b, path=kind, variant=var, ms_per_step=ms, ratio_to_batch1=ratio,
                               tokens_per_s=b * 1e3 / ms, build_s=build, bytes_per_step=dec.bytes_per_token())
                    results["rows"].append(row)
                    print(f"{size:>6} {b:>5} {kind:>10} {var:>14} {ms:8.3f} {ratio:8.2f} {b * 1e3 / ms:9.0f} "
                          f"{build:7.1f}", flush=True)
                    if dec.row_stats:  # the statistics the timed steps left, on the tuned schedules
                        row["row_stats_check"] = row_stats_errors(dec)
                        print(f"{'':>24} row statistics: {row['row_stats_check']}", flush=True)
                    if args.profile:
                        row["kernels"] = kernel_breakdown(dec)
                        for name, k in list(row["kernels"].items())[:3]:
                            print(f"{'':>24} {name}: {k['ms']:.3f} ms in {k['launches']} launches", flush=True)
                    save()
                    del dec
                    torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    save()
    if not args.no_checks:
        for r in check_decoder(quick=False) + check_row_stats(quick=False) + check_gemm_variants(quick=False):
            print(r, flush=True)
            results["checks"].append(r)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
