"""Ternary GEMV for decoding (Triton): i2-packed weights x int8 activations, int32 accumulation.

``y = (xq @ codes^T) / (s_x * s_w)`` for one or two rows (decode batch 1-2), reading the i2 planar bytes of
``mmf/ternary_codes.py`` directly (element (n, k) is bits ``2*(k // P)`` of byte
``packed[n, k % P]``, ``P = ceil(K / 4)``, code = w + 1). Weights are never unpacked to memory.

How it works. A 32-bit word of 4 packed bytes holds 16 weights: for digit s, ``(word >> 2s) &
0x03030303`` gives the codes (0, 1, 2) of the 4 consecutive columns ``s*P + 4w .. s*P + 4w + 3``,
one per byte. The prologue writes the quantised activations in the same planar order, 4 int8 to a
word, so one ``dp4a`` (4-way int8 dot product into int32) per digit and word does 4 multiply-adds:
about half an integer instruction per weight, far below the memory time. Codes are w + 1, so the
kernel subtracts ``sum(xq)`` once per row at the end: ``sum((c - 1) x) = sum(c x) - sum(x)``;
padding positions hold code 1 and activation 0 and add nothing.

Schedule: a persistent grid (a few programs per SM); each program owns row blocks pid, pid +
NPROG, ... of BN whole rows, runs the prologue once, and loads its next block while reducing the
current one. A packed row is held in registers as up to three power-of-two tiles (``row_pieces``:
320 words = 128 + 128 + 64) rather than one tile padded to the next power of two, where 37.5 % of
the lanes of a 5120-wide row did no work: profiled (ncu, H100), the kernel is bound by instruction
issue at low occupancy (2 warps per scheduler, 0.42 instructions per cycle), not by DRAM (45 %
busy), so idle lanes cost time. Its first block is issued before the prologue, so the weight
stream starts at once; with programmatic dependent launch (``PDL``, Hopper and later,
``launch_pdl``) it is issued before the previous kernel has even finished, and so are the
prologue's constant operands (norm weights, lower bound, the state of the step before): only
loads that no kernel of this step writes run ahead of ``gdc_wait`` (``PARAMS_EARLY``; measured on
an H100, 13b decode 2.09 -> 1.95-2.03 ms/token, ``bench/results/decode_breakdown_h100.json``: in
the decoder the norm weights of 40 layers are not in L2, and their loads, issued after the
prologue's first reductions, stalled it a second time). The schedule (BN, warps, programs per SM) is
tuned per shape on first use, timed in a CUDA graph over distinct weights of that shape when the
caller passes them (``tune_pool``; the decoder passes every layer's). (Measured alternatives that
lost, on an H100: K-chunked tiles with one accumulator per digit, 1-4 programs per SM, Triton's
software pipelining through shared memory: 8-40 % slower than whole-row tiles,
``bench/results/EXPERIMENTS.md``; a bulk L2 prefetch (``cp.async.bulk.prefetch.L2``) of
each program's weights, of its next 2-4 row blocks, or of the next projection's weights, at kernel
start: 13b decode 2.22 -> 2.55 and 2.85 ms/token, 2.09 -> 2.31-2.34 ms/token,
``bench/results/EXPERIMENTS.md``; each GEMV handing its
output's statistics to the next, so that a prologue runs one reduction instead of three: 13b
unchanged, 370m 0.31 -> 0.34 ms/token, ``bench/results/EXPERIMENTS.md``.)

Prologue (fused; ``PRO``), computed redundantly by every program (the row is small and sits in L2):

* ``PRO_PLAIN``  v = x
* ``PRO_NORM``   v = rmsnorm(x) * nw, rounded to the model dtype (the block's attn/mlp norm)
* ``PRO_GATED``  v = rmsnorm(g) * gw * silu(s), rounded (MLGRU output; s given in fp32)
* ``PRO_MLGRU``  the whole MLGRU step: f = lb + (1 - lb) sigmoid(f_pre), i = silu(i_pre)(1 - f),
  s = f s_prev + i (written once, to a separate buffer), v = rmsnorm(g) * gw * silu(s), rounded

then the BitLinear part, in fp32: ``xn = rmsnorm(v) * bw``, ``s_x = 127 / max(max|xn|, 1e-5)``,
``xq = clamp(round_half_even(xn s_x), -128, 127)``. Several weight segments (``NSEG`` = 3 for the
i, f, g projections, which share their input but not their norm weights) run in one launch.

Epilogue (``EPI``): store ``y``; add a residual (``y`` rounded to the dtype, then added, as torch
does); or the GLU pair: the program computes rows n and n + N of the gate projection and stores
``silu(gate) * up`` (both rounded as torch rounds them), so the ``2m`` outputs never reach memory.

``ternary_gemm.py`` holds the tensor-core (int8 ``tl.dot``) form for more rows and for prefill,
and the stand-alone pre-pass (same prologue) that feeds it. The reference is
``kernels.reference.bitlinear_i2`` (and the compositions named in ``mmf.decode_graph``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference, schedule_cache

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET:  # libdevice is not available to the interpreter
    from triton.language.extra import libdevice
else:  # pragma: no cover - only the interpreter path
    libdevice = None
try:  # programmatic dependent launch (Hopper+): Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

PRO_PLAIN, PRO_NORM, PRO_GATED, PRO_MLGRU = 0, 1, 2, 3
PRO_NONE = 4  # activations already quantised in the scratch (benchmarks: the weight stream alone)
EPI_STORE, EPI_RESIDUAL, EPI_GLU = 0, 1, 2
GEMV_MAX_ROWS = 2  # above this, the tensor-core GEMM wins (dp4a work grows with the rows; measured)
# Two rows: the GEMV for rows narrower than this, the GEMM from it. Measured tuned, decode steps, fp16, one H100
# (bench/results/gemv_two_row_tile_h100.json): 370m (1024 wide) GEMV 0.483 ms (both rows in one prologue tile;
# 0.543 with the rows' prologues in series) vs GEMM 0.530; 1.3b (2048) GEMV 0.837 vs GEMM 0.692; 13b (5120) GEMV
# 5.00 vs GEMM 2.62. Three and four rows in one tile lost to the GEMM at 370m: 0.808 / 0.797 vs 0.536 / 0.543.
GEMV2_MAX_K = 2048


def uses_gemv(rows: int, k: int) -> bool:
    """Does a product of ``rows`` activation rows of width ``k`` (a decode batch) run the GEMV?"""
    return rows == 1 or (rows <= GEMV_MAX_ROWS and k < GEMV2_MAX_K)


# ----------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rint(x, USE_ASM: tl.constexpr):
    """Round half to even (torch.round), fp32."""
    if USE_ASM:
        r = libdevice.rint(x)
    else:
        r = (x + 12582912.0) - 12582912.0  # exact for |x| < 2^22 (the interpreter does no FMA)
    return r


@triton.jit
def _to(x, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """fp32 -> DT, round to nearest even (the interpreter truncates to bf16: round it here)."""
    if DT == tl.bfloat16 and not USE_ASM:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        x = b.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _mlgru_gates(ip, fp, lb, HAS_LB: tl.constexpr):
    """The MLGRU's gates in fp32 (``reference.mlgru_gates``): f = sigmoid(f_pre), with a lower bound
    lb + (1 - lb) f; i = silu(i_pre) (1 - f). ``lb`` is read only with ``HAS_LB``."""
    f = tl.sigmoid(fp)
    if HAS_LB:
        f = lb + (1.0 - lb) * f
    return f, _silu(ip) * (1.0 - f)


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum_i a.u8[i] * b.s8[i] over the 4 bytes of int32 words."""
    if USE_ASM:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def segment_weights(W0, W1, W2, seg):
    """The packed weights of segment ``seg`` (0-2) of a launch that fuses up to three projections."""
    if seg == 0:
        Wp = W0
    elif seg == 1:
        Wp = W1
    else:
        Wp = W2
    return Wp


