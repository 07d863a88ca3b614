"""Deployment paths: every preset has an engine path per GPU generation (number_formats' rows), `ptqlab recipes`
prints them, and a lab's report shows them per variant, read from each checkpoint's own quantization_config."""

import json

import pytest
from typer.testing import CliRunner

from ptqlab.cli import app
from ptqlab.formats.quantized_layouts import deployments
from ptqlab.number_formats import FORMATS, GPU_GENERATIONS
from ptqlab.recipes import PRESETS
from ptqlab.schemes import FP8_DYNAMIC, QuantArgs, Scheme

runner = CliRunner()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_a_deployment_path_on_every_gpu_generation(name):
    deployment = PRESETS[name].scheme.deployment
    assert deployment is not None, f"{name}: no number_formats row records how it is served"
    assert len(deployment.paths) == len(GPU_GENERATIONS) and all(p.strip() for p in deployment.paths)
    assert deployment.source.strip(), "each row names the engine version it was read from"


def test_each_family_names_a_preset_it_covers_and_no_two_rows_of_a_format_overlap():
    for fmt in FORMATS:
        for d in fmt.deployments:
            covered = [n for n, r in PRESETS.items() if r.scheme.deployment is d]
            assert covered, f"{fmt.name}: {d.family!r} covers no preset"
            assert any(n in d.family for n in covered), f"{d.family!r} does not name the presets it covers: {covered}"
    for r in PRESETS.values():  # the first row that covers a scheme is the only one
        fmt, acts = r.scheme.number_format, r.scheme.input_activations
        kind = None if acts is None else f"{'fp' if acts.type == 'float' else 'int'}{acts.num_bits}"
        assert sum(d.covers(r.scheme.weights, kind) for d in fmt.deployments) == 1, r.name


def test_the_paths_say_what_the_issue_says_of_each_generation():
    by_gen = {name: dict(zip(GPU_GENERATIONS, PRESETS[name].scheme.deployment.paths)) for name in PRESETS}
    ampere, ada, hopper, blackwell = GPU_GENERATIONS
    assert "Marlin" in by_gen["w4a16"][ampere] and "Machete" in by_gen["w4a16"][hopper]
    assert "FP8" in by_gen["fp8-dynamic"][ampere] and "weight-only" in by_gen["fp8-dynamic"][ampere]
    assert all("CUTLASS FP8" in by_gen["fp8-dynamic"][g] for g in (ada, hopper, blackwell))
    assert "int8" in by_gen["w8a8"][hopper] and "no vLLM kernel" in by_gen["w8a8"][blackwell]
    assert "FP4" in by_gen["nvfp4"][blackwell] and all("weight-only" in by_gen["nvfp4"][g] for g in (ampere, ada, hopper))
    assert all("llama.cpp" in by_gen["w2a16"][g] for g in GPU_GENERATIONS)


def test_a_custom_scheme_outside_the_families_has_no_path_rather_than_a_wrong_one():
    fp8_grouped = Scheme(weights=QuantArgs(num_bits=8, type="float", strategy="group", group_size=128),
                         input_activations=FP8_DYNAMIC.input_activations)
    assert fp8_grouped.deployment is None


def test_recipes_prints_each_presets_path_per_generation():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.strip().splitlines()
    assert header.split("\t")[-len(GPU_GENERATIONS):] == list(GPU_GENERATIONS)
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert set(rows) == set(PRESETS)
    for name, row in rows.items():
        assert tuple(row[-len(GPU_GENERATIONS):]) == PRESETS[name].scheme.deployment.paths


def test_one_recipe_as_yaml_carries_its_paths_as_comments_and_still_loads(tmp_path):
    import yaml

    from ptqlab.recipes import load_recipe_file

    result = runner.invoke(app, ["recipes", "w8a8"])
    assert result.exit_code == 0, result.output
    for gpu, path in zip(GPU_GENERATIONS, PRESETS["w8a8"].scheme.deployment.paths):
        assert f"#   {gpu}: {path}" in result.output
    (tmp_path / "w8a8.yaml").write_text(result.output)
    assert yaml.safe_load(result.output)["name"] == "w8a8"
    assert load_recipe_file(tmp_path / "w8a8.yaml").scheme == PRESETS["w8a8"].scheme


def quantization_config(scheme: Scheme) -> dict:
    """A quantization_config as compressed-tensors declares this scheme (one group over every Linear)."""
    group = {"targets": ["Linear"], "weights": scheme.weights.values(), "format": scheme.format,
             "input_activations": None if scheme.input_activations is None else scheme.input_activations.values()}
    return {"quant_method": "compressed-tensors", "format": scheme.format, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"]}


@pytest.mark.parametrize("name", ["w4a16", "w8a8", "fp8-dynamic", "w8a16-fp8", "nvfp4", "w4a8", "w2a16"])
def test_a_checkpoints_config_maps_to_its_presets_path(name):
    scheme = PRESETS[name].scheme
    assert deployments(quantization_config(scheme)) == [scheme.deployment.to_dict()]


def test_a_config_from_another_tool_with_unreadable_activations_claims_no_path():
    qc = quantization_config(PRESETS["w8a8"].scheme)
    qc["config_groups"]["group_0"]["input_activations"] = {"type": "int"}  # no num_bits
    assert deployments(qc) == []


def test_a_quantized_checkpoint_records_its_path_for_the_report(tmp_path, tiny_model_dir):
    from ptqlab.api import quantize
    from ptqlab.measure.variant import describe_checkpoint

    checkpoint = quantize(str(tiny_model_dir("llama")), "w4a16-rtn", out=tmp_path / "w4a16-rtn", quiet=True)
    found = describe_checkpoint(checkpoint)["deployment"]
    assert found == [PRESETS["w4a16-rtn"].scheme.deployment.to_dict()]
    assert json.loads(json.dumps(found)) == found  # results.json keeps it as written


def test_report_html_and_summary_list_the_paths_of_every_quantized_variant(tmp_path):
    from test_report import variant

    from ptqlab.measure.variant import BenchSettings
    from ptqlab.recommend import Budget
    from ptqlab.report import write_report

    w4, w8 = PRESETS["w4a16"].scheme.deployment, PRESETS["w8a8"].scheme.deployment
    variants = [variant("baseline", 256, 10.0, None), variant("w4a16", 96, 10.8, 0.05) | {"deployment": [w4.to_dict()]},
                variant("w8a8", 160, 10.1, 0.01) | {"deployment": [w8.to_dict()]}]
    write_report(tmp_path, variants, BenchSettings(device="cpu"), Budget(), "baseline")
    page, summary = (tmp_path / "report.html").read_text(), (tmp_path / "summary.md").read_text()
    assert "<h2>Deployment paths</h2>" in page and "## Deployment paths" in summary
    for name, d in (("w4a16", w4), ("w8a8", w8)):
        row = f"| {name} | {d.family} | " + " | ".join(d.paths) + " |"
        assert row in summary
        cells = "".join(f"<td>{c}</td>" for c in (name, d.family, *d.paths)).replace("'", "&#x27;")
        assert cells in page
    assert w4.source in summary and "| baseline |" not in summary.split("## Deployment paths")[1].split("##")[0]
