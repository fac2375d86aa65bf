"""The decode GEMM that quantises its own input from its producer's row statistics (Triton).

For decode batches of 2-16 rows, ``ternary_gemm`` runs each projection as two kernels: the pre-pass
(``quantize``: block norm, BitLinear norm, int8 quantisation into a scratch) and the int8 tensor-core GEMM,
which waits for the whole pre-pass grid. The pre-pass's row reductions are what keeps it a kernel of its
own: a program of the GEMM cannot quantise its slice of a row before the whole row's statistics are known.
``gemm_pro`` (a9ccf62, ``bench/results/EXPERIMENTS.md``) had every program reduce the whole rows itself and
was slower than the pair. Here the statistics come from the GEMM that wrote the input: its epilogue leaves
per-tile partial sums (``ternary_gemm.RowStats``, ``gemm(stats_out=(stats, bit norms, 0, block norm))``), so
each program of ``gemm_sq``

* loads its (BN weight rows x BK bytes) block and the norm weights of its K slice before the wait for the
  kernel before it (programmatic dependent launch; ``ternary_gemm``'s weights-early schedules: K split over
  every block, the parts met by the tile's last program);
* after the wait adds the NT tile parts of its rows' statistics in a fixed order into the scales. With a
  block norm (``PRO_NORM``): r = 1 / sqrt(sum(x^2) / K + eps_model), r2 = 1 / sqrt(r^2 sum((x nw)^2) / K +
  eps_bl), s_x = 127 / max(r max|x nw bw| r2, 1e-5); plain: r2 = 1 / sqrt(sum(v^2) / K + eps_bl), s_x = 127 /
  max(max|v bw| r2, 1e-5), the split pre-pass's arithmetic (``_quant_row`` with SSM 2);
* quantises only its own K slice, on the batch's rows (v = x r nw rounded to the model's dtype, as the
  pre-pass does), straight into the ``tl.dot`` operand, with no scratch and no barrier, and takes the
  slice's sum(xq) off its int32 sums (codes are w + 1). The tile has the batch's rows (BM = max(4, next power
  of two), ``tl.dot`` pads them to the tensor core's 16) and the norm weights are loaded on the activations'
  tile: the first form (f774af7) widened 4 quantised rows to a 16-row operand and loaded the norm weights on
  (1, BK) tiles, and compiled (sm_90a, Triton 3.6, 1.3b shapes) to 2-3x the plain GEMM's instructions and 5-8x
  its barriers, almost all layout conversions; this one to about half that (``bench/results/EXPERIMENTS.md``);
* runs ``ternary_gemm``'s epilogue (split-K parts met, residual, GLU pair), itself leaving the ``RowStats``
  that the next projection reads (``stats_out``).

Arithmetic: that of ``quantize`` + ``gemm``, except (a) the fp32 row sums add in another order (as the
split pre-pass's do), and (b) behind a block norm in an fp16 / bf16 model, sum(v^2) and max|v bw| are those of
the unrounded v = x r nw (the producer does not know r), where the pre-pass rounds v to the model's dtype
first: s_x may differ by about that rounding (2^-9 relative in bf16) and an int8 value by one, a rounding
flip (docs/reference-semantics.md). In fp32 models only (a). The reference is the pre-pass + GEMM pair.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import reference
from .ternary_gemm import (_EARLY_WEIGHT_CONFIGS, _TL_DTYPES, _byte_operands, _finish, _grouped_tile, _plane_dot,
                           _tuned, _w_block, decode_row_tile, split_parts, tile_buffers)
from .ternary_gemv import (EPI_GLU, EPI_RESIDUAL, EPI_STORE, INTERPRET, PRO_NORM, PRO_PLAIN, _combine, _rint,
                           _to, gdc_launch_dependents, gdc_wait, packed_bytes, segment_weights, use_pdl)

__all__ = ["gemm_sq", "MAX_ROWS"]

MAX_ROWS = 16  # the weights-early schedules' row tile


@triton.jit
def _parts(SS, r: tl.constexpr, NT, M, rr, NTB: tl.constexpr, IS_MAX: tl.constexpr):
    """Region r of the ``RowStats`` at SS (laid out (region, tile, row)) over its NT tiles, for rows rr."""
    t = tl.arange(0, NTB)[:, None]
    return _combine(tl.load(SS + (r * NT + t) * M + rr[None, :], mask=(t < NT) & (rr < M)[None, :], other=0.0), IS_MAX)


@triton.jit
def _scales(SS, NT, M, K, seg, eps_model, eps_bl, PRO: tl.constexpr, RB: tl.constexpr, NTB: tl.constexpr):
    """(r, r2, s_x), each (RB,), of rows 0 .. RB - 1 from the producer's statistics (module doc)."""
    rr = tl.arange(0, RB)
    if PRO == 1:
        r = 1.0 / tl.sqrt(_parts(SS, 0, NT, M, rr, NTB, False) / K + eps_model)
        r2 = 1.0 / tl.sqrt(r * r * _parts(SS, 1, NT, M, rr, NTB, False) / K + eps_bl)
        mvb = r * _parts(SS, 2 + seg, NT, M, rr, NTB, True)
    else:
        r = tl.zeros((RB,), tl.float32) + 1.0
        r2 = 1.0 / tl.sqrt(_parts(SS, 0, NT, M, rr, NTB, False) / K + eps_bl)
        mvb = _parts(SS, 1, NT, M, rr, NTB, True)
    return r, r2, tl.math.div_rn(127.0, tl.maximum(mvb * r2, 1e-5))


