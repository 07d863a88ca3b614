"""The table of recipe steps: each step's YAML name, its settings (a frozen dataclass, in the module that applies
it), its role, the input statistics it needs, and the function that runs it. Adding a transform or a quantizer is
its own module and one row here; recipes.py parses and checks steps through this table, and the engine runs them
through it.

A transform's function: (settings, mapping, stats, input name, plan) -> (scales, report line), or None where it
leaves that mapping alone. A quantizer's function: (settings, linear names, linears, their Hessians or None, plan) ->
[(QuantizedLinear, notes)] per linear; same-shaped linears of one scheme come together (engine/quantize.py `batches`),
and every quantizer takes each linear's scheme from `plan.scheme_of(name)` (a recipe's `overrides`). A quantizer
of scope "layer" sees the whole decoder layer and its calibration inputs instead (engine/autoround.py): (settings,
model, layer, targets, plan, batches, layer index, device, world, statistics) -> (notes, details). A transform of
scope "model" runs once on the whole float model before the layer loop and any statistics (engine/rotate.py):
(settings, model) -> notes; it must be the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ptqlab.engine.autoround import autoround_layer
from ptqlab.engine.awq import AWQStep, awq
from ptqlab.engine.plan import Plan
from ptqlab.engine.quantize import RTNStep, gptq_linears, rtn_linears
from ptqlab.engine.rotate import RotateStep, rotate_model
from ptqlab.engine.smoothquant import SmoothQuantStep, smoothquant
from ptqlab.quant import fp4
from ptqlab.quant.autoround import AutoRoundConfig
from ptqlab.quant.gptq import GPTQConfig


@dataclass(frozen=True)
class StepKind:
    name: str
    """The step's name in a recipe's YAML `steps` list."""
    settings: type
    role: Literal["transform", "quantizer"]
    statistics: frozenset[str]
    """What engine/statistics.py must collect for it: hessian, absmax, abssum."""
    run: Callable
    scope: Literal["linear", "layer", "model"] = "linear"
    """What a step works on: each linear (or smoothing mapping) from its input statistics, a whole decoder layer
    from its inputs, or the whole float model once, before calibration (a transform that needs no data)."""

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
    StepKind("rotate", RotateStep, "transform", frozenset(), rotate_model, scope="model"),
)
STEP_KINDS: dict[str, StepKind] = {kind.name: kind for kind in STEPS}


def kind_of(step) -> StepKind:
    """The table row of a step's settings object."""
    for kind in STEPS:
        if type(step) is kind.settings:
            return kind
    raise TypeError(f"{type(step).__name__} is not a recipe step; known: {', '.join(k.settings.__name__ for k in STEPS)}")


def plan_statistics(plan: Plan) -> frozenset[str]:
    """Every input statistic some step of `plan` needs (engine/statistics.py collects them)."""
    needed = frozenset().union(*(kind_of(step).statistics for step in (*plan.transforms, plan.quantizer)))
    nvfp4_inputs = any(fp4.has_input_global_scale(s) for s in (plan.scheme, *plan.overrides.values()))
    return needed | ({"absmax"} if nvfp4_inputs else set())  # NVFP4 input global scales
