"""Inputs that printed a Python or rich traceback get one line naming the problem and the fix (issue 37's sweep).

Each case runs the command through the CLI and asserts: exit status 2, exactly one non-empty output line, it starts
with "error:", it holds the case's key phrase, no traceback, nothing written. The table of cases, with what each did
before, is tests/BAD_INPUT.md's last section.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ptqlab.cli import app

DATA_FREE = ["--recipe", "w8a8-rtn", "--device", "cpu"]
CALIBRATED = ["--recipe", "w4a16", "--num-samples", "4", "--max-seq-len", "16", "--calib-batch-size", "2",
              "--device", "cpu"]


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line(code: int, output: str, phrase: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert phrase in lines[0], output
    assert "Traceback" not in output


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if quantize loads the model: these inputs are refused before."""
    import ptqlab.api

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ptqlab.api, "load_checked", refuse)


def _hub_model(folder, config):
    """A tiny random model of a transformers config class, saved as a hub folder (config + safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# 1. architectures the memory plan cannot count


@pytest.mark.parametrize("plan", [False, True], ids=["quantize", "plan"])
def test_gpt2_is_not_supported_in_one_line(plan, tmp_path, no_loading):
    from transformers import GPT2Config

    model = _hub_model(tmp_path / "gpt2", GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=384, n_positions=64))
    code, output = run("quantize", model, *DATA_FREE, *(["--plan"] if plan else []), "--out", tmp_path / "out")
    assert_one_line(code, output, "'gpt2' models are not supported: their decoder layers hold no torch Linear layers "
                                  "(they hold Conv1D")
    assert not (tmp_path / "out").exists()


def test_opt_is_planned_without_intermediate_size(tmp_path):
    """OPT's config names its MLP width ffn_dim: the plan counts the model transformers builds, not config keys."""
    from transformers import OPTConfig

    config = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128, vocab_size=384,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    model = _hub_model(tmp_path / "opt", config)
    assert "intermediate_size" not in json.loads((model / "config.json").read_text())
    for recipe in (DATA_FREE, CALIBRATED):
        result = CliRunner().invoke(app, ["quantize", str(model), *recipe, "--plan"])
        assert result.exit_code == 0 and result.output.startswith("memory plan: peak CPU"), result.output


# 2-4. option values


@pytest.mark.parametrize("gpus", ["0", "-1"])
def test_gpus_below_one_is_one_line(gpus, tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), *DATA_FREE, "--gpus", gpus, "--out", tmp_path / "out")
    assert_one_line(code, output, f"--gpus {gpus}: must be at least 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--max-cpu-memory", "--max-gpu-memory"])
def test_a_size_past_any_float_is_one_line(option, tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), *DATA_FREE, option, "1e400", "--out", tmp_path / "out")
    assert_one_line(code, output, f"{option} '1e400': larger than any machine's memory or disk")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,phrase", [
    ("--calib-batch-size", "0", "--calib-batch-size 0: must be at least 1"),
    ("--num-samples", "-5", "--num-samples -5: must be at least 1"),
    ("--max-seq-len", "1", "--max-seq-len 1: must be at least 2"),
])
def test_plan_refuses_calibration_sizes_quantize_refuses(option, value, phrase, tiny_model_dir):
    code, output = run("quantize", tiny_model_dir("llama"), *CALIBRATED, "--plan", option, value)
    assert_one_line(code, output, phrase)


def test_a_gpu_budget_that_cannot_be_read_is_refused_on_a_cpu_run(tiny_model_dir, tmp_path, no_loading):
    code, output = run("quantize", tiny_model_dir("llama"), *DATA_FREE, "--max-gpu-memory", "abc",
                       "--out", tmp_path / "out")
    assert_one_line(code, output, "--max-gpu-memory 'abc': give a size such as 24GiB")
    assert not (tmp_path / "out").exists()


# 5-6, 10. model folders


