"""Which parts of a model a recipe hurts, and the mixed-precision recipe that spares them.

A part is one decoder layer's attention or its MLP (with the norm in front of it, which SmoothQuant and AWQ fold
their scales into); a mixture of experts' MLP block is one part, "experts": the layer's routed experts and its shared
expert, beside its router (16-bit in every recipe, so the same in both models). Its sensitivity is the KL from the
baseline when that part alone is quantized: the baseline model, in memory, with that part's modules swapped for the
checkpoint's (read by transformers, the official compressed-tensors reader, so weights and activations are quantized
exactly as the checkpoint says; routed experts transformers merges into its fused experts dequantized, their
activations 16-bit, which the measurement then notes where the recipe quantizes activations). "Alone
quantized" rather than "alone restored to 16-bit": each figure then belongs to its part and not to which others
are quantized, so the figures of a set add up (to first order: small perturbations add their KL), which is what
choosing a set needs; the uniform recipe's measured KL calibrates the sum, and the chosen recipe is measured again
as a variant of its own, never trusted from the prediction.

The mixed recipe keeps the chosen parts 16-bit through the recipe's `ignore` list, or (`keep_bits`) at the recipe's
own scheme with more bits through its `overrides` (e.g. a 2-bit recipe with its most sensitive parts at 4-bit, same
groups, same quantizer), picking parts by KL saved per byte added until the predicted KL meets the target, or while
the checkpoint fits a size budget. The bytes a kept part adds are exact: 16-bit, its tensors in the baseline's files
less in the checkpoint's; at another scheme, its linears' tensors at that scheme less at the recipe's
(formats/validate.quantized_linear_bytes, from their shapes).

The KL saved by keeping a part at a wider scheme is its measured KL at the recipe's scheme less its KL at the kept
scheme, which is not measured: it is taken as the measured KL times 4^-(extra bits) (KEPT_KL_PER_BIT). The reasoning:
one more bit halves the grid step; rounding error per weight scales with the step squared; the KL of a small weight
perturbation is second order in it. So a 2-bit part kept at 4-bit keeps 1/16 of its KL. Group size, symmetry and
clipping are the same at both schemes and so left out. This only steers the choice (it ranks parts exactly as their
measured KL per byte does, since every part's saved share is the same); the chosen recipe is measured again.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.families import ExpertLayout, moe_layout
from ptqlab.formats.quantized_layouts import quantized_linear_bytes
from ptqlab.formats.readback import experts_misread, expert_reading, stored_expert_schemes
from ptqlab.safetensors_files import read_header
from ptqlab.measure.quality import evaluate
from ptqlab.measure.variant import evaluation_tokens, stored_dtype
from ptqlab.models import compute_dtype, decoder_layer_names, resolve_device, set_submodule
from ptqlab.progress import track
from ptqlab.recipe import SchemeOverride
from ptqlab.recipes import parse_recipe
from ptqlab.record import read_record
from ptqlab.schemes import FormatError, INT_BITS, QuantArgs

PART_CHILDREN = {
    "attention": ("input_layernorm", "self_attn"),
    "mlp": ("post_attention_layernorm", "pre_feedforward_layernorm", "mlp", "block_sparse_moe", "feed_forward"),
}
"""The children of a decoder layer that make up each part: the block and the norm(s) in front of it (a norm that no
transform changed is the same in both models, so swapping it too is harmless)."""

PARTS_VERSION = 2
"""What a part is, as a number a sensitivity.json records: a measurement of another (1, none recorded: an MoE's
experts were in no part) is made again, not reused."""
SENSITIVITY_WINDOWS = 4
"""Evaluation windows per part by default: a ranking of parts needs far fewer tokens than a verdict on a variant."""
MERGED_EXPERTS_NOTE = ("the experts are measured with their weights as the checkpoint stores them and 16-bit "
                       "activations: transformers reads them dequantized into its fused experts, which do not quantize "
                       "activations")
"""What a measurement of experts transformers merged leaves out, said beside it where the recipe quantizes
activations."""
KEPT_KL_PER_BIT = 0.25
"""The share of a part's KL taken to remain per bit it is kept wider (module docstring): the kept scheme's KL is not
measured."""


@dataclass(frozen=True)
class Part:
    layer: int
    kind: str
    """attention, mlp, or experts (a mixture of experts' MLP block)."""
    prefix: str
    """The decoder layer's module name, e.g. model.layers.3."""
    children: tuple[str, ...]
    """Its children swapped for this part."""
    quantized_bytes: int
    """The part's tensors in the checkpoint."""
    dense_bytes: int
    """The same tensors 16-bit, in the baseline's files."""
    linears: tuple[tuple[int, int], ...] = ()
    """[out, in] of each of its quantized linears (module order): what prices it at another scheme. Empty in
    measurements made before it was recorded, or where a quantized module is no linear of the baseline."""

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.kind}"

    @property
    def extra_bytes(self) -> int:
        """What keeping it 16-bit adds to the checkpoint."""
        return max(self.dense_bytes - self.quantized_bytes, 1)

    @property
    def ignore_pattern(self) -> str:
        """The recipe `ignore` entry that keeps every linear of this part 16-bit."""
        return f"re:{re.escape(self.prefix)}\\.({'|'.join(self.children)})\\."


