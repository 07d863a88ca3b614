"""Rotation (engine/rotate.py): the rotation is orthogonal, the rotated float model computes the same logits on every
family the step accepts (a tied head included), refused families get one line, rotate composes with gptq, rtn and
autoround into checkpoints transformers reads back, and it tames a planted outlier channel for round-to-nearest."""

import json

import pytest
import torch

import ptqlab
from ptqlab.data import CalibrationConfig
from ptqlab.engine.rotate import RotateStep, random_hadamard, refusal, rotate_model
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES
from ptqlab.pipeline import quantize_model
from ptqlab.recipe import Recipe
from ptqlab.recipes import parse_recipe
from ptqlab.schemes import QuantArgs, Scheme
from tiny import ARCHS, CHATS, tiny_model, write_jsonl

ACCEPTED = [arch for arch in ARCHS if refusal(FAMILIES[arch]) is None]
REFUSED = [arch for arch in ARCHS if arch not in ACCEPTED]
TOKENS = torch.randint(3, 380, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [64, 256, 96, 12])
def test_random_hadamard_is_orthogonal(n):
    q = random_hadamard(n, torch.Generator().manual_seed(1))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if n & (n - 1) == 0:  # a pure Hadamard spreads every channel evenly over all of them
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))


def test_the_families_rotated_include_the_brief():
    assert {"llama", "qwen2", "qwen3", "mistral"} <= set(ACCEPTED)
    assert {"gemma2", "gemma3_text", "olmo2"} <= set(REFUSED)  # post-norms


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.double()


@pytest.mark.parametrize("arch, tied", [(arch, False) for arch in ACCEPTED] + [("llama", True)])
def test_rotation_preserves_logits(arch, tied):
    # float64 weights and math; transformers' RMSNorm computes in float32 whatever the dtype, so fp32 rounding of
    # the normed states is what is left (~1e-7 of the logits' scale); a wrong fold or sign would be of order 1
    model = tiny_model(arch, dtype=torch.float64, tie_word_embeddings=tied)
    before = logits(model)
    embeddings_before = model.get_input_embeddings().weight.clone()
    notes = rotate_model(RotateStep(seed=3), model)
    after = logits(model)
    assert (after - before).abs().max() <= 2e-6 * before.abs().max()
    assert not torch.allclose(model.get_input_embeddings().weight, embeddings_before)  # it did rotate
    if tied:
        assert any("tied" in note for note in notes) and not model.config.tie_word_embeddings


def test_rotation_preserves_logits_in_float32():
    model = tiny_model("qwen2")
    before = logits(model)
    rotate_model(RotateStep(), model)
    after = logits(model)
    # fp32 weights rounded once after float64 math, and an fp32 forward: relative error ~1e-6
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


@pytest.mark.parametrize("arch", REFUSED)
def test_refused_families_get_one_line(arch):
    model = tiny_model(arch)
    with pytest.raises(PtqlabError) as error:
        rotate_model(RotateStep(), model)
    message = str(error.value)
    assert "\n" not in message and arch in message and "remove the rotate step" in message


@pytest.mark.parametrize("steps, message", [
    ([{"gptq": {}}, "rotate"], "the last step must be a quantizer"),
    ([{"smoothquant": {}}, "rotate", {"gptq": {}}], "must be the first step"),
    ([{"rotate": {"seed": -1}}, "rtn"], "seed: -1 is not allowed"),
    ([{"rotate": {"heads": 1}}, "rtn"], "heads: 1 is not allowed"),
])
def test_bad_rotate_recipes_get_one_line(steps, message):
    with pytest.raises(PtqlabError, match=message) as error:
        parse_recipe({"name": "r", "scheme": "W4A16", "steps": steps})
    assert "\n" not in str(error.value)