@triton.jit
def _group_barrier(CTR, grp, NCH: tl.constexpr, SPIN: tl.constexpr):
    """Wait until the NCH programs of group ``grp`` are all here. Each adds 16 // NCH to the group's
    counter CTR[grp] (release, after its stores), so every barrier moves the counter by exactly 16
    (``QUANT_MAX_CHUNKS``) whatever NCH: it stays a multiple of 16 between barriers and launches, and
    a launch may split its rows differently from the one before (the target is the next multiple of 16;
    int32 differences: the counter may wrap). SPIN=False (the interpreter, whose programs run one after
    another) does not wait: the caller launches the kernel once per barrier, and each launch reads the
    parts the previous one stored."""
    INC: tl.constexpr = 16 // NCH
    tl.debug_barrier()  # every thread's store before the arrival (release, cumulative)
    old = tl.atomic_add(CTR + grp, INC, sem="acq_rel")
    if SPIN:
        target = (old & -16) + 16
        cur = old + INC
        while target - cur > 0:
            cur = tl.atomic_add(CTR + grp, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _combine(parts, IS_MAX: tl.constexpr, AXIS: tl.constexpr = 0):
    if IS_MAX:
        r = tl.max(parts, AXIS)
    else:
        r = tl.sum(parts, AXIS)
    return r


@triton.jit
def _row_reduce(part, IS_MAX: tl.constexpr, RED, CTR, grp, ch, r: tl.constexpr, NCH: tl.constexpr,
                SPIN: tl.constexpr, part2=0.0, IS_MAX2: tl.constexpr = False, TWO: tl.constexpr = False):
    """The whole row's sum (or max) from this chunk's ``part`` (and, with TWO, a second reduction of
    ``part2`` through the same barrier, returned second): with NCH > 1 chunks, each stores its part(s) in
    RED[grp, r(, r + 1), ch], meets the group's other programs at one ``_group_barrier``, then reduces all
    NCH parts in one fixed order (deterministic)."""
    if NCH > 1:
        slot = RED + (grp * 4 + r) * NCH
        tl.store(slot + ch, part)
        if TWO:
            tl.store(slot + NCH + ch, part2)
        _group_barrier(CTR, grp, NCH, SPIN)
        part = _combine(tl.load(slot + tl.arange(0, NCH), cache_modifier=".cg"), IS_MAX)
        if TWO:
            part2 = _combine(tl.load(slot + NCH + tl.arange(0, NCH), cache_modifier=".cg"), IS_MAX2)
    return part, part2


@triton.jit
def _reduce3(a, IS_MAX: tl.constexpr, R: tl.constexpr):
    """Per-row sums (or maxima) of a row tile (``_quant_row``): one row's (4, W, 4) tile to a scalar, R rows'
    (R, 4, W, 4) tile to (R,)."""
    T: tl.constexpr = 0 if R == 1 else 1  # the tile's first column axis
    return _combine(_combine(_combine(a, IS_MAX, T + 2), IS_MAX, T + 1), IS_MAX, T)


@triton.jit
def _per_row(v, R: tl.constexpr):
    """Per-row values (``_reduce3``'s: a scalar for one row, (R,) for R) broadcast over the rows' tile."""
    if R == 1:
        return v
    else:
        return v[:, None, None, None]


@triton.jit
def _reduce_rows(part, IS_MAX: tl.constexpr, RED, CTR, grp, ch, r: tl.constexpr, NCH: tl.constexpr,
                 SPIN: tl.constexpr, R: tl.constexpr, part2=0.0, IS_MAX2: tl.constexpr = False,
                 TWO: tl.constexpr = False):
    """``_row_reduce`` of per-row parts (``_reduce3``'s): whole rows (NCH = 1) need nothing more; a split row
    (NCH > 1, one row per program: R = 1, scalar parts) meets its other chunks."""
    if NCH > 1:
        tl.static_assert(R == 1, "a row split over programs is quantised one row per program")
        part, part2 = _row_reduce(part, IS_MAX, RED, CTR, grp, ch, r, NCH, SPIN, part2, IS_MAX2, TWO)
    return part, part2


@triton.jit
def _inv_rms(a, K, eps, RED, CTR, grp, ch, r: tl.constexpr, NCH: tl.constexpr, SPIN: tl.constexpr, R: tl.constexpr):
    """1 / sqrt(mean(a^2) + eps) over each row (K columns) whose tile or chunk ``a`` is (``_reduce3``'s shape); the
    sum of squares is the row's ``r``-th reduction (``_row_reduce``)."""
    ss, _ = _reduce_rows(_reduce3(a * a, False, R), False, RED, CTR, grp, ch, r, NCH, SPIN, R)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _tile_parts(SSP, r: tl.constexpr, NT, M, m, NTB: tl.constexpr, IS_MAX: tl.constexpr):
    """Region r of the ``RowStats`` a producing GEMM left (NT per-tile parts of each of M rows, laid out
    (r, tile, row)) combined over the tiles for row m, in a fixed order (the pre-pass's one row per program)."""
    t = tl.arange(0, NTB)
    return _combine(tl.load(SSP + (r * NT + t) * M + m, mask=t < NT, other=0.0), IS_MAX)


@triton.jit
def _first_inv_rms(a, K, eps, RED, CTR, grp, ch, NCH: tl.constexpr, SPIN: tl.constexpr, SSP, NT, M, rows,
                   SSM: tl.constexpr, NTB: tl.constexpr, R: tl.constexpr):
    """The prologue's first inverse RMS (of ``a``, for each of ``rows``): from the NT per-tile sums of squares
    at SSP that the producing GEMM left (SSM > 0, added in a fixed order), else the rows' reduction 0."""
    if SSM > 0:
        r = 1.0 / tl.sqrt(_tile_parts(SSP, 0, NT, M, rows, NTB, False) / K + eps)
    else:
        r = _inv_rms(a, K, eps, RED, CTR, grp, ch, 0, NCH, SPIN, R)
    return r


@triton.jit
def _quant_row(m, seg, X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, XQ, SX, SUMX, K, P, PW, M,
               eps_model, eps_bl, WRITE_STATE,
               PRO: tl.constexpr, HAS_LB: tl.constexpr, DT: tl.constexpr, BLOCK_W: tl.constexpr,
               USE_ASM: tl.constexpr, NEED_SUM: tl.constexpr, WAIT: tl.constexpr = False,
               ch=0, RED=0, CTR=0, NCH: tl.constexpr = 1, SPIN: tl.constexpr = True,
               SSP=0, NT=0, SSM: tl.constexpr = 0, NTB: tl.constexpr = 1, R: tl.constexpr = 1):
    """Quantise rows m .. m + R - 1 (those below M) for segment seg into XQ[seg, m:m+R] (planar int32 words),
    SX, SUMX; returns s_x (a scalar for one row, else (R,)).

    Each row is viewed as a (4 digits, BLOCK_W words, 4 bytes) tile: column k = s*P + 4w + b; the R rows
    (the GEMV's few decode rows, all in one program) form one (R, 4, BLOCK_W, 4) tile, so their loads are
    issued together and their reductions share barriers: one latency chain for all rows, not one per row.
    X/G hold the pre-activations with row stride sxm/sgm. For PRO_MLGRU, X points at
    [i_pre | f_pre | g_pre] (three blocks of K columns) and G is unused. The operands that no
    kernel of this decode step writes (norm weights, lower bound, the state of the step before)
    are loaded first, all at once; with ``WAIT`` (programmatic dependent launch) the program then
    waits for the previous kernel, whose output X/G is, so their loads overlap its tail. (Profiled:
    loaded after the first reductions, their latency stalled the prologue a second time.)

    SSM > 0: the producing GEMM's epilogue left per-tile partial row statistics at SSP (``RowStats``: NT
    tiles, NTB a power of two >= NT): SSM = 1, sum(in^2) of the norm's input (x, or g for the MLGRU and
    gated prologues) replaces the first row reduction; SSM = 2 (plain prologue), sum(v^2) and max|v bw|
    replace the BitLinear's, so the row needs no reduction and no barrier at all.

    With NCH > 1 the row (R = 1) is split over NCH programs (chunk ``ch`` holds words [ch * BLOCK_W,
    (ch + 1) * BLOCK_W)) whose row reductions meet in ``_row_reduce`` (two barriers with a norm prologue, one
    without); s_x is written by chunk 0, and sum(xq) is left in per-chunk parts (``Scratch.row_sums``).
    """
    tl.static_assert(R == 1 or SSM == 0, "row statistics from the producer are read one row per program")
    grp = seg * M + m  # a split row's barrier group (R = 1)
    if R == 1:  # one row, below M (its callers'): a (4, W, 4) tile, scalar row statistics and no row masks; a
        # (1, 4, W, 4) tile compiled (Triton 3.6) to more barriers and shared-memory round trips, and made the
        # 13b batch-1 step 2.06 ms against 1.96 on the same schedules (bench/results/EXPERIMENTS.md)
        rows = m
        r4 = m
        s_i = tl.arange(0, 4)[:, None, None]
        w_i = ch * BLOCK_W + tl.arange(0, BLOCK_W)[None, :, None]
        b_i = tl.arange(0, 4)[None, None, :]
    else:
        rows = m + tl.arange(0, R)
        r4 = rows[:, None, None, None]
        s_i = tl.arange(0, 4)[None, :, None, None]
        w_i = ch * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :, None]
        b_i = tl.arange(0, 4)[None, None, None, :]
    j = 4 * w_i + b_i
    k = s_i * P + j
    valid = (j < P) & (k < K)
    if R == 1:
        rvalid = valid
        rmask = None
        kc, cvalid = k, valid
    else:
        rvalid = valid & (r4 < M)
        rmask = rows < M
        # the per-column constants on the rows' whole (R, 4, W, 4) tile (each row loads them again, from L1): on
        # a (1, 4, W, 4) tile they took another layout, converted through shared memory after the wait (Triton
        # 3.6, sm_90a: 370m two-row i/f/g GEMV 26 -> 18 barriers, bench/results/EXPERIMENTS.md)
        kc, cvalid = k + r4 * 0, valid & (r4 >= 0)
    bw = tl.load(BWN + seg * K + kc, mask=cvalid, other=0.0).to(tl.float32)
    if PRO != 0:
        nw = tl.load(NW + kc, mask=cvalid, other=0.0).to(tl.float32)
    if PRO >= 2:
        s_prev = tl.load(S_IN + r4 * K + k, mask=rvalid, other=0.0)
    if PRO == 3:
        lb = 0.0  # read by _mlgru_gates only with HAS_LB
        if HAS_LB:
            lb = tl.load(LB + kc, mask=cvalid, other=0.0)
    if WAIT:  # everything above is this step's constants; X and G are the previous kernel's output
        gdc_wait()
        gdc_launch_dependents()
    if PRO == 3:  # PRO_MLGRU
        xrow = X + r4 * sxm
        ip = tl.load(xrow + k, mask=rvalid, other=0.0).to(tl.float32)
        fp = tl.load(xrow + K + k, mask=rvalid, other=0.0).to(tl.float32)
        gp = tl.load(xrow + 2 * K + k, mask=rvalid, other=0.0).to(tl.float32)
        f, i = _mlgru_gates(ip, fp, lb, HAS_LB)
        s = f * s_prev + i
        if WRITE_STATE:
            tl.store(S_OUT + r4 * K + k, s, mask=rvalid)
        r = _first_inv_rms(gp, K, eps_model, RED, CTR, grp, ch, NCH, SPIN, SSP, NT, M, rows, SSM, NTB, R)
        v = _to(gp * _per_row(r, R) * nw * _silu(s), DT, USE_ASM).to(tl.float32)
    elif PRO == 2:  # PRO_GATED
        gp = tl.load(G + r4 * sgm + k, mask=rvalid, other=0.0).to(tl.float32)
        r = _first_inv_rms(gp, K, eps_model, RED, CTR, grp, ch, NCH, SPIN, SSP, NT, M, rows, SSM, NTB, R)
        v = _to(gp * _per_row(r, R) * nw * _silu(s_prev), DT, USE_ASM).to(tl.float32)
    elif PRO == 1:  # PRO_NORM
        x = tl.load(X + r4 * sxm + k, mask=rvalid, other=0.0).to(tl.float32)
        r = _first_inv_rms(x, K, eps_model, RED, CTR, grp, ch, NCH, SPIN, SSP, NT, M, rows, SSM, NTB, R)
        v = _to(x * _per_row(r, R) * nw, DT, USE_ASM).to(tl.float32)
    else:
        v = tl.load(X + r4 * sxm + k, mask=rvalid, other=0.0).to(tl.float32)
    # BitLinear: rmsnorm(v) * bw in fp32, per-token absmax int8
    if SSM == 2 or NCH > 1:
        if SSM == 2:  # both statistics from the producer
            ss = _tile_parts(SSP, 0, NT, M, rows, NTB, False)
            mvb = _tile_parts(SSP, 1, NT, M, rows, NTB, True)
        else:  # a split row: max|xn| = r2 max|v bw| (r2 > 0; to fp32 rounding), so both row reductions meet at
            # one barrier instead of two (13b decode steps at batch 4 / 16, untuned schedules, H200: 3.314 /
            # 3.686 -> 2.979 / 3.377 ms with sum(xq) left in parts, bench/results/EXPERIMENTS.md)
            ss, mvb = _reduce_rows(_reduce3(v * v, False, R), False, RED, CTR, grp, ch, 1, NCH, SPIN, R,
                                   _reduce3(tl.abs(v * bw), True, R), True, True)
        r2 = 1.0 / tl.sqrt(ss / K + eps_bl)
        xn = v * _per_row(r2, R) * bw
        amax = mvb * r2
    else:  # whole rows (the GEMV's prologue): one more multiply per element would cost the issue-bound GEMV
        r2 = _inv_rms(v, K, eps_bl, RED, CTR, grp, ch, 1, NCH, SPIN, R)
        xn = v * _per_row(r2, R) * bw
        amax = _reduce3(tl.abs(xn), True, R)
    sx = tl.math.div_rn(127.0, tl.maximum(amax, 1e-5))
    q = tl.minimum(tl.maximum(_rint(xn * _per_row(sx, R), USE_ASM), -128.0), 127.0).to(tl.int32)
    q = tl.where(rvalid, q, 0)
    if R == 1:
        word = tl.sum((q & 0xFF) << (8 * b_i), 2)  # (4, BLOCK_W): the 4 bytes of each word
        s2 = tl.arange(0, 4)[:, None]
        w2 = ch * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        wmask = w2 < PW
        tl.store(XQ + ((seg * M + m) * 4 + s2) * PW + w2, word, mask=wmask)
    else:
        word = tl.sum((q & 0xFF) << (8 * b_i), 3)  # (R, 4, BLOCK_W)
        r3 = rows[:, None, None]
        s3 = tl.arange(0, 4)[None, :, None]
        w3 = ch * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
        wmask = (w3 < PW) & (r3 < M)
        tl.store(XQ + ((seg * M + r3) * 4 + s3) * PW + w3, word, mask=wmask)
    if NCH == 1:
        tl.store(SX + seg * M + rows, sx, mask=rmask)
        if NEED_SUM:  # the GEMM needs sum(xq); the GEMV sums it in its main loop
            tl.store(SUMX + seg * M + rows, _reduce3(q, False, R), mask=rmask)
    else:
        if ch == 0:
            tl.store(SX + seg * M + rows, sx, mask=rmask)
        # sum(xq) stays in parts (int32 bits in the fp32 slots RED[grp, 3, :]): the GEMM adds them up
        # (``row_sums``), so no program waits for the others at the end
        tl.store(RED + (grp * 4 + 3) * NCH + ch, _reduce3(q, False, R).to(tl.float32, bitcast=True))
    return sx


