"""The layer loop: choose the linears a recipe targets, check them, and replace each with a QuantizedLinear.

Data-free recipes (round-to-nearest) run here, decoder layer by decoder layer, then any targeted linear outside the
decoder layers; calibrated recipes (SmoothQuant, AWQ, GPTQ, or any recipe with a quantized KV cache, whose scales
come from calibration) hand the decoder layers to the layer-sequential engine (the engine package).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ptqlab.data import CalibrationSet, check_batch_size
from ptqlab.engine import EngineOptions, Plan, calibrate
from ptqlab.engine.experts import unfuse
from ptqlab.engine.steps import kind_of
from ptqlab.engine.stream import StreamedModel
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES, module_name
from ptqlab.models import decoder_layers, model_dtype, names_by_layer, set_submodule
from ptqlab.progress import track
from ptqlab.engine.global_scales import weight_global_scales
from ptqlab.quant import fp4
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.quant.kv_cache import kv_cache_format
from ptqlab.recipe import Recipe, step_name, with_columns_per_scale
from ptqlab.schemes import is_fp4, matches


@dataclass
class QuantizationResult:
    """What quantize_model did, for the run record."""

    recipe: Recipe
    """The recipe as applied (after automatic adjustments such as the group size)."""
    quantized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layer_reports: list = field(default_factory=list)
    """Per decoder layer, for calibrated methods: seconds per engine phase and notes."""


def target_linears(model: nn.Module, ignore: tuple[str, ...]) -> tuple[dict[str, nn.Linear], list[str], list[str]]:
    """-> (targets by name, ignored names, ignore patterns that matched nothing). A pattern matches a linear's name in
    the model or in the checkpoint's config (an MoE block transformers renamed: `families.module_name`). The patterns
    are checked where a Recipe is made."""
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    layout = family.experts if family is not None else None
    targets, ignored, used = {}, [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        stored = module_name(name, layout)
        hit = [p for p in ignore if matches(name, p) or matches(stored, p)]
        if hit:
            ignored.append(name)
            used.update(hit)
        else:
            targets[name] = module
    return targets, ignored, [p for p in ignore if p not in used]


def kept_16_bit(model: nn.Module) -> tuple[list[str], list[str]]:
    """The modules `model`'s family keeps 16-bit in every recipe (an MoE's routers, the row's `keep`), by their names
    in the checkpoint's config, in module order -> (names, one note per row entry that kept some, saying why).

    A router is named as llm-compressor names it (the hub's block, transformers' router), except one that is an
    nn.Linear in transformers (Phi-3.5-MoE's): transformers' loader quantizes every linear its `ignore` does not name,
    so that one keeps transformers' own name."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if family is None:
        return [], []
    layout, kept, counts = family.experts, [], dict.fromkeys(family.keep, 0)
    for name, module in model.named_modules():
        stored = module_name(name, layout)
        if layout is not None and any(matches(stored, pattern) for pattern in layout.keep):
            kept.append(name if isinstance(module, nn.Linear) else stored)
        entry = next((e for e in family.keep if isinstance(module, nn.Linear) and matches(name, e.pattern)), None)
        if entry is not None:
            kept.append(name)
            counts[entry] += 1
    notes = [f"{n} linears kept 16-bit ({entry.pattern!r}): {entry.why}" for entry, n in counts.items() if n]
    return kept, notes


def coverage_note(coverage: list[dict]) -> str:
    """One line on how calibration tokens reached the experts (the per-layer table is in the run record)."""
    tokens = sorted(n for entry in coverage for n in entry["tokens"])
    fell_back = sum(len(entry["fell_back"]) for entry in coverage)
    return (f"experts: {len(tokens)} expert-layers routed min {tokens[0]} / median {tokens[len(tokens) // 2]} / max "
            f"{tokens[-1]} calibration tokens; {fell_back} calibrated on all of their layer's tokens (routed fewer "
            f"than {coverage[0]['min_tokens']})")


MIN_AUTO_GROUP = 8
"""The smallest group size chosen without being asked for."""


def suggest_group_size(widths, limit: int) -> tuple[int, str]:
    """The group size to advise when `limit` does not divide every width, and what it is: the largest power of two up
    to `limit` that divides them all (where that is at least MIN_AUTO_GROUP), else their largest common divisor up to
    `limit`, else the smallest one above it. 1 only where no larger size divides them all."""
    common = math.gcd(*widths)
    power = 1
    while power * 2 <= limit and common % (power * 2) == 0:
        power *= 2
    if power >= MIN_AUTO_GROUP:
        return power, f"the largest power of two up to {limit}"
    divisors = [d for d in range(2, common + 1) if common % d == 0]
    below = [d for d in divisors if d <= limit]
    if below:
        return max(below), f"the largest size up to {limit}"
    if divisors:
        return divisors[0], f"the smallest size above {limit}"
    return 1, "only 1"


def columns_that_must_divide(scheme) -> int | None:
    """The columns per scale that must divide every layer's input width: the weights' groups, and the activations'
    token groups (block-wise weights pad a partial edge block, but their activations' groups cannot be partial)."""
    acts = scheme.input_activations
    if acts is not None and acts.strategy == "group":
        return acts.group_size
    return scheme.weights.group_size if scheme.weights.strategy in ("group", "tensor_group") else None


def fused_groups_split(model: nn.Module, targets, overrides: dict, scheme) -> list[list[str]]:
    """The q/k/v and gate/up groups of the quantized linears (by the family's roles; a model without a row, by
    Llama's names) whose members get different schemes."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    linears = family.linears if family is not None else FAMILIES["llama"].linears
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name in targets:
        for roles in (linears.qkv, linears.gate_up):
            member = next((m for m in roles if len(roles) > 1 and name.endswith("." + m)), None)
            if member is not None:
                groups.setdefault((name[: -len(member)], roles), []).append(name)
    return [names for names in groups.values() if len({repr(overrides.get(n, scheme)) for n in names}) > 1]


def override_claims(targets: dict[str, nn.Linear], recipe: Recipe) -> tuple[dict[str, int], list[str]]:
    """-> (the index of the recipe override that claims each target it claims, by name; override targets that matched
    no linear). A linear that overrides of different schemes claim is an error: compressed-tensors and vLLM would pick
    one by their own ranking of the targets, not by the recipe's order."""
    claims, used = {}, set()
    for name in targets:
        hits = [(i, t) for i, o in enumerate(recipe.overrides) for t in o.targets if matches(name, t)]
        if not hits:
            continue
        schemes = list(dict.fromkeys(recipe.overrides[i].scheme for i, _ in hits))
        if len(schemes) > 1:
            (i, a), (j, b) = hits[0], next(h for h in hits if recipe.overrides[h[0]].scheme != schemes[0])
            raise PtqlabError(f"{name} is claimed by overrides[{i}] ({a!r}: {schemes[0].describe()}) and "
                              f"overrides[{j}] ({b!r}: {schemes[1].describe()}): make the overrides' targets disjoint")
        claims[name] = hits[0][0]
        used.update(t for _, t in hits)
    unused = [t for o in recipe.overrides for t in o.targets if t not in used]
    return claims, unused


def resolve_group_size(recipe: Recipe, targets: dict[str, nn.Linear]) -> tuple[Recipe, str | None]:
    """Make the recipe's group size divide the input width of every target it quantizes, and each override's that of
    the targets it claims, or explain why it cannot."""
    claims, _ = override_claims(targets, recipe)
    own = {name: m for name, m in targets.items() if name not in claims}
    scheme, note = _fitted_scheme(recipe.scheme, own, recipe.auto_group_size, "--group-size")
    notes, overrides = [note], list(recipe.overrides)
    for i, override in enumerate(overrides):
        claimed = {name: m for name, m in targets.items() if claims.get(name) == i}
        fitted, note = _fitted_scheme(override.scheme, claimed, recipe.auto_group_size, f"overrides[{i}].group_size")
        overrides[i] = replace(override, scheme=fitted)
        notes.append(note and f"overrides[{i}]: {note}")
    notes = [n for n in notes if n]
    return replace(recipe, scheme=scheme, overrides=tuple(overrides)), "; ".join(notes) or None


def _fitted_scheme(scheme, targets: dict[str, nn.Linear], automatic_allowed: bool, option: str):
    """-> (`scheme` with a group size that divides every one of `targets`' input widths, a note when it was changed),
    or an error naming `option` (how the user sets that group size) and the size to give."""
    group_size = columns_that_must_divide(scheme)
    if group_size is None or not targets:
        return scheme, None
    widths = {name: m.in_features for name, m in targets.items()}
    bad = {name: w for name, w in widths.items() if w % group_size}
    if not bad:
        return scheme, None
    examples = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:3])
    problem = f"group size {group_size} does not divide the input width of {len(bad)} layers"
    size, which = suggest_group_size(widths.values(), group_size)
    if size == 1:
        raise PtqlabError(f"{problem}, e.g. {examples}, and no group size above 1 divides every layer's input width: "
                          "use a recipe that quantizes weights per channel (see `ptqlab recipes`)")
    if is_fp4(scheme.weights):
        raise PtqlabError(f"{problem}, e.g. {examples}: FP4's groups are fixed by the format; keep those layers 16-bit "
                          f"with --ignore (e.g. --ignore {next(iter(bad))})")
    automatic = size <= group_size and size & (size - 1) == 0 and size >= MIN_AUTO_GROUP
    if not automatic_allowed or not automatic:
        set_it = f"use {option} {size}" if option.startswith("--") else f"set {option}: {size} in the recipe"
        raise PtqlabError(f"{problem}, e.g. {examples}; {which} that divides every layer's input width is {size}: "
                          f"{set_it}")
    note = f"{problem} (e.g. {examples}); using group size {size}, the largest power of two that divides every layer"
    return with_columns_per_scale(scheme, size), note


