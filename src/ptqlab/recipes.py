r"""Recipes are data: which layers to quantize, to what scheme, through which ordered steps. This module reads them:
a recipe's YAML form (every key and value checked), recipe files, the named schemes and the presets; what a recipe
is, and the checks every recipe passes however it is made, are recipe.py's.

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

Steps run in order: transforms first (`rotate`, first of all: it rotates the whole float model before calibration,
engine/rotate.py; `smoothquant`, `awq`: they rescale the float model exactly), then exactly one
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

from dataclasses import fields
from importlib import resources
from pathlib import Path

import yaml

from ptqlab.engine.steps import STEP_KINDS
from ptqlab.errors import PtqlabError
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.quant.kv_cache import kv_cache_format
from ptqlab.recipe import (TARGETS_WORDS, Recipe, SchemeOverride, Step, ignore_problem, name_problem, override_problem,
                           regrouped)
from ptqlab.schemes import (FP8_DYNAMIC, MXFP4A16, NVFP4, NVFP4A16, W4A16, W8A8, FormatError, QuantArgs, Scheme, brief,
                            check_format, check_scheme)
from ptqlab.settings import SettingError, check_setting


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


ACTORDER = {"static": True, "weight": True, True: True, None: False, False: False, "none": False}


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
