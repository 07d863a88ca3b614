"""Dynamic per-token activation quantization (W8A8, FP8) on the GPU as one Triton kernel: `fake_quantize_tokens`
(quantize-dequantize, the reference semantics used in calibration) and `quantize_tokens` (the grid values and
scales themselves, which the runtime's int8 / FP8 matmuls take), sharing one row computation.

primitives.fake_quantize in torch is ~10 passes over the activation (fp32 copy, absmax, divide, round, clamp,
casts, multiply); here one program takes one token's row, computes its scale and writes the dequantized row: one
read, one write. Same arithmetic as the torch path on a GPU (fp32; the scale as absmax times the fp32 reciprocal
of the grid's half range, which is how torch divides a CUDA tensor by a Python number; IEEE division of x by the
scale; round half to even; the same clamps), so the results are bitwise equal (tested on the GPU).
"""

from __future__ import annotations

from functools import lru_cache

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - CPU machines
    triton = None


if triton is not None:

    @triton.jit
    def _token_grid(X, row, columns, stride_x, qmin, qmax, inv_half_range, tiny, huge, IS_FP8: tl.constexpr,
                    BLOCK: tl.constexpr):
        """One token's row on its grid: (q as fp32 or float8, the row's fp32 scale, column offsets, mask)."""
        c = tl.arange(0, BLOCK)
        mask = c < columns
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        scale = tl.max(tl.abs(x), axis=0) * inv_half_range
        scale = tl.minimum(tl.maximum(scale, tiny), huge)
        scaled = tl.minimum(tl.maximum(libdevice.div_rn(x, scale), qmin), qmax)
        if IS_FP8:
            q = scaled.to(tl.float8e4nv)
        else:
            q = libdevice.rint(scaled)
        return q, scale, c, mask

    @triton.jit
    def _token_kernel(X, Y, columns, stride_x, stride_y, qmin, qmax, inv_half_range, tiny, huge, IS_FP8: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        q, scale, c, mask = _token_grid(X, row, columns, stride_x, qmin, qmax, inv_half_range, tiny, huge, IS_FP8, BLOCK)
        tl.store(Y + row * stride_y + c, (q.to(tl.float32) * scale).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _token_quant_kernel(X, Q, S, columns, stride_x, stride_q, qmin, qmax, inv_half_range, tiny, huge,
                            IS_FP8: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        q, scale, c, mask = _token_grid(X, row, columns, stride_x, qmin, qmax, inv_half_range, tiny, huge, IS_FP8, BLOCK)
        tl.store(Q + row * stride_q + c, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + row, scale)


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.shape[-1] <= 16384


def fake_quantize_tokens(x: torch.Tensor, qmin: float, qmax: float, half_range: float, is_fp8: bool) -> torch.Tensor:
    """Quantize-dequantize each row of x (any leading shape) with its own symmetric fp32 scale absmax / half_range."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    info = torch.finfo(torch.float32)
    block = triton.next_power_of_2(rows.shape[1])
    _token_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), out.stride(0), qmin, qmax, _reciprocal(half_range),
                                    info.tiny, info.max, IS_FP8=is_fp8, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out.reshape(x.shape)


def quantize_tokens(x: torch.Tensor, qmin: float, qmax: float, half_range: float, is_fp8: bool,
                    rows_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] on its grid: (q [rows_out, K] int8 or float8_e4m3fn, fp32 scale [rows_out, 1]), the same
    values fake_quantize_tokens dequantizes. Rows past M (when rows_out > M: padding some matmuls need) are zero."""
    rows = x if x.stride(-1) == 1 else x.contiguous()
    m, k = rows.shape
    rows_out = rows_out or m
    make = torch.zeros if rows_out > m else torch.empty
    q = make((rows_out, k), dtype=torch.float8_e4m3fn if is_fp8 else torch.int8, device=x.device)
    scale = make((rows_out, 1), dtype=torch.float32, device=x.device)
    info = torch.finfo(torch.float32)
    block = triton.next_power_of_2(k)
    _token_quant_kernel[(m,)](rows, q, scale, k, rows.stride(0), q.stride(0), qmin, qmax, _reciprocal(half_range),
                              info.tiny, info.max, IS_FP8=is_fp8, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return q, scale


@lru_cache
def _reciprocal(value: float) -> float:
    """fp32(1 / fp32(value)): what torch multiplies by when it divides a CUDA tensor by a Python number. Computed once
    per value, not on every forward."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(value, dtype=torch.float32))