@dataclass(frozen=True)
class PartResult:
    part: Part
    kl_mean: float
    kl_p99: float
    top1_pct: float

    def to_dict(self) -> dict:
        return {"name": self.part.name, **asdict(self.part), "extra_bytes": self.part.extra_bytes,
                "kl_mean": self.kl_mean, "kl_p99": self.kl_p99, "top1_pct": self.top1_pct}


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in a folder's safetensors files, from their headers (nothing is loaded)."""
    return {name: tensor.nbytes for name, tensor in _stored_tensors(folder).items()}


def _stored_tensors(folder: Path) -> dict:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in read_header(file).items()}


def model_names(stored: dict, layout: ExpertLayout | None) -> dict:
    """`stored` (tensor name -> anything) keyed by the model's names: where transformers renamed an MoE block or its
    router (Mixtral's block_sparse_moe is its mlp), the checkpoint's names are the hub's (families.checkpoint_name)."""
    renames = () if layout is None else layout.renames[::-1]  # undone in the reverse order of their doing
    renamed = {}
    for name, value in stored.items():
        for ours, theirs in renames:
            name = name.replace(theirs, ours)
        renamed[name] = value
    return renamed


def merged_experts(baseline: nn.Module, checkpoint: Path) -> dict:
    """The per-expert linears a checkpoint of `baseline`'s architecture quantizes that transformers merges,
    dequantized, into its fused experts (so no module of the model it loads carries their scheme), by the model's
    names, with their schemes; one line refusing, before transformers loads it, a checkpoint whose experts it does not
    read as stored (it fails, leaves them at their random initialization, or dequantizes them on another scheme's
    grid)."""
    layout = moe_layout(baseline.config)
    if layout is None:
        return {}
    stored = stored_expert_schemes(checkpoint)
    why = experts_misread(baseline, stored.values())
    if why is not None:
        raise PtqlabError(f"sensitivity measures the checkpoint as transformers reads it, and transformers does not "
                          f"read {why}: choose a recipe with symmetric int4 or FP8 experts (e.g. w4a16)")
    if expert_reading(baseline) == "linears":  # kept as linears of their own, which carry their schemes
        return {}
    return {name: scheme for name, scheme in model_names(stored, layout).items() if scheme is not None}


def _bytes_under(sizes: dict[str, int], prefix: str, children: tuple[str, ...]) -> int:
    return sum(size for name, size in sizes.items() if any(name.startswith(f"{prefix}.{child}.") for child in children))


def find_parts(model: nn.Module, quantized_names: set[str], checkpoint_sizes: dict[str, int],
               dense_sizes: dict[str, int], dense_shapes: dict[str, tuple] | None = None
               ) -> tuple[list[Part], list[str]]:
    """The parts holding quantized modules, in layer order, and the quantized modules outside every part.
    `dense_shapes` (tensor -> shape, the baseline's files, by the model's names) shape the linears `model` holds
    fused (an MoE's experts, one parameter for all), which it has no module for."""
    parts, covered = [], set()
    for index, prefix in enumerate(decoder_layer_names(model)):
        layer = model.get_submodule(prefix)
        for kind, names in PART_CHILDREN.items():
            children = tuple(c for c in names if hasattr(layer, c))
            inside = {n for n in quantized_names if any(n.startswith(f"{prefix}.{c}.") for c in children)}
            if inside:
                covered |= inside
                shapes = [_linear_shape(model, n, dense_shapes or {}) for n in sorted(inside)]
                kind = "experts" if kind == "mlp" and any(".experts." in n for n in inside) else kind
                parts.append(Part(index, kind, prefix, children, _bytes_under(checkpoint_sizes, prefix, children),
                                  _bytes_under(dense_sizes, prefix, children),
                                  tuple(shapes) if None not in shapes else ()))
    return parts, sorted(quantized_names - covered)


