"""What a quantized linear layer stores and computes: number formats as frozen dataclasses.

A `QuantArgs` describes one tensor's number format (bits, int or float, symmetric, the granularity of its
scales); a `Scheme` pairs the weight format with the optional dynamic input-activation format. These map
one-to-one onto compressed-tensors' `QuantizationArgs` / `QuantizationScheme`, so that what we compute is
exactly what the checkpoint declares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Strategy = Literal["tensor", "channel", "group", "token"]
NumberType = Literal["int", "float"]

INT_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantArgs:
    """The number format of one tensor."""

    num_bits: int = 8
    """Bits per element: 2, 3, 4 or 8 for int; 8 (E4M3) for float."""
    type: NumberType = "int"
    """`int` (a uniform grid times a scale) or `float` (FP8 E4M3 times a scale)."""
    symmetric: bool = True
    """Symmetric: zero point 0 and scale = absmax / half the grid. Asymmetric: min/max mapped onto the grid."""
    strategy: Strategy = "channel"
    """Granularity of the scales: one per tensor, per output channel (row), per group of columns, or per token."""
    group_size: int | None = None
    """Columns sharing one scale, for strategy `group`. Must divide the row length."""
    dynamic: bool = False
    """Scales computed at run time from the tensor itself (activations), not stored."""

    def __post_init__(self) -> None:
        if self.type == "int" and self.num_bits not in INT_BITS:
            raise ValueError(f"int quantization supports {INT_BITS} bits, not {self.num_bits}")
        if self.type == "float" and (self.num_bits != 8 or not self.symmetric):
            raise ValueError("float quantization is FP8 E4M3: num_bits=8, symmetric=True")
        if self.strategy == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError("strategy 'group' needs a positive group_size")
        if self.strategy != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")

    def with_group_size(self, group_size: int) -> QuantArgs:
        return replace(self, group_size=group_size)


@dataclass(frozen=True)
class Scheme:
    """How every targeted linear layer is quantized."""

    weights: QuantArgs
    """The stored weight format."""
    input_activations: QuantArgs | None = None
    """Dynamic quantization of the layer's input at run time (W8A8); None keeps activations 16-bit (W4A16)."""

    @property
    def format(self) -> str:
        """The compressed-tensors storage format this scheme is saved in."""
        if self.weights.type == "float":
            return "float-quantized"
        if self.input_activations is not None:
            return "int-quantized"  # one int8 per weight: the layout int8 GEMM kernels read
        return "pack-quantized"  # weight-only: several small ints packed into each int32

    def describe(self) -> str:
        w, a = self.weights, self.input_activations
        kind = "fp8" if w.type == "float" else f"int{w.num_bits}"
        detail = f"group {w.group_size}" if w.strategy == "group" else f"per-{w.strategy}"
        act = "16-bit activations" if a is None else f"dynamic per-{a.strategy} {'fp8' if a.type == 'float' else 'int8'} activations"
        sym = "symmetric" if w.symmetric else "asymmetric"
        return f"{kind} {sym} weights ({detail}), {act}"


FP8_DYNAMIC = Scheme(
    weights=QuantArgs(num_bits=8, type="float", strategy="channel"),
    input_activations=QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True),
)
W4A16 = Scheme(weights=QuantArgs(num_bits=4, strategy="group", group_size=128))
W8A8 = Scheme(
    weights=QuantArgs(num_bits=8, strategy="channel"),
    input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True),
)
