"""Ternary GEMM for decode batches of 3-64 rows (Triton, int8 tensor cores, split-K).

Same arithmetic as ``ternary_gemm.py`` (read ``ternary_gemv.py`` first): the activations are quantised by
the same pre-pass (``ternary_gemm.quantize``), the i2 planar weights are unpacked in registers into their
4 digit planes and meet the planar int8 activations in ``tl.dot(int8, int8) -> int32``, weights as the
left operand (``SWAP`` of ``ternary_gemm``: the (BN, BK) code tile stays in registers, the (BK, BM)
activation slice comes from L2/L1, where all BM rows of a decode batch sit).

Why a second kernel. At decode the row count is small (3-64), so ``ternary_gemm`` launches one program
per BN output rows with the whole K loop each: a 5120-wide projection is 80-160 programs on 132 SMs,
too few bytes in flight to stream the weights at DRAM speed (13b at batch 16 ran at 14 % of its
floor, issue 19). Here the K range is also split into ``SPLIT`` chunks (a runtime argument, chosen by
the tuner with the tile) so that every SM holds several programs. Each program adds its int32 partial
sums into a workspace with atomic adds (integer addition: exact and order-independent), then bumps
the tile's arrival counter; the program that arrives last takes the sums back with ``atomic_xchg``
(reading them and zeroing the workspace for the next launch in one step, so a replayed CUDA graph
finds it clean), resets the counter and runs the usual fused epilogue (store, residual, GLU pair).
``SPLIT = 1`` skips the workspace. The result equals ``ternary_gemm.gemm``'s bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import os

from . import reference
from .ternary_gemv import (EPI_GLU, EPI_STORE, INTERPRET, PRO_PLAIN, _epilogue, _quant_row, gdc_launch_dependents,
                           gdc_wait, packed_bytes, segment_weights, use_pdl)

# programmatic dependent launch for the decode pre-pass and GEMM (Hopper+): each kernel's constant
# operands (norm weights, its first weight block) load while the previous kernel finishes;
# MMF_DECODE_PDL=0 switches it off here (MMF_PDL=0 everywhere)
PDL = os.environ.get("MMF_DECODE_PDL", "1") != "0"

MAX_ROWS = 64  # GraphDecoder's largest batch


@triton.jit(do_not_specialize=["M", "SPLIT", "CHUNK"])  # one binary for every batch size and split
def _gemm_splitk_kernel(XQ, SX, SUMX, W0, W1, W2, SW, OUT, RES, WS, CNT, so_m, sr_m, M, N, P, PB, SPLIT,
                        CHUNK, EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """Program (tile * SPLIT + part, seg): BN weight rows x all M (<= BM) activation rows over the
    packed bytes [part * CHUNK, (part + 1) * CHUNK). WS: (NSEG, tiles, 2, BN, BM) int32 zeros,
    CNT: (NSEG, tiles) int32 zeros; both are left zero."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    DT: tl.constexpr = OUT.dtype.element_ty
    tile = pid // SPLIT
    part = pid % SPLIT
    Wp = segment_weights(W0, W1, W2, seg)
    rm = tl.arange(0, BM)
    rn = tile * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_rows = 2 * N if EPI == 2 else N
    accT = tl.zeros((BN, BM), tl.int32)
    acc2T = tl.zeros((BN, BM), tl.int32)
    xcol = XQ + (seg * M + rm[None, :]) * 4 * PB
    k_lo = part * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, P)
    # the first weight block is in flight before the wait for the previous kernel (PDL): weights
    # are no kernel's output; each next block is loaded while the current one is multiplied
    kk = k_lo + rk
    wmask = (rn < n_rows)[:, None] & (kk < k_hi)[None, :]
    wb = tl.load(Wp + rn[:, None] * P + kk[None, :], mask=wmask, other=0, eviction_policy="evict_first")
    wb2 = wb
    if EPI == 2:
        wb2 = tl.load(Wp + (rn + N)[:, None] * P + kk[None, :], mask=wmask, other=0, eviction_policy="evict_first")
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        nk = kk + BK
        nmask = (rn < n_rows)[:, None] & (nk < k_hi)[None, :]
        nb = tl.load(Wp + rn[:, None] * P + nk[None, :], mask=nmask, other=0, eviction_policy="evict_first")
        nb2 = nb
        if EPI == 2:
            nb2 = tl.load(Wp + (rn + N)[:, None] * P + nk[None, :], mask=nmask, other=0,
                          eviction_policy="evict_first")
        xmask = (kk < k_hi)[:, None] & (rm < M)[None, :]
        for s in tl.static_range(4):
            xs = tl.load(xcol + s * PB + kk[:, None], mask=xmask, other=0)  # (BK, BM) int8
            accT = tl.dot(((wb >> (2 * s)) & 3).to(tl.int8), xs, accT, out_dtype=tl.int32)
            if EPI == 2:
                acc2T = tl.dot(((wb2 >> (2 * s)) & 3).to(tl.int8), xs, acc2T, out_dtype=tl.int32)
        wb = nb
        wb2 = nb2
    if SPLIT > 1:
        ntiles = tl.num_programs(0) // SPLIT
        ws = WS + ((seg * ntiles + tile) * 2 * BN + tl.arange(0, BN)[:, None]) * BM + rm[None, :]
        tl.atomic_add(ws, accT, sem="relaxed")
        if EPI == 2:
            tl.atomic_add(ws + BN * BM, acc2T, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the tile's counter moves
        arrived = tl.atomic_add(CNT + seg * ntiles + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last part of this tile: sums complete
            accT = tl.atomic_xchg(ws, tl.zeros((BN, BM), tl.int32), sem="acq_rel")
            if EPI == 2:
                acc2T = tl.atomic_xchg(ws + BN * BM, tl.zeros((BN, BM), tl.int32), sem="acq_rel")
            tl.atomic_xchg(CNT + seg * ntiles + tile, 0)
            _finish(accT, acc2T, SX, SUMX, SW, OUT, RES, so_m, sr_m, M, N, seg, rm, rn, EPI, DT, USE_ASM)
    else:
        _finish(accT, acc2T, SX, SUMX, SW, OUT, RES, so_m, sr_m, M, N, seg, rm, rn, EPI, DT, USE_ASM)


@triton.jit
def _finish(accT, acc2T, SX, SUMX, SW, OUT, RES, so_m, sr_m, M, N, seg, rm, rn, EPI: tl.constexpr,
            DT: tl.constexpr, USE_ASM: tl.constexpr):
    sumx = tl.load(SUMX + seg * M + rm, mask=rm < M, other=0)
    sx = tl.load(SX + seg * M + rm, mask=rm < M, other=1.0)
    _epilogue(tl.trans(accT), tl.trans(acc2T), sumx, sx, tl.load(SW + seg), rm, rn, seg, OUT, RES, M, N, so_m,
              sr_m, EPI, DT, USE_ASM)


@triton.jit
def _quant_kernel(X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, eps_model, eps_bl, XQ, SX, SUMX, K, P, PW, M,
                  PRO: tl.constexpr, HAS_LB: tl.constexpr, DT: tl.constexpr, BLOCK_W: tl.constexpr,
                  USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """``ternary_gemm``'s pre-pass, with the prologue's constants loaded before the PDL wait."""
    m = tl.program_id(0)
    seg = tl.program_id(1)
    _quant_row(m, seg, X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, XQ, SX, SUMX, K, P, PW, M,
               eps_model, eps_bl, seg == 0, PRO, HAS_LB, DT, BLOCK_W, USE_ASM, True, PDL)


def quantize(x, bit_norm, scratch, *, nseg=1, pro=PRO_PLAIN, k=None, dtype=None, norm_weight=None, g=None,
             s_in=None, s_out=None, lower_bound=None, eps_model=1e-6, eps_bl=reference.BITLINEAR_NORM_EPS):
    """``ternary_gemm.quantize`` (same arguments and result), launched with PDL where available."""
    from .ternary_gemm import _TL_DTYPES

    m = scratch.sx.shape[1]
    k = k if k is not None else bit_norm.shape[-1]
    dtype = dtype or x.dtype
    nw = 16 if scratch.pw >= 2048 else (8 if scratch.pw >= 512 else 4)
    pdl = PDL and use_pdl(x.device)
    _quant_kernel[(m, nseg)](
        x, x.stride(0), g if g is not None else x, g.stride(0) if g is not None else 0,
        s_in if s_in is not None else x, s_out if s_out is not None else x,
        lower_bound if lower_bound is not None else x, norm_weight if norm_weight is not None else bit_norm,
        bit_norm, float(eps_model), float(eps_bl), scratch.xq, scratch.sx, scratch.sumx, k, packed_bytes(k),
        scratch.pw, m, PRO=pro, HAS_LB=lower_bound is not None, DT=_TL_DTYPES[dtype],
        BLOCK_W=triton.next_power_of_2(scratch.pw), USE_ASM=not INTERPRET, PDL=pdl, num_warps=nw,
        **({"launch_pdl": True} if pdl else {}))
    return scratch


def _bm(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


# (BN, BK, warps, stages, programs per SM the split aims at); the first is the interpreter's
_CONFIGS = [(16, 256, 4, 3, 4), (16, 128, 4, 4, 4), (32, 128, 4, 4, 2), (32, 256, 4, 3, 4), (16, 512, 4, 2, 4),
            (16, 256, 4, 3, 8)]


def _split(cfg, n: int, p: int, nseg: int, num_sm: int) -> tuple:
    """(SPLIT, CHUNK bytes): parts per tile so that tiles * SPLIT * NSEG ~ programs per SM * SMs,
    each part a whole number of BK blocks."""
    bn, bk, per_sm = cfg[0], cfg[1], cfg[4]
    tiles = triton.cdiv(n, bn) * nseg
    kblocks = triton.cdiv(p, bk)
    split = max(1, min(kblocks, triton.cdiv(per_sm * num_sm, tiles)))
    chunk = triton.cdiv(kblocks, split) * bk
    return triton.cdiv(p, chunk), chunk


_WORKSPACE: dict = {}


def _workspace(device, nseg: int, tiles: int, bn: int, bm: int):
    """Zeroed (sums, counters) shared by every launch of this size on ``device`` (each launch leaves
    them zero; launches on one stream run one after another)."""
    key = (str(device), nseg, tiles, bn, bm)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (torch.zeros(nseg * tiles * 2 * bn * bm, dtype=torch.int32, device=device),
                           torch.zeros(nseg * tiles, dtype=torch.int32, device=device))
    return _WORKSPACE[key]


def _launch(cfg, a, split=None):
    from .ternary_gemv import _num_sm

    bn, bk, nw, ns = cfg[:4]
    bm = _bm(a["m"])
    sp, chunk = split or _split(cfg, a["n"], a["p"], a["nseg"], _num_sm(a["out"].device))
    tiles = triton.cdiv(a["n"], bn)
    ws, cnt = _workspace(a["out"].device, a["nseg"], tiles, bn, bm)
    pdl = PDL and use_pdl(a["out"].device)
    _gemm_splitk_kernel[(tiles * sp, a["nseg"])](
        a["xq8"], a["sx"], a["sumx"], a["w"][0], a["w"][1], a["w"][2], a["sw"], a["out"], a["res"], ws, cnt,
        a["so_m"], a["sr_m"], a["m"], a["n"], a["p"], a["pb"], sp, chunk, EPI=a["epi"], BM=bm, BN=bn, BK=bk,
        USE_ASM=not INTERPRET, PDL=pdl, num_warps=nw, num_stages=ns, **({"launch_pdl": True} if pdl else {}))


_TUNED: dict = {}


def gemm(scratch, weights, scales, out, *, k, epi=EPI_STORE, residual=None, n=None, config=None, split=None):
    """``ternary_gemm.gemm`` for 1-64 rows with split-K (same arguments; ``config`` one of ``_CONFIGS``,
    ``split`` an explicit (SPLIT, CHUNK) for tests)."""
    m = out.shape[0]
    assert m <= MAX_ROWS, f"ternary_gemm_decode handles at most {MAX_ROWS} rows"
    nseg = len(weights)
    n0 = weights[0].shape[0]
    n = n if n is not None else (n0 // 2 if epi == EPI_GLU else n0)
    ws = [w if w.dtype == torch.uint8 else w.view(torch.uint8) for w in weights]
    ws = ws + [ws[0]] * (3 - nseg)
    a = dict(xq8=scratch.xq.view(torch.int8), sx=scratch.sx, sumx=scratch.sumx, w=ws, sw=scales, out=out,
             res=residual if residual is not None else out, so_m=out.stride(0),
             sr_m=residual.stride(0) if residual is not None else 0, m=m, n=n, p=packed_bytes(k),
             pb=4 * scratch.pw, nseg=nseg, epi=epi)
    key = (_bm(m), n, k, nseg, epi, str(out.dtype))
    cfg = config or _TUNED.get(key)
    if cfg is None:
        cfg = _CONFIGS[0]
        from . import schedule_cache, ternary_gemv

        if (not INTERPRET and ternary_gemv.TUNE and out.is_cuda
                and not torch.cuda.is_current_stream_capturing()):
            def time_of(c):
                return triton.testing.do_bench(lambda: _launch(c, a), warmup=5, rep=20, return_mode="median")

            cfg, _ = schedule_cache.pick("gemm_decode", key, out.device, __file__, _CONFIGS, time_of)
        _TUNED[key] = cfg
    _launch(cfg, a, split)
    return out
