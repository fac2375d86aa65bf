"""Plain-torch references: the maths of docs/reference-semantics.md in a few lines each.

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
    out = []
    # unbind, not indexing: the backward of T slices would otherwise allocate T full-size zero tensors
    for f_t, i_t in zip(f.float().unbind(1), i.float().unbind(1)):
        s = f_t * s + i_t
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
    """i2 planar bytes (N, ceil(K/4)) -> int8 codes (N, K) in {-1,0,1} (see mmf/ternary_codes.py)."""
    planes = [((packed >> (2 * s)) & 3) for s in range(4)]
    return torch.cat(planes, dim=1)[:, :k].to(torch.int8) - 1


def bitlinear_i2(x, norm_weight, packed, k: int, s_w, bias=None, eps: float = BITLINEAR_NORM_EPS):
    """Inference form reading i2-packed weights: unpack (transiently), then ``bitlinear_frozen``."""
    return bitlinear_frozen(x, norm_weight, unpack_i2_ref(packed, k), s_w, bias, eps)


def mlgru_step_ref(i_pre, f_pre, g_pre, state, lower_bound, g_norm_weight, eps: float):
    """One decode step of the MLGRU on (B, D) inputs: gates, recurrence (T = 1), gated RMSNorm.

    Returns (o in g_pre's dtype, new fp32 state): the composition the model runs.
    """
    i, f = mlgru_gates(i_pre, f_pre, lower_bound)
    _, last = mlgru_scan(i[:, None], f[:, None], state)
    return gated_rms_norm(g_pre, g_norm_weight, last, eps), last


_I2_DIGITS: dict = {}
LUT_MAX_ROWS = 8  # rows (tokens) up to which bitlinear_i2_lut builds lookup tables; above, chunked unpack


def _i2_digits(device) -> torch.Tensor:
    """(256, 4) fp32: for each byte value, its four i2 digits as weights (code - 1)."""
    if device not in _I2_DIGITS:
        b = torch.arange(256, device=device)
        _I2_DIGITS[device] = torch.stack([((b >> (2 * s)) & 3) - 1 for s in range(4)], 1).float()
    return _I2_DIGITS[device]


def bitlinear_i2_lut(x, norm_weight, packed, k: int, s_w, bias=None, eps: float = BITLINEAR_NORM_EPS,
                     row_chunk: int = 2048):
    """``bitlinear_i2`` for CPU decoding, bit-identical to it, without unpacking the weights.

    For each token, a table T[j, b] = sum_s (digit_s(b) - 1) * xq[s*P + j] holds the partial dot
    product of every possible byte b at byte column j (P x 256 entries, built with one small matmul);
    the product is then one table lookup per packed byte, ``acc[n] = sum_j T[j, packed[n, j]]``:
    four weights per memory access, no multiplication (several tokens: one ``embedding_bag`` sum over
    a (P*256, M) table serves them all). Sums of integers, exact in fp32 while
    K * 128 < 2^24 (as in ``bitlinear_frozen``). More than ``LUT_MAX_ROWS`` tokens (prefill) take
    row chunks of the weights unpacked transiently instead.
    """
    xn = rms_norm(x, norm_weight, eps, torch.float32)  # as bitlinear_frozen
    xq, s_x = activation_quant(xn)
    lead, n, p = xq.shape[:-1], packed.shape[0], packed.shape[1]
    xq2 = xq.reshape(-1, k)
    m = xq2.shape[0]
    acc = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m <= LUT_MAX_ROWS:
        xs = F.pad(xq2, (0, 4 * p - k)).view(m, 4, p).transpose(1, 2)  # (M, P, 4): the 4 digits of byte j
        table = (xs @ _i2_digits(x.device).t()).reshape(m, p * 256)  # (M, P*256)
        offsets = torch.arange(p, dtype=torch.int32, device=x.device) * 256
        table_t = table.t().contiguous() if m > 1 else None  # (P*256, M): one bag sum serves every token
        for r in range(0, n, row_chunk):
            idx = packed[r:r + row_chunk].to(torch.int32).add_(offsets)
            if m == 1:
                acc[0, r:r + row_chunk] = table[0].index_select(0, idx.view(-1)).view(-1, p).sum(1)
            else:
                acc[:, r:r + row_chunk] = F.embedding_bag(idx, table_t, mode="sum").t()
    else:
        for r in range(0, n, row_chunk):
            acc[:, r:r + row_chunk] = F.linear(xq2, unpack_i2_ref(packed[r:r + row_chunk], k).to(torch.float32))
    y = acc.view(*lead, n) / (s_x * s_w.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