def _check_weight(name: str, linear: nn.Linear) -> None:
    if not linear.weight.is_floating_point():
        raise PtqlabError(f"{name}: the weight is {str(linear.weight.dtype).removeprefix('torch.')}, not a float: the model is "
                          "already quantized; give the 16-bit original")
    _check_finite(name, linear)


def _check_finite(name: str, linear: nn.Linear) -> None:
    if linear.weight.device.type != "meta" and not torch.isfinite(linear.weight).all():  # streamed: checked when read
        raise PtqlabError(f"{name}: the weight holds NaN or Inf; the checkpoint is damaged or was loaded in a dtype that overflows (try --dtype bfloat16)")


def _quantize_linear(name: str, linear: nn.Linear, scheme, global_scale: torch.Tensor | None = None) -> QuantizedLinear:
    _check_weight(name, linear)
    return QuantizedLinear.from_weight(linear.weight.detach(), linear.bias, scheme, global_scale=global_scale)


def check_streamable_recipe(recipe: Recipe, stream: bool) -> None:
    """One line refusing --stream for a recipe with a whole-model step (rotate): a streamed model is never whole."""
    whole = next((step for step in recipe.steps if kind_of(step).scope == "model"), None)
    if stream and whole is not None:
        raise PtqlabError(f"recipe {recipe.name}: {step_name(whole)} transforms the whole model before the layer "
                          "loop, and --stream never holds the whole model: quantize it without --stream")


