"""The lab end to end on a tiny model: every variant measured, the report written, and resume after a crash."""

import dataclasses
import json

import pytest

import ptqlab.benchmark
from ptqlab.measure.variant import BenchSettings
from ptqlab.errors import PtqlabError
from ptqlab.benchmark import bench
from ptqlab.card import CARD_NAME, RESULTS_END, RESULTS_START
from ptqlab.suite import lab

# Small enough for CI: 4 windows of 64 tokens, 4 generated tokens, batch 2, one repeat.
FAST = BenchSettings(ppl_text="python-docs", ppl_context=64, ppl_windows=4, max_new_tokens=4, batch_size=2, repeats=1,
                     sample_tokens=4, device="cpu")


def events(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_lab(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("lab")
    lab(str(tiny_model_dir("llama")), ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn"], out, FAST, quiet=True)
    return out


def test_lab_measures_every_variant(finished_lab):
    results = json.loads((finished_lab / "results.json").read_text())
    assert results["schema"] == "ptqlab.results/1"
    assert [v["name"] for v in results["variants"]] == ["baseline", "fp8-dynamic", "w4a16-rtn", "w8a8-rtn"]
    assert {"device", "versions", "seed", "settings", "text", "recommendation"} <= set(results)
    assert results["settings"]["protocol"] == "gptq, quick probe: first 4 windows"
    assert results["text"]["name"] == "python-docs" and "PSF" in results["text"]["source"]
    base, *quantized = results["variants"]
    assert base["kl"] is None and base["format"] == "dense"
    for v in quantized:
        assert v["kl"]["mean"] > 0 and 0 <= v["kl"]["top1_agreement_pct"] <= 100 and v["kl"]["positions"] == 4 * 63
        assert v["size"]["weights_bytes"] < base["size"]["weights_bytes"]
        assert v["perplexity"]["tokens_scored"] == 4 * 63
    for v in results["variants"]:
        assert v["load_s"] > 0 and v["peak_memory_bytes"] > 0 and v["memory_kind"] == "cpu_max_rss"
        assert v["speed"]["decode_tok_s"] > 0 and v["speed"]["throughput_tok_s"] > 0 and v["speed"]["ttft_ms"] > 0
        assert len(v["samples"]) == 4 and v["runtime"] == "transformers"
    assert (finished_lab / "variants" / "w8a8-rtn.json").is_file()
    assert (finished_lab / "checkpoints" / "w4a16-rtn" / "ptqlab.json").is_file()


def test_lab_puts_its_numbers_in_each_checkpoints_card(finished_lab):
    results = json.loads((finished_lab / "results.json").read_text())
    for v in results["variants"][1:]:
        card = (finished_lab / "checkpoints" / v["name"] / CARD_NAME).read_text()
        inside = card.split(RESULTS_START, 1)[1].split(RESULTS_END, 1)[0]
        assert f"| {v['name']} | {v['perplexity']['value']:.4f} | {v['kl']['mean']:.6f} | " in inside
        assert f"| baseline | {results['variants'][0]['perplexity']['value']:.4f} |" in inside


def test_report_files_render_offline(finished_lab):
    summary = (finished_lab / "summary.md").read_text()
    assert "| variant | format | weights MiB |" in summary and "## Recommendation" in summary
    assert "Smallest within the quality budget" in summary
    page = (finished_lab / "report.html").read_text()
    assert page.count("<svg") == 4 and "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_rerun_reuses_everything(finished_lab, tiny_model_dir):
    before = len(events(finished_lab))
    lab(str(tiny_model_dir("llama")), ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn"], finished_lab, FAST, quiet=True)
    new = [e["event"] for e in events(finished_lab)[before:]]
    assert new.count("quantize.reused") == 3 and new.count("bench.reused") == 4
    assert "bench.start" not in new and "quantize.start" not in new


def test_crash_in_the_third_recipe_does_not_redo_the_first_two(tmp_path, tiny_model_dir, monkeypatch):
    real = ptqlab.benchmark.run_isolated

    def crash_on_w8a8(name, *args, **kwargs):
        if name == "w8a8-rtn":
            raise PtqlabError("simulated crash")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ptqlab.benchmark, "run_isolated", crash_on_w8a8)
    with pytest.raises(PtqlabError, match="simulated crash"):
        lab(str(tiny_model_dir("llama")), ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn"], tmp_path, FAST, quiet=True)
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(ptqlab.benchmark, "run_isolated", real)
    before = len(events(tmp_path))
    lab(str(tiny_model_dir("llama")), ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn"], tmp_path, FAST, quiet=True)
    new = events(tmp_path)[before:]
    assert [e["variant"] for e in new if e["event"] == "bench.start"] == ["w8a8-rtn"]
    assert (tmp_path / "results.json").is_file()


@pytest.mark.slow  # a minute each on two cores: make test-all (the crash-in-the-third-recipe test keeps reuse in the default suite)
def test_changed_settings_are_measured_again(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    lab(model, ["fp8-dynamic"], tmp_path, FAST, quiet=True)
    before = len(events(tmp_path))
    lab(model, ["fp8-dynamic"], tmp_path, BenchSettings(**{**FAST.__dict__, "ppl_windows": 3}), quiet=True)
    assert [e["variant"] for e in events(tmp_path)[before:] if e["event"] == "bench.start"] == ["baseline", "fp8-dynamic"]


@pytest.mark.slow  # a minute each on two cores: make test-all (the crash-in-the-third-recipe test keeps reuse in the default suite)
def test_a_rewritten_checkpoint_is_measured_again(tiny_model_dir, tmp_path):
    from ptqlab import quantize

    model = str(tiny_model_dir("llama"))
    lab(model, ["w8a8-rtn"], tmp_path, FAST, quiet=True)
    quantize(model, "w8a8-rtn", out=tmp_path / "checkpoints" / "w8a8-rtn", overwrite=True, quiet=True)
    before = len(events(tmp_path))
    lab(model, ["w8a8-rtn"], tmp_path, FAST, quiet=True)
    assert [e["variant"] for e in events(tmp_path)[before:] if e["event"] == "bench.start"] == ["w8a8-rtn"]


def test_lab_of_another_model_in_the_same_folder_is_refused(finished_lab, tiny_model_dir):
    with pytest.raises(PtqlabError, match="holds a lab of"):
        lab(str(tiny_model_dir("qwen2")), ["fp8-dynamic"], finished_lab, FAST, quiet=True)


def test_bench_infers_the_baseline_from_the_checkpoint_record(finished_lab, tmp_path):
    out = bench([str(finished_lab / "checkpoints" / "w8a8-rtn")], tmp_path / "b", settings=FAST, quiet=True)
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["baseline", "w8a8-rtn"]
    lab_result = json.loads((finished_lab / "variants" / "w8a8-rtn.json").read_text())
    # Same checkpoint, same settings, same tokens: the same quality numbers.
    assert results["variants"][1]["perplexity"] == lab_result["perplexity"]
    assert results["variants"][1]["kl"] == lab_result["kl"]


def test_fast_runtime_scores_the_same_and_the_report_says_which_runtime(finished_lab, tmp_path, tiny_model_dir):
    """On a CPU the fast runtime computes exactly what transformers computes (fp32, dequantized weights): the same
    perplexity and KL; every speed figure is labelled with its runtime."""
    fast = dataclasses.replace(FAST, runtime="fast")
    paths = [str(tiny_model_dir("llama"))] + [str(finished_lab / "checkpoints" / r) for r in ("w4a16-rtn", "w8a8-rtn")]
    out = bench(paths, tmp_path / "fast", settings=fast, quiet=True)
    ours = {v["name"]: v for v in json.loads((out / "results.json").read_text())["variants"]}
    ordinary = {v["name"]: v for v in json.loads((finished_lab / "results.json").read_text())["variants"]}
    for name in ("baseline", "w4a16-rtn", "w8a8-rtn"):
        assert ours[name]["runtime"] == ours[name]["speed"]["runtime"] == "fast"
        assert ours[name]["perplexity"]["value"] == pytest.approx(ordinary[name]["perplexity"]["value"], rel=1e-6)
        assert ordinary[name]["speed"]["runtime"] == "transformers"
    assert ours["w8a8-rtn"]["kl"]["mean"] == pytest.approx(ordinary["w8a8-rtn"]["kl"]["mean"], rel=1e-4, abs=1e-9)
    summary = (out / "summary.md").read_text()
    assert "| runtime |" in summary and "runtime `fast`" in summary


def test_unknown_runtime_is_refused():
    from ptqlab.measure.variant import resolve_runtime

    with pytest.raises(PtqlabError, match="unknown --runtime 'vllm'"):
        resolve_runtime("vllm", None, None)


def test_a_lab_checkpoint_of_weights_since_replaced_is_made_again(tiny_model_dir, tmp_path):
    """The model's weights replaced at the same path (same config): the checkpoint the lab made from the old ones
    is made again, not reused (the fingerprint a resumed quantize run checks: the model files' sizes and times)."""
    import shutil

    from ptqlab.api import model_files_stamp
    from ptqlab.benchmark import Steps
    from ptqlab.options import RunOptions
    from ptqlab.recipes import get_recipe
    from ptqlab.suite import _quantized

    model, out = tmp_path / "model", tmp_path / "lab"
    shutil.copytree(tiny_model_dir("llama"), model)
    out.mkdir()
    recipe, options = get_recipe("fp8-dynamic"), RunOptions(quiet=True, device="cpu")
    for _ in range(2):
        _quantized(model, recipe, out, options, Steps(1, quiet=True))
    shutil.copy(tiny_model_dir("llama", seed=1) / "model.safetensors", model / "model.safetensors")
    _quantized(model, recipe, out, options, Steps(1, quiet=True))
    assert [e["event"] for e in events(out) if e["event"] != "quantize.done"] == [
        "quantize.start", "quantize.reused", "quantize.start"]
    record = json.loads((out / "checkpoints" / "fp8-dynamic" / "ptqlab.json").read_text())
    assert record["request"]["weights"] == model_files_stamp(model)