def test_streaming_refuses_rotation_in_one_line(tmp_path):
    """The refusal comes before any layer is read: a stand-in for the streamed model is enough."""
    recipe = parse_recipe({"name": "r", "scheme": "W4A16", "steps": ["rotate", "rtn"]})
    model = tiny_model("llama")
    with pytest.raises(PtqlabError, match="without --stream"):
        quantize_model(model, recipe, streamed=object(), write_layer=lambda *layer: None)


def test_streaming_is_refused_before_loading(tiny_model_dir, tmp_path):
    recipe = parse_recipe({"name": "r", "scheme": "W4A16", "steps": ["rotate", "rtn"]})
    with pytest.raises(PtqlabError, match="without --stream") as error:
        ptqlab.quantize(str(tiny_model_dir("llama")), recipe, out=tmp_path / "out", stream=True, quiet=True,
                        device="cpu")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantizer", [{"gptq": {}}, "rtn", {"autoround": {"iters": 4, "samples_per_step": 4}}])
def test_rotate_then_quantize_reads_back_in_transformers(quantizer, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    recipe = parse_recipe({"name": "rot", "scheme": "W4A16", "group_size": 32, "steps": ["rotate", quantizer]})
    calibration = CalibrationConfig(dataset=str(write_jsonl(tmp_path / "chats.jsonl", CHATS)), num_samples=8,
                                    max_seq_len=32)
    out = ptqlab.quantize(str(model), recipe, out=tmp_path / "out", calib_batch_size=8, quiet=True, device="cpu",
                          calibration=calibration)
    record = json.loads((out / "ptqlab.json").read_text())
    assert {v["reader"]: v["kl"] for v in record["verification"]}["transformers"] == 0.0
    assert any(note.startswith("rotate: residual stream") for note in record["notes"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" in config  # an ordinary llama checkpoint


def test_a_rotated_tied_model_reads_back_untied(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama", tie_word_embeddings=True)
    recipe = parse_recipe({"name": "rot", "scheme": "W4A16", "group_size": 32, "steps": ["rotate", "rtn"]})
    out = ptqlab.quantize(str(model), recipe, out=tmp_path / "out", quiet=True, device="cpu")
    record = json.loads((out / "ptqlab.json").read_text())
    assert {v["reader"]: v["kl"] for v in record["verification"]}["transformers"] == 0.0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def planted_outlier(factor: float, seed=0):
    """A tiny llama whose normed residual stream has an outlier channel: every norm scales channel 7 `factor` times
    more and the linears reading it weigh that column `factor` times less, so the float model is the same, as in
    trained LLMs whose outlier activation channels meet small weight columns. A per-token activation scale then
    leaves the other channels a few grid steps. Rotation folds the norm's scale into the weights (where the weights'
    own groups absorb it) and spreads every channel over all of them, so no channel dominates a token."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[7] *= factor
                for linear in readers:
                    linear.weight[:, 7] /= factor
    return model


OUTLIER = 1000.0
SCHEME = Scheme(weights=QuantArgs(num_bits=4, strategy="group", group_size=32),
                input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True))
"""int4 weights in groups of 32 and int8 per-token dynamic activations: the activations are where an outlier
channel costs most, and what QuaRot's rotation is for."""


def rtn_error(rotate: bool, factor: float = OUTLIER, scheme: Scheme = SCHEME) -> float:
    """Mean squared error of round-to-nearest logits against the float model's (with the outlier)."""
    model = planted_outlier(factor)
    reference = logits(model)
    steps = ([RotateStep()] if rotate else []) + [parse_recipe({"name": "r", "scheme": "W4A16", "steps": ["rtn"]}).steps[0]]
    quantize_model(model, Recipe(name="r", scheme=scheme, steps=tuple(steps)), quiet=True)
    return float(((logits(model) - reference) ** 2).mean())


def test_rotation_lowers_round_to_nearest_error_on_an_outlier_channel():
    plain, rotated = rtn_error(rotate=False), rtn_error(rotate=True)
    # measured: 0.133 without rotation, 0.0044 with it (the same as with no outlier at all): a 30x gap
    assert rotated < plain / 5, (rotated, plain)
