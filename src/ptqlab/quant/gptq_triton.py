"""GPTQ's inner block on the GPU as one Triton kernel.

Within a block of columns, GPTQ's error feedback runs along a row: each row of the weight is independent of the
others. So one program takes a tile of rows with the whole block of columns in registers and walks the columns in
order (quantize, error, update the columns to the right), writing the quantized columns and the scaled errors
once. That replaces ~10 small kernel launches per column with one launch per block; the lazy update of the
rest of the matrix stays a single matmul in torch.
"""

from __future__ import annotations

import torch

from ptqlab import triton_support
from ptqlab.triton_support import libdevice, tl, triton


if triton is not None:

    @triton.jit
    def _gptq_block_kernel(W, Hinv, S, Z, Q, E, rows, columns, stride_w, stride_h, stride_s, stride_z, stride_q, stride_e,
                           stride_batch, stride_batch_h, qmin, qmax, HAS_ZERO: tl.constexpr, IS_FP8: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Rows BLOCK_R of matrix program_id(1) (W, S, Z, Q, E share one layout: stride_batch apart; Hinv's blocks
        stride_batch_h)."""
        matrix = tl.program_id(1).to(tl.int64)
        W += matrix * stride_batch
        S += matrix * stride_batch
        Z += matrix * stride_batch
        Q += matrix * stride_batch
        E += matrix * stride_batch
        Hinv += matrix * stride_batch_h
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask, cmask = r < rows, c < columns
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(W + r[:, None] * stride_w + c[None, :], mask=mask, other=0.0)
        s = tl.load(S + r[:, None] * stride_s + c[None, :], mask=mask, other=1.0)
        if HAS_ZERO:
            z = tl.load(Z + r[:, None] * stride_z + c[None, :], mask=mask, other=0.0)
        q_out = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        e_out = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for i in range(0, columns):
            pick = (c == i)[None, :]
            wi = tl.sum(tl.where(pick, w, 0.0), axis=1)
            si = tl.sum(tl.where(pick, s, 0.0), axis=1)
            scaled = wi / si
            if IS_FP8:
                qi = tl.minimum(tl.maximum(scaled, qmin), qmax).to(tl.float8e4nv).to(tl.float32) * si
            elif HAS_ZERO:
                zi = tl.sum(tl.where(pick, z, 0.0), axis=1)
                qi = (tl.minimum(tl.maximum(libdevice.rint(scaled + zi), qmin), qmax) - zi) * si
            else:
                qi = tl.minimum(tl.maximum(libdevice.rint(scaled), qmin), qmax) * si
            d = tl.load(Hinv + i * stride_h + i)
            err = (wi - qi) / d
            h = tl.load(Hinv + i * stride_h + c, mask=cmask & (c >= i), other=0.0)
            w = w - err[:, None] * h[None, :]
            q_out = tl.where(pick, qi[:, None], q_out)
            e_out = tl.where(pick, err[:, None], e_out)
        tl.store(Q + r[:, None] * stride_q + c[None, :], q_out, mask=mask)
        tl.store(E + r[:, None] * stride_e + c[None, :], e_out, mask=mask)


def available(tensor: torch.Tensor) -> bool:
    """Whether gptq() runs its blocks through the kernel: Triton and a CUDA tensor."""
    return triton_support.available(tensor)


def gptq_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: float,
               qmax: float, is_fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one block of columns of B matrices with error feedback. W1, scale, zero: [B, rows, block] fp32;
    Hinv1 [B, block, block]. -> (Q1, Err1)"""
    batch, rows, columns = W1.shape
    W1, Hinv1, scale = W1.contiguous(), Hinv1.contiguous(), scale.contiguous()
    zero = zero.contiguous() if zero is not None else scale  # unused when HAS_ZERO is False
    Q1, E1 = torch.empty_like(W1), torch.empty_like(W1)
    block_c = triton.next_power_of_2(columns)
    block_r = 16 if block_c <= 128 else 4
    grid = (triton.cdiv(rows, block_r), batch)
    _gptq_block_kernel[grid](W1, Hinv1, scale, zero, Q1, E1, rows, columns, W1.stride(1), Hinv1.stride(1),
                             scale.stride(1), zero.stride(1), Q1.stride(1), E1.stride(1), W1.stride(0), Hinv1.stride(0),
                             qmin, qmax, HAS_ZERO=zero is not scale, IS_FP8=is_fp8, BLOCK_R=block_r, BLOCK_C=block_c,
                             num_warps=4)
    return Q1, E1
