"""Bit-level codecs for ternary weights: ``i2`` (2 bits, 4 per byte) and ``tq1`` (base 3, 5 per byte).

Both use a *planar* element order along the input (K) dimension of a (N, K) weight, which lets a
GPU kernel read one contiguous run of packed bytes and four (or five) contiguous runs of
activations. With ``P = ceil(K / G)`` bytes per row (G = 4 for i2, 5 for tq1), element (n, k)
lives in byte ``packed[n, k % P]`` as digit ``k // P``:

* i2:  ``byte = sum_s code[n, s*P + j] << (2*s)``,   code = w + 1 in {0, 1, 2}
* tq1: ``byte = sum_s code[n, s*P + j] * 3**s``,     code = w + 1 in {0, 1, 2}, byte <= 242

Positions k >= K (row padding) hold code 1 (weight 0). docs/formats.md is the byte-level spec
(section 5); ``mmf.packed_format`` is the file format around these bytes.

The core (the packed-model loader, the frozen model, CUDA graphs), the kernels' tests, ONNX and the
FPGA export all read this one definition of the layout.
"""

from __future__ import annotations

import torch

I2_PER_BYTE = 4
TQ1_PER_BYTE = 5
GROUP = {"i2": I2_PER_BYTE, "tq1": TQ1_PER_BYTE}  # weights per byte
# byte = sum_s code_s * DIGIT_WEIGHT[fmt][s], code = w + 1 in {0, 1, 2}
DIGIT_WEIGHT = {"i2": (1, 4, 16, 64), "tq1": (1, 3, 9, 27, 81)}
BASE_CODE_BYTE = {"i2": 0x55, "tq1": 121}  # the byte whose every digit is code 1 (weight 0)
MAX_BYTE = {"i2": 0xAA, "tq1": 242}  # the largest valid byte (every digit code 2)


def packed_row_bytes(k: int, fmt: str) -> int:
    return -(-k // GROUP[fmt])


def _planes(w: torch.Tensor, g: int) -> torch.Tensor:
    """(N, K) ternary int8 -> (g, N, P) codes in {0,1,2} as uint8, padded with code 1."""
    n, k = w.shape
    p = -(-k // g)
    codes = torch.ones(n, g * p, dtype=torch.uint8, device=w.device)
    codes[:, :k] = (w.to(torch.int16) + 1).to(torch.uint8)
    return codes.view(n, g, p).transpose(0, 1)


def pack_i2(w: torch.Tensor) -> torch.Tensor:
    """(N, K) ternary int8 in {-1,0,1} -> (N, ceil(K/4)) uint8."""
    planes = _planes(w, I2_PER_BYTE)
    out = planes[0].clone()
    for s in range(1, I2_PER_BYTE):
        out |= planes[s] << (2 * s)
    return out


def unpack_i2(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P) uint8 -> (N, K) int8 in {-1,0,1}."""
    planes = [((packed >> (2 * s)) & 3) for s in range(I2_PER_BYTE)]
    codes = torch.cat(planes, dim=1)[:, :k]
    return codes.to(torch.int8) - 1


_POW3 = DIGIT_WEIGHT["tq1"]


def pack_tq1(w: torch.Tensor) -> torch.Tensor:
    """(N, K) ternary int8 -> (N, ceil(K/5)) uint8, base 3, digit s has weight 3**s."""
    planes = _planes(w, TQ1_PER_BYTE).to(torch.int16)
    out = torch.zeros_like(planes[0])
    for s in range(TQ1_PER_BYTE):
        out += planes[s] * _POW3[s]
    return out.to(torch.uint8)


def unpack_tq1(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P) uint8 (values <= 242) -> (N, K) int8 in {-1,0,1}."""
    v = packed.to(torch.int16)
    planes = [((v // _POW3[s]) % 3) for s in range(TQ1_PER_BYTE)]
    codes = torch.cat(planes, dim=1)[:, :k]
    return codes.to(torch.int8) - 1


def unpack_codes(packed: torch.Tensor, k: int, fmt: str) -> torch.Tensor:
    """(N, P) uint8 in format ``fmt`` -> (N, K) int8 in {-1,0,1}."""
    return unpack_i2(packed, k) if fmt == "i2" else unpack_tq1(packed, k)


def i2_from_packed(packed: torch.Tensor, k: int, fmt: str) -> torch.Tensor:
    """Any packed format -> i2 planar bytes (the layout FrozenBitLinear holds)."""
    if fmt == "i2":
        return packed
    return pack_i2(unpack_codes(packed, k, fmt))
