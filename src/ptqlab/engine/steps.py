"""The table of recipe steps: each step's YAML name, its settings (a frozen dataclass, in the module that applies
it), its role, the input statistics it needs, and the function that runs it. Adding a transform or a quantizer is
its own module and one row here; recipes.py parses and checks steps through this table, and the engine runs them
through it.

A transform's function: (settings, mapping, stats, input name, plan) -> (scales, report line), or None where it
leaves that mapping alone. A quantizer's function: (settings, linear names, linears, their Hessians or None, plan) ->
[(QuantizedLinear, notes)] per linear; same-shaped linears of one scheme come together (engine/quantize.py `batches`),
and every quantizer takes each linear's scheme from `plan.scheme_of(name)` (a recipe's `overrides`). A quantizer
of scope "layer" sees the whole decoder layer and its calibration inputs instead (engine/autoround.py): (settings,
model, layer, targets, plan, batches, layer index, device, world, statistics) -> (notes, details).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ptqlab.engine.autoround import autoround_layer
from ptqlab.engine.awq import AWQStep, awq
from ptqlab.engine.quantize import RTNStep, gptq_linears, rtn_linears
from ptqlab.engine.smoothquant import SmoothQuantStep, smoothquant
from ptqlab.quant import fp4
from ptqlab.quant.autoround import AutoRoundConfig
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.quant.kv_cache import KVCacheFormat
from ptqlab.schemes import Scheme


@dataclass(frozen=True)
class StepKind:
    name: str
    """The step's name in a recipe's YAML `steps` list."""
    settings: type
    role: Literal["transform", "quantizer"]
    statistics: frozenset[str]
    """What engine/statistics.py must collect for it: hessian, absmax, abssum."""
    run: Callable
    scope: Literal["linear", "layer"] = "linear"
    """What a quantizer works on: each linear from its input statistics, or a whole decoder layer from its inputs."""

    @property
    def calibrated(self) -> bool:
        """Whether the step needs calibration data."""
        return bool(self.statistics) or self.scope == "layer"


STEPS: tuple[StepKind, ...] = (
    StepKind("smoothquant", SmoothQuantStep, "transform", frozenset({"absmax"}), smoothquant),
    StepKind("awq", AWQStep, "transform", frozenset({"abssum", "hessian"}), awq),
    StepKind("gptq", GPTQConfig, "quantizer", frozenset({"hessian"}), gptq_linears),
    StepKind("rtn", RTNStep, "quantizer", frozenset(), rtn_linears),
    StepKind("autoround", AutoRoundConfig, "quantizer", frozenset({"hessian"}), autoround_layer, scope="layer"),
)
STEP_KINDS: dict[str, StepKind] = {kind.name: kind for kind in STEPS}


def kind_of(step) -> StepKind:
    """The table row of a step's settings object."""
    for kind in STEPS:
        if type(step) is kind.settings:
            return kind
    raise TypeError(f"{type(step).__name__} is not a recipe step; known: {', '.join(k.settings.__name__ for k in STEPS)}")


@dataclass(frozen=True)
class Plan:
    """What the engine does to every decoder layer: a recipe's steps bound to its number format."""

    transforms: tuple
    """Transform steps' settings, applied in order."""
    quantizer: object
    """The quantizer step's settings (GPTQConfig, RTNStep)."""
    scheme: Scheme
    """The recipe's scheme: every targeted linear's but those in `overrides`."""
    scale_dtype: torch.dtype
    """The dtype scales are stored in: the checkpoint's, whatever the engine computes in."""
    kv: KVCacheFormat | None = None
    """The KV cache's format: its scales are calibrated on the keys and values each quantized layer produces
    (engine/kv_cache.py); None: a 16-bit cache, nothing to calibrate."""
    overrides: Mapping[str, Scheme] = field(default_factory=dict)
    """Linears quantized to another scheme, by module name (the recipe's `overrides`, resolved by pipeline.py)."""

    @staticmethod
    def kind(step) -> StepKind:
        return kind_of(step)

    def scheme_of(self, name: str) -> Scheme:
        """The scheme the linear `name` (its module name in the model) is quantized to."""
        return self.overrides.get(name, self.scheme)

    @property
    def statistics(self) -> frozenset[str]:
        """Every input statistic some step of the plan needs."""
        needed = frozenset().union(*(kind_of(step).statistics for step in (*self.transforms, self.quantizer)))
        nvfp4_inputs = any(fp4.has_input_global_scale(s) for s in (self.scheme, *self.overrides.values()))
        return needed | ({"absmax"} if nvfp4_inputs else set())  # NVFP4 input global scales
