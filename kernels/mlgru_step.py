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
(B, T, D) sequence (programs over batch rows and channel blocks; chunks of steps, each an associative scan) and returns all
fp32 states (B, T, D) and the last (B, D): ``reference.mlgru_scan(*reference.mlgru_gates(...))``.
Inputs may be column slices of a wider tensor (the fused i/f/g projection output). The gated norm
of the prefill path is fused into the o-projection's pre-pass (``ternary_gemm.quantize``,
``PRO_GATED``); the decode path of ``mmf.decode_graph`` fuses the whole step into the
o-projection GEMV's prologue (``ternary_gemv.PRO_MLGRU``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ternary_gemv import INTERPRET, _silu, _to


@triton.jit
def _step_kernel(IP, FP, GP, S_IN, S_OUT, LB, GW, O, D, s_ip, s_fp, s_gp, eps,
                 HAS_LB: tl.constexpr, BLOCK: tl.constexpr, USE_ASM: tl.constexpr):
    b = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    mask = k < D
    ip = tl.load(IP + b * s_ip + k, mask=mask, other=0.0).to(tl.float32)
    fp = tl.load(FP + b * s_fp + k, mask=mask, other=0.0).to(tl.float32)
    gp = tl.load(GP + b * s_gp + k, mask=mask, other=0.0).to(tl.float32)
    f = tl.sigmoid(fp)
    if HAS_LB:
        lb = tl.load(LB + k, mask=mask, other=0.0).to(tl.float32)
        f = lb + (1.0 - lb) * f
    s = f * tl.load(S_IN + b * D + k, mask=mask, other=0.0) + _silu(ip) * (1.0 - f)
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
def _scan_kernel(IP, FP, S0, LB, S, HT, T, D, s_b, s_t, HAS_LB: tl.constexpr, HAS_S0: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr):
    """Chunks of BT steps: gates for the whole chunk at once, the recurrence as an associative
    scan over (f, i) pairs inside the chunk, carried across chunks."""
    b = tl.program_id(0)
    k = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = k < D
    if HAS_S0:
        s = tl.load(S0 + b * D + k, mask=mask, other=0.0)
    else:
        s = tl.zeros((BD,), tl.float32)
    if HAS_LB:
        lb = tl.load(LB + k, mask=mask, other=0.0)[None, :]
    tt = tl.arange(0, BT)
    for t0 in range(0, T, BT):
        t = t0 + tt
        m2 = (t < T)[:, None] & mask[None, :]
        off = b * s_b + t[:, None] * s_t + k[None, :]
        ip = tl.load(IP + off, mask=m2, other=0.0).to(tl.float32)
        f = tl.sigmoid(tl.load(FP + off, mask=m2, other=0.0).to(tl.float32))
        if HAS_LB:
            f = lb + (1.0 - lb) * f
        i = _silu(ip) * (1.0 - f)
        fa, ib = tl.associative_scan((f, i), 0, _lin)
        st = fa * s[None, :] + ib
        tl.store(S + (b * T + t[:, None]) * D + k[None, :], st, mask=m2)
        s = tl.sum(tl.where(t[:, None] == tl.minimum(t0 + BT, T) - 1, st, 0.0), 0)
    tl.store(HT + b * D + k, s, mask=mask)


def mlgru_gated_scan(i_pre, f_pre, lower_bound=None, state=None):
    """(B, T, D) pre-activations (same strides; may be slices) -> (states (B, T, D) fp32, last (B, D))."""
    B, T, D = i_pre.shape
    assert f_pre.stride() == i_pre.stride() and i_pre.stride(2) == 1
    S = torch.empty(B, T, D, dtype=torch.float32, device=i_pre.device)
    HT = torch.empty(B, D, dtype=torch.float32, device=i_pre.device)
    bd = min(triton.next_power_of_2(D), 64)
    bt = min(triton.next_power_of_2(T), 16)
    s0 = state.float().contiguous() if state is not None else HT
    lb = lower_bound.float().contiguous() if lower_bound is not None else HT
    _scan_kernel[(B, triton.cdiv(D, bd))](i_pre, f_pre, s0, lb, S, HT, T, D, i_pre.stride(0), i_pre.stride(1),
                                          HAS_LB=lower_bound is not None, HAS_S0=state is not None, BT=bt,
                                          BD=bd, num_warps=4)
    return S, HT
