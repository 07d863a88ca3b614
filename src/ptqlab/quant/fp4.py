"""FP4 E2M1 number formats, NVFP4 and MXFP4, exactly as compressed-tensors computes and stores them. Pure tensor math.

An FP4 E2M1 value is one of ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; a group of columns shares one scale:
- NVFP4: groups of 16, each scale stored in FP8 E4M3 and divided by one fp32 global scale per tensor (2688 / absmax
  of the tensor: 448 × 6, so that the largest group scale uses FP8's whole range). The value stored is
  s = fp8(global × absmax_group / 6); what quantizes and dequantizes is s / global, in fp32.
- MXFP4: groups of 32, each scale a power of two stored as a uint8 E8M0 exponent (bias 127), no global scale.
Every step follows compressed-tensors 0.19 (quantization/utils/helpers.py, mxfp_utils.py, fp4_utils.py), including
the dtype each intermediate is rounded to (the weight's own: a bf16 model's absmax / 6 is rounded to bf16), so that
the stored scales and grid values are bitwise those llm-compressor writes.

Grid values are held as float8_e4m3fn tensors in memory (every E2M1 value is exact in E4M3: one byte per value, as
the other formats); how they are stored, two per uint8, is the storage formats' (number_formats.pack_fp4).
"""

from __future__ import annotations

import torch

from ptqlab.schemes import QuantArgs, is_fp4

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
E2M1_MAX = 6.0
GLOBAL_RANGE = FP8_MAX * E2M1_MAX
"""NVFP4's global scale is GLOBAL_RANGE / absmax: the tensor's absmax maps onto FP8's largest scale times FP4's
largest value."""
MX_BIAS = 127
MX_ELEMENT_EXPONENT = 2
"""floor(log2(6)): MXFP4's scale is the group absmax's power of two divided by 2² (compressed-tensors' offset)."""
NVFP4_ZERO_SCALE = 0.125
"""What compressed-tensors puts in place of a zero NVFP4 group scale (an all-zero group): FP8's eps."""


def has_global_scale(args: QuantArgs | None) -> bool:
    """NVFP4 (strategy tensor_group): group scales relative to one fp32 global scale per tensor."""
    return args is not None and is_fp4(args) and args.strategy == "tensor_group"


def has_input_global_scale(scheme) -> bool:
    """NVFP4 activations (a Scheme's): a global scale per layer input, calibrated from the absmax of that input over
    the calibration set, as llm-compressor's static_minmax observer."""
    return scheme.input_activations is not None and is_fp4(scheme.input_activations)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 value of each element of x (within ±6), ties to the even mantissa, as compressed-tensors'
    cast_to_fp4: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. Same dtype as x; a small
    negative value rounds to -0.0 (its sign survives into the packed nibble, as there)."""
    a = x.abs()
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return q.to(x.dtype) * torch.sign(x)


def groups(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """x [..., columns] viewed as [..., columns / group_size, group_size]."""
    columns = x.shape[-1]
    if columns % args.group_size:
        raise ValueError(f"group_size {args.group_size} does not divide the row length {columns}")
    return x.unflatten(-1, (columns // args.group_size, args.group_size))


def global_scale(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4's fp32 global scale [1] of a tensor (or of fused tensors together) whose largest |value| is `absmax`:
    GLOBAL_RANGE / absmax computed in `dtype` (the weight's or activation's), 1 where that is not finite (an all-zero
    tensor), as compressed-tensors' generate_gparam."""
    absmax = absmax.to(dtype).reshape(1)
    absmax = absmax.clamp(min=torch.finfo(dtype).tiny)
    scale = GLOBAL_RANGE / absmax
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32)


