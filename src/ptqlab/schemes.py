"""What a quantized linear layer stores and computes: number formats as frozen dataclasses.

A `QuantArgs` describes one tensor's number format (bits, int or float, symmetric, the granularity of its
scales); a `Scheme` pairs the weight format with the optional dynamic input-activation format. These map
one-to-one onto compressed-tensors' `QuantizationArgs` / `QuantizationScheme`, so that what we compute is
exactly what the checkpoint declares. Hence the checks (check_format, check_scheme): every field has its exact type
(a bool is never "no", num_bits never 4.0) and only values the arithmetic computes are accepted. How a scheme is
stored (its compressed-tensors format, tensors, packing) is its row of number_formats (`Scheme.number_format`); the
FP4 formats' fixed group sizes and scale dtypes that the checks enforce come from those rows too.
"""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass, fields, replace
from typing import Literal

from ptqlab.number_formats import FP4_FORMATS, Deployment, NumberFormat, deployment_of, format_of, fp4_format, is_fp4

Strategy = Literal["tensor", "channel", "group", "tensor_group", "block", "token"]
NumberType = Literal["int", "float"]
Role = Literal["weights", "input_activations"]

INT_BITS = (2, 3, 4, 8)
FLOAT_BITS = (4, 8)
BITS: dict[str, tuple[int, ...]] = {"int": INT_BITS, "float": FLOAT_BITS}
"""Bits per element per number type: what primitives.grid_range computes with and compressed-tensors packs."""
STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block", "token")
WEIGHT_STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block")
"""Stored weight scales: one per tensor, per output channel, per group of input columns, per group times one per
tensor (`tensor_group`: NVFP4's FP8 group scales and fp32 global scale), or per 2-D block of `block_structure`
[rows, columns] (DeepSeek-V3's FP8 format: 128 x 128)."""
ACTIVATION_STRATEGIES = ("token", "tensor", "group", "tensor_group")
"""Dynamic input scales: one per token, per input tensor, per group of `group_size` columns of each token (the
activations of block-wise FP8), or per group of 16 times a calibrated global scale (NVFP4, `dynamic: local`); a
channel scale of the input is not computed."""
EXAMPLE_GROUP_SIZE = 128
LOCAL = "local"
"""`dynamic: local` (NVFP4 input activations): group scales computed from each input, the global scale calibrated."""


def matches(name: str, pattern: str) -> bool:
    """compressed-tensors' rule for a linear layer named in `targets` or `ignore`: `re:REGEX` matched from the start
    of the name, else the exact name, or the class name `Linear` (every layer ptqlab quantizes is one)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (name, "Linear")


def claiming_group(name: str, groups: list[list[str]]) -> int | None:
    """The index of the config group (given by its targets) whose scheme applies to the linear `name`, or None.
    compressed-tensors' precedence (utils/match.py `match_targets`, lifecycle/apply.py `_scheme_from_targets`): an
    exact name first, then a `re:` expression, then the class name `Linear`; among targets of one kind, the one that
    sorts first. vLLM ranks the same way (names and expressions before classes), so a group of regexes overrides a
    `Linear` group whatever their order."""
    best = None
    for index, targets in enumerate(groups):
        for target in targets:
            if not matches(name, target):
                continue
            rank = (2 if target == "Linear" and name != "Linear" else 1 if target.startswith("re:") else 0, target)
            if best is None or rank < best[0]:
                best = (rank, index)
    return None if best is None else best[1]


class FormatError(ValueError):
    """A number format the arithmetic does not support: `key` names the QuantArgs field at fault (prefixed with
    `weights.` or `input_activations.` for a whole scheme), `problem` says what is wrong and what is allowed; the
    message is `key: problem`."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def brief(value, limit: int = 60) -> str:
    """A value as a message quotes it: YAML's words for booleans and null, and never more than `limit` characters
    (a 10 MB string is cut, not echoed)."""
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind_problem(value, kind: type) -> str | None:
    """Why `value` is not of `kind` (bool only for bool, int never a bool or a float such as 4.0), or None."""
    if kind is bool:
        return None if isinstance(value, bool) else f"{brief(value)} is not a boolean; use true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"{brief(value)} is not an integer"
    if kind is str:
        return None if isinstance(value, str) else f"{brief(value)} is not a string"
    raise TypeError(kind)


FIELD_KINDS: dict[str, type] = {"num_bits": int, "type": str, "symmetric": bool, "strategy": str, "group_size": int,
                                "dynamic": bool}
BITS_ALLOWED = "; ".join(f"{', '.join(map(str, bits))} for {kind}" for kind, bits in BITS.items())