@triton.jit
def _operand(q, SWAP: tl.constexpr):
    """The int8 activations of a (BM, BK) plane as the product's operand: transposed (BK, BM) with SWAP (the
    weights on the left). The slice is loaded and quantised in the rows' orientation either way: loaded as
    (BK, BM), the rows' contiguous bytes run down the tile's columns."""
    q = q.to(tl.int8)
    if SWAP:
        q = tl.trans(q)
    return q


@triton.jit
def _plane(NW, BWN, seg, rows, jj, s: tl.constexpr, M, P, K, PRO: tl.constexpr):
    """Digit plane s of the slice (columns s * P + jj): the columns, the mask, and the block norm's and the
    BitLinear norm's weights there (constants: the caller loads them before the wait)."""
    cols = s * P + jj
    cmask = (jj < P) & (cols < K)
    valid = (rows < M) & cmask
    cfull = cols + rows * 0  # on the activations' tile: the same layout, no conversion
    mfull = cmask & (rows >= 0)
    bw = tl.load(BWN + seg * K + cfull, mask=mfull, other=0.0).to(tl.float32)
    nw = bw
    if PRO == 1:
        nw = tl.load(NW + cfull, mask=mfull, other=0.0).to(tl.float32)
    return cols, valid, nw, bw


@triton.jit
def _quant_plane(v, valid, nw, bw, rb, r2b, sxb, PRO: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 xq of one plane of the slice (raw inputs v, fp32): ``_quant_row``'s arithmetic in its order."""
    if PRO == 1:
        v = _to(v * rb * nw, DT, USE_ASM).to(tl.float32)
    q = tl.minimum(tl.maximum(_rint(v * r2b * bw * sxb, USE_ASM), -128.0), 127.0).to(tl.int32)
    return tl.where(valid, q, 0)


@triton.jit
def _gemm_sq_kernel(X, sxm, NW, BWN, eps_model, eps_bl, SS, NT, W0, W1, W2, SW, OUT, RES, so_m, sr_m, M, N, K, P,
                    WS, CTR, SSO, SSWO, SNWO, PRO: tl.constexpr, EPI: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, USE_ASM: tl.constexpr,
                    SWAP: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr,
                    NTB: tl.constexpr, STATS: tl.constexpr, SNB: tl.constexpr):
    """Program pid of segment seg: K block pid % SPLIT (BK bytes) of weight tile pid // SPLIT (module doc);
    M <= BM rows, one row tile. STATS > 0: the epilogue of segment 0 leaves its output's ``RowStats`` at
    SSO (``ternary_gemm._row_stats``)."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    DT: tl.constexpr = OUT.dtype.element_ty
    part = pid % SPLIT
    tile = pid // SPLIT
    pid_m, pid_n = _grouped_tile(tile, M, N, BM, BN, GROUP)
    stile = seg * (tl.cdiv(M, BM) * tl.cdiv(N, BN)) + tile
    Wp = segment_weights(W0, W1, W2, seg)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    kk = part * BK + tl.arange(0, BK)
    n_rows = 2 * N if EPI == 2 else N
    rows = tl.arange(0, BM)[:, None]  # this block's activations (BM, BK); with SWAP transposed for the product
    jj = kk[None, :]
    # no kernel writes the weights or the norm weights: loaded before the wait
    wb, wb2 = _w_block(Wp, rn, kk, P, n_rows, N, EPI, SWAP)
    c0, m0, nw0, bw0 = _plane(NW, BWN, seg, rows, jj, 0, M, P, K, PRO)
    c1, m1, nw1, bw1 = _plane(NW, BWN, seg, rows, jj, 1, M, P, K, PRO)
    c2, m2, nw2, bw2 = _plane(NW, BWN, seg, rows, jj, 2, M, P, K, PRO)
    c3, m3, nw3, bw3 = _plane(NW, BWN, seg, rows, jj, 3, M, P, K, PRO)
    sw = tl.load(SW + seg)
    if PDL:  # the kernel before writes this one's input rows and their statistics
        gdc_wait()
        gdc_launch_dependents()
    x0 = tl.load(X + rows * sxm + c0, mask=m0, other=0.0).to(tl.float32)  # issued beside the statistics' loads
    x1 = tl.load(X + rows * sxm + c1, mask=m1, other=0.0).to(tl.float32)
    x2 = tl.load(X + rows * sxm + c2, mask=m2, other=0.0).to(tl.float32)
    x3 = tl.load(X + rows * sxm + c3, mask=m3, other=0.0).to(tl.float32)
    r, r2, sx = _scales(SS, NT, M, K, seg, eps_model, eps_bl, PRO, BM, NTB)
    rb, r2b, sxb = r[:, None], r2[:, None], sx[:, None]
    if SWAP:
        acc = tl.zeros((BN, BM), tl.int32)
    else:
        acc = tl.zeros((BM, BN), tl.int32)
    acc2 = acc
    q0 = _quant_plane(x0, m0, nw0, bw0, rb, r2b, sxb, PRO, DT, USE_ASM)
    q1 = _quant_plane(x1, m1, nw1, bw1, rb, r2b, sxb, PRO, DT, USE_ASM)
    q2 = _quant_plane(x2, m2, nw2, bw2, rb, r2b, sxb, PRO, DT, USE_ASM)
    q3 = _quant_plane(x3, m3, nw3, bw3, rb, r2b, sxb, PRO, DT, USE_ASM)
    acc, acc2 = _plane_dot(acc, acc2, wb, wb2, _operand(q0, SWAP), 0, EPI, SWAP, USE_ASM)
    acc, acc2 = _plane_dot(acc, acc2, wb, wb2, _operand(q1, SWAP), 1, EPI, SWAP, USE_ASM)
    acc, acc2 = _plane_dot(acc, acc2, wb, wb2, _operand(q2, SWAP), 2, EPI, SWAP, USE_ASM)
    acc, acc2 = _plane_dot(acc, acc2, wb, wb2, _operand(q3, SWAP), 3, EPI, SWAP, USE_ASM)
    qsum = tl.sum(q0 + q1 + q2 + q3, 1)
    sx = tl.where(rm < M, sx, 1.0)  # rows past M: 1, never divided by 0
    # codes are w + 1: each K part takes its own slice's sum(xq) off, so the parts add up to sum(w x)
    if SWAP:
        acc -= qsum[None, :]
        acc2 -= qsum[None, :]
    else:
        acc -= qsum[:, None]
        acc2 -= qsum[:, None]
    _finish(acc, acc2, WS, CTR, stile, part, SW, SW, SW, SW, rm, rn, seg, OUT, RES, M, N, so_m, sr_m, pid_n, SSO,
            SSWO, 0, BN if SWAP else BM, BM if SWAP else BN, SPLIT, EPI, DT, USE_ASM, SWAP, 1, STATS, SNWO, SNB, True,
            tl.zeros((BM,), tl.int32), sx, sw)


def _configs():
    """(BM, BN, BK, warps, stages, swap, 0, 1): ``ternary_gemm``'s weights-early schedules (one K block per
    program); the first is the interpreter's."""
    if INTERPRET:
        return [(16, 64, 32, 4, 1, 0, 0, 1), (16, 32, 32, 4, 1, 1, 0, 1)]
    return list(_EARLY_WEIGHT_CONFIGS)


