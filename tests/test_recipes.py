"""Recipes as data: presets and user files go through the same YAML parser; mistakes name the key and the fix."""

import pytest
import yaml

from ptqlab.errors import PtqlabError
from ptqlab.quant.gptq import GPTQConfig
from ptqlab.engine.awq import AWQStep
from ptqlab.engine.quantize import RTNStep
from ptqlab.engine.smoothquant import SmoothQuantStep
from ptqlab.recipes import PRESETS, get_recipe, load_recipe_file, parse_recipe

REQUIRED_PRESETS = ["fp8-dynamic", "w4a16", "w4a16-awq", "w8a8", "w8a8-fp8", "w4a16-rtn", "w8a8-rtn"]


def test_required_presets_exist_with_their_steps():
    assert set(REQUIRED_PRESETS) <= set(PRESETS)
    w8a8 = PRESETS["w8a8"]
    assert w8a8.steps == (SmoothQuantStep(0.8, "norms"), GPTQConfig(dampening_frac=0.01, act_order=True))
    assert w8a8.scheme.weights.num_bits == 8 and w8a8.scheme.weights.strategy == "channel"
    assert w8a8.scheme.input_activations.dynamic and w8a8.scheme.format == "int-quantized"
    awq = PRESETS["w4a16-awq"]
    assert isinstance(awq.steps[0], AWQStep) and isinstance(awq.steps[1], RTNStep)
    assert not awq.scheme.weights.symmetric and awq.scheme.weights.group_size == 128
    fp8 = PRESETS["w8a8-fp8"]
    assert fp8.scheme.weights.type == "float" and fp8.scheme.input_activations.type == "float" and fp8.method == "gptq"
    assert not PRESETS["fp8-dynamic"].calibrated and PRESETS["w4a16-awq"].calibrated


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_yaml(name):
    recipe = PRESETS[name]
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe


def test_a_user_recipe_file_reads_like_llm_compressor(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("""
name: my-w8a8
scheme: W8A8
ignore: [lm_head, "re:.*down_proj"]
steps:
  - smoothquant: {smoothing_strength: 0.5}
  - gptq: {dampening_frac: 0.05, actorder: null, block_size: 64}
""")
    recipe = get_recipe(str(path))
    assert recipe.name == "my-w8a8" and recipe.ignore == ("lm_head", "re:.*down_proj")
    assert recipe.steps == (SmoothQuantStep(0.5, "norms"), GPTQConfig(dampening_frac=0.05, act_order=False, block_size=64))


def test_group_size_at_the_top_level_sets_the_weights(tmp_path):
    recipe = parse_recipe({"name": "g64", "scheme": "W4A16", "group_size": 64, "steps": ["rtn"]})
    assert recipe.scheme.weights.group_size == 64


@pytest.mark.parametrize("doc,message", [
    ({"name": "x", "scheme": "W8A8", "steps": [{"smoothquant": {"alpha": 0.5}}, "gptq"]},
     r"smoothquant: unknown key 'alpha'; allowed: smoothing_strength"),
    ({"name": "x", "scheme": "W8A8", "steps": [{"gptq": {"actorder": "group"}}]},
     r"actorder: 'group' is not allowed; allowed: static, weight"),
    ({"name": "x", "scheme": "W9A9", "steps": ["rtn"]}, r"unknown scheme 'W9A9'; allowed: FP8_DYNAMIC, W4A16"),
    ({"name": "x", "scheme": "W8A8", "steps": [{"sparsegpt": {}}]}, r"unknown step 'sparsegpt'; allowed: smoothquant, awq, gptq, rtn"),
    ({"name": "x", "scheme": "W8A8", "steps": ["gptq", "smoothquant"]}, r"last step must be a quantizer"),
    ({"name": "x", "scheme": "W8A8", "steps": ["gptq", "rtn"]}, r"only one quantizer"),
    ({"name": "x", "scheme": "W8A8", "steps": [{"smoothquant": {"smoothing_strength": 1.5}}, "rtn"]}, r"smoothing_strength: 1.5 is not allowed; must be a number in \[0, 1\]"),
    ({"name": "x", "scheme": "W8A8", "steps": [{"smoothquant": {"mappings": "some"}}, "rtn"]}, r"mappings: 'some' is not allowed; must be one of norms, all"),
    ({"name": "x", "scheme": "W8A8", "steps": [{"gptq": {"dampening_frac": "high"}}]}, r"dampening_frac: 'high' is not allowed; must be a number in \(0, 1\)"),
    ({"name": "x", "scheme": {"weights": {"num_bits": 5}}, "steps": ["rtn"]}, r"scheme.weights.num_bits: 5 is not supported for type int; allowed: 2, 3, 4, 8"),
    ({"name": "x", "scheme": {"weights": {"bits": 4}}, "steps": ["rtn"]}, r"unknown key 'bits'; allowed: num_bits"),
    ({"name": "x", "scheme": "W8A8", "steps": ["rtn"], "smoothing_strength": 0.8}, r"unknown key 'smoothing_strength'; allowed: name"),
    ({"name": "x", "scheme": "W8A8"}, r"key 'steps' is missing"),
    ({"name": "x", "scheme": "W8A8", "group_size": 64, "steps": ["rtn"]}, r"group_size applies to group-wise and block-wise recipes"),
])
def test_mistakes_name_the_key_and_what_is_allowed(doc, message):
    with pytest.raises(PtqlabError, match=message):
        parse_recipe(doc)


def test_a_broken_file_is_reported_as_such(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(PtqlabError, match="not valid YAML"):
        load_recipe_file(bad)
    with pytest.raises(PtqlabError, match="cannot read recipe file"):
        load_recipe_file(tmp_path / "missing.yaml")
    with pytest.raises(PtqlabError, match="unknown recipe 'w5a16'"):
        get_recipe("w5a16")


def test_block_wise_fp8_keeps_weight_blocks_and_activation_groups_of_one_width():
    import yaml

    from ptqlab.recipes import parse_recipe

    recipe = get_recipe("fp8-block")
    assert recipe.scheme.weights.block_structure == (128, 128) and recipe.scheme.input_activations.group_size == 128
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())), "round trip") == recipe
    narrower = recipe.with_overrides(group_size=64)
    assert narrower.scheme.weights.block_structure == (128, 64) and narrower.scheme.input_activations.group_size == 64
    doc = {**recipe.to_dict(), "steps": [{"gptq": {}}]}
    with pytest.raises(PtqlabError, match="block-wise weights .* rtn"):
        parse_recipe(doc, "mine.yaml")
