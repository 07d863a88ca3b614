"""What a compressed-tensors `quantization_config` implies for each quantized linear: its config groups' weight
formats as stored (parsed leniently: a checkpoint from any tool), which group claims a linear, and the tensors that
linear must store, with their shapes and dtypes, from the format's row of number_formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from ptqlab.safetensors_files import SAFETENSORS_DTYPES
from ptqlab.number_formats import BY_NAME, Layout, NumberFormat, activation_kind
from ptqlab.schemes import claiming_group, matches

CHECKED_FORMATS = tuple(BY_NAME)
"""compressed-tensors formats whose per-linear tensors are checked (others get the file and dense checks): every
row of number_formats."""
QUANT_SUFFIXES = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx",
                  "weight_global_scale", "input_global_scale")


@dataclass(frozen=True)
class WeightFormat:
    """One quantization_config group's weight format, as stored: the fields number_formats' rows read
    (number_formats.WeightArgs), its group's name and format."""

    group: str
    format: str
    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    scale_dtype: str | None = None
    zp_dtype: str | None = None
    input_global: bool = False
    """NVFP4 activations (`dynamic: local`): an `input_global_scale` per linear."""

    @property
    def number_format(self) -> NumberFormat:
        """Its row of number_formats (a format this module checks: one of CHECKED_FORMATS)."""
        return BY_NAME[self.format]

    def describe(self) -> str:
        kind = f"fp{self.num_bits}" if self.type == "float" else f"int{self.num_bits}"
        if self.strategy in ("group", "tensor_group"):
            granularity = f"group size {self.group_size}"
        elif self.strategy == "block":
            granularity = "blocks of {}x{}".format(*self.block_structure)
        else:
            granularity = f"per-{self.strategy} scales"
        return f"{self.group}: {'' if self.symmetric else 'asymmetric '}{kind} weights, {granularity}"


def dtype_name(value) -> str | None:
    """A dtype as config.json may give it (torch.bfloat16, bfloat16) -> torch's name."""
    return None if value is None else str(value).removeprefix("torch.")


def weight_formats(quantization_config: dict) -> list[tuple[list[str], WeightFormat | None]]:
    """(targets, weight format) per config group; the format is None where it is not one this module checks."""
    qc = quantization_config
    compressed = qc.get("quant_method") == "compressed-tensors" and qc.get("quantization_status", "compressed") == "compressed"
    out = []
    for key, group in sorted((qc.get("config_groups") or {}).items()):
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            continue
        fmt = group.get("format") or qc.get("format")
        block = weights.get("block_structure")
        acts = group.get("input_activations")
        try:
            parsed = WeightFormat(
                key, fmt, int(weights["num_bits"]), weights.get("type", "int"), bool(weights.get("symmetric", True)),
                weights.get("strategy"), weights.get("group_size"),
                tuple(block) if isinstance(block, list) and len(block) == 2 else None,
                dtype_name(weights.get("scale_dtype")), dtype_name(weights.get("zp_dtype")),
                isinstance(acts, dict) and acts.get("dynamic") == "local")
        except (KeyError, TypeError, ValueError):
            parsed = None
        usable = (compressed and parsed is not None and fmt in CHECKED_FORMATS
                  and parsed.strategy in ("tensor", "channel", "group", "tensor_group", "block")
                  and (parsed.strategy not in ("group", "tensor_group")
                       or isinstance(parsed.group_size, int) and parsed.group_size > 0)
                  and (parsed.strategy != "block" or parsed.block_structure is not None))
        out.append((list(group.get("targets") or []), parsed if usable else None))
    return out


def deployments(quantization_config: dict) -> list[dict]:
    """The engine path per GPU generation of each config group (its number_formats row's Deployment.to_dict), in
    group order and without repeats; a group whose format or family has no recorded path is left out."""
    groups = quantization_config.get("config_groups") or {}
    out = []
    for _, fmt in weight_formats(quantization_config):
        if fmt is None:
            continue
        acts = groups[fmt.group].get("input_activations")
        try:
            kind = activation_kind(SimpleNamespace(type=acts.get("type", "int"), num_bits=int(acts["num_bits"])))
        except (AttributeError, KeyError, TypeError, ValueError):  # None: weight-only; malformed: no claim made
            kind = None if acts is None else "unknown"
        found = fmt.number_format.deployment(fmt, kind)
        if found is not None and found.to_dict() not in out:
            out.append(found.to_dict())
    return out


@dataclass(frozen=True)
class Resolution:
    """What the quantization_config says of one linear layer."""

    ignored: bool = False
    targeted: bool = False
    format: WeightFormat | None = None


def resolve(name: str, ignore: list[str], groups: list[tuple[list[str], WeightFormat | None]]) -> Resolution:
    if any(matches(name, t) for t in ignore):
        return Resolution(ignored=True)
    index = claiming_group(name, [targets for targets, _ in groups])  # names and regexes before the class Linear
    return Resolution() if index is None else Resolution(targeted=True, format=groups[index][1])


def quantized_tensors(fmt: WeightFormat, out: int, inp: int, weight_why: str, float_dtype: str | None) -> dict[str, Layout]:
    """The tensors a quantized linear [out, in] stores in `fmt`, by suffix, with their shapes and dtypes: its format's
    row of number_formats says which."""
    return fmt.number_format.tensors(fmt, out, inp, weight_why, float_dtype, fmt.zp_dtype, fmt.input_global)


def quantized_linear_bytes(scheme, out: int, inp: int, float_dtype: str) -> int:
    """Bytes of the tensors a linear [out, in] quantized to `scheme` (a schemes.Scheme) stores, its bias aside, in a
    checkpoint whose float dtype is `float_dtype`: its format's tensors, each in the first dtype they allow (the one
    ptqlab writes). What a sensitivity plan prices keeping a part at another scheme with."""
    w, acts = scheme.weights, scheme.input_activations
    fmt = WeightFormat("", scheme.format, w.num_bits, w.type, w.symmetric, w.strategy, w.group_size, w.block_structure,
                       w.scale_dtype, None, acts is not None and acts.dynamic == "local")
    itemsize = {name: bits // 8 for name, bits in SAFETENSORS_DTYPES.values()}
    return sum(math.prod(need.shape) * itemsize[need.dtypes[0]]
               for need in quantized_tensors(fmt, out, inp, "", float_dtype).values())