LayerWriter = Callable[[int, nn.Module, str], None]
"""(layer index, a finished decoder layer, its module name) -> None: writes its checkpoint tensors."""


def _layer_hooks(streamed: StreamedModel | None, write_layer: LayerWriter | None, targets: dict[str, nn.Linear],
                 by_layer: list[list[str]]):
    """The engine's load_layer / finish_layer: with `write_layer`, each finished layer is written; with a streamed
    model, layers are read when reached and let go (the float linears they replaced too) once written."""
    if streamed is not None and write_layer is None:
        raise ValueError("a streamed model needs write_layer: its finished layers are not kept")
    if write_layer is None:
        return None, None

    def finish(index: int, layer: nn.Module, prefix: str) -> None:
        write_layer(index, layer, prefix)
        if streamed is not None:
            streamed.release_layer(index)
            for name in by_layer[index]:
                targets[name].to("meta")

    return (None if streamed is None else streamed.load_layer), finish


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, calibration: CalibrationSet | None = None,
                   options: EngineOptions | None = None, streamed: StreamedModel | None = None,
                   write_layer: LayerWriter | None = None, **engine) -> QuantizationResult:
    """Quantize `model` in place according to `recipe`; calibrated methods need `calibration`, and run as `options`
    say (engine/calibrate.EngineOptions; keyword arguments set its fields: device, batch_size, compute_dtype, quiet,
    resume, offload, activations_on_gpu, min_expert_tokens, world). With `streamed` (its .model is `model`), decoder
    layers are read from disk one at a time and handed to `write_layer` when done, then dropped: the model is never
    whole in memory. `options.resume` (engine/resume.Checkpointer, calibrated recipes) keeps the engine's state after
    every layer, and starts where an earlier run of the same settings stopped. A mixture-of-experts model's fused
    experts become one linear per expert projection first (engine/experts.py); its routers stay 16-bit, and an
    expert routed fewer than `options.min_expert_tokens` calibration tokens in a layer is calibrated on all of them.
    `options.world`: this process's rank among several that calibrate together (engine/distributed.py)."""
    options = replace(options or EngineOptions(), **engine)
    model_steps = [step for step in recipe.steps if kind_of(step).scope == "model"]
    check_streamable_recipe(recipe, streamed is not None)
    model_notes = [note for step in model_steps for note in kind_of(step).run(step, model)]
    unfuse(model)
    keep, kept_notes = kept_16_bit(model)
    if keep:  # named one by one, in module order, as llm-compressor's configs name them
        recipe = recipe.with_overrides(ignore=[*keep, *(p for p in recipe.ignore if p not in keep)])
    targets, ignored, unused = target_linears(model, recipe.ignore)
    unused = [p for p in unused if p not in keep]
    if not targets:
        raise PtqlabError(f"the ignore list {list(recipe.ignore)} leaves no linear layer to quantize")
    recipe, note = resolve_group_size(recipe, targets)
    result = QuantizationResult(recipe=recipe, ignored=ignored, notes=model_notes + kept_notes)
    if note:
        result.notes.append(note)
    for pattern in unused:
        result.notes.append(f"ignore pattern {pattern!r} matched no linear layer")
    claims, unclaimed = override_claims(targets, recipe)
    overrides = {name: recipe.overrides[i].scheme for name, i in claims.items()}
    for i, override in enumerate(recipe.overrides):
        count = sum(1 for claimed in claims.values() if claimed == i)
        result.notes.append(f"overrides[{i}]: {count} linears quantized as {override.scheme.describe()}")
    for pattern in unclaimed:
        result.notes.append(f"override target {pattern!r} matched no quantized linear layer")
    split = fused_groups_split(model, targets, overrides, recipe.scheme)
    if split:
        result.notes.append(f"overrides split {len(split)} groups of linears that vLLM fuses into one between "
                            f"schemes (e.g. {', '.join(split[0])}): vLLM loads q/k/v and gate/up as one linear of "
                            "one scheme and cannot load this checkpoint; give an override all of a group's linears")

    by_layer, outside = names_by_layer(model, targets)
    load_layer, finish_layer = _layer_hooks(streamed, write_layer, targets, by_layer)
    if recipe.calibrated:
        steps = " + ".join([step_name(step) for step in recipe.steps] + ([f"kv {recipe.kv}"] if recipe.kv else []))
        if calibration is None:
            raise PtqlabError(f"recipe {recipe.name} ({steps}) needs calibration data")
        check_batch_size(options.batch_size)
        if outside:
            # The engine calibrates decoder layers; a linear outside them (lm_head) would silently stay 16-bit.
            raise PtqlabError(f"calibrated recipes quantize linears inside decoder layers only, and {', '.join(outside)} "
                              f"lies outside them: keep it 16-bit with --ignore (e.g. --ignore {outside[0]})")
        for name, linear in targets.items():
            _check_weight(name, linear)
        layer_transforms = tuple(step for step in recipe.transforms if kind_of(step).scope != "model")
        plan = Plan(layer_transforms, recipe.quantizer, recipe.scheme, scale_dtype=model_dtype(model),
                    kv=kv_cache_format(recipe.kv), overrides=overrides)
        options = replace(options, label=f"{recipe.name} ({steps})", load_layer=load_layer, finish_layer=finish_layer)
        reports = calibrate(model, targets, plan, calibration, options)
        result.quantized = list(targets)
        result.layer_reports = reports
        result.notes += [note for report in reports for note in report.notes]
        coverage = [entry for report in reports for entry in report.experts]
        if coverage:
            result.notes.append(coverage_note(coverage))
        return result

    layers = decoder_layers(model)
    prefixes = {id(module): name for name, module in model.named_modules()}
    groups = [(i, names) for i, names in enumerate(by_layer)] + ([(None, outside)] if outside else [])
    label = f"{recipe.name} ({recipe.method})"
    for index, names in track(groups, label, total=len(groups), quiet=options.quiet, status=lambda g: f"{len(g[1])} linears"):
        if index is not None and load_layer is not None:
            load_layer(index)
        global_scales = {}  # NVFP4: one per weight that vLLM fuses (q/k/v, gate/up), before any group scale
        nvfp4 = [n for n in names if fp4.has_global_scale(overrides.get(n, recipe.scheme).weights)]
        if nvfp4:
            global_scales = weight_global_scales({n: targets[n] for n in nvfp4}, targets[nvfp4[0]].weight.dtype)
        for name in names:
            set_submodule(model, name, _quantize_linear(name, targets[name], overrides.get(name, recipe.scheme),
                                                        global_scales.get(name)))
            result.quantized.append(name)
        if index is not None and finish_layer is not None:
            finish_layer(index, layers[index], prefixes[id(layers[index])])
    return result
