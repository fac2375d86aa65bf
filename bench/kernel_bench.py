"""GPU evidence for the inference kernels: correctness on the device, then bandwidth and decode speed.

    python -m mmf.bench.kernel_bench --out results.json [--smoke]

One run prints (and writes as JSON):

1. the measured device-to-device copy bandwidth (bytes read + written / time), the floor's divisor;
2. correctness on the GPU: Triton vs the torch reference (``bitlinear_i2``, ``mlgru_step``, the
   gated scan) on fresh random inputs, odd shapes, fp32/fp16/bf16; ``GraphDecoder`` vs the eager
   model (greedy tokens, median logit error);
3. every large ternary GEMV (13b and 370m shapes) in the form the decoder runs it (fused prologue
   and epilogue), timed back to back in a CUDA graph over enough weight copies that nothing is
   served from L2: time, GB/s, % of copy bandwidth;
4. whole-model decode (``GraphDecoder``, CUDA graph) for ``370m`` and ``13b`` at batch 1: ms/token
   beside the floor (bytes that must be read per token / copy bandwidth), and GPU memory;
5. prefill of 128 tokens at ``13b`` vs the bf16 matmuls of a Transformer++ 13b (torch) at the same
   tokens (matmuls only: a lower bound on the dense model's prefill time).

Random packed weights are built directly (random codes in {0, 1, 2} per 2-bit field); no
full-precision 13B model is ever made.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

from mmf.config import MMFConfig, model_preset
from mmf.ternary_codes import pack_i2
from mmf.kernels import reference
from mmf.models import build_model
from mmf.bench import write_json
from mmf.bench.model_variants import build_mmf_random


def log(*a):
    print(*a, flush=True)


def cuda_time(fn, iters=20, warmup=3):
    """Median ms of ``iters`` single calls, after ``warmup``."""
    from mmf.kernels.ternary_gemv import event_times

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = sorted(event_times(fn, iters))
    return ts[len(ts) // 2]


def copy_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    ms = cuda_time(lambda: b.copy_(a), iters=20)
    del a, b
    return 2 * n / (ms * 1e-3)


def rand_packed(n, k, device="cuda"):
    p = -(-k // 4)
    c = torch.randint(0, 3, (n, p, 4), dtype=torch.uint8, device=device)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


# ----------------------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------------------
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def row_errs(y, ref):
    y, ref = y.double().reshape(-1, y.shape[-1]), ref.double().reshape(-1, ref.shape[-1])
    return (y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def check_kernels(quick: bool):
    from mmf.kernels import ternary_gemm
    from mmf.kernels.mlgru_step import mlgru_gated_scan, mlgru_step
    from mmf.kernels.ternary_gemv import uses_gemv

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1, 1000, 1027), (3, 515, 2050), (8, 300, 999), (16, 257, 4099), (128, 96, 1030)]
    if quick:
        shapes = shapes[:2] + shapes[3:4]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, n, k in shapes:
            codes = torch.randint(-1, 2, (n, k), device="cuda", generator=g, dtype=torch.int8)
            packed = pack_i2(codes)
            x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(dtype)
            nw = (torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype)
            s_w = torch.tensor(1.7, device="cuda")
            y0 = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = ternary_gemm.bitlinear_i2(x, nw, packed, k, s_w)
            ref = reference.bitlinear_frozen(x, nw, codes, s_w)
            e = row_errs(y, ref)
            exact = None
            if dtype == torch.float32:  # integer sums: recover them and compare exactly
                xq, s_x = reference.activation_quant(reference.rms_norm(x, nw, 1e-6, torch.float32))
                acc = xq @ codes.float().T
                exact = bool(torch.equal(torch.round(y.double() * (s_x * s_w).double()), acc.double()))
            del y0
            rows.append(dict(op="bitlinear_i2", path="gemv" if uses_gemv(m, k) else "gemm", dtype=str(dtype)[6:],
                             shape=f"{m}x{k}->{n}", max_row_rel_err=e.max().item(),
                             rows_over_tol=int((e > TOL[dtype]).sum()), tol=TOL[dtype], finite=bool(y.isfinite().all()),
                             int_exact=exact))
        B, D = 5, 1531
        ip, fp, gp = (torch.randn(B, D, device="cuda", generator=g).to(dtype) for _ in range(3))
        st = torch.randn(B, D, device="cuda", generator=g)
        lb = torch.rand(D, device="cuda", generator=g) * 0.8
        w = (torch.rand(D, device="cuda", generator=g) + 0.5).to(dtype)
        o, s = mlgru_step(ip, fp, gp, st, lb, w, 1e-6)
        o_ref, s_ref = reference.mlgru_step_ref(ip, fp, gp, st, lb, w, 1e-6)
        rows.append(dict(op="mlgru_step", path="fused", dtype=str(dtype)[6:], shape=f"{B}x{D}",
                         max_row_rel_err=max(row_errs(o, o_ref).max().item(), row_errs(s, s_ref).max().item()),
                         rows_over_tol=int((row_errs(o, o_ref) > TOL[dtype]).sum()), tol=TOL[dtype],
                         finite=bool(o.isfinite().all()), int_exact=None))
    # every GEMM schedule the tuner may pick (both operand orders), plain and GLU pair, fp32 exact sums
    from mmf.kernels import ternary_gemv

    for m in (5, 16, 128):
        n, k = 300, 2050
        codes = torch.randint(-1, 2, (2 * n, k), device="cuda", generator=g, dtype=torch.int8)
        x = torch.randn(m, k, device="cuda", generator=g) * 3
        nw = (torch.rand(1, k, device="cuda", generator=g) + 0.5)
        s_w = torch.tensor([1.7], device="cuda")
        sc = ternary_gemv.Scratch(1, m, k, "cuda")
        ternary_gemm.quantize(x, nw, sc)
        # the reference products of the pre-pass's own int8 activations (exact in float64), so that
        # a rounding flip of the quantiser (docs/reference-semantics.md) is not charged to a GEMM schedule
        p = -(-k // 4)
        xq = sc.xq[0].view(torch.int8).reshape(m, 4, -1)[:, :, :p].reshape(m, 4 * p)[:, :k]
        ref = (xq.double() @ codes.double().T / (sc.sx[0].double()[:, None] * s_w.double())).float()
        glu_ref = torch.nn.functional.silu(ref[:, :n]) * ref[:, n:]
        for cfg in ternary_gemm._gemm_configs(m):
            y = torch.full((m, 2 * n), float("nan"), device="cuda")
            ternary_gemm.gemm(sc, [pack_i2(codes)], s_w, y, k=k, config=cfg)
            glu = torch.full((m, n), float("nan"), device="cuda")
            ternary_gemm.gemm(sc, [pack_i2(codes)], s_w, glu, k=k, epi=ternary_gemv.EPI_GLU, config=cfg)
            e = torch.maximum(row_errs(y, ref), row_errs(glu, glu_ref))
            rows.append(dict(op="gemm schedule " + str(cfg), path="gemm", dtype="float32", shape=f"{m}x{k}->{n} +GLU",
                             max_row_rel_err=e.max().item(), rows_over_tol=int((e > 1e-5).sum()), tol=1e-5,
                             finite=bool(y.isfinite().all() and glu.isfinite().all()), int_exact=None))
    T = 300  # five chunks of the chunked form
    ifp = torch.randn(3, T, 3 * 1000, device="cuda", generator=g)
    i, f = reference.mlgru_gates(ifp[..., :1000], ifp[..., 1000:2000], lb[:1000])
    S_ref, _ = reference.mlgru_scan(i, f, st[:3, :1000])
    for chunked in (False, True):
        S, last = mlgru_gated_scan(ifp[..., :1000], ifp[..., 1000:2000], lb[:1000], st[:3, :1000], chunked=chunked)
        e = row_errs(S, S_ref)
        rows.append(dict(op="mlgru_gated_scan", path="chunked" if chunked else "single pass", dtype="float32",
                         shape=f"3x{T}x1000", max_row_rel_err=e.max().item(), rows_over_tol=int((e > 1e-5).sum()),
                         tol=1e-5, finite=bool(S.isfinite().all()), int_exact=None))
    return rows


def _random_frozen(cfg, device):
    """A random frozen MatMul-free model built on ``device``, its norm weights in [0.5, 1.5] and its lower
    bounds N(0, 1), so that no prologue multiplies by ones or zeros."""
    model = build_model(cfg).to(device).init_weights().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        model.model.lower_bounds.normal_(0, 1)
    return model.freeze()


def check_decoder(quick: bool):
    from mmf.decode_graph import GraphDecoder

    out = []
    cases = [(torch.float32, 1), (torch.float32, 2), (torch.float16, 2), (torch.float32, 4), (torch.float32, 6),
             (torch.bfloat16, 6)]
    for dtype, batch in cases[: 4 if quick else 6]:
        torch.manual_seed(batch)
        cfg = MMFConfig(vocab_size=1003, hidden_size=384, num_hidden_layers=3, intermediate_size=1000)
        model = _random_frozen(cfg, "cpu").to("cuda", dtype)
        ids = torch.randint(3, 1003, (batch, 11), device="cuda")
        dec = GraphDecoder(model, batch)
        logits = dec.prefill(ids)
        with torch.no_grad():
            ref = model(ids)
        errs = [row_errs(logits, ref.logits[:, -1])]
        cache, ref_logits, same = ref.cache, ref.logits[:, -1], True
        for _ in range(8):
            nxt = ref_logits.argmax(-1)
            same &= bool(torch.equal(logits.argmax(-1), nxt))
            logits = dec.step(nxt).clone()
            with torch.no_grad():
                o = model(nxt[:, None], cache)
            cache, ref_logits = o.cache, o.logits[:, -1]
            errs.append(row_errs(logits, ref_logits))
        errs = torch.cat(errs)
        # prefill graphs: the 2nd prefill of a length is captured, the 3rd replays it; new ids too
        first = dec.prefill(ids).clone()
        state1 = dec.state.clone()
        for _ in range(2):
            again = dec.prefill(ids)
        graph_equal = bool(torch.equal(first, again) and torch.equal(state1, dec.state))
        ids2 = torch.randint(3, 1003, (batch, 11), device="cuda")
        replay = dec.prefill(ids2).clone()
        replay_state = dec.state.clone()
        dec.reset()
        eager = dec._prefill_body(ids2)  # the same kernels without the graph
        replay_same = bool(torch.equal(replay, eager) and torch.equal(replay_state, dec.state))
        with torch.no_grad():
            ref2 = model(ids2).logits[:, -1]
        out.append(dict(op="GraphDecoder vs eager", path="graph" if dec.graph is not None else "eager",
                        dtype=str(dtype)[6:], shape=f"batch {batch}, d 384, L 3, 9 positions",
                        median_rel_err=errs.median().item(), max_rel_err=errs.max().item(),
                        same_greedy_tokens=same, prefill_graphs=len(dec._prefill_graphs),
                        prefill_replay_bit_equal=graph_equal, prefill_replay_new_ids_equal_eager=replay_same,
                        prefill_replay_new_ids_median_err=row_errs(replay, ref2).median().item()))
    return out


def row_stats_errors(dec) -> dict:
    """The ``RowStats`` a ``GraphDecoder`` step left (the last layer's g, r, v and x) against torch on the
    decoder's buffers: max relative error of the summed sum(out^2) parts, and whether max|v * w_down| is
    exact; {} when the decoder keeps none."""
    if not dec.row_stats:
        return {}
    d, B = dec.d, dec.batch
    outs = dict(g=dec.ifg[:, 2 * d:], r=dec.r, v=dec.v, x=dec.x)
    res = {}
    for name, st in dec.row_stats.items():
        parts = st.buf[:2 * st.nt * B].view(2, st.nt, B)
        o = outs[name].float()
        want = (o * o).sum(-1)
        res[f"{name}_sumsq_max_rel_err"] = ((parts[0].sum(0) - want).abs() / want).max().item()
        if name == "v":
            w = dec.layers[-1]["down"].norm.float()
            res["v_maxabs_exact"] = bool(torch.equal(parts[1].max(0).values, (o * w).abs().max(-1).values))
    return res


def _wide_model():
    """A 4096-wide, 2-layer random fp32 MatMul-free model on the GPU, norms and lower bounds non-trivial."""
    torch.manual_seed(7)
    return _random_frozen(MMFConfig(vocab_size=1003, hidden_size=4096, num_hidden_layers=2, intermediate_size=11008),
                          "cuda")


def _decoder_pair(model, batch, first: dict, second: dict, steps: int = 8) -> dict:
    """Two ``GraphDecoder``s built under ``first`` / ``second`` (GraphDecoder attribute, or (object, attribute),
    -> value; set while each is built, whose CUDA graph keeps them), fed the eager model's greedy tokens: their
    logits against each other and against the eager model, greedy tokens agreeing, and the first's
    ``row_stats_errors``."""
    from mmf.bench import overridden
    from mmf.decode_graph import GraphDecoder

    decs = []
    for settings in (first, second):
        with overridden({(GraphDecoder, k) if isinstance(k, str) else k: v for k, v in settings.items()}):
            decs.append(GraphDecoder(model, batch))
    a, b = decs
    ids = torch.randint(3, model.config.vocab_size, (batch, 9), device=a.device)
    la, lb = a.prefill(ids).clone(), b.prefill(ids).clone()
    with torch.no_grad():
        ref = model(ids)
    cache, lr = ref.cache, ref.logits[:, -1]
    e_ab, e_ar, e_br, same_ab, same_ar, same_br = [], [], [], 0, 0, 0
    for _ in range(steps):
        nxt = lr.argmax(-1)
        la, lb = a.step(nxt).clone(), b.step(nxt).clone()
        with torch.no_grad():
            o = model(nxt[:, None], cache)
        cache, lr = o.cache, o.logits[:, -1]
        e_ab.append(row_errs(la, lb))
        e_ar.append(row_errs(la, lr))
        e_br.append(row_errs(lb, lr))
        same_ab += int((la.argmax(-1) == lb.argmax(-1)).sum())
        same_ar += int((la.argmax(-1) == lr.argmax(-1)).sum())
        same_br += int((lb.argmax(-1) == lr.argmax(-1)).sum())
    e_ab, e_ar, e_br = torch.cat(e_ab), torch.cat(e_ar), torch.cat(e_br)
    n = steps * batch
    res = dict(**row_stats_errors(a),
               median_rel_err_vs_without=e_ab.median().item(), max_rel_err_vs_without=e_ab.max().item(),
               median_rel_err_vs_eager=e_ar.median().item(), max_rel_err_vs_eager=e_ar.max().item(),
               without_median_rel_err_vs_eager=e_br.median().item(), without_max_rel_err_vs_eager=e_br.max().item(),
               greedy_same_vs_without=f"{same_ab}/{n}", greedy_same_vs_eager=f"{same_ar}/{n}",
               without_greedy_same_vs_eager=f"{same_br}/{n}")
    del decs, a, b
    torch.cuda.empty_cache()
    return res


def check_row_stats(quick: bool):
    """Each decode GEMM's epilogue can leave row statistics that the next pre-pass reads instead of reducing
    the row (``GraphDecoder.ROW_STATS``; by default where the pre-pass splits rows: 4096-wide models at batch
    <= 16). On a 4096-wide, 2-layer random fp32 model, first schedules (no tuning), split rows at batch 4 and
    16 and whole rows at batch 4 and 64: the statistics against torch (``row_stats_errors``), and the logits of
    decoders with and without them, fed the eager model's greedy tokens, against each other (the same
    arithmetic but for fp32 summation order: rounding flips) and against the eager model."""
    from mmf.bench import overridden
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    model = _wide_model()
    out = []
    with overridden({(tv, "TUNE"): False}):
        for batch, rows in ((4, "split"), (4, "whole")) if quick else ((4, "split"), (16, "split"), (4, "whole"),
                                                                      (64, "whole")):
            with overridden({(tg, "QUANT_SPLIT_MIN_K"): tg.QUANT_SPLIT_MIN_K if rows == "split" else 1 << 30}):
                res = _decoder_pair(model, batch, dict(ROW_STATS="always"), dict(ROW_STATS="never"))
            out.append(dict(op="GraphDecoder row statistics", path="graph", dtype="float32",
                            shape=f"batch {batch}, d 4096, L 2, 8 steps, {rows} pre-pass rows", **res))
    return out


def decoder_projections(d: int, f: int) -> list:
    """A decoder layer's projections at model width d and feed-forward width f, as (name, segments, output
    width N, K, pre-pass prologue, epilogue): i/f/g (three segments, norm prologue), o (MLGRU prologue,
    residual), gate/up (norm prologue, GLU pair: 2N weight rows), down (plain prologue, residual)."""
    from mmf.kernels import ternary_gemv as tv

    return [("ifg", 3, d, d, tv.PRO_NORM, tv.EPI_STORE), ("o", 1, d, d, tv.PRO_MLGRU, tv.EPI_RESIDUAL),
            ("gate/up", 1, f, d, tv.PRO_NORM, tv.EPI_GLU), ("down", 1, d, f, tv.PRO_PLAIN, tv.EPI_RESIDUAL)]


def gemm_pair_cases(widths, rows, pairs, dev="cuda", seed=5, chunks=None) -> list:
    """Two ways of running the decode GEMM against each other, for each decoder shape of each (d, ffn) in
    ``widths`` (``decoder_projections``) and each row count in
    ``rows``: ``pairs`` holds (schedule, schedule), the two compared. Random bf16
    inputs, quantised as the decoder does (``chunks`` None: ``decode_quant_chunks``, so 13b rows are split and
    sum(xq) is left in parts). Reports whether the outputs are equal bit for bit (the int32 sums are exact, so
    every schedule must give the same output) and whether every output was written."""
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    dev = torch.device(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    bf = torch.bfloat16
    out = []
    for d, f in widths:
        for name, nseg, n, k, _, epi in decoder_projections(d, f):
            w = [rand_packed(2 * n if epi == tv.EPI_GLU else n, k, dev) for _ in range(nseg)]
            sw = torch.rand(nseg, device=dev, generator=gen) + 0.5
            for m in rows:
                sc = tv.Scratch(nseg, m, k, dev)
                tg.quantize(torch.randn(m, k, device=dev, generator=gen).to(bf),
                            (torch.rand(nseg, k, device=dev, generator=gen) + 0.5).to(bf), sc, nseg=nseg, k=k,
                            chunks=tg.decode_quant_chunks(m, d) if chunks is None else chunks)
                res = {"residual": torch.randn(m, nseg * n, device=dev, generator=gen).to(bf)} \
                    if epi == tv.EPI_RESIDUAL else {}
                for pair in pairs:
                    got = []
                    for cfg in pair:
                        o = torch.full((m, n if epi == tv.EPI_GLU else nseg * n), float("nan"), device=dev, dtype=bf)
                        tg.gemm(sc, w, sw, o, k=k, epi=epi, config=cfg, **res)
                        got.append((str(cfg), o))
                    out.append(dict(shape=f"{name} d {d}", rows=m, schedules=f"{got[0][0]} / {got[1][0]}",
                                    pre_pass_programs_per_row=sc.nch,
                                    bit_equal=bool(torch.equal(got[0][1], got[1][1])),
                                    outputs_written=not (got[0][1].isnan().any() or got[1][1].isnan().any())))
    return out


def early_weight_pairs(cfgs) -> list:
    """``gemm_pair_cases`` pairs: each weights-early schedule (``EARLY_WEIGHTS``) against its K loop."""
    return [(c[:6], c) for c in cfgs]


def check_gemm_variants(quick: bool):
    """The decode GEMM's weights-early schedules (``EARLY_WEIGHTS``) on the GPU, at 370m and 13b widths (quick:
    370m), 5 and 16 rows: ``gemm_pair_cases`` of every weights-early schedule against its K loop; and decoders
    with them (untuned, so on the first weights-early schedule) against the default on the 4096-wide, 2-layer
    random fp32 model at batch 4 and 16 (quick: 4), fed the eager model's greedy tokens (``_decoder_pair``); and the
    4- and 8-row tiles (``decode_row_tile``, at 3 and 5 rows) against the 16-row tile, four schedules."""
    from mmf.bench import overridden
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    widths = [(1024, 2816)] if quick else [(1024, 2816), (5120, 13824)]
    out = []
    with overridden({(tv, "TUNE"): False}):
        out += [dict(op="decode GEMM, one K block per program with its weights loaded before the wait vs the K loop",
                     **r) for r in gemm_pair_cases(widths, (5, 16), early_weight_pairs(tg._EARLY_WEIGHT_CONFIGS))]
        for m in (3, 5):  # the least row tiles for 3-4 and 5-8 rows (DECODE_ROW_TILE_MIN) against 16 rows
            bm = tg.decode_row_tile(m, least=4)
            pairs = [(c, (bm,) + c[1:]) for c in ((16, 64, 256, 4, 1, 0, 0, 1), (16, 64, 256, 4, 1, 1, 0, 1),
                                                   (16, 64, 128, 4, 4), (16, 64, 128, 4, 4, 1, 4))]
            out += [dict(op=f"decode GEMM, the {bm}-row tile vs the 16-row tile", **r)
                    for r in gemm_pair_cases(widths, (m,), pairs)]
        model = _wide_model()
        for batch in (4,) if quick else (4, 16):
            res = _decoder_pair(model, batch, {(tg, "EARLY_WEIGHTS"): True}, {})
            out.append(dict(op="GraphDecoder, EARLY_WEIGHTS", path="graph", dtype="float32",
                            shape=f"batch {batch}, d 4096, L 2, 8 steps", **res))
    return out


# ----------------------------------------------------------------------------------------------
# GEMV bandwidth
# ----------------------------------------------------------------------------------------------
def time_gemv(n, k, kind, batch, dtype, bw, copies_bytes=768 << 20, config=None, no_prologue=False):
    """One projection as the decoder runs it, back to back over distinct weight copies in a graph."""
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    rows_w = 2 * n if kind == "glu" else n
    nbytes = rows_w * (-(-k // 4))
    copies = max(2, min(64, math.ceil(copies_bytes / nbytes)))
    ws = [rand_packed(rows_w, k) for _ in range(copies)]
    x = torch.randn(batch, k, device="cuda").to(dtype)
    nw = torch.rand(k, device="cuda").to(dtype) + 0.5
    bn = (torch.rand(1, k, device="cuda") + 0.5).to(dtype)
    sw = torch.full((1,), 40.0, device="cuda")
    out = torch.empty(batch, n, device="cuda", dtype=dtype)
    res = torch.randn(batch, n, device="cuda").to(dtype)
    gemv_path = tv.uses_gemv(batch, k)
    sc = tv.Scratch(1, batch, k, "cuda")
    pro = tv.PRO_NORM if kind in ("norm", "glu") else tv.PRO_PLAIN
    epi = {"glu": tv.EPI_GLU, "res": tv.EPI_RESIDUAL}.get(kind, tv.EPI_STORE)
    if no_prologue:  # quantise once up front; the timed kernels stream weights only
        tv.gemv(x, [ws[0]], sw, bn, out, pro=pro, epi=epi, norm_weight=nw, residual=res, scratch=sc, config=config)
        pro = tv.PRO_NONE

    pool = [[c] for c in ws]  # schedules are tuned over the copies, as the decoder tunes over its layers

    def one(w):
        if gemv_path:
            tv.gemv(x, [w], sw, bn, out, pro=pro, epi=epi, norm_weight=nw, residual=res, scratch=sc, config=config,
                    tune_pool=pool)
        else:
            tg.quantize(x, bn, sc, pro=pro, norm_weight=nw)
            tg.gemm(sc, [w], sw, out, k=k, epi=epi, residual=res if epi == tv.EPI_RESIDUAL else None)

    one(ws[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            one(w)
    ms = cuda_time(graph.replay, iters=10) / copies
    del ws, graph
    torch.cuda.empty_cache()
    gbs = nbytes / (ms * 1e-3)
    return dict(shape=f"{k}->{'2x' if kind == 'glu' else ''}{n}", kind=kind + (" (no prologue)" if no_prologue else ""),
                batch=batch, config=str(tuple(config)) if config else "tuned", path="gemv" if gemv_path else "quantize+gemm", weight_MB=nbytes / 1e6, us=ms * 1e3,
                GB_s=gbs / 1e9, pct_copy_bw=100 * gbs / bw)


# ----------------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------------
def decode_bench(size, dtype, bw, batch=1, steps=100):
    from mmf.decode_graph import GraphDecoder
    from mmf.kernels import ternary_gemv as tv

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free0, total = torch.cuda.mem_get_info()
    cfg = model_preset(size)
    t0 = time.time()
    model = build_mmf_random(cfg, "cuda", dtype)  # random i2 weights built in their final form
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the random build's temporaries are the benchmark's, not the model's
    dec = GraphDecoder(model, batch)
    build_s = time.time() - t0
    ids = torch.randint(3, cfg.vocab_size, (batch, 16), device="cuda")
    logits = dec.prefill(ids)
    nxt = logits.argmax(-1)
    for _ in range(5):
        dec.step(nxt)
    torch.cuda.synchronize()
    ms = tv.event_times(lambda: dec.step(nxt), 1, steps)[0]
    free1, _ = torch.cuda.mem_get_info()
    need = dec.bytes_per_token()
    res = dict(model=size, dtype=str(dtype)[6:], batch=batch, ms_per_token=ms, tokens_per_s=batch * 1e3 / ms,
               floor_ms=need / bw * 1e3, pct_of_floor=100 * (need / bw * 1e3) / ms, bytes_per_token=need,
               packed_weight_bytes=dec.weight_bytes, peak_allocated_GB=torch.cuda.max_memory_allocated() / 1e9,
               reserved_GB=torch.cuda.memory_reserved() / 1e9,
               device_used_GB=(total - free1) / 1e9, device_used_before_GB=(total - free0) / 1e9,
               build_and_capture_s=build_s, kernels_per_token=4 * cfg.num_hidden_layers + 3)
    return res, model, dec


def prefill_bench(model, dec, cfg, dtype, tokens=128):
    ids = torch.randint(3, cfg.vocab_size, (1, tokens), device="cuda")
    dec.prefill(ids)  # tunes the GEMMs (eager)
    ms = cuda_time(lambda: dec.prefill(ids), iters=5, warmup=1)  # warm-up call captures the prefill graph
    return ms


def dense_prefill_ms(size, tokens=128, dtype=torch.bfloat16):
    """bf16 matmuls of a Transformer++ of this size (q, k, v, o, gate, up, down per layer + head)."""
    cfg = model_preset("transformer++-" + size)
    d, m, L, V = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers, cfg.vocab_size
    layers = []
    for _ in range(L):
        layers.append([torch.empty(n, kk, device="cuda", dtype=dtype).normal_(0, 0.02)
                       for n, kk in [(d, d), (d, d), (d, d), (d, d), (m, d), (m, d), (d, m)]])
    head = torch.empty(V, d, device="cuda", dtype=dtype).normal_(0, 0.02)
    x = torch.randn(tokens, d, device="cuda", dtype=dtype)
    u = torch.randn(tokens, m, device="cuda", dtype=dtype)

    def run():
        for ws in layers:
            for w in ws[:6]:
                torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(u, ws[6])
        torch.nn.functional.linear(x[-1:], head)

    ms = cuda_time(run, iters=5, warmup=2)
    nbytes = sum(w.numel() * 2 for ws in layers for w in ws) + head.numel() * 2
    del layers, head
    torch.cuda.empty_cache()
    return ms, nbytes


def table(rows, title):
    try:
        from tabulate import tabulate
        log(f"\n{title}\n" + tabulate(rows, headers="keys", floatfmt=".4g"))
    except ImportError:  # pragma: no cover
        log(title)
        for r in rows:
            log(r)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="compile and check everything on small shapes only")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--sweep", action="store_true", help="also time every GEMV schedule with and without prologue")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mmf.kernels.schedule_cache import disabled

    with disabled():  # every run tunes afresh (its build times and schedules are results)
        return _run(args)


def _run(args) -> int:
    import triton

    dtype = getattr(torch, args.dtype)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), command=" ".join([os.path.basename(sys.executable)] + sys.argv),
               smoke=args.smoke, dtype=args.dtype)
    t0 = time.time()
    bw = copy_bandwidth()
    res["copy_bandwidth_GB_s"] = bw / 1e9
    log(f"{res['device']}  torch {res['torch']}  triton {res['triton']}  copy bandwidth {bw / 1e9:.0f} GB/s")
    from mmf.kernels import ternary_gemv as tv

    tv.TUNE = False  # correctness does not need tuned schedules (each tuning run compiles variants)
    res["correctness"] = check_kernels(args.smoke)
    table(res["correctness"], "correctness: Triton vs torch reference on the GPU")
    res["decoder_correctness"] = check_decoder(args.smoke)
    table(res["decoder_correctness"], "GraphDecoder vs eager model")
    log(f"[{time.time() - t0:.0f}s] correctness done")
    tv.TUNE = True
    tv._TUNED.clear()

    from mmf.kernels import ternary_gemm as tg

    tg._TUNED.clear()

    def dump():
        res["tuned_gemv_configs"] = {str(k): v for k, v in tv._TUNED.items()}
        res["tuned_gemm_configs"] = {str(k): v for k, v in tg._TUNED.items()}
        res["wall_s"] = time.time() - t0
        if args.out:
            write_json(args.out, res, indent=1)

    dump()
    dec_rows = []
    res["decode"] = dec_rows
    sizes = ["370m"] if args.smoke else ["370m", "13b"]
    for size in sizes:
        r, model, dec = decode_bench(size, dtype, bw, steps=20 if args.smoke else 200)
        dec_rows.append(r)
        log(f"[{time.time() - t0:.0f}s] decode {size}: {r['ms_per_token']:.3f} ms/token "
            f"(floor {r['floor_ms']:.3f}), peak {r['peak_allocated_GB']:.2f} GB")
        if size == "13b":
            ms = prefill_bench(model, dec, model.config, dtype)
            res["prefill_13b_128"] = dict(mmf_ms=ms)
            log(f"[{time.time() - t0:.0f}s] prefill 13b 128 tokens: {ms:.2f} ms")
        del model, dec
        torch.cuda.empty_cache()
        dump()

    shapes13 = [(5120, 5120, "norm"), (5120, 5120, "res"), (13824, 5120, "glu"), (5120, 13824, "res"),
                (32000, 5120, "norm")]
    shapes370 = [(1024, 1024, "norm"), (2816, 1024, "glu"), (1024, 2816, "res"), (32000, 1024, "norm")]
    gemv_rows = []
    res["gemv"] = gemv_rows
    if args.smoke:
        gemv_rows.append(time_gemv(5120, 5120, "norm", 1, dtype, bw, copies_bytes=64 << 20))
    else:
        for n, k, kind in shapes13:
            gemv_rows.append(dict(model="13b", **time_gemv(n, k, kind, 1, dtype, bw)))
        for n, k, kind in shapes370:
            gemv_rows.append(dict(model="370m", **time_gemv(n, k, kind, 1, dtype, bw)))
        dump()
        for batch in (2, 4, 16):
            gemv_rows.append(dict(model="13b", **time_gemv(5120, 5120, "norm", batch, dtype, bw)))
            gemv_rows.append(dict(model="13b", **time_gemv(13824, 5120, "glu", batch, dtype, bw)))
    if args.sweep:  # where the time goes: every schedule, with and without the fused prologue
        sweep = []
        for n, k, kind in [(5120, 5120, "norm"), (13824, 5120, "glu")]:
            for cfg in tv._configs(1, tv.words_per_row(k)):
                for nop in (True, False):
                    try:
                        sweep.append(time_gemv(n, k, kind, 1, dtype, bw, copies_bytes=256 << 20, config=cfg,
                                               no_prologue=nop))
                    except Exception as e:  # noqa: BLE001 - a schedule that does not fit is reported
                        sweep.append(dict(shape=f"{k}->{n}", kind=kind, config=str(cfg), error=repr(e)[:80]))
        res["gemv_sweep"] = sweep
        table(sweep, "GEMV schedules (BN, warps, programs per SM), batch 1")
    table(gemv_rows, "ternary projections (decode form: fused prologue/epilogue), back to back, no L2 reuse")
    log(f"[{time.time() - t0:.0f}s] gemv done")
    dump()
    if "prefill_13b_128" in res:
        dense_ms, dense_bytes = dense_prefill_ms("13b")
        res["prefill_13b_128"].update(transformerpp_bf16_matmuls_ms=dense_ms, transformerpp_weight_GB=dense_bytes / 1e9,
                                      speedup=dense_ms / res["prefill_13b_128"]["mmf_ms"])
        dump()
    if not args.smoke:
        for batch in (4, 16):
            r, model, dec = decode_bench("370m", dtype, bw, batch=batch)
            dec_rows.append(r)
            del model, dec
            torch.cuda.empty_cache()
            dump()
    table([{k: v for k, v in r.items() if k not in ("bytes_per_token", "device_used_before_GB")} for r in dec_rows],
          "whole-model decode, CUDA graph (floor = bytes per token / copy bandwidth)")
    if "prefill_13b_128" in res:
        table([res["prefill_13b_128"]], "prefill, 128 tokens, 13b (batch 1)")
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
