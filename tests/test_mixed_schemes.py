"""Recipes with `overrides`: some linears at a second scheme (a 2-bit model with its sensitive parts at 4-bit).

The recipe parses, checks and round-trips; each linear is quantized to the scheme that claims it; the checkpoint has
one config group per scheme, and the official reader (transformers through compressed-tensors) and ptqlab's runtime
read back exactly the weights ptqlab computed. Tolerance: exact equality: both sides dequantize the same stored
integers and scales in float32.
"""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from ptqlab import quantize
from ptqlab.errors import PtqlabError
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.recipe import SchemeOverride
from ptqlab.recipes import get_recipe, parse_recipe
from ptqlab.schemes import QuantArgs, Scheme, claiming_group

INT2 = {"num_bits": 2, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}
LAYER_1_MLP = "re:model\\.layers\\.1\\.(post_attention_layernorm|mlp)\\."
W4_G64 = Scheme(QuantArgs(num_bits=4, strategy="group", group_size=64))


def mixed_doc(steps=("rtn",), **override) -> dict:
    return {"name": "w2-mixed", "scheme": {"weights": dict(INT2)}, "steps": list(steps),
            "overrides": [{"targets": [LAYER_1_MLP], "scheme": "W4A16", "group_size": 64, **override}]}


# ---- the recipe ------------------------------------------------------------------------------------------------------

def test_overrides_parse_and_round_trip_through_yaml():
    recipe = parse_recipe(mixed_doc())
    assert recipe.overrides == (SchemeOverride((LAYER_1_MLP,), W4_G64),)
    assert recipe.schemes == (recipe.scheme, W4_G64)
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    # a recipe without overrides writes no key: the recorded requests of earlier checkpoints stay as they were
    assert "overrides" not in get_recipe("w4a16").to_dict()


@pytest.mark.parametrize("change,message", [
    ({"overrides": {"targets": ["lm_head"]}}, r"overrides: .* is not a list"),
    ({"overrides": [{"scheme": "W4A16"}]}, r"overrides\[0\]: key 'targets' is missing"),
    ({"overrides": [{"targets": ["lm_head"]}]}, r"overrides\[0\]: key 'scheme' is missing"),
    ({"overrides": [{"targets": ["lm_head"], "scheme": "W4A16", "bits": 4}]}, r"overrides\[0\]: unknown key 'bits'; allowed: targets, scheme, group_size"),
    ({"overrides": [{"targets": [], "scheme": "W4A16"}]}, r"overrides\[0\]\.targets: \[\] is not a non-empty list"),
    ({"overrides": [{"targets": "lm_head", "scheme": "W4A16"}]}, r"overrides\[0\]\.targets: 'lm_head' is not a non-empty list"),
    ({"overrides": [{"targets": ["re:(unclosed"], "scheme": "W4A16"}]}, r"overrides\[0\]\.targets: 're:\(unclosed' is not a valid regular expression"),
    ({"overrides": [{"targets": ["Linear"], "scheme": "W4A16"}]}, r"overrides\[0\]\.targets: 'Linear' \(every linear\) is the recipe's own scheme"),
    ({"overrides": [{"targets": ["a", "a"], "scheme": "W4A16"}]}, r"overrides\[0\]\.targets: 'a' is named twice"),
    ({"overrides": [{"targets": ["a"], "scheme": "W5A16"}]}, r"overrides\[0\]\.scheme: unknown scheme 'W5A16'"),
    ({"overrides": [{"targets": ["a"], "scheme": {"weights": {"num_bits": 5}}}]}, r"overrides\[0\]\.scheme\.weights\.num_bits: 5 is not supported"),
    ({"overrides": [{"targets": ["a"], "scheme": "W8A16", "group_size": 64}]}, r"overrides\[0\]\.group_size applies to group-wise"),
    ({"overrides": [{"targets": ["a"], "scheme": "W4A16", "group_size": 0}]}, r"overrides\[0\]\.group_size 0: must be a positive integer"),
    ({"overrides": [{"targets": ["a"], "scheme": "FP8_BLOCK"}], "steps": ["gptq"]}, r"block-wise weights .* quantized by rtn"),
])
def test_override_mistakes_are_one_line_naming_the_key(change, message):
    doc = {**mixed_doc(), **change}
    with pytest.raises(PtqlabError, match=message) as raised:
        parse_recipe(doc)
    assert "\n" not in str(raised.value)