def nvfp4_scales(x: torch.Tensor, global_scale: torch.Tensor, args: QuantArgs, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 group scales [..., groups] as stored (float8_e4m3fn): fp8(global × absmax / 6), the absmax / 6 in
    `dtype`, the product in fp32; a zero scale becomes 0.125."""
    absmax = groups(x.to(dtype), args).abs().amax(dim=-1)
    local = absmax / E2M1_MAX
    scale = (global_scale.float() * local).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    return torch.where(scale == 0, NVFP4_ZERO_SCALE, scale).to(FP8_DTYPE)


def _round_to_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' round_to_power_2 on non-negative x: a quarter of the exponent step added to the bits, the
    mantissa masked off (so a mantissa of 1.75 or more rounds up to the next power of two). Same dtype."""
    bits = {torch.float32: (torch.int32, 23, 8), torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
            torch.float64: (torch.int64, 52, 11)}
    if x.dtype not in bits:
        raise TypeError(f"MXFP4 scales of a {x.dtype} tensor")
    int_dtype, mantissa, exponent = bits[x.dtype]
    wide = torch.int64 if int_dtype == torch.int64 else torch.int32
    raw = x.view(int_dtype).to(wide)
    if int_dtype == torch.int16:
        raw = raw & 0xFFFF
    rounded = (raw + (1 << (mantissa - 2))) & (((1 << (exponent + 1)) - 1) << mantissa)
    return rounded.to(int_dtype).view(x.dtype)


def mxfp4_scales(x: torch.Tensor, args: QuantArgs, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 group scales [..., groups] as stored: uint8 E8M0 exponents, 127 + floor(log2(the group absmax rounded to
    a power of two)) - 2, through compressed-tensors' steps in `dtype` (clamped to 0..255; a scale that underflows
    `dtype` becomes 1)."""
    absmax = groups(x.to(dtype), args).abs().amax(dim=-1)
    exponent = MX_BIAS + torch.floor(torch.log2(_round_to_power_of_two(absmax))) - MX_ELEMENT_EXPONENT
    exponent = exponent.clamp(0, 255).round().to(torch.uint8)
    scale = (2.0 ** (exponent.to(torch.int32) - MX_BIAS).to(torch.float32)).to(dtype)
    scale = torch.where(scale == 0, torch.ones((), dtype=dtype, device=x.device), scale)
    return (MX_BIAS + torch.floor(torch.log2(scale)).to(torch.int32)).to(torch.uint8)


def stored_scales(x: torch.Tensor, args: QuantArgs, dtype: torch.dtype,
                  global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The group scales of x [..., columns] as the checkpoint stores them (NVFP4: relative to `global_scale`)."""
    if args.strategy == "group":
        return mxfp4_scales(x, args, dtype)
    if global_scale is None:
        raise ValueError("NVFP4 scales are relative to a global scale: give the tensor's (globals_of)")
    return nvfp4_scales(x, global_scale, args, dtype)


def globals_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4's global scale of x alone."""
    return global_scale(x.to(dtype).abs().amax(), dtype)


def scale_values(scale: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None) -> torch.Tensor:
    """What the stored scales [..., groups] multiply the E2M1 values by, in fp32: NVFP4 scale / global, MXFP4
    2^(exponent - 127)."""
    if args.strategy == "group":
        return torch.exp2(scale.to(torch.int32).float() - MX_BIAS)
    if global_scale is None:
        raise ValueError("NVFP4 scales need their tensor's global scale")
    return scale.float() / global_scale.float().to(scale.device)


def quantize(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x [..., columns] on the E2M1 grid given fp32 scale values [..., groups] (scale_values): the E2M1 values as
    float8_e4m3fn, same shape as x. x / scale in fp32, as compressed-tensors divides."""
    group_size = x.shape[-1] // values.shape[-1]
    blocks = x.float().unflatten(-1, (values.shape[-1], group_size)) / values.unsqueeze(-1)
    return round_to_e2m1(blocks.clamp(-E2M1_MAX, E2M1_MAX)).flatten(-2).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E2M1 values [..., columns] times their fp32 scale values [..., groups], in fp32, then `dtype`."""
    blocks = q.float().unflatten(-1, (values.shape[-1], -1))
    return (blocks * values.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None) -> torch.Tensor:
    """NVFP4 activations: x quantized and dequantized per group of 16 with group scales computed from x itself,
    relative to the calibrated `global_scale` (None: 1), as compressed-tensors' dynamic `local` quantization. In x's
    dtype."""
    gscale = torch.ones(1, device=x.device) if global_scale is None else global_scale.to(x.device)
    values = scale_values(nvfp4_scales(x, gscale, args, x.dtype), args, gscale)
    return dequantize(quantize(x, values), values, x.dtype)
