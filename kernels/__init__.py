"""Dispatching operators used by the models.

The model calls only the functions below. Each one picks an implementation: a Triton kernel for
CUDA tensors when one exists, else the plain-torch reference in ``reference.py``. Setting the
environment variable ``MMF_FORCE_REFERENCE=1`` (or calling ``force_reference(True)``) makes every
operator use the reference; the model never knows which ran.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import reference

_FORCE_REFERENCE = os.environ.get("MMF_FORCE_REFERENCE", "") not in ("", "0")


def force_reference(flag: bool = True) -> None:
    """Use the plain-torch reference for every operator (for debugging and comparisons)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = flag


def use_reference(*tensors) -> bool:
    return _FORCE_REFERENCE or not all(t.is_cuda for t in tensors if t is not None)


def _train_kernels(*tensors) -> bool:
    """Triton training kernels (autograd-capable) for CUDA tensors when a gradient is wanted."""
    return (not use_reference(*tensors) and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors if t is not None))


def rms_norm(x, weight, eps):
    if _train_kernels(x, weight):
        from .bitlinear_fused import rms_norm_train
        return rms_norm_train(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def bitlinear_train(x, norm_weight, weight, bias=None):
    if not use_reference(x, weight):
        from .bitlinear_fused import bitlinear_train_fused
        return bitlinear_train_fused(x, norm_weight, weight, bias)
    return reference.bitlinear_train(x, norm_weight, weight, bias)


def bitlinear_glu_train(u, norm_weight, weight, bias=None):
    """BitLinear (training form) of silu(gate) * up with u = [gate | up]: the GLU's down projection."""
    if not use_reference(u, weight):
        from .bitlinear_fused import bitlinear_glu_train_fused
        return bitlinear_glu_train_fused(u, norm_weight, weight, bias)
    gate, up = u.chunk(2, dim=-1)
    return reference.bitlinear_train(F.silu(gate) * up, norm_weight, weight, bias)


def bitlinear_frozen(x, norm_weight, codes, s_w, bias=None):
    return reference.bitlinear_frozen(x, norm_weight, codes, s_w, bias)


def bitlinear_i2(x, norm_weight, packed, k, s_w, bias=None):
    if bias is None and not use_reference(x, packed):
        from .ternary_gemm import bitlinear_i2 as bitlinear_i2_triton
        return bitlinear_i2_triton(x, norm_weight, packed, k, s_w)
    return reference.bitlinear_i2(x, norm_weight, packed, k, s_w, bias)


def mlgru_step(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps):
    """One fused MLGRU decode step on (B, D) inputs: (o in g_pre's dtype, new fp32 state)."""
    if not use_reference(i_pre, f_pre, g_pre):
        from .mlgru_step import mlgru_step as mlgru_step_triton
        return mlgru_step_triton(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps)
    return reference.mlgru_step_ref(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps)


def mlgru_gates(i_pre, f_pre, lower_bound):
    return reference.mlgru_gates(i_pre, f_pre, lower_bound)


def mlgru_scan(i, f, state=None):
    if not use_reference(i, f):
        from .mlgru_fused import mlgru_scan_fused
        return mlgru_scan_fused(i, f, state)
    return reference.mlgru_scan(i, f, state)


def mlgru(i_pre, f_pre, lower_bound, state=None):
    """Gates and recurrence of the MLGRU in one op: (states (B, T, D), last state (B, D) fp32)."""
    if not use_reference(i_pre, f_pre):
        from .mlgru_fused import mlgru_fused
        # without a gradient (inference) the states stay fp32 as in the reference and on the CPU;
        # training keeps them in the activations' dtype (half the activation memory)
        training = torch.is_grad_enabled() and (i_pre.requires_grad or f_pre.requires_grad)
        return mlgru_fused(i_pre, f_pre, lower_bound, state, out_dtype=None if training else torch.float32)
    i, f = reference.mlgru_gates(i_pre, f_pre, lower_bound)
    return reference.mlgru_scan(i, f, state)


def gated_rms_norm(g, weight, gate, eps):
    if _train_kernels(g, weight, gate):
        from .bitlinear_fused import gated_rms_norm_train
        return gated_rms_norm_train(g, weight, gate, eps)
    return reference.gated_rms_norm(g, weight, gate, eps)


weight_quant = reference.weight_quant
activation_quant = reference.activation_quant
