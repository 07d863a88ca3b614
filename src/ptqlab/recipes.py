"""Recipes are data: which layers to quantize, to what scheme, through which ordered steps.

A recipe is a YAML document (the presets live in presets.yaml, parsed by the same code as a user's file):

    name: w8a8
    description: SmoothQuant + GPTQ int8 weights, dynamic int8 activations
    scheme: W8A8                      # a preset scheme name, or {weights: {...}, input_activations: {...}}
    ignore: [lm_head]
    steps:
      - smoothquant: {smoothing_strength: 0.8}
      - gptq: {dampening_frac: 0.01, actorder: static}

Steps run in order: transforms first (`smoothquant`, `awq`: they rescale the float model exactly), then exactly one
quantizer, last (`gptq` or `rtn`). Keys follow llm-compressor's names where it has one (`smoothing_strength`,
`dampening_frac`, `actorder`, `group_size`, `ignore`). A wrong key or value is an error naming the key and what is
allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Union

import yaml

from ptqlab.errors import PtqlabError
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.schemes import FP8_DYNAMIC, W4A16, W8A8, QuantArgs, Scheme


@dataclass(frozen=True)
class SmoothQuantStep:
    """Migrate activation outliers into the weights: s = max|X|^α / max|W|^(1-α) per input channel."""

    smoothing_strength: float = 0.8
    """α in [0, 1]: 0 leaves activations as they are, 1 moves all of their range into the weights."""
    mappings: str = "norms"
    """`norms`: into the norms before q/k/v and gate/up (llm-compressor's default); `all`: also v -> o and up -> down
    where exact (smoothing.MAPPINGS). On SmolLM2 w8a8, `all` raised the KL divergence from 0.0105 to 0.0148: the
    down_proj weights take on the activations' outliers, which per-channel int8 weights then round badly."""


@dataclass(frozen=True)
class AWQStep:
    """Activation-aware scaling: per input channel, the s (on a grid) whose quantized weights err least on the
    calibration inputs."""

    n_grid: int = 20
    """Grid points r = 0, 1/n, ..., (n-1)/n of s = x_mean^r / w_mean^(1-r)."""
    duo_scaling: bool = True
    """Divide by the weights' mean magnitude too (llm-compressor's default); False: s = x_mean^r."""


@dataclass(frozen=True)
class RTNStep:
    """Round every weight to its nearest grid point (data-free)."""


Step = Union[SmoothQuantStep, AWQStep, GPTQConfig, RTNStep]
STEP_NAMES: dict[str, type] = {"smoothquant": SmoothQuantStep, "awq": AWQStep, "gptq": GPTQConfig, "rtn": RTNStep}
TRANSFORMS = (SmoothQuantStep, AWQStep)
QUANTIZERS = (GPTQConfig, RTNStep)
SCHEMES: dict[str, Scheme] = {
    "FP8_DYNAMIC": FP8_DYNAMIC,
    "W4A16": W4A16,
    "W4A16_ASYM": Scheme(weights=QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)),
    "W8A16": Scheme(weights=QuantArgs(num_bits=8, strategy="channel")),
    "W8A8": W8A8,
}
SMOOTHQUANT_MAPPINGS = ("norms", "all")


def step_name(step: Step) -> str:
    """The YAML name of a step: smoothquant, awq, gptq or rtn."""
    return next(name for name, cls in STEP_NAMES.items() if isinstance(step, cls))

