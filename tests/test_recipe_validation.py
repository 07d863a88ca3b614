"""Recipes are checked by type and range while parsing, and the config ptqlab writes is the arithmetic it did.

Two halves:
- every preset, and seeded random *valid* recipes drawn over the allowed values, parse to the scheme they say; the
  `quantization_config` written for them declares exactly that scheme (same values, same JSON types), and the stored
  tensors agree with it: compressed-tensors' own decompressor, reading the config as written, gives back ptqlab's
  dequantized weights bit for bit, and its own dynamic activation quantization gives ptqlab's. Hundreds of random
  recipes go through one small linear layer; the presets and a few random recipes through a whole (small) model,
  calibration included, written to disk and read back.
- each class of bad input (wrong type, out of range, a name that is not a folder name, a huge non-mapping YAML,
  command-line overrides out of range) is refused while parsing with one short PtqlabError naming the key and what
  is allowed.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.formats.compressed_tensors import checkpoint_tensors, quantization_config, write_checkpoint
from ptqlab.quant.fp4 import has_input_global_scale
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.quant.primitives import fake_quantize, grid_range
from ptqlab.number_formats import FP4_FORMATS, fp4_format
from ptqlab.recipe import Recipe
from ptqlab.recipes import PRESETS, MAX_RECIPE_BYTES, get_recipe, load_recipe_file, parse_recipe
from ptqlab.schemes import ACTIVATION_STRATEGIES, BITS, WEIGHT_STRATEGIES, QuantArgs, Scheme

ARG_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "block_structure")
FP4_SCALES = {"tensor_group": torch.float8_e4m3fn, "group": torch.uint8}
GROUP_SIZES = (32, 64, 128)  # all divide every width below
BLOCKS = ([128, 128], [64, 128], [32, 48], [100, 7])  # blocks need not divide: edge blocks are partial
SMALL = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=64)
"""The smallest tiny llama whose widths group 128 divides (no automatic group-size change)."""
MAX_MESSAGE = 300


# ---- seeded random valid recipes, in their YAML form -----------------------------------------------------------------

def random_args(rng: random.Random, role: str) -> dict:
    """A random format over the allowed values of `role`; keys equal to their default are sometimes left out. FP4 is
    its two formats exactly (NVFP4 for activations): their strategy, group size and scale dtype go together."""
    kind = rng.choice(list(BITS))
    bits = rng.choice(BITS[kind])
    if kind == "float" and bits == 4:
        strategy = "tensor_group" if role == "input_activations" else rng.choice([f.strategies[0] for f in FP4_FORMATS])
        fmt = fp4_format(strategy)
        return {"num_bits": 4, "type": "float", "strategy": strategy, "group_size": fmt.group_size,
                "scale_dtype": fmt.scale_dtype, "dynamic": "local" if role == "input_activations" else False}
    strategies = [s for s in (WEIGHT_STRATEGIES if role == "weights" else ACTIVATION_STRATEGIES) if s != "tensor_group"]
    args = {"num_bits": bits, "type": kind, "symmetric": kind == "float" or rng.random() < 0.5,
            "strategy": rng.choice(strategies), "dynamic": role == "input_activations"}
    if args["strategy"] == "group":
        args["group_size"] = rng.choice(GROUP_SIZES)
    if args["strategy"] == "block":
        args["block_structure"], args["symmetric"] = rng.choice(BLOCKS), True
    defaults = QuantArgs().values()
    return {k: v for k, v in args.items() if v != defaults[k] or rng.random() < 0.5}


def random_steps(rng: random.Random) -> list:
    transforms = [{"smoothquant": {"smoothing_strength": round(rng.uniform(0, 1), 3), "mappings": rng.choice(["norms", "all"])}},
                  {"awq": {"n_grid": rng.randint(1, 4), "duo_scaling": rng.random() < 0.5}}]
    steps = rng.sample(transforms, rng.randint(0, 2))
    if rng.random() < 0.5:
        steps.append(rng.choice(["rtn", {"rtn": None}, {"rtn": {}}]))
    else:
        gptq = {"dampening_frac": round(rng.uniform(0.001, 0.5), 4), "block_size": rng.choice([16, 64, 128]),
                "actorder": rng.choice(["static", "weight", "none", None, True, False]),
                "static_groups": rng.random() < 0.5, "scale_search": rng.random() < 0.5}
        steps.append({"gptq": {k: v for k, v in gptq.items() if rng.random() < 0.7}})
    return steps


def random_recipe(seed: int) -> dict:
    rng = random.Random(seed)
    weights = random_args(rng, "weights")
    scheme = {"weights": weights}
    fp4 = weights.get("type") == "float" and weights.get("num_bits") == 4
    if rng.random() < 0.5 and (not fp4 or weights["strategy"] == "tensor_group"):
        scheme["input_activations"] = random_args(rng, "input_activations")
        acts = scheme["input_activations"]
        acts_fp4 = acts.get("type") == "float" and acts.get("num_bits") == 4
        if acts_fp4 != (fp4 and weights["strategy"] == "tensor_group"):  # NVFP4 activations with NVFP4 weights only
            del scheme["input_activations"]
    if "input_activations" not in scheme and weights.get("strategy") == "tensor":
        weights["symmetric"] = True  # a per-tensor zero point cannot be packed (check_scheme refuses it)
    steps = random_steps(rng)
    if weights.get("strategy") == "block":  # block-wise weights are rounded to nearest, after SmoothQuant at most
        steps = [s for s in steps if isinstance(s, dict) and "smoothquant" in s] + ["rtn"]
    doc = {"name": f"random-{seed}", "scheme": scheme, "steps": steps}
    if weights.get("strategy") in ("group", "block") and not fp4 and rng.random() < 0.3:
        doc["group_size"] = rng.choice(GROUP_SIZES)  # the top-level key overrides the weights' group size
    if rng.random() < 0.3:
        doc["auto_group_size"] = rng.random() < 0.5
    return doc


def through_yaml(doc: dict) -> dict:
    """`doc` written as YAML and read back, as a recipe file is (libyaml's C parser where installed: fast)."""
    return yaml.load(yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)),
                     Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def expected_scheme(doc: dict) -> Scheme:
    """The scheme a recipe document says, computed independently of the parser."""
    def args(spec: dict) -> QuantArgs:
        return QuantArgs(**{**QuantArgs().values(), **spec})

    scheme = doc["scheme"]
    weights, acts = dict(scheme["weights"]), scheme.get("input_activations")
    if "group_size" in doc:  # the columns per scale: the weights' group or block width, and token groups
        if weights.get("strategy") == "block":
            weights["block_structure"] = [weights["block_structure"][0], doc["group_size"]]
        else:
            weights["group_size"] = doc["group_size"]
        if acts is not None and acts.get("strategy") == "group":
            acts = dict(acts, group_size=doc["group_size"])
    return Scheme(args(weights), None if acts is None else args(acts))