@pytest.mark.parametrize("plan", [False, True], ids=["quantize", "plan"])
def test_more_experts_per_token_than_experts_is_refused_before_loading(plan, tiny_model_dir, tmp_path, no_loading):
    model = tmp_path / "moe"
    shutil.copytree(tiny_model_dir("qwen3_moe"), model)
    config = json.loads((model / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_local_experts"] + 1
    (model / "config.json").write_text(json.dumps(config))
    code, output = run("quantize", model, *DATA_FREE, *(["--plan"] if plan else []), "--out", tmp_path / "out")
    assert_one_line(code, output, f"routes each token to {config['num_local_experts'] + 1} experts "
                                  f"(num_experts_per_tok) of the {config['num_local_experts']} each layer has "
                                  "(num_local_experts): num_experts_per_tok must be 1 to")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "loaded"])
def test_an_index_that_puts_a_tensor_in_the_wrong_shard_is_one_line(stream, tiny_model_dir, tmp_path, no_loading):
    model = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir("llama"), model)
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, held in shards.items():
        save_file({name: tensors[name] for name in held}, model / shard, metadata={"format": "pt"})
    weight_map = {name: shard for shard, held in shards.items() for name in held}
    moved = names[0]
    weight_map[moved] = "model-00002-of-00002.safetensors"  # it is in the first shard
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, output = run("quantize", model, *DATA_FREE, *(["--stream"] if stream else []), "--out", tmp_path / "out")
    assert_one_line(code, output, f"puts {moved} in model-00002-of-00002.safetensors, which does not hold it")
    assert not (tmp_path / "out").exists()


