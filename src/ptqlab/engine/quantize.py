"""Quantize, the engine's fourth phase: each targeted linear of a decoder layer becomes a QuantizedLinear in its
scheme (Plan.scheme_of), by the recipe's quantizer (GPTQ from the layer's input Hessian, or round-to-nearest).
NVFP4's global scales are set first, shared by the layers vLLM fuses (engine/global_scales.py); NVFP4 activations'
from the inputs' calibrated absmax."""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from ptqlab.engine.distributed import SINGLE, World, broadcast_quantized, gather_notes
from ptqlab.engine.global_scales import input_global_scale, weight_global_scales
from ptqlab.engine.plan import Plan
from ptqlab.engine.statistics import InputStats
from ptqlab.errors import PtqlabError
from ptqlab.models import set_submodule
from ptqlab.quant import fp4
from ptqlab.quant.gptq import GPTQConfig, HessianError, gptq_many
from ptqlab.quant.linear import QuantizedLinear


@dataclass(frozen=True)
class RTNStep:
    """Round every weight to its nearest grid point: data-free alone, or the last step after a calibrated transform
    such as AWQ."""


BATCH_MIN = 8
"""Same-shaped linears of one layer are quantized together (gptq_many: their linear algebra batched) from this many
on: an MoE layer's experts. Fewer (a dense layer's k and v) go one by one, as they always have."""
BATCH_HESSIAN_BYTES = 1 << 29
"""At most this many bytes of fp32 Hessians per batch (their factors and the batch's weights come on top)."""


def gptq_linears(step: GPTQConfig, names: list[str], linears: list[nn.Linear], hessians: list[torch.Tensor],
                 plan: Plan, global_scales: list[torch.Tensor] | None = None) -> list[tuple[QuantizedLinear, list[str]]]:
    """GPTQ for same-shaped linears of one scheme, each from its own input Hessian (NVFP4: relative to its global
    scale) -> (QuantizedLinear, notes on damping and dead inputs) per linear."""
    scheme = plan.scheme_of(names[0])
    weights = torch.stack([linear.weight.detach() for linear in linears])
    try:
        results = gptq_many(weights, torch.stack(hessians), scheme.weights, step, scale_dtype=plan.scale_dtype,
                            global_scales=global_scales)
    except HessianError as e:
        if len(linears) > 1:  # name the linear whose Hessian it is
            return [pair for i, (n, linear, h) in enumerate(zip(names, linears, hessians))
                    for pair in gptq_linears(step, [n], [linear], [h], plan,
                                             None if global_scales is None else [global_scales[i]])]
        raise PtqlabError(f"{names[0]}: {e}; check the calibration data and the model dtype (fp16 overflow? try "
                          "--dtype bfloat16)") from e
    del weights
    quantized = []
    for name, linear, result in zip(names, linears, results):
        module = QuantizedLinear.from_weight(linear.weight, linear.bias, scheme, result.q, result.scale,
                                             result.zero_point, global_scale=result.global_scale)
        notes = []
        if result.dampening_frac != step.dampening_frac:
            notes.append(f"{name}: Hessian not positive definite; dampening raised to {result.dampening_frac:g}")
        if result.dead_columns:
            notes.append(f"{name}: {result.dead_columns} input channels never active in calibration (quantized as 0)")
        quantized.append((module, notes))
    return quantized


def rtn_linears(step: RTNStep, names: list[str], linears: list[nn.Linear], hessians: list | None,
                plan: Plan, global_scales: list[torch.Tensor] | None = None) -> list[tuple[QuantizedLinear, list[str]]]:
    """Round-to-nearest for each linear (no Hessian; NVFP4: relative to its global scale)."""
    return [(QuantizedLinear.from_weight(linear.weight.detach(), linear.bias, plan.scheme_of(names[i]),
                                         scale_dtype=plan.scale_dtype,
                                         global_scale=None if global_scales is None else global_scales[i]), [])
            for i, linear in enumerate(linears)]


def batches(targets: dict[str, nn.Linear], scheme_of=None) -> list[list[str]]:
    """The linears of a layer in the groups quantized together: same-shaped ones of one scheme (`scheme_of(name)`,
    Plan.scheme_of), BATCH_MIN or more, in batches of at most BATCH_HESSIAN_BYTES of Hessians; every other linear
    alone. Module order otherwise."""
    by_shape: dict[tuple, list[str]] = {}
    for name, linear in targets.items():
        key = (tuple(linear.weight.shape), linear.weight.dtype, linear.bias is not None,
               None if scheme_of is None else scheme_of(name))
        by_shape.setdefault(key, []).append(name)
    groups = []
    for (shape, *_), names in by_shape.items():
        if len(names) < BATCH_MIN:
            groups += [[name] for name in names]
            continue
        size = max(1, BATCH_HESSIAN_BYTES // (4 * shape[1] ** 2))
        groups += [names[i:i + size] for i in range(0, len(names), size)]
    return groups


def quantize_layer(model: nn.Module, targets: dict[str, nn.Linear], plan: Plan, kind, stats: InputStats,
                   world: World = SINGLE) -> list[str]:
    """Replace each of `targets` (the linears of one decoder layer) in `model` by its quantized form -> notes. The
    float weights replaced are let go (moved to the meta device): whoever still holds a replaced linear holds no
    memory, so that a run never keeps a model's float and quantized weights both. With several ranks each group of
    linears is quantized by one owner rank (balanced by cost) and sent to the others. `kind`: the table row of the
    plan's quantizer (engine/steps.kind_of; that table imports this module's quantizers)."""
    groups = batches(targets, plan.scheme_of)
    owners = world.owners([sum(_cost(targets[name], kind) for name in names) for names in groups])
    notes = []
    # Every rank computes the same global scales from the same weights and reduced statistics.
    nvfp4 = {name: linear for name, linear in targets.items() if fp4.has_global_scale(plan.scheme_of(name).weights)}
    global_scales = weight_global_scales(nvfp4, plan.scale_dtype) if nvfp4 else None
    for names, owner in zip(groups, owners):
        linears = [targets[name] for name in names]
        results = [(None, [])] * len(names)
        if owner == world.rank:
            hessians = [stats.hessian(name) for name in names] if "hessian" in kind.statistics else None
            gscales = [global_scales[name] for name in names] if names[0] in (global_scales or {}) else None
            results = kind.run(plan.quantizer, names, linears, hessians, plan, global_scales=gscales)
            del hessians
        if world.several:
            modules = broadcast_quantized([module for module, _ in results], linears, owner, plan.scheme_of(names[0]),
                                          stats.device)
            results = [(module, linear_notes) for module, (_, linear_notes) in zip(modules, results)]
        for name, linear, (quantized, linear_notes) in zip(names, linears, results):
            if fp4.has_input_global_scale(plan.scheme_of(name)):
                quantized.input_global_scale = input_global_scale(stats.channel_max(name), plan.scale_dtype).to(
                    quantized.weight_q.device)
            notes += linear_notes
            set_submodule(model, name, quantized)
            linear.to("meta")
    return gather_notes(notes) if world.several else notes


def _cost(linear: nn.Linear, kind) -> float:
    """A linear's quantization work, for balancing owners: GPTQ's factorizations and sweep (in² · (in + out)), or
    rounding (out · in)."""
    out_features, in_features = linear.weight.shape
    if "hessian" in kind.statistics:
        return float(in_features) ** 2 * (in_features + out_features)
    return float(out_features) * in_features
