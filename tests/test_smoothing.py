"""SmoothQuant and AWQ: the smoothed float model is the same function; the scales do what they are for."""

import json
from dataclasses import replace

import pytest
import torch

from ptqlab import get_recipe, load_model, quantize, quantize_model
from ptqlab.data import CalibrationConfig, load_calibration
from ptqlab.errors import PtqlabError
from ptqlab.models import decoder_layers
from ptqlab.quant.linear import rtn
from ptqlab.quant.primitives import dequantize, fake_quantize
from ptqlab.schemes import W8A8, QuantArgs
from ptqlab.engine.awq import awq_scales
from ptqlab.engine.smoothing import apply_scales, resolve_mappings
from ptqlab.engine.smoothquant import smoothquant_scales
from ptqlab.families import FAMILIES
from tiny import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_smoothed_float_model_computes_the_same_function(arch, kv_heads):
    """Every mapping of the table, with strong random scales (0.05x to 20x), leaves the fp32 logits unchanged."""
    model = tiny_model(arch, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    g = torch.Generator().manual_seed(1)
    applied = 0
    norms = FAMILIES[arch].norms
    pre_norms = (norms.attention_input is not None) + (norms.mlp_input is not None)  # OLMo 2 norms after its blocks
    for layer in decoder_layers(model):
        mappings, skipped = resolve_mappings(layer, model.config)
        # v -> o is exact only without grouped-query attention: skipped with GQA, applied without.
        assert len(mappings) == pre_norms + (1 if kv_heads == 2 else 2) and len(skipped) == (1 if kv_heads == 2 else 0)
        for m in mappings:
            width = next(iter(m.balance.values())).in_features
            apply_scales(m, torch.exp(torch.empty(width).uniform_(-3, 3, generator=g)))
            applied += 1
    with torch.no_grad():
        after = model(ids).logits
    assert applied == len(decoder_layers(model)) * len(mappings)
    assert (after - before).norm() / before.norm() < 1e-5


def test_unknown_architecture_is_refused_with_the_table_to_extend():
    config = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(PtqlabError, match="gpt2.*ptqlab.families.FAMILIES"):
        resolve_mappings(torch.nn.Module(), config)


def outlier_inputs(n=512, columns=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, columns, generator=g)
    x[:, :4] *= 60  # a few channels 60x larger, as in LLM activations
    return x


def w8a8_output_error(x, w):
    """Relative output error of int8 per-token activations x int8 per-channel weights (fp32)."""
    q, s, z = rtn(w, W8A8.weights)
    approx = fake_quantize(x, W8A8.input_activations) @ dequantize(q, s, z, W8A8.weights, torch.float32).T
    ref = x @ w.T
    return float((approx - ref).norm() / ref.norm())


def test_smoothquant_makes_int8_activations_easy():
    """Same layer, same function: migrating the outliers into the weights cuts the W8A8 output error."""
    x = outlier_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    s = smoothquant_scales(x.abs().amax(dim=0), [w], strength=0.8)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    assert w8a8_output_error(x / s, w * s) < 0.6 * w8a8_output_error(x, w)


def test_smoothquant_scales_leave_dead_channels_alone():
    s = smoothquant_scales(torch.tensor([0.0, 2.0, 4.0]), [torch.tensor([[1.0, 0.0, 1.0]])], 0.5)
    assert s[0] == 1 and s[1] == 1 and s[2] == 2  # 0 activation, 0 weight column: nothing to move


def test_awq_search_error_is_the_layer_output_error_and_beats_no_scaling():
    """AWQ's objective tr(ΔW H ΔWᵀ) is exactly ||X Wᵀ - X Ŵᵀ||² (H = 2/n XᵀX up to its constant), and on inputs with
    salient channels the chosen scales lower it."""
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    x = outlier_inputs(seed=2) / 20
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    hessian = x.T @ x

    def fq(weight):
        q, s, z = rtn(weight, args)
        return dequantize(q, s, z, args, torch.float32)

    scales, ratio, relative = awq_scales(x.abs().mean(dim=0), [w], hessian, fq, args.group_size)
    assert ratio is not None and relative < 0.9
    direct = lambda s: float((x @ w.T - x @ (fq(w * s) / s).T).pow(2).sum())  # noqa: E731
    assert relative == pytest.approx(direct(scales) / direct(torch.ones(128)), rel=1e-3)


def calibration_for(tokenizer, calibration_file, n=16):
    return load_calibration(tokenizer, CalibrationConfig(dataset=str(calibration_file), num_samples=n, max_seq_len=32))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-awq", "w8a8-fp8"])
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_calibrated_recipes_round_trip_in_transformers(tiny_model_dir, tmp_path, calibration_file, recipe, arch):
    """The saved checkpoint loads in transformers and computes exactly what the quantized model in memory does."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(arch)
    config = CalibrationConfig(dataset=str(calibration_file), num_samples=16, max_seq_len=32)
    out = quantize(str(src), recipe, out=tmp_path / "q", calibration=config, calib_batch_size=4, quiet=True, device="cpu")
    record = json.loads((out / "ptqlab.json").read_text())
    assert [next(iter(step)) for step in record["recipe"]["steps"]] == [next(iter(s)) for s in get_recipe(recipe).to_dict()["steps"]]
    loaded = load_model(str(src))
    quantize_model(loaded.model, get_recipe(recipe), calibration_for(loaded.tokenizer, calibration_file), quiet=True,
                   batch_size=4, device=torch.device("cpu"))
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, loaded.model(ids).logits)


def test_smoothquant_lowers_w8a8_error_on_a_model_with_activation_outliers(tiny_model_dir, calibration_file):
    """Tiny Llama whose norms create outlier channels (as real LLMs have): SmoothQuant + GPTQ W8A8 ends closer to the
    float model than GPTQ W8A8 alone."""
    src = tiny_model_dir("llama")
    reference = load_model(str(src))

    def with_outliers(model):
        with torch.no_grad():
            for layer in decoder_layers(model):
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[:3] *= 40
        return model

    with_outliers(reference.model)
    calibration = calibration_for(reference.tokenizer, calibration_file, n=32)
    ids = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(1))
    errors = {}
    w8a8 = get_recipe("w8a8")
    for name, recipe in {"smoothquant": w8a8, "plain": replace(w8a8, steps=w8a8.steps[1:])}.items():
        loaded = load_model(str(src))
        with_outliers(loaded.model)
        quantize_model(loaded.model, recipe, calibration, quiet=True, batch_size=8, device=torch.device("cpu"))
        with torch.no_grad():
            errors[name] = float((loaded.model(ids).logits - reference.model(ids).logits).pow(2).mean())
    assert errors["smoothquant"] < 0.7 * errors["plain"]


def test_smoothquant_all_mappings_reach_v_o_and_up_down_where_exact(tiny_model_dir, tmp_path, calibration_file):
    """mappings: all smooths 4 places per layer without GQA (3 with it), recorded per layer in ptqlab.json."""
    from ptqlab.engine.quantize import RTNStep
    from ptqlab.engine.smoothquant import SmoothQuantStep

    recipe = replace(get_recipe("w8a8-rtn"), name="sq-all", steps=(SmoothQuantStep(0.5, "all"), RTNStep()))
    config = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    for kv_heads, expected in ((4, 4), (2, 3)):
        src = tiny_model_dir("llama", num_key_value_heads=kv_heads)
        out = quantize(str(src), recipe, out=tmp_path / f"kv{kv_heads}", calibration=config, quiet=True, device="cpu")
        record = json.loads((out / "ptqlab.json").read_text())
        transforms = record["layers"][0]["details"]
        assert len(transforms) == expected and all(t.startswith("smoothquant") for t in transforms)
        assert any("v_proj -> self_attn.o_proj" in t for t in transforms) == (kv_heads == 4)


def test_a_new_transform_is_its_own_code_and_one_table_row(tiny_model_dir, calibration_file, monkeypatch):
    """engine/steps.py's promise: a transform (here: divide every smoothed channel by a constant factor) is a settings
    dataclass, a function and one row of STEPS; recipes then parse it and the engine runs it. Symmetric
    round-to-nearest is invariant to such a factor (every scale grows with the weights), so the model quantized
    after it computes what the plain RTN model computes, while the layer reports show the transform ran."""
    from dataclasses import dataclass

    from ptqlab.engine import steps
    from ptqlab.recipes import parse_recipe
    from ptqlab.settings import Interval, setting

    @dataclass(frozen=True)
    class FactorStep:
        factor: float = setting(2.0, Interval(0, open_low=True, words="a positive number"))

        def smooths_linears(self) -> bool:
            return False

    def by_factor(step, mapping, stats, input_name, plan):
        width = next(iter(mapping.balance.values())).in_features
        return torch.full((width,), step.factor), f"x{step.factor:g}"

    row = steps.StepKind("factor", FactorStep, "transform", frozenset({"absmax"}), by_factor)
    monkeypatch.setattr(steps, "STEPS", steps.STEPS + (row,))
    monkeypatch.setitem(steps.STEP_KINDS, "factor", row)
    recipe = parse_recipe({"name": "factor-rtn", "scheme": "W8A16", "steps": [{"factor": {"factor": 4}}, "rtn"]})
    assert recipe.calibrated and recipe.transforms == (FactorStep(4.0),)
    with pytest.raises(PtqlabError, match=r"factor.factor: -1 is not allowed; must be a positive number"):
        parse_recipe({"name": "x", "scheme": "W8A16", "steps": [{"factor": {"factor": -1}}, "rtn"]})

    src = tiny_model_dir("llama")
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, chosen in {"factor": recipe, "plain": replace(recipe, steps=recipe.steps[1:])}.items():
        loaded = load_model(str(src))
        calibration = calibration_for(loaded.tokenizer, calibration_file, n=8)
        result = quantize_model(loaded.model, chosen, calibration, quiet=True, batch_size=4, device=torch.device("cpu"))
        if name == "factor":
            assert all(r.details and all(d.startswith("factor ") and d.endswith(": x4") for d in r.details)
                       for r in result.layer_reports)
        with torch.no_grad():
            logits[name] = loaded.model(tokens).logits
    torch.testing.assert_close(logits["factor"], logits["plain"], rtol=1e-4, atol=1e-4)
