"""The model card: every preset renders a card whose front matter the hub can parse and whose sections restate the run
record; `quantize` writes it; a bench/lab update puts results.json's numbers into the marked section, replacing it on
the next update and leaving the user's own text alone."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from ptqlab.api import quantize
from ptqlab.card import (CARD_NAME, RESULTS_END, RESULTS_START, CardFacts, facts_of, render, transformers_limits,
                         update_results)
from ptqlab.errors import PtqlabError
from ptqlab.number_formats import BY_NAME
from ptqlab.record import RunRecord, read_record
from ptqlab.recipes import PRESETS


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _ = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head)


def fake_record(recipe) -> RunRecord:
    """A run record as quantize writes it, with made-up numbers: rendering needs no quantized model."""
    formats = {s.format for s in recipe.schemes}
    calibration = {"dataset": "auto", "num_samples": 8, "max_seq_len": 64, "seed": 0} if recipe.calibrated else None
    return RunRecord(model="org/tiny-model", model_path="/nowhere", model_note=None, recipe=recipe.to_dict(),
                     format=formats.pop() if len(formats) == 1 else "mixed-precision",
                     scheme="; ".join(s.describe() for s in recipe.schemes),
                     settings={"dtype": "bfloat16", "calibration": calibration}, quantized_layers=12,
                     ignored_layers=("lm_head",), notes=(), seconds=1.0, created="2026-01-01T00:00:00+00:00",
                     versions={"ptqlab": "0"}, command=("ptqlab",),
                     verification=({"reader": "transformers", "against": "the quantized model in memory",
                                    "relative_error": 0.0012, "kl": 1e-7, "top1": 1.0},))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_renders_a_card_with_hub_front_matter_and_its_recipe(name):
    recipe = PRESETS[name]
    limits = transformers_limits(BY_NAME[s.format] for s in recipe.schemes if s.format in BY_NAME)
    text = render(CardFacts("org/tiny-model", fake_record(recipe), license="apache-2.0", transformers_limits=limits))
    meta = front_matter(text)
    assert meta["base_model"] == "org/tiny-model"
    assert meta["quantized_by"] == "ptqlab"
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers"
    assert {"ptqlab", "compressed-tensors", name} <= set(meta["tags"])
    steps = {step if isinstance(step, str) else next(iter(step)) for step in recipe.to_dict()["steps"]}
    assert steps <= set(meta["tags"])  # gptq, awq, smoothquant, rtn: what the hub is searched by
    recipe_yaml = text.split("## Recipe\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_yaml) == recipe.to_dict()
    assert 'LLM("path/to/this/folder")' in text and "AutoModelForCausalLM.from_pretrained" in text
    assert "`lm_head`" in text.split("## Kept 16-bit", 1)[1]
    assert ("num_samples: 8" in text) == recipe.calibrated
    assert text.count(RESULTS_START) == text.count(RESULTS_END) == 1


def test_fp4_cards_say_what_transformers_cannot_compute_and_how_to_load_anyway():
    fp4 = [name for name, r in PRESETS.items() if any(BY_NAME[s.format].dequantize_at_load for s in r.schemes)]
    assert "nvfp4" in fp4
    for name in PRESETS:
        recipe = PRESETS[name]
        limits = transformers_limits(BY_NAME[s.format] for s in recipe.schemes)
        text = render(CardFacts("m", fake_record(recipe), transformers_limits=limits))
        loading = text.split("## Loading", 1)[1].split("## Results", 1)[0]
        assert ("float32" in loading and "CompressedTensorsConfig(dequantize=True)" in loading) == (name in fp4), name


def test_a_card_without_a_known_license_omits_it():
    assert "license" not in front_matter(render(CardFacts("m", fake_record(PRESETS["fp8-dynamic"]))))


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """Real quantize runs on a tiny Llama whose folder states a license: FP8 and NVFP4 (both data-free, fast)."""
    src = tiny_model_dir("llama", torch.bfloat16)
    (src / CARD_NAME).write_text("---\nlicense: mit\n---\n# tiny\n")
    out = tmp_path_factory.mktemp("card")
    return {recipe: quantize(str(src), recipe, out=out / recipe, quiet=True) for recipe in ("fp8-dynamic", "nvfp4a16")}


def test_quantize_writes_a_card_that_restates_the_run_record(checkpoints):
    folder = checkpoints["fp8-dynamic"]
    record = read_record(folder)
    text = (folder / CARD_NAME).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == Path(record.model).name  # a local folder: its name, not this machine's path
    assert meta["license"] == "mit"  # copied from the source's own README front matter
    assert "fp8-dynamic" in meta["tags"]
    assert yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0]) == record.recipe
    assert record.verification, "the tiny run is read back"
    for check in record.verification:
        assert f"| {check['reader']} | {check['against']} | {check['relative_error']:.2%} |" in text
    for name in record.ignored_layers:
        assert f"- `{name}`" in text


def test_an_nvfp4_checkpoint_card_and_run_say_transformers_needs_dequantize(checkpoints, tiny_model_dir, tmp_path,
                                                                           capsys):
    text = (checkpoints["nvfp4a16"] / CARD_NAME).read_text()
    assert "NVFP4: transformers computes it only dequantized at load" in text
    assert "CompressedTensorsConfig(dequantize=True)" in text
    assert "NVFP4: transformers computes" not in (checkpoints["fp8-dynamic"] / CARD_NAME).read_text()
    quantize(str(tiny_model_dir("llama", torch.bfloat16)), "nvfp4a16", out=tmp_path / "said")
    said = capsys.readouterr()
    assert "transformers computes it only dequantized at load" in " ".join((said.out + said.err).split())


def bench_results(folder, ppl: float, kl: float) -> dict:
    """results.json's content as report.py writes it, reduced to what a card reads."""
    def variant(name, path, ppl, kl):
        return {"name": name, "path": str(path), "format": "f", "perplexity": {"value": ppl},
                "kl": kl and {"mean": kl, "top1_agreement_pct": 97.5},
                "size": {"weights_bytes": 3 * 2**20, "folder_bytes": 4 * 2**20},
                "speed": {"runtime": "fast", "ttft_ms": 1.5, "decode_tok_s": 123.25, "throughput_tok_s": 456.5,
                          "batch_size": 8},
                "tasks": {"arc_easy": {"acc_norm": 0.5 if kl else 0.625}}}
    return {"device": "cpu", "created": "now", "settings": {"protocol": "p"}, "baseline": "baseline",
            "variants": [variant("baseline", folder.parent / "nowhere", 10.0, None), variant(folder.name, folder, ppl, kl)]}