ACTORDER = {"static": True, "weight": True, True: True, None: False, False: False, "none": False}


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

    def __post_init__(self) -> None:
        if not self.steps or not isinstance(self.steps[-1], QUANTIZERS):
            raise PtqlabError(f"recipe {self.name}: the last step must be a quantizer (gptq or rtn)")
        for step in self.steps[:-1]:
            if not isinstance(step, TRANSFORMS):
                raise PtqlabError(f"recipe {self.name}: only smoothquant and awq may come before the quantizer, "
                                  f"and only one quantizer (gptq or rtn) is allowed, last")

    @property
    def quantizer(self) -> GPTQConfig | RTNStep:
        return self.steps[-1]

    @property
    def transforms(self) -> tuple[Step, ...]:
        return self.steps[:-1]

    @property
    def method(self) -> str:
        """`gptq` or `rtn`: how weights reach the grid."""
        return "gptq" if isinstance(self.quantizer, GPTQConfig) else "rtn"

    @property
    def calibrated(self) -> bool:
        """Whether the recipe needs calibration data (any step but plain RTN does)."""
        return any(not isinstance(step, RTNStep) for step in self.steps)

    @property
    def gptq(self) -> GPTQConfig | None:
        return self.quantizer if isinstance(self.quantizer, GPTQConfig) else None

    def with_gptq(self, **changes) -> Recipe:
        """The recipe with its GPTQ step's settings changed (an error if it has none)."""
        if self.gptq is None:
            options = ", ".join("--" + key.replace("_", "-") for key in changes)
            raise PtqlabError(f"{options} applies to GPTQ recipes; {self.name} quantizes by {self.method}")
        return replace(self, steps=self.steps[:-1] + (replace(self.gptq, **changes),))

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

    def to_dict(self) -> dict:
        """The YAML form: parse_recipe(recipe.to_dict()) == recipe."""
        scheme = {"weights": _args_dict(self.scheme.weights)}
        if self.scheme.input_activations is not None:
            scheme["input_activations"] = _args_dict(self.scheme.input_activations)
        steps = []
        for step in self.steps:
            name = step_name(step)
            params = {f.name: getattr(step, f.name) for f in fields(step)}
            if isinstance(step, GPTQConfig):
                params["actorder"] = "static" if params.pop("act_order") else None
            steps.append({name: params})
        return {"name": self.name, "description": self.description, "scheme": scheme, "ignore": list(self.ignore),
                "auto_group_size": self.auto_group_size, "steps": steps}


def _args_dict(args: QuantArgs) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(args) if getattr(args, f.name) is not None}


# ---- parsing --------------------------------------------------------------------------------------------------------

RECIPE_KEYS = ("name", "description", "scheme", "ignore", "group_size", "auto_group_size", "steps")


def _check_keys(where: str, given: dict, allowed) -> None:
    if not isinstance(given, dict):
        raise PtqlabError(f"{where}: expected a mapping of keys ({', '.join(allowed)}), got {given!r}")
    for key in given:
        if key not in allowed:
            raise PtqlabError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")


def _typed(where: str, value, kind: type):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PtqlabError(f"{where}: {value!r} is not a {kind.__name__}")
    return value


def _parse_args(where: str, spec: dict) -> QuantArgs:
    allowed = [f.name for f in fields(QuantArgs)]
    _check_keys(where, spec, allowed)
    try:
        return QuantArgs(**spec)
    except (TypeError, ValueError) as e:
        raise PtqlabError(f"{where}: {e}") from None


def _parse_scheme(where: str, spec) -> Scheme:
    if isinstance(spec, str):
        if spec.upper() not in SCHEMES:
            raise PtqlabError(f"{where}: unknown scheme {spec!r}; allowed: {', '.join(SCHEMES)} or a mapping with "
                              f"weights (and input_activations)")
        return SCHEMES[spec.upper()]
    _check_keys(where, spec, ("weights", "input_activations"))
    if "weights" not in spec:
        raise PtqlabError(f"{where}: the weights' format is missing (key 'weights')")
    acts = spec.get("input_activations")
    return Scheme(weights=_parse_args(f"{where}.weights", spec["weights"]),
                  input_activations=None if acts is None else _parse_args(f"{where}.input_activations", acts))


