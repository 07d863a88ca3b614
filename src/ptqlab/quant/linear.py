"""`QuantizedLinear`: a linear layer that holds its weight on the quantization grid and computes with it.

This is ptqlab's in-memory quantized model and the reference semantics of every checkpoint it writes:
the weight is (q - zero_point) * scale, and where the scheme quantizes activations, each input token is
quantized dynamically (fp32 scale = absmax / grid half-range, as vLLM's kernels do) before the matmul.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab.quant.primitives import dequantize, fake_quantize, quant_params, quantize
from ptqlab.schemes import QuantArgs, Scheme


def rtn(
    weight: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: min-max scales, then each weight to its nearest grid point. -> (q, scale, zero_point)."""
    scale, zero_point = quant_params(weight, args, scale_dtype)
    return quantize(weight, scale, zero_point, args), scale, zero_point


class QuantizedLinear(nn.Module):
    """y = quant(x) @ dequant(q)^T + b, with the stored tensors of a compressed-tensors checkpoint."""

    def __init__(
        self,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None,
        bias: torch.Tensor | None,
        scheme: Scheme,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q)  # [out, in], int8 values or float8_e4m3fn
        self.register_buffer("weight_scale", weight_scale)  # model dtype; layout per strategy (primitives)
        self.register_buffer("weight_zero_point", weight_zero_point)  # int8, asymmetric only
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme,
        q: torch.Tensor | None = None, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = None,
    ) -> QuantizedLinear:
        """Quantize `weight` by round-to-nearest (scales in `scale_dtype`, default the weight's), or wrap an already
        computed (q, scale, zero_point)."""
        if q is None:
            q, scale, zero_point = rtn(weight.detach(), scheme.weights, scale_dtype=scale_dtype or weight.dtype)
        return cls(q, scale, zero_point, None if bias is None else bias.detach(), scheme)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model (model.float(), .to(torch.bfloat16)) converts scales and bias but must keep
        # the stored grid values in their format; device moves apply to everything.
        q_dtype = self.weight_q.dtype
        super()._apply(fn, recurse)
        if self.weight_q.dtype != q_dtype:
            self.weight_q = self.weight_q.to(q_dtype)
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight_q, self.weight_scale, self.weight_zero_point, self.scheme.weights, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.input_activations is not None:
            x = fake_quantize(x, self.scheme.input_activations)
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
