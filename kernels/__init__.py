"""Dispatching operators used by the models.

The model calls only the functions below. Each one picks an implementation: a Triton kernel for
CUDA tensors when one exists, else the plain-torch reference in ``reference.py``. Setting the
environment variable ``MMF_FORCE_REFERENCE=1`` (or calling ``force_reference(True)``) makes every
operator use the reference; the model never knows which ran. ``MMF_REFERENCE_OPS=bitlinear``
(or ``reference_ops({"bitlinear"})``) does so for one group of operators only: ``bitlinear`` (the
training BitLinear and the GLU's down projection: norm, quantisers and product), ``norm`` (the
block RMSNorm and the gated RMSNorm), ``mlgru`` (gates and recurrence); the training benchmark uses
it to compare a model that differs from the fused one in its BitLinears alone.
"""

from __future__ import annotations

from mmf._toplevel import defer_bare_import as _defer_bare_import

_defer_bare_import(globals())  # imported as a top-level `kernels` from the repository root: see mmf/_toplevel.py

import contextlib
import functools
import importlib
import os

import torch
import torch.nn.functional as F

from . import cpu_decode, cpu_ternary, reference

_FORCE_REFERENCE = os.environ.get("MMF_FORCE_REFERENCE", "") not in ("", "0")


OP_GROUPS = ("bitlinear", "norm", "mlgru")


@functools.lru_cache(maxsize=8)
def _parse_ops_str(spec: str) -> frozenset:
    return _parse_ops(spec)


def _parse_ops(spec) -> frozenset:
    names = {s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()}
    bad = sorted(names - set(OP_GROUPS))
    if bad:
        from mmf.errors import MMFError
        raise MMFError(f"unknown operator group {', '.join(bad)} in MMF_REFERENCE_OPS / reference_ops; "
                       f"valid: {', '.join(OP_GROUPS)}")
    return frozenset(names)


_REFERENCE_OPS = frozenset()


def force_reference(flag: bool = True) -> None:
    """Use the plain-torch reference for every operator (for debugging and comparisons)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = flag


def reference_ops(groups=()) -> frozenset:
    """Use the plain-torch reference for these operator groups only (see ``OP_GROUPS``); returns the
    groups set before, so that a caller can restore them."""
    global _REFERENCE_OPS
    prev, _REFERENCE_OPS = _REFERENCE_OPS, _parse_ops(groups)
    return prev


def use_reference(*tensors, group: str | None = None) -> bool:
    if group is not None and (group in _REFERENCE_OPS or group in _env_ops()):
        return True
    return _FORCE_REFERENCE or not all(t.is_cuda for t in tensors if t is not None)


def _env_ops() -> frozenset:
    return _parse_ops_str(os.environ.get("MMF_REFERENCE_OPS", ""))


def _train_kernels(*tensors, group: str | None = None) -> bool:
    """Triton training kernels (autograd-capable) for CUDA tensors when a gradient is wanted."""
    return (not use_reference(*tensors, group=group) and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors if t is not None))


@functools.lru_cache(maxsize=None)
def triton_kernels(module: str):
    """The Triton kernel module ``mmf.kernels.<module>``, imported when a CUDA tensor first needs it. triton
    comes with CUDA builds of torch and is not installed on CPU-only machines: without it, one MMFError line."""
    try:
        return importlib.import_module(f"mmf.kernels.{module}")
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "triton":
            raise
        from mmf.errors import MMFError
        raise MMFError(f"CUDA tensors run mmf's Triton kernels, but triton cannot be imported ({e}): install it "
                       "(pip install triton) or set MMF_FORCE_REFERENCE=1 for the plain-torch reference") from None


def rms_norm(x, weight, eps):
    if _train_kernels(x, weight, group="norm"):
        rms_norm_train = triton_kernels("bitlinear_fused").rms_norm_train
        return rms_norm_train(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def bitlinear_train(x, norm_weight, weight, bias=None):
    if not use_reference(x, weight, group="bitlinear"):
        bitlinear_train_fused = triton_kernels("bitlinear_fused").bitlinear_train_fused
        return bitlinear_train_fused(x, norm_weight, weight, bias)
    return reference.bitlinear_train(x, norm_weight, weight, bias)


def bitlinear_glu_train(u, norm_weight, weight, bias=None):
    """BitLinear (training form) of silu(gate) * up with u = [gate | up]: the GLU's down projection."""
    if not use_reference(u, weight, group="bitlinear"):
        bitlinear_glu_train_fused = triton_kernels("bitlinear_fused").bitlinear_glu_train_fused
        return bitlinear_glu_train_fused(u, norm_weight, weight, bias)
    gate, up = u.chunk(2, dim=-1)
    return reference.bitlinear_train(F.silu(gate) * up, norm_weight, weight, bias)


