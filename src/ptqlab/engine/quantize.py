"""Quantize, the engine's fourth phase: each targeted linear of a decoder layer becomes a QuantizedLinear, by the
recipe's quantizer (GPTQ from the layer's input Hessian, or round-to-nearest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ptqlab.engine.statistics import InputStats
from ptqlab.errors import PtqlabError
from ptqlab.models import set_submodule
from ptqlab.quant.gptq import GPTQConfig, HessianError, gptq
from ptqlab.quant.linear import QuantizedLinear

if TYPE_CHECKING:
    from ptqlab.engine.steps import Plan


@dataclass(frozen=True)
class RTNStep:
    """Round every weight to its nearest grid point: data-free alone, or the last step after a calibrated transform
    such as AWQ."""


def gptq_linear(step: GPTQConfig, name: str, linear: nn.Linear, hessian: torch.Tensor | None,
                plan: Plan) -> tuple[QuantizedLinear, list[str]]:
    """GPTQ for one linear: weight + Hessian -> QuantizedLinear, with notes on damping and dead inputs."""
    try:
        result = gptq(linear.weight, hessian, plan.scheme.weights, step, scale_dtype=plan.scale_dtype)
    except HessianError as e:
        raise PtqlabError(f"{name}: {e}; check the calibration data and the model dtype (fp16 overflow? try --dtype "
                          "bfloat16)") from e
    module = QuantizedLinear.from_weight(linear.weight, linear.bias, plan.scheme, result.q, result.scale,
                                         result.zero_point)
    notes = []
    if result.dampening_frac != step.dampening_frac:
        notes.append(f"{name}: Hessian not positive definite; dampening raised to {result.dampening_frac:g}")
    if result.dead_columns:
        notes.append(f"{name}: {result.dead_columns} input channels never active in calibration (quantized as 0)")
    return module, notes


def rtn_linear(step: RTNStep, name: str, linear: nn.Linear, hessian: torch.Tensor | None,
               plan: Plan) -> tuple[QuantizedLinear, list[str]]:
    """Round-to-nearest for one linear (the Hessian unused)."""
    return QuantizedLinear.from_weight(linear.weight.detach(), linear.bias, plan.scheme, scale_dtype=plan.scale_dtype), []


def quantize_layer(model: nn.Module, targets: dict[str, nn.Linear], plan: Plan, stats: InputStats) -> list[str]:
    """Replace each of `targets` (the linears of one decoder layer) in `model` by its quantized form -> notes. The
    float weights replaced are let go (moved to the meta device): whoever still holds a replaced linear holds no
    memory, so that a run never keeps a model's float and quantized weights both."""
    kind = plan.kind(plan.quantizer)
    notes = []
    for name, linear in targets.items():
        hessian = stats.hessian(name) if "hessian" in kind.statistics else None
        quantized, linear_notes = kind.run(plan.quantizer, name, linear, hessian, plan)
        notes += linear_notes
        set_submodule(model, name, quantized)
        linear.to("meta")
    return notes