def _allowed(values) -> str:
    return ", ".join(map(str, values))


def _strategies(role: Role | None) -> tuple[str, ...]:
    return {None: STRATEGIES, "weights": WEIGHT_STRATEGIES, "input_activations": ACTIVATION_STRATEGIES}[role]


def _kind_hint(key: str, role: Role | None) -> str:
    """What a field of the wrong type should hold ('' where the type error says it: booleans)."""
    return {"num_bits": f"allowed: {BITS_ALLOWED}", "type": f"allowed: {_allowed(BITS)}",
            "strategy": f"allowed: {_allowed(_strategies(role))}",
            "group_size": f"use a positive integer such as {EXAMPLE_GROUP_SIZE}"}.get(key, "")


def _check_types(values: dict, role: Role | None) -> None:
    """FormatError on the first field whose value is not of its type (group_size may be None)."""
    for key, kind in FIELD_KINDS.items():
        value = values[key]
        if key == "group_size" and value is None or key == "dynamic" and value == LOCAL:
            continue
        problem = _kind_problem(value, kind)
        if problem:
            hint = _kind_hint(key, role)
            raise FormatError(key, problem + (f"; {hint}" if hint else ""))


def check_format(values: dict, role: Role | None = None) -> None:
    """Raise FormatError unless `values` (QuantArgs fields by name) is a format the arithmetic supports, in the
    `role` given (weights or input_activations; None: either). Checked field by field, types first."""
    _check_types(values, role)
    kind, bits, strategy = values["type"], values["num_bits"], values["strategy"]
    if kind not in BITS:
        raise FormatError("type", f"{brief(kind)} is not allowed; allowed: {_allowed(BITS)}")
    if bits not in BITS[kind]:
        what = "type float (FP4 E2M1, FP8 E4M3)" if kind == "float" else f"type {kind}"
        raise FormatError("num_bits", f"{bits} is not supported for {what}; allowed: {_allowed(BITS[kind])}")
    if kind == "float" and not values["symmetric"]:
        raise FormatError("symmetric", "false is not supported for type float (FP4 and FP8 have no zero point); use "
                                       "true")
    _check_fp4(values, role)
    if strategy not in _strategies(role):
        where = "" if role is None else f" for {role}"
        raise FormatError("strategy", f"{brief(strategy)} is not allowed{where}; allowed: {_allowed(_strategies(role))}")
    if role == "weights" and values["dynamic"]:
        raise FormatError("dynamic", f"{brief(values['dynamic'])} is not allowed for weights: their scales are computed "
                                     "once and stored; use false")
    if role == "input_activations" and not values["dynamic"]:
        raise FormatError("dynamic", "false is not supported for input_activations: ptqlab computes their scales from "
                                     "each input at run time and stores none; use true")
    block = values.get("block_structure")
    if strategy == "block":
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_kind_problem(b, int) is None and b > 0
                                                                              for b in block)):
            raise FormatError("block_structure", f"{brief(block)} is not two positive integers [rows, columns]; strategy "
                                                 "block needs one, e.g. [128, 128]")
        if not values["symmetric"]:
            raise FormatError("symmetric", "false is not supported for strategy block (block-wise scales carry no zero "
                                           "points); use true")
    elif block is not None:
        raise FormatError("block_structure", f"{brief(block)} applies only to strategy block, not {strategy!r}; remove it "
                                             "or use strategy: block")
    group_size = values["group_size"]
    grouped = strategy in ("group", "tensor_group")
    if grouped and group_size is None:
        raise FormatError("group_size", f"missing: strategy {strategy} needs a positive integer group_size, e.g. "
                                        f"{EXAMPLE_GROUP_SIZE if strategy == 'group' else 16}")
    if grouped and group_size < 1:
        raise FormatError("group_size", f"{group_size} is not a positive integer; use e.g. {EXAMPLE_GROUP_SIZE} (it must "
                                        f"divide every layer's input width)")
    if not grouped and group_size is not None:
        raise FormatError("group_size", f"{brief(group_size)} applies only to strategy group, not {strategy!r}; remove "
                                        f"it or use strategy: group")
    if is_fp4(values):
        fmt = fp4_format(strategy)
        name, size, scale_dtype = fmt.label, fmt.group_size, fmt.scale_dtype
        if group_size != size:
            raise FormatError("group_size", f"{group_size} is not {name}'s: its groups are {size} columns (what vLLM's "
                                            f"FP4 kernels read); use {size}")
        if values.get("scale_dtype") != scale_dtype:
            raise FormatError("scale_dtype", f"{brief(values.get('scale_dtype'))} is not {name}'s: it stores "
                                             f"{fmt.scale_words}; use {scale_dtype}")


