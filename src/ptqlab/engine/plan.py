"""The Plan: what the engine does to every decoder layer, a recipe's steps bound to its number format. Its own module
so that the steps' functions (engine/awq.py, smoothquant.py, quantize.py), which read a Plan, and the table of steps
(engine/steps.py), which imports them, depend on it and not on each other."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ptqlab.quant.kv_cache import KVCacheFormat
from ptqlab.schemes import Scheme


@dataclass(frozen=True)
class Plan:
    """What the engine does to every decoder layer: a recipe's steps bound to its number format (the steps' table
    rows through engine/steps.kind_of, the statistics they need through engine/steps.plan_statistics)."""

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

    def scheme_of(self, name: str) -> Scheme:
        """The scheme the linear `name` (its module name in the model) is quantized to."""
        return self.overrides.get(name, self.scheme)
