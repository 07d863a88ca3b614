"""What a recipe is: the Recipe and SchemeOverride dataclasses, the checks every recipe passes wherever it comes from
(a YAML file, the command line's options, code), and its YAML form (`to_dict`). Reading recipes from YAML, recipe
files and the presets is recipes.py's."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Union

from ptqlab.engine.awq import AWQStep
from ptqlab.engine.quantize import RTNStep
from ptqlab.engine.rotate import RotateStep
from ptqlab.engine.smoothquant import SmoothQuantStep
from ptqlab.engine.steps import STEP_KINDS, kind_of
from ptqlab.errors import PtqlabError
from ptqlab.quant import fp4
from ptqlab.quant.autoround import AutoRoundConfig
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.quant.kv_cache import kv_cache_format
from ptqlab.schemes import FormatError, QuantArgs, Scheme, brief, check_scheme, is_fp4
from ptqlab.settings import SettingError, check_setting


Step = Union[RotateStep, SmoothQuantStep, AWQStep, GPTQConfig, RTNStep, AutoRoundConfig]


def step_name(step: Step) -> str:
    """The YAML name of a step: rotate, smoothquant, awq, gptq, rtn or autoround."""
    return kind_of(step).name


QUANTIZERS = ", ".join(kind.name for kind in STEP_KINDS.values() if kind.role == "quantizer")
TRANSFORMS = ", ".join(kind.name for kind in STEP_KINDS.values() if kind.role == "transform")
_AUTOROUND_TUNES = "autoround tunes int weights with per-group or per-channel scales"


def _autoround_tunes(weights) -> bool:
    """Whether AutoRound's tuning (rounding offsets and clipping of int grids per group or channel) applies to these
    weights: the recipe's scheme and every override's must pass."""
    return weights.type == "int" and weights.strategy in ("group", "channel")


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
    """Transforms (RotateStep first, then SmoothQuantStep, AWQStep) then one quantizer (GPTQConfig, RTNStep or
    AutoRoundConfig), in order."""
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
    engine gives each linear its scheme (engine/plan.py `Plan.scheme_of`)."""

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
            raise PtqlabError(f"recipe {self.name}: only transforms ({TRANSFORMS}) may come before the quantizer, "
                              f"and only one quantizer ({QUANTIZERS}) is allowed, last")
        whole = [i for i, step in enumerate(self.steps) if kind_of(step).scope == "model"]
        if whole != list(range(len(whole))):
            # it changes the float model that the other steps' statistics are taken from
            raise PtqlabError(f"recipe {self.name}: {step_name(self.steps[whole[-1]])} transforms the whole float model "
                              "and must be the first step, e.g. steps: [rotate, {gptq: {}}]")
        tuned = step_name(self.steps[-1]) == "autoround"
        if tuned and not _autoround_tunes(self.scheme.weights):
            raise PtqlabError(f"recipe {self.name}: {_AUTOROUND_TUNES}, not {self.scheme.weights.type} "
                              f"{self.scheme.weights.strategy}; use gptq or rtn for this scheme")
        if any(s.weights.strategy == "block" for s in self.schemes) and any(step_name(s) in ("gptq", "awq")
                                                                            for s in self.steps):
            raise PtqlabError(f"recipe {self.name}: block-wise weights (strategy block) are quantized by rtn, optionally "
                              "after smoothquant; gptq and awq compute per-group or per-channel scales")
        for i, override in enumerate(self.overrides):
            problem = override_problem(override)
            if problem:
                raise PtqlabError(f"recipe {self.name}: overrides[{i}]{problem}")
            weights = override.scheme.weights
            if tuned and not _autoround_tunes(weights):
                raise PtqlabError(f"recipe {self.name}: overrides[{i}]: {_AUTOROUND_TUNES}, not {weights.type} "
                                  f"{weights.strategy}")

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