def _check_fp4(values: dict, role: Role | None) -> None:
    """The fields that only FP4 formats take (strategy tensor_group, scale_dtype, dynamic local) on FP4 formats only,
    and FP4 in exactly compressed-tensors' NVFP4 and MXFP4 layouts: a FormatError naming the field otherwise."""
    strategy, scale_dtype, dynamic = values["strategy"], values.get("scale_dtype"), values["dynamic"]
    if scale_dtype is not None and not isinstance(scale_dtype, str):
        raise FormatError("scale_dtype", f"{brief(scale_dtype)} is not a string; use float8_e4m3fn (NVFP4) or uint8 "
                                         "(MXFP4)")
    if not is_fp4(values):
        if strategy == "tensor_group":
            raise FormatError("strategy", "'tensor_group' is NVFP4's (type float, num_bits 4, group_size 16); use group")
        if scale_dtype is not None:
            raise FormatError("scale_dtype", f"{brief(scale_dtype)} applies only to FP4 formats (type float, num_bits 4); "
                                             "remove it: other formats store scales in the model's dtype")
        if dynamic == LOCAL:
            raise FormatError("dynamic", "local applies only to NVFP4 input_activations (type float, num_bits 4, "
                                         "strategy tensor_group); use true")
        return
    allowed = ("tensor_group",) if role == "input_activations" else tuple(f.strategies[0] for f in FP4_FORMATS)
    if strategy not in allowed:
        formats = "NVFP4: strategy tensor_group, group_size 16, scale_dtype float8_e4m3fn" + (
            "" if role == "input_activations" else "; or MXFP4 weights: strategy group, group_size 32, scale_dtype uint8")
        raise FormatError("num_bits", f"4 is not supported for type float with strategy {brief(strategy)}: FP4 E2M1 "
                                      f"is stored as {formats}; use num_bits 8 for FP8")
    if role == "input_activations" and dynamic != LOCAL:
        raise FormatError("dynamic", f"{brief(dynamic)} is not supported for NVFP4 input_activations: their group "
                                     "scales come from each input, their global scale is calibrated and stored; use local")
    if role is None and dynamic not in (False, LOCAL):
        raise FormatError("dynamic", f"{brief(dynamic)} is not supported for FP4: use false (weights) or local (NVFP4 "
                                     "input_activations)")


@dataclass(frozen=True)
class QuantArgs:
    """The number format of one tensor. Construction checks types and values (check_format): a FormatError
    (a ValueError) names the field and what is allowed."""

    num_bits: int = 8
    """Bits per element: 2, 3, 4 or 8 for int; 4 (E2M1) or 8 (E4M3) for float."""
    type: NumberType = "int"
    """`int` (a uniform grid times a scale) or `float` (FP8 E4M3 or FP4 E2M1 times a scale)."""
    symmetric: bool = True
    """Symmetric: zero point 0 and scale = absmax / half the grid. Asymmetric: min/max mapped onto the grid."""
    strategy: Strategy = "channel"
    """Granularity of the scales: one per tensor, per output channel (row), per group of columns (times one per tensor
    for tensor_group), per 2-D block, or per token."""
    group_size: int | None = None
    """Columns sharing one scale, for strategy `group` and `tensor_group`. Must divide the row length."""
    dynamic: bool | Literal["local"] = False
    """Scales computed at run time from the tensor itself (activations), not stored; `local` (NVFP4 activations):
    the group scales so, the global scale calibrated and stored."""
    block_structure: tuple[int, int] | None = None
    """[rows, columns] of a block sharing one scale, for strategy `block`; edge blocks may be partial."""
    scale_dtype: str | None = None
    """FP4 only, and required there: how the group scales are stored, float8_e4m3fn (NVFP4) or uint8 E8M0 exponents
    (MXFP4). Other formats store their scales in the model's dtype and leave this None."""

    def __post_init__(self) -> None:
        check_format(self.values())
        if self.block_structure is not None:  # a YAML or JSON list
            object.__setattr__(self, "block_structure", tuple(self.block_structure))

    def values(self) -> dict:
        """The fields by name (what check_format reads and the checkpoint's QuantizationArgs declares)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_group_size(self, group_size: int) -> QuantArgs:
        if self.strategy == "block":  # the block's width: the columns that share a scale
            return replace(self, block_structure=(self.block_structure[0], group_size))
        return replace(self, group_size=group_size)


@dataclass(frozen=True)
class Scheme:
    """How every targeted linear layer is quantized."""

    weights: QuantArgs
    """The stored weight format."""
    input_activations: QuantArgs | None = None
    """Dynamic quantization of the layer's input at run time (W8A8); None keeps activations 16-bit (W4A16)."""

    @property
    def number_format(self) -> NumberFormat:
        """The stored format (number_formats' row) this scheme is saved in."""
        return format_of(self.weights, self.input_activations is not None)

    @property
    def deployment(self) -> Deployment | None:
        """Which engine path serves this scheme on each GPU generation (its number_formats row's), None where none is
        recorded."""
        return deployment_of(self.weights, self.input_activations)

    @property
    def format(self) -> str:
        """The compressed-tensors storage format this scheme is saved in, by name."""
        return self.number_format.name

    def describe(self) -> str:
        w, a = self.weights, self.input_activations
        kind = _number_name(w)
        if is_fp4(w):
            fmt = self.number_format
            act = "16-bit activations" if a is None else "fp4 activations in groups of 16 (global scale calibrated)"
            globally = " times a per-tensor global scale" if fmt.global_scales else ""
            return f"{fmt.label}: fp4 (E2M1) weights in groups of {fmt.group_size}, {fmt.scale_words}{globally}; {act}"
        detail = (f"group {w.group_size}" if w.strategy == "group" else
                  f"blocks of {w.block_structure[0]} x {w.block_structure[1]}" if w.strategy == "block" else f"per-{w.strategy}")
        per = f"token-group-{a.group_size}" if a is not None and a.strategy == "group" else a.strategy if a else ""
        act = "16-bit activations" if a is None else f"dynamic per-{per} {_number_name(a)} activations"
        sym = "symmetric" if w.symmetric else "asymmetric"
        return f"{kind} {sym} weights ({detail}), {act}"


