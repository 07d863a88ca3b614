"""Round-to-nearest quantization on a grid: scales, quantize, dequantize, int packing. Pure tensor math.

Conventions (those of GPTQ's reference code and of compressed-tensors, so that what we store is what loaders
compute): dequantized = (q - zero_point) * scale; a symmetric int grid maps [-absmax, absmax] onto
[qmin - 0.5, qmax + 0.5] (scale = absmax / 7.5 for int4), so every element's error is at most scale / 2;
FP8 E4M3 maps absmax onto 448. All arithmetic is fp32 whatever the input dtype; the scale is rounded to its
storage dtype *before* quantizing, so the stored (q, scale) pair is exactly what dequantizes.

Scale layouts (those of the checkpoint): tensor `[1]`, channel `[rows, 1]`, group `[rows, cols // group_size]`,
token `[..., 1]`.
"""

from __future__ import annotations

import torch

from ptqlab.schemes import QuantArgs

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def grid_range(args: QuantArgs) -> tuple[float, float]:
    """The smallest and largest value on the quantization grid."""
    if args.type == "float":
        return -FP8_MAX, FP8_MAX
    return float(-(2 ** (args.num_bits - 1))), float(2 ** (args.num_bits - 1) - 1)


def block_view(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View x so that each scale covers exactly the last dimension: [..., n_scales, block]."""
    if args.strategy == "tensor":
        return x.reshape(1, -1)
    if args.strategy in ("channel", "token"):
        return x
    columns = x.shape[-1]
    if columns % args.group_size:
        raise ValueError(f"group_size {args.group_size} does not divide the row length {columns}")
    return x.unflatten(-1, (columns // args.group_size, args.group_size))


def _stored_layout(per_block: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """From one value per block ([..., n_scales]) to the checkpoint's scale layout."""
    if args.strategy == "tensor":
        return per_block.reshape(1)
    if args.strategy in ("channel", "token"):
        return per_block.unsqueeze(-1)
    return per_block


def _broadcastable(scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """From the checkpoint's scale layout to one that broadcasts against `block_view(x)`."""
    if args.strategy == "group":
        return scale.unsqueeze(-1)
    return scale


def quant_params(
    x: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point, if asymmetric) of x for args.

    The scale is returned in `scale_dtype` (default x.dtype), clamped to that dtype's positive normal range so
    that an all-zero block, a block of denormals or a huge block never gives a zero, subnormal or infinite
    scale. Zero points are int8 (`None` for symmetric formats).
    """
    scale_dtype = scale_dtype or x.dtype
    qmin, qmax = grid_range(args)
    blocks = block_view(x.float(), args)
    if args.symmetric:
        absmax = blocks.abs().amax(dim=-1)
        half_range = FP8_MAX if args.type == "float" else (qmax - qmin) / 2
        scale = absmax / half_range
        lo = None
    else:
        # 0 stays exactly representable: zero padding and ReLU zeros dequantize to 0.
        lo = blocks.amin(dim=-1).clamp(max=0)
        hi = blocks.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
    info = torch.finfo(scale_dtype)
    scale = scale.clamp(min=info.tiny, max=info.max).to(scale_dtype)
    zero_point = None
    if lo is not None:
        zero_point = (qmin - lo / scale.float()).round().clamp(qmin, qmax).to(torch.int8)
        zero_point = _stored_layout(zero_point, args)
    return _stored_layout(scale, args), zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """x on the grid: int8 values in [qmin, qmax] for int formats, float8_e4m3fn for FP8. Same shape as x."""
    qmin, qmax = grid_range(args)
    blocks = block_view(x.float(), args)
    scaled = blocks / _broadcastable(scale, args).float()
    if zero_point is not None:
        scaled = scaled + _broadcastable(zero_point, args).float()
    if args.type == "float":
        q = scaled.clamp(qmin, qmax).to(FP8_DTYPE)
    else:
        q = scaled.round().clamp(qmin, qmax).to(torch.int8)
    return q.reshape(x.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(q - zero_point) * scale in `dtype` (default: the scale's dtype)."""
    dtype = dtype or scale.dtype
    blocks = block_view(q.float(), args)
    if zero_point is not None:
        blocks = blocks - _broadcastable(zero_point, args).float()
    return (blocks * _broadcastable(scale, args).float()).to(dtype).reshape(q.shape)


def fake_quantize(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Quantize and dequantize x with scales computed from x itself (dynamic activation quantization)."""
    scale, zero_point = quant_params(x, args, scale_dtype=torch.float32)
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, dtype=x.dtype)
