"""Sensitivity: every quantized module belongs to exactly one part, swapping a part in and out is exact, the mixed
recipe keeps what it says and weighs what it predicts, and keeping the worst parts 16-bit lowers the KL."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from ptqlab.errors import PtqlabError
from ptqlab.measure.sensitivity import Part, PartResult, choose_kept, predicted_kl, swapped
from ptqlab.measure.variant import BenchSettings
from ptqlab.recipes import get_recipe
from ptqlab.record import read_record
from ptqlab.suite import Sensitivity, sensitivity

SETTINGS = BenchSettings(ppl_text="python-docs", ppl_context=64, device="cpu")


def _result(layer: int, kind: str, kl: float, extra: int) -> PartResult:
    return PartResult(Part(layer, kind, f"model.layers.{layer}", ("self_attn",), 100, 100 + extra), kl, 2 * kl, 90.0)


def test_the_kept_parts_are_the_most_kl_per_byte_until_the_target_is_met():
    results = [_result(0, "attention", 0.01, 10), _result(0, "mlp", 0.04, 40), _result(1, "attention", 0.03, 10),
               _result(1, "mlp", 0.02, 40)]  # KL per byte: 1e-3, 1e-3, 3e-3, 5e-4
    uniform = 0.2  # the parts' KLs sum to 0.1: interactions double it
    assert predicted_kl(results, uniform, []) == pytest.approx(0.2)
    kept = choose_kept(results, uniform, 1000, target_kl=0.12)
    assert [(p.layer, p.kind) for p in kept] == [(1, "attention"), (0, "attention")]  # 0.2 * 0.06 / 0.1 = 0.12
    assert predicted_kl(results, uniform, kept) == pytest.approx(0.12)
    assert choose_kept(results, uniform, 1000, target_kl=0.5) == []
    assert len(choose_kept(results, uniform, 1000, target_kl=0.0)) == 4
    budget = choose_kept(results, uniform, 1000, max_bytes=1055)  # 10 + 40 fit; the next 40 would not
    assert [(p.layer, p.kind) for p in budget] == [(1, "attention"), (0, "attention")]
    with pytest.raises(PtqlabError, match="one of the two"):
        choose_kept(results, uniform, 1000)


@pytest.fixture(scope="module")
def measured(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("sensitivity")
    sensitivity(str(base), "w4a16-rtn", out, Sensitivity(target_kl=1e-9, windows=2), SETTINGS, quiet=True)
    return base, out, json.loads((out / "sensitivity.json").read_text())


def test_every_quantized_module_is_in_one_part_and_swapping_is_exact(measured):
    base, out, result = measured
    assert result["not_measured"] == []
    layers = AutoModelForCausalLM.from_pretrained(base).config.num_hidden_layers
    assert [(p["layer"], p["kind"]) for p in result["parts"]] == [(i, k) for i in range(layers) for k in ("attention", "mlp")]
    assert all(p["kl_mean"] > 0 for p in result["parts"])

    from ptqlab.measure.sensitivity import _load_checkpoint, part_results

    baseline = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    quantized = _load_checkpoint(out / "checkpoints" / "w4a16-rtn", torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, target = baseline(ids).logits, quantized(ids).logits
        parts = [r.part for r in part_results(result)]
        with swapped(baseline, quantized, parts[0]), swapped(baseline, quantized, parts[1]):
            one_layer = baseline(ids).logits
            for part in parts[2:]:  # all parts in: the quantized model, exactly
                with swapped(baseline, quantized, part):
                    pass
        assert not torch.equal(one_layer, before)
        stack = [swapped(baseline, quantized, part) for part in parts]
        for s in stack:
            s.__enter__()
        assert torch.equal(baseline(ids).logits, target)
        for s in reversed(stack):
            s.__exit__(None, None, None)
        assert torch.equal(baseline(ids).logits, before)  # restored


def test_the_mixed_recipe_keeps_its_parts_16_bit_weighs_what_it_predicts_and_lowers_kl(measured, tmp_path):
    base, out, result = measured
    target = result["uniform"]["kl_mean"] / 4
    sensitivity(str(base), "w4a16-rtn", out, Sensitivity(target_kl=target, windows=2), SETTINGS, quiet=True)
    result = json.loads((out / "sensitivity.json").read_text())
    mixed = result["mixed"]
    assert 0 < len(mixed["kept"]) < len(result["parts"]) and mixed["predicted_kl"] <= target
    recipe = get_recipe(mixed["recipe_file"])
    assert recipe.name == "w4a16-rtn-mixed" and recipe.ignore[0] == "lm_head"

    from ptqlab.api import quantize
    from ptqlab.measure.sensitivity import measure_sensitivity, safetensors_bytes

    folder = quantize(str(base), recipe, out=tmp_path / "mixed", quiet=True, device="cpu")
    ignored = set(read_record(folder).ignored_layers)
    kept = {(p["layer"], p["kind"]) for p in result["parts"] if p["name"] in mixed["kept"]}
    for layer, kind in kept:
        group = "self_attn" if kind == "attention" else "mlp"
        assert any(name.startswith(f"model.layers.{layer}.{group}.") for name in ignored)
    assert all(any(name.startswith(f"model.layers.{layer}.") for layer, _ in kept) for name in ignored - {"lm_head"})
    assert sum(safetensors_bytes(folder).values()) == mixed["predicted_weights_bytes"]
    again = measure_sensitivity(base, folder, SETTINGS, windows=2, quiet=True)
    assert again["uniform"]["kl_mean"] < 0.75 * result["uniform"]["kl_mean"]


def test_the_report_shows_the_worst_parts_first_and_a_plot_per_layer(measured):
    from ptqlab.report import markdown_html, sensitivity_lines
    from ptqlab.plots import layer_bars

    _, _, result = measured
    lines = sensitivity_lines(result, [])
    rows = [line for line in lines if line.startswith("| layer")]
    kls = [float(row.split("|")[2]) for row in rows]
    assert len(rows) == len(result["parts"]) and kls == sorted(kls, reverse=True)
    assert "<table>" in markdown_html(lines)
    svg = layer_bars([(p["layer"], p["kind"], p["kl_mean"]) for p in result["parts"]], "KL")
    assert svg.count("<rect") == len(result["parts"]) + 2  # a bar per part, a swatch per kind


def test_the_command_prints_the_worst_parts_and_the_mixed_recipe(measured):
    from typer.testing import CliRunner

    from ptqlab.cli import app

    base, out, result = measured
    run = CliRunner().invoke(app, ["sensitivity", str(base), "--recipe", "w4a16-rtn", "--out", str(out), "--windows", "2",
                                   "--ppl-text", "python-docs", "--ppl-context", "64", "--device", "cpu", "--quiet",
                                   "--target-kl", "1e-9"])
    assert run.exit_code == 0, run.output
    worst = max(result["parts"], key=lambda p: p["kl_mean"])["name"]
    assert f"{worst}: KL" in run.output and "mixed recipe:" in run.output
    assert json.loads((out / "sensitivity.json").read_text())["parts"] == result["parts"]  # reused, not measured again



def test_a_measurement_of_another_version_of_parts_is_made_again(measured, tmp_path, monkeypatch):
    """A sensitivity.json whose parts are not today's (one made before an MoE's experts were a part records no
    parts_version) is measured again, not reused; today's is reused."""
    import shutil

    import ptqlab.suite

    base, out, _ = measured
    copy = shutil.copytree(out, tmp_path / "copy")
    calls = []
    measure = ptqlab.suite.measure_sensitivity
    monkeypatch.setattr(ptqlab.suite, "measure_sensitivity", lambda *a, **k: calls.append(1) or measure(*a, **k))
    aim = Sensitivity(target_kl=1e-9, windows=2)
    sensitivity(str(base), "w4a16-rtn", copy, aim, SETTINGS, quiet=True)
    assert calls == []
    older = json.loads((copy / "sensitivity.json").read_text())
    del older["parts_version"]
    (copy / "sensitivity.json").write_text(json.dumps(older))
    sensitivity(str(base), "w4a16-rtn", copy, aim, SETTINGS, quiet=True)
    assert calls == [1] and json.loads((copy / "sensitivity.json").read_text())["parts_version"] == 2


