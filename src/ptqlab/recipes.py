r"""Recipes are data: which layers to quantize, to what scheme, through which ordered steps.

A recipe is a YAML document (the presets live in presets.yaml, parsed by the same code as a user's file):

    name: w8a8
    description: SmoothQuant + GPTQ int8 weights, dynamic int8 activations
    scheme: W8A8                      # a preset scheme name, or {weights: {...}, input_activations: {...}}
    ignore: [lm_head]
    steps:
      - smoothquant: {smoothing_strength: 0.8}
      - gptq: {dampening_frac: 0.01, actorder: static}
    kv: fp8                           # optional, any recipe: an FP8 KV cache with calibrated scales (or fp8-head)
    overrides:                        # optional: named linears at another scheme (e.g. sensitive parts at 4-bit)
      - targets: ['re:model\.layers\.0\.mlp\.']
        scheme: W4A16
        group_size: 64                # optional, as the top-level group_size sets the recipe's own scheme

Steps run in order: transforms first (`smoothquant`, `awq`: they rescale the float model exactly), then exactly one
quantizer, last (`gptq`, `rtn` or `autoround`); the steps, their settings and their allowed values come from the engine's table
(engine/steps.py) and the settings' own declarations (ptqlab.settings). Keys follow llm-compressor's names where it has one (`smoothing_strength`,
`dampening_frac`, `actorder`, `group_size`, `ignore`). A wrong key or value is an error naming the key and what is
allowed, raised while parsing: every value is checked by type (a boolean only from YAML's true/false, an integer
never from 4.0) and range before any work, so that what the checkpoint declares is what was computed.

`overrides` give some linears a second scheme (quantized by the same steps): each is a config group of its own in the
checkpoint, targeting the linears by name or `re:` expression, which compressed-tensors and vLLM rank above the main
group's class target `Linear`; `ignore` still wins over both. A linear that two overrides of different schemes claim
is refused when the model is quantized (the order in which the libraries would pick one is not the recipe's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Union

import yaml

from ptqlab.engine.awq import AWQStep
from ptqlab.engine.quantize import RTNStep
from ptqlab.engine.smoothquant import SmoothQuantStep
from ptqlab.engine.steps import STEP_KINDS, kind_of
from ptqlab.errors import PtqlabError
from ptqlab.quant import fp4
from ptqlab.quant.autoround import AutoRoundConfig
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.quant.kv_cache import kv_cache_format
from ptqlab.settings import SettingError, check_setting
from ptqlab.schemes import (FP8_DYNAMIC, MXFP4A16, NVFP4, NVFP4A16, W4A16, W8A8, FormatError, QuantArgs,
                             Scheme, brief, check_format, check_scheme, is_fp4)


Step = Union[SmoothQuantStep, AWQStep, GPTQConfig, RTNStep, AutoRoundConfig]
SCHEMES: dict[str, Scheme] = {
    "FP8_DYNAMIC": FP8_DYNAMIC,
    "W4A16": W4A16,
    "W4A16_ASYM": Scheme(weights=QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)),
    "W8A16": Scheme(weights=QuantArgs(num_bits=8, strategy="channel")),
    "W8A8": W8A8,
    # int4 weights for the memory, FP8 activations for Hopper's FP8 tensor cores; llm-compressor's name.
    # DeepSeek-V3's format: FP8 weights with a scale per 128 x 128 block, FP8 activations with a scale per 128
    # columns of each token; robust to outliers without calibration.
    "FP8_BLOCK": Scheme(weights=QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(128, 128)),
                        input_activations=QuantArgs(num_bits=8, type="float", strategy="group", group_size=128,
                                                    dynamic=True)),
    "W4AFP8": Scheme(weights=QuantArgs(num_bits=4, strategy="group", group_size=128),
                     input_activations=QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True)),
    # FP4 E2M1 (Blackwell's FP4 tensor cores): NVFP4, groups of 16 with FP8 scales times a per-tensor global scale,
    # weights only or with activations in groups of 16 too (their global scale calibrated); MXFP4, groups of 32 with
    # power-of-two scales. compressed-tensors' names and formats.
    "NVFP4A16": NVFP4A16,
    "NVFP4": NVFP4,
    "MXFP4A16": MXFP4A16,
}


def step_name(step: Step) -> str:
    """The YAML name of a step: smoothquant, awq, gptq or rtn."""
    return kind_of(step).name


QUANTIZERS = ", ".join(kind.name for kind in STEP_KINDS.values() if kind.role == "quantizer")

ACTORDER = {"static": True, "weight": True, True: True, None: False, False: False, "none": False}


@dataclass(frozen=True)
class SchemeOverride:
    """Linears quantized to another scheme than the recipe's (YAML: `- {targets: [...], scheme: W4A16}`)."""

    targets: tuple[str, ...]
    """Module names or `re:` regular expressions (matched from the start), as in `ignore`; not the class `Linear`."""
    scheme: Scheme


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe: every `nn.Linear` not matched by `ignore` is quantized to `scheme` by `steps`."""

    name: str
    scheme: Scheme
    steps: tuple[Step, ...] = (RTNStep(),)
    """Transforms (SmoothQuantStep, AWQStep) then one quantizer (GPTQConfig or RTNStep), in order."""
    ignore: tuple[str, ...] = ("lm_head",)
    """Layers kept 16-bit: exact module names or `re:` regular expressions (matched from the start), as in
    llm-compressor. The output head stays 16-bit by default: it is small next to the body and sensitive."""
    auto_group_size: bool = True
    """When the group size does not divide a layer's input width, fall back to the largest power-of-two
    group that divides every layer (and say so) instead of failing. False: fail with that advice."""
    description: str = ""
    kv: str | None = None
    """The KV cache's format: None (16-bit), fp8 or fp8-head (quant/kv_cache.py). Its scales are calibrated, so a
    recipe with `kv` needs calibration data even when its steps do not."""
    overrides: tuple[SchemeOverride, ...] = ()
    """Linears quantized to another scheme (e.g. a model's most sensitive parts at 4-bit in a 2-bit recipe); the
    engine gives each linear its scheme (engine/steps.py `Plan.scheme_of`)."""

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:
            raise PtqlabError(f"recipe name {problem}")
        try:
            kv_cache_format(self.kv)
        except ValueError as e:
            raise PtqlabError(f"recipe {self.name}: kv: {brief(self.kv)} is not a KV-cache format; {e}") from None
        problem = ignore_problem(self.ignore)
        if problem:
            raise PtqlabError(f"recipe {self.name}: ignore: {problem}")
        try:
            check_scheme(self.scheme)
        except FormatError as e:
            raise PtqlabError(f"recipe {self.name}: scheme.{e.key}: {e.problem}") from None
        try:
            roles = [kind_of(step).role for step in self.steps]
        except TypeError as e:
            raise PtqlabError(f"recipe {self.name}: {e}") from None
        if not roles or roles[-1] != "quantizer":
            raise PtqlabError(f"recipe {self.name}: the last step must be a quantizer ({QUANTIZERS})")
        if any(role != "transform" for role in roles[:-1]):
            raise PtqlabError(f"recipe {self.name}: only smoothquant and awq may come before the quantizer, "
                              f"and only one quantizer ({QUANTIZERS}) is allowed, last")
        weights = self.scheme.weights
        if step_name(self.steps[-1]) == "autoround" and (weights.type != "int" or weights.strategy not in ("group", "channel")):
            raise PtqlabError(f"recipe {self.name}: autoround tunes int weights with per-group or per-channel scales, "
                              f"not {weights.type} {weights.strategy}; use gptq or rtn for this scheme")
        if any(s.weights.strategy == "block" for s in self.schemes) and any(step_name(s) in ("gptq", "awq")
                                                                            for s in self.steps):
            raise PtqlabError(f"recipe {self.name}: block-wise weights (strategy block) are quantized by rtn, optionally "
                              "after smoothquant; gptq and awq compute per-group or per-channel scales")
        for i, override in enumerate(self.overrides):
            problem = override_problem(override)
            if problem:
                raise PtqlabError(f"recipe {self.name}: overrides[{i}]{problem}")
            weights = override.scheme.weights
            if step_name(self.steps[-1]) == "autoround" and (weights.type != "int" or
                                                             weights.strategy not in ("group", "channel")):
                raise PtqlabError(f"recipe {self.name}: overrides[{i}]: autoround tunes int weights with per-group or "
                                  f"per-channel scales, not {weights.type} {weights.strategy}")

    @property
    def schemes(self) -> tuple[Scheme, ...]:
        """Every scheme the recipe quantizes to: its own, then its overrides' (distinct, in order)."""
        return tuple(dict.fromkeys((self.scheme, *(o.scheme for o in self.overrides))))

    @property
    def quantizer(self) -> GPTQConfig | RTNStep | AutoRoundConfig:
        return self.steps[-1]

    @property
    def transforms(self) -> tuple[Step, ...]:
        return self.steps[:-1]

    @property
    def method(self) -> str:
        """The quantizer's name (`gptq`, `rtn`): how weights reach the grid."""
        return kind_of(self.quantizer).name

    @property
    def calibrated(self) -> bool:
        """Whether the recipe needs calibration data: whether any step needs statistics of the layers' inputs, or
        the KV cache is quantized (its scales come from the keys and values the calibration set produces), or the
        scheme has a calibrated input scale (NVFP4 activations' global scale)."""
        return (any(kind_of(step).calibrated for step in self.steps) or self.kv is not None
                or any(fp4.has_input_global_scale(scheme) for scheme in self.schemes))

    @property
    def gptq(self) -> GPTQConfig | None:
        return self.quantizer if isinstance(self.quantizer, GPTQConfig) else None

    def with_gptq(self, **changes) -> Recipe:
        """The recipe with its GPTQ step's settings changed (command-line options: an error naming the option if a
        value is out of range, or if the recipe has no GPTQ step)."""
        checked = {key: _option_value("gptq", key, value) for key, value in changes.items()}
        if self.gptq is None:
            options = ", ".join(_option(key) for key in changes)
            raise PtqlabError(f"{options} applies to GPTQ recipes; {self.name} quantizes by {self.method}")
        return replace(self, steps=self.steps[:-1] + (replace(self.gptq, **checked),))

    def with_overrides(self, ignore: list[str] | None = None, group_size: int | None = None,
                       kv_cache: str | None = None) -> Recipe:
        """The recipe with the command line's --ignore, --group-size and --kv-cache (checked: an error names the
        option). --group-size sets the recipe's own scheme, not its `overrides`' (each has its own group_size)."""
        recipe = self
        if kv_cache is not None:
            try:
                kv_cache_format(kv_cache)
            except ValueError as e:
                raise PtqlabError(f"--kv-cache {brief(kv_cache)}: not a KV-cache format; {e}") from None
            recipe = replace(recipe, kv=kv_cache)
        if ignore is not None:
            problem = ignore_problem(ignore)
            if problem:
                raise PtqlabError(f"--ignore: {problem}")
            recipe = replace(recipe, ignore=tuple(ignore))
        if group_size is not None:
            scheme = regrouped(recipe.scheme, group_size, "--group-size", self.name)
            recipe = replace(recipe, scheme=scheme, auto_group_size=False)
        return recipe

    def to_dict(self) -> dict:
        """The YAML form: parse_recipe(recipe.to_dict()) == recipe."""
        steps = []
        for step in self.steps:
            name = step_name(step)
            params = {f.name: getattr(step, f.name) for f in fields(step)}
            if isinstance(step, GPTQConfig):
                params["actorder"] = "static" if params.pop("act_order") else None
            steps.append({name: params})
        doc = {"name": self.name, "description": self.description, "scheme": _scheme_dict(self.scheme),
               "ignore": list(self.ignore), "auto_group_size": self.auto_group_size, "steps": steps}
        if self.kv is not None:  # only when set: the recorded requests of recipes without it stay as they were
            doc["kv"] = self.kv
        if self.overrides:  # likewise
            doc["overrides"] = [{"targets": list(o.targets), "scheme": _scheme_dict(o.scheme)} for o in self.overrides]
        return doc


def _scheme_dict(scheme: Scheme) -> dict:
    doc = {"weights": _args_dict(scheme.weights)}
    if scheme.input_activations is not None:
        doc["input_activations"] = _args_dict(scheme.input_activations)
    return doc


def _args_dict(args: QuantArgs) -> dict:
    values = {f.name: getattr(args, f.name) for f in fields(args) if getattr(args, f.name) is not None}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ---- checking values ----------------------------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
"""A recipe name is a folder name (ptqlab writes ./MODEL-NAME by default): no separators, no leading dot."""


def name_problem(name) -> str | None:
    """Why `name` cannot be a recipe's name, or None. The message starts with the name."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return None
    return (f"{brief(name)} cannot name a folder (ptqlab writes ./MODEL-NAME by default); use 1 to 100 letters, digits, "
            f"'.', '_' or '-', not starting with '.'")


def is_positive_int(value) -> bool:
    """An integer (not a boolean, not 4.0) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def regrouped(scheme: Scheme, group_size, option: str, recipe: str) -> Scheme:
    """`scheme` with its weights' group size set to `group_size`, given as `option` (--group-size, or a YAML key) of
    the recipe named `recipe`; an error naming the option when it is no positive integer or the weights are not
    group-wise."""
    if not is_positive_int(group_size):
        raise PtqlabError(f"{option} {brief(group_size)}: must be a positive integer, e.g. 128 (it must divide every "
                          f"layer's input width)")
    if is_fp4(scheme.weights):
        fmt = scheme.number_format
        name, size = fmt.label, fmt.group_size
        raise PtqlabError(f"{option} does not apply to {recipe}: {name}'s groups are {size} columns, fixed by the format "
                          f"(what vLLM's FP4 kernels read)")
    if scheme.weights.strategy not in ("group", "block"):
        raise PtqlabError(f"{option} applies to group-wise and block-wise recipes; {recipe} quantizes weights per "
                          f"{scheme.weights.strategy}")
    return with_columns_per_scale(scheme, group_size)


def with_columns_per_scale(scheme: Scheme, columns: int) -> Scheme:
    """`scheme` with `columns` input columns per scale: the weights' group or block width, and the activations'
    group where they are quantized per token group (block-wise FP8 keeps the two equal, as its kernels read them)."""
    acts = scheme.input_activations
    if acts is not None and acts.strategy == "group":
        acts = replace(acts, group_size=columns)
    weights = scheme.weights.with_group_size(columns) if scheme.weights.strategy in ("group", "block") else scheme.weights
    return replace(scheme, weights=weights, input_activations=acts)


def ignore_problem(patterns) -> str | None:
    """Why `patterns` is not a list of layer names and `re:` regular expressions, or None."""
    if not isinstance(patterns, (list, tuple)):
        return f"{brief(patterns)} is not a list; use module names or re: patterns, e.g. [lm_head, 're:.*down_proj']"
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            return f"{brief(pattern)} is not a module name or re: pattern, e.g. lm_head or 're:.*down_proj'"
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                return f"{brief(pattern)} is not a valid regular expression ({e})"
    return None


TARGETS_WORDS = "is not a non-empty list of module names or re: patterns, e.g. ['re:model\\.layers\\.0\\.mlp\\.']"


def override_problem(override) -> str | None:
    """Why `override` is not a SchemeOverride ptqlab can apply, or None; the message continues a key
    (`overrides[0]...`)."""
    if not isinstance(override, SchemeOverride):
        return f": {brief(override)} is not a SchemeOverride"
    targets = override.targets
    if not isinstance(targets, tuple) or not targets:
        return f".targets: {brief(targets)} {TARGETS_WORDS}"
    problem = ignore_problem(list(targets))
    if problem:
        return f".targets: {problem}"
    if "Linear" in targets:
        return (".targets: 'Linear' (every linear) is the recipe's own scheme; name the linears the override "
                "applies to, e.g. 're:.*down_proj'")
    if len(set(targets)) != len(targets):
        return f".targets: {brief(next(t for t in targets if targets.count(t) > 1))} is named twice"
    if not isinstance(override.scheme, Scheme):
        return f".scheme: {brief(override.scheme)} is not a Scheme"
    try:
        check_scheme(override.scheme)
    except FormatError as e:
        return f".scheme.{e.key}: {e.problem}"
    return None


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _option_value(step: str, key: str, value):
    """A command-line option's value for a step setting, or a one-line error naming the option."""
    settings = STEP_KINDS[step].settings
    if key not in {f.name for f in fields(settings)}:
        raise PtqlabError(f"{_option(key)} is not a {step} setting; allowed: "
                          f"{', '.join(_option(f.name) for f in fields(settings))}")
    try:
        return check_setting(settings, key, value)
    except SettingError as e:
        raise PtqlabError(f"{_option(key)} {brief(value)}: must be {e}") from None


# ---- parsing --------------------------------------------------------------------------------------------------------

RECIPE_KEYS = ("name", "description", "scheme", "ignore", "group_size", "auto_group_size", "steps", "kv", "overrides")
OVERRIDE_KEYS = ("targets", "scheme", "group_size")
MAX_RECIPE_BYTES = 256 * 1024
"""A recipe is a short YAML mapping; a larger file is refused before YAML reads it."""
TYPE_WORDS = {bool: "a boolean; use true or false", str: "a string"}
ACTORDER_WORDS = "static, weight (the same: columns by decreasing Hessian diagonal, static groups), none"


def _kind_name(value) -> str:
    """'a string', 'an integer', ...: what a YAML value is, for a message."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), f"a {type(value).__name__}")


def _check_keys(where: str, given, allowed) -> None:
    if not isinstance(given, dict):
        got = "nothing" if given is None else f"{_kind_name(given)}: {brief(given)}"
        raise PtqlabError(f"{where}: expected a mapping of keys ({', '.join(allowed)}), got {got}")
    for key in given:
        if key not in allowed:
            raise PtqlabError(f"{where}: unknown key {brief(key)}; allowed: {', '.join(allowed)}")


def _typed(where: str, value, kind: type):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PtqlabError(f"{where}: {brief(value)} is not {TYPE_WORDS[kind]}")
    return value


def _parse_args(where: str, spec, role: str) -> QuantArgs:
    """One tensor's format from its mapping: every field checked by type, then the whole by what the arithmetic
    supports in `role` (weights or input_activations)."""
    defaults = QuantArgs().values()
    _check_keys(where, spec, list(defaults))
    try:
        check_format({**defaults, **spec}, role)
    except FormatError as e:
        raise PtqlabError(f"{where}.{e.key}: {e.problem}") from None
    return QuantArgs(**spec)


def _checked_scheme(where: str, scheme: Scheme) -> Scheme:
    try:
        check_scheme(scheme)
    except FormatError as e:
        raise PtqlabError(f"{where}.{e.key}: {e.problem}") from None
    return scheme


def _parse_scheme(where: str, spec) -> Scheme:
    if isinstance(spec, str):
        if spec.upper() not in SCHEMES:
            raise PtqlabError(f"{where}: unknown scheme {brief(spec)}; allowed: {', '.join(SCHEMES)} or a mapping with "
                              f"weights (and input_activations)")
        return SCHEMES[spec.upper()]
    _check_keys(where, spec, ("weights", "input_activations"))
    if "weights" not in spec:
        raise PtqlabError(f"{where}: the weights' format is missing (key 'weights')")
    acts = spec.get("input_activations")
    weights = _parse_args(f"{where}.weights", spec["weights"], "weights")
    acts = None if acts is None else _parse_args(f"{where}.input_activations", acts, "input_activations")
    return _checked_scheme(where, Scheme(weights=weights, input_activations=acts))


def _parse_actorder(where: str, value) -> bool:
    if not (value is None or isinstance(value, (bool, str))) or value not in ACTORDER:
        raise PtqlabError(f"{where}: {brief(value)} is not allowed; allowed: {ACTORDER_WORDS}")
    return ACTORDER[value]


def _parse_step(where: str, spec) -> Step:
    if isinstance(spec, str):
        spec = {spec: {}}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise PtqlabError(f"{where}: a step is one of {', '.join(STEP_KINDS)} with its parameters, e.g. "
                          f"'- gptq: {{dampening_frac: 0.01}}'; got {brief(spec)}")
    (name, params), = spec.items()
    if name not in STEP_KINDS:
        raise PtqlabError(f"{where}: unknown step {brief(name)}; allowed: {', '.join(STEP_KINDS)}")
    cls = STEP_KINDS[name].settings
    allowed = [f.name for f in fields(cls)]
    if cls is GPTQConfig:
        allowed = [a for a in allowed if a != "act_order"] + ["actorder"]
    params = {} if params is None else params
    _check_keys(f"{where}.{name}", params, allowed)
    settings = {}
    for key, value in params.items():
        if key == "actorder":
            settings["act_order"] = _parse_actorder(f"{where}.gptq.actorder", value)
            continue
        try:
            settings[key] = check_setting(cls, key, value)
        except SettingError as e:
            raise PtqlabError(f"{where}.{name}.{key}: {brief(value)} is not allowed; must be {e}") from None
    return cls(**settings)


def parse_recipe(doc: dict, where: str = "recipe") -> Recipe:
    """A recipe from its YAML form (a dict), with every key and value checked."""
    _check_keys(where, doc, RECIPE_KEYS)
    for key in ("name", "scheme", "steps"):
        if key not in doc:
            raise PtqlabError(f"{where}: key {key!r} is missing")
    problem = name_problem(doc["name"])
    if problem:
        raise PtqlabError(f"{where}: name {problem}")
    name = doc["name"]
    where = f"recipe {name}"
    scheme = _parse_scheme(f"{where}: scheme", doc["scheme"])
    if "group_size" in doc:
        scheme = regrouped(scheme, doc["group_size"], f"{where}: group_size", name)
    steps = doc["steps"]
    if not isinstance(steps, list) or not steps:
        raise PtqlabError(f"{where}: steps must be a non-empty list, e.g. [{{gptq: {{}}}}]; got {brief(steps)}")
    ignore = doc.get("ignore", ["lm_head"])
    problem = ignore_problem(ignore)
    if problem:
        raise PtqlabError(f"{where}: ignore: {problem}")
    return Recipe(name=name, scheme=scheme, steps=tuple(_parse_step(f"{where}: steps[{i}]", s) for i, s in enumerate(steps)),
                  ignore=tuple(ignore), auto_group_size=_typed(f"{where}: auto_group_size", doc.get("auto_group_size", True), bool),
                  description=_typed(f"{where}: description", doc.get("description", ""), str),
                  kv=_parse_kv(where, doc.get("kv")), overrides=_parse_overrides(where, doc.get("overrides", []), name))


def _parse_overrides(where: str, value, name: str) -> tuple[SchemeOverride, ...]:
    """A recipe's `overrides` list: each entry's targets, scheme and optional group_size checked."""
    if not isinstance(value, list):
        raise PtqlabError(f"{where}: overrides: {brief(value)} is not a list; use e.g. [{{targets: ['re:.*down_proj'], "
                          f"scheme: W4A16}}]")
    overrides = []
    for i, entry in enumerate(value):
        at = f"{where}: overrides[{i}]"
        _check_keys(at, entry, OVERRIDE_KEYS)
        for key in ("targets", "scheme"):
            if key not in entry:
                raise PtqlabError(f"{at}: key {key!r} is missing")
        targets = entry["targets"]
        if not isinstance(targets, list) or not targets:
            raise PtqlabError(f"{at}.targets: {brief(targets)} {TARGETS_WORDS}")
        scheme = _parse_scheme(f"{at}.scheme", entry["scheme"])
        if "group_size" in entry:
            scheme = regrouped(scheme, entry["group_size"], f"{at}.group_size", name)
        override = SchemeOverride(tuple(targets), scheme)
        problem = override_problem(override)
        if problem:
            raise PtqlabError(f"{at}{problem}")
        overrides.append(override)
    return tuple(overrides)


def _parse_kv(where: str, value) -> str | None:
    try:
        kv_cache_format(value)
    except ValueError as e:
        raise PtqlabError(f"{where}: kv: {brief(value)} is not a KV-cache format; {e}") from None
    return value


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML's safe loader, refusing a mapping that names a key twice: plain YAML keeps the last value silently, so a
    recipe with two `steps:` or two `dampening_frac:` would run something other than what its author reads."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return brief(" ".join(str(e).split()), 200)


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise PtqlabError(f"cannot read recipe file {path}: {e.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise PtqlabError(f"{path}: over {MAX_RECIPE_BYTES // 1024} KiB, too large for a recipe (a short YAML mapping: "
                          f"name, scheme, steps); check that it is the right file")
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise PtqlabError(f"{path} is not UTF-8 text; a recipe is a YAML file") from None
    except yaml.YAMLError as e:
        raise PtqlabError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise PtqlabError(f"{path} is not a recipe: its YAML is nested too deeply") from None
    return parse_recipe(doc, where=str(path))


def _load_presets() -> dict[str, Recipe]:
    text = resources.files("ptqlab").joinpath("presets.yaml").read_text(encoding="utf-8")
    return {r.name: r for r in (parse_recipe(doc, "presets.yaml") for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc)}


PRESETS: dict[str, Recipe] = _load_presets()


def get_recipe(name: str) -> Recipe:
    """A preset by name, or a recipe YAML file by path."""
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_recipe_file(name)
    raise PtqlabError(f"unknown recipe {brief(name)}: choose one of {', '.join(PRESETS)} (see `ptqlab recipes`), or give a "
                      f"recipe .yaml file")
