"""GPU kernels of the formats whose matmuls take FP8 activations with finer scales than a row (Triton): block-wise
FP8 (DeepSeek-V3's format: FP8 E4M3 weights with one scale per 128 x 128 block, activations with one scale per 128
columns of each token) and W4A8 (int4 weights with one scale per group of 128 inputs, activations with one scale per
token). Pure functions over tensors; CUDA (or Triton's CPU interpreter, for tests).

One matmul kernel serves both formats from 2 rows up: for each K tile of BLOCK_K inputs (one activation group, one
weight scale column) it multiplies grid values on the tensor cores in fp32 and adds the product times its scales
into an fp32 accumulator, as DeepSeek-V3's kernels do (Hopper's FP8 tensor cores accumulate a tile with reduced
precision; promoting each tile to fp32 keeps that error to one tile). Int4 weights arrive as the runtime's packed
planes (int4_kernels.int4_planes, 16 words per run of 128 inputs) and become FP8 in registers: -8..7 are exact in E4M3.
Up to SMALL_M rows (decode) tiles have 16 rows and K is split across programs so that the weight streams from every
multiprocessor; one row of block-wise FP8 has its own kernel on CUDA cores (`fp8_block_gemv`). Every kernel takes
activations already on their grid: `quantize_groups` (one small kernel per matmul, launched with programmatic
dependent launch: quantizing inside the matmul would repeat each row's divisions in every program and thread that
reads it, which made the one-row kernel bound by arithmetic), or the per-token quantizer (W4A8, mostly fused into
the norm before). The products are exact in fp32 (a few rows multiply in fp16, which holds every FP8 value), so
every kernel computes the format's own arithmetic, Σ_t s_x s_w Σ_k q_x q_w, up to fp32 rounding. Where torch's
`_scaled_mm` takes block-wise scales (cuBLAS on Hopper; `blockwise_scaled_mm_works`), the runtime's prefill can use
it instead: faster than the Triton matmul; exact per tile for W4A8's 1 x 128 weight scales, with accumulation as
imprecise as `_scaled_mm`'s fast accumulation for 128 x 128 blocks (so only with RuntimeOptions.fp8_fast_accum).
"""

from __future__ import annotations

import functools

import torch

from ptqlab.quant.token_triton import FP8_TOKENS
from ptqlab.runtime import int4_kernels
from ptqlab.runtime.kernels import SMALL_M, _split_k, _sum_splits, pdl_launch
from ptqlab.triton_support import interpreted, libdevice, tl, triton

BLOCK_K = 128
"""Inputs per K tile: the activation group and weight block width of block-wise FP8, one int4 plane run (W4A8)."""