def test_keeping_parts_at_more_bits_ranks_them_by_kl_saved_per_byte_added():
    """Kept at a wider scheme, a part adds its bytes at that scheme less at the recipe's (not its 16-bit bytes) and
    keeps a share of its KL: the ranking and the prediction follow."""
    a, b = _result(0, "attention", 0.03, 10), _result(0, "mlp", 0.02, 40)  # 16-bit: a first (3e-3 vs 5e-4 per byte)
    results, uniform = [a, b], 0.1  # the parts' KLs sum to 0.05
    at_four_bits = {"attention": 9, "mlp": 2}.__getitem__  # at 4 bits: b first (1e-2 vs 3.3e-3 per byte)
    four_bits = dict(extra_bytes=lambda part: at_four_bits(part.kind), retained=1 / 16)
    assert predicted_kl(results, uniform, [b.part], 1 / 16) == pytest.approx(0.1 * (0.03 + 0.02 / 16) / 0.05)
    assert choose_kept(results, uniform, 1000, target_kl=0.07) == [a.part]  # 0.04 once a is 16-bit
    assert choose_kept(results, uniform, 1000, target_kl=0.07, **four_bits) == [b.part]  # 0.0625 once b is 4-bit
    assert choose_kept(results, uniform, 1000, max_bytes=1011) == [a.part]  # b's 40 bytes do not fit
    assert choose_kept(results, uniform, 1000, max_bytes=1011, **four_bits) == [b.part, a.part]  # 2 + 9 bytes fit