def _parse_step(where: str, spec) -> Step:
    if isinstance(spec, str):
        spec = {spec: {}}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise PtqlabError(f"{where}: a step is one of {', '.join(STEP_NAMES)} with its parameters, e.g. "
                          f"'- gptq: {{dampening_frac: 0.01}}'")
    (name, params), = spec.items()
    if name not in STEP_NAMES:
        raise PtqlabError(f"{where}: unknown step {name!r}; allowed: {', '.join(STEP_NAMES)}")
    params = dict(params or {})
    cls = STEP_NAMES[name]
    allowed = [f.name for f in fields(cls)]
    if cls is GPTQConfig:
        allowed = [a for a in allowed if a != "act_order"] + ["actorder"]
    _check_keys(f"{where}.{name}", params, allowed)
    if cls is GPTQConfig and "actorder" in params:
        value = params.pop("actorder")
        if value not in ACTORDER:
            raise PtqlabError(f"{where}.gptq.actorder: {value!r} is not allowed; allowed: static, weight (the same: "
                              f"columns by decreasing Hessian diagonal, static groups), none")
        params["act_order"] = ACTORDER[value]
    types = {f.name: f.type for f in fields(cls)}
    kinds = {"float": float, "int": int, "bool": bool, "str": str}
    for key, value in params.items():
        params[key] = _typed(f"{where}.{name}.{key}", value, kinds[types[key]])
    step = cls(**params)
    if isinstance(step, SmoothQuantStep) and not 0 <= step.smoothing_strength <= 1:
        raise PtqlabError(f"{where}.smoothquant.smoothing_strength: {step.smoothing_strength} is outside [0, 1]")
    if isinstance(step, SmoothQuantStep) and step.mappings not in SMOOTHQUANT_MAPPINGS:
        raise PtqlabError(f"{where}.smoothquant.mappings: {step.mappings!r} is not allowed; allowed: "
                          f"{', '.join(SMOOTHQUANT_MAPPINGS)}")
    if isinstance(step, AWQStep) and step.n_grid < 1:
        raise PtqlabError(f"{where}.awq.n_grid: must be at least 1")
    if isinstance(step, GPTQConfig) and not (0 < step.dampening_frac < 1 and step.block_size >= 1):
        raise PtqlabError(f"{where}.gptq: dampening_frac must lie in (0, 1) and block_size be positive")
    return step


def parse_recipe(doc: dict, where: str = "recipe") -> Recipe:
    """A recipe from its YAML form (a dict), with every key and value checked."""
    _check_keys(where, doc, RECIPE_KEYS)
    for key in ("name", "scheme", "steps"):
        if key not in doc:
            raise PtqlabError(f"{where}: key {key!r} is missing")
    name = _typed(f"{where}.name", doc["name"], str)
    where = f"recipe {name}"
    scheme = _parse_scheme(f"{where}: scheme", doc["scheme"])
    if "group_size" in doc:
        if scheme.weights.strategy != "group":
            raise PtqlabError(f"{where}: group_size applies to group-wise weights, these are per {scheme.weights.strategy}")
        scheme = replace(scheme, weights=scheme.weights.with_group_size(_typed(f"{where}: group_size", doc["group_size"], int)))
    steps = doc["steps"]
    if not isinstance(steps, list) or not steps:
        raise PtqlabError(f"{where}: steps must be a non-empty list, e.g. [{{gptq: {{}}}}]")
    ignore = doc.get("ignore", ["lm_head"])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise PtqlabError(f"{where}: ignore must be a list of module names or re: patterns")
    return Recipe(name=name, scheme=scheme, steps=tuple(_parse_step(f"{where}: steps[{i}]", s) for i, s in enumerate(steps)),
                  ignore=tuple(ignore), auto_group_size=_typed(f"{where}: auto_group_size", doc.get("auto_group_size", True), bool),
                  description=_typed(f"{where}: description", doc.get("description", ""), str))


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PtqlabError(f"cannot read recipe file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PtqlabError(f"{path} is not valid YAML: {e}") from None
    return parse_recipe(doc, where=str(path))


def _load_presets() -> dict[str, Recipe]:
    text = resources.files("ptqlab").joinpath("presets.yaml").read_text(encoding="utf-8")
    return {r.name: r for r in (parse_recipe(doc, "presets.yaml") for doc in yaml.safe_load_all(text) if doc)}


PRESETS: dict[str, Recipe] = _load_presets()


def get_recipe(name: str) -> Recipe:
    """A preset by name, or a recipe YAML file by path."""
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_recipe_file(name)
    raise PtqlabError(f"unknown recipe {name!r}: choose one of {', '.join(PRESETS)} (see `ptqlab recipes`), or give a "
                      f"recipe .yaml file")
