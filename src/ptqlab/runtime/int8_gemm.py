"""INT8 W8A8's prefill matmul with its scales applied inside (Triton; CUDA, or the CPU interpreter for tests).

Why: `torch._int_mm` returns int32 sums, which one more pass (kernels.int8_epilogue) turns into 16-bit outputs with
the token's and the row's scale: at a 4,096-token prefill that pass writes and reads 4 bytes and writes 2 per output,
more traffic than the weights themselves, and on Hopper `_int_mm` runs Ampere-generation kernels. Here each tile's
int32 sums are scaled and rounded before they leave registers, so the output is written once, in 16-bit. The
products and sums are exact (int8 x int8 into int32), so the result equals `_int_mm` + epilogue up to fp32 rounding
of the scaling.
"""

from __future__ import annotations

import torch

from ptqlab.triton_support import tl, triton

if triton is not None:
    from ptqlab.runtime.kernels import grouped_tile

    @triton.jit
    def _int8_gemm_kernel(X, XS, W, WS, Bias, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """y[m, n] = xs[m] ws[n] Σ_k x[m, k] w[n, k] (+ bias[n]) over tiles of BLOCK_M x BLOCK_N; K a multiple of
        BLOCK_K; programs in kernels.grouped_tile's order."""
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < M
        n_mask = rn < N
        x_at = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
        w_at = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_at + k0, mask=m_mask[:, None], other=0)
            w = tl.load(w_at + k0, mask=n_mask[:, None], other=0)
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        x_scale = tl.load(XS + rm, mask=m_mask, other=0.0)
        w_scale = tl.load(WS + rn, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            y += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


BLOCK_K = 128
TILES = {"128x128": (128, 128, 8, 4), "128x256": (128, 256, 8, 3), "256x128": (256, 128, 8, 3)}
"""(BLOCK_M, BLOCK_N, warps, stages) by name: the tiles the kernel choice table (runtime/choice.py) tries at many
rows; the first is the default. (A few rows take a 64-row tile.)"""


def fits(k: int) -> bool:
    return k % BLOCK_K == 0


def int8_gemm(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, tile: str = "128x128") -> torch.Tensor:
    """x [M, K] int8 with x_scale [M, 1] fp32 per token @ (weight [N, K] int8 with w_scale [N] or [1, N] fp32 per
    row)ᵀ -> [M, N] in out_dtype (+ bias [N]). K: a multiple of 128."""
    m, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    block_m, block_n, warps, stages = TILES[tile] if m > 64 else (64, 128, 4, 4)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    ws = w_scale.reshape(-1)
    _int8_gemm_kernel[grid](x, x_scale, weight, ws, bias if bias is not None else ws, y, m, n, k, x.stride(0),
                            weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
                            BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=8, num_warps=warps, num_stages=stages)
    return y