INT2_RTN = {"name": "w2-rtn", "scheme": {"weights": {"num_bits": 2, "type": "int", "symmetric": False,
                                                     "strategy": "group", "group_size": 64}}, "steps": ["rtn"]}


@pytest.fixture(scope="module")
def measured_int2(tiny_model_dir, tmp_path_factory):
    """A 2-bit recipe measured part by part, planned with its parts kept at 4 bits to a quarter of its KL."""
    base = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("sensitivity-int2")
    recipe_file, first = _measure(base, INT2_RTN, out, target_kl=1e-9)
    target = first["uniform"]["kl_mean"] / 4
    return base, out, recipe_file, target, _measure(base, INT2_RTN, out, target_kl=target)[1]


def _measure(base, recipe: dict, out, target_kl: float):
    """`recipe` written as a YAML file in `out` and measured part by part there (2 windows, parts kept at 4 bits)
    -> (the recipe file, sensitivity.json)."""
    import yaml

    recipe_file = out / f"{recipe['name']}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    sensitivity(str(base), str(recipe_file), out, Sensitivity(target_kl=target_kl, windows=2, keep_bits=4), SETTINGS,
                quiet=True)
    return recipe_file, json.loads((out / "sensitivity.json").read_text())


def test_parts_kept_at_4_bits_weigh_exactly_what_the_plan_predicts_and_lower_kl(measured_int2, tmp_path):
    from ptqlab.api import quantize
    from ptqlab.measure.sensitivity import measure_sensitivity, safetensors_bytes
    from ptqlab.schemes import QuantArgs, Scheme

    base, out, _, target, result = measured_int2
    mixed = result["mixed"]
    assert 0 < len(mixed["kept"]) < len(result["parts"]) and mixed["predicted_kl"] <= target
    recipe = get_recipe(mixed["recipe_file"])
    int4 = Scheme(QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=64))  # the recipe's, 4 bits
    assert recipe.name == "w2-rtn-mixed" and recipe.ignore == ("lm_head",)
    (override,) = recipe.overrides
    assert override.scheme == int4 and mixed["kept_as"] == f"at {int4.describe()}"
    kept = [p for p in result["parts"] if p["name"] in mixed["kept"]]
    assert set(override.targets) == {f"re:model\\.layers\\.{p['layer']}\\.({'|'.join(p['children'])})\\." for p in kept}

    folder = quantize(str(base), recipe, out=tmp_path / "mixed", quiet=True, device="cpu")
    blocks = {f"model.layers.{p['layer']}.{'self_attn' if p['kind'] == 'attention' else 'mlp'}." for p in kept}
    for name, bits in _quantized_schemes(folder):  # the kept parts' linears at 4 bits, every other at 2
        assert bits == (4 if any(name.startswith(block) for block in blocks) else 2), name
    assert sum(safetensors_bytes(folder).values()) == mixed["predicted_weights_bytes"]  # exactly: bytes are counted
    again = measure_sensitivity(base, folder, SETTINGS, windows=2, quiet=True)
    assert again["uniform"]["kl_mean"] < 0.5 * result["uniform"]["kl_mean"]


def _quantized_schemes(folder):
    """(linear, bits) of every quantized linear, as ptqlab's runtime resolves the checkpoint's config groups."""
    from ptqlab.measure.sensitivity import safetensors_bytes
    from ptqlab.runtime.load import SchemeResolver

    resolve = SchemeResolver(json.loads((folder / "config.json").read_text())["quantization_config"])
    names = {key.rpartition(".")[0] for key in safetensors_bytes(folder) if key.endswith(".weight_packed")}
    return [(name, resolve(name).weights.num_bits) for name in sorted(names)]


@pytest.mark.parametrize("bits,message", [(2, r"--keep-bits 2: must be wider than the recipe's 2-bit weights: one of 3, 4, 8"),
                                          (16, r"--keep-bits 16: must be wider")])
