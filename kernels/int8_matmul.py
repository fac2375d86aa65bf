"""Int8 tensor-core product with the BitLinear scales fused into the epilogue (Triton).

``int8_matmul_scaled(xq, codes, s_x, s_w, out_dtype)`` returns ``(xq @ codes^T) / (s_x * s_w)``
(the BitLinear's inference arithmetic, ``reference.bitlinear_frozen``) with int8 operands
(activations in [-128, 127], ternary codes) accumulated exactly in int32 and the scales (device
tensors: no host synchronisation) applied once at the end. The fused BitLinear's forward uses it on
CUDA; bench/train_bench.py --check times it against the bf16 tensor-core product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.autotune(
    configs=[
        triton.Config({"BM": 128, "BN": 256, "BK": 128}, num_stages=3, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 128}, num_stages=4, num_warps=8),
        triton.Config({"BM": 256, "BN": 128, "BK": 128}, num_stages=3, num_warps=8),
        triton.Config({"BM": 64, "BN": 128, "BK": 128}, num_stages=4, num_warps=4),
    ],
    key=["M", "N", "K"],
)
@triton.jit
def _int8_mm_kernel(A, B, SX, SW, Y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BN)
    GROUP = 8
    grid_m = tl.cdiv(M, BM)
    width = GROUP * grid_n
    gid = pid // width
    first_m = gid * GROUP
    gsize = min(grid_m - first_m, GROUP)
    pm = first_m + (pid % width) % gsize
    pn = (pid % width) // gsize
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptr = A + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptr = B + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0)
        b = tl.load(b_ptr, mask=(rn[None, :] < N) & (rk[:, None] + k0 < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptr += BK
        b_ptr += BK
    sx = tl.load(SX + rm, mask=rm < M, other=1.0)
    sw = tl.load(SW)
    y = acc.to(tl.float32) / (sx[:, None] * sw)
    tl.store(Y + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul_scaled(xq: torch.Tensor, codes: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor,
                       out_dtype=torch.bfloat16) -> torch.Tensor:
    """(xq @ codes^T) / (s_x[:, None] * s_w); xq (M, K) int8, codes (N, K) int8, s_x (M,), s_w (1,)."""
    M, K = xq.shape
    N = codes.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _int8_mm_kernel[grid](xq.contiguous(), codes.contiguous(), s_x.float().contiguous(),
                          s_w.float().reshape(1), y, M, N, K)
    return y
