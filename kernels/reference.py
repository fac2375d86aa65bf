"""Plain-torch references: the maths of reference-semantics.md in a few lines each.

Every Triton kernel in this package must match the function here that it replaces; the tests
compare them on fresh random inputs. The model never calls these directly: it calls the
dispatching functions of ``mmf.kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BITLINEAR_NORM_EPS = 1e-6  # the released fused BitLinear uses 1e-6 whatever its module says
ACT_QMAX = 127.0
ACT_CLAMP_MIN = 1e-5
WEIGHT_CLAMP_MIN = 1e-5


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype=None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in ``out_dtype`` (default x's)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(out_dtype or x.dtype)


def activation_quant(xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 8-bit absmax: returns (xq, s_x) with xq integer-valued in [-128, 127] (fp32)."""
    xf = xn.float()
    s_x = ACT_QMAX / xf.abs().amax(-1, keepdim=True).clamp(min=ACT_CLAMP_MIN)
    xq = (xf * s_x).round().clamp(-128, 127)
    return xq, s_x


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean ternary: returns (codes in {-1,0,1} as int8, s_w as fp32 scalar)."""
    wf = w.float()
    s_w = 1.0 / wf.abs().mean().clamp(min=WEIGHT_CLAMP_MIN)
    codes = (wf * s_w).round().clamp(-1, 1).to(torch.int8)
    return codes, s_w


def bitlinear_train(x, norm_weight, weight, bias=None, eps: float = BITLINEAR_NORM_EPS):
    """Training form: fake-quantised activations and weights with straight-through gradients.

    The norm and both quantisers run in fp32 (as the released fused kernel does); only the
    product runs in x's dtype.
    """
    xn = rms_norm(x, norm_weight, eps, torch.float32)
    xq, s_x = activation_quant(xn)
    x_st = (xn + (xq / s_x - xn).detach()).to(x.dtype)
    codes, s_w = weight_quant(weight)
    w_st = weight + (codes.to(weight.dtype) / s_w.to(weight.dtype)).sub(weight).detach()
    return F.linear(x_st, w_st.to(x.dtype), bias)


def bitlinear_frozen(x, norm_weight, codes, s_w, bias=None, eps: float = BITLINEAR_NORM_EPS):
    """Inference form: y = (xq @ codes^T) / (s_x * s_w), the integer product done exactly in fp32."""
    xn = rms_norm(x, norm_weight, eps, torch.float32)
    xq, s_x = activation_quant(xn)
    acc = F.linear(xq, codes.to(torch.float32))  # integers: exact in fp32 while K * 127 < 2^24
    y = acc / (s_x * s_w.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def mlgru_scan(i: torch.Tensor, f: torch.Tensor, state: torch.Tensor | None = None):
    """s_t = f_t * s_{t-1} + i_t over dim 1 of (B, T, D) inputs, in fp32.

    Returns (all states (B, T, D) in i's dtype, last state (B, D) fp32).
    """
    B, T, D = i.shape
    s = torch.zeros(B, D, dtype=torch.float32, device=i.device) if state is None else state.float()
    fi, ff = i.float(), f.float()
    out = []
    for t in range(T):
        s = ff[:, t] * s + fi[:, t]
        out.append(s)
    return torch.stack(out, 1).to(i.dtype), s


def gated_rms_norm(g: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(g) * weight * silu(gate), in fp32, returned in g's dtype."""
    return (rms_norm(g.float(), weight, eps) * F.silu(gate.float())).to(g.dtype)


def mlgru_gates(i_pre: torch.Tensor, f_pre: torch.Tensor, lower_bound: torch.Tensor | None):
    """f = lb + (1 - lb) * sigmoid(f_pre); i = silu(i_pre) * (1 - f), in fp32."""
    f = torch.sigmoid(f_pre.float())
    if lower_bound is not None:
        lb = lower_bound.float()
        f = lb + (1 - lb) * f
    i = F.silu(i_pre.float()) * (1 - f)
    return i, f


def unpack_i2_ref(packed: torch.Tensor, k: int) -> torch.Tensor:
    """i2 planar bytes (N, ceil(K/4)) -> int8 codes (N, K) in {-1,0,1} (see converters/ternary_codes.py)."""
    planes = [((packed >> (2 * s)) & 3) for s in range(4)]
    return torch.cat(planes, dim=1)[:, :k].to(torch.int8) - 1


def bitlinear_i2(x, norm_weight, packed, k: int, s_w, bias=None, eps: float = BITLINEAR_NORM_EPS):
    """Inference form reading i2-packed weights: unpack (transiently), then ``bitlinear_frozen``."""
    return bitlinear_frozen(x, norm_weight, unpack_i2_ref(packed, k), s_w, bias, eps)