def test_claiming_group_is_compressed_tensors_precedence():
    """ptqlab's readers pick a linear's config group as compressed-tensors' own matching does: an exact name over a
    regex over the class Linear, whatever the groups' order."""
    from compressed_tensors.quantization.lifecycle.apply import _scheme_from_targets
    from compressed_tensors.utils.match import match_targets
    from torch import nn

    groups = [["Linear"], ["re:model\\.layers\\.1\\.mlp\\."], ["model.layers.1.mlp.down_proj", "re:.*o_proj"],
              ["re:model\\.layers\\.[01]\\.self_attn\\."]]
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
             "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    for order in (groups, groups[::-1], groups[1:] + groups[:1]):
        target_to_group = {target: i for i, targets in enumerate(order) for target in targets}
        for name in names:
            matched = match_targets(name, nn.Linear(2, 2), target_to_group)
            assert claiming_group(name, order) == _scheme_from_targets(target_to_group, matched, name), (name, order)


# ---- quantizing and the checkpoint -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_checkpoint(tiny_model_dir, tmp_path_factory):
    src = tiny_model_dir("llama")
    recipe = parse_recipe(mixed_doc())
    out = quantize(str(src), recipe, out=tmp_path_factory.mktemp("mixed") / "q", quiet=True, device="cpu")
    return src, recipe, out


def _in_memory(src, recipe):
    from ptqlab import load_model, quantize_model

    loaded = load_model(str(src))
    quantize_model(loaded.model, recipe, quiet=True)
    return {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)}, loaded.model


def test_each_linear_is_quantized_to_the_scheme_that_claims_it(mixed_checkpoint):
    src, recipe, out = mixed_checkpoint
    modules, _ = _in_memory(src, recipe)
    four_bit = {n for n, m in modules.items() if m.scheme == W4_G64}
    assert four_bit == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert all(m.scheme == recipe.scheme for n, m in modules.items() if n not in four_bit) and len(modules) == 14
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["recipe"]["overrides"] == recipe.to_dict()["overrides"] and record["format"] == "pack-quantized"
    assert record["scheme"] == f"{recipe.scheme.describe()}; {W4_G64.describe()}"
    assert any(note.startswith("overrides[0]: 3 linears quantized as int4") for note in record["notes"])