def _launch(cfg, a):
    bn, bk, nw = cfg[1:4]
    bm = decode_row_tile(a["m"], 4)  # the batch's rows: no widening to 16, no 16-row epilogue
    swap = cfg[5]
    split, _ = split_parts(a["p"], bk, 0)
    tiles, ws, ctr = tile_buffers(a, bm, bn, split, a["sw"])
    so, stats = a["stats_out"], 0
    if so is not None:
        stats = 3 if so[3] is not None else 2
        so[0].nt = triton.cdiv(a["n"], bn)  # what the consumer after this launch reads
    st = a["stats"]
    _gemm_sq_kernel[(tiles * split, a["nseg"])](
        *a["head"], st.buf, st.nt, a["w"][0], a["w"][1], a["w"][2], a["sw"], a["out"], a["res"], a["so_m"],
        a["sr_m"], a["m"], a["n"], a["k"], a["p"], ws, ctr, so[0].buf if stats else ws, so[1] if stats else ws,
        so[3] if stats == 3 else ws, PRO=a["pro"], EPI=a["epi"], BM=bm, BN=bn, BK=bk, GROUP=8,
        USE_ASM=not INTERPRET, SWAP=swap, PDL=a["pdl"], SPLIT=split,
        NTB=triton.next_power_of_2(st.nt), STATS=stats, SNB=so[1].shape[0] if stats == 3 else 1, num_warps=nw,
        num_stages=1, **({"launch_pdl": True} if a["pdl"] else {}))


