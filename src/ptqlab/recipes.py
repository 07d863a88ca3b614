"""Recipes: which layers to quantize, to what scheme, by which method. The presets users name on the CLI."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ptqlab.errors import PtqlabError
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.schemes import FP8_DYNAMIC, W4A16, W8A8, QuantArgs, Scheme


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe: every `nn.Linear` not matched by `ignore` is quantized to `scheme` by `method`."""

    name: str
    scheme: Scheme
    method: Literal["rtn", "gptq"] = "rtn"
    """How weights reach the grid: `rtn` rounds each weight to its nearest grid point (data-free); `gptq`
    minimizes each layer's output error on calibration data (inverse-Hessian error feedback)."""
    gptq: GPTQConfig = GPTQConfig()
    """GPTQ's block size, dampening and act-order (method `gptq` only)."""
    ignore: tuple[str, ...] = ("lm_head",)
    """Layers kept 16-bit: exact module names or `re:` regular expressions (matched from the start), as in
    llm-compressor. The output head stays 16-bit by default: it is small next to the body and sensitive."""
    auto_group_size: bool = True
    """When the group size does not divide a layer's input width, fall back to the largest power-of-two
    group that divides every layer (and say so) instead of failing. False: fail with that advice."""
    description: str = ""

    def with_overrides(self, ignore: list[str] | None = None, group_size: int | None = None) -> Recipe:
        recipe = self
        if ignore is not None:
            recipe = replace(recipe, ignore=tuple(ignore))
        if group_size is not None:
            if recipe.scheme.weights.strategy != "group":
                raise PtqlabError(f"--group-size applies to group-wise recipes; {self.name} quantizes weights per {recipe.scheme.weights.strategy}")
            weights = recipe.scheme.weights.with_group_size(group_size)
            recipe = replace(recipe, scheme=replace(recipe.scheme, weights=weights), auto_group_size=False)
        return recipe


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "fp8-dynamic",
            FP8_DYNAMIC,
            description="FP8 E4M3 per-channel weights, dynamic per-token FP8 activations; data-free (Hopper/Ada FP8 GEMMs)",
        ),
        Recipe(
            "w4a16-rtn",
            W4A16,
            description="int4 symmetric weights, group 128, round-to-nearest; 16-bit activations (data-free baseline for GPTQ)",
        ),
        Recipe(
            "w4a16",
            W4A16,
            method="gptq",
            gptq=GPTQConfig(scale_search=True),
            description="GPTQ int4 symmetric weights, group 128, clipping-searched scales, calibrated; 16-bit activations",
        ),
        Recipe(
            "w4a16-asym",
            Scheme(weights=QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)),
            method="gptq",
            description="GPTQ int4 asymmetric weights (zero points), group 128; 16-bit activations",
        ),
        Recipe(
            "w3a16",
            Scheme(weights=QuantArgs(num_bits=3, strategy="group", group_size=128)),
            method="gptq",
            gptq=GPTQConfig(scale_search=True),
            description="GPTQ int3 symmetric weights, group 128, clipping-searched scales; 16-bit activations",
        ),
        Recipe(
            "w8a16",
            Scheme(weights=QuantArgs(num_bits=8, strategy="channel")),
            method="gptq",
            description="GPTQ int8 per-channel symmetric weights; 16-bit activations",
        ),
        Recipe(
            "w8a8-rtn",
            W8A8,
            description="int8 per-channel symmetric weights, dynamic per-token int8 activations, round-to-nearest",
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise PtqlabError(f"unknown recipe {name!r}: choose one of {', '.join(PRESETS)} (see `ptqlab recipes`)") from None