def test_the_config_has_a_group_per_scheme_and_the_tensors_their_layouts(mixed_checkpoint):
    from compressed_tensors.quantization import QuantizationConfig

    from ptqlab.formats.validate import validate_checkpoint

    _, recipe, out = mixed_checkpoint
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(raw)
    assert config.format == "pack-quantized" and config.ignore == ["lm_head"]
    groups = {tuple(group.targets): group for group in config.config_groups.values()}
    assert list(groups) == [(LAYER_1_MLP,), ("Linear",)]
    assert (groups[("Linear",)].weights.num_bits, groups[(LAYER_1_MLP,)].weights.num_bits) == (2, 4)
    assert {group.format for group in groups.values()} == {"pack-quantized"}
    validate_checkpoint(out)  # every tensor's shape and dtype against its group's format
    with safe_open(out / "model.safetensors", "pt") as f:
        # down_proj [256, 512]: int2 packs 16 per int32, int4 8; the int2 zero points packed along the output
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_packed").shape == (256, 512 // 16)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point").shape == (256 // 16, 512 // 64)
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight_packed").shape == (256, 512 // 8)
        assert "model.layers.1.mlp.down_proj.weight_zero_point" not in f.keys()


def test_transformers_reads_each_linear_as_ptqlab_dequantizes_it(mixed_checkpoint):
    """The official reader: transformers loads the checkpoint through compressed-tensors, which decompresses each
    linear by its own group's scheme; its weights and logits equal ptqlab's in-memory model's."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, recipe, out = mixed_checkpoint
    modules, model = _in_memory(src, recipe)
    decompressed = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    bits = {}
    for name, module in modules.items():
        theirs = decompressed.get_submodule(name)
        bits[name] = theirs.quantization_scheme.weights.num_bits
        assert torch.equal(theirs.weight, module.dequantized_weight(torch.float32)), name
    assert sorted(set(bits.values())) == [2, 4] and sum(b == 4 for b in bits.values()) == 3
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # and as it runs by default (compressed, decompressed in the forward)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits, model(ids).logits)


def test_ptqlab_runtime_reads_each_linear_in_its_group(mixed_checkpoint):
    from ptqlab.runtime.load import SchemeResolver

    _, recipe, out = mixed_checkpoint
    resolve = SchemeResolver(json.loads((out / "config.json").read_text())["quantization_config"])
    assert resolve("model.layers.1.mlp.up_proj") == W4_G64 and resolve("model.layers.1.self_attn.q_proj") == recipe.scheme
    assert resolve("model.layers.0.mlp.up_proj") == recipe.scheme and resolve("lm_head") is None
    verified = json.loads((out / "ptqlab.json").read_text())["verification"]
    assert {v["reader"] for v in verified} == {"transformers", "ptqlab runtime"}
    assert all(v["relative_error"] == 0.0 for v in verified)


def test_gptq_quantizes_each_linear_at_its_scheme(tiny_model_dir, calibration_file, tmp_path):
    """The calibrated engine: GPTQ gets each linear's scheme from the plan; the checkpoint is verified by both readers."""
    from ptqlab.data import CalibrationConfig

    recipe = parse_recipe(mixed_doc(steps=["gptq"]))
    src = tiny_model_dir("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=128, num_attention_heads=2,
                         num_key_value_heads=1)
    out = quantize(str(src), recipe, out=tmp_path / "q", quiet=True, device="cpu",
                   calibration=CalibrationConfig(dataset=str(calibration_file), num_samples=4, max_seq_len=16))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight_packed").shape == (128, 128 // 8)
        assert f.get_tensor("model.layers.1.self_attn.q_proj.weight_packed").shape == (128, 128 // 16)
    assert len(json.loads((out / "ptqlab.json").read_text())["verification"]) == 2


def test_a_linear_claimed_by_overrides_of_two_schemes_is_refused(tiny_model_dir):
    from ptqlab import load_model, quantize_model

    doc = mixed_doc()
    doc["overrides"].append({"targets": ["re:.*down_proj"], "scheme": "W8A16"})
    with pytest.raises(PtqlabError, match=r"model\.layers\.1\.mlp\.down_proj is claimed by overrides\[0\] .* and "
                                          r"overrides\[1\] .*: make the overrides' targets disjoint"):
        quantize_model(load_model(str(tiny_model_dir("llama"))).model, parse_recipe(doc), quiet=True)


def test_an_override_group_size_that_does_not_divide_is_fitted_or_named(tiny_model_dir):
    """The group-size fallback applies to each override over the linears it claims; without it, the error names the
    override's own key."""
    from dataclasses import replace

    from ptqlab import load_model, quantize_model

    src = tiny_model_dir("llama", intermediate_size=576)  # down_proj reads 576: group 128 does not divide it
    doc = mixed_doc()
    doc["overrides"][0]["group_size"] = 128
    result = quantize_model(load_model(str(src)).model, parse_recipe(doc), quiet=True)
    assert result.recipe.overrides[0].scheme.weights.group_size == 64
    assert any(note.startswith("overrides[0]: group size 128 does not divide") for note in result.notes)
    with pytest.raises(PtqlabError, match=r"set overrides\[0\]\.group_size: 64 in the recipe"):
        quantize_model(load_model(str(src)).model, replace(parse_recipe(doc), auto_group_size=False), quiet=True)


def test_schemes_of_two_formats_make_a_mixed_precision_checkpoint_both_readers_read(tiny_model_dir, tmp_path):
    """int8 weights with int8 activations (int-quantized) beside int4 weight-only (pack-quantized): each group keeps
    its format, the config says mixed-precision, and both readers compute exactly what ptqlab computed."""
    from ptqlab.formats.validate import validate_checkpoint

    recipe = parse_recipe({"name": "w8a8-mixed", "scheme": "W8A8", "steps": ["rtn"],
                           "overrides": [{"targets": [LAYER_1_MLP], "scheme": "W4A16"}]})
    out = quantize(str(tiny_model_dir("llama")), recipe, out=tmp_path / "q", quiet=True, device="cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(group["format"] for group in config["config_groups"].values()) == ["int-quantized", "pack-quantized"]
    validate_checkpoint(out)
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["format"] == "mixed-precision"
    assert [(v["reader"], v["relative_error"]) for v in record["verification"]] == [("transformers", 0.0),
                                                                                     ("ptqlab runtime", 0.0)]
