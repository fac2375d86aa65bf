"""Ternary GEMM for prefill and larger decode batches (Triton, int8 tensor cores).

Same arithmetic as ``ternary_gemv.py`` (read that docstring first): i2 planar packed weights read
directly, int8 activations, int32 accumulation, ``y = (acc - sum xq) / (s_x s_w)`` once at the
end. Here the activations are quantised by a small pre-pass (the same prologue code as the GEMV; one
program per row and segment, or, for wide rows at decode batches, each row split over several programs
that meet at barriers: ``quantize``, ``decode_quant_chunks``), and the product runs on the tensor cores:
each (BK bytes x BN rows) weight tile is unpacked in registers into its 4 digit planes of codes (0, 1,
2; four codes per 32-bit register, ``_codes``), and each plane meets the matching (BM x BK) slice of
the planar int8 activations in ``tl.dot(int8, int8) -> int32`` (ternary x int8 is exact). The
epilogues (residual, GLU pair) are the GEMV's. Both kernels launch with programmatic dependent launch
where the GPU has it (``ternary_gemv.use_pdl``).

Two operand orders, chosen per shape by the tuner: activations on the left (``x W^T``), or weights
on the left (``(W x^T)^T``, ``SWAP``): then the unpacked codes stay in registers as the left operand
and the activations reach the tensor cores through the pipelined shared-memory path. At 128 rows
the second is the faster (13b prefill 8.9 vs 12.1 ms on an H100, ``bench/results/EXPERIMENTS.md``).

Many rows (``INT_MM_MIN_ROWS`` and more, a long prompt or a large batch of prompts): the product is
compute-bound, and unpacking codes in registers costs tensor-core time. The other path unpacks each
projection's i2 bytes once per call into a reused int8 scratch (``unpack_codes``: codes 0-2 in the
activations' planar order, one byte per weight, memory-bound), and a Triton int8 GEMM with the same
epilogue fused (``_gemm_i8_kernel``; ``MMF_INT8_GEMM=int_mm``: ``torch._int_mm`` then one epilogue
pass, ``_epi_kernel``) forms the same int32 sums. Each shape takes the path the tuner times faster
(``many_rows_path``). Both are exact, so the output is the same bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference
from .ternary_gemv import (EPI_GLU, EPI_STORE, INTERPRET, PRO_PLAIN, QUANT_MAX_CHUNKS, QUANT_PROGRAMS,
                           Scratch, _epilogue, _num_sm, _quant_row, gdc_launch_dependents, gdc_wait, packed_bytes,
                           segment_weights, use_pdl)


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: neighbouring programs share weight tiles in L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    gsize = tl.minimum(num_m - first_m, GROUP)
    return first_m + (pid % per_group) % gsize, (pid % per_group) // gsize


@triton.jit
def _quant_kernel(X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, eps_model, eps_bl, XQ, SX, SUMX, RED, CTR, K, P, PW, M,
                  SSP, NT, PRO: tl.constexpr, HAS_LB: tl.constexpr, DT: tl.constexpr, BLOCK_W: tl.constexpr,
                  USE_ASM: tl.constexpr, PDL: tl.constexpr, NCH: tl.constexpr, SPIN: tl.constexpr,
                  SSM: tl.constexpr = 0, NTB: tl.constexpr = 1):
    m = tl.program_id(0)
    seg = tl.program_id(1)
    ch = tl.program_id(2)
    _quant_row(m, seg, X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, XQ, SX, SUMX, K, P, PW, M,
               eps_model, eps_bl, seg == 0, PRO, HAS_LB, DT, BLOCK_W, USE_ASM, True, PDL, ch, RED, CTR, NCH, SPIN,
               SSP, NT, SSM, NTB)


class RowStats:
    """Per-row partial statistics that a GEMM's epilogue leaves for the pre-pass after it (``gemm(stats_out=)``,
    ``quantize(stats=)``): for each of the output's column tiles, sum(out^2) and, when asked, max|out * w|
    (fp32, ``buf`` laid out (2, tiles, M)), and how many tiles the last launch wrote (``nt``, set on the host
    when it launched: the schedule decides the tile width). The pre-pass adds the tiles' parts in a fixed
    order instead of meeting its other programs at a barrier."""

    def __init__(self, m: int, n: int, device):
        self.m = m
        self.buf = torch.zeros(2 * triton.cdiv(n, 16) * m, dtype=torch.float32, device=device)  # BN >= 16
        self.nt = 0


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def quant_chunks(rows: int, pw: int, programs: int = QUANT_PROGRAMS) -> int:
    """Programs per row of the pre-pass (a power of two): one row in one program leaves most of the GPU
    idle at decode batches (4 rows: 4-12 programs) and is bound by its instruction issue; split, each
    program holds at least 64 words, and the grid has at most ``programs`` programs (the caller passes
    at most one per SM, so that all are resident at once and none waits at a barrier for one that is not)."""
    n = 1
    while 2 * n <= min(QUANT_MAX_CHUNKS, programs // max(rows, 1)) and pw >= 2 * n * 64:
        n *= 2
    return n


# The decoder splits its pre-pass rows (``decode_quant_chunks``) from this model width and up to this batch.
# Measured in whole 13b / 1.3b decode steps on an H200 (bench/results/EXPERIMENTS.md): split, 13b batch 4 /
# 16 3.50 -> 3.22 / 3.44 -> 3.30 ms, but 13b batch 64 5.31 -> 5.77 and 1.3b batch 4 / 16 / 64 0.88 / 0.84 /
# 1.18 -> 1.11 / 1.19 / 1.39: a split paid for its three barriers (two since b1c72c5) only on wide rows at
# small batches.
QUANT_SPLIT_MIN_K = 4096
QUANT_SPLIT_MAX_ROWS = 16


def decode_quant_chunks(batch: int, d: int):
    """``quantize``'s ``chunks`` for a decode step of ``batch`` rows of a model of width ``d``: None
    (``quant_chunks`` decides) for wide models at small batches, else 1 (whole rows)."""
    return None if d >= QUANT_SPLIT_MIN_K and batch <= QUANT_SPLIT_MAX_ROWS else 1


def prepass_args(x, bit_norm, scratch, *, nseg=1, pro=PRO_PLAIN, k=None, dtype=None, norm_weight=None, g=None,
                 s_in=None, s_out=None, lower_bound=None, eps_model=1e-6, eps_bl=reference.BITLINEAR_NORM_EPS,
                 chunks=1) -> dict:
    """The pre-pass's operands as its kernel takes them (``quantize``): ``head``, the leading arguments
    X .. eps_bl of ``_quant_row``; ``consts``, its PRO / HAS_LB / DT / BLOCK_W; ``warps``; ``nseg``, ``m``,
    ``k``."""
    k = k if k is not None else bit_norm.shape[-1]
    dtype = dtype or x.dtype
    bw = triton.next_power_of_2(triton.cdiv(scratch.pw, chunks))
    head = (x, x.stride(0), g if g is not None else x, g.stride(0) if g is not None else 0,
            s_in if s_in is not None else x, s_out if s_out is not None else x,
            lower_bound if lower_bound is not None else x, norm_weight if norm_weight is not None else bit_norm,
            bit_norm, float(eps_model), float(eps_bl))
    return dict(head=head, consts=dict(PRO=pro, HAS_LB=lower_bound is not None, DT=_TL_DTYPES[dtype], BLOCK_W=bw),
                warps=16 if bw >= 2048 else (8 if bw >= 512 else 4), nseg=nseg, m=scratch.sx.shape[1], k=k)


def quantize(x, bit_norm, scratch, *, nseg=1, pro=PRO_PLAIN, k=None, dtype=None, norm_weight=None, g=None,
             s_in=None, s_out=None, lower_bound=None, eps_model=1e-6, eps_bl=reference.BITLINEAR_NORM_EPS,
             chunks=1, stats=None):
    """Pre-pass: quantise the rows of x (see ``_quant_row``) into ``scratch`` for ``nseg`` segments, each
    row split over ``chunks`` programs (None: ``quant_chunks`` on a GPU, whole rows in the interpreter).

    ``stats``: the ``RowStats`` that the GEMM which wrote this input left (``gemm(stats_out=)``): with a
    norm prologue, its sums of squares of the norm's input (x; g for the MLGRU and gated ones) replace the
    first row reduction; with the plain one (then asked for with w = ``bit_norm``), its sums of squares and
    max|x w| replace both of the BitLinear's.

    Launched with programmatic dependent launch where the GPU has it: the constant operands (norm
    weights, lower bound, ``s_in``) are read before the wait for the kernel launched just before, so that
    kernel must not write them (x and g are read after the wait)."""
    m = scratch.sx.shape[1]
    k = k if k is not None else bit_norm.shape[-1]
    if chunks is None:
        chunks = 1 if INTERPRET or not scratch.xq.is_cuda else quant_chunks(
            m * nseg, scratch.pw, min(QUANT_PROGRAMS, _num_sm(scratch.xq.device)))
        if scratch.red.numel() < m * nseg * 4 * chunks:  # a scratch for more segments than this pre-pass fills
            chunks = 1
    assert chunks & (chunks - 1) == 0 and chunks <= QUANT_MAX_CHUNKS, "chunks: a power of two <= QUANT_MAX_CHUNKS"
    assert chunks == 1 or scratch.red.numel() >= m * nseg * 4 * chunks, "this scratch holds no split rows"
    pa = prepass_args(x, bit_norm, scratch, nseg=nseg, pro=pro, k=k, dtype=dtype, norm_weight=norm_weight, g=g,
                      s_in=s_in, s_out=s_out, lower_bound=lower_bound, eps_model=eps_model, eps_bl=eps_bl,
                      chunks=chunks)
    pdl = use_pdl(scratch.xq.device)
    spin = not INTERPRET  # the interpreter runs programs one after another: one launch per barrier instead
    scratch.nch = chunks  # the GEMM reads sum(xq) in this many parts
    ssm, nt = 0, 0
    if stats is not None:
        assert stats.nt > 0 and stats.m == m, "stats: the RowStats of the GEMM that wrote x, launched already"
        ssm, nt = (2 if pro == PRO_PLAIN else 1), stats.nt
    for _ in range(1 if spin or chunks == 1 else 3):  # 2 barriers at most: a launch makes one more correct
        _quant_kernel[(m, nseg, chunks)](
            *pa["head"], scratch.xq, scratch.sx, scratch.sumx, scratch.red, scratch.ctr, k, packed_bytes(k),
            scratch.pw, m, stats.buf if stats is not None else scratch.sx, nt, **pa["consts"], USE_ASM=not INTERPRET,
            PDL=pdl, NCH=chunks, SPIN=spin, SSM=ssm, NTB=triton.next_power_of_2(max(nt, 1)), num_warps=pa["warps"],
            **({"launch_pdl": True} if pdl else {}))
    return scratch


@triton.jit
def _codes(wb, s: tl.constexpr, USE_ASM: tl.constexpr):
    """Digit plane s of packed bytes wb: int8 codes 0-2, four bytes per 32-bit register, two instructions
    (shift, mask 0x03030303) for four codes (the interpreter: one byte at a time). Measured on an H200
    against the byte-wise form (``bench/results/EXPERIMENTS.md``): the 13b GEMMs at 4-16 rows 1.5-1.9x
    faster, within 6-16 % of the same kernel with no unpack work at all."""
    if USE_ASM:
        if s == 0:
            c = tl.inline_asm_elementwise("and.b32 $0, $1, 0x03030303;", "=r,r", [wb], dtype=tl.int8,
                                          is_pure=True, pack=4)
        elif s == 1:
            c = tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x03030303;}", "=r,r",
                                          [wb], dtype=tl.int8, is_pure=True, pack=4)
        elif s == 2:
            c = tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303;}", "=r,r",
                                          [wb], dtype=tl.int8, is_pure=True, pack=4)
        else:
            c = tl.inline_asm_elementwise("shr.b32 $0, $1, 6; and.b32 $0, $0, 0x03030303;", "=r,r", [wb],
                                          dtype=tl.int8, is_pure=True, pack=4)
    else:
        c = ((wb >> (2 * s)) & 3).to(tl.int8)
    return c


@triton.jit
def _add_part(acc, acc2, part, off, RC, GLU: tl.constexpr):
    """acc (acc2) += the int32 sums that one K part left at ``part`` (``_split_sum``'s workspace layout)."""
    acc += tl.load(part + off, cache_modifier=".cg")
    if GLU:
        acc2 += tl.load(part + RC + off, cache_modifier=".cg")
    return acc, acc2


@triton.jit
def _split_sum(acc, acc2, WS, CTR, tile, part, R: tl.constexpr, C: tl.constexpr, SPLIT: tl.constexpr,
               GLU: tl.constexpr):
    """Split-K: this program's (R, C) int32 partial sums ``acc`` (and ``acc2``) of K part ``part`` of
    ``tile``; returns (last, the sums over all parts): the tile's last program to arrive (counter
    CTR[tile]) adds the SPLIT parts in a fixed order (exact: int32) and sets the counter back to 0 for
    the next launch; the others return last = False and their own parts, which they must not store."""
    NA: tl.constexpr = 2 if GLU else 1
    base = WS + (tile * SPLIT + part) * (NA * R * C)
    off = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(base + off, acc)
    if GLU:
        tl.store(base + R * C + off, acc2)
    tl.debug_barrier()  # every thread's store before the arrival (release, cumulative)
    old = tl.atomic_add(CTR + tile, 1, sem="acq_rel")
    last = old == SPLIT - 1
    if last:
        first = WS + tile * SPLIT * (NA * R * C)
        acc = tl.zeros((R, C), tl.int32)
        acc2 = tl.zeros((R, C), tl.int32)
        if SPLIT <= 8:  # the split-K schedules' parts, unrolled
            for p in tl.static_range(SPLIT):
                acc, acc2 = _add_part(acc, acc2, first + p * (NA * R * C), off, R * C, GLU)
        else:  # one part per K block (weights-early schedules, up to 14 at 13b): unrolled they spilled
            for p in range(SPLIT):
                acc, acc2 = _add_part(acc, acc2, first + p * (NA * R * C), off, R * C, GLU)
        tl.atomic_xchg(CTR + tile, 0, sem="relaxed")
    return last, acc, acc2


@triton.jit
def _row_sums(SUMX, RED, seg, M, rm, NCH: tl.constexpr):
    """sum(xq) of rows ``rm`` of segment ``seg``: SUMX, or the NCH parts that a pre-pass whose rows were
    split over NCH programs left in RED (``Scratch.row_sums``), added in a fixed order (int32: exact)."""
    if NCH == 1:
        s = tl.load(SUMX + seg * M + rm, mask=rm < M, other=0)
    else:
        base = RED + ((seg * M + rm) * 4 + 3) * NCH
        s = rm * 0
        for j in tl.static_range(NCH):
            s += tl.load(base + j, mask=rm < M, other=0.0).to(tl.int32, bitcast=True)
    return s


@triton.jit
def _row_stats(out, rm, rn, t, SS, SSW, M, N, BNT: tl.constexpr, STATS: tl.constexpr):
    """``RowStats`` of output tile t (BNT columns; out (BM, BNT), rows rm, columns rn): per row, sum(out^2)
    and, with STATS == 2, max|out * SSW[col]|, at SS[0 | 1, t, row]."""
    NT = tl.cdiv(N, BNT)
    o = tl.where((rm < M)[:, None] & (rn < N)[None, :], out.to(tl.float32), 0.0)
    base = SS + t * M + rm
    tl.store(base, tl.sum(o * o, 1), mask=rm < M)
    if STATS == 2:
        w = tl.load(SSW + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(base + NT * M, tl.max(tl.abs(o * w), 1), mask=rm < M)


@triton.jit
def _epi_operands(SX, SUMX, RED, SW, rm, seg, M, NCH: tl.constexpr):
    """What the epilogue reads besides the sums and the residual (which ``_epilogue`` loads itself): sum(xq)
    and s_x of rows rm, and s_w."""
    sumx = _row_sums(SUMX, RED, seg, M, rm, NCH)
    sx = tl.load(SX + seg * M + rm, mask=rm < M, other=1.0)
    return sumx, sx, tl.load(SW + seg)


@triton.jit
def _finish(acc, acc2, WS, CTR, stile, part, SX, SUMX, RED, SW, rm, rn, seg, OUT, RES, M, N, so_m, sr_m,
            pid_n, SS, SSW, SSEG, R: tl.constexpr, C: tl.constexpr, SPLIT: tl.constexpr, EPI: tl.constexpr,
            DT: tl.constexpr, USE_ASM: tl.constexpr, TRANS: tl.constexpr, NCH: tl.constexpr, STATS: tl.constexpr):
    """After the K loop: the parts of a split tile met (``_split_sum``; only the last program goes on), then the
    epilogue on the (R, C) sums, transposed first when the weights were the left operand (TRANS), and with
    STATS the ``RowStats`` of segment SSEG's output."""
    last = True
    if SPLIT > 1:
        last, acc, acc2 = _split_sum(acc, acc2, WS, CTR, stile, part, R, C, SPLIT, EPI == 2)
    if last:
        sumx, sx, sw = _epi_operands(SX, SUMX, RED, SW, rm, seg, M, NCH)
        out = _epilogue(tl.trans(acc) if TRANS else acc, tl.trans(acc2) if TRANS else acc2, sumx, sx, sw, rm, rn,
                        seg, OUT, RES, M, N, so_m, sr_m, EPI, DT, USE_ASM)
        if STATS > 0:
            if seg == SSEG:
                _row_stats(out, rm, rn, pid_n, SS, SSW, M, N, R if TRANS else C, STATS)


@triton.jit
def _w_block(Wp, rn, kk, P, n_rows, N, EPI: tl.constexpr, SWAP: tl.constexpr):
    """The packed weight bytes of K block ``kk`` (bytes past P read as 0, no traffic): (BN, BK) with SWAP, else
    (BK, BN); for the GLU pair the up rows' block too (else the first again)."""
    if SWAP:
        wmask = (rn < n_rows)[:, None] & (kk < P)[None, :]
        wb = tl.load(Wp + rn[:, None] * P + kk[None, :], mask=wmask, other=0)
        wb2 = wb
        if EPI == 2:
            wb2 = tl.load(Wp + (rn + N)[:, None] * P + kk[None, :], mask=wmask, other=0)
    else:
        wmask = (kk < P)[:, None] & (rn < n_rows)[None, :]
        wb = tl.load(Wp + rn[None, :] * P + kk[:, None], mask=wmask, other=0)
        wb2 = wb
        if EPI == 2:
            wb2 = tl.load(Wp + (rn + N)[None, :] * P + kk[:, None], mask=wmask, other=0)
    return wb, wb2


@triton.jit
def _plane_dot(acc, acc2, wb, wb2, xs, s: tl.constexpr, EPI: tl.constexpr, SWAP: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (acc2) += digit plane s of weight block wb (wb2) times its activations xs (``_mma_block``)."""
    if SWAP:
        acc = tl.dot(_codes(wb, s, USE_ASM), xs, acc, out_dtype=tl.int32)
        if EPI == 2:
            acc2 = tl.dot(_codes(wb2, s, USE_ASM), xs, acc2, out_dtype=tl.int32)
    else:
        acc = tl.dot(xs, _codes(wb, s, USE_ASM), acc, out_dtype=tl.int32)
        if EPI == 2:
            acc2 = tl.dot(xs, _codes(wb2, s, USE_ASM), acc2, out_dtype=tl.int32)
    return acc, acc2


@triton.jit
def _mma_block(acc, acc2, wb, wb2, xa, M, rm, kk, P, PB, EPI: tl.constexpr, SWAP: tl.constexpr,
               USE_ASM: tl.constexpr, HOIST: tl.constexpr = False):
    """acc (acc2) += weight block wb (wb2) times the planar int8 activations of K block kk (``xa``: the rows'
    starts, (1, BM) with SWAP, else (BM, 1)), one ``tl.dot`` per digit plane: with SWAP the weights are the
    left operand (kept in registers) and the activations are transposed on the right, accumulators (BN, BM);
    else (BM, BN). HOIST: the four planes' activations are loaded before the first product (outside a
    pipelined loop each plane's load would otherwise wait for the product before it, one L2 round trip each)."""
    if SWAP:
        xp = xa + kk[:, None]  # (BK, BM) int8 per plane
        xmask = (kk < P)[:, None] & (rm < M)[None, :]
    else:
        xp = xa + kk[None, :]  # (BM, BK) int8 per plane
        xmask = (rm < M)[:, None] & (kk < P)[None, :]
    if HOIST:
        x0 = tl.load(xp, mask=xmask, other=0)
        x1 = tl.load(xp + PB, mask=xmask, other=0)
        x2 = tl.load(xp + 2 * PB, mask=xmask, other=0)
        x3 = tl.load(xp + 3 * PB, mask=xmask, other=0)
        acc, acc2 = _plane_dot(acc, acc2, wb, wb2, x0, 0, EPI, SWAP, USE_ASM)
        acc, acc2 = _plane_dot(acc, acc2, wb, wb2, x1, 1, EPI, SWAP, USE_ASM)
        acc, acc2 = _plane_dot(acc, acc2, wb, wb2, x2, 2, EPI, SWAP, USE_ASM)
        acc, acc2 = _plane_dot(acc, acc2, wb, wb2, x3, 3, EPI, SWAP, USE_ASM)
    else:
        for s in tl.static_range(4):
            if SWAP:
                xs = tl.load(xa + s * PB + kk[:, None], mask=xmask, other=0)
            else:
                xs = tl.load(xa + s * PB + kk[None, :], mask=xmask, other=0)
            acc, acc2 = _plane_dot(acc, acc2, wb, wb2, xs, s, EPI, SWAP, USE_ASM)
    return acc, acc2


@triton.jit
def _gemm_tile(pid, seg, XQ, SX, SUMX, RED, W0, W1, W2, SW, OUT, RES, so_m, sr_m, M, N, P, PB, WS, CTR, KS, SS, SSW,
               SSEG, EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
               USE_ASM: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr,
               NCH: tl.constexpr, STATS: tl.constexpr, WEARLY: tl.constexpr = False):
    """Program ``pid`` of segment ``seg`` of ``_gemm_kernel`` (see there)."""
    DT: tl.constexpr = OUT.dtype.element_ty
    part = pid % SPLIT
    tile = pid // SPLIT
    k_lo = part * KS
    k_hi = tl.minimum(k_lo + KS, P)
    pid_m, pid_n = _grouped_tile(tile, M, N, BM, BN, GROUP)
    stile = seg * (tl.cdiv(M, BM) * tl.cdiv(N, BN)) + tile
    Wp = segment_weights(W0, W1, W2, seg)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_rows = 2 * N if EPI == 2 else N
    if WEARLY:  # one K block per program (KS == BK): its weights, which no kernel writes, loaded before the wait
        wb, wb2 = _w_block(Wp, rn, k_lo + rk, P, n_rows, N, EPI, SWAP)
    if PDL:  # programmatic dependent launch: the pre-pass before this kernel writes XQ, SX, SUMX
        gdc_wait()
        gdc_launch_dependents()
    if SWAP:
        acc = tl.zeros((BN, BM), tl.int32)
        acc2 = tl.zeros((BN, BM), tl.int32)
        xa = XQ + (seg * M + rm[None, :]) * 4 * PB
    else:
        acc = tl.zeros((BM, BN), tl.int32)
        acc2 = tl.zeros((BM, BN), tl.int32)
        xa = XQ + (seg * M + rm[:, None]) * 4 * PB
    if WEARLY:
        acc, acc2 = _mma_block(acc, acc2, wb, wb2, xa, M, rm, k_lo + rk, P, PB, EPI, SWAP, USE_ASM, True)
    else:
        for k0 in range(k_lo, k_hi, BK):
            wb, wb2 = _w_block(Wp, rn, k0 + rk, P, n_rows, N, EPI, SWAP)
            acc, acc2 = _mma_block(acc, acc2, wb, wb2, xa, M, rm, k0 + rk, P, PB, EPI, SWAP, USE_ASM)
    if SWAP:
        _finish(acc, acc2, WS, CTR, stile, part, SX, SUMX, RED, SW, rm, rn, seg, OUT, RES, M, N, so_m, sr_m,
                pid_n, SS, SSW, SSEG, BN, BM, SPLIT, EPI, DT, USE_ASM, True, NCH, STATS)
    else:
        _finish(acc, acc2, WS, CTR, stile, part, SX, SUMX, RED, SW, rm, rn, seg, OUT, RES, M, N, so_m, sr_m,
                pid_n, SS, SSW, SSEG, BM, BN, SPLIT, EPI, DT, USE_ASM, False, NCH, STATS)


@triton.jit
def _gemm_kernel(XQ, SX, SUMX, RED, W0, W1, W2, SW, OUT, RES, so_m, sr_m, M, N, P, PB, WS, CTR, KS, SS, SSW, SSEG,
                 EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                 USE_ASM: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr = 1,
                 NCH: tl.constexpr = 1, STATS: tl.constexpr = 0, WEARLY: tl.constexpr = False):
    """XQ: planar int8 activations (NSEG, M, 4, PB) with PB = 4 * words per row; sum(xq) in SUMX, or in NCH
    parts in RED when the pre-pass split its rows (``_row_sums``). STATS > 0: the epilogue of segment SSEG
    also writes its output's ``RowStats`` to SS (STATS = 2: with max|out * SSW|).

    SPLIT > 1 (split-K, for few rows: more programs, more weight bytes in flight): program pid takes
    K part pid % SPLIT (bytes [part * KS, (part + 1) * KS), KS a multiple of BK) of tile pid // SPLIT;
    the parts meet in ``_split_sum`` (workspace WS, counters CTR, one per segment and tile).

    WEARLY (schedules of ``EARLY_WEIGHTS``): each program takes one K block (KS == BK, split over every block),
    whose weights it loads before the wait, as the GEMV does, and then no K loop."""
    _gemm_tile(tl.program_id(0), tl.program_id(1), XQ, SX, SUMX, RED, W0, W1, W2, SW, OUT, RES, so_m, sr_m, M, N,
               P, PB, WS, CTR, KS, SS, SSW, SSEG, EPI, BM, BN, BK, GROUP, USE_ASM, SWAP, PDL, SPLIT, NCH, STATS,
               WEARLY)


# Decode batches up to 16 rows: also offer the tuner schedules whose programs each take one K block and load
# its weights before the wait for the pre-pass (``_gemm_kernel``'s WEARLY, as the GEMV loads its first block),
# with no K loop; first in the list, so that untuned runs (``--fixed-schedules``, the GPU checks) take them too.
# Bit-equal to the others. ``gemm(early_weights=)`` asks for them; GraphDecoder does for models up to
# ``GraphDecoder.EARLY_WEIGHTS_MAX_D`` wide (bench/results/EXPERIMENTS.md: tuned on an H100, 1.3b batch 4
# 0.795 -> 0.681 ms, 370m 0.588 -> 0.536; 13b no gain). EARLY_WEIGHTS True or False overrides every caller
# (``batched_decode --variants early-weights,no-early-weights``). (The weights-ahead loop of 8f31a88 was
# slower: it loaded the activations block by block inside a loop that Triton no longer pipelined; these
# schedules have no loop.) Blocks of 256 bytes and more: at 128, 13b's down projection would be 27 parts per
# tile, and every part's int32 sums (64 / BK of its weight bytes) go through the split workspace.
EARLY_WEIGHTS: bool | None = None
_EARLY_WEIGHT_CONFIGS = [(16, 64, 256, 4, 1, 0, 0, 1), (16, 32, 256, 4, 1, 0, 0, 1), (16, 64, 256, 4, 1, 1, 0, 1),
                         (16, 128, 256, 8, 1, 1, 0, 1), (16, 64, 512, 8, 1, 0, 0, 1), (16, 32, 512, 4, 1, 0, 0, 1)]


def _early_weights(asked: bool) -> bool:
    """Whether the weights-early schedules are offered: ``EARLY_WEIGHTS`` where set, else the caller's ask."""
    return asked if EARLY_WEIGHTS is None else bool(EARLY_WEIGHTS)


# BM of the decode GEMM's tile is the batch's row count to the next power of two, at least this. The products
# are padded to the tensor core's 16 rows either way (``tl.dot`` takes fewer), but with a smaller tile the loads,
# the epilogue and the row statistics cover only the batch's rows: offline sm_90a compiles (Triton 3.6,
# ``bench/kernel_compile_report.py --row-tile 4``) of the decoder's schedules at 4 rows have 20-37 % fewer
# instructions than at 16 and as many barriers or fewer (at 2 some gained barriers, so 4 is the least).
# Measured against one 16-row tile for every decode batch (tuned, one H100, one process per size,
# bench/results/batched_decode_row_tile_h100.*): 13b batch 2 / 4 / 8 2.573 / 2.622 / 2.597 -> 2.324 / 2.374 /
# 2.528 ms, 1.3b 0.667 / 0.679 / 0.687 -> 0.605 / 0.608 / 0.612, 370m batch 4 / 8 0.533 / 0.514 -> 0.442 /
# 0.464; batch 16 unchanged (its tile is 16 either way). ``kernel_compile_report --row-tile 16`` compiles the
# old tile; the tests and the GPU checks keep the two bit-equal.
DECODE_ROW_TILE_MIN = 4


def decode_row_tile(m: int, least: int | None = None) -> int:
    """BM of a decode batch of ``m`` <= 16 rows: the next power of two, at least ``least`` (default
    ``DECODE_ROW_TILE_MIN``)."""
    return max(DECODE_ROW_TILE_MIN if least is None else least, triton.next_power_of_2(m))


def _gemm_configs(m: int, early_weights: bool = False):
    """(BM, BN, BK, warps, stages[, swap[, split[, weights early]]]) candidates by row count; the first is the
    interpreter's. Up to 16 rows, BM is ``decode_row_tile(m)``.

    swap = 1: the weights are the left operand of the products (out^T = W x^T); split > 1: K split over
    that many programs per tile (decode batches: a 5120-row projection in 64-row tiles is 80 programs,
    too few weight bytes in flight to stream at the GPU's bandwidth); weights early = 1 (``EARLY_WEIGHTS``):
    K split into single BK blocks, each program's weights loaded before its wait (``early_weights``, decode
    batches up to 16 rows; see ``EARLY_WEIGHTS``)."""
    early = _early_weights(early_weights) and m <= 16
    if INTERPRET:  # few, large programs: the interpreter pays per operation (and tests two K blocks)
        cands = [(16, 64, 32, 4, 1, 0, 0, 1) if early else (16, 64, 32, 4, 1)]
    elif m <= 16:
        cands = (_EARLY_WEIGHT_CONFIGS if early else []) + [
                (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 64, 256, 4, 3), (16, 32, 128, 4, 4),
                (16, 32, 256, 4, 3), (16, 128, 256, 8, 3), (16, 64, 128, 4, 4, 1), (16, 128, 128, 4, 3, 1),
                (16, 64, 256, 4, 3, 1), (16, 64, 128, 4, 6, 1), (16, 64, 128, 4, 4, 1, 2), (16, 64, 128, 4, 4, 1, 4),
                (16, 64, 128, 4, 4, 1, 8), (16, 128, 128, 4, 3, 1, 2), (16, 128, 128, 4, 3, 1, 4),
                (16, 64, 256, 4, 3, 1, 4), (16, 64, 128, 4, 4, 0, 4)]
    elif m <= 64:  # narrow weight tiles too: a 2048-row projection is 32 programs of 64 rows
        return [(64, 64, 128, 4, 3, 1), (64, 64, 256, 4, 3, 1), (32, 64, 128, 4, 4), (64, 128, 128, 4, 3),
                (64, 64, 128, 4, 3), (64, 128, 128, 8, 3), (64, 128, 128, 4, 3, 1), (64, 32, 128, 4, 4, 1),
                (64, 32, 256, 4, 3, 1), (64, 16, 256, 4, 3, 1), (32, 32, 256, 4, 3), (64, 64, 128, 4, 3, 1, 2),
                (64, 64, 128, 4, 3, 1, 4), (64, 128, 128, 4, 3, 1, 2)]
    else:
        return [(128, 64, 128, 4, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
                (64, 64, 128, 4, 3), (128, 32, 128, 4, 3), (64, 32, 256, 4, 3),
                (128, 64, 128, 4, 3, 1), (128, 128, 128, 8, 3, 1), (64, 128, 128, 4, 3, 1), (128, 64, 64, 4, 4, 1),
                (64, 64, 128, 4, 3, 1), (128, 128, 64, 8, 4, 1)]
    return [(decode_row_tile(m),) + c[1:] for c in cands] if m <= 16 else cands  # the interpreter's at any m


_TUNED: dict = {}


def _tuned(table: str, key, cands: list, launch, out, time_of=None):
    """The schedule of ``key``, chosen once per process: on a GPU (outside a graph capture, with tuning on)
    the fastest of ``cands`` by ``time_of(schedule)`` (default: ``launch(schedule)``'s median time by
    ``do_bench``), kept in the on-disk cache under ``table`` (``schedule_cache.pick``); otherwise the first
    candidate."""
    cfg = _TUNED.get(key)
    if cfg is None:
        cfg = cands[0]
        from . import schedule_cache, ternary_gemv

        if (not INTERPRET and ternary_gemv.TUNE and out.is_cuda and not torch.cuda.is_current_stream_capturing()
                and len(cands) > 1):
            def bench(c):
                launch(c)  # compiles, and tunes what c runs inside (many_rows_path), before the timing
                return triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")

            cfg, _ = schedule_cache.pick(table, key, out.device, __file__, cands, time_of or bench)
        _TUNED[key] = cfg
    return cfg


_SPLIT_BUF: dict = {}  # device -> (workspace, counters) of split-K launches (grow; older kept: graphs hold them)
_SPLIT_OLD: list = []


def split_buffers(ws_elems: int, tiles: int, device):
    """The int32 workspace (partial sums) and the counters (zeros; each launch leaves them at zero) that
    split-K launches share on ``device``, at least this large."""
    key = str(torch.device(device))
    ws, ctr = _SPLIT_BUF.get(key, (None, None))
    if ws is None or ws.numel() < ws_elems or ctr.numel() < tiles:
        if ws is not None:
            _SPLIT_OLD.append((ws, ctr))
        ws = torch.empty(max(ws_elems, 0 if ws is None else ws.numel()), dtype=torch.int32, device=device)
        ctr = torch.zeros(max(tiles, 0 if ctr is None else ctr.numel()), dtype=torch.int32, device=device)
        _SPLIT_BUF[key] = (ws, ctr)
    return ws, ctr


def split_parts(p: int, bk: int, split: int):
    """(parts, bytes per part) of a K of ``p`` bytes in BK blocks split ``split`` ways (0: one block per part): no
    part empty."""
    blocks = triton.cdiv(p, bk)
    if split == 0:
        return blocks, bk
    per = triton.cdiv(blocks, max(1, min(split, blocks)))
    return triton.cdiv(blocks, per), per * bk


def _launch(cfg, a):
    bm, bn, bk, nw, ns = cfg[:5]
    swap = cfg[5] if len(cfg) > 5 else 0
    wearly = bool(cfg[7]) if len(cfg) > 7 else False
    split, ks = split_parts(a["p"], bk, 0 if wearly else (cfg[6] if len(cfg) > 6 else 1))
    tiles = triton.cdiv(a["m"], bm) * triton.cdiv(a["n"], bn)
    if split > 1:
        ws, ctr = split_buffers(a["nseg"] * tiles * split * bm * bn * (2 if a["epi"] == EPI_GLU else 1),
                                a["nseg"] * tiles, a["out"].device)
    else:
        ws, ctr = a["sumx"], a["sumx"]  # not read
    st, ssw, stats = a.get("stats"), a.get("stats_w"), 0
    if st is not None:
        stats = 2 if ssw is not None else 1
        st.nt = triton.cdiv(a["n"], bn)  # what the pre-pass after this launch reads
    _gemm_kernel[(tiles * split, a["nseg"])](
        a["xq8"], a["sx"], a["sumx"], a["red"], a["w"][0], a["w"][1], a["w"][2], a["sw"], a["out"], a["res"],
        a["so_m"], a["sr_m"], a["m"], a["n"], a["p"], a["pb"], ws, ctr, ks, st.buf if stats else ws,
        ssw if stats == 2 else ws, a.get("stats_seg", 0), EPI=a["epi"], BM=bm, BN=bn, BK=bk, GROUP=8,
        USE_ASM=not INTERPRET, SWAP=swap, PDL=a["pdl"], SPLIT=split, NCH=a["nch"], STATS=stats, WEARLY=wearly,
        num_warps=nw, num_stages=ns, **({"launch_pdl": True} if a["pdl"] else {}))


def gemm(scratch, weights, scales, out, *, k, epi=EPI_STORE, residual=None, n=None, config=None, tune_pool=None,
         tune_prepass=None, stats_out=None, early_weights=False):
    """out (M, NSEG*N) (or (M, N) for EPI_GLU) from quantised activations in ``scratch``.

    From ``INT_MM_MIN_ROWS`` rows on CUDA (no ``config`` given): this kernel or ``gemm_unpacked``,
    whichever ``many_rows_path`` picks (the same output, bit for bit). Below, ``tune_pool`` (other weight
    lists of the same shapes, e.g. every layer's) and ``tune_prepass`` (the launch that fills ``scratch``)
    let the first call time its candidate schedules as the decoder runs them (``_gemm_fused``), and
    ``stats_out`` = (``RowStats``, w or None, segment) has the epilogue leave that segment's row statistics
    for the next pre-pass (w: also max|out * w|, for a plain pre-pass whose BitLinear norm weight w is).
    ``early_weights``: up to 16 rows, the tuner also times the weights-early schedules (``EARLY_WEIGHTS``)."""
    m = out.shape[0]
    if stats_out is not None:
        assert m < INT_MM_MIN_ROWS or INT_MM_MIN_ROWS <= 0, "stats_out: decode batches only (the fused kernel)"
        return _gemm_fused(scratch, weights, scales, out, k=k, epi=epi, residual=residual, n=n, config=config,
                           tune_pool=tune_pool, tune_prepass=tune_prepass, stats_out=stats_out,
                           early_weights=early_weights)
    if config is None and out.is_cuda and 0 < INT_MM_MIN_ROWS <= m:
        def run(path):
            if path == "fused":
                return _gemm_fused(scratch, weights, scales, out, k=k, epi=epi, residual=residual, n=n)
            return gemm_unpacked(scratch, weights, scales, out, k=k, epi=epi, residual=residual, n=n)

        return run(many_rows_path(m, weights, out, k, epi, run))
    return _gemm_fused(scratch, weights, scales, out, k=k, epi=epi, residual=residual, n=n, config=config,
                       tune_pool=tune_pool, tune_prepass=tune_prepass, early_weights=early_weights)


# Many rows: "auto" (the tuner times both paths per shape and row count), "fused" (this kernel, codes
# unpacked in registers) or "unpacked" (codes unpacked to int8 once per call, then an int8 GEMM). Measured
# in one H200 run (bench/results/prefill_h200.json, ms, fused vs unpacked + Triton int8 GEMM): since the
# four-codes-per-register unpack, the fused kernel is the faster at 13b x 2048 rows (o 0.191 vs 0.281, gate/up
# 0.752 vs 0.828, down 0.306 vs 0.405); at 1.3b x 8192 it depends on the shape (o 0.162 vs 0.244, gate/up
# 0.649 vs 0.605, down 0.309 vs 0.327).
MANY_ROWS_PATH = os.environ.get("MMF_MANY_ROWS_PATH", "auto")


def many_rows_path(m, weights, out, k, epi, run) -> str:
    """"fused" or "unpacked" for ``m`` rows of this projection (``MANY_ROWS_PATH``; "auto": the faster of
    the two by ``run(path)``'s time, chosen once per shape and power-of-two row count, kept in the
    schedule cache; untimed (interpreter, tuning off, graph capture): "unpacked")."""
    if MANY_ROWS_PATH not in ("auto", "fused", "unpacked"):
        raise ValueError(f"MMF_MANY_ROWS_PATH={MANY_ROWS_PATH!r}: use auto, fused or unpacked")
    if MANY_ROWS_PATH != "auto":
        return MANY_ROWS_PATH
    key = ("path", triton.next_power_of_2(m), tuple(weights[0].shape), len(weights), k, epi, str(out.dtype))
    return _tuned("gemm_path", key, [("unpacked",), ("fused",)], lambda c: run(c[0]), out)[0]


def _byte_operands(weights) -> list:
    """The kernel's three weight-segment arguments as bytes (absent segments repeat the first)."""
    ws = [w if w.dtype == torch.uint8 else w.view(torch.uint8) for w in weights]
    return ws + [ws[0]] * (3 - len(ws))


def _gemm_fused(scratch, weights, scales, out, *, k, epi=EPI_STORE, residual=None, n=None, config=None,
                tune_pool=None, tune_prepass=None, stats_out=None, early_weights=False):
    """``gemm`` on this file's kernel (codes unpacked in registers), any row count.

    With a ``tune_pool`` of two or more weight lists, the first call of a shape times each candidate in
    a CUDA graph of (``tune_prepass``, GEMM) pairs that cycle through the pool, with programmatic dependent
    launch as the decoder runs them (``ternary_gemv.chain_ms``); otherwise one launch at a time (``_tuned``).
    Measured on an H200 (13b shapes, 16 rows, bench/results/EXPERIMENTS.md): the two rankings disagree, and
    the schedules the single-launch timing picked took 49.8 us per layer in a chain against 44.6 for the
    chain's best."""
    m = out.shape[0]
    nseg = len(weights)
    n0 = weights[0].shape[0]
    n = n if n is not None else (n0 // 2 if epi == EPI_GLU else n0)
    ws = _byte_operands(weights)
    a = dict(xq8=scratch.xq.view(torch.int8), sx=scratch.sx, sumx=scratch.sumx, red=scratch.red, nch=scratch.nch,
             w=ws, sw=scales, out=out, res=residual if residual is not None else out, so_m=out.stride(0),
             sr_m=residual.stride(0) if residual is not None else 0, m=m, n=n, p=packed_bytes(k),
             pb=4 * scratch.pw, nseg=nseg, epi=epi, pdl=use_pdl(out.device))
    if stats_out is not None:
        a.update(stats=stats_out[0], stats_w=stats_out[1], stats_seg=stats_out[2])
    mb = decode_row_tile(m) if m <= 16 else (64 if m <= 64 else 128)  # the row tile (decode: of this batch)
    key = (mb, n, k, nseg, epi, str(out.dtype)) + (("stats", stats_out[1] is not None) if stats_out else ())
    early = _early_weights(early_weights) and m <= 16
    if early:  # more candidates: tuned afresh
        key = key + ("early-weights",)
    time_of = None
    chain = tune_pool is not None and len(tune_pool) >= 2 and config is None
    if chain:
        key = key + ("chain", triton.next_power_of_2(m))  # tuned per power-of-two batch
    if chain and key not in _TUNED:  # the timing chain is built for the first call only
        from .ternary_gemv import chain_launches, chain_ms

        pool = [_byte_operands(w) for w in tune_pool]
        launches = chain_launches(a["n"] * a["p"] * nseg * (2 if epi == EPI_GLU else 1))

        def chained(c):
            fns = []
            for i in range(launches):
                fns += [tune_prepass] if tune_prepass is not None else []
                fns.append(lambda w=pool[i % len(pool)]: _launch(c, dict(a, w=w)))
            return chain_ms(fns)
        time_of = chained
    # tuned without PDL when one launch at a time: a PDL launch overlaps the timer's cache flush (see
    # ternary_gemv._tune)
    cands = _gemm_configs(m, early)
    cfg = config or _tuned("gemm", key, cands, lambda c: _launch(c, dict(a, pdl=False)), out, time_of)
    try:
        _launch(cfg, a)
    except triton.runtime.errors.OutOfResources:  # untuned first choice too big for this device
        for c in cands[1:]:
            try:
                _launch(c, a)
            except triton.runtime.errors.OutOfResources:
                continue
            _TUNED[key] = c
            break
        else:
            raise
    return out


# ----------------------------------------------------------------------------------------------
# many rows: unpack to int8 once per call, cuBLASLt int8 GEMM, one epilogue pass
# ----------------------------------------------------------------------------------------------
INT_MM_MIN_ROWS = int(os.environ.get("MMF_INT_MM_ROWS", "256"))  # 0 or less: never


@triton.jit
def _unpack_kernel(W, OUT, N, P, PB, BN: tl.constexpr, BLOCK: tl.constexpr):
    """OUT (N8, 4 * PB) int8: OUT[n, s * PB + j] = digit s of byte W[n, j] (a code 0-2), 0 for j >= P."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    s = offs // PB
    j = offs % PB
    inb = (offs < 4 * PB)[None, :]
    rmask = (rn < N)[:, None]
    b = tl.load(W + rn[:, None].to(tl.int64) * P + j[None, :], mask=rmask & inb & (j < P)[None, :], other=0)
    c = ((b.to(tl.int32) >> (2 * s)[None, :]) & 3).to(tl.int8)
    tl.store(OUT + rn[:, None].to(tl.int64) * (4 * PB) + offs[None, :], c, mask=rmask & inb)


@triton.jit
def _epi_kernel(ACC, sa_m, SUMX, SX, SW, OUT, RES, so_m, sr_m, M, N, seg,
                EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, USE_ASM: tl.constexpr):
    """The fused GEMM's epilogue on int32 sums ACC (M, >= N, or >= 2N for the GLU pair) of segment seg."""
    DT: tl.constexpr = OUT.dtype.element_ty
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    base = ACC + rm[:, None].to(tl.int64) * sa_m + rn[None, :]
    acc = tl.load(base, mask=mask, other=0)
    if EPI == 2:
        acc2 = tl.load(base + N, mask=mask, other=0)
    else:
        acc2 = acc
    sumx = tl.load(SUMX + seg * M + rm, mask=rm < M, other=0)
    sx = tl.load(SX + seg * M + rm, mask=rm < M, other=1.0)
    _epilogue(acc, acc2, sumx, sx, tl.load(SW + seg), rm, rn, seg, OUT, RES, M, N, so_m, sr_m, EPI, DT, USE_ASM)


@triton.jit
def _gemm_i8_kernel(XQ, sx_m, WU, sw_n, SX, SUMX, SW, OUT, RES, so_m, sr_m, M, N, KP, seg,
                    EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                    EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """int8 x int8 -> int32 GEMM on unpacked codes WU (rows, KP), K-major like the activations XQ (M, KP)
    (Hopper's 8-bit wgmma wants both operands K-major), then the fused GEMM's epilogue."""
    pid = tl.program_id(0)
    DT: tl.constexpr = OUT.dtype.element_ty
    pid_m, pid_n = _grouped_tile(pid, M, N, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_rows = 2 * N if EPI == 2 else N
    a_ptr = XQ + rm[:, None].to(tl.int64) * sx_m + rk[None, :]
    b_ptr = WU + rn[None, :].to(tl.int64) * sw_n + rk[:, None]
    mmask = (rm < M)[:, None]
    nmask = (rn < n_rows)[None, :]
    acc = tl.zeros((BM, BN), tl.int32)
    acc2 = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, KP, BK):
        if EVEN_K:
            a = tl.load(a_ptr, mask=mmask, other=0)
            b = tl.load(b_ptr, mask=nmask, other=0)
        else:
            kmask = (k0 + rk) < KP
            a = tl.load(a_ptr, mask=mmask & kmask[None, :], other=0)
            b = tl.load(b_ptr, mask=nmask & kmask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if EPI == 2:
            if EVEN_K:
                b2 = tl.load(b_ptr + N * sw_n, mask=nmask, other=0)
            else:
                b2 = tl.load(b_ptr + N * sw_n, mask=nmask & kmask[:, None], other=0)
            acc2 = tl.dot(a, b2, acc2, out_dtype=tl.int32)
        a_ptr += BK
        b_ptr += BK
    sumx = tl.load(SUMX + seg * M + rm, mask=rm < M, other=0)
    sx = tl.load(SX + seg * M + rm, mask=rm < M, other=1.0)
    _epilogue(acc, acc2, sumx, sx, tl.load(SW + seg), rm, rn, seg, OUT, RES, M, N, so_m, sr_m, EPI, DT, USE_ASM)


def _i8_configs():
    """(BM, BN, BK, warps, stages) candidates of ``_gemm_i8_kernel``; the first is the interpreter's."""
    if INTERPRET:
        return [(16, 16, 32, 4, 1)]
    return [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (128, 128, 128, 4, 3),
            (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (256, 128, 64, 8, 3)]


# "triton" (default): _gemm_i8_kernel, the epilogue fused; "int_mm": torch._int_mm + _epi_kernel. Measured
# in one H200 run (bench/results/prefill_h200.json, logits equal): 1.3b x 8192 55.1 vs 66.0 ms, 13b x 2048
# 78.6 vs 97.6, 13b 16 x 128 70.5 vs 89.3 (torch 2.11's _int_mm runs an sm80 CUTLASS kernel on Hopper)
INT8_GEMM = os.environ.get("MMF_INT8_GEMM", "triton")


def _i8_launch(cfg, xq, wu, scratch, scales, out, res, sr_m, m, n, seg, epi):
    bm, bn, bk, nw, ns = cfg
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_i8_kernel[grid](xq, xq.stride(0), wu, wu.stride(0), scratch.sx, scratch.sumx, scales, out, res,
                          out.stride(0), sr_m, m, n, xq.shape[1], seg, EPI=epi, BM=bm, BN=bn, BK=bk, GROUP=8,
                          EVEN_K=xq.shape[1] % bk == 0, USE_ASM=not INTERPRET, num_warps=nw, num_stages=ns)


def _i8_gemm(xq, wu, scratch, scales, out, res, sr_m, m, n, seg, epi):
    key = ("i8", 128 if m >= 128 else 64, n, xq.shape[1], epi, str(out.dtype))
    args = (xq, wu, scratch, scales, out, res, sr_m, m, n, seg, epi)
    _i8_launch(_tuned("gemm_i8", key, _i8_configs(), lambda c: _i8_launch(c, *args), out), *args)


_WBUF: dict = {}  # device -> int8 scratch of unpacked codes (grows; older buffers kept alive: graphs hold them)
_WBUF_OLD: list = []


def reserve_unpacked(nbytes: int, device) -> torch.Tensor:
    """The int8 scratch for unpacked codes, at least ``nbytes`` (one buffer per device, reused)."""
    key = str(torch.device(device))
    buf = _WBUF.get(key)
    if buf is None or buf.numel() < nbytes:
        if buf is not None:
            _WBUF_OLD.append(buf)
        buf = torch.empty(nbytes, dtype=torch.int8, device=device)
        _WBUF[key] = buf
    return buf


def unpacked_nbytes(n: int, pb: int) -> int:
    """Bytes of ``unpack_codes``' output for ``n`` weight rows: (ceil8(n), 4 * pb) int8."""
    return -(-n // 8) * 8 * 4 * pb


def unpack_codes(packed: torch.Tensor, pb: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, P) i2 bytes -> (ceil8(N), 4 * pb) int8 codes 0-2 in the planar activations' order (rows past N
    and columns past the packed bytes are not weights: the former are never read, the latter meet
    activations 0)."""
    n, p = packed.shape
    nbytes = unpacked_nbytes(n, pb)
    if out is None:
        out = reserve_unpacked(nbytes, packed.device)
    out = out[:nbytes].view(-1, 4 * pb)
    w = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    bn, block = (1, 64) if INTERPRET else (8, 512)
    _unpack_kernel[(triton.cdiv(n, bn), triton.cdiv(4 * pb, block))](w, out, n, p, pb, BN=bn, BLOCK=block)
    return out


def gemm_unpacked(scratch, weights, scales, out, *, k, epi=EPI_STORE, residual=None, n=None, mode=None):
    """``gemm`` for many rows: per segment, unpack the codes to int8, then the int8 GEMM with the epilogue
    fused (``mode`` "triton", ``_gemm_i8_kernel``) or ``torch._int_mm`` and an epilogue pass ("int_mm").
    (On an H200 torch 2.11's ``_int_mm`` runs an sm80 CUTLASS kernel, no wgmma: 950 TOP/s at 8192^3.)

    Same arguments and the same output, bit for bit, as ``gemm`` (the int32 sums are exact)."""
    m = out.shape[0]
    nseg = len(weights)
    n0 = weights[0].shape[0]
    n = n if n is not None else (n0 // 2 if epi == EPI_GLU else n0)
    pb = 4 * scratch.pw
    if scratch.nch > 1:  # a split pre-pass left sum(xq) in parts: these kernels read it whole
        scratch.sumx.copy_(scratch.row_sums())
    xq8 = scratch.xq.view(torch.int8).reshape(scratch.xq.shape[0], scratch.xq.shape[1], 4 * pb)
    res = residual if residual is not None else out
    sr_m = residual.stride(0) if residual is not None else 0
    bm, bn = (16, 32) if INTERPRET else (64, 128)
    for seg in range(nseg):
        wu = unpack_codes(weights[seg], pb)
        if (mode or INT8_GEMM) == "triton":
            _i8_gemm(xq8[seg], wu, scratch, scales, out, res, sr_m, m, n, seg, epi)
            continue
        acc = torch._int_mm(xq8[seg], wu.t())  # (M, ceil8(rows)) int32, exact
        _epi_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            acc, acc.stride(0), scratch.sumx, scratch.sx, scales, out, res, out.stride(0), sr_m, m, n, seg,
            EPI=epi, BM=bm, BN=bn, USE_ASM=not INTERPRET, num_warps=4)
    return out


def bitlinear_i2(x, norm_weight, packed, k, s_w, eps=reference.BITLINEAR_NORM_EPS):
    """Drop-in for ``reference.bitlinear_i2`` (no bias): the GEMV where ``uses_gemv``, else pre-pass + GEMM."""
    from .ternary_gemv import gemv, uses_gemv

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    sw = s_w.reshape(1).float()
    bn = norm_weight.reshape(1, k)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    scratch = Scratch(1, m, k, x.device)
    if uses_gemv(m, k):
        gemv(x2, [packed], sw, bn, out, k=k, eps_bl=eps, scratch=scratch)
    else:
        quantize(x2, bn, scratch, k=k, eps_bl=eps)
        gemm(scratch, [packed], sw, out, k=k)
    return out.reshape(*shape[:-1], n)