def _linear_shape(model: nn.Module, name: str, dense_shapes: dict[str, tuple]) -> tuple[int, int] | None:
    """[out, in] of the linear `name`: its module's, else (held fused) its weight's in the baseline's files."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        shape = dense_shapes.get(f"{name}.weight")
        return tuple(shape) if shape is not None and len(shape) == 2 else None
    return tuple(module.weight.shape) if isinstance(module, nn.Linear) else None


@contextmanager
def swapped(model: nn.Module, donor: nn.Module, part: Part):
    """`model` with `part`'s children taken from `donor` (the same architecture), restored afterwards."""
    names = [f"{part.prefix}.{child}" for child in part.children]
    originals = [model.get_submodule(name) for name in names]
    try:
        for name in names:
            set_submodule(model, name, donor.get_submodule(name))
        yield model
    finally:
        for name, module in zip(names, originals):
            set_submodule(model, name, module)


def predicted_kl(results: list[PartResult], uniform_kl: float, kept: list[Part], retained: float = 0.0) -> float:
    """The mixed recipe's KL, predicted: the uniform recipe's measured KL times the share of the parts' summed KL
    that stays (parts' KLs add to first order; the measured total calibrates their interactions). A kept part keeps
    the share `retained` of its KL: 0 kept 16-bit, KEPT_KL_PER_BIT per extra bit kept at a wider scheme."""
    total = sum(r.kl_mean for r in results)
    if total <= 0:
        return uniform_kl
    kept_ids = {(p.layer, p.kind) for p in kept}
    remaining = sum(r.kl_mean * (retained if (r.part.layer, r.part.kind) in kept_ids else 1.0) for r in results)
    return uniform_kl * remaining / total


def choose_kept(results: list[PartResult], uniform_kl: float, uniform_bytes: int, target_kl: float | None = None,
                max_bytes: int | None = None, extra_bytes=None, retained: float = 0.0) -> list[Part]:
    """The parts to keep, most KL saved per byte added first: until the predicted KL is at most `target_kl` (the
    fewest bytes that reach it, greedily), or as many as fit in `max_bytes` for the whole checkpoint. `extra_bytes`
    (part -> bytes) and `retained` (the share of its KL a kept part keeps) say how parts are kept: by default
    16-bit (Part.extra_bytes, none of the KL kept)."""
    if (target_kl is None) == (max_bytes is None):
        raise PtqlabError("give a KL target (--target-kl) or a size budget (--max-size), one of the two")
    extra = extra_bytes or (lambda part: part.extra_bytes)
    ranked = sorted(results, key=lambda r: r.kl_mean * (1 - retained) / extra(r.part), reverse=True)
    kept, size = [], uniform_bytes
    for result in ranked:
        if target_kl is not None:
            if predicted_kl(results, uniform_kl, kept, retained) <= target_kl:
                break
            kept.append(result.part)
        elif size + extra(result.part) <= max_bytes and result.kl_mean > 0:
            kept.append(result.part)
            size += extra(result.part)
    return kept


def check_max_bytes(max_bytes: int | None, uniform_bytes: int, recipe_name: str) -> None:
    """Refuse a size budget below the uniform checkpoint's weights: keeping parts wider only adds bytes, so no mixed
    recipe fits it (and keeping none would pass for meeting it)."""
    if max_bytes is not None and max_bytes < uniform_bytes:
        given = f"{max_bytes:,} byte{'s' if max_bytes != 1 else ''}"
        raise PtqlabError(f"--max-size of {given} is below the smallest checkpoint {recipe_name} makes of this model: "
                          f"{uniform_bytes:,} bytes of weights with every part quantized, which keeping parts wider "
                          f"only grows: give --max-size {_size_at_least(uniform_bytes)} or more, or a recipe of fewer "
                          "bits")


def _size_at_least(n: int) -> str:
    """`n` bytes as a --max-size that --max-size reads back as at least `n`: MiB (GiB from 1 GiB), rounded up."""
    unit, scale, step = ("GiB", 2**30, 100) if n >= 2**30 else ("MiB", 2**20, 10)
    return f"{math.ceil(n / scale * step) / step:g}{unit}"


