"""The matmul of a decode step's few rows (1 to SMALL_BATCH) for the weight formats whose scales sit on rows or on
groups of 128 inputs: FP8 and INT8 weights with per-token activations (W8A8), and int4 weights with 16-bit
activations (W4A16). One Triton kernel (CUDA, or Triton's CPU interpreter for tests).

Why a kernel of our own: at a few rows a matmul is bound by reading the weight once, and the libraries' general
matmuls are not built for it. cuBLAS's FP8 `_scaled_mm` and `_int_mm` at 1-32 rows stream an 8-bit weight slower
than bf16 cuBLAS streams one twice its size (and `_int_mm` wants more than 16 rows, so decode pads), and dequantizing
int4 into a scratch weight for cuBLAS reads and writes three times the bf16 bytes. Here the weight is the first
operand of the tensor-core product ("swap AB": y^T = W x^T), so a tile holds BLOCK_N weight rows and all the step's
rows (at least 16, the product's smallest width, masked), and K is split across programs until every
multiprocessor streams weight; the format's arithmetic stays exact:
- FP8 x FP8 and INT8 x INT8 tiles multiply grid values on the tensor cores (fp32 / int32 sums), then both scales
  (the token's and the row's) and the bias apply once at the end;
- int4 tiles arrive as the runtime's packed planes (int4_kernels.int4_planes, 16 words per 128 inputs), become their
  values q = u - 8 in registers (exact in bf16 and fp16), and multiply the 16-bit activations on the tensor cores;
  each 128-input tile's sum times its group's scale (minus zero point x Σ x for asymmetric groups) adds into fp32.
With K split, each split writes fp32 partial sums and `kernels._sum_splits` adds them (the same as the other
decode kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqlab.runtime.int4_kernels import _row_major
from ptqlab.runtime.kernels import _multiprocessors, _sum_splits, pdl_launch
from ptqlab.triton_support import interpreted, tl, triton

SMALL_BATCH = 64
"""Rows up to which a decode step's matmul takes this kernel; above it prefill's paths (cuBLAS) take over."""
BLOCK_K = 128
"""Inputs per K tile: one run of int4 planes, one scale group of 128 (or a part of a larger group)."""
FORMATS = ("fp8", "int8", "int4")


@dataclass(frozen=True)
class Tile:
    """How one launch cuts the work: outputs per program (the product's long side), warps, software-pipelining
    stages, how many programs per multiprocessor the split of K aims for, and rows per program (0: all the rows,
    at least 16, in one; a number: tiles of that many rows over any number of rows, the int4 prefill matmul)."""

    block_n: int = 64
    warps: int = 4
    stages: int = 4
    programs_per_sm: int = 4
    block_m: int = 0


TILES = {"64x4w": Tile(64, 4, 4, 4), "128x4w": Tile(128, 4, 3, 2), "32x2w": Tile(32, 2, 4, 8)}
"""The tiles the kernel choice table (runtime/choice.py) tries, by name; the first is the default."""
PREFILL_TILES = {"128x128": Tile(128, 8, 3, 1, 128), "64x128": Tile(64, 4, 3, 2, 128)}
"""Tiles of outputs x rows for int4 at many rows (prefill): the same kernel over a grid of row tiles, a matmul with
the weight dequantized in registers instead of into a scratch copy for cuBLAS."""

if triton is not None:
    from ptqlab.runtime.int4_kernels import _planes
    from ptqlab.runtime.kernels import await_inputs

    _INTERPRETED = tl.constexpr(interpreted())

    @triton.jit
    def _small_batch_kernel(X, XS, W, WS, Z, Bias, Y, M, N, k_tiles, tiles_per_split, tiles_per_group, stride_xm,
                            stride_wn, stride_wsn, stride_zn, stride_ys, stride_ym, FORMAT: tl.constexpr,
                            HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """y[m, n] over this split's K tiles, computed as (W x^T)[n, m]. FORMAT 0: FP8 weights and FP8 grid values of
        x with per-token scales XS [M]; 1: the same in INT8; 2: int4 planes [N, K / 8] with scales WS per group of
        tiles_per_group tiles (zero points Z when HAS_ZERO) and 16-bit x."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rk = tl.arange(0, BLOCK_K)
        w_rows = W + rn[:, None].to(tl.int64) * stride_wn
        x_cols = X + rm[None, :].to(tl.int64) * stride_xm + rk[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
        r16 = tl.arange(0, 16)
        x_planes = X + rm[None, :].to(tl.int64) * stride_xm + r16[:, None]  # x^T of one int4 plane [16, BLOCK_M]
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, k_tiles)
        if FORMAT == 1:
            acc_int = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        await_inputs(PDL)
        for t in range(first, last):
            if FORMAT == 2:
                words = tl.load(w_rows + (t * (BLOCK_K // 8) + r16)[None, :], mask=n_mask[:, None], other=0,
                                eviction_policy="evict_first")
                values = _planes(words, X.dtype.element_ty)
                part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
                for j in tl.static_range(8):  # plane j: inputs 16 j .. 16 j + 15 of the tile
                    x = tl.load(x_planes + t * BLOCK_K + 16 * j, mask=m_mask[None, :], other=0.0)
                    if _INTERPRETED:  # the interpreter's bf16 products are wrong: the same exact values in fp32
                        x = x.to(tl.float32)
                    part = tl.dot(values[j], x, part)
                    if HAS_ZERO:
                        x_sum += tl.sum(x.to(tl.float32), axis=0)
                group = t // tiles_per_group
                scale = tl.load(WS + rn * stride_wsn + group, mask=n_mask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    zero = tl.load(Z + rn * stride_zn + group, mask=n_mask, other=0).to(tl.float32)
                    part -= zero[:, None] * x_sum[None, :]
                acc += part * scale[:, None]
            elif FORMAT == 1:
                x = tl.load(x_cols + t * BLOCK_K, mask=m_mask[None, :], other=0.0)
                w = tl.load(w_rows + (t * BLOCK_K + rk)[None, :], mask=n_mask[:, None], other=0,
                            eviction_policy="evict_first")
                acc_int += tl.dot(w, x, out_dtype=tl.int32)
            else:
                x = tl.load(x_cols + t * BLOCK_K, mask=m_mask[None, :], other=0.0)
                w = tl.load(w_rows + (t * BLOCK_K + rk)[None, :], mask=n_mask[:, None], other=0.0,
                            eviction_policy="evict_first")
                acc += tl.dot(w, x)
        if FORMAT != 2:
            if FORMAT == 1:
                acc = acc_int.to(tl.float32)
            w_scale = tl.load(WS + rn * stride_wsn, mask=n_mask, other=0.0).to(tl.float32)
            x_scale = tl.load(XS + rm, mask=m_mask, other=0.0)
            acc = acc * w_scale[:, None] * x_scale[None, :]
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y = Y + split * stride_ys + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def fits(fmt: str, k: int, group: int | None = None) -> bool:
    """Whether a layer of K inputs (int4: in scale groups of `group`, K for one per row) runs here: whole 128-input
    tiles, and for int4 groups that hold whole tiles."""
    if fmt not in FORMATS or k % BLOCK_K:
        return False
    return fmt != "int4" or (group or k) % BLOCK_K == 0


def small_batch_matmul(fmt: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       x_scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                       tile: Tile | None = None, pdl: bool = True) -> torch.Tensor:
    """x [M <= SMALL_BATCH, K] @ Wᵀ -> [M, N] in out_dtype (default x.dtype), computed in the format's arithmetic;
    int4 with a tile of PREFILL_TILES takes any number of rows.

    fmt "fp8" / "int8": x holds grid values (float8_e4m3fn / int8) with x_scale [M, 1] fp32 per token, weight
    [N, K] of the same dtype with scale [N, 1] (or [N]) fp32 per row. fmt "int4": x 16-bit, weight the int4 planes
    [N, K / 8] (16 words per plane), scale and zero_point [N, K / group] (group a multiple of 128). bias [N]."""
    m, k = x.shape
    tile = tile or next(iter(TILES.values()))
    if m > SMALL_BATCH and not (tile.block_m and fmt == "int4"):
        raise ValueError(f"{m} rows: the small-batch matmul takes at most {SMALL_BATCH} (int4: more with a tile of "
                         f"PREFILL_TILES)")
    x = x if x.stride(1) == 1 else x.contiguous()
    n = weight.shape[0]
    block_m = tile.block_m or max(16, triton.next_power_of_2(m))
    tiles_m = triton.cdiv(m, block_m)
    k_tiles = k // BLOCK_K
    if fmt == "int4":
        _row_major(scale, zero_point)
        group = k // scale.shape[1]
        tiles_per_group = group // BLOCK_K
        out_dtype = out_dtype or x.dtype
    else:
        scale = scale.reshape(n, -1)
        tiles_per_group = k_tiles
        out_dtype = out_dtype or torch.bfloat16
    tiles_n = triton.cdiv(n, tile.block_n)
    splits = max(1, min(triton.cdiv(tile.programs_per_sm * _multiprocessors(x.device), tiles_n * tiles_m), k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else out_dtype, device=x.device)
    zero = zero_point if zero_point is not None else scale
    xs = x_scale if x_scale is not None else scale
    _small_batch_kernel[(tiles_n, splits, tiles_m)](
        x, xs, weight, scale, zero, bias if bias is not None else scale, out, m, n, k_tiles, tiles_per_split,
        tiles_per_group, x.stride(0), weight.stride(0), scale.stride(0), zero.stride(0), out.stride(0),
        out.stride(1), FORMAT=FORMATS.index(fmt), HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None,
        BLOCK_N=tile.block_n, BLOCK_M=block_m, BLOCK_K=BLOCK_K, num_warps=tile.warps,
        num_stages=tile.stages, **pdl_launch(x.device, pdl))
    return _sum_splits(out, out_dtype, None, pdl)
