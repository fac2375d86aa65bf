"""Int8 tensor-core product with the BitLinear scales fused into the epilogue (Triton).

``int8_matmul_scaled(xq, codes, row_scale, col_scale, out_dtype)`` returns
``(xq @ codes^T) * row_scale[:, None] * col_scale`` with int8 operands (activations in
[-128, 127], ternary codes) accumulated exactly in int32 and scaled once at the end.
Explored as the forward product of the fused BitLinear; see bench/train_bench.py --check for
how it compares with the bf16 tensor-core product.
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
def _int8_mm_kernel(A, B, RS, Y, M, N, K, col_scale, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
    rs = tl.load(RS + rm, mask=rm < M, other=0.0)
    y = acc.to(tl.float32) * rs[:, None] * col_scale
    tl.store(Y + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul_scaled(xq: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, col_scale: float,
                       out_dtype=torch.bfloat16) -> torch.Tensor:
    """(xq @ codes^T) * row_scale[:, None] * col_scale; xq (M, K) int8, codes (N, K) int8."""
    M, K = xq.shape
    N = codes.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _int8_mm_kernel[grid](xq.contiguous(), codes.contiguous(), row_scale.float().contiguous(), y, M, N, K,
                          float(col_scale))
    return y
