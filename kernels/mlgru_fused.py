"""Fused MLGRU over a sequence (Triton): gates + recurrence, forward and backward, fp32 state.

(Named ``mlgru_fused`` rather than ``mlgru_scan``: a submodule of that name would replace the
dispatching function ``mmf.kernels.mlgru_scan`` on the package once imported.)

``mlgru_fused(i_pre, f_pre, lower_bound, state)`` computes, over dim 1 of (B, T, D) inputs,

    f_t = lb + (1 - lb) * sigmoid(f_pre_t)       (f_t = sigmoid(f_pre_t) without a lower bound)
    i_t = silu(i_pre_t) * (1 - f_t)
    s_t = f_t * s_{t-1} + i_t                     (s_{-1} = state, or 0)

and returns (all states (B, T, D) in ``out_dtype`` (default i_pre's dtype), last state (B, D) fp32):
the composition ``reference.mlgru_scan(*reference.mlgru_gates(i_pre, f_pre, lb), state)``
(``mlgru_fused_ref`` below), except that the states come back in i_pre's dtype.

Each program owns one batch row and a block of channels and walks the sequence in chunks of
BLOCK_T steps; inside a chunk the recurrence is a parallel associative scan over
(a, b) pairs, (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2). The gate tensors are never stored:
only the fp32 state at each chunk boundary (T / BLOCK_T per row, a few percent of one
activation) is kept, and backward recomputes the gates and the fp32 states from the inputs:

    g_t = ds_t + f_{t+1} g_{t+1}   (g_{T-1} also gets the last state's gradient; reverse scan)
    di_t = g_t,  df_t = g_t s_{t-1} - di_t silu(i_pre_t),  d state = f_0 g_0
    d i_pre = di (1 - f) silu'(i_pre),  d f_pre = df (1 - lb) sig (1 - sig),  d lb = sum df (1 - sig)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference


@triton.jit
def _lin_comb(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _gates(ip, fp, lb, HAS_LB: tl.constexpr, GATES: tl.constexpr):
    if GATES:
        sig = tl.sigmoid(fp)
        if HAS_LB:
            f = lb + (1.0 - lb) * sig
        else:
            f = sig
        si = tl.sigmoid(ip)
        i = ip * si * (1.0 - f)
    else:  # plain scan: the inputs already are i and f
        i = ip
        f = fp
        sig = fp
        si = fp
    return i, f, sig, si


@triton.jit
def _row_or_zeros(PTR, offs, mask, HAS: tl.constexpr):
    """fp32 values at PTR + offs, or zeros when the tensor is absent."""
    v = tl.zeros(offs.shape, dtype=tl.float32)
    if HAS:
        v = tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _scan_program(LB, D, HAS_LB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence b, its BLOCK_D channels (and their mask), the time offsets of a
    chunk, and the channels' lower bounds (fp32; zeros without them)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    return b, cols, cm, tl.arange(0, BLOCK_T), _row_or_zeros(LB, cols, cm, HAS_LB)


@triton.jit
def _mlgru_fwd_kernel(IP, FP, LB, H0, S, HT, CK, T, D, NC,
                      HAS_LB: tl.constexpr, HAS_H0: tl.constexpr, GATES: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b, cols, cm, rows, lb = _scan_program(LB, D, HAS_LB, BLOCK_T, BLOCK_D)
    h = _row_or_zeros(H0, b * D + cols, cm, HAS_H0)
    base = b * T * D
    for c in range(0, NC):
        tl.store(CK + (b * NC + c) * D + cols, h, mask=cm)
        t = c * BLOCK_T + rows
        m = (t < T)[:, None] & cm[None, :]
        offs = base + t[:, None].to(tl.int64) * D + cols[None, :]
        ip = tl.load(IP + offs, mask=m, other=0.0).to(tl.float32)
        fp = tl.load(FP + offs, mask=m, other=0.0).to(tl.float32)
        i, f, _, _ = _gates(ip, fp, lb[None, :], HAS_LB, GATES)
        f = tl.where(m, f, 1.0)
        i = tl.where(m, i, 0.0)
        a, bb = tl.associative_scan((f, i), 0, _lin_comb)
        s = bb + a * h[None, :]
        tl.store(S + offs, s.to(S.dtype.element_ty), mask=m)
        h = tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], s, 0.0), axis=0)
    tl.store(HT + b * D + cols, h, mask=cm)


@triton.jit
def _mlgru_bwd_kernel(IP, FP, LB, CK, DS, DHT, DIP, DFP, DLB, DH0, T, D, NC,
                      HAS_LB: tl.constexpr, HAS_DHT: tl.constexpr, GATES: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b, cols, cm, rows, lb = _scan_program(LB, D, HAS_LB, BLOCK_T, BLOCK_D)
    g_carry = _row_or_zeros(DHT, b * D + cols, cm, HAS_DHT)
    dlb = tl.zeros([BLOCK_D], dtype=tl.float32)
    dh0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = b * T * D
    for cc in range(0, NC):
        c = NC - 1 - cc
        h = tl.load(CK + (b * NC + c) * D + cols, mask=cm, other=0.0)
        t = c * BLOCK_T + rows
        m = (t < T)[:, None] & cm[None, :]
        offs = base + t[:, None].to(tl.int64) * D + cols[None, :]
        ip = tl.load(IP + offs, mask=m, other=0.0).to(tl.float32)
        fp = tl.load(FP + offs, mask=m, other=0.0).to(tl.float32)
        i, f, sig, si = _gates(ip, fp, lb[None, :], HAS_LB, GATES)
        # states before each step: inclusive scan of the inputs shifted by one inside the chunk
        mp = m & (rows > 0)[:, None]
        ipp = tl.load(IP + offs - D, mask=mp, other=0.0).to(tl.float32)
        fpp = tl.load(FP + offs - D, mask=mp, other=0.0).to(tl.float32)
        i_p, f_p, _, _ = _gates(ipp, fpp, lb[None, :], HAS_LB, GATES)
        f_p = tl.where(mp, f_p, 1.0)
        i_p = tl.where(mp, i_p, 0.0)
        ap, bp = tl.associative_scan((f_p, i_p), 0, _lin_comb)
        s_prev = bp + ap * h[None, :]
        # f_{t+1} (1 past the end: the last state's gradient enters through g_carry)
        mn = ((t + 1) < T)[:, None] & cm[None, :]
        fpn = tl.load(FP + offs + D, mask=mn, other=0.0).to(tl.float32)
        _, f_n, _, _ = _gates(fpn, fpn, lb[None, :], HAS_LB, GATES)
        f_n = tl.where(mn, f_n, 1.0)
        ds = tl.load(DS + offs, mask=m, other=0.0).to(tl.float32)
        ga, gb = tl.associative_scan((f_n, ds), 0, _lin_comb, reverse=True)
        g = gb + ga * g_carry[None, :]
        g = tl.where(m, g, 0.0)
        g_carry = tl.sum(tl.where((rows == 0)[:, None], g, 0.0), axis=0)
        dh0 = tl.sum(tl.where((rows == 0)[:, None], g * f, 0.0), axis=0)
        if GATES:
            silu = ip * si
            dip = g * (1.0 - f) * (si * (1.0 + ip * (1.0 - si)))
            df = g * s_prev - g * silu
            if HAS_LB:
                dsig = df * (1.0 - lb[None, :])
                dlb += tl.sum(df * (1.0 - sig), axis=0)
            else:
                dsig = df
            dfp = dsig * sig * (1.0 - sig)
        else:
            dip = g
            dfp = g * s_prev
        tl.store(DIP + offs, dip.to(DIP.dtype.element_ty), mask=m)
        tl.store(DFP + offs, dfp.to(DFP.dtype.element_ty), mask=m)
    tl.store(DH0 + b * D + cols, dh0, mask=cm)
    if HAS_LB:
        tl.store(DLB + b * D + cols, dlb, mask=cm)


CHUNK_T = 64  # time steps per chunk (one associative scan in registers)


def _block_d(d: int, device) -> int:
    return 32 if device.type == "cuda" else min(16, triton.next_power_of_2(d))


class _MLGRUFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i_pre, f_pre, lower_bound, state, out_dtype, gates):
        B, T, D = i_pre.shape
        ip = i_pre.contiguous()
        fp = f_pre.contiguous()
        dev = ip.device
        bt = CHUNK_T if dev.type == "cuda" else min(CHUNK_T, triton.next_power_of_2(max(T, 2)))
        nc = triton.cdiv(T, bt) if T else 0
        s = torch.empty(B, T, D, dtype=out_dtype, device=dev)
        last = torch.empty(B, D, dtype=torch.float32, device=dev)
        ck = torch.empty(B, max(nc, 1), D, dtype=torch.float32, device=dev)
        lb = lower_bound.contiguous() if lower_bound is not None else None
        h0 = state.contiguous() if state is not None else None
        bd = _block_d(D, dev)
        if B and D:
            _mlgru_fwd_kernel[(B, triton.cdiv(D, bd))](
                ip, fp, lb if lb is not None else ip, h0 if h0 is not None else ip, s, last, ck, T, D, nc,
                HAS_LB=lb is not None, HAS_H0=h0 is not None, GATES=gates, BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
        ctx.save_for_backward(ip, fp, lb, ck)
        ctx.gates = gates
        ctx.meta = (bt, nc, bd, h0 is not None, state.dtype if state is not None else None)
        return s, last

    @staticmethod
    def backward(ctx, ds, dlast):
        ip, fp, lb, ck = ctx.saved_tensors
        bt, nc, bd, has_h0, state_dtype = ctx.meta
        B, T, D = ip.shape
        dev = ip.device
        ds = ds.contiguous() if ds is not None else torch.zeros(B, T, D, dtype=ip.dtype, device=dev)
        dip = torch.empty_like(ip)
        dfp = torch.empty_like(fp)
        dlb = torch.empty(B, D, dtype=torch.float32, device=dev) if lb is not None else None
        dh0 = torch.empty(B, D, dtype=torch.float32, device=dev)
        if B and D:
            _mlgru_bwd_kernel[(B, triton.cdiv(D, bd))](
                ip, fp, lb if lb is not None else ip, ck, ds, dlast.contiguous() if dlast is not None else ip,
                dip, dfp, dlb if dlb is not None else dh0, dh0, T, D, nc,
                HAS_LB=lb is not None, HAS_DHT=dlast is not None, GATES=ctx.gates, BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
        dlb_out = dlb.sum(0).to(lb.dtype) if lb is not None and ctx.needs_input_grad[2] else None
        dh0_out = dh0.to(state_dtype) if has_h0 and ctx.needs_input_grad[3] else None
        return dip, dfp, dlb_out, dh0_out, None, None


def mlgru_fused(i_pre, f_pre, lower_bound=None, state=None, out_dtype=None):
    """Gates + recurrence in one Triton pass (see the module docstring); returns (states, last)."""
    return _MLGRUFused.apply(i_pre, f_pre, lower_bound, state, out_dtype or i_pre.dtype, True)


def mlgru_scan_fused(i, f, state=None):
    """Triton twin of ``reference.mlgru_scan``: the recurrence alone, gates given (states in i's dtype)."""
    return _MLGRUFused.apply(i, f, None, state, i.dtype, False)


def mlgru_fused_ref(i_pre, f_pre, lower_bound=None, state=None):
    """The plain-torch composition ``mlgru_fused`` must match (states in fp32 here)."""
    i, f = reference.mlgru_gates(i_pre, f_pre, lower_bound)
    return reference.mlgru_scan(i, f, state)
