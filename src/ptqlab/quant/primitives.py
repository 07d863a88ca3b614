"""Number grids: scales (min-max, or a Hessian-weighted clipping search), quantize, dequantize, fake-quantize.
Pure tensor math.

Conventions (those of GPTQ's reference code and of compressed-tensors, so that what we store is what loaders
compute): dequantized = (q - zero_point) * scale; a symmetric int grid maps [-absmax, absmax] onto
[qmin - 0.5, qmax + 0.5] (scale = absmax / 7.5 for int4), so every element's error is at most scale / 2;
FP8 E4M3 maps absmax onto 448. All arithmetic is fp32 whatever the input dtype; the scale is rounded to its
storage dtype *before* quantizing, so the stored (q, scale) pair is exactly what dequantizes.

Scale layouts (those of the checkpoint): tensor `[1]`, channel `[rows, 1]`, group and tensor_group
`[rows, cols // group_size]`, block `[ceil(rows / block rows), ceil(cols / block columns)]` (edge blocks partial, as
if zero-padded), token `[..., 1]`. FP4 formats (NVFP4, MXFP4) keep their scales in their stored dtypes (FP8, E8M0
uint8) and go through quant/fp4.py; NVFP4's `global_scale` is passed beside them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptqlab.quant import fp4, search_triton, token_triton
from ptqlab.schemes import QuantArgs, is_fp4

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def grid_range(args: QuantArgs) -> tuple[float, float]:
    """The smallest and largest value on the quantization grid."""
    if args.type == "float":
        return (-fp4.E2M1_MAX, fp4.E2M1_MAX) if args.num_bits == 4 else (-FP8_MAX, FP8_MAX)
    return float(-(2 ** (args.num_bits - 1))), float(2 ** (args.num_bits - 1) - 1)


def block_view(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View x so that each scale covers exactly the last dimension: [..., n_scales, block]. A copy for 2-D blocks:
    [row blocks, column blocks, rows x columns], zero-padded to whole blocks (zeros never raise an absmax)."""
    if args.strategy == "tensor":
        return x.reshape(1, -1)
    if args.strategy in ("channel", "token"):
        return x
    if args.strategy == "block":
        (rows, columns), (height, width) = x.shape, args.block_structure
        padded = F.pad(x, (0, -columns % width, 0, -rows % height))
        tiles = padded.unflatten(0, (-1, height)).unflatten(2, (-1, width)).transpose(1, 2)
        return tiles.flatten(2)
    columns = x.shape[-1]
    if columns % args.group_size:
        raise ValueError(f"group_size {args.group_size} does not divide the row length {columns}")
    return x.unflatten(-1, (columns // args.group_size, args.group_size))


def unblock(blocks: torch.Tensor, args: QuantArgs, shape: torch.Size) -> torch.Tensor:
    """The inverse of block_view: a tensor of `shape` again."""
    if args.strategy != "block":
        return blocks.reshape(shape)
    height, width = args.block_structure
    tiles = blocks.unflatten(2, (height, width)).transpose(1, 2)
    return tiles.flatten(0, 1).flatten(1)[:shape[0], :shape[1]]


def _stored_layout(per_block: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """From one value per block ([..., n_scales]) to the checkpoint's scale layout."""
    if args.strategy == "tensor":
        return per_block.reshape(1)
    if args.strategy in ("channel", "token"):
        return per_block.unsqueeze(-1)
    return per_block


def _broadcastable(scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """From the checkpoint's scale layout to one that broadcasts against `block_view(x)`."""
    if args.strategy in ("group", "tensor_group", "block"):
        return scale.unsqueeze(-1)
    return scale


def quant_params(
    x: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point, if asymmetric) of x for args.

    The scale is returned in `scale_dtype` (default x.dtype), clamped to that dtype's positive normal range so
    that an all-zero block, a block of denormals or a huge block never gives a zero, subnormal or infinite
    scale. Zero points are int8 (`None` for symmetric formats). FP4: the stored scales (fp4.stored_scales, computed
    in `scale_dtype`; NVFP4's relative to `global_scale`).
    """
    if is_fp4(args):
        return fp4.stored_scales(x, args, scale_dtype or x.dtype, global_scale), None
    scale, zero_point = _params_from_range(*_block_range(block_view(x.float(), args), args), args, scale_dtype or x.dtype)
    return _stored_layout(scale, args), None if zero_point is None else _stored_layout(zero_point, args)


def _block_range(blocks: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(lo, hi) of each block, lo None for symmetric formats (hi is then the absolute maximum)."""
    if args.symmetric:
        return None, blocks.abs().amax(dim=-1)
    # 0 stays exactly representable: zero padding and ReLU zeros dequantize to 0.
    return blocks.amin(dim=-1).clamp(max=0), blocks.amax(dim=-1).clamp(min=0)


def _params_from_range(lo: torch.Tensor | None, hi: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype):
    """Scale (scale_dtype) and int8 zero point (None if symmetric) per block, mapping [lo, hi] onto the grid."""
    qmin, qmax = grid_range(args)
    if lo is None:
        scale = hi / (FP8_MAX if args.type == "float" else (qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    info = torch.finfo(scale_dtype)
    scale = scale.clamp(min=info.tiny, max=info.max).to(scale_dtype)
    if lo is None:
        return scale, None
    return scale, (qmin - lo / scale.float()).round().clamp(qmin, qmax).to(torch.int8)


def search_candidates(symmetric: bool, shrink_steps: int = 40, max_shrink: float = 0.4,
                      range_steps: int = 8) -> torch.Tensor:
    """The clipping search's candidates [n, 2] fp32: (factor on the block's min, factor on its max), the first (1, 1)
    (min-max). Symmetric grids: (p, p) for p = 1, 1 - max_shrink/shrink_steps, ..., 1 - max_shrink. Asymmetric
    grids: those, then every pair of factors 1, 1 - max_shrink/range_steps, ..., 1 - max_shrink not already there.

    A common factor shrinks [lo, hi] about 0, so the zero point stays where min-max put it; a block whose outlier is
    on one side (a big positive weight among small negatives) wants that side clipped and the other kept. Factors for
    lo and hi apart let the range's ends (and with them the zero point) move on their own; the coarser 2-D grid keeps
    the cost at ~3x the common factor's (113 candidates to 41 at the defaults), and keeping the common-factor
    candidates makes the error never above the common-factor search's (nor min-max's)."""
    shrinks = (1.0 - max_shrink * torch.arange(shrink_steps + 1, dtype=torch.float64) / shrink_steps).float()
    pairs = [(float(p), float(p)) for p in shrinks]
    if not symmetric:
        factors = (1.0 - max_shrink * torch.arange(range_steps + 1, dtype=torch.float64) / range_steps).float()
        seen = set(pairs)
        pairs += [(float(a), float(b)) for a in factors for b in factors if (float(a), float(b)) not in seen]
    return torch.tensor(pairs, dtype=torch.float32)


def search_quant_params(
    x: torch.Tensor,
    args: QuantArgs,
    scale_dtype: torch.dtype | None = None,
    importance: torch.Tensor | None = None,
    shrink_steps: int = 40,
    max_shrink: float = 0.4,
    range_steps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per block, the clipped min-max range that minimizes the block's rounding error over the candidates of
    `search_candidates` (min-max's lo and hi each scaled by its factor), keeping each block's first best (int
    formats).

    Min-max maps the block's largest value exactly onto the grid's end, which wastes resolution on one outlier;
    shrinking the range rounds that value worse but every other one better. The error is Σ importance_j ·
    (x_j - x̂_j)² over the block, `importance` [columns] weighting inputs (e.g. the diagonal of the layer's
    input Hessian: clipping costs little on an input that is small); None weights all equally. Same layouts and
    dtypes as quant_params; (1, 1) is a candidate, so the error is never above min-max's.
    """
    if args.type == "float":
        return quant_params(x, args, scale_dtype)
    scale_dtype = scale_dtype or x.dtype
    qmin, qmax = grid_range(args)
    blocks = block_view(x.float(), args)
    candidates = search_candidates(args.symmetric, shrink_steps, max_shrink, range_steps).to(x.device)
    if args.strategy in ("group", "channel") and x.dim() == 2 and search_triton.available(x, blocks.shape[-1], scale_dtype):
        scale, zero_point = search_triton.search_blocks(blocks, importance, candidates, args.symmetric, qmin, qmax, scale_dtype)
        return _stored_layout(scale, args), None if zero_point is None else _stored_layout(zero_point, args)
    weights = None if importance is None else block_view(importance.float().to(x.device).expand(x.shape), args)
    lo, hi = _block_range(blocks, args)
    best = None
    for lo_factor, hi_factor in candidates:
        scale, zero_point = _params_from_range(None if lo is None else lo * lo_factor, hi * hi_factor, args, scale_dtype)
        s = scale.float().unsqueeze(-1)
        z = 0.0 if zero_point is None else zero_point.float().unsqueeze(-1)
        sq = (((blocks / s + z).round().clamp(qmin, qmax) - z) * s - blocks).square()
        err = (sq if weights is None else sq * weights).sum(-1)
        if best is None:
            best = [err, scale, zero_point]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zero_point is not None:
            best[2] = torch.where(better, zero_point, best[2])
    _, scale, zero_point = best
    return _stored_layout(scale, args), None if zero_point is None else _stored_layout(zero_point, args)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantArgs,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x on the grid: int8 values in [qmin, qmax] for int formats, float8_e4m3fn for FP8 and FP4 (E2M1 values).
    Same shape as x."""
    if is_fp4(args):
        return fp4.quantize(x, fp4.scale_values(scale, args, global_scale))
    qmin, qmax = grid_range(args)
    blocks = block_view(x.float(), args)
    scaled = blocks / _broadcastable(scale, args).float()
    if zero_point is not None:
        scaled = scaled + _broadcastable(zero_point, args).float()
    if args.type == "float":
        q = scaled.clamp(qmin, qmax).to(FP8_DTYPE)
    else:
        q = scaled.round().clamp(qmin, qmax).to(torch.int8)
    return unblock(q, args, x.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    dtype: torch.dtype | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q - zero_point) * scale in `dtype` (default: the scale's dtype; float32 for FP4, whose scales are FP8 or
    uint8)."""
    if is_fp4(args):
        return fp4.dequantize(q, fp4.scale_values(scale, args, global_scale), dtype or torch.float32)
    dtype = dtype or scale.dtype
    blocks = block_view(q.float(), args)
    if zero_point is not None:
        blocks = blocks - _broadcastable(zero_point, args).float()
    return unblock((blocks * _broadcastable(scale, args).float()).to(dtype), args, q.shape)


def fake_quantize(x: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize x with scales computed from x itself (dynamic activation quantization; NVFP4's relative
    to the calibrated `global_scale`).

    Per-token symmetric formats on a GPU run as one Triton kernel with bitwise the same result (token_triton.py)."""
    if is_fp4(args):
        return fp4.fake_quantize(x, args, global_scale)
    if args.strategy == "token" and args.symmetric and token_triton.available(x):
        qmin, qmax = grid_range(args)
        half_range = FP8_MAX if args.type == "float" else (qmax - qmin) / 2
        return token_triton.fake_quantize_tokens(x, token_triton.TokenGrid(qmin, qmax, half_range, args.type == "float"))
    scale, zero_point = quant_params(x, args, scale_dtype=torch.float32)
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, dtype=x.dtype)
