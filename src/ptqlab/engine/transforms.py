"""Transforms, the engine's third phase: the recipe's smoothing steps, applied to one decoder layer in order.

Each step computes per-channel scales for each mapping of the layer (engine/smoothing.py says which module's output
they divide and which linears' columns they multiply); the layer then computes the same function, and the input
statistics are updated exactly, so the next step and the quantizer see the transformed layer without another
forward.
"""

from __future__ import annotations

from torch import nn

from ptqlab.engine.plan import Plan
from ptqlab.engine.smoothing import apply_scales, resolve_mappings
from ptqlab.engine.statistics import InputStats
from ptqlab.engine.steps import kind_of


def transform_layer(layer: nn.Module, config, prefix: str, plan: Plan, stats: InputStats,
                    first: bool) -> tuple[list[str], list[str]]:
    """Apply the plan's transforms to `layer` (named `prefix`) -> (a line per mapping and step for the layer report,
    notes). Mappings that are not exact for this architecture are skipped, said once (`first`: layer 0)."""
    mappings, skipped = resolve_mappings(layer, config)
    notes = []
    if first and any(step.smooths_linears() for step in plan.transforms):
        notes = [f"smoothing: {reason}" for reason in skipped]
    details = []
    for step in plan.transforms:
        kind = kind_of(step)
        for mapping in mappings:
            input_name = f"{prefix}.{mapping.mapping.balance[0]}"
            chosen = kind.run(step, mapping, stats, input_name, plan)
            if chosen is None:
                continue
            scales, detail = chosen
            apply_scales(mapping, scales)
            stats.rescale(input_name, scales)
            details.append(f"{kind.name} {mapping.mapping.smooth} -> {', '.join(mapping.balance)}: {detail}")
    return details, notes