def kept_scheme(scheme, bits: int):
    """`scheme` (the recipe's, as applied) with `bits`-bit weights, all else the same: how `keep_bits` keeps parts."""
    weights = scheme.weights
    if weights.type != "int":
        raise PtqlabError(f"--keep-bits applies to int weights; the recipe's are {weights.type}{weights.num_bits}: "
                          f"keep parts 16-bit (leave --keep-bits out)")
    wider = [b for b in INT_BITS if b > weights.num_bits]
    if bits not in wider:
        raise PtqlabError(f"--keep-bits {bits}: must be wider than the recipe's {weights.num_bits}-bit weights: one of "
                          f"{', '.join(map(str, wider)) or 'none (use 16-bit: leave --keep-bits out)'}")
    try:
        return replace(scheme, weights=QuantArgs(**{**weights.values(), "num_bits": bits}))
    except FormatError as e:
        raise PtqlabError(f"--keep-bits {bits}: {e}") from None


def kept_extra_bytes(part: Part, scheme, kept, float_dtype: str) -> int:
    """What keeping `part` at scheme `kept` instead of `scheme` adds to the checkpoint: its linears' tensors at one
    less at the other (norms and biases are the same in both)."""
    if not part.linears:
        raise PtqlabError(f"{part.name}: the sensitivity measurement has no shapes of its linears to price it at "
                          f"another scheme (measured by an older ptqlab, or a fused-expert model): measure again, or "
                          f"keep parts 16-bit (leave --keep-bits out)")
    change = sum(quantized_linear_bytes(kept, out, inp, float_dtype)
                 - quantized_linear_bytes(scheme, out, inp, float_dtype) for out, inp in part.linears)
    return max(change, 1)


def mixed_recipe(recipe, kept: list[Part], scheme=None):
    """`recipe` named RECIPE-mixed, with the kept parts' linears added to its ignore list (16-bit), or given `scheme`
    through one more override."""
    patterns = tuple(p.ignore_pattern for p in kept)
    if scheme is None:
        description = (f"{recipe.description or recipe.name}; {len(kept)} sensitive parts kept 16-bit "
                       f"(ptqlab sensitivity)")
        return replace(recipe, name=f"{recipe.name}-mixed", ignore=tuple(recipe.ignore) + patterns,
                       description=description)
    description = (f"{recipe.description or recipe.name}; {len(kept)} sensitive parts kept at {scheme.describe()} "
                   f"(ptqlab sensitivity)")
    overrides = recipe.overrides + ((SchemeOverride(patterns, scheme),) if kept else ())
    return replace(recipe, name=f"{recipe.name}-mixed", overrides=overrides, description=description)


def _load_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The checkpoint through transformers (compressed-tensors): its modules quantize weights and activations as the
    checkpoint says. Cast with nn.Module's methods: transformers refuses to cast a quantized model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="cpu")
    return nn.Module.to(model, device=device, dtype=dtype).eval()


def checkpoint_dtype(folder: Path) -> str:
    """The float dtype of a checkpoint's unquantized tensors and scales (config.json's), e.g. bfloat16."""
    return str(stored_dtype(json.loads((Path(folder) / "config.json").read_text()))).removeprefix("torch.")


