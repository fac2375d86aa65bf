"""The MLGRU token mixer at inference (Triton): one decode step fused, and the gated scan for prefill.

``mlgru_step(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps)`` does, in one kernel
(one program per batch row, the whole hidden size in registers):

    f = sigmoid(f_pre);  f = lb + (1 - lb) f   (with a lower bound)
    i = silu(i_pre) (1 - f)
    s = f state + i                             (fp32)
    o = rmsnorm(g_pre) * g_norm_weight * silu(s)   -> in g_pre's dtype

and returns ``(o, s)``: the composition ``reference.mlgru_gates`` + ``reference.mlgru_scan`` (T = 1)
+ ``reference.gated_rms_norm`` (``mlgru_step_ref`` in reference.py).

``mlgru_gated_scan(i_pre, f_pre, lower_bound, state)`` runs the gates and the recurrence over a
(B, T, D) sequence (chunks of steps, each an associative scan, in parallel over sequences, chunks and
channel blocks, then joined by a short walk over the chunks) and returns all fp32 states (B, T, D) and
the last (B, D): ``reference.mlgru_scan(*reference.mlgru_gates(...))``.
Inputs may be column slices of a wider tensor (the fused i/f/g projection output). The gated norm
of the prefill path is fused into the o-projection's pre-pass (``ternary_gemm.quantize``,
``PRO_GATED``); the decode path of ``mmf.decode_graph`` fuses the whole step into the
o-projection GEMV's prologue (``ternary_gemv.PRO_MLGRU``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ternary_gemv import INTERPRET, _mlgru_gates, _silu, _to


@triton.jit
def _step_kernel(IP, FP, GP, S_IN, S_OUT, LB, GW, O, D, s_ip, s_fp, s_gp, eps,
                 HAS_LB: tl.constexpr, BLOCK: tl.constexpr, USE_ASM: tl.constexpr):
    b = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    mask = k < D
    ip = tl.load(IP + b * s_ip + k, mask=mask, other=0.0).to(tl.float32)
    fp = tl.load(FP + b * s_fp + k, mask=mask, other=0.0).to(tl.float32)
    gp = tl.load(GP + b * s_gp + k, mask=mask, other=0.0).to(tl.float32)
    lb = 0.0
    if HAS_LB:
        lb = tl.load(LB + k, mask=mask, other=0.0).to(tl.float32)
    f, i = _mlgru_gates(ip, fp, lb, HAS_LB)
    s = f * tl.load(S_IN + b * D + k, mask=mask, other=0.0) + i
    tl.store(S_OUT + b * D + k, s, mask=mask)
    r = 1.0 / tl.sqrt(tl.sum(gp * gp, 0) / D + eps)
    gw = tl.load(GW + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + b * D + k, _to(gp * r * gw * _silu(s), O.dtype.element_ty, USE_ASM), mask=mask)


def mlgru_step(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps, out_state=None):
    """(B, D) pre-activations + fp32 state -> (o in g_pre's dtype, new fp32 state)."""
    B, D = g_pre.shape
    o = torch.empty(B, D, dtype=g_pre.dtype, device=g_pre.device)
    s_in = state.float().contiguous() if state is not None else torch.zeros(B, D, device=g_pre.device)
    s_out = out_state if out_state is not None else torch.empty(B, D, dtype=torch.float32, device=g_pre.device)
    block = triton.next_power_of_2(D)
    lb = lower_bound.float().contiguous() if lower_bound is not None else s_in
    _step_kernel[(B,)](i_pre, f_pre, g_pre, s_in, s_out, lb, g_norm_weight, o, D, i_pre.stride(0),
                       f_pre.stride(0), g_pre.stride(0), float(eps), HAS_LB=lower_bound is not None,
                       BLOCK=block, USE_ASM=not INTERPRET, num_warps=8 if block >= 4096 else 4)
    return o, s_out


@triton.jit
def _lin(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _initial_state(S0, b, D, k, mask, HAS_S0: tl.constexpr, BD: tl.constexpr):
    """Sequence b's state before the first step on channels k (fp32), or zeros."""
    if HAS_S0:
        s = tl.load(S0 + b * D + k, mask=mask, other=0.0)
    else:
        s = tl.zeros((BD,), tl.float32)
    return s


@triton.jit
def _scan_kernel(IP, FP, S0, LB, S, HT, T, D, s_b, s_t, HAS_LB: tl.constexpr, HAS_S0: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr):
    """Chunks of BT steps: gates for the whole chunk at once, the recurrence as an associative
    scan over (f, i) pairs inside the chunk, carried across chunks."""
    b = tl.program_id(0)
    k = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = k < D
    s = _initial_state(S0, b, D, k, mask, HAS_S0, BD)
    lb = 0.0
    if HAS_LB:
        lb = tl.load(LB + k, mask=mask, other=0.0)[None, :]
    tt = tl.arange(0, BT)
    for t0 in range(0, T, BT):
        t = t0 + tt
        m2 = (t < T)[:, None] & mask[None, :]
        off = b * s_b + t[:, None] * s_t + k[None, :]
        f, i = _mlgru_gates(tl.load(IP + off, mask=m2, other=0.0).to(tl.float32),
                            tl.load(FP + off, mask=m2, other=0.0).to(tl.float32), lb, HAS_LB)
        fa, ib = tl.associative_scan((f, i), 0, _lin)
        st = fa * s[None, :] + ib
        tl.store(S + (b * T + t[:, None]) * D + k[None, :], st, mask=m2)
        s = tl.sum(tl.where(t[:, None] == tl.minimum(t0 + BT, T) - 1, st, 0.0), 0)
    tl.store(HT + b * D + k, s, mask=mask)


@triton.jit
def _chunk_scan(IP, FP, LB, b, c, T, D, s_b, s_t, HAS_LB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Gates of chunk c (steps c*BT ..) of sequence b for this program's BD channels, and their inclusive
    associative scan over (f, i) pairs: state after step t = fa[t] * (state before the chunk) + ib[t].
    Steps past T hold the identity pair (f = 1, i = 0), so the last row is the whole chunk's transfer."""
    k = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = k < D
    t = c * BT + tl.arange(0, BT)
    m2 = (t < T)[:, None] & mask[None, :]
    off = b.to(tl.int64) * s_b + t[:, None].to(tl.int64) * s_t + k[None, :]
    lb = 0.0
    if HAS_LB:
        lb = tl.load(LB + k, mask=mask, other=0.0)[None, :]
    f, i = _mlgru_gates(tl.load(IP + off, mask=m2, other=0.0).to(tl.float32),
                        tl.load(FP + off, mask=m2, other=0.0).to(tl.float32), lb, HAS_LB)
    fa, ib = tl.associative_scan((tl.where(m2, f, 1.0), tl.where(m2, i, 0.0)), 0, _lin)
    return fa, ib, t, k, mask, m2


@triton.jit
def _scan_sum_kernel(IP, FP, LB, A, BV, T, D, NC, s_b, s_t, HAS_LB: tl.constexpr, BT: tl.constexpr,
                     BD: tl.constexpr):
    """Chunked pass 1, one program per (sequence, chunk, channel block): the chunk's transfer, the last
    row of its scan: state after the chunk = A * state before + BV."""
    b = tl.program_id(0) // NC
    c = tl.program_id(0) % NC
    fa, ib, t, k, mask, m2 = _chunk_scan(IP, FP, LB, b, c, T, D, s_b, s_t, HAS_LB, BT, BD)
    last = (tl.arange(0, BT) == BT - 1)[:, None]
    slot = (b * NC + c) * D + k
    tl.store(A + slot, tl.sum(tl.where(last, fa, 0.0), 0), mask=mask)
    tl.store(BV + slot, tl.sum(tl.where(last, ib, 0.0), 0), mask=mask)


@triton.jit
def _scan_carry_kernel(A, BV, S0, HT, D, NC, HAS_S0: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """Chunked pass 2, one program per (sequence, channel block): the chunk transfers BC at a time, each
    block an associative scan carried into the next; A is overwritten with the state after each chunk,
    HT gets the last state."""
    b = tl.program_id(0)
    k = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = k < D
    s = _initial_state(S0, b, D, k, mask, HAS_S0, BD)
    cc = tl.arange(0, BC)
    for c0 in range(0, NC, BC):
        m2 = (c0 + cc < NC)[:, None] & mask[None, :]
        slot = (b * NC + c0 + cc)[:, None] * D + k[None, :]
        pa, pb = tl.associative_scan((tl.load(A + slot, mask=m2, other=1.0), tl.load(BV + slot, mask=m2, other=0.0)),
                                     0, _lin)
        st = pa * s[None, :] + pb
        tl.store(A + slot, st, mask=m2)
        s = tl.sum(tl.where((cc == BC - 1)[:, None], st, 0.0), 0)  # rows past NC are the identity
    tl.store(HT + b * D + k, s, mask=mask)


@triton.jit
def _scan_apply_kernel(IP, FP, LB, A, S0, S, T, D, NC, s_b, s_t, HAS_LB: tl.constexpr, HAS_S0: tl.constexpr,
                       BT: tl.constexpr, BD: tl.constexpr):
    """Chunked pass 3, as pass 1: the chunk's scan again, from the state after the chunk before (A, or
    the initial state), to every step."""
    b = tl.program_id(0) // NC
    c = tl.program_id(0) % NC
    fa, ib, t, k, mask, m2 = _chunk_scan(IP, FP, LB, b, c, T, D, s_b, s_t, HAS_LB, BT, BD)
    cv = tl.zeros_like(k) + c  # a tensor: NC = 1 makes c a constant
    h = tl.load(A + (b * NC + c - 1) * D + k, mask=mask & (cv > 0), other=0.0)
    if HAS_S0:
        h = tl.where(cv > 0, h, tl.load(S0 + b * D + k, mask=mask & (cv == 0), other=0.0))
    tl.store(S + (b.to(tl.int64) * T + t[:, None]) * D + k[None, :], fa * h[None, :] + ib, mask=m2)


# Chunked form: steps per chunk (an associative scan in registers), chunk transfers per block of the carry
# pass, channels per program; the interpreter takes short chunks, so that its tests cross several.
SCAN_BT = 8 if INTERPRET else 64
SCAN_BC = 4 if INTERPRET else 64
SCAN_BD = 64
# The single pass (one program per sequence and channel block walks the whole sequence) for prompts shorter
# than this. Measured in one H200 run (ms per scan, single / chunked; bench/results/EXPERIMENTS.md): 1 x 8192
# x 2048 1.086 / 0.197, 1 x 2048 x 5120 0.316 / 0.148, 4 x 2048 x 2048 0.299 / 0.171; 4 x 512 x 5120 0.116 /
# 0.128, 16 x 512 x 2048 0.128 / 0.177, 1 x 512 x 2048 0.088 / 0.085, 16 x 128 x 5120 0.106 / 0.137, 1 x 128 x
# 5120 0.046 / 0.086 (1024 itself was not measured; the chunk length, 32, 64 or 128, made no difference)
SCAN_CHUNKED_MIN_T = 1024


def scan_chunked(T: int) -> bool:
    """Does ``mlgru_gated_scan`` take the chunked form for T steps? (In the interpreter from two chunks
    on, so that the tests of its callers run the chunked form too.)"""
    return T >= SCAN_CHUNKED_MIN_T or (INTERPRET and T > SCAN_BT)


def mlgru_gated_scan(i_pre, f_pre, lower_bound=None, state=None, chunked=None):
    """(B, T, D) pre-activations (same strides; may be slices) -> (states (B, T, D) fp32, last (B, D)).

    Short prompts: one pass, each program walking the whole sequence of one channel block in chunks.
    Long ones (``scan_chunked``; ``chunked`` forces a form): three passes, parallel over chunks of the
    sequence: each chunk's transfer (its product of f and its state from zero), the state after each chunk
    (a scan over the chunk transfers), then each chunk's states. (The single pass left the GPU nearly idle
    on one long prompt: 32 programs at 1.3b x 8192 tokens, 24.7 of a 55 ms prefill.)"""
    B, T, D = i_pre.shape
    assert f_pre.stride() == i_pre.stride() and i_pre.stride(2) == 1
    dev = i_pre.device
    S = torch.empty(B, T, D, dtype=torch.float32, device=dev)
    HT = torch.empty(B, D, dtype=torch.float32, device=dev)
    if B == 0 or D == 0:
        return S, HT
    s0 = state.float().contiguous() if state is not None else HT
    lb = lower_bound.float().contiguous() if lower_bound is not None else HT
    strides = (i_pre.stride(0), i_pre.stride(1))
    has = dict(HAS_LB=lower_bound is not None)
    if not (scan_chunked(T) if chunked is None else chunked) or T == 0:
        bd = min(triton.next_power_of_2(D), 64)
        bt = min(triton.next_power_of_2(max(T, 1)), 16)
        _scan_kernel[(B, triton.cdiv(D, bd))](i_pre, f_pre, s0, lb, S, HT, T, D, *strides, **has,
                                              HAS_S0=state is not None, BT=bt, BD=bd, num_warps=4)
        return S, HT
    bt = min(triton.next_power_of_2(T), SCAN_BT)
    bd = min(triton.next_power_of_2(D), SCAN_BD)
    nc, nd = triton.cdiv(T, bt), triton.cdiv(D, bd)
    A = torch.empty(B, nc, D, dtype=torch.float32, device=dev)
    BV = torch.empty_like(A)
    _scan_sum_kernel[(B * nc, nd)](i_pre, f_pre, lb, A, BV, T, D, nc, *strides, **has, BT=bt, BD=bd, num_warps=4)
    _scan_carry_kernel[(B, nd)](A, BV, s0, HT, D, nc, HAS_S0=state is not None, BC=SCAN_BC, BD=bd, num_warps=4)
    _scan_apply_kernel[(B * nc, nd)](i_pre, f_pre, lb, A, s0, S, T, D, nc, *strides, **has,
                                     HAS_S0=state is not None, BT=bt, BD=bd, num_warps=4)
    return S, HT
