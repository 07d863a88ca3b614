"""NVFP4's global scales as a run sets them: one per fused weight, one per layer input.

vLLM runs q/k/v (and gate/up, an expert's w1/w3) as one matmul whose weight has one global scale, so the layers it
fuses share one here: computed from their largest |weight| together, before any group scale
(llm-compressor's fused weight observers; it is the smallest of the parts' own global scales). Input global scales
need nothing of the kind: layers fused there read the same input, whose calibration statistics they share.
"""

from __future__ import annotations

import torch
from torch import nn

from ptqlab.families import FAMILIES
from ptqlab.quant import fp4


def _siblings(names) -> tuple[str, ...]:
    return tuple(name.rpartition(".")[2] for name in names)


FUSED_LAYERS = tuple(dict.fromkeys(
    group for family in FAMILIES.values()
    for group in (_siblings(family.linears.qkv), _siblings(family.linears.gate_up),
                  family.experts.projections[:2] if family.experts else ())
    if len(group) > 1))
"""Sibling linears that vLLM fuses into one weight, by their names (as llm-compressor's FUSED_LAYER_NAMES): every
family's separate q/k/v and gate/up, and its experts' gate/up."""


def fused_groups(names: list[str]) -> list[list[str]]:
    """`names` (linears by module name) in the groups that share a global scale: the siblings of one FUSED_LAYERS
    entry together, every other linear alone; in the order of `names`."""
    present, seen, groups = set(names), set(), []
    for name in names:
        if name in seen:
            continue
        parent, _, child = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        fused = next((f for f in FUSED_LAYERS if child in f), (child,))
        group = [prefix + c for c in fused if prefix + c in present]
        seen.update(group)
        groups.append(group)
    return groups


def weight_global_scales(linears: dict[str, nn.Linear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """NVFP4's global scale [1] (fp32) of each of `linears`, shared within each fused group, computed in `dtype` (the
    checkpoint's)."""
    scales = {}
    for group in fused_groups(list(linears)):
        absmax = torch.stack([linears[name].weight.detach().to(dtype).abs().amax() for name in group]).amax()
        scale = fp4.global_scale(absmax, dtype)
        scales.update({name: scale.clone() for name in group})
    return scales


def input_global_scale(channel_max: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4's input global scale [1] (fp32) of a layer whose input's per-channel max |x| over the calibration set
    is `channel_max`, computed in `dtype` (the checkpoint's)."""
    return fp4.global_scale(channel_max.amax(), dtype)