# ---- what is written, checked against what was computed -----------------------------------------------------------

def assert_args_written(written: dict | None, args: QuantArgs | None) -> None:
    """The written QuantizationArgs declare `args`: the same values with the same JSON types."""
    if args is None:
        assert written is None
        return
    for field in ARG_FIELDS:
        value = getattr(args, field)
        value = list(value) if isinstance(value, tuple) else value  # JSON has lists
        assert written[field] == value and type(written[field]) is type(value), (field, written[field], value)


def assert_config_declares(config: dict, scheme: Scheme, ignore) -> None:
    group = config["config_groups"]["group_0"]
    assert config["format"] == group["format"] == scheme.format
    assert config["ignore"] == list(ignore)
    assert_args_written(group["weights"], scheme.weights)
    assert_args_written(group["input_activations"], scheme.input_activations)


def assert_tensor_layout(stored: dict[str, torch.Tensor], scheme: Scheme, rows: int, columns: int) -> None:
    """Names, dtypes and shapes of one linear's stored tensors are those its scheme's format declares."""
    w, fmt = scheme.weights, scheme.format
    blocks = (math.ceil(rows / w.block_structure[0]), math.ceil(columns / w.block_structure[1])) if w.block_structure else None
    scales = {"tensor": (1,), "channel": (rows, 1), "group": (rows, columns // (w.group_size or 1)),
              "tensor_group": (rows, columns // (w.group_size or 1)), "block": blocks}[w.strategy]
    expected = {"weight_scale": scales}
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):  # two E2M1 values per byte, scales as declared
        expected["weight_packed"] = (rows, columns // 2)
        assert stored["weight_packed"].dtype == torch.uint8 and stored["weight_scale"].dtype == FP4_SCALES[w.strategy]
        if w.strategy == "tensor_group":
            expected["weight_global_scale"] = (1,)
        if scheme.input_activations is not None:
            expected["input_global_scale"] = (1,)
    elif fmt == "pack-quantized":
        expected |= {"weight_packed": (rows, math.ceil(columns * w.num_bits / 32)), "weight_shape": (2,)}
        assert stored["weight_packed"].dtype == torch.int32 and stored["weight_shape"].tolist() == [rows, columns]
    else:
        expected["weight"] = (rows, columns)
        assert stored["weight"].dtype == (torch.float8_e4m3fn if w.type == "float" else torch.int8)
    if fmt == "int-quantized":
        qmin, qmax = grid_range(w)
        assert qmin <= int(stored["weight"].min()) and int(stored["weight"].max()) <= qmax
    if not w.symmetric:  # zero points exactly when asymmetric
        packed = fmt == "pack-quantized"
        expected["weight_zero_point"] = (math.ceil(rows * w.num_bits / 32), scales[1]) if packed else scales
        assert stored["weight_zero_point"].dtype == (torch.int32 if packed else torch.int8)
    assert {k: tuple(t.shape) for k, t in stored.items()} == expected


def assert_library_reads_our_arithmetic(config: dict, stored: dict[str, torch.Tensor], layer: QuantizedLinear) -> None:
    """compressed-tensors, reading the config as written, decompresses the stored tensors to ptqlab's dequantized
    weight, and quantizes inputs dynamically exactly as ptqlab does."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    group = config["config_groups"]["group_0"]
    compressor = BaseCompressor.load_from_registry(config["format"])
    weight = compressor.decompress({k: v for k, v in stored.items() if k != "bias"}, QuantizationScheme.model_validate(group))["weight"]
    # (its FP4 decompressor computes in bf16: compared in the dtype it gives)
    assert torch.equal(weight, layer.dequantized_weight(weight.dtype))
    if group["input_activations"] is not None:
        args = QuantizationArgs.model_validate(group["input_activations"])
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 4, layer.in_features)
        gscale = layer.input_global_scale  # NVFP4 activations: their calibrated global scale, else None
        scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=gscale)
        assert torch.equal(ct_fake_quantize(x, scale, zero_point, args, global_scale=gscale),
                           fake_quantize(x, layer.scheme.input_activations, gscale))


class OneLinear(nn.Module):
    """The smallest model checkpoint_tensors writes: one quantized linear, no embeddings."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.proj = layer

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None


def weight_matrix(rows: int = 48, columns: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * torch.rand(rows, 1, generator=g) * 0.05
    w[0, 3] = 0.4  # an outlier: asymmetric and symmetric grids differ
    return w


# ---- the pure path: hundreds of random recipes -----------------------------------------------------------------------

RANDOM_SEEDS = range(300)


def test_random_valid_recipes_parse_to_what_they_say_and_write_what_is_computed():
    for seed in RANDOM_SEEDS:
        doc = random_recipe(seed)
        recipe = parse_recipe(through_yaml(doc))
        assert recipe.scheme == expected_scheme(doc), doc
        assert parse_recipe(through_yaml(recipe.to_dict())) == recipe
        config = json.loads(json.dumps(quantization_config(recipe)))  # exactly what config.json holds
        assert_config_declares(config, recipe.scheme, recipe.ignore)
        # NVFP4 activations: an input global scale, as calibration gives one
        input_global = torch.tensor([1500.0]) if has_input_global_scale(recipe.scheme) else None
        layer = QuantizedLinear.from_weight(weight_matrix(seed=seed), None, recipe.scheme, input_global_scale=input_global)
        stored = {k.removeprefix("proj."): t for k, t in checkpoint_tensors(OneLinear(layer)).items()}
        assert_tensor_layout(stored, recipe.scheme, 48, 256)
        assert_library_reads_our_arithmetic(config, stored, layer)


def test_random_recipes_cover_the_allowed_values():
    """The generator reaches every allowed value, so the test above is not vacuous."""
    schemes = [expected_scheme(random_recipe(seed)) for seed in RANDOM_SEEDS]
    weights = [s.weights for s in schemes]
    acts = [s.input_activations for s in schemes if s.input_activations is not None]
    assert {(w.type, w.num_bits) for w in weights} == {(t, b) for t, bits in BITS.items() for b in bits}
    assert {w.strategy for w in weights} == set(WEIGHT_STRATEGIES) and {a.strategy for a in acts} == set(ACTIVATION_STRATEGIES)
    assert {w.symmetric for w in weights} == {a.symmetric for a in acts} == {True, False}
    assert {w.group_size for w in weights} == {None, *GROUP_SIZES, *(f.group_size for f in FP4_FORMATS)}
    assert {s.format for s in schemes} == {"pack-quantized", "int-quantized", "float-quantized", "naive-quantized",
                                           "nvfp4-pack-quantized", "mxfp4-pack-quantized"}


# ---- the full path: a small model, calibration, a checkpoint on disk -------------------------------------------------

@pytest.fixture(scope="module")
def small_model(tiny_model_dir):
    return tiny_model_dir("llama", **SMALL)


@pytest.fixture(scope="module")
def calibration(small_model, tmp_path_factory):
    from ptqlab.data import CalibrationConfig, load_calibration
    from ptqlab.models import load_model
    from tiny import CHATS, write_jsonl

    path = write_jsonl(tmp_path_factory.mktemp("calibration") / "chats.jsonl", CHATS)
    return load_calibration(load_model(str(small_model)).tokenizer, CalibrationConfig(dataset=str(path), num_samples=4, max_seq_len=16))


def quantize_and_check(src, recipe: Recipe, calibration, folder) -> None:
    from ptqlab.models import load_model
    from ptqlab.pipeline import quantize_model

    loaded = load_model(str(src))
    result = quantize_model(loaded.model, recipe, calibration if recipe.calibrated else None, quiet=True, batch_size=4,
                            device=torch.device("cpu"))
    assert result.recipe.scheme == recipe.scheme  # no automatic change: the scheme asked for is the one used
    write_checkpoint(folder, loaded.model, loaded.tokenizer, result.recipe)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert_config_declares(config, recipe.scheme, recipe.ignore)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 7 and all(m.scheme == recipe.scheme for m in layers.values())
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        for name, layer in layers.items():
            stored = {k.removeprefix(name + "."): f.get_tensor(k) for k in keys if k.rpartition(".")[0] == name}
            assert_tensor_layout(stored, recipe.scheme, layer.out_features, layer.in_features)
            assert_library_reads_our_arithmetic(config, stored, layer)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_writes_the_config_of_its_arithmetic(small_model, calibration, tmp_path, name):
    quantize_and_check(small_model, PRESETS[name], calibration, tmp_path)


@pytest.mark.parametrize("seed", [1000, 1001, 1002, 1003])
def test_random_recipes_through_a_whole_model(small_model, calibration, tmp_path, seed):
    recipe = load_recipe_file(_write(tmp_path / "recipe.yaml", yaml.safe_dump(random_recipe(seed))))
    quantize_and_check(small_model, recipe, calibration, tmp_path)


def _write(path, text):
    path.write_text(text)
    return path


# ---- bad input: one short line naming the key and what is allowed -------------------------------------------------

def with_weights(**weights) -> dict:
    return {"name": "my-w8a8", "scheme": {"weights": weights}, "steps": ["rtn"]}


def with_acts(**acts) -> dict:
    acts = {"num_bits": 8, "strategy": "token", "dynamic": True, **acts}
    return {"name": "my-w8a8", "scheme": {"weights": {"num_bits": 8}, "input_activations": acts}, "steps": ["rtn"]}


def with_step(step: str, **settings) -> dict:
    steps = [{step: settings}] + ([] if step in ("gptq", "rtn") else ["rtn"])
    return {"name": "my-w8a8", "scheme": "W8A8", "steps": steps}


def assert_one_short_line(error: PtqlabError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < MAX_MESSAGE, message
    for part in parts:
        assert part in message, (part, message)


TYPE_ERRORS = [
    (with_weights(symmetric="no"), "scheme.weights.symmetric: 'no' is not a boolean; use true or false"),
    (with_weights(symmetric=1), "scheme.weights.symmetric: 1 is not a boolean; use true or false"),
    (with_weights(dynamic="false"), "scheme.weights.dynamic: 'false' is not a boolean; use true or false"),
    (with_weights(num_bits=4.0), "scheme.weights.num_bits: 4.0 is not an integer; allowed: 2, 3, 4, 8 for int; 4, 8 for float"),
    (with_weights(num_bits=True), "scheme.weights.num_bits: true is not an integer; allowed: 2, 3, 4, 8"),
    (with_weights(num_bits="4"), "scheme.weights.num_bits: '4' is not an integer; allowed:"),
    (with_weights(type=4), "scheme.weights.type: 4 is not a string; allowed: int, float"),
    (with_weights(strategy=["group"]), "scheme.weights.strategy: ['group'] is not a string; allowed: tensor, channel, group"),
    (with_weights(strategy="group", group_size=64.0), "scheme.weights.group_size: 64.0 is not an integer; use a positive integer"),
    (with_acts(symmetric="yes"), "scheme.input_activations.symmetric: 'yes' is not a boolean; use true or false"),
    (with_step("gptq", dampening_frac="high"), "steps[0].gptq.dampening_frac: 'high' is not allowed; must be a number in (0, 1)"),
    (with_step("gptq", block_size=2.5), "steps[0].gptq.block_size: 2.5 is not allowed; must be a positive integer"),
    (with_step("gptq", scale_search="on"), "steps[0].gptq.scale_search: 'on' is not allowed; must be true or false"),
    (with_step("gptq", actorder=[1]), "steps[0].gptq.actorder: [1] is not allowed; allowed: static, weight"),
    (with_step("awq", duo_scaling=0), "steps[0].awq.duo_scaling: 0 is not allowed; must be true or false"),
    (with_step("smoothquant", mappings=1), "steps[0].smoothquant.mappings: 1 is not allowed; must be one of norms, all"),
    ({"name": "x", "scheme": "W8A8", "steps": [{"gptq": [1, 2]}]}, "steps[0].gptq: expected a mapping of keys (block_size"),
    ({"name": "x", "scheme": "W8A8", "steps": ["rtn"], "auto_group_size": "yes"}, "auto_group_size: 'yes' is not a boolean"),
    ({"name": "x", "scheme": "W8A8", "steps": ["rtn"], "ignore": "lm_head"}, "ignore: 'lm_head' is not a list; use module names"),
]

RANGE_ERRORS = [
    (with_weights(num_bits=5), "scheme.weights.num_bits: 5 is not supported for type int; allowed: 2, 3, 4, 8"),
    (with_weights(num_bits=16), "scheme.weights.num_bits: 16 is not supported for type int; allowed: 2, 3, 4, 8"),
    (with_weights(type="float", num_bits=4), "scheme.weights.num_bits: 4 is not supported for type float with strategy 'channel'"),
    (with_weights(type="nf4"), "scheme.weights.type: 'nf4' is not allowed; allowed: int, float"),
    (with_weights(type="float", symmetric=False), "scheme.weights.symmetric: false is not supported for type float"),
    (with_weights(strategy="block"), "scheme.weights.block_structure: null is not two positive integers [rows, columns]"),
    (with_weights(strategy="block", block_structure=[128, 0]), "scheme.weights.block_structure: [128, 0] is not two positive integers"),
    (with_weights(block_structure=[128, 128]), "scheme.weights.block_structure: [128, 128] applies only to strategy block"),
    (with_weights(strategy="block", block_structure=[128, 128], symmetric=False), "scheme.weights.symmetric: false is not supported for strategy block"),
    (with_weights(strategy="token"), "scheme.weights.strategy: 'token' is not allowed for weights; allowed: tensor, channel, group"),
    (with_weights(dynamic=True), "scheme.weights.dynamic: true is not allowed for weights"),
    (with_weights(strategy="group"), "scheme.weights.group_size: missing: strategy group needs a positive integer group_size"),
    (with_weights(strategy="group", group_size=0), "scheme.weights.group_size: 0 is not a positive integer; use e.g. 128"),
    (with_weights(strategy="group", group_size=-128), "scheme.weights.group_size: -128 is not a positive integer"),
    (with_weights(group_size=64), "scheme.weights.group_size: 64 applies only to strategy group, not 'channel'"),
    (with_weights(num_bits=4, symmetric=False, strategy="tensor"), "scheme.weights.strategy: 'tensor' with symmetric: false is not supported for weight-only"),
    (with_acts(strategy="channel"), "scheme.input_activations.strategy: 'channel' is not allowed for input_activations; allowed: token, tensor"),
    (with_acts(strategy="block", block_structure=[1, 128]), "scheme.input_activations.strategy: 'block' is not allowed for input_activations"),
    (with_acts(strategy="group"), "scheme.input_activations.group_size: missing: strategy group needs a positive integer"),
    (with_acts(dynamic=False), "scheme.input_activations.dynamic: false is not supported for input_activations"),
    (with_acts(type="float", num_bits=4), "scheme.input_activations.num_bits: 4 is not supported for type float"),
    ({"name": "x", "scheme": "W4A16", "group_size": 0, "steps": ["rtn"]}, "group_size 0: must be a positive integer, e.g. 128"),
    ({"name": "x", "scheme": "W4A16", "group_size": 64.0, "steps": ["rtn"]}, "group_size 64.0: must be a positive integer"),
    (with_step("gptq", dampening_frac=0), "steps[0].gptq.dampening_frac: 0 is not allowed; must be a number in (0, 1)"),
    (with_step("gptq", dampening_frac=1), "steps[0].gptq.dampening_frac: 1 is not allowed; must be a number in (0, 1)"),
    (with_step("gptq", dampening_frac=float("nan")), "steps[0].gptq.dampening_frac: nan is not allowed; must be a number in (0, 1)"),
    (with_step("gptq", dampening_frac=float("inf")), "steps[0].gptq.dampening_frac: inf is not allowed; must be a number in (0, 1)"),
    (with_step("gptq", block_size=0), "steps[0].gptq.block_size: 0 is not allowed; must be a positive integer"),
    (with_step("awq", n_grid=-1), "steps[0].awq.n_grid: -1 is not allowed; must be a positive integer"),
    (with_step("smoothquant", smoothing_strength=float("nan")), "smoothing_strength: nan is not allowed; must be a number in [0, 1]"),
    ({"name": "x", "scheme": "W8A8", "ignore": ["re:["], "steps": ["rtn"]}, "ignore: 're:[' is not a valid regular expression"),
]

BAD_NAMES = ["../x", "a/b", "/tmp/x", "..", ".hidden", "", "a b", "x\\y", "naïve", "x" * 101, 12, None]


@pytest.mark.parametrize("doc,message", TYPE_ERRORS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(TYPE_ERRORS)])
def test_a_value_of_the_wrong_type_is_refused(doc, message):
    with pytest.raises(PtqlabError) as e:
        parse_recipe(doc)
    assert_one_short_line(e.value, message)


@pytest.mark.parametrize("doc,message", RANGE_ERRORS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(RANGE_ERRORS)])
def test_a_value_out_of_range_is_refused(doc, message):
    with pytest.raises(PtqlabError) as e:
        parse_recipe(doc)
    assert_one_short_line(e.value, message)


@pytest.mark.parametrize("name", BAD_NAMES, ids=[f"name-{i}" for i in range(len(BAD_NAMES))])
def test_a_recipe_name_must_be_a_folder_name(name):
    with pytest.raises(PtqlabError) as e:
        parse_recipe({"name": name, "scheme": "W8A8", "steps": ["rtn"]})
    assert_one_short_line(e.value, "name ", "cannot name a folder", "letters, digits, '.', '_' or '-', not starting with '.'")
    with pytest.raises(PtqlabError, match="cannot name a folder"):  # and not only from YAML
        Recipe(name=name, scheme=PRESETS["w8a8"].scheme)


def test_good_names_are_kept():
    for name in ["w8a8", "my-w8a8", "W4A16_g64.v2", "_x", "-x", "a" * 100]:
        assert parse_recipe({"name": name, "scheme": "W8A8", "steps": ["rtn"]}).name == name


@pytest.mark.parametrize("text", [
    "x" * 10_000_000,                       # one huge scalar: refused by size before YAML reads it
    "- item\n" * (MAX_RECIPE_BYTES // 7 + 1),  # a huge list: the same
    "- item\n" * 20_000,                    # under the limit: read, then refused as not a mapping
    "just words " * 20_000,
    "",
], ids=["10MB-scalar", "over-limit-list", "list", "scalar", "empty"])
def test_a_huge_yaml_that_is_not_a_mapping_is_not_echoed(tmp_path, text):
    path = _write(tmp_path / "big.yaml", text)
    with pytest.raises(PtqlabError) as e:
        get_recipe(str(path))
    if len(text) > MAX_RECIPE_BYTES:
        assert_one_short_line(e.value, str(path), "too large for a recipe")
    else:
        assert_one_short_line(e.value, str(path), "expected a mapping of keys (name, description, scheme")


def test_huge_values_are_quoted_by_a_short_prefix():
    for doc in [{"name": "x", "scheme": "W" * 10**6, "steps": ["rtn"]}, "y" * 10**7, ["z"] * 10**6,
                {"name": "x", "scheme": "W8A8", "steps": ["rtn"], "k" * 10**6: 1}]:
        with pytest.raises(PtqlabError) as e:
            parse_recipe(doc)
        assert_one_short_line(e.value, "...")


@pytest.mark.parametrize("text,message", [
    ("name: [unclosed\n", "is not valid YAML: did not find expected ',' or ']' at line 2, column 1"),
    ("name: x\n\tscheme: W8A8\n", "is not valid YAML: found a tab character"),
    ("[" * 100_000, "is not valid YAML"),
])
def test_broken_yaml_is_one_line(tmp_path, text, message):
    with pytest.raises(PtqlabError) as e:
        load_recipe_file(_write(tmp_path / "bad.yaml", text))
    assert_one_short_line(e.value, message)


def test_a_binary_file_is_not_a_recipe(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00name: x")
    with pytest.raises(PtqlabError) as e:
        load_recipe_file(path)
    assert_one_short_line(e.value, "is not UTF-8 text")


@pytest.mark.parametrize("recipe,override,message", [
    ("w4a16", dict(group_size=0), "--group-size 0: must be a positive integer"),
    ("w4a16", dict(group_size=-64), "--group-size -64: must be a positive integer"),
    ("w4a16", dict(ignore=["re:("]), "--ignore: 're:(' is not a valid regular expression"),
    ("w4a16", dict(ignore=[""]), "--ignore: '' is not a module name or re: pattern"),
    ("w8a8", dict(dampening_frac=0.0), "--dampening-frac 0.0: must be a number in (0, 1)"),
    ("w8a8", dict(dampening_frac=-1.0), "--dampening-frac -1.0: must be a number in (0, 1)"),
    ("w8a8", dict(dampening_frac=1.0), "--dampening-frac 1.0: must be a number in (0, 1)"),
    ("w8a8", dict(dampening_frac=float("nan")), "--dampening-frac nan: must be a number in (0, 1)"),
    ("w8a8", dict(dampening_frac=float("inf")), "--dampening-frac inf: must be a number in (0, 1)"),
    ("w8a8", dict(act_order="yes"), "--act-order 'yes': must be true or false"),
    ("w8a8", dict(block_size=0), "--block-size 0: must be a positive integer"),
    ("w8a8", dict(alpha=0.5), "--alpha is not a gptq setting; allowed: --block-size, --dampening-frac"),
])
def test_command_line_overrides_out_of_range_are_refused(recipe, override, message):
    with pytest.raises(PtqlabError) as e:
        if {"group_size", "ignore"} & set(override):
            PRESETS[recipe].with_overrides(**override)
        else:
            PRESETS[recipe].with_gptq(**override)
    assert_one_short_line(e.value, message)


@pytest.mark.parametrize("args,message", [
    (["--dampening-frac", "nan"], "--dampening-frac nan: must be a number in (0, 1)"),
    (["--dampening-frac", "0"], "--dampening-frac 0.0: must be a number in (0, 1)"),
    (["--group-size", "0"], "--group-size 0: must be a positive integer"),
    (["--group-size", "-8"], "--group-size -8: must be a positive integer"),
])
def test_the_cli_refuses_overrides_in_one_line_before_any_work(small_model, tmp_path, args, message):
    from typer.testing import CliRunner

    from ptqlab.cli import app

    result = CliRunner().invoke(app, ["quantize", str(small_model), "--recipe", "w4a16", "--out", str(tmp_path / "q"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "q").exists()


def test_valid_overrides_still_apply():
    recipe = PRESETS["w4a16"].with_overrides(ignore=["lm_head", "re:.*down_proj"], group_size=64).with_gptq(dampening_frac=0.05, act_order=False)
    assert recipe.scheme.weights.group_size == 64 and not recipe.auto_group_size and recipe.ignore == ("lm_head", "re:.*down_proj")
    assert recipe.gptq.dampening_frac == 0.05 and not recipe.gptq.act_order


@pytest.mark.parametrize("text, key", [
    ("name: x\nscheme: W4A16\nsteps: [rtn]\nsteps: [gptq]\n", "steps"),
    ("name: x\nscheme: W4A16\nsteps:\n  - gptq: {dampening_frac: 0.01, dampening_frac: 0.1}\n", "dampening_frac"),
])
def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path, text, key):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(PtqlabError, match=rf"^{re.escape(str(path))} is not valid YAML: duplicate key '{key}' at line \d+"):
        load_recipe_file(path)
