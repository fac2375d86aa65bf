"""The decode GEMM that quantises its own input: the GEMV's prologue on the tensor cores (Triton).

For decode batches of 2-16 rows, ``ternary_gemm`` runs each projection as two kernels: the pre-pass
(``quantize``: norms, MLGRU step, BitLinear quantisation into a scratch) and the int8 tensor-core GEMM,
which waits for the whole pre-pass grid before it reads the scratch. At batch 1 the GEMV does both in one
launch: every program runs the prologue over the whole input row itself. ``gemm_pro`` is that design on
the tensor cores, for up to 16 rows:

* each program takes one (BN weight rows x BK bytes) block (``ternary_gemm``'s weights-early schedules:
  K split over every block) and loads its weights before the wait for the kernel before (PDL);
* it then reduces the rows' statistics itself, over the whole input rows in chunks of CH columns held in
  registers (no loop-carried loads: the chunks' loads are all in flight at once): the block norm's sum of
  squares (norm and MLGRU prologues), then sum(v^2) and max|v bw| of the BitLinear input v, giving
  s_x = 127 / max(r2 max|v bw|, 1e-5) as split pre-pass rows take it (``_quant_row``);
* it quantises only its own K slice of the rows, straight into the ``tl.dot`` operand (no scratch, no
  barrier), subtracts that slice's sum(xq) from its int32 sums (codes are w + 1), and runs the GEMM's
  epilogue (``ternary_gemm._finish``: split-K parts met, residual, GLU pair).

Same arithmetic as ``quantize`` + ``gemm`` except the order of the fp32 row sums (so s_x may differ in its
last bits and an int8 value by one, a rounding flip). Every program reads the whole rows (M x K elements,
from L2), so the decoder takes it only where M x K is small (``fits``). The MLGRU prologue's program (0, 0)
writes the next state. The reference is the pre-pass + GEMM pair (``ternary_gemm.quantize``, ``gemm``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import reference
from .ternary_gemm import (_EARLY_WEIGHT_CONFIGS, _TL_DTYPES, _byte_operands, _finish, _grouped_tile, _plane_dot,
                           _tuned, _w_block, split_buffers, split_parts)
from .ternary_gemv import (EPI_GLU, EPI_RESIDUAL, EPI_STORE, INTERPRET, PRO_MLGRU, PRO_NORM, PRO_PLAIN, _mlgru_gates,
                           _residual_tile, _rint, _silu, _to, gdc_launch_dependents, gdc_wait, packed_bytes,
                           segment_weights, use_pdl)

__all__ = ["gemm_pro", "fits", "MAX_ELEMENTS"]

MAX_ELEMENTS = 16384  # rows x K read by every program: above, the pre-pass + GEMM pair
CHUNK_ELEMENTS = 2048  # rows x CH per chunk and array (16 per thread at 4 warps)


def fits(rows: int, k: int) -> bool:
    """Does ``gemm_pro`` take a product of ``rows`` decode rows of width ``k``?"""
    return 2 <= rows <= 16 and rows * k <= MAX_ELEMENTS


@triton.jit
def _pro_v(X, sxm, S_IN, S_OUT, LB, NW, rows, cols, valid, K, r, WRITE_STATE, PRO: tl.constexpr,
           HAS_LB: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """The BitLinear input v at (rows, cols) (broadcast index tensors), given the block norm's inverse RMS r
    (broadcast like rows): ``_quant_row``'s arithmetic, in its order. PRO_MLGRU: X holds [i_pre | f_pre |
    g_pre]; the next state is written where WRITE_STATE."""
    if PRO == 3:
        xrow = X + rows * sxm
        ip = tl.load(xrow + cols, mask=valid, other=0.0).to(tl.float32)
        fp = tl.load(xrow + K + cols, mask=valid, other=0.0).to(tl.float32)
        gp = tl.load(xrow + 2 * K + cols, mask=valid, other=0.0).to(tl.float32)
        s_prev = tl.load(S_IN + rows * K + cols, mask=valid, other=0.0)
        lb = 0.0  # read by _mlgru_gates only with HAS_LB
        if HAS_LB:
            lb = tl.load(LB + cols, mask=valid, other=0.0)
        f, i = _mlgru_gates(ip, fp, lb, HAS_LB)
        s = f * s_prev + i
        if WRITE_STATE:
            tl.store(S_OUT + rows * K + cols, s, mask=valid)
        nw = tl.load(NW + cols, mask=valid, other=0.0).to(tl.float32)
        v = _to(gp * r * nw * _silu(s), DT, USE_ASM).to(tl.float32)
    elif PRO == 1:
        x = tl.load(X + rows * sxm + cols, mask=valid, other=0.0).to(tl.float32)
        nw = tl.load(NW + cols, mask=valid, other=0.0).to(tl.float32)
        v = _to(x * r * nw, DT, USE_ASM).to(tl.float32)
    else:
        v = tl.load(X + rows * sxm + cols, mask=valid, other=0.0).to(tl.float32)
    return v


@triton.jit
def _row_scales(X, sxm, S_IN, S_OUT, LB, NW, BWN, seg, M, K, eps_model, eps_bl, WRITE_STATE, PRO: tl.constexpr,
                HAS_LB: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
                NKC: tl.constexpr):
    """(r, r2, s_x), each (RB,), of rows 0 .. RB - 1 (those below M): the block norm's inverse RMS (1 without
    one), the BitLinear's, and the quantisation scale, from the whole rows in NKC chunks of CH columns."""
    rr = tl.arange(0, RB)[:, None]
    r = tl.zeros((RB,), tl.float32) + 1.0
    if PRO != 0:
        ss = tl.zeros((RB, CH), tl.float32)
        for c in tl.static_range(NKC):
            cols = c * CH + tl.arange(0, CH)[None, :]
            valid = (rr < M) & (cols < K)
            a = tl.load(X + rr * sxm + (2 * K if PRO == 3 else 0) + cols, mask=valid, other=0.0).to(tl.float32)
            ss += a * a
        r = 1.0 / tl.sqrt(tl.sum(ss, 1) / K + eps_model)
    ss2 = tl.zeros((RB, CH), tl.float32)
    mx = tl.zeros((RB, CH), tl.float32)
    for c in tl.static_range(NKC):
        cols = c * CH + tl.arange(0, CH)[None, :]
        valid = (rr < M) & (cols < K)
        v = _pro_v(X, sxm, S_IN, S_OUT, LB, NW, rr, cols, valid, K, r[:, None], WRITE_STATE, PRO, HAS_LB, DT,
                   USE_ASM)
        bw = tl.load(BWN + seg * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        ss2 += v * v
        mx = tl.maximum(mx, tl.abs(v * bw))
    r2 = 1.0 / tl.sqrt(tl.sum(ss2, 1) / K + eps_bl)
    sx = tl.math.div_rn(127.0, tl.maximum(tl.max(mx, 1) * r2, 1e-5))
    return r, r2, sx


@triton.jit
def _to_rows(v, RB: tl.constexpr, BM: tl.constexpr):
    """(RB,) per-row values as (BM,), rows RB .. BM - 1 zero."""
    sel = tl.arange(0, BM)[:, None] == tl.arange(0, RB)[None, :]
    return tl.sum(tl.where(sel, v[None, :], tl.zeros_like(v)[None, :]), 1)  # in v's dtype


@triton.jit
def _widen(q, SWAP: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """The (RB, BK) (SWAP: (BK, RB)) int8 activations of RB rows as the tile's (BM, BK) (SWAP: (BK, BM)), rows
    from RB on zero: quantising the slice on RB rows instead of BM saves BM / RB of its arithmetic."""
    if RB < BM:
        if SWAP:
            w = tl.reshape(tl.broadcast_to(q[:, None, :], (BK, BM // RB, RB)), (BK, BM))
            w = tl.where((tl.arange(0, BM) < RB)[None, :], w, 0)
        else:
            w = tl.reshape(tl.broadcast_to(q[None, :, :], (BM // RB, RB, BK)), (BM, BK))
            w = tl.where((tl.arange(0, BM) < RB)[:, None], w, 0)
    else:
        w = q
    return w


@triton.jit
def _gemm_pro_kernel(X, sxm, S_IN, S_OUT, LB, NW, BWN, eps_model, eps_bl, W0, W1, W2, SW, OUT, RES, so_m, sr_m,
                     M, N, K, P, WS, CTR,
                     PRO: tl.constexpr, HAS_LB: tl.constexpr, EPI: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, USE_ASM: tl.constexpr,
                     SWAP: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr, RB: tl.constexpr,
                     CH: tl.constexpr, NKC: tl.constexpr):
    """Program pid of segment seg: K block pid % SPLIT (BK bytes) of weight tile pid // SPLIT (module doc);
    M <= RB <= BM rows, one row tile."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    DT: tl.constexpr = OUT.dtype.element_ty
    part = pid % SPLIT
    tile = pid // SPLIT
    k_lo = part * BK
    pid_m, pid_n = _grouped_tile(tile, M, N, BM, BN, GROUP)
    stile = seg * (tl.cdiv(M, BM) * tl.cdiv(N, BN)) + tile
    Wp = segment_weights(W0, W1, W2, seg)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    kk = k_lo + tl.arange(0, BK)
    n_rows = 2 * N if EPI == 2 else N
    wb, wb2 = _w_block(Wp, rn, kk, P, n_rows, N, EPI, SWAP)  # no kernel writes the weights: before the wait
    sw = tl.load(SW + seg)
    if PDL:  # the kernel before writes this one's input rows
        gdc_wait()
        gdc_launch_dependents()
    r, r2, sx = _row_scales(X, sxm, S_IN, S_OUT, LB, NW, BWN, seg, M, K, eps_model, eps_bl,
                            (pid == 0) & (seg == 0), PRO, HAS_LB, DT, USE_ASM, RB, CH, NKC)
    rr = tl.arange(0, RB)  # the slice is quantised on RB rows, then widened to the tile's BM (``_widen``)
    if SWAP:  # this block's activations (BK, BM), the weights on the left
        rows = rr[None, :]
        jj = kk[:, None]
        rb, r2b, sxb = r[None, :], r2[None, :], sx[None, :]
        acc = tl.zeros((BN, BM), tl.int32)
    else:
        rows = rr[:, None]
        jj = kk[None, :]
        rb, r2b, sxb = r[:, None], r2[:, None], sx[:, None]
        acc = tl.zeros((BM, BN), tl.int32)
    acc2 = acc
    qsum = tl.zeros((RB,), tl.int32)
    for s in tl.static_range(4):  # digit plane s: columns s * P + j of the block's bytes j
        cols = s * P + jj
        valid = (rows < M) & (jj < P) & (cols < K)
        v = _pro_v(X, sxm, S_IN, S_OUT, LB, NW, rows, cols, valid, K, rb, False, PRO, HAS_LB, DT, USE_ASM)
        bw = tl.load(BWN + seg * K + cols, mask=valid, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(v * r2b * bw * sxb, USE_ASM), -128.0), 127.0).to(tl.int32)
        q = tl.where(valid, q, 0)
        if SWAP:
            qsum += tl.sum(q, 0)
        else:
            qsum += tl.sum(q, 1)
        acc, acc2 = _plane_dot(acc, acc2, wb, wb2, _widen(q.to(tl.int8), SWAP, RB, BM, BK), s, EPI, SWAP, USE_ASM)
    qsum = _to_rows(qsum, RB, BM)
    sx = tl.where(rm < M, _to_rows(sx, RB, BM), 1.0)  # rows past M: 1, never divided by 0
    # codes are w + 1: each K part takes its own slice's sum(xq) off, so the parts add up to sum(w x)
    if SWAP:
        acc -= qsum[None, :]
        acc2 -= qsum[None, :]
    else:
        acc -= qsum[:, None]
        acc2 -= qsum[:, None]
    res = sx
    if EPI == 1 and SPLIT == 1:
        res = _residual_tile(RES, rm, rn, seg, M, N, sr_m)
    _finish(acc, acc2, WS, CTR, stile, part, SW, SW, SW, SW, rm, rn, seg, OUT, RES, M, N, so_m, sr_m, pid_n, SW,
            SW, 0, BN if SWAP else BM, BM if SWAP else BN, SPLIT, EPI, DT, USE_ASM, SWAP, 1, 0, True,
            tl.zeros((BM,), tl.int32), sx, sw, res)


def _configs():
    """(BM, BN, BK, warps, stages, swap, 0, 1): ``ternary_gemm``'s weights-early schedules (one K block per
    program); the first is the interpreter's."""
    if INTERPRET:
        return [(16, 64, 32, 4, 1, 0, 0, 1), (16, 32, 32, 4, 1, 1, 0, 1)]
    return list(_EARLY_WEIGHT_CONFIGS)


def _launch(cfg, a):
    bm, bn, bk, nw = cfg[:4]
    swap = cfg[5]
    split, _ = split_parts(a["p"], bk, 0)
    tiles = triton.cdiv(a["m"], bm) * triton.cdiv(a["n"], bn)
    glu = a["epi"] == EPI_GLU
    if split > 1:
        ws, ctr = split_buffers(a["nseg"] * tiles * split * bm * bn * (2 if glu else 1), a["nseg"] * tiles,
                                a["out"].device)
    else:
        ws, ctr = a["sw"], a["sw"]  # not read
    rb = triton.next_power_of_2(a["m"])
    ch = max(16, min(triton.next_power_of_2(a["k"]), CHUNK_ELEMENTS * nw // 4 // rb))
    _gemm_pro_kernel[(tiles * split, a["nseg"])](
        *a["head"], a["w"][0], a["w"][1], a["w"][2], a["sw"], a["out"], a["res"], a["so_m"], a["sr_m"], a["m"],
        a["n"], a["k"], a["p"], ws, ctr, PRO=a["pro"], HAS_LB=a["has_lb"], EPI=a["epi"], BM=bm, BN=bn, BK=bk,
        GROUP=8, USE_ASM=not INTERPRET, SWAP=swap, PDL=a["pdl"], SPLIT=split, RB=rb, CH=ch,
        NKC=triton.cdiv(a["k"], ch), num_warps=nw, num_stages=1, **({"launch_pdl": True} if a["pdl"] else {}))


def gemm_pro(x, bit_norm, weights, scales, out, *, k, pro=PRO_PLAIN, epi=EPI_STORE, residual=None, n=None,
             norm_weight=None, s_in=None, s_out=None, lower_bound=None, eps_model=1e-6,
             eps_bl=reference.BITLINEAR_NORM_EPS, config=None, tune_pool=None):
    """out (M, NSEG*N) (or (M, N) for EPI_GLU) = the BitLinear of each weight segment on the rows of ``x`` after
    the prologue ``pro`` (``quantize``'s arguments: ``bit_norm`` (NSEG, K) the BitLinear norm weights,
    ``norm_weight`` the block norm's, ``s_in`` / ``s_out`` / ``lower_bound`` the MLGRU's), in one launch
    (module doc). ``tune_pool``: other weight lists of these shapes (every layer's), over which the first call
    times its candidate schedules in a CUDA graph as the decoder runs them. The prologue rounds v to ``out``'s
    dtype (the model's)."""
    m = out.shape[0]
    assert fits(m, k) or INTERPRET, f"gemm_pro takes 2-16 rows with rows x K <= {MAX_ELEMENTS}"
    assert pro in (PRO_PLAIN, PRO_NORM, PRO_MLGRU), "gemm_pro: the plain, norm and MLGRU prologues"
    nseg = len(weights)
    n0 = weights[0].shape[0]
    n = n if n is not None else (n0 // 2 if epi == EPI_GLU else n0)
    head = (x, x.stride(0), s_in if s_in is not None else x, s_out if s_out is not None else x,
            lower_bound if lower_bound is not None else x, norm_weight if norm_weight is not None else bit_norm,
            bit_norm, float(eps_model), float(eps_bl))
    a = dict(head=head, w=_byte_operands(weights), sw=scales, out=out,
             res=residual if residual is not None else out, so_m=out.stride(0),
             sr_m=residual.stride(0) if residual is not None else 0, m=m, n=n, k=k, p=packed_bytes(k), nseg=nseg,
             epi=epi, pro=pro, has_lb=lower_bound is not None, pdl=use_pdl(out.device))
    assert out.dtype in _TL_DTYPES, "gemm_pro: fp16, bf16 or fp32 output (the model's dtype)"
    key = ("pro", m, n, k, nseg, epi, pro, str(out.dtype))
    time_of = None
    if tune_pool is not None and len(tune_pool) >= 2 and config is None:
        from .ternary_gemv import chain_launches, chain_ms

        pool = [_byte_operands(w) for w in tune_pool]
        launches = chain_launches(a["n"] * a["p"] * nseg * (2 if epi == EPI_GLU else 1))

        def time_of(c):
            return chain_ms([lambda w=pool[i % len(pool)]: _launch(c, dict(a, w=w)) for i in range(launches)])
    cfg = config or _tuned("gemm_pro", key, _configs(), lambda c: _launch(c, dict(a, pdl=False)), out, time_of)
    _launch(cfg, a)
    return out


assert EPI_RESIDUAL == 1 and EPI_GLU == 2  # the kernel's EPI values