def test_a_folder_with_only_a_pickle_is_refused_without_unpickling(tiny_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "pickled"
    model.mkdir()
    source = tiny_model_dir("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, model / name)
    torch.save(load_file(source / "model.safetensors"), model / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for plan in ([], ["--plan"]):
        code, output = run("quantize", model, *DATA_FREE, *plan, "--out", tmp_path / "out")
        assert_one_line(code, output, "holds its weights only as a PyTorch pickle (pytorch_model.bin), which ptqlab "
                                      "does not load")
    assert not (tmp_path / "out").exists()


# 7-8. bench


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint") / "q"
    code, output = run("quantize", tiny_model_dir("llama"), *DATA_FREE, "--out", out, "--quiet")
    assert code == 0, output
    return out


def test_bench_refuses_a_format_compressed_tensors_does_not_know(checkpoint, tmp_path):
    bad = tmp_path / "bad-format"
    shutil.copytree(checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "frob-quantized"
    (bad / "config.json").write_text(json.dumps(config))
    code, output = run("bench", bad, "--out", tmp_path / "bench", "--device", "cpu", "--quiet")
    assert_one_line(code, output, "quantization_config.config_groups.group_0.format is 'frob-quantized', a format "
                                  "compressed-tensors does not know (it knows dense, ")
    assert not (tmp_path / "bench" / "results.json").exists()


@pytest.mark.parametrize("command", ["bench", "sensitivity"])
def test_a_binary_ppl_text_is_one_line_before_any_work(command, tiny_model_dir, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    code, output = run(command, tiny_model_dir("llama"), "--out", tmp_path / "out", "--device", "cpu", "--quiet",
                       "--ppl-text", binary)
    assert_one_line(code, output, f"--ppl-text {str(binary)!r}: not UTF-8 text (byte 0x89 at offset 0)")
    assert not (tmp_path / "out").exists()


# 9. rich markup in paths


def test_square_brackets_in_out_are_printed_as_they_are(tiny_model_dir, tmp_path):
    out = tmp_path / "runs" / "a[" / "]b"
    code, output = run("quantize", tiny_model_dir("llama"), *DATA_FREE, "--out", out, "--quiet")
    assert code == 0, output
    assert "Traceback" not in output and "MarkupError" not in output
    assert f"wrote {out} (int-quantized" in " ".join(output.split())
    assert (out / "config.json").is_file()


def test_square_brackets_in_a_sensitivity_runs_out_are_printed_as_they_are(tiny_model_dir, tmp_path):
    """The lines the sensitivity run prints with the --out path in them (the mixed recipe it wrote, the summary)
    show it verbatim."""
    out = tmp_path / "runs" / "a[" / "]b"
    code, output = run("sensitivity", tiny_model_dir("llama"), "--recipe", "w4a16-rtn", "--out", out, "--target-kl",
                       "1e-9", "--windows", "1", "--ppl-text", "python-docs", "--ppl-context", "64", "--device", "cpu")
    assert code == 0, output
    assert "Traceback" not in output and "MarkupError" not in output
    text = " ".join(output.split())
    assert f"w4a16-rtn-mixed: 4 parts kept 16-bit (predicted KL 0.0000): {out / 'w4a16-rtn-mixed.yaml'}" in text
    assert f"mixed recipe: {out / 'w4a16-rtn-mixed.yaml'}: 4 parts kept 16-bit" in text


# values accepted silently before


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_a_target_kl_that_is_not_positive_is_one_line(value, tiny_model_dir, tmp_path):
    code, output = run("sensitivity", tiny_model_dir("llama"), "--target-kl", value, "--out", tmp_path / "out",
                       "--device", "cpu")
    assert_one_line(code, output, f"--target-kl {float(value)}: must be a positive number of nats per token")
    assert not (tmp_path / "out").exists()


def test_lab_with_no_recipe_named_is_one_line(tiny_model_dir, tmp_path):
    code, output = run("lab", tiny_model_dir("llama"), "--recipes", " , ", "--out", tmp_path / "out", "--device", "cpu")
    assert_one_line(code, output, "--recipes ' , ' names no recipe")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU")
def test_gpus_on_a_machine_without_a_gpu_needs_device_cpu(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", "w8a8-rtn", "--gpus", "2",
                       "--out", tmp_path / "out")
    assert_one_line(code, output, "--gpus 2: this machine has no GPU visible to torch; add --device cpu")
    assert not (tmp_path / "out").exists()


def test_sigterm_to_a_gpus_launcher_is_one_line(tiny_model_dir, calibration_file, tmp_path):
    """`timeout`, Slurm or `docker stop` ending a run of several processes: the launcher stops its workers and says so
    in one line (it printed torch's SignalException traceback)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "out"
    command = [sys.executable, "-m", "ptqlab", "quantize", str(tiny_model_dir("llama")), "--recipe", "w4a16",
               "--dataset", str(calibration_file), "--num-samples", "40", "--max-seq-len", "256",
               "--calib-batch-size", "4", "--device", "cpu", "--gpus", "2", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "COLUMNS": "200"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    partial = tmp_path / ".out.partial"
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)  # the workers have started once rank 0 made its partial folder
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=60)
    lines = [line for line in output.splitlines() if line.strip()]
    assert launcher.returncode != 0, output
    assert "Traceback" not in output, output
    # The launcher's line last; before it, at most one line from the worker that kept the run's state (what it kept).
    assert lines[-1] == "error: stopped by SIGTERM: every worker of 2 was stopped; run the same command again to go on"
    assert len(lines) <= 2 and all(line.startswith("stopped") for line in lines[:-1]), output
    assert not out.exists()


@pytest.mark.parametrize("command", ["bench", "lab"])
@pytest.mark.parametrize("option,value,phrase", [
    ("--max-kl", "-1", "--max-kl -1.0: must be a positive number of nats per token"),
    ("--max-kl", "nan", "--max-kl nan: must be a positive number of nats per token"),
    ("--max-ppl-increase", "-5", "--max-ppl-increase -5.0: must be a percentage of at least 0"),
])
def test_a_quality_budget_that_no_variant_can_meet_is_one_line(command, option, value, phrase, tiny_model_dir, tmp_path):
    code, output = run(command, tiny_model_dir("llama"), option, value, "--out", tmp_path / "out", "--device", "cpu")
    assert_one_line(code, output, phrase)
    assert not (tmp_path / "out").exists()


def quantize_with_override(model, tmp_path, target: str):
    """`quantize` of a W4A16 recipe whose override takes the linears `target` names to W8A16 -> (exit code, output)."""
    import yaml

    recipe = tmp_path / "override.yaml"
    recipe.write_text(yaml.safe_dump({"name": "override", "scheme": "W4A16", "steps": ["rtn"],
                                      "overrides": [{"targets": [target], "scheme": "W8A16"}]}))
    return run("quantize", model, "--recipe", recipe, "--device", "cpu", "--quiet", "--out", tmp_path / "out")


def test_an_override_that_splits_q_k_v_between_schemes_is_noted(tiny_model_dir, tmp_path):
    """vLLM loads q/k/v (and gate/up) as one fused linear of one scheme: an override that takes only some of them
    makes a checkpoint vLLM cannot load, said in the run's notes."""
    code, output = quantize_with_override(tiny_model_dir("llama"), tmp_path, "re:.*self_attn\\.q_proj$")
    assert code == 0, output
    text = " ".join(output.split())
    assert ("note: overrides split 2 groups of linears that vLLM fuses into one between schemes (e.g. "
            "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj)") in text


def test_an_override_of_whole_groups_is_not_noted(tiny_model_dir, tmp_path):
    code, output = quantize_with_override(tiny_model_dir("llama"), tmp_path, "re:.*self_attn\\.[qkv]_proj$")
    assert code == 0, output
    assert "vLLM fuses" not in output


@pytest.mark.parametrize("command", ["bench", "sensitivity"])
def test_a_ppl_context_past_the_models_positions_is_clamped_with_one_note(command, tiny_model_dir, tmp_path):
    """Past its trained positions a model scores its position encoding's extrapolation, not the quantization: the
    windows are cut to the model's positions, and one line says so (once, not once per variant)."""
    model = tiny_model_dir("llama", max_position_embeddings=32)
    common = ["--out", tmp_path / "out", "--device", "cpu", "--ppl-text", "python-docs", "--ppl-context", "64"]
    extra = (["--ppl-quick", "--max-new-tokens", "2", "--repeats", "1", "--sample-tokens", "2", "--batch-sizes", "1",
              "--batch-size", "1"] if command == "bench" else ["--recipe", "w4a16-rtn", "--windows", "1"])
    code, output = run(command, model, *common, *extra)
    assert code == 0, output
    note = "note: --ppl-context 64 is past the model's 32 positions (max_position_embeddings): scored in windows of 32 tokens"
    assert [line for line in output.splitlines() if "--ppl-context 64" in line] == [
        note + "; give --ppl-context 32 or less"], output
    if command == "bench":
        result = json.loads((tmp_path / "out" / "variants" / "baseline.json").read_text())
        assert result["perplexity"]["context"] == 32
    else:
        assert json.loads((tmp_path / "out" / "sensitivity.json").read_text())["context"] == 32


@pytest.mark.parametrize("size", ["1b", "1MiB"])
def test_a_max_size_below_the_uniform_checkpoint_is_one_line_naming_the_smallest(size, tiny_model_dir, tmp_path):
    """Keeping parts wider only adds bytes: a budget below the recipe's uniform checkpoint has no mixed recipe, and
    the line names the smallest size there is (which --max-size then accepts), before any part is measured."""
    from ptqlab.measure.sensitivity import safetensors_bytes

    model = tiny_model_dir("llama")
    common = ["--recipe", "w4a16-rtn", "--out", tmp_path / "out", "--device", "cpu", "--ppl-text", "python-docs",
              "--ppl-context", "64", "--windows", "1", "--quiet"]
    code, output = run("sensitivity", model, "--max-size", size, *common)
    smallest = sum(safetensors_bytes(tmp_path / "out" / "checkpoints" / "w4a16-rtn").values())
    assert smallest > 2**20  # both sizes are below it
    assert_one_line(code, output, f"is below the smallest checkpoint w4a16-rtn makes of this model: {smallest:,} bytes")
    assert not (tmp_path / "out" / "sensitivity.json").exists()  # refused before measuring
    fix = output.split("give --max-size ")[1].split()[0]
    code, output = run("sensitivity", model, "--max-size", fix, *common)
    assert code == 0 and "mixed recipe:" in output, output
