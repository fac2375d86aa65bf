"""Prefill on int8 tensor cores vs Transformer++'s bf16 prefill (GPU), in one run.

1. Peak probes: ``torch._int_mm`` (int8 -> int32) and bf16 ``torch.mm`` on 8192^3 matrices.
2. Kernels at prefill shapes (o, gate-up and down of 1.3b at 8192 rows and of 13b at 2048 rows): the
   many-rows paths of ``kernels.ternary_gemm`` (unpack codes to int8, then ``torch._int_mm`` and an
   epilogue pass, or the Triton int8 GEMM with the epilogue fused), their parts, the fused Triton GEMM
   (codes unpacked in registers), and bf16 ``torch.mm`` at the same
   shape; TOP/s as a share of the peaks of step 1. Exactness: both int8 paths give equal outputs.
3. Whole prefill, random weights: ``GraphDecoder.prefill`` (graph replay; the default, where each
   projection takes the path the tuner found faster, ``ternary_gemm.many_rows_path``; then every projection
   on the unpacked path with the default int8 GEMM, with the other one, and on the fused GEMM) vs
   ``StaticLlama`` (Transformer++, bf16) as ``mmf bench`` builds
   them; host timer with device synchronisation, median of ``--repeat``; logits of the two mmf paths
   compared. 4. Where the time of a 1.3b x 8192 and a 13b x 2048 prefill goes (torch.profiler, kernel time by kind).

Prints a table and writes JSON (``--out``). ``python -m mmf.bench.prefill_bench --out F``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mmf.bench import write_json
from mmf.bench.kernel_bench import log


def cuda_ms(fn, iters=10, warmup=2):
    """Median ms of ``iters`` single calls (CUDA events), after ``warmup``."""
    from mmf.kernels.ternary_gemv import event_times

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(event_times(fn, iters))


def host_ms(fn, iters=5, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts)


def peaks(n=8192):
    a8 = torch.randint(-100, 100, (n, n), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-100, 100, (n, n), dtype=torch.int8, device="cuda")
    t8 = cuda_ms(lambda: torch._int_mm(a8, b8.t()), iters=10, warmup=3)
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t16 = cuda_ms(lambda: torch.mm(a, b.t()), iters=10, warmup=3)
    f = 2 * n ** 3
    return dict(shape=n, int8_int_mm_ms=t8, int8_tops=f / t8 / 1e9, bf16_mm_ms=t16, bf16_tflops=f / t16 / 1e9)


def kernel_rows(size, m, pk):
    from mmf.bench.model_variants import bench_configs, mmf_matrices, random_packed
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    cfg, _ = bench_configs(size)
    mats, _ = mmf_matrices(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for (n, k), epi in zip(mats[3:], (tv.EPI_RESIDUAL, tv.EPI_GLU, tv.EPI_RESIDUAL)):  # o, gate-up, down
        packed = random_packed(n, k, "i2", "cuda", gen)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        nw = torch.rand(1, k, dtype=torch.bfloat16, device="cuda") + 0.5
        sw = torch.tensor([0.9], device="cuda")
        sc = tv.Scratch(1, m, k, "cuda")
        tg.quantize(x, nw, sc)
        nout = n // 2 if epi == tv.EPI_GLU else n
        res = torch.randn(m, nout, dtype=torch.bfloat16, device="cuda") if epi == tv.EPI_RESIDUAL else None
        out_new = torch.empty(m, nout, dtype=torch.bfloat16, device="cuda")
        out_old = torch.empty_like(out_new)
        kw = dict(k=k, epi=epi, residual=res)
        pb = 4 * sc.pw
        out_i8 = torch.empty_like(out_new)
        tg.gemm_unpacked(sc, [packed], sw, out_i8, mode="triton", **kw)  # tunes
        t_i8 = cuda_ms(lambda: tg.gemm_unpacked(sc, [packed], sw, out_i8, mode="triton", **kw))
        t_new = cuda_ms(lambda: tg.gemm_unpacked(sc, [packed], sw, out_new, mode="int_mm", **kw))
        t_unpack = cuda_ms(lambda: tg.unpack_codes(packed, pb))
        wu = tg.unpack_codes(packed, pb)
        xq8 = sc.xq.view(torch.int8).reshape(m, 4 * pb)
        t_mm = cuda_ms(lambda: torch._int_mm(xq8, wu.t()))
        saved = tg.INT_MM_MIN_ROWS
        tg.INT_MM_MIN_ROWS = 0
        try:
            tg.gemm(sc, [packed], sw, out_old, **kw)  # tunes
            t_old = cuda_ms(lambda: tg.gemm(sc, [packed], sw, out_old, **kw))
        finally:
            tg.INT_MM_MIN_ROWS = saved
        xb = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        t_bf = cuda_ms(lambda: torch.mm(xb, wb.t()))
        f = 2 * m * n * k
        t_i8k = cuda_ms(lambda: tg._i8_gemm(xq8, wu, sc, sw, out_i8, res if res is not None else out_i8,
                                            res.stride(0) if res is not None else 0, m, nout, 0, epi))
        rows.append(dict(size=size, rows=m, n=n, k=k, epi=epi, unpack_ms=t_unpack, int_mm_ms=t_mm,
                         many_rows_path_ms=t_new,
                         triton_i8_gemm_ms=t_i8k, triton_i8_path_ms=t_i8,
                         triton_i8_gemm_share_of_int8_peak=f / t_i8k / 1e9 / pk["int8_tops"],
                         triton_i8_tops=f / t_i8k / 1e9, triton_outputs_equal=bool(torch.equal(out_i8, out_old)),
                         fused_triton_ms=t_old, bf16_mm_ms=t_bf,
                         int_mm_share_of_int8_peak=f / t_mm / 1e9 / pk["int8_tops"],
                         path_share_of_int8_peak=f / t_new / 1e9 / pk["int8_tops"],
                         bf16_share_of_bf16_peak=f / t_bf / 1e9 / pk["bf16_tflops"],
                         outputs_equal=bool(torch.equal(out_new, out_old))))
        del packed, wu, xb, wb
    return rows


def model_rows(size, shapes, repeat, profile_shape=None):
    import triton

    from mmf.bench.model_variants import bench_configs, build_runner
    from mmf.decode_graph import GraphDecoder
    from mmf.kernels import ternary_gemm as tg

    cfg_m, cfg_l = bench_configs(size)
    mmf = build_runner("mmf", cfg_m, cfg_l, "cuda", torch.bfloat16, "i2", None, 0)
    out, prof = [], None
    decs = {}
    for B, T in shapes:
        if B not in decs:
            decs[B] = GraphDecoder(mmf.model, B, use_graph=False)  # no decode graph / GEMV tuning: prefill only
            decs[B].use_graph = True
        dec = decs[B]
        ids = torch.randint(0, cfg_m.vocab_size, (B, T), device="cuda")
        r = dict(size=size, batch=B, tokens=T)
        logits = {}
        default = tg.INT8_GEMM
        alt = "triton" if default == "int_mm" else "int_mm"
        r.update(many_rows_mode=default, many_rows_alt_mode=alt)
        # the default (each shape's faster path, tuned), then each path forced
        paths = (("many_rows", "auto", default), ("unpacked", "unpacked", default),
                 ("many_rows_alt", "unpacked", alt), ("fused_triton", "fused", default))
        for name, path, mode in paths:
            tg.MANY_ROWS_PATH, tg.INT8_GEMM = path, mode
            dec._prefill_graphs.clear()
            dec._prefill_seen.clear()
            r[f"mmf_{name}_ms"] = host_ms(lambda: dec.prefill(ids), iters=repeat)
            logits[name] = dec.prefill(ids).float().clone()
        tg.MANY_ROWS_PATH, tg.INT8_GEMM = "auto", default
        r["paths_chosen"] = {str(k[1:]): v[0] for k, v in tg._TUNED.items()
                             if k[0] == "path" and k[1] == triton.next_power_of_2(B * T)}
        r["alt_logits_equal"] = bool(torch.equal(logits["many_rows_alt"], logits["fused_triton"]))
        r["unpacked_logits_equal"] = bool(torch.equal(logits["unpacked"], logits["fused_triton"]))
        a, b = logits["many_rows"], logits["fused_triton"]
        r["logits_equal"] = bool(torch.equal(a, b))
        r["argmax_equal"] = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
        r["max_rel_diff"] = float(((a - b).abs().max() / b.abs().max()).item())
        out.append(r)
        log(f"  {size} B={B} T={T}: mmf {r['mmf_many_rows_ms']:.2f} ms (unpacked {r['mmf_unpacked_ms']:.2f}, "
            f"unpacked {r['many_rows_alt_mode']} {r['mmf_many_rows_alt_ms']:.2f}, "
            f"fused {r['mmf_fused_triton_ms']:.2f}); paths {sorted(r['paths_chosen'].values())}")
        if profile_shape == (B, T):
            prof = breakdown(dec, ids)
        dec._prefill_graphs.clear()
    del decs, mmf
    torch.cuda.empty_cache()
    tpp = build_runner("transformer++", cfg_m, cfg_l, "cuda", torch.bfloat16, "i2", None, 0)
    for r in out:
        tpp.setup(r["batch"], r["tokens"] + 2)
        ids = torch.randint(0, cfg_l.vocab_size, (r["batch"], r["tokens"]), device="cuda")
        r["transformerpp_ms"] = host_ms(lambda: tpp.prefill(ids), iters=repeat)
        r["speedup_vs_transformerpp"] = r["transformerpp_ms"] / r["mmf_many_rows_ms"]
        log(f"  {size} B={r['batch']} T={r['tokens']}: transformer++ {r['transformerpp_ms']:.2f} ms")
    del tpp
    torch.cuda.empty_cache()
    return out, prof


def breakdown(dec, ids):
    """GPU kernel time of one eager prefill body by kind."""
    from torch.profiler import ProfilerActivity, profile

    dec._prefill_body(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        dec._prefill_body(ids)
        torch.cuda.synchronize()
    kinds = {}
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        nm = e.key.lower()
        kind = ("int8 gemm (triton, epilogue fused)" if "_gemm_i8_kernel" in nm else
                "unpack" if "_unpack_kernel" in nm else "epilogue" if "_epi_kernel" in nm else
                "quantize" if "_quant_kernel" in nm else "scan" if "scan" in nm or "mlgru" in nm else
                "int8 gemm (cublas)" if ("gemm" in nm or "cutlass" in nm or "igemm" in nm or "i8" in nm)
                and "_gemm_kernel" not in nm else "fused triton gemm" if "_gemm_kernel" in nm else "other")
        kinds.setdefault(kind, [0.0, []])
        kinds[kind][0] += t / 1e3
        kinds[kind][1].append(e.key[:60])
    return {k: dict(ms=v[0], kernels=sorted(set(v[1]))[:6]) for k, v in kinds.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="1.3b,13b")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_bench: needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    t0 = time.time()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    import triton

    res["triton"] = triton.__version__

    def save():
        res["wall_s"] = time.time() - t0
        if args.out:
            write_json(args.out, res, indent=1)
    pk = peaks()
    res["peaks"] = pk
    log(f"[{time.time() - t0:.0f}s] peaks: int8 _int_mm {pk['int8_tops']:.0f} TOP/s, "
        f"bf16 mm {pk['bf16_tflops']:.0f} TFLOP/s")
    sizes = args.sizes.split(",")
    res["kernels"] = []
    for size, m in (("1.3b", 8192), ("13b", 2048)):
        if size in sizes:
            res["kernels"] += kernel_rows(size, m, pk)
            save()
    log(f"[{time.time() - t0:.0f}s] kernels")
    hdr = ("size rows N K | unpack int_mm int_mm-path triton-i8 triton-i8-path fused_triton bf16_mm (ms) | "
           "int_mm%int8peak triton-i8 TOP/s %int8peak bf16%bf16peak | equal")
    log(hdr)
    for r in res["kernels"]:
        log(f"{r['size']} {r['rows']} {r['n']} {r['k']} | {r['unpack_ms']:.3f} {r['int_mm_ms']:.3f} "
            f"{r['many_rows_path_ms']:.3f} {r['triton_i8_gemm_ms']:.3f} {r['triton_i8_path_ms']:.3f} "
            f"{r['fused_triton_ms']:.3f} {r['bf16_mm_ms']:.3f} | "
            f"{100 * r['int_mm_share_of_int8_peak']:.0f}% {r['triton_i8_tops']:.0f} "
            f"{100 * r['triton_i8_gemm_share_of_int8_peak']:.0f}% "
            f"{100 * r['bf16_share_of_bf16_peak']:.0f}% | {r['outputs_equal']} {r['triton_outputs_equal']}")
    res["prefill"] = []
    res["breakdown"] = {}
    plan = {"1.3b": ([(1, 8192)], (1, 8192)), "13b": ([(1, 2048), (16, 128), (1, 128)], (1, 2048))}
    for size in sizes:
        shapes, prof_shape = plan[size]
        rows, prof = model_rows(size, shapes, args.repeat, prof_shape)
        res["prefill"] += rows
        if prof:
            res["breakdown"][f"{size} {prof_shape}"] = prof
        save()
        log(f"[{time.time() - t0:.0f}s] {size} done")
    log("\nsize  B x T  | mmf ms | unpacked + Triton int8 | unpacked + other int8 GEMM | fused only | "
        "Transformer++ ms | T++/mmf | logits equal")
    for r in res["prefill"]:
        log(f"{r['size']} {r['batch']}x{r['tokens']} | {r['mmf_many_rows_ms']:.2f} | {r['mmf_unpacked_ms']:.2f} | "
            f"{r['mmf_many_rows_alt_ms']:.2f} | "
            f"{r['mmf_fused_triton_ms']:.2f} | "
            f"{r['transformerpp_ms']:.2f} | {r['speedup_vs_transformerpp']:.2f} | {r['logits_equal']}")
    for k, v in res["breakdown"].items():
        parts = sorted(v.items(), key=lambda x: -x[1]["ms"])
        log(f"\nbreakdown {k}: " + ", ".join(f"{kk} {vv['ms']:.2f} ms" for kk, vv in parts))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
