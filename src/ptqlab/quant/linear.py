"""`QuantizedLinear`: a linear layer that holds its weight on the quantization grid and computes with it.

This is ptqlab's in-memory quantized model and the reference semantics of every checkpoint it writes:
the weight is (q - zero_point) * scale, and where the scheme quantizes activations, each input token is
quantized dynamically (fp32 scale = absmax / grid half-range, as vLLM's kernels do) before the matmul. NVFP4 adds
two fp32 scalars: the weight's global scale (its FP8 group scales are relative to it) and, where activations are
NVFP4 too, the input's calibrated global scale.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab.quant import fp4
from ptqlab.quant.primitives import dequantize, fake_quantize, quant_params, quantize
from ptqlab.schemes import QuantArgs, Scheme, is_fp4


def rtn(
    weight: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: min-max scales, then each weight to its nearest grid point. -> (q, scale, zero_point).
    NVFP4: scales relative to `global_scale`, which the caller gives (fp4.globals_of for the weight alone)."""
    scale, zero_point = quant_params(weight, args, scale_dtype, global_scale)
    return quantize(weight, scale, zero_point, args, global_scale), scale, zero_point


class QuantizedLinear(nn.Module):
    """y = quant(x) @ dequant(q)^T + b, with the stored tensors of a compressed-tensors checkpoint."""

    def __init__(
        self,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None,
        bias: torch.Tensor | None,
        scheme: Scheme,
        weight_global_scale: torch.Tensor | None = None,
        input_global_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q)  # [out, in], int8 values or float8_e4m3fn (FP8, FP4's E2M1 values)
        self.register_buffer("weight_scale", weight_scale)  # model dtype (FP4: fp8 or uint8); layout per strategy
        self.register_buffer("weight_zero_point", weight_zero_point)  # int8, asymmetric only
        self.register_buffer("weight_global_scale", weight_global_scale)  # NVFP4: fp32 [1]
        self.register_buffer("input_global_scale", input_global_scale)  # NVFP4 activations: fp32 [1], calibrated
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme,
        q: torch.Tensor | None = None, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = None, global_scale: torch.Tensor | None = None,
        input_global_scale: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """Quantize `weight` by round-to-nearest (scales in `scale_dtype`, default the weight's), or wrap an already
        computed (q, scale, zero_point). NVFP4: `global_scale` is the weight's (default: its own, computed here),
        `input_global_scale` the input's, calibrated."""
        if fp4.has_global_scale(scheme.weights) and global_scale is None:
            if q is not None:
                raise ValueError("NVFP4 grid values need the global scale their scales are relative to")
            global_scale = fp4.globals_of(weight.detach(), scale_dtype or weight.dtype)
        if q is None:
            q, scale, zero_point = rtn(weight.detach(), scheme.weights, scale_dtype=scale_dtype or weight.dtype,
                                       global_scale=global_scale)
        return cls(q, scale, zero_point, None if bias is None else bias.detach(), scheme, global_scale,
                   input_global_scale)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model (model.float(), .to(torch.bfloat16)) converts scales and bias but must keep
        # the stored grid values in their format (and FP4's scales, FP8 or uint8, and fp32 global scales); device
        # moves apply to everything.
        kept = ["weight_q"] + (["weight_scale", "weight_global_scale", "input_global_scale"]
                               if is_fp4(self.scheme.weights) else [])
        before = {name: getattr(self, name) for name in kept if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            if getattr(self, name).dtype != tensor.dtype:  # the stored values, where the cast moved them
                setattr(self, name, tensor.to(getattr(self, name).device))
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight_q, self.weight_scale, self.weight_zero_point, self.scheme.weights, dtype,
                          self.weight_global_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.input_activations is not None:
            acts = self.scheme.input_activations  # (x, args): the seam tests swap another arithmetic into
            x = fake_quantize(x, acts) if self.input_global_scale is None else fake_quantize(x, acts, self.input_global_scale)
        weight = self._weight_cache
        if weight is None or weight.dtype != x.dtype:
            weight = self.dequantized_weight(x.dtype)
        return F.linear(x, weight, self.bias)

    _weight_cache: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"


@contextmanager
def reuse_dequantized_weights(module: nn.Module, dtype: torch.dtype):
    """While many batches pass through the same quantized layer (calibration), dequantize its weights once, not once
    per batch; the copies are dropped on exit."""
    quantized = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    for m in quantized:
        m._weight_cache = m.dequantized_weight(dtype)
    try:
        yield
    finally:
        for m in quantized:
            m._weight_cache = None
