"""Batched GPU decode: GraphDecoder step time against batch, beside the batch-1 step (issue 19).

For each model size (random packed weights, ``build_mmf_random``), one GraphDecoder per batch; the step
is timed as CUDA-graph replays (best of 3 runs of ``--steps``). Batch 1-2 run the GEMV path; batch 3-64
the quantisation pre-pass plus the decode GEMM: the split-K ``ternary_gemm_decode`` and, where
``--ab`` lists the batch, also the prefill GEMM (``ternary_gemm``, ``MMF_DECODE_SPLITK=0``'s path) in
the same run. Then: the split-K GEMM against ``ternary_gemm.gemm`` bit for bit at real shapes, and
GraphDecoder's greedy tokens against the eager model (``kernel_bench.check_decoder``).

    python bench/batched_decode.py --sizes 370m,1.3b,13b --batches 1,2,4,8,16,64 --json out.json

Prints a table; the JSON is rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import time

import torch

from mmf.bench import write_json
from mmf.bench.model_variants import build_mmf_random, random_packed
from mmf.config import model_preset


def check_split_k(results):
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemm_decode as tgd
    from mmf.kernels import ternary_gemv as tv

    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k, nseg, epi in [(16, 5120, 5120, 1, tv.EPI_RESIDUAL), (64, 5120, 5120, 3, tv.EPI_STORE),
                               (5, 13824, 5120, 1, tv.EPI_GLU), (11, 5120, 13824, 1, tv.EPI_STORE)]:
        x = torch.randn(m, k, device="cuda", generator=g).half()
        nw = (torch.rand(nseg, k, device="cuda", generator=g) + 0.5).half()
        rows = 2 * n if epi == tv.EPI_GLU else n
        w = [random_packed(rows, k, "i2", "cuda", g) for _ in range(nseg)]
        sw = torch.rand(nseg, device="cuda", generator=g) + 0.5
        res = torch.randn(m, nseg * n, device="cuda", generator=g).half()
        sc = tv.Scratch(nseg, m, k, "cuda")
        tg.quantize(x, nw, sc, nseg=nseg)
        width = n if epi == tv.EPI_GLU else nseg * n
        kw = dict(k=k, epi=epi, residual=res if epi == tv.EPI_RESIDUAL else None)
        want = torch.empty(m, width, device="cuda", dtype=torch.float16)
        tg.gemm(sc, w, sw, want, config=(16, 64, 128, 4, 4, 1), **kw)
        same = True
        for _ in range(3):  # repeated launches: the workspace is left zero each time
            out = torch.full_like(want, float("nan"))
            tgd.gemm(sc, w, sw, out, config=tgd._CONFIGS[0], **kw)
            same &= bool(torch.equal(out, want))
        zero = all(int(t.abs().sum()) == 0 for pair in tgd._WORKSPACE.values() for t in pair)
        r = dict(check="split-K decode GEMM == ternary_gemm.gemm", m=m, n=n, k=k, nseg=nseg, epi=epi,
                 bit_equal=same, workspace_zero=zero, config=list(tgd._CONFIGS[0]),
                 split=list(tgd._split(tgd._CONFIGS[0], n, -(-k // 4), nseg, tv._num_sm(out.device))))
        print(r, flush=True)
        results["checks"].append(r)


def step_ms(dec, steps, reps=3):
    from mmf.kernels import ternary_gemv as tv

    ids = torch.randint(3, dec.V, (dec.batch, 8), device="cuda")
    nxt = dec.prefill(ids).argmax(-1)
    for _ in range(5):
        dec.step(nxt)
    torch.cuda.synchronize()
    return min(tv.event_times(lambda: dec.step(nxt), reps, steps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1.3b,13b,370m")
    ap.add_argument("--batches", default="1,2,4,8,16,64")
    ap.add_argument("--ab", default="16", help="batches also timed with the prefill GEMM (MMF_DECODE_SPLITK=0)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--dump-after", type=float, default=0, help="print every thread's stack after this many s")
    args = ap.parse_args()
    if args.dump_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_after, repeat=True)
    from mmf.decode_graph import GraphDecoder

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    ab = {int(b) for b in args.ab.split(",") if b}
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                   steps=args.steps, checks=[], rows=[])
    import triton
    results["triton"] = triton.__version__

    def save():
        if args.json:
            write_json(args.json, results)

    if not args.no_checks:
        check_split_k(results)
        save()
    print(f"{'size':>6} {'batch':>5} {'path':>10} {'ms/step':>8} {'x batch1':>8} {'tok/s':>9} {'build s':>7}",
          flush=True)
    for size in args.sizes.split(","):
        cfg = model_preset(size)
        model = build_mmf_random(cfg, "cuda", dtype)
        torch.cuda.synchronize()
        base = None
        for b in batches:
            paths = ["gemv"] if b <= 2 else (["splitk", "gemm"] if b in ab else ["splitk"])
            for path in paths:
                GraphDecoder.SPLITK = path != "gemm"
                t0 = time.time()
                dec = GraphDecoder(model, b)
                build = time.time() - t0
                ms = step_ms(dec, args.steps)
                if b == 1:
                    base = ms
                ratio = ms / base if base else float("nan")
                row = dict(size=size, batch=b, path=path, ms_per_step=ms, ratio_to_batch1=ratio,
                           tokens_per_s=b * 1e3 / ms, build_s=build, bytes_per_step=dec.bytes_per_token())
                results["rows"].append(row)
                print(f"{size:>6} {b:>5} {path:>10} {ms:8.3f} {ratio:8.2f} {b * 1e3 / ms:9.0f} {build:7.1f}",
                      flush=True)
                save()
                del dec
                torch.cuda.empty_cache()
        GraphDecoder.SPLITK = True
        del model
        torch.cuda.empty_cache()
    save()
    if not args.no_checks:
        from mmf.bench.kernel_bench import check_decoder
        for r in check_decoder(quick=False):
            print(r, flush=True)
            results["checks"].append(r)
        save()


if __name__ == "__main__":
    main()