@torch.no_grad()
def measure_sensitivity(base_path: Path, checkpoint: Path, settings, windows: int = SENSITIVITY_WINDOWS,
                        quiet: bool = False) -> dict:
    """KL of every part alone quantized, and of the whole checkpoint, against the baseline on the bench protocol's
    text (its first `windows` windows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    device = resolve_device(settings.device)
    config = json.loads((base_path / "config.json").read_text())
    dtype = compute_dtype(device, stored_dtype(config))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokens = evaluation_tokens(tokenizer, replace(settings, ppl_windows=windows), config)
    baseline = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
    sizes = safetensors_bytes(checkpoint)
    merged = merged_experts(baseline, checkpoint)  # before transformers reads the checkpoint: it may refuse
    quantized = _load_checkpoint(checkpoint, device, dtype)

    def score(model, reference=None):
        return evaluate(model, tokens.token_ids, tokens.windows, reference, settings.topk, quiet=True,
                        protocol=tokens.protocol, bos_id=tokens.bos_id)

    layout = moe_layout(quantized.config)
    names = {n for n, m in quantized.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    names |= set(merged)
    notes = [MERGED_EXPERTS_NOTE] if any(s.input_activations is not None for s in merged.values()) else []
    reference = score(baseline).topk
    uniform = score(quantized, reference).summary()["kl"]
    dense = model_names(_stored_tensors(base_path), layout)
    parts, outside = find_parts(baseline, names, model_names(sizes, layout), {k: t.nbytes for k, t in dense.items()},
                                {k: t.shape for k, t in dense.items()})
    if not parts:
        raise PtqlabError(f"{checkpoint} has no quantized decoder layer to measure")
    results = []
    status = {"last": ""}
    for part in track(parts, "sensitivity", total=len(parts), quiet=quiet, status=lambda _: status["last"]):
        with swapped(baseline, quantized, part):
            kl = score(baseline, reference).summary()["kl"]
        results.append(PartResult(part, kl["mean"], kl["p99"], kl["top1_agreement_pct"]))
        status["last"] = f"{part.name}: KL {kl['mean']:.4f}"
    record = read_record(checkpoint)
    return {"checkpoint": str(checkpoint), "baseline": str(base_path), "recipe": record.recipe if record else None,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "stored_dtype": checkpoint_dtype(checkpoint), "windows": len(tokens.windows),
            "context": tokens.context, "protocol": tokens.protocol.name, "text": tokens.text.name,
            "measured": "each part alone quantized (the rest 16-bit), KL from the baseline",
            "uniform": {"kl_mean": uniform["mean"], "top1_pct": uniform["top1_agreement_pct"],
                        "weights_bytes": sum(sizes.values())},
            "parts": [r.to_dict() for r in results], "not_measured": outside, "notes": notes}


def part_results(sensitivity: dict) -> list[PartResult]:
    """The parts of a sensitivity.json, as PartResults."""
    fields = Part.__dataclass_fields__
    as_tuple = {"children": tuple, "linears": lambda shapes: tuple(tuple(shape) for shape in shapes)}
    return [PartResult(Part(**{k: as_tuple.get(k, lambda v: v)(v) for k, v in p.items() if k in fields}),
                       p["kl_mean"], p["kl_p99"], p["top1_pct"]) for p in sensitivity["parts"]]


def plan_mixed(sensitivity: dict, recipe, target_kl: float | None, max_bytes: int | None,
               keep_bits: int | None = None):
    """(the mixed recipe, what it keeps and predicts) from a sensitivity measurement; `keep_bits`: kept parts at
    the recipe's scheme (as the measured checkpoint applied it) with that many bits, else 16-bit."""
    results = part_results(sensitivity)
    uniform = sensitivity["uniform"]
    scheme, retained = None, 0.0

    def extra(part: Part) -> int:
        return part.extra_bytes if scheme is None else kept_extra_bytes(part, applied.scheme, scheme, float_dtype)

    if keep_bits is not None:
        applied = parse_recipe(sensitivity["recipe"], "the measured checkpoint's recipe") if sensitivity.get("recipe") \
            else recipe
        if applied.overrides:
            raise PtqlabError(f"{applied.name} has overrides of its own: --keep-bits prices parts at one scheme; keep "
                              "parts 16-bit (leave --keep-bits out)")
        float_dtype = sensitivity.get("stored_dtype")
        if float_dtype is None:
            raise PtqlabError("the sensitivity measurement does not say the checkpoint's dtype (an older ptqlab's): "
                              "measure again to price parts at --keep-bits")
        scheme = kept_scheme(applied.scheme, keep_bits)
        retained = KEPT_KL_PER_BIT ** (keep_bits - applied.scheme.weights.num_bits)
    check_max_bytes(max_bytes, uniform["weights_bytes"], recipe.name)
    kept = choose_kept(results, uniform["kl_mean"], uniform["weights_bytes"], target_kl, max_bytes, extra, retained)
    plan = {"target_kl": target_kl, "max_bytes": max_bytes, "kept": [p.name for p in kept],
            "kept_as": "16-bit" if scheme is None else f"at {scheme.describe()}", "keep_bits": keep_bits,
            "kept_kl_share": retained, "predicted_kl": predicted_kl(results, uniform["kl_mean"], kept, retained),
            "predicted_weights_bytes": uniform["weights_bytes"] + sum(extra(p) for p in kept)}
    return mixed_recipe(recipe, kept, scheme), plan
