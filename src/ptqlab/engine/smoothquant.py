"""SmoothQuant (Xiao et al., 2023), a transform: migrate activation outliers into the weights before both are
quantized (W8A8), s_j = max|X_j|^α / max|W_j|^(1-α) per input channel j."""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from ptqlab.engine.plan import Plan
from ptqlab.engine.smoothing import ResolvedMapping
from ptqlab.engine.statistics import InputStats
from ptqlab.settings import Interval, setting

MAPPING_CHOICES = ("norms", "all")


@dataclass(frozen=True)
class SmoothQuantStep:
    """SmoothQuant's settings (YAML: `- smoothquant: {smoothing_strength: 0.8}`)."""

    smoothing_strength: float = setting(0.8, Interval(0, 1, words="a number in [0, 1], e.g. 0.8"))
    """α in [0, 1]: 0 leaves activations as they are, 1 moves all of their range into the weights."""
    mappings: str = setting("norms", MAPPING_CHOICES)
    """`norms`: into the norms before q/k/v and gate/up (llm-compressor's default); `all`: also v -> o and up -> down
    where exact (engine/smoothing.mappings). `all` made SmolLM2 w8a8 worse (README, "Recipes are data"): the
    down_proj weights take on the activations' outliers, which per-channel int8 weights then round badly."""

    def smooths_linears(self) -> bool:
        """Whether it also smooths a linear's output (v -> o, up -> down), not only the norms."""
        return self.mappings == "all"


def smoothquant_scales(act_max: torch.Tensor, weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1-α) (max over every balance weight's column j), 1 where an input
    never fired or a column is all zero (nothing to balance)."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = act_max.float().to(w_max.device).pow(strength) / w_max.pow(1 - strength)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def smoothquant(step: SmoothQuantStep, mapping: ResolvedMapping, stats: InputStats, input_name: str,
                plan: Plan) -> tuple[torch.Tensor, str] | None:
    """The scales for one mapping of a layer and a line for the layer report; None where the step leaves it alone."""
    if isinstance(mapping.smooth, nn.Linear) and not step.smooths_linears():
        return None
    weights = [linear.weight for linear in mapping.balance.values()]
    scales = smoothquant_scales(stats.channel_max(input_name), weights, step.smoothing_strength)
    return scales, f"s in [{float(scales.min()):.3g}, {float(scales.max()):.3g}]"
