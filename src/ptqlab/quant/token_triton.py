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

from dataclasses import dataclass
from functools import lru_cache

import torch

from ptqlab import triton_support
from ptqlab.triton_support import libdevice, tl, triton


if triton is not None:

    @triton.jit
    def grid_row(x, qmin, qmax, inv_half_range, tiny, huge, IS_FP8: tl.constexpr):
        """A token's row x (fp32, padding zero) on its grid: (q as fp32 or float8, the row's fp32 scale)."""
        scale = tl.max(tl.abs(x), axis=0) * inv_half_range
        scale = tl.minimum(tl.maximum(scale, tiny), huge)
        scaled = tl.minimum(tl.maximum(libdevice.div_rn(x, scale), qmin), qmax)
        if IS_FP8:
            q = scaled.to(tl.float8e4nv)
        else:
            q = libdevice.rint(scaled)
        return q, scale

    @triton.jit
    def _token_grid(X, row, columns, stride_x, qmin, qmax, inv_half_range, tiny, huge, IS_FP8: tl.constexpr,
                    BLOCK: tl.constexpr):
        """One token's row loaded and put on its grid: (q, scale, column offsets, mask)."""
        c = tl.arange(0, BLOCK)
        mask = c < columns
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        q, scale = grid_row(x, qmin, qmax, inv_half_range, tiny, huge, IS_FP8)
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
    """Whether fake_quantize runs through the kernel: Triton, a CUDA tensor, and rows one program can hold."""
    return triton_support.available(x) and x.shape[-1] <= 16384


@dataclass(frozen=True)
class TokenGrid:
    """A symmetric per-token grid: values in [qmin, qmax] (int8, or FP8 E4M3), fp32 scale = absmax / half_range."""

    qmin: float
    qmax: float
    half_range: float
    is_fp8: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.is_fp8 else torch.int8

    def kernel_args(self) -> tuple[float, float, float, float, float]:
        """(qmin, qmax, fp32 reciprocal of half_range, smallest and largest scale) as the kernels take them."""
        info = torch.finfo(torch.float32)
        return self.qmin, self.qmax, _reciprocal(self.half_range), info.tiny, info.max


FP8_TOKENS = TokenGrid(-448.0, 448.0, 448.0, True)
INT8_TOKENS = TokenGrid(-128.0, 127.0, 127.5, False)


@dataclass
class QuantizedRows:
    """An activation already on its per-token grid, as int8 / FP8 matmuls take it: q [rows, K] and fp32 scale
    [rows, 1], where rows may exceed the activation's own (zero padding some matmuls need); `shape` is the
    activation's."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size


def empty_rows(rows: int, columns: int, grid: TokenGrid, device: torch.device, rows_out: int | None = None):
    """Buffers for `rows` quantized rows, zero-padded to `rows_out`: (q, scale)."""
    rows_out = max(rows, rows_out or rows)
    make = torch.zeros if rows_out > rows else torch.empty
    return (make((rows_out, columns), dtype=grid.dtype, device=device),
            make((rows_out, 1), dtype=torch.float32, device=device))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as contiguous rows [M, K] (a view when it already is)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _row_launch(columns: int) -> dict:
    """One program holds a whole row: its block and warps."""
    block = triton.next_power_of_2(columns)
    return {"BLOCK": block, "num_warps": 8 if block >= 4096 else 4}


def fake_quantize_tokens(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Quantize-dequantize each row of x (any leading shape) with its own symmetric fp32 scale absmax / half_range."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _token_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), out.stride(0), *grid.kernel_args(),
                                    IS_FP8=grid.is_fp8, **_row_launch(rows.shape[1]))
    return out.reshape(x.shape)


def quantize_tokens(x: torch.Tensor, grid: TokenGrid, rows_out: int | None = None) -> QuantizedRows:
    """Each row of x [..., K] on its grid: the same values fake_quantize_tokens dequantizes."""
    rows = _rows(x)
    m, k = rows.shape
    q, scale = empty_rows(m, k, grid, x.device, rows_out)
    _token_quant_kernel[(m,)](rows, q, scale, k, rows.stride(0), q.stride(0), *grid.kernel_args(), IS_FP8=grid.is_fp8,
                              **_row_launch(k))
    return QuantizedRows(q, scale, x.shape)


@lru_cache
def _reciprocal(value: float) -> float:
    """fp32(1 / fp32(value)): what torch multiplies by when it divides a CUDA tensor by a Python number. Computed once
    per value, not on every forward."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(value, dtype=torch.float32))