if triton is not None:
    from ptqlab.runtime.kernels import await_inputs, grouped_tile

    _INTERPRETED = tl.constexpr(interpreted())

    @triton.jit
    def to_fp8(x):
        """fp32 values already clamped to ±448 as float8e4nv, rounded to nearest even. The interpreter's own
        conversion drops the carry into the exponent (31.6 -> 16), so there the value is first rounded exactly in
        fp32: normal values by an integer add on the bits (3 mantissa bits kept), subnormal ones (below 2^-6, steps
        of 2^-9) by adding and subtracting 2^14, whose fp32 spacing is 2^-9; the conversion is then exact."""
        if _INTERPRETED:
            bits = x.to(tl.uint32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
            magnitude = tl.abs(x)
            small = (magnitude + 16384.0) - 16384.0
            x = tl.where(magnitude < 0.015625, tl.where(x < 0, -small, small), normal)
        return x.to(tl.float8e4nv)

    @triton.jit
    def group_grid(x, valid, qmin, qmax, inv_half_range, tiny, huge):
        """Rows of x [R, G] (fp32, padding zero) each on its own FP8 grid: (q [R, G] float8e4nv, scale [R] fp32).
        token_triton.grid_row's arithmetic per row (scale = absmax times the fp32 reciprocal of 448, clamped; IEEE
        division; clamp), which is primitives.fake_quantize's on a GPU. Rows not `valid` (padding) divide by 1: a
        divisor as small as the clamp's floor takes libdevice's slow division path."""
        scale = tl.max(tl.abs(x), axis=1) * inv_half_range
        scale = tl.minimum(tl.maximum(scale, tiny), huge)
        scaled = libdevice.div_rn(x, tl.where(valid, scale, 1.0)[:, None])
        return to_fp8(tl.minimum(tl.maximum(scaled, qmin), qmax)), scale

    @triton.jit
    def _group_quant_kernel(X, Q, S, K, stride_x, stride_q, stride_sm, stride_sg, qmin, qmax, inv_half_range, tiny,
                            huge, GROUP: tl.constexpr, GROUPS: tl.constexpr, PDL: tl.constexpr):
        """GROUPS groups of one row per program."""
        await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        columns = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = (groups < K // GROUP)[:, None]
        x = tl.load(X + row * stride_x + columns, mask=mask, other=0.0).to(tl.float32)
        q, scale = group_grid(x, groups < K // GROUP, qmin, qmax, inv_half_range, tiny, huge)
        tl.store(Q + row * stride_q + columns, q, mask=mask)
        tl.store(S + row * stride_sm + groups * stride_sg, scale, mask=groups < K // GROUP)

    @triton.jit
    def _int4_tile(words, BLOCK_N: tl.constexpr):
        """A run of 16 plane words per row [BLOCK_N, 16] (int32) -> its 128 values q = u - 8 [BLOCK_N, 128] in fp32,
        in input order: nibble j of word w is input 16 j + w. The nibble goes into the mantissa of 2^23 (no
        int-to-float conversion), as int4_kernels._nibble does."""
        shifts = 4 * tl.arange(0, 8)
        u = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        values = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
        return tl.reshape(values, [BLOCK_N, 128])

    @triton.jit
    def _scaled_matmul_kernel(X, XS, W, WS, Bias, Y, M, N, k_tiles, tiles_per_split, w_rows_per_scale,
                              w_cols_per_scale, stride_xm, stride_xsm, stride_xsk, stride_wn, stride_wsn, stride_wsk,
                              stride_ys, stride_ym, INT4: tl.constexpr, X_GROUPS: tl.constexpr, FP16_DOT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
        """y[m, n] = Σ_t s_x[m, t] s_w[n, t] Σ_{k in tile t} q_x[m, k] q_w[n, k] over this split's K tiles.

        X: FP8 grid values [M, K] with scales XS per (row, K tile) when X_GROUPS, else per row [M, 1] (applied once
        at the end). W: FP8 [N, K], or when INT4 the int4 planes [N, K / 8] (16-word runs, BLOCK_K = 128). WS: the
        weight scale of (n, tile t) at row n // w_rows_per_scale, column (t BLOCK_K) // w_cols_per_scale. FP16_DOT:
        the tensor-core product in fp16 (every FP8 and int4 value is exact there; the small-row tiles), else FP8.
        The split (program_id(1)) writes its fp32 partial sums into its own slice of Y; bias goes into split 0's."""
        split = tl.program_id(1)
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        rk = tl.arange(0, BLOCK_K)
        x_rows = X + rm[:, None].to(tl.int64) * stride_xm
        w_rows = W + rn[:, None].to(tl.int64) * stride_wn
        ws_rows = WS + (rn // w_rows_per_scale) * stride_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        await_inputs(PDL)
        first = split * tiles_per_split
        for t in range(first, tl.minimum(first + tiles_per_split, k_tiles)):
            k0 = t * BLOCK_K
            x = tl.load(x_rows + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)
            if X_GROUPS:
                x_scale = tl.load(XS + rm * stride_xsm + t * stride_xsk, mask=m_mask, other=0.0)
            if INT4:
                words = tl.load(w_rows + (t * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8))[None, :],
                                mask=n_mask[:, None], other=0)
                w = _int4_tile(words, BLOCK_N)
            else:
                w = tl.load(w_rows + (k0 + rk)[None, :], mask=n_mask[:, None], other=0.0)
            if FP16_DOT:
                part = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
            else:
                part = tl.dot(x, tl.trans(w.to(tl.float8e4nv)))
            w_scale = tl.load(ws_rows + (k0 // w_cols_per_scale) * stride_wsk, mask=n_mask, other=0.0).to(tl.float32)
            if X_GROUPS:
                acc += part * (x_scale[:, None] * w_scale[None, :])
            else:
                acc += part * w_scale[None, :]
        if not X_GROUPS:
            acc *= tl.load(XS + rm * stride_xsm, mask=m_mask, other=0.0)[:, None]
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = Y + split * stride_ys + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _fp8_block_gemv_kernel(X, XS, W, WS, Bias, Y, N, k_tiles, tiles_per_split, w_rows_per_scale, stride_xs,
                               stride_wn, stride_wsn, stride_ys, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """One row on its FP8 grid (X [K] with scales XS, one per K tile of BLOCK_K) times the block-wise FP8 weight
        on CUDA cores: y[n] = Σ_t s_x[t] s_w[n, t] Σ_k q_x[k] q_w[n, k] over this split's K tiles. The next weight
        tile is requested before the current one's arithmetic; the first before waiting for the previous kernel."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rk = tl.arange(0, BLOCK_K)
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, k_tiles)
        w_rows = W + rn[:, None].to(tl.int64) * stride_wn
        ws_rows = WS + (rn // w_rows_per_scale) * stride_wsn
        w = tl.load(w_rows + (first * BLOCK_K + rk)[None, :], mask=n_mask[:, None], other=0.0,
                    eviction_policy="evict_first")
        await_inputs(PDL)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in range(first, last):
            more = ((t + 1) * BLOCK_K + rk < last * BLOCK_K)[None, :]
            next_w = tl.load(w_rows + ((t + 1) * BLOCK_K + rk)[None, :], mask=n_mask[:, None] & more, other=0.0,
                             eviction_policy="evict_first")
            x = tl.load(X + t * BLOCK_K + rk).to(tl.float32)
            part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            w_scale = tl.load(ws_rows + t, mask=n_mask, other=0.0)
            acc += part * (tl.load(XS + t * stride_xs) * w_scale)
            w = next_w
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(Y + split * stride_ys + rn, acc.to(Y.dtype.element_ty), mask=n_mask)


def quantize_groups(x: torch.Tensor, group: int = BLOCK_K, pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [..., K] on an FP8 grid per `group` columns (primitives' strategy "group"): (q [M, K]
    float8_e4m3fn, scale [M, K / group] fp32). The scale tensor is column-major (stride (1, M)), the layout
    cuBLAS's block-wise scaled matmul reads; the kernels here read either. pdl: programmatic dependent launch where
    the GPU has it (a decode step's kernel)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, k = rows.shape
    if k % group:
        raise ValueError(f"group {group} does not divide the row length {k}")
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((k // group, m), dtype=torch.float32, device=x.device).t()
    groups = min(8, triton.next_power_of_2(k // group))
    _group_quant_kernel[(m, triton.cdiv(k // group, groups))](
        rows, q, scale, k, rows.stride(0), q.stride(0), scale.stride(0), scale.stride(1), *FP8_TOKENS.kernel_args(),
        GROUP=group, GROUPS=groups, num_warps=4, **pdl_launch(x.device, pdl))
    return q, scale


def _matmul(x, x_scale, weight, weight_scale, w_rows_per_scale, w_cols_per_scale, bias, out_dtype, int4, x_groups,
            pdl):
    """The launch behind fp8_block_matmul and w4a8_matmul: tiles of 16 rows with K split across programs for up to
    SMALL_M rows (the weight streams from every multiprocessor; products in fp16), 64- or 128-row FP8 tiles above."""
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    k_tiles = k // BLOCK_K
    if m <= SMALL_M:
        block_m, block_n, warps, stages, fp16_dot, per_sm, min_tiles = 16, 64, 4, 4, True, 4, 4
    else:
        block_m = 64 if m <= 64 else 128
        block_n, warps, stages, fp16_dot, per_sm, min_tiles = 128, 4 if block_m == 64 else 8, 3, False, 1, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, tiles_per_split = _split_k(tiles, k_tiles, x.device, per_sm, min_tiles)
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else out_dtype, device=x.device)
    ws = weight_scale
    _scaled_matmul_kernel[(tiles, splits)](
        x, x_scale, weight, ws, bias if bias is not None else ws, out, m, n, k_tiles, tiles_per_split,
        w_rows_per_scale, w_cols_per_scale, x.stride(0), x_scale.stride(0), x_scale.stride(1), weight.stride(0),
        ws.stride(0), ws.stride(1), out.stride(0), out.stride(1), INT4=int4, X_GROUPS=x_groups, FP16_DOT=fp16_dot,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=8, num_warps=warps,
        num_stages=stages, **pdl_launch(x.device, pdl))
    return _sum_splits(out, out_dtype, None, pdl)


GEMV_TILE = (32, 2, 16)
"""The one-row block-wise FP8 kernel's tile: (outputs per program, warps, programs per multiprocessor that the split
of K aims for); the fastest of those bench/format_kernels.py tries on the 8B shapes' large layers."""


def fp8_block_gemv(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   block_rows: int, bias: torch.Tensor | None, out_dtype: torch.dtype, pdl: bool = True,
                   tile: tuple[int, int, int] = GEMV_TILE) -> torch.Tensor:
    """Block-wise FP8, one row: x [1, K] FP8 grid values with x_scale [1, K / 128] (`quantize_groups`) @ (weight
    [N, K] float8 with weight_scale [ceil(N / block_rows), K / 128])ᵀ -> [1, N] in out_dtype (+ bias), on CUDA cores
    with K split across programs. tile: (outputs, warps, programs per multiprocessor), GEMV_TILE by default."""
    block_n, warps, per_sm = tile
    n, k = weight.shape
    k_tiles = k // BLOCK_K
    tiles_n = triton.cdiv(n, block_n)
    splits, tiles_per_split = _split_k(tiles_n, k_tiles, x.device, per_sm, 2)
    out = torch.empty((splits, 1, n), dtype=torch.float32 if splits > 1 else out_dtype, device=x.device)
    _fp8_block_gemv_kernel[(tiles_n, splits)](
        x, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, n, k_tiles, tiles_per_split,
        block_rows, x_scale.stride(1), weight.stride(0), weight_scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=warps, **pdl_launch(x.device, pdl))
    return _sum_splits(out, out_dtype, None, pdl)


def fp8_block_matmul(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     block_rows: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
                     pdl: bool = True) -> torch.Tensor:
    """Block-wise FP8: x [M, K] FP8 grid values with x_scale [M, K / 128] (`quantize_groups`) @ (weight [N, K]
    float8 with weight_scale [ceil(N / block_rows), K / 128] per block)ᵀ -> [M, N] in out_dtype (+ bias). K: a
    multiple of 128."""
    return _matmul(x, x_scale, weight, weight_scale, block_rows, BLOCK_K, bias, out_dtype, int4=False, x_groups=True,
                   pdl=pdl)


def w4a8_matmul(x: torch.Tensor, x_scale: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, pdl: bool = True) -> torch.Tensor:
    """W4A8: x [M, K] FP8 grid values with x_scale [M, 1] (per token) @ (int4 planes [N, K / 8] as
    int4_kernels.int4_planes packs them with planes of 16 words, symmetric, scale [N, K / group])ᵀ -> [M, N] in
    out_dtype (+ bias). K and the group: multiples of 128."""
    k = x.shape[1]
    return _matmul(x, x_scale, planes, scale, 1, k // scale.shape[1], bias, out_dtype, int4=True, x_groups=False,
                   pdl=pdl)


def int4_to_fp8(planes: torch.Tensor, k: int) -> torch.Tensor:
    """The int4 grid values q [N, K] of `planes` (planes of 16 words) as float8_e4m3fn, unscaled (-8..7 are exact):
    the int4 dequantization kernel with a scale of one per group."""
    ones = torch.ones((1, k // BLOCK_K), dtype=torch.float32, device=planes.device).expand(planes.shape[0], -1)
    return int4_kernels.int4_dequantize(planes, ones, None, k, torch.float8_e4m3fn)


def cublas_weight_scale(weight_scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    """A weight's block scales [ceil(N / block_rows), K / 128] (fp32) as torch._scaled_mm takes them for the
    transposed weight: [K / 128, ceil(N / block_rows)], with N contiguous for scales per row (block_rows 1)."""
    return weight_scale.t() if block_rows > 1 else weight_scale.t().contiguous()


def scaled_mm_blockwise(q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale_t: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm with block-wise scales (cuBLAS on Hopper): q [M, K] float8 with x_scale [M, K / 128]
    (column-major, as quantize_groups writes it) @ (weight [N, K] float8 with `cublas_weight_scale`'s scales per 128
    x 128 block or per row and 128 columns)ᵀ -> [M, N] in out_dtype."""
    return torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=weight_scale_t, out_dtype=out_dtype)


def columns_of(x_scale: torch.Tensor, groups: int) -> torch.Tensor:
    """A per-token scale [M, 1] as a scale per 128 columns [M, groups], column-major (scaled_mm_blockwise's layout)."""
    out = torch.empty((groups, x_scale.shape[0]), dtype=torch.float32, device=x_scale.device).t()
    return out.copy_(x_scale.expand(-1, groups))


@functools.cache
def blockwise_scaled_mm_works(device_index: int, weight_block_rows: int, n: int, k: int) -> bool:
    """Whether this torch multiplies FP8 with block-wise scales on this GPU for a weight [n, k] (activations 1 x 128,
    weights `weight_block_rows` x 128: 128 for block-wise FP8, 1 for W4A8's groups) and gets the values right: tried
    once per device and shape on 64 rows of grid values -2..2 with scales 1, 2, 4, within 2^-7 of Σ|x w|. That
    admits reduced-precision accumulation (cuBLAS's 128 x 128 kernel accumulates like _scaled_mm's fast
    accumulation, errors near 2^-10 of Σ|x w|) and refuses what a misread scale layout gives (errors of the size of
    the result), for the shape at hand: cuBLAS picks its kernels by shape (on an H200 with torch 2.11, the 128 x 128
    kernel gave wrong values at K = 256 and right ones from K = 512)."""
    device = torch.device("cuda", device_index)
    generator = torch.Generator(device=device).manual_seed(0)
    m = 64
    q = torch.randint(-2, 3, (m, k), device=device, generator=generator).float()
    w = torch.randint(-2, 3, (n, k), device=device, generator=generator).float()
    x_scale = torch.empty((k // BLOCK_K, m), device=device).t()
    x_scale.copy_(2.0 ** torch.randint(0, 3, (m, k // BLOCK_K), device=device, generator=generator).float())
    w_scale = 2.0 ** torch.randint(0, 3, (triton.cdiv(n, weight_block_rows), k // BLOCK_K), device=device,
                                   generator=generator).float()
    x = (q.unflatten(1, (-1, BLOCK_K)) * x_scale[..., None]).flatten(1)
    weight = (w.unflatten(1, (-1, BLOCK_K)) * w_scale.repeat_interleave(weight_block_rows, 0)[:n, :, None]).flatten(1)
    try:
        y = scaled_mm_blockwise(q.to(torch.float8_e4m3fn), x_scale, w.to(torch.float8_e4m3fn),
                                cublas_weight_scale(w_scale, weight_block_rows), torch.float32)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return bool(((y - x @ weight.T).abs() <= 2.0 ** -7 * (x.abs() @ weight.abs().T)).all())