def _number_name(args: QuantArgs) -> str:
    return f"fp{args.num_bits}" if args.type == "float" else f"int{args.num_bits}"


def check_scheme(scheme: Scheme) -> None:
    """Raise FormatError (key prefixed `weights.` or `input_activations.`) unless ptqlab computes exactly what
    `scheme` declares: weights stored (not dynamic) per tensor, channel or group; input activations dynamic, per
    token or tensor; no per-tensor zero point in a weight-only (pack-quantized) checkpoint, which
    compressed-tensors cannot pack; and FP4 as the NVFP4, NVFP4A16 and MXFP4A16 schemes pair it (NVFP4 activations
    with NVFP4 weights only, FP4 weights with 16-bit or NVFP4 activations only)."""
    for role, args in (("weights", scheme.weights), ("input_activations", scheme.input_activations)):
        if args is None:
            continue
        try:
            check_format(args.values(), role)
        except FormatError as e:
            raise FormatError(f"{role}.{e.key}", e.problem) from None
    w, a = scheme.weights, scheme.input_activations
    if a is not None and is_fp4(a) and not (is_fp4(w) and w.strategy == "tensor_group"):
        raise FormatError("input_activations.num_bits", "4 (NVFP4 activations) goes with NVFP4 weights only (type float, "
                                                        "num_bits 4, strategy tensor_group): the NVFP4 scheme")
    if a is not None and is_fp4(w) and not is_fp4(a):
        raise FormatError("input_activations", "FP4 weights take 16-bit activations (no input_activations: NVFP4A16, "
                                               "MXFP4A16) or NVFP4 activations (NVFP4)")
    if scheme.number_format.packed_zero_point and w.strategy == "tensor" and not w.symmetric:
        raise FormatError("weights.strategy", "'tensor' with symmetric: false is not supported for weight-only schemes "
                                              "(a per-tensor zero point cannot be packed); use channel or group, or "
                                              "symmetric: true")


FP8_DYNAMIC = Scheme(
    weights=QuantArgs(num_bits=8, type="float", strategy="channel"),
    input_activations=QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True),
)
W4A16 = Scheme(weights=QuantArgs(num_bits=4, strategy="group", group_size=128))
W8A8 = Scheme(
    weights=QuantArgs(num_bits=8, strategy="channel"),
    input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True),
)
NVFP4_WEIGHTS = QuantArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn")
NVFP4A16 = Scheme(weights=NVFP4_WEIGHTS)
NVFP4 = Scheme(weights=NVFP4_WEIGHTS, input_activations=QuantArgs(
    num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic=LOCAL, scale_dtype="float8_e4m3fn"))
MXFP4A16 = Scheme(weights=QuantArgs(num_bits=4, type="float", strategy="group", group_size=32, scale_dtype="uint8"))