def section(text: str) -> str:
    return text.split(RESULTS_START, 1)[1].split(RESULTS_END, 1)[0]


def test_a_bench_update_puts_results_json_numbers_in_the_card_and_keeps_the_users_text(checkpoints):
    folder = checkpoints["fp8-dynamic"]
    card = folder / CARD_NAME
    card.write_text(card.read_text().replace("## Recipe", "My own words about this model.\n\n## Recipe")
                    + "\nA footer of mine.\n")
    results = json.loads(json.dumps(bench_results(folder, 10.5, 0.0123)))  # as read back from results.json
    assert update_results(results) == [card]
    text = card.read_text()
    inside = section(text)
    assert "| baseline | 10.0000 |" in inside and f"| {folder.name} | 10.5000 | 0.012300 | 97.50 |" in inside
    assert "| arc_easy | acc_norm | 0.5000 | 0.6250 | 80.0 |" in inside  # 0.5 / 0.625
    assert "123.25" in inside and "456.50 (batch 8)" in inside
    assert "My own words about this model." in text and text.endswith("A footer of mine.\n")

    update_results(bench_results(folder, 11.0, 0.02))  # a second measurement replaces the first
    text = card.read_text()
    assert text.count(RESULTS_START) == text.count(RESULTS_END) == 1
    assert "10.5000" not in text and f"| {folder.name} | 11.0000 | 0.020000 |" in section(text)
    assert "My own words about this model." in text and text.endswith("A footer of mine.\n")


def test_an_update_skips_what_is_not_a_ptqlab_checkpoint(tmp_path):
    (tmp_path / "plain").mkdir()
    assert update_results(bench_results(tmp_path / "plain", 10.5, 0.01)) == []
    assert not (tmp_path / "plain" / CARD_NAME).exists()


def test_a_card_for_a_folder_without_a_run_record_is_refused_in_one_line(tmp_path):
    with pytest.raises(PtqlabError, match=r"no run record \(ptqlab.json\).*run `ptqlab quantize`") as e:
        facts_of(tmp_path)
    assert "\n" not in str(e.value)


def test_a_card_that_cannot_be_written_is_said_and_does_not_fail_the_bench(checkpoints, capsys, monkeypatch):
    folder = checkpoints["fp8-dynamic"]

    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("ptqlab.card.write_atomically", refuse)
    assert update_results(bench_results(folder, 10.5, 0.01)) == []
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert "not updated (Permission denied); the results are in results.json" in said


def test_a_damaged_run_record_leaves_the_card_alone_and_the_bench_standing(tmp_path, capsys):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "ptqlab.json").write_text("{not json")
    assert update_results(bench_results(tmp_path / "q", 10.5, 0.01)) == []
    captured = capsys.readouterr()
    assert "ptqlab.json is damaged" in " ".join((captured.out + captured.err).split())
    assert not (tmp_path / "q" / CARD_NAME).exists()
