"""Fused BitLinear for training, and the RMSNorm / gated RMSNorm it is built from (Triton).

``bitlinear_train_fused(x, norm_weight, weight, bias)`` computes exactly what
``reference.bitlinear_train`` computes (same forward values up to summation order, same
straight-through gradients), with less memory traffic and far fewer saved tensors:

* forward: one row kernel does RMSNorm + per-token absmax quantisation and writes the
  fake-quantised activations ``xq / s_x`` once, in the compute dtype (bf16 under autocast); the
  product then runs on the tensor cores (cuBLAS). Only ``x`` (usually shared with other
  consumers: the MLGRU's three projections read the same ``h``) and ``rstd`` (one fp32 per row)
  are saved for backward.
* weights: ``codes / s_w`` is computed once per optimiser step and cached on the parameter,
  keyed on its storage pointer, its autograd version counter (bumped by in-place updates such as
  ``load_state_dict``) and a global count of optimiser steps (a post-step hook on every
  ``torch.optim`` optimiser: fused AdamW updates in place without bumping version counters).
  The hook re-quantises, right after the step, every cached weight that optimiser updated, in one
  batched pass (one multi-tensor abs-sum, one launch per weight). Gradient accumulation over
  micro-batches reuses the cache. Code that writes ``weight.data`` directly, or updates weights
  without a ``torch.optim`` optimiser, must call ``clear_weight_cache()``.
* ``MMF_BITLINEAR_INT8=1``: the forward product runs as ternary x int8 on the integer tensor cores
  (exact in int32, scales in the epilogue, ``int8_matmul.py``) and only the int8 codes are cached;
  opt-in (see ``INT8_FORWARD`` below for why).
* ``bitlinear_glu_train_fused(u, ...)``: the GLU's down projection, reading u = [gate | up] and
  forming silu(gate) * up inside the row kernels, so that product is never stored.
* backward: ``dxs = dy @ wq`` (tensor cores), then one row kernel recomputes the normalised and
  quantised activations from ``x`` and ``rstd`` (for ``dW = dy^T @ xq``) and applies the RMSNorm
  backward (``dx`` and the per-program partial sums of the norm weight's gradient) in the same
  pass over the row; ``dW`` runs on the tensor cores. Gradients pass through both quantisers as if
  they were the identity, exactly as the reference's ``x + (q(x) - x).detach()``.

The same row kernels give ``rms_norm_train`` and ``gated_rms_norm_train`` (autograd functions that
save the input and ``rstd`` rather than fp32 intermediates). All kernels loop over the feature
dimension in blocks, so any width works.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import reference

from triton.language.extra import libdevice

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + M) - M rounds fp32 |v| < 2^22 half-to-even
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _rint(v, RINT: tl.constexpr):
    """Round half to even (torch.round). The interpreter lacks libdevice: the magic-number form
    there (compiled, the add could be contracted into an fma with the product feeding it)."""
    if RINT:
        r = libdevice.rint(v)
    else:
        r = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return r


MAX_BLOCK_K = 4096  # feature-dimension block of the row kernels (rows wider than this loop)


def _block_k(k: int) -> int:
    return min(triton.next_power_of_2(max(k, 16)), MAX_BLOCK_K)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


_SMS: dict = {}


def _num_programs(rows: int, device) -> int:
    if device.type == "cuda":
        sms = _SMS.get(device.index)
        if sms is None:
            sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 8 * sms))
    return max(1, min(rows, 4))


# ----------------------------------------------------------------------------------------------
# row kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_x(xp, cols, m, K, GLU: tl.constexpr):
    """A row's inputs in fp32. GLU: the row holds [gate | up] (2K wide) and the input is
    silu(gate) * up, rounded to their dtype after each op as torch computes ``F.silu(gate) * up``."""
    if GLU:
        g = tl.load(xp + cols, mask=m, other=0.0)
        up = tl.load(xp + K + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        sl = (gf * tl.sigmoid(gf)).to(g.dtype).to(tl.float32)
        x = (sl * up.to(tl.float32)).to(g.dtype).to(tl.float32)
    else:
        x = tl.load(xp + cols, mask=m, other=0.0).to(tl.float32)
    return x


@triton.jit
def _normed(xp, NW, cols, m, K, rstd, GLU: tl.constexpr, HAS_NW: tl.constexpr):
    """rmsnorm(x) * norm weight in fp32 for the columns ``cols`` of a row (``_load_x``'s input)."""
    xn = _load_x(xp, cols, m, K, GLU) * rstd
    if HAS_NW:
        xn = xn * tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
    return xn


@triton.jit
def _rownorm_fwd_kernel(X, NW, G, Y, RSTD, SX, K, stride_x, stride_g, stride_y, eps,
                        HAS_NW: tl.constexpr, QUANT: tl.constexpr, HAS_GATE: tl.constexpr, RINT: tl.constexpr,
                        GLU: tl.constexpr, INT8: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row: rstd = 1/sqrt(mean(x^2)+eps); xn = x*rstd*nw.

    QUANT: y = (round(xn * s) clamped to int8) / s with s = 127 / max(max|xn|, 1e-5), cast first to
    x's dtype, then to y's (the reference's ``x_st.to(x.dtype)`` and the autocast cast).
    INT8 (with QUANT): y = the int8 codes themselves and SX[row] = s.
    HAS_GATE: y = xn * silu(gate). Else y = xn.
    """
    row = tl.program_id(0).to(tl.int64)
    xp = X + row * stride_x
    yp = Y + row * stride_y
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_x(xp, cols, cols < K, K, GLU)
        acc += x * x
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / K + eps)
    tl.store(RSTD + row, rstd)
    if QUANT:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            amax = tl.maximum(amax, tl.abs(_normed(xp, NW, cols, cols < K, K, rstd, GLU, HAS_NW)))
        s = 127.0 / tl.maximum(tl.max(amax, axis=0), 1e-5)
        if INT8:
            tl.store(SX + row, s)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = cols < K
            q = _rint(_normed(xp, NW, cols, m, K, rstd, GLU, HAS_NW) * s, RINT)
            q = tl.minimum(tl.maximum(q, -128.0), 127.0)
            if INT8:
                v = q.to(tl.int8)
            else:
                v = (q / s).to(X.dtype.element_ty).to(Y.dtype.element_ty)
            tl.store(yp + cols, v, mask=m)
    else:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = cols < K
            y = tl.load(xp + cols, mask=m, other=0.0).to(tl.float32) * rstd
            if HAS_NW:
                y = y * tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_GATE:
                gt = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
                y = y * (gt * tl.sigmoid(gt))
            tl.store(yp + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rownorm_bwd_kernel(X, NW, G, DY, RSTD, DX, DG, XQ, DNW, M, K,
                        stride_x, stride_g, stride_dy, stride_dx, stride_dg, stride_xq, scale,
                        HAS_NW: tl.constexpr, QUANT: tl.constexpr, HAS_GATE: tl.constexpr, RINT: tl.constexpr,
                        GLU: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward of y = f(x * rstd * nw): rows pid, pid + P, ... of one program.

    gx = dy * scale * nw (* silu(gate)); dx = rstd * (gx - xhat * mean(gx * xhat)); the norm
    weight's gradient dy * xhat (* silu(gate)) is summed into this program's row of DNW (P, K).
    QUANT: also rewrite the quantised activations (as the forward kernel) into XQ.
    HAS_GATE: also dgate = dy * xhat * nw * silu'(gate).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid64 = pid.to(tl.int64)
    dnwp = DNW + pid64 * K
    for it in range(0, tl.cdiv(M - pid, nprog)):
        row = pid64 + it * nprog
        rstd = tl.load(RSTD + row)
        xp = X + row * stride_x
        dyp = DY + row * stride_dy
        dot = tl.zeros([BLOCK_K], dtype=tl.float32)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = cols < K
            xhat = _load_x(xp, cols, m, K, GLU) * rstd
            gx = tl.load(dyp + cols, mask=m, other=0.0).to(tl.float32) * scale
            if HAS_NW:
                nw = tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
                gx = gx * nw
                xn = xhat * nw
            else:
                xn = xhat
            if HAS_GATE:
                gt = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
                gx = gx * (gt * tl.sigmoid(gt))
            dot += gx * xhat
            amax = tl.maximum(amax, tl.abs(xn))
        c = tl.sum(dot, axis=0) / K
        s = 127.0 / tl.maximum(tl.max(amax, axis=0), 1e-5)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            m = cols < K
            if GLU:
                g = tl.load(xp + cols, mask=m, other=0.0)
                up = tl.load(xp + K + cols, mask=m, other=0.0)
                gf = g.to(tl.float32)
                sgg = tl.sigmoid(gf)
                sl = (gf * sgg).to(g.dtype).to(tl.float32)
                upf = up.to(tl.float32)
                xhat = (sl * upf).to(g.dtype).to(tl.float32) * rstd
            else:
                xhat = tl.load(xp + cols, mask=m, other=0.0).to(tl.float32) * rstd
            dy = tl.load(dyp + cols, mask=m, other=0.0).to(tl.float32) * scale
            if HAS_GATE:
                gt = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
                sg = tl.sigmoid(gt)
                silu = gt * sg
                dwn = dy * silu
            else:
                dwn = dy
            if HAS_NW:
                nw = tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
                gx = dwn * nw
                xn = xhat * nw
                part = tl.load(dnwp + cols, mask=m & (it > 0), other=0.0)  # first row: no memset needed
                tl.store(dnwp + cols, part + dwn * xhat, mask=m)
            else:
                gx = dwn
                xn = xhat
            dx = rstd * (gx - xhat * c)
            if GLU:  # chain through p = silu(gate) * up: d gate and d up side by side
                dp = dx.to(DX.dtype.element_ty).to(tl.float32)
                dgate = (dp * upf) * (sgg * (1.0 + gf * (1.0 - sgg)))
                tl.store(DX + row * stride_dx + cols, dgate.to(DX.dtype.element_ty), mask=m)
                tl.store(DX + row * stride_dx + K + cols, (dp * sl).to(DX.dtype.element_ty), mask=m)
            else:
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
            if HAS_GATE:
                dg = dy * xn * (sg * (1.0 + gt * (1.0 - sg)))
                tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=m)
            if QUANT:
                q = _rint(xn * s, RINT)
                q = tl.minimum(tl.maximum(q, -128.0), 127.0)
                v = (q / s).to(X.dtype.element_ty).to(XQ.dtype.element_ty)
                tl.store(XQ + row * stride_xq + cols, v, mask=m)


@triton.jit
def _weight_quant_kernel(W, Q, N, SUM, SW, BLOCK: tl.constexpr, RINT: tl.constexpr, CODES: tl.constexpr):
    """s_w = 1 / max(sum|w| / N, 1e-5); q = clamp(round(w * s_w), -1, 1) / s_w, formed in w's dtype
    then cast to q's (CODES: q = the codes). Program 0 also stores s_w."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    s = 1.0 / tl.maximum(tl.load(SUM) / N, 1e-5)
    if pid == 0:
        tl.store(SW, s)
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    c = _rint(w * s, RINT)
    c = tl.minimum(tl.maximum(c, -1.0), 1.0)
    if CODES:
        v = c.to(Q.dtype.element_ty)
    else:
        # reference: codes.to(w.dtype) / s_w.to(w.dtype), computed in w's dtype
        ws = s.to(W.dtype.element_ty).to(tl.float32)
        v = (c / ws).to(W.dtype.element_ty).to(Q.dtype.element_ty)
    tl.store(Q + offs, v, mask=m)


@triton.jit
def _dequant_kernel(C, Q, N, s_ptr, WDT, BLOCK: tl.constexpr):
    """q = codes / s_w formed in the weight's dtype (WDT's element type), then cast to q's."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    ws = tl.load(s_ptr).to(WDT.dtype.element_ty).to(tl.float32)
    c = tl.load(C + offs, mask=m, other=0).to(tl.float32)
    v = (c / ws).to(WDT.dtype.element_ty).to(Q.dtype.element_ty)
    tl.store(Q + offs, v, mask=m)


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
# "1" always, "0" never, "auto": CUDA sm >= 8.0. Off by default: the int8 product is 1.2-1.7x faster
# than cuBLAS bf16 at 1.3b shapes on an H100, but a whole training step gained only 4 % at 1.3b and
# lost 10 % at 370m (host-bound: the autotuned launch and the backward's dequantisation add
# overhead); see bench/results/TRAINING.md.
INT8_FORWARD = os.environ.get("MMF_BITLINEAR_INT8", "0")


def _use_int8(x2: torch.Tensor) -> bool:
    if INT8_FORWARD == "1":
        return True
    if INT8_FORWARD == "0" or not x2.is_cuda or _INTERPRET:
        return False
    return torch.cuda.get_device_capability(x2.device) >= (8, 0) and x2.shape[0] >= 64


def _use_rint(t: torch.Tensor) -> bool:
    return t.is_cuda and not _INTERPRET


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd(x2, nw, gate2, out_dtype, eps, quant, glu=False, int8=False):
    M, K = x2.shape
    K = K // 2 if glu else K
    y = torch.empty(M, K, dtype=torch.int8 if int8 else out_dtype, device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    sx = torch.empty(M if int8 else 1, dtype=torch.float32, device=x2.device)
    if M == 0:
        return (y, sx, rstd) if int8 else (y, rstd)
    bk = _block_k(K)
    _rownorm_fwd_kernel[(M,)](
        x2, nw if nw is not None else x2, gate2 if gate2 is not None else x2, y, rstd, sx, K,
        x2.stride(0), gate2.stride(0) if gate2 is not None else 0, y.stride(0), float(eps),
        HAS_NW=nw is not None, QUANT=quant, HAS_GATE=gate2 is not None, RINT=_use_rint(x2), GLU=glu, INT8=int8, BLOCK_K=bk,
        num_warps=_num_warps(bk))
    return (y, sx, rstd) if int8 else (y, rstd)


def _bwd(x2, nw, gate2, dy2, rstd, scale, quant, xq_dtype, need_dnw, glu=False):
    M, K = x2.shape
    dev = x2.device
    dx = torch.empty(M, K, dtype=x2.dtype, device=dev)
    K = K // 2 if glu else K
    dg = torch.empty_like(gate2) if gate2 is not None else None
    xq = torch.empty(M, K, dtype=xq_dtype, device=dev) if quant else None
    P = _num_programs(M, dev)
    has_nw = nw is not None
    dnw = torch.empty(P if has_nw else 1, K, dtype=torch.float32, device=dev)  # every program has >= 1 row
    if M > 0:
        bk = _block_k(K)
        _rownorm_bwd_kernel[(P,)](
            x2, nw if has_nw else x2, gate2 if gate2 is not None else x2, dy2, rstd, dx,
            dg if dg is not None else dx, xq if xq is not None else dx, dnw, M, K,
            x2.stride(0), gate2.stride(0) if gate2 is not None else 0, dy2.stride(0), dx.stride(0),
            dg.stride(0) if dg is not None else 0, xq.stride(0) if xq is not None else 0, float(scale),
            HAS_NW=has_nw, QUANT=quant, HAS_GATE=gate2 is not None, RINT=_use_rint(x2), GLU=glu, BLOCK_K=bk,
            num_warps=_num_warps(bk))
    dnw_out = dnw.sum(0).to(nw.dtype) if (has_nw and need_dnw) else None
    return dx, dg, xq, dnw_out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# ----------------------------------------------------------------------------------------------
# weights: quantised once per optimiser step
# ----------------------------------------------------------------------------------------------
_CACHE_ATTR = "_mmf_wq_cache"
_CODES_ATTR = "_mmf_codes_cache"
_STEP = [0]  # bumped after every optimiser step (any torch.optim optimiser, fused ones included)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Count the step, then re-quantise at once every cached weight this optimiser updated (one
    multi-tensor abs-sum for all of them, one launch each to quantise): cheaper on the host than
    discovering them stale one forward call at a time."""
    _STEP[0] += 1
    ws, modes = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            m = [attr for attr in (_CACHE_ATTR, _CODES_ATTR) if getattr(p, attr, None) is not None]
            if m:
                ws.append(p)
                modes.append(m)
    if not ws:
        return
    with torch.no_grad():
        try:
            sums = torch._foreach_norm([w.detach() for w in ws], 1, dtype=torch.float32)
        except (RuntimeError, TypeError):  # pragma: no cover - older torch: one reduction each
            sums = [torch.linalg.vector_norm(w.detach(), 1, dtype=torch.float32) for w in ws]
        for w, m, total in zip(ws, modes, sums):
            if not w.is_contiguous():
                continue  # quantised lazily on next use
            for attr in m:
                old = getattr(w, attr)
                if attr == _CACHE_ATTR:
                    dtype = old[0][3]
                    q, _ = _quantize(w, dtype, codes=False, total=total)
                    key = (w.data_ptr(), w._version, _STEP[0], dtype, tuple(w.shape), w.device)
                    setattr(w, attr, (key, q))
                else:
                    out = _quantize(w, torch.int8, codes=True, total=total)
                    setattr(w, attr, ((w.data_ptr(), w._version, _STEP[0], tuple(w.shape), w.device), out))


# Fused optimisers (AdamW(fused=True)) update parameters in place WITHOUT bumping their autograd
# version counters, so the version alone cannot tell that a weight changed: a global step hook can.
_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def _quantize(weight: torch.Tensor, dtype, codes: bool, total=None):
    """Two launches: the abs-sum (one reduction), then one pass that forms s_w from it and writes
    ``codes / s_w`` in ``dtype`` (or the int8 codes) and s_w itself."""
    with torch.no_grad():
        w = weight.detach()
        w = w if w.is_contiguous() else w.contiguous()
        if total is None:
            total = torch.linalg.vector_norm(w, 1, dtype=torch.float32)
        q = torch.empty(w.shape, dtype=torch.int8 if codes else dtype, device=w.device)
        s_w = torch.empty(1, dtype=torch.float32, device=w.device)
        n = w.numel()
        _weight_quant_kernel[(max(1, triton.cdiv(n, 4096)),)](w, q, n, total, s_w, BLOCK=4096, RINT=_use_rint(w),
                                                               CODES=codes, num_warps=8)
    return q, s_w


def quantized_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes / s_w`` of ``weight`` in ``dtype``, recomputed only when the weight has changed."""
    key = (weight.data_ptr(), weight._version, _STEP[0], dtype, tuple(weight.shape), weight.device)
    hit = getattr(weight, _CACHE_ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    q, _ = _quantize(weight, dtype, codes=False)
    try:
        setattr(weight, _CACHE_ATTR, (key, q))
    except (AttributeError, TypeError):  # pragma: no cover - a tensor that refuses attributes: no caching
        pass
    return q


def quantized_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ternary codes, s_w as a (1,) fp32 tensor) of ``weight``, cached like ``quantized_weight``."""
    key = (weight.data_ptr(), weight._version, _STEP[0], tuple(weight.shape), weight.device)
    hit = getattr(weight, _CODES_ATTR, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = _quantize(weight, torch.int8, codes=True)
    try:
        setattr(weight, _CODES_ATTR, (key, out))
    except (AttributeError, TypeError):  # pragma: no cover
        pass
    return out


def _dequant(codes, s_w, w_dtype, dtype):
    """codes / s_w exactly as the reference forms it (in the weight's dtype), then in ``dtype``."""
    q = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    n = codes.numel()
    if n:
        _dequant_kernel[(triton.cdiv(n, 4096),)](codes, q, n, s_w, torch.empty(0, dtype=w_dtype, device=codes.device),
                                                 BLOCK=4096, num_warps=8)
    return q


def clear_weight_cache(module_or_tensor=None) -> None:
    """Drop cached quantised weights (after writing ``weight.data`` directly, or to free memory)."""
    if module_or_tensor is None:
        import gc

        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    elif isinstance(module_or_tensor, torch.nn.Module):
        tensors = list(module_or_tensor.parameters())
    else:
        tensors = [module_or_tensor]
    for t in tensors:
        for attr in (_CACHE_ATTR, _CODES_ATTR):
            if hasattr(t, attr):
                delattr(t, attr)


# ----------------------------------------------------------------------------------------------
# autograd functions
# ----------------------------------------------------------------------------------------------
class _BitLinearTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, weight, bias, eps, glu):
        cdtype = _compute_dtype(x)
        x2 = _rows(x)
        int8 = _use_int8(x2)
        if int8:  # ternary x int8 on the integer tensor cores, exact in int32, scales in the epilogue
            from .int8_matmul import int8_matmul_scaled

            xq, sx, rstd = _fwd(x2, norm_weight, None, cdtype, eps, quant=True, glu=glu, int8=True)
            codes, s_w = quantized_codes(weight)
            y = int8_matmul_scaled(xq, codes, sx, s_w, cdtype)
            del sx
        else:
            xq, rstd = _fwd(x2, norm_weight, None, cdtype, eps, quant=True, glu=glu)
            wq = quantized_weight(weight, cdtype)
            y = torch.mm(xq, wq.t())
        del xq
        ctx.int8 = int8
        if bias is not None:
            y = y + bias.to(cdtype)
        src = _norm_source(x)
        ctx.src = None
        if src is not None:  # x is an RMSNorm's output: keep that norm's inputs (saved by it anyway)
            src_x, src_w, src_gate, src_eps, src_dtype, shared = src
            shared.uses += 1
            ctx.src = (src_eps, src_dtype, shared)
            ctx.save_for_backward(src_x, src_w, src_gate, norm_weight, weight, rstd)
        else:
            ctx.save_for_backward(x2, norm_weight, weight, rstd)
        ctx.cdtype, ctx.eps, ctx.has_bias, ctx.x_shape, ctx.glu = cdtype, eps, bias is not None, x.shape, glu
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        if ctx.src is not None:  # recompute the norm's output, bit for bit what forward was given
            src_x, src_w, src_gate, nw, weight, rstd = ctx.saved_tensors
            eps, dtype, shared = ctx.src
            if shared.out is None:  # once for all the BitLinears that read it (i, f and g share one)
                shared.out = _fwd(_rows(src_x), src_w, _rows(src_gate) if src_gate is not None else None, dtype,
                                  eps, quant=False)[0]
            x2 = shared.out
            shared.uses -= 1
            if shared.uses == 0:  # the last of them: drop it
                shared.out = None
        else:
            x2, nw, weight, rstd = ctx.saved_tensors
        cdtype = ctx.cdtype
        dy2 = _rows(dy).to(cdtype)
        if ctx.int8:  # only the int8 codes are cached: the dequantised weight lives for this product
            codes, s_w = quantized_codes(weight)
            dxs = torch.mm(dy2, _dequant(codes, s_w, weight.dtype, cdtype))
        else:
            dxs = torch.mm(dy2, quantized_weight(weight, cdtype))
        need_w = ctx.needs_input_grad[2]
        dx, _, xq, dnw = _bwd(x2, nw, None, dxs, rstd, 1.0, need_w, cdtype, ctx.needs_input_grad[1], glu=ctx.glu)
        del dxs
        dw = torch.mm(dy2.t(), xq).to(weight.dtype) if need_w else None
        db = dy2.float().sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx.view(ctx.x_shape), dnw, dw, db, None, None


class _RMSNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gate, eps, out_dtype):
        x2 = _rows(x)
        g2 = _rows(gate) if gate is not None else None
        y, rstd = _fwd(x2, weight, g2, out_dtype, eps, quant=False)
        ctx.save_for_backward(x2, weight, g2, rstd)
        ctx.x_shape = x.shape
        ctx.g_shape = gate.shape if gate is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, g2, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        dx, dg, _, dw = _bwd(x2, w, g2, dy2, rstd, 1.0, False, None, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, (dg.view(ctx.g_shape) if dg is not None else None), None, None


def bitlinear_train_fused(x, norm_weight, weight, bias=None, eps: float = reference.BITLINEAR_NORM_EPS):
    """Triton twin of ``reference.bitlinear_train`` (same values and straight-through gradients)."""
    return _BitLinearTrain.apply(x, norm_weight, weight, bias, eps, False)


def bitlinear_glu_train_fused(u, norm_weight, weight, bias=None, eps: float = reference.BITLINEAR_NORM_EPS):
    """BitLinear of silu(gate) * up, u = [gate | up] (..., 2m): the product is never stored.

    Matches ``bitlinear_glu_train_ref``; saves u and rstd, and its backward returns d u.
    """
    return _BitLinearTrain.apply(u, norm_weight, weight, bias, eps, True)


def bitlinear_glu_train_ref(u, norm_weight, weight, bias=None, eps: float = reference.BITLINEAR_NORM_EPS):
    """The plain-torch composition ``bitlinear_glu_train_fused`` must match (the model's GLU)."""
    gate, up = u.chunk(2, dim=-1)
    return reference.bitlinear_train(F.silu(gate) * up, norm_weight, weight, bias, eps)


_SOURCE_ATTR = "_mmf_norm_source"
# A BitLinear whose input is an RMSNorm's output saves that norm's inputs (which the norm saves
# anyway) instead of the output, and recomputes the output in its backward: one row pass more per
# norm, and per layer the attn and mlp norm outputs (fp32: the residual stream is fp32) and the
# gated norm's output are not stored. MMF_RECOMPUTE_NORM=0 stores them (for A/B).
RECOMPUTE_NORM = os.environ.get("MMF_RECOMPUTE_NORM", "1") != "0"


class _Recomputed:
    """The recomputed output of one norm, shared by the BitLinears that read it in backward, and how
    many of their backwards are still to come (the last one drops it)."""

    __slots__ = ("uses", "out")

    def __init__(self):
        self.uses, self.out = 0, None


def _with_source(y, x, weight, gate, eps, out_dtype):
    """Tag a norm's output with what recomputes it (read by the BitLinear that consumes it)."""
    if RECOMPUTE_NORM and torch.is_grad_enabled():
        setattr(y, _SOURCE_ATTR, (x, weight, gate, eps, out_dtype, _Recomputed()))
    return y


def _norm_source(x):
    src = getattr(x, _SOURCE_ATTR, None)
    if src is None or not RECOMPUTE_NORM or src[0].shape[:-1] != x.shape[:-1]:
        return None
    return src


def rms_norm_train(x, weight, eps, out_dtype=None):
    """Triton twin of ``reference.rms_norm`` with a backward that saves only x and rstd."""
    out_dtype = out_dtype or x.dtype
    return _with_source(_RMSNormTrain.apply(x, weight, None, eps, out_dtype), x, weight, None, eps, out_dtype)


def gated_rms_norm_train(g, weight, gate, eps):
    """Triton twin of ``reference.gated_rms_norm``: rmsnorm(g) * weight * silu(gate), in g's dtype."""
    return _with_source(_RMSNormTrain.apply(g, weight, gate, eps, g.dtype), g, weight, gate, eps, g.dtype)