def gemm_sq(x, bit_norm, weights, scales, out, *, k, stats, pro=PRO_PLAIN, epi=EPI_STORE, residual=None, n=None,
            norm_weight=None, eps_model=1e-6, eps_bl=reference.BITLINEAR_NORM_EPS, stats_out=None, config=None,
            tune_pool=None):
    """out (M, NSEG*N) (or (M, N) for EPI_GLU) = the BitLinear of each weight segment on the rows of ``x`` after
    the prologue ``pro`` (``PRO_NORM``: block norm of weight ``norm_weight``, or ``PRO_PLAIN``), ``bit_norm``
    (NSEG, K) the BitLinear norm weights, in one launch and for 2-16 rows (module doc).

    ``stats``: the ``RowStats`` that the GEMM which wrote ``x`` left, launched already: ``gemm(stats_out=(stats,
    bit_norm, 0, norm_weight))`` before a block norm, ``(stats, bit_norm[0], 0)`` before a plain one.
    ``stats_out`` = (``RowStats``, w, 0[, nw]): this launch's output statistics for the projection after it,
    as ``gemm``'s (segment 0 only). ``tune_pool``: other weight lists of these shapes (every layer's), over which
    the first call times its candidate schedules in a CUDA graph as the decoder runs them."""
    m = out.shape[0]
    assert 1 <= m <= MAX_ROWS, f"gemm_sq takes 1-{MAX_ROWS} rows"
    assert pro in (PRO_PLAIN, PRO_NORM), "gemm_sq: the plain and the norm prologue"
    assert stats.nt > 0 and stats.m == m, "stats: the RowStats of the GEMM that wrote x, launched already"
    assert stats_out is None or stats_out[2] == 0, "stats_out: segment 0"
    assert out.dtype in _TL_DTYPES, "gemm_sq: fp16, bf16 or fp32 output (the model's dtype)"
    nseg = len(weights)
    n0 = weights[0].shape[0]
    n = n if n is not None else (n0 // 2 if epi == EPI_GLU else n0)
    head = (x, x.stride(0), norm_weight if norm_weight is not None else bit_norm, bit_norm, float(eps_model),
            float(eps_bl))
    so = None if stats_out is None else (tuple(stats_out) + (None,))[:4]
    a = dict(head=head, w=_byte_operands(weights), sw=scales, out=out, stats=stats, stats_out=so,
             res=residual if residual is not None else out, so_m=out.stride(0),
             sr_m=residual.stride(0) if residual is not None else 0, m=m, n=n, k=k, p=packed_bytes(k), nseg=nseg,
             epi=epi, pro=pro, pdl=use_pdl(out.device))
    key = ("sq", triton.next_power_of_2(m), n, k, nseg, epi, pro, str(out.dtype),
           None if so is None else (so[3] is not None))
    time_of = None
    if tune_pool is not None and len(tune_pool) >= 2 and config is None:
        from .ternary_gemv import chain_launches, chain_ms

        pool = [_byte_operands(w) for w in tune_pool]
        launches = chain_launches(a["n"] * a["p"] * nseg * (2 if epi == EPI_GLU else 1))

        def time_of(c):
            return chain_ms([lambda w=pool[i % len(pool)]: _launch(c, dict(a, w=w)) for i in range(launches)])
    cfg = config or _tuned("gemm_sq", key, _configs(), lambda c: _launch(c, dict(a, pdl=False)), out, time_of)
    _launch(cfg, a)
    return out


assert EPI_RESIDUAL == 1 and EPI_GLU == 2  # the kernel's EPI values