def test_keep_bits_must_be_a_wider_int_grid(measured_int2, bits, message, tmp_path):
    from ptqlab.measure.sensitivity import plan_mixed
    from ptqlab.recipes import parse_recipe

    base, _, recipe_file, target, result = measured_int2
    with pytest.raises(PtqlabError, match=message):
        plan_mixed(result, parse_recipe(INT2_RTN), target, None, keep_bits=bits)
    with pytest.raises(PtqlabError, match=message):  # before any work: nothing quantized, no folder made
        sensitivity(str(base), str(recipe_file), tmp_path / "never", Sensitivity(target_kl=target, keep_bits=bits),
                    SETTINGS, quiet=True)
    assert not (tmp_path / "never").exists()
    fp8 = {**result, "recipe": get_recipe("fp8-dynamic").to_dict()}
    with pytest.raises(PtqlabError, match=r"--keep-bits applies to int weights; the recipe's are float8"):
        plan_mixed(fp8, get_recipe("fp8-dynamic"), target, None, keep_bits=4)


W2_SYMMETRIC = {"name": "w2-sym", "scheme": {"weights": {"num_bits": 2, "type": "int", "symmetric": True,
                                                          "strategy": "group", "group_size": 64}}, "steps": ["rtn"]}
"""A 2-bit recipe whose experts transformers reads back (symmetric: it maps no zero points into fused experts)."""


@pytest.fixture(scope="module")
def measured_moe(tiny_model_dir, tmp_path_factory):
    """A tiny Qwen3-MoE measured part by part at 2 bits, planned with its parts kept at 4 bits."""
    base = tiny_model_dir("qwen3_moe")
    out = tmp_path_factory.mktemp("sensitivity-moe")
    return base, out, _measure(base, W2_SYMMETRIC, out, target_kl=1e-9)[1]


def test_an_moe_layers_experts_are_one_measured_part_and_the_mixed_recipe_covers_them(measured_moe):
    """Each layer's experts (transformers merges them into one fused module) are one part with a finite KL and the
    shapes that price them at --keep-bits, and the written recipe's override takes them in."""
    import math

    from ptqlab.measure.sensitivity import part_results
    from ptqlab.measure.variant import resolve_runtime

    _, out, result = measured_moe
    assert result["not_measured"] == []
    assert [(p["layer"], p["kind"]) for p in result["parts"]] == [(i, k) for i in range(2) for k in ("attention", "experts")]
    experts = [p for p in result["parts"] if p["kind"] == "experts"]
    assert all(math.isfinite(p["kl_mean"]) and p["kl_mean"] > 0 for p in experts)
    assert all(len(p["linears"]) == 3 * 8 for p in experts)  # gate, up and down of each of the 8 experts
    written = get_recipe(result["mixed"]["recipe_file"])  # the target 1e-9 keeps every part, the experts too
    (override,) = written.overrides
    assert {r.part.ignore_pattern for r in part_results(result) if r.part.kind == "experts"} <= set(override.targets)
    # experts of one scheme: transformers reads them as stored, and the bench takes it on a CPU
    assert resolve_runtime("auto", torch.device("cpu"), out / "checkpoints" / "w2-sym") == ("transformers", None)