@triton.jit
def _residual_tile(RES, rows_m, rows_n, seg, M, N, sr_m):
    """The residual at rows rows_m and output columns rows_n of segment seg (``_epilogue``'s EPI_RESIDUAL)."""
    omask = (rows_m < M)[:, None] & (rows_n < N)[None, :]
    return tl.load(RES + rows_m[:, None] * sr_m + (seg * N + rows_n)[None, :], mask=omask, other=0.0)


@triton.jit
def _epilogue(dot, dot2, sumx, sx, sw, rows_m, rows_n, seg, OUT, RES, M, N, so_m, sr_m,
              EPI: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """dot (BM, BN) int32 sums of c*x, sumx and s_x (BM,), s_w -> y = (dot - sum x) / (s_x s_w), then
    the epilogue. (s_x and s_w come in registers: loaded here, they drew 5-8 % of the stall samples
    of a profiled GEMV launch; in whole-model decode the move alone measured no difference.)"""
    mmask = rows_m < M
    den = (sx * sw)[:, None]
    y = tl.math.div_rn((dot - sumx[:, None]).to(tl.float32), den)
    omask = mmask[:, None] & (rows_n < N)[None, :]
    if EPI == 2:  # GLU pair: silu(gate) * up, rounded like torch
        gate = _to(y, DT, USE_ASM).to(tl.float32)
        up = _to(tl.math.div_rn((dot2 - sumx[:, None]).to(tl.float32), den), DT, USE_ASM).to(tl.float32)
        out = _to(_to(_silu(gate), DT, USE_ASM).to(tl.float32) * up, DT, USE_ASM)
        tl.store(OUT + rows_m[:, None] * so_m + rows_n[None, :], out, mask=omask)
    else:
        col = seg * N + rows_n
        if EPI == 1:
            res = _residual_tile(RES, rows_m, rows_n, seg, M, N, sr_m)
            out = _to(_to(y, DT, USE_ASM).to(tl.float32) + res.to(tl.float32), DT, USE_ASM)
        else:
            out = _to(y, DT, USE_ASM)
        tl.store(OUT + rows_m[:, None] * so_m + col[None, :], out, mask=omask)
    return out


# ----------------------------------------------------------------------------------------------
# the GEMV kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_words(Wp, rows, ww, P, PW, N_ROWS, BYTE_W: tl.constexpr):
    """(BN, BW) int32 words of packed rows (4 bytes each); bytes past P read as 0. Each weight byte
    is read once per token: it is the first to leave L2."""
    rmask = (rows < N_ROWS)[:, None]
    if BYTE_W:  # P % 4 != 0: rows are not word-aligned, assemble words from bytes
        base = Wp + rows[:, None] * P + 4 * ww[None, :]
        c = tl.zeros_like(rows[:, None] + ww[None, :])
        for b in tl.static_range(4):
            m = rmask & ((4 * ww + b) < P)[None, :]
            c |= tl.load(base + b, mask=m, other=0, eviction_policy="evict_first").to(tl.int32) << (8 * b)
    else:
        c = tl.load(Wp + rows[:, None] * PW + ww[None, :], mask=rmask & (ww < PW)[None, :], other=0,
                    eviction_policy="evict_first")
    return c


@triton.jit
def _load_pieces(Wp, rows, P, PW, N_ROWS, BYTE_W: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 W3: tl.constexpr):
    """Packed rows as up to three power-of-two pieces of words, [0, W1), [W1, W1 + W2) and
    [W1 + W2, W1 + W2 + W3) (``row_pieces``: a 320-word row is 128 + 128 + 64, no lane idles on
    padding); an absent piece (width 0) is returned as the first."""
    c1 = _load_words(Wp, rows, tl.arange(0, W1), P, PW, N_ROWS, BYTE_W)
    c2 = c1
    c3 = c1
    if W2 > 0:
        c2 = _load_words(Wp, rows, W1 + tl.arange(0, W2), P, PW, N_ROWS, BYTE_W)
    if W3 > 0:
        c3 = _load_words(Wp, rows, W1 + W2 + tl.arange(0, W3), P, PW, N_ROWS, BYTE_W)
    return c1, c2, c3


@triton.jit
def _act_piece(xa, PW, OFF: tl.constexpr, W: tl.constexpr, M, ROW: tl.constexpr, USE_ASM: tl.constexpr,
               SUM: tl.constexpr = True):
    """The 4 digit planes of quantised-activation words [OFF, OFF + W) of row ROW, and (with SUM, else 0) their
    byte sum (zeros when ROW >= M)."""
    w = OFF + tl.arange(0, W)
    m = (w < PW) & ((w * 0 + M) > ROW)
    x0 = tl.load(xa + w, mask=m, other=0)
    x1 = tl.load(xa + PW + w, mask=m, other=0)
    x2 = tl.load(xa + 2 * PW + w, mask=m, other=0)
    x3 = tl.load(xa + 3 * PW + w, mask=m, other=0)
    total = 0
    if SUM:
        ones = tl.full((W,), 0x01010101, tl.int32)
        t = _dp4a(ones, x3, _dp4a(ones, x2, _dp4a(ones, x1, _dp4a(ones, x0, tl.zeros((W,), tl.int32), USE_ASM),
                                                          USE_ASM), USE_ASM), USE_ASM)
        total = tl.sum(t, 0)
    return x0, x1, x2, x3, total


@triton.jit
def _act_row(xa, PW, M, ROW: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr, USE_ASM: tl.constexpr,
             SUM: tl.constexpr = True):
    """All pieces of one activation row: 12 planes (absent pieces repeat the first) and sum(xq) (with SUM)."""
    p0, p1, p2, p3, s = _act_piece(xa, PW, 0, W1, M, ROW, USE_ASM, SUM)
    q0, q1, q2, q3 = p0, p1, p2, p3
    r0, r1, r2, r3 = p0, p1, p2, p3
    if W2 > 0:
        q0, q1, q2, q3, s2 = _act_piece(xa, PW, W1, W2, M, ROW, USE_ASM, SUM)
        s += s2
    if W3 > 0:
        r0, r1, r2, r3, s3 = _act_piece(xa, PW, W1 + W2, W3, M, ROW, USE_ASM, SUM)
        s += s3
    return p0, p1, p2, p3, q0, q1, q2, q3, r0, r1, r2, r3, s


@triton.jit
def _dot_pieces(c1, c2, c3, p0, p1, p2, p3, q0, q1, q2, q3, r0, r1, r2, r3, W2: tl.constexpr, W3: tl.constexpr,
                USE_ASM: tl.constexpr):
    """(1, BN) int32 sums of codes * x over all pieces of the rows."""
    d = _dot_rows(c1, p0, p1, p2, p3, USE_ASM)
    if W2 > 0:
        d += _dot_rows(c2, q0, q1, q2, q3, USE_ASM)
    if W3 > 0:
        d += _dot_rows(c3, r0, r1, r2, r3, USE_ASM)
    return d


@triton.jit
def _gemv_kernel(X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, eps_model, eps_bl,
                 XQ, SX, SUMX, W0, W1, W2, SW, OUT, RES, so_m, sr_m,
                 M, N, K, P, PW, NPROG,
                 PRO: tl.constexpr, EPI: tl.constexpr, HAS_LB: tl.constexpr, BYTE_W: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BLOCK_W: tl.constexpr, PW1: tl.constexpr,
                 PW2: tl.constexpr, PW3: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr,
                 EARLY: tl.constexpr = True):
    """Persistent: program pid of segment seg takes row blocks pid, pid + NPROG, ... of BN whole
    rows, each row held as power-of-two pieces PW1 + PW2 + PW3 >= PW words. Its first block is in
    flight before the prologue (run once per program), with PDL even before the previous kernel
    has finished; each next block is loaded while the current one is reduced.

    BM activation rows (1 or 2): the prologue quantises both rows in one (BM, 4, W, 4) tile (one latency
    chain, not one per row). One row keeps its quantised planes in registers across the row blocks; with two,
    each row's planes are read again (from L1) for each block and multiplied with the same weight registers, so
    every weight byte is read and unpacked once for all rows, and sum(xq) comes from the prologue."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    DT: tl.constexpr = OUT.dtype.element_ty
    Wp = segment_weights(W0, W1, W2, seg)
    sw = tl.load(SW + seg)
    rows = pid * BN + tl.arange(0, BN)
    c1, c2, c3 = _load_pieces(Wp, rows, P, PW, N, BYTE_W, PW1, PW2, PW3)
    if EPI == 2:  # GLU pair: rows n (gate) and N + n (up)
        u1, u2, u3 = _load_pieces(Wp, rows + N, P, PW, 2 * N, BYTE_W, PW1, PW2, PW3)
    rm = tl.arange(0, BM)
    if PRO != 4:
        if PDL and not EARLY:  # programmatic dependent launch: everything above reads weights only
            gdc_wait()
            gdc_launch_dependents()
        first = (pid == 0) & (seg == 0)  # writes the MLGRU state
        # all BM rows in one tile (one latency chain); above one row, sum(xq) too (one reduction for all rows)
        sxv = tl.zeros((BM,), tl.float32) + _quant_row(
            0, seg, X, sxm, G, sgm, S_IN, S_OUT, LB, NW, BWN, XQ, SX, SUMX, K, P, PW, M, eps_model, eps_bl,
            first, PRO, HAS_LB, DT, BLOCK_W, USE_ASM, BM > 1, PDL and EARLY, R=BM)
        tl.debug_barrier()
    else:  # activations already quantised (benchmarks: the weight stream alone)
        if PDL:  # everything above reads weights only
            gdc_wait()
            gdc_launch_dependents()
        sxv = tl.load(SX + seg * M + rm, mask=rm < M, other=1.0)
    xa = XQ + (seg * M * 4) * PW
    if BM == 1:  # the activations: 4 digit planes of words per piece, loop-invariant, and their sum
        a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, suma = _act_row(xa, PW, M, 0, PW1, PW2, PW3,
                                                                                  USE_ASM)
        sumx = tl.zeros((BM,), tl.int32) + suma
    else:  # each row's planes are read again for each row block (from L1); the sums from the prologue
        sumx = tl.load(SUMX + seg * M + rm, mask=rm < M, other=0)
        tl.static_assert(BM == 2, "the GEMV takes one or two rows (GEMV_MAX_ROWS)")
        # each row's sum(xq) and s_x as (1,) operands of its own epilogue (below)
        sumx0 = tl.zeros((1,), tl.int32) + tl.sum(tl.where(rm == 0, sumx, 0))
        sumx1 = tl.zeros((1,), tl.int32) + tl.sum(tl.where(rm == 1, sumx, 0))
        sx0 = tl.zeros((1,), tl.float32) + tl.sum(tl.where(rm == 0, sxv, 0.0))
        sx1 = tl.zeros((1,), tl.float32) + tl.sum(tl.where(rm == 1, sxv, 0.0))
    nblocks = tl.cdiv(N, BN)
    for blk in range(pid, nblocks, NPROG):
        rows = blk * BN + tl.arange(0, BN)
        nxt = rows + NPROG * BN  # masked past the last block: no traffic
        n1, n2, n3 = _load_pieces(Wp, nxt, P, PW, N, BYTE_W, PW1, PW2, PW3)
        if EPI == 2:
            v1, v2, v3 = _load_pieces(Wp, nxt + N, P, PW, 2 * N, BYTE_W, PW1, PW2, PW3)
        if BM == 1:
            d = _dot_pieces(c1, c2, c3, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, PW2, PW3,
                            USE_ASM)
            d2 = d
            if EPI == 2:
                d2 = _dot_pieces(u1, u2, u3, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, PW2, PW3,
                                 USE_ASM)
            _epilogue(d, d2, sumx, sxv, sw, rm, rows, seg, OUT, RES, M, N, so_m, sr_m, EPI, DT, USE_ASM)
        else:  # each row's (1, BN) products through the epilogue on their own, as one row's: merged into a (BM, BN)
            # tile they were converted through shared memory per row and block (Triton 3.6, sm_90a)
            for r in tl.static_range(BM):
                b10, b11, b12, b13, b20, b21, b22, b23, b30, b31, b32, b33, _ = _act_row(
                    xa + r * 4 * PW, PW, M, r, PW1, PW2, PW3, USE_ASM, False)
                d = _dot_pieces(c1, c2, c3, b10, b11, b12, b13, b20, b21, b22, b23, b30, b31, b32, b33, PW2, PW3,
                                USE_ASM)
                d2 = d
                if EPI == 2:
                    d2 = _dot_pieces(u1, u2, u3, b10, b11, b12, b13, b20, b21, b22, b23, b30, b31, b32, b33, PW2, PW3,
                                     USE_ASM)
                if r == 0:
                    sumx_r, sx_r = sumx0, sx0
                else:
                    sumx_r, sx_r = sumx1, sx1
                _epilogue(d, d2, sumx_r, sx_r, sw, r + tl.arange(0, 1), rows, seg, OUT, RES, M, N, so_m, sr_m, EPI, DT,
                          USE_ASM)
        if EPI == 2:
            u1, u2, u3 = v1, v2, v3
        c1, c2, c3 = n1, n2, n3


@triton.jit
def _dot_rows(c, x0, x1, x2, x3, USE_ASM: tl.constexpr):
    """(BN, W) code words . 4 planes of (W,) activation words -> (1, BN) int32 sums of codes * x."""
    acc = _dp4a(c & 0x03030303, x0[None, :], tl.zeros_like(c), USE_ASM)
    acc = _dp4a((c >> 2) & 0x03030303, x1[None, :], acc, USE_ASM)
    acc = _dp4a((c >> 4) & 0x03030303, x2[None, :], acc, USE_ASM)
    acc = _dp4a((c >> 6) & 0x03030303, x3[None, :], acc, USE_ASM)
    return tl.sum(acc, 1)[None, :]


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def words_per_row(k: int) -> int:
    return -(-packed_bytes(k) // 4)


def packed_bytes(k: int) -> int:
    return -(-k // 4)


def weight_operand(packed: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels read: an int32 view of the packed bytes when rows are word aligned."""
    if packed.shape[1] % 4 == 0 and packed.is_contiguous():
        return packed.view(torch.int32)
    return packed


def _operands(weights) -> list:
    """The three weight-segment arguments of the kernel (absent segments repeat the first)."""
    ws = [weight_operand(w) for w in weights]
    return ws + [ws[0]] * (3 - len(ws))


QUANT_MAX_CHUNKS = 16  # most programs one row's quantisation is split over (``_quant_row`` aligns to it)
QUANT_PROGRAMS = 128  # a split row's programs wait for each other: the whole grid must be resident at once


class Scratch:
    """Quantised activations (NSEG, M, 4, PW) int32 words + s_x (NSEG, M) + sum(xq) (NSEG, M)."""

    def __init__(self, nseg: int, m: int, k: int, device):
        self.pw = words_per_row(k)
        self.xq = torch.zeros(nseg, m, 4, self.pw, dtype=torch.int32, device=device)
        self.sx = torch.ones(nseg, m, dtype=torch.float32, device=device)
        self.sumx = torch.zeros(nseg, m, dtype=torch.int32, device=device)
        # a row split over programs (``ternary_gemm.quantize``; only few rows are: a split takes at least two
        # programs per row, and at most QUANT_PROGRAMS in all): partial reductions and barrier counters
        split = nseg * m <= QUANT_PROGRAMS // 2
        self.red = torch.zeros(nseg * m * 4 * QUANT_MAX_CHUNKS if split else 1, dtype=torch.float32, device=device)
        self.ctr = torch.zeros(nseg * m if split else 1, dtype=torch.int32, device=device)
        self.nch = 1  # programs per row of the last pre-pass: above 1, sum(xq) is in parts (``row_sums``)

    def row_sums(self) -> torch.Tensor:
        """sum(xq) per segment and row, (NSEG, M) int32, whether the pre-pass split its rows or not (then
        the NCH int32 parts sit in the fp32 slots RED[seg * M + m, 3, :])."""
        if self.nch == 1:
            return self.sumx
        nseg, m = self.sx.shape
        parts = self.red[:nseg * m * 4 * self.nch].view(nseg * m, 4, self.nch)[:, 3]
        return parts.contiguous().view(torch.int32).sum(-1, dtype=torch.int32).view(nseg, m)


# rows -> (BN, num_warps, programs per SM) candidates; the first is the interpreter's choice
_GEMV_CONFIGS = {
    1: [(8, 4, 2), (8, 8, 1), (4, 4, 2), (8, 4, 4), (16, 8, 1), (16, 8, 2), (4, 4, 4), (4, 8, 2),
        (32, 16, 1), (16, 16, 1), (8, 16, 1), (8, 8, 2), (4, 8, 4)],
    2: [(4, 4, 2), (8, 8, 1), (4, 8, 2), (2, 4, 4), (8, 8, 2)],
}


def _configs(bm: int, pw: int):
    """Candidates whose register tiles fit (BM x BN x row-piece words <= 32 per thread)."""
    w = sum(row_pieces(pw))
    return [(bn, nw, ps) for bn, nw, ps in _GEMV_CONFIGS[bm] if bm * bn * w <= 32 * 32 * nw] or [(1, 8, 2)]


def _bm(m: int) -> int:
    return 1 if m == 1 else 2


_NUM_SM: dict = {}


def _num_sm(device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _NUM_SM:
        _NUM_SM[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _NUM_SM[i]


# Programmatic dependent launch: each GEMV starts streaming its weights while the kernel before it
# finishes (Hopper and later, inside CUDA graphs too). MMF_PDL=0 switches it off.
PDL = os.environ.get("MMF_PDL", "1") != "0"


_PDL_DEVICE: dict = {}


def use_pdl(device) -> bool:
    """Launch with programmatic dependent launch on this device? (Hopper and later; cached per device)"""
    if not (PDL and HAS_GDC and not INTERPRET and device.type == "cuda"):
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _PDL_DEVICE:
        _PDL_DEVICE[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _PDL_DEVICE[i]


# With PDL, the prologue's constant operands (norm weights, lower bound, previous state) are loaded
# before the wait for the previous kernel (``_quant_row``); False waits first.
PARAMS_EARLY = True

PIECE_CAP = 128  # widest piece (words) when a row fits in three such pieces; see row_pieces


def row_pieces(pw: int, cap=None) -> tuple:
    """Split a row of ``pw`` words into up to three power-of-two widths (the last may be padded):
    320 -> (128, 128, 64), 864 -> (512, 256, 128). Register tiles must be powers of two; one tile
    of next_power_of_2(pw) words would leave lanes idle on padding (37.5 % of them for 320). Pieces
    of at most 128 words (4 per lane of one warp) are laid out with whole rows per warp, so their
    row sums need no shared memory and no barrier; rows wider than three such pieces take wider
    ones."""
    cap = PIECE_CAP if cap is None else cap
    if not cap or pw > 3 * cap:
        cap = 1 << 30
    widths = []
    rest = pw
    while rest > 0 and len(widths) < 2:
        w = min(cap, 1 << (rest.bit_length() - 1))
        widths.append(w)
        rest -= w
    if rest > 0:
        widths.append(triton.next_power_of_2(rest))
    if cap < pw and sum(widths) > sum(row_pieces(pw, 0)):  # capping would add padding: 352 words
        return row_pieces(pw, 0)
    return tuple(widths + [0] * (3 - len(widths)))


def _launch_gemv(cfg, a, allow_pdl=True):
    bn, nw, per_sm = cfg
    nblocks = triton.cdiv(a["n"], bn)
    nprog = max(1, min(nblocks, (per_sm * _num_sm(a["out"].device) + a["nseg"] - 1) // a["nseg"]))
    if INTERPRET:
        nprog = min(nblocks, per_sm)
    pdl = allow_pdl and use_pdl(a["out"].device)
    pw1, pw2, pw3 = row_pieces(a["scratch"].pw)
    _gemv_kernel[(nprog, a["nseg"])](
        a["x"], a["sxm"], a["g"], a["sgm"], a["s_in"], a["s_out"], a["lb"], a["nw"], a["bwn"],
        a["eps_model"], a["eps_bl"], a["scratch"].xq, a["scratch"].sx, a["scratch"].sumx,
        a["w"][0], a["w"][1], a["w"][2], a["sw"], a["out"], a["res"], a["so_m"], a["sr_m"],
        a["m"], a["n"], a["k"], a["p"], a["scratch"].pw, nprog,
        PRO=a["pro"], EPI=a["epi"], HAS_LB=a["has_lb"], BYTE_W=a["byte_w"], BM=_bm(a["m"]), BN=bn,
        BLOCK_W=triton.next_power_of_2(a["scratch"].pw), PW1=pw1, PW2=pw2, PW3=pw3, USE_ASM=not INTERPRET,
        PDL=pdl, EARLY=PARAMS_EARLY, num_warps=nw, **({"launch_pdl": True} if pdl else {}))


_TUNED: dict = {}
_RANKING: dict = {}  # key -> the candidates the tuner timed, fastest first
TUNE = True  # False: take the first candidate (no timing runs)
_SEEN = None  # a set while a caller records which shapes its launches use (``record_keys``)


class record_keys:
    """``with record_keys() as keys:``: the tuning keys of every GEMV launched inside."""

    def __enter__(self):
        global _SEEN
        self.keys, _SEEN = set(), set()
        return self.keys

    def __exit__(self, *exc):
        global _SEEN
        self.keys |= _SEEN
        _SEEN = None


def refine_schedules(keys, measure, top: int = 3, margin: float = 0.01):
    """Re-rank each shape's schedules by a measurement of the whole program that launches them.

    The tuner times a shape's candidates in a chain of that shape alone; in a decode step the
    neighbours differ, and so can the best schedule. For each key (in order), its next ``top - 1``
    candidates by the tuner's ranking replace the chosen one in turn; ``measure()`` (ms of the
    whole step, rebuilt with the current choices) decides, and a candidate is kept only if it is
    faster by more than ``margin``. Returns [(key, schedule before, schedule after, ms before, ms after)]."""
    changes = []
    base = measure()
    for key in keys:
        before, ms_before = _TUNED[key], base
        for cfg in [c for c in _RANKING.get(key, [])[:top] if c != before]:
            kept = _TUNED[key]
            _TUNED[key] = cfg
            t = measure()
            if t < base * (1 - margin):
                base = t
            else:
                _TUNED[key] = kept
        changes.append((key, before, _TUNED[key], ms_before, base))
    return changes


def event_times(fn, runs: int, per: int = 1) -> list:
    """ms per call of ``fn`` (GPU time between CUDA events) in each of ``runs`` runs of ``per`` calls;
    the callers pick their statistic (the best run, the median)."""
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return times


def chain_launches(nbytes: int) -> int:
    """Launches in a timing chain of a kernel reading ``nbytes`` of weights: about 128 MiB in all, 8-64."""
    return max(8, min(64, -(-(128 << 20) // max(1, nbytes))))


def chain_ms(fns: list) -> float:
    """ms per call of ``fns`` (launches, e.g. over distinct weights) captured back to back in one CUDA graph:
    the median of 5 replays, divided by the number of calls."""
    fns[0]()  # compile, warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = event_times(graph.replay, 5)
    del graph
    return sorted(times)[2] / len(fns)


def _chain_time(cfg, a, pool) -> float:
    """ms per launch of ``cfg`` in a CUDA graph of back-to-back launches that cycle through ``pool``
    (distinct weights of the same shape, e.g. every layer's: no L2 reuse), with programmatic
    dependent launch where the decoder uses it: the setting the decoder runs in. Timing single
    launches after an L2 flush (do_bench) ranks schedules by noise of the order of their
    differences (measured: 13b decode 2.26 vs 2.35 ms/token from two such tunings of one build,
    ``bench/results/EXPERIMENTS.md``)."""
    launches = chain_launches(a["n"] * a["p"] * a["nseg"])
    return chain_ms([lambda w=pool[i % len(pool)]: _launch_gemv(cfg, dict(a, w=w)) for i in range(launches)])


def _tune(key, a, pool=None):
    """Pick the fastest config once per shape (GPU only; tuning runs are side-effect free).

    With a ``pool`` of at least two weight sets of this shape, candidates are timed as the decoder
    runs them (``_chain_time``); otherwise one launch at a time after an L2 flush."""
    if key in _TUNED:
        return _TUNED[key]
    cands = _configs(_bm(a["m"]), a["scratch"].pw)
    if INTERPRET or not TUNE or not a["out"].is_cuda or torch.cuda.is_current_stream_capturing():
        _TUNED[key] = cands[0]
        return cands[0]

    def time_of(cfg):
        if pool is not None and len(pool) >= 2:
            return _chain_time(cfg, a, pool)
        # without PDL: a PDL launch overlaps do_bench's cache-flush kernel and its timing events, which
        # ranks schedules by how much they overlap instead of by their own time
        return triton.testing.do_bench(lambda: _launch_gemv(cfg, a, allow_pdl=False), warmup=5, rep=20,
                                       return_mode="median")

    # a schedule read back was tuned (and refined) by an earlier process for this GPU, software and kernel
    best, ranking = schedule_cache.pick("gemv", key, a["out"].device, __file__, cands, time_of)
    _TUNED[key] = best
    if ranking:
        _RANKING[key] = ranking
    return best


def store_schedules(keys, device) -> None:
    """Keep the current schedules of ``keys`` (e.g. after ``refine_schedules``) in the on-disk cache."""
    if device.type == "cuda" and not INTERPRET:
        schedule_cache.store("gemv", {k: _TUNED[k] for k in keys if k in _TUNED},
                             schedule_cache.context(device, __file__))


def gemv(x, weights, scales, bit_norm, out, *, pro=PRO_PLAIN, epi=EPI_STORE, k=None, n=None,
         norm_weight=None, g=None, s_in=None, s_out=None, lower_bound=None, residual=None,
         eps_model=1e-6, eps_bl=reference.BITLINEAR_NORM_EPS, scratch=None, config=None, tune_pool=None):
    """Launch the fused GEMV: ``out`` (M, NSEG*N) or (M, N) for the GLU pair.

    ``weights``: list of 1-3 packed tensors (N, P) uint8 (or their int32 views), one per segment;
    ``scales``: fp32 (NSEG,) s_w; ``bit_norm``: (NSEG, K) BitLinear norm weights.
    ``x``: (M, K) input (for PRO_MLGRU, (M, 3K) = [i_pre | f_pre | g_pre]); ``g``/``s_in`` the
    gated-norm inputs; ``norm_weight`` the block norm (PRO_NORM) or g_norm (PRO_GATED/PRO_MLGRU).
    ``tune_pool``: other weight lists of the same shapes (e.g. the other layers'), for the first
    call's schedule timing (see ``_tune``); never read otherwise.
    """
    m = out.shape[0]
    nseg = len(weights)
    k = k if k is not None else bit_norm.shape[-1]
    p = packed_bytes(k)
    n0 = weights[0].shape[0]
    n = n if n is not None else (n0 // 2 if epi == EPI_GLU else n0)
    assert m <= GEMV_MAX_ROWS, f"gemv handles at most {GEMV_MAX_ROWS} rows; use ternary_gemm"
    ws = _operands(weights)
    byte_w = ws[0].dtype != torch.int32
    scratch = scratch if scratch is not None else Scratch(nseg, m, k, x.device)
    dummy = out
    a = dict(x=x, sxm=x.stride(0), g=g if g is not None else dummy, sgm=g.stride(0) if g is not None else 0,
             s_in=s_in if s_in is not None else dummy, s_out=s_out if s_out is not None else dummy,
             lb=lower_bound if lower_bound is not None else dummy, nw=norm_weight if norm_weight is not None else bit_norm,
             bwn=bit_norm, eps_model=float(eps_model), eps_bl=float(eps_bl), scratch=scratch, w=ws, sw=scales,
             out=out, res=residual if residual is not None else dummy, so_m=out.stride(0),
             sr_m=residual.stride(0) if residual is not None else 0, m=m, n=n, k=k, p=p, nseg=nseg, pro=pro,
             epi=epi, has_lb=lower_bound is not None, byte_w=byte_w)
    key = ("gemv", m, n, k, nseg, pro, epi, byte_w, str(out.dtype))
    if _SEEN is not None:
        _SEEN.add(key)
    if INTERPRET and config is None:  # two programs, each looping over several row blocks
        config = (8, 4, 2)
    pool = [_operands(w) for w in tune_pool] if tune_pool is not None and key not in _TUNED else None
    cfg = config or _tune(key, a, pool)
    _launch_gemv(cfg, a)
    return out