def bitlinear_frozen(x, norm_weight, codes, s_w, bias=None):
    return reference.bitlinear_frozen(x, norm_weight, codes, s_w, bias)


def cpu_native(x, weights) -> bool:
    """True when the native CPU kernel (``cpu_ternary``) serves these tensors: both on the CPU, no
    gradient wanted, the reference not forced, and the kernel built (it says once why not)."""
    if _FORCE_REFERENCE or not (x.is_cpu and weights.is_cpu) or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return cpu_ternary.available()


def cpu_forward(x):
    """A context for a frozen model's forward on ``x``: where the native CPU kernel serves it, torch's
    own ops run on one thread and the kernel on torch's count (``cpu_ternary.native_forward`` says why)."""
    if _FORCE_REFERENCE or not x.is_cpu or torch.is_grad_enabled() or not cpu_ternary.available():
        return contextlib.nullcontext()
    return cpu_ternary.native_forward()


def cpu_decode_step(model, input_ids, states, linear_cls):
    """One decode step of a frozen MatMul-free model as one native call (``cpu_decode.step``: (logits, new
    states)), or None where it does not apply and the eager forward runs: one new token per sequence, on
    the CPU, no gradient, the reference not forced, the kernel built."""
    if (_FORCE_REFERENCE or not input_ids.is_cpu or input_ids.dim() != 2 or input_ids.shape[1] != 1
            or torch.is_grad_enabled() or not cpu_ternary.available()):
        return None
    return cpu_decode.step(model, input_ids, states, linear_cls)


def bitlinear_i2(x, norm_weight, packed, k, s_w, bias=None):
    if cpu_native(x, packed):  # first: a decode step calls this a few hundred times
        return cpu_ternary.bitlinear_i2(x, norm_weight, packed, k, s_w, bias)
    if bias is None and not use_reference(x, packed):
        bitlinear_i2_triton = triton_kernels("ternary_gemm").bitlinear_i2
        return bitlinear_i2_triton(x, norm_weight, packed, k, s_w)
    if not _FORCE_REFERENCE and x.device.type == "cpu":  # no native kernel: the exact table lookup
        return reference.bitlinear_i2_lut(x, norm_weight, packed, k, s_w, bias)
    return reference.bitlinear_i2(x, norm_weight, packed, k, s_w, bias)


def mlgru_step(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps):
    """One fused MLGRU decode step on (B, D) inputs: (o in g_pre's dtype, new fp32 state)."""
    if not use_reference(i_pre, f_pre, g_pre):
        mlgru_step_triton = triton_kernels("mlgru_step").mlgru_step
        return mlgru_step_triton(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps)
    return reference.mlgru_step_ref(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps)


def mlgru_gates(i_pre, f_pre, lower_bound):
    return reference.mlgru_gates(i_pre, f_pre, lower_bound)


def mlgru_scan(i, f, state=None):
    if not use_reference(i, f, group="mlgru"):
        mlgru_scan_fused = triton_kernels("mlgru_fused").mlgru_scan_fused
        return mlgru_scan_fused(i, f, state)
    return reference.mlgru_scan(i, f, state)


def mlgru(i_pre, f_pre, lower_bound, state=None):
    """Gates and recurrence of the MLGRU in one op: (states (B, T, D), last state (B, D) fp32)."""
    if not use_reference(i_pre, f_pre, group="mlgru"):
        mlgru_fused = triton_kernels("mlgru_fused").mlgru_fused
        # without a gradient (inference) the states stay fp32 as in the reference and on the CPU;
        # training keeps them in the activations' dtype (half the activation memory)
        training = torch.is_grad_enabled() and (i_pre.requires_grad or f_pre.requires_grad)
        return mlgru_fused(i_pre, f_pre, lower_bound, state, out_dtype=None if training else torch.float32)
    i, f = reference.mlgru_gates(i_pre, f_pre, lower_bound)
    return reference.mlgru_scan(i, f, state)


def gated_rms_norm(g, weight, gate, eps):
    if _train_kernels(g, weight, gate, group="norm"):
        gated_rms_norm_train = triton_kernels("bitlinear_fused").gated_rms_norm_train
        return gated_rms_norm_train(g, weight, gate, eps)
    return reference.gated_rms_norm(g, weight, gate, eps)


weight_quant = reference.weight_quant
activation_quant = reference.activation_quant