@pytest.mark.parametrize("keep_bits", [None, 4], ids=["16-bit", "4-bit"])
def test_the_mixed_recipe_of_an_moe_keeps_a_layers_experts_and_quantizes_the_others(measured_moe, keep_bits, tmp_path):
    """One layer's experts kept (16-bit, or at 4 bits): that layer's experts and no other linear change scheme, the
    routers stay 16-bit, and the checkpoint weighs what the plan prices."""
    from ptqlab.api import quantize
    from ptqlab.measure.sensitivity import kept_extra_bytes, kept_scheme, mixed_recipe, part_results, safetensors_bytes
    from ptqlab.measure.variant import resolve_runtime
    from ptqlab.recipes import parse_recipe

    base, _, result = measured_moe
    recipe = parse_recipe(W2_SYMMETRIC)
    part = next(r.part for r in part_results(result) if r.part.name == "layer 1 experts")
    scheme = None if keep_bits is None else kept_scheme(recipe.scheme, keep_bits)
    folder = quantize(str(base), mixed_recipe(recipe, [part], scheme), out=tmp_path / "mixed", quiet=True, device="cpu")
    schemes = dict(_quantized_schemes(folder))
    expert = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(8)
              for p in ("gate_proj", "up_proj", "down_proj")}
    kept = {name for name in expert if name.startswith("model.layers.1.")}
    if keep_bits is None:
        assert set(schemes) & kept == set() and expert - kept <= set(schemes)
    else:
        assert {schemes[name] for name in kept} == {4} and {schemes[name] for name in expert - kept} == {2}
    assert {bits for name, bits in schemes.items() if name not in kept} == {2}
    assert not any(name.endswith("mlp.gate") for name in schemes)  # the routers stay 16-bit
    extra = part.extra_bytes if scheme is None else kept_extra_bytes(part, recipe.scheme, scheme, result["stored_dtype"])
    assert sum(safetensors_bytes(folder).values()) == result["uniform"]["weights_bytes"] + extra
    notes = read_record(folder).notes  # transformers merges every expert on one grid: ptqlab's runtime verifies it
    assert any(note.startswith("checkpoint not read back by transformers: it does not read experts of several schemes")
               for note in notes), notes
    assert any(note.startswith("checkpoint read back by ptqlab's runtime") for note in notes), notes
    misread = "experts of several schemes in one checkpoint (int2, " + ("16-bit)" if keep_bits is None else "int4)")
    assert resolve_runtime("auto", torch.device("cpu"), folder) == ("fast", f"transformers not used: it does not read "
                                                                            f"{misread}")  # its scores: wrong experts
    with pytest.raises(PtqlabError, match=rf"transformers does not read {re.escape(misread)}; benchmark it with "
                                          r"--runtime fast or auto"):
        resolve_runtime("transformers", torch.device("cpu"), folder)


def test_an_moe_whose_experts_transformers_does_not_read_is_refused_in_one_line(tiny_model_dir, tmp_path):
    """Sensitivity measures the checkpoint as transformers reads it; it does not map INT8 experts into its fused
    ones (they would stay random), so the run stops before scoring anything."""
    with pytest.raises(PtqlabError, match=r"^sensitivity measures the checkpoint as transformers reads it, and "
                                          r"transformers does not read int-quantized experts: choose a recipe"):
        sensitivity(str(tiny_model_dir("qwen3_moe")), "w8a8-rtn", tmp_path / "out", Sensitivity(target_kl=0.01),
                    SETTINGS, quiet=True)
    assert not (tmp_path / "out" / "sensitivity.json").exists()


@pytest.mark.parametrize("arch, block, linears", [("qwen2_moe", "mlp", 3 * 8 + 3), ("mixtral", "block_sparse_moe", 3 * 8)])
def test_an_moe_experts_part_holds_its_shared_expert_and_weighs_the_checkpoints_names(arch, block, linears,
                                                                                     tiny_model_dir, tmp_path):
    """Qwen2-MoE's shared expert is in its layer's experts part; Mixtral's checkpoint names the block
    block_sparse_moe where transformers names it mlp, and the part's bytes are its tensors under either name."""
    from ptqlab.measure.sensitivity import safetensors_bytes

    base = tiny_model_dir(arch)
    sensitivity(str(base), "w4a16-rtn", tmp_path, Sensitivity(target_kl=1e-9, windows=1), SETTINGS, quiet=True)
    result = json.loads((tmp_path / "sensitivity.json").read_text())
    assert result["not_measured"] == []
    experts = [p for p in result["parts"] if p["kind"] == "experts"]
    assert [p["layer"] for p in experts] == [0, 1] and all(len(p["linears"]) == linears for p in experts)
    for folder, key in [(base, "dense_bytes"), (tmp_path / "checkpoints" / "w4a16-rtn", "quantized_bytes")]:
        sizes = safetensors_bytes(folder)
        for p in experts:
            inside = (f"model.layers.{p['layer']}.post_attention_layernorm.", f"model.layers.{p['layer']}.{block}.")
            assert p[key] == sum(size for name, size in sizes.items() if name.startswith(inside)), key


def test_llama4s_dense_and_moe_feed_forwards_are_measured(tiny_model_dir, tmp_path):
    """Llama 4 names its MLP block feed_forward, a dense MLP in layer 0 and the experts in layer 1 (tests/tiny.py);
    transformers keeps its experts as linears of their own: every one is in a measured part."""
    sensitivity(str(tiny_model_dir("llama4_text")), "w4a16-rtn", tmp_path, Sensitivity(target_kl=1e-9, windows=1),
                SETTINGS, quiet=True)
    result = json.loads((tmp_path / "sensitivity.json").read_text())
    assert result["not_measured"] == []
    assert [(p["layer"], p["kind"]) for p in result["parts"]] == [(0, "attention"), (0, "mlp"), (1, "attention"),
                                                                  (1, "experts")]
    assert all(p["kl_mean"] > 0 for p in result["parts"])
