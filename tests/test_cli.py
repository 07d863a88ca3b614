"""The command line: options map onto the recipe, bad input gets one clear line, output folders are atomic."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ptqlab.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def on_one_line(output: str, *fragments: str) -> bool:
    """Output that is not a terminal is never hard-wrapped: every message is one line that a script can grep."""
    return any(all(f in line for f in fragments) for line in output.splitlines())


def test_quantize_writes_a_complete_checkpoint(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", "w8a8-rtn", "--out", tmp_path / "q", "--quiet")
    assert code == 0, output
    assert "14 layers quantized" in output
    assert {"config.json", "model.safetensors", "ptqlab.json", "tokenizer.json", "README.md"} <= {p.name for p in (tmp_path / "q").iterdir()}


def test_recipes_lists_the_presets():
    code, output = run("recipes")
    assert code == 0
    for name in ("fp8-dynamic", "w4a16", "w4a16-awq", "w8a8", "w8a8-fp8", "w4a16-rtn", "w8a8-rtn"):
        assert name in output
    assert "smoothquant" in output and "awq" in output


def test_a_recipe_printed_as_yaml_runs_from_a_file(tiny_model_dir, tmp_path, calibration_file):
    import yaml

    code, output = run("recipes", "w8a8")
    assert code == 0 and "smoothing_strength: 0.8" in output
    doc = yaml.safe_load(output)
    doc["name"], doc["steps"][0]["smoothquant"]["smoothing_strength"] = "mine", 0.5
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(doc))
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", tmp_path / "mine.yaml", "--out", tmp_path / "q",
                       "--dataset", calibration_file, "--num-samples", "8", "--max-seq-len", "32", "--device", "cpu", "--quiet")
    assert code == 0, output
    record = json.loads((tmp_path / "q" / "ptqlab.json").read_text())
    assert record["recipe"]["name"] == "mine" and record["recipe"]["steps"][0] == {"smoothquant": {"smoothing_strength": 0.5, "mappings": "norms"}}
    (tmp_path / "bad.yaml").write_text("name: bad\nscheme: W8A8\nsteps: [{smoothquant: {alpha: 1}}, gptq]\n")
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", tmp_path / "bad.yaml", "--out", tmp_path / "q2")
    assert code == 2 and on_one_line(output, "unknown key 'alpha'; allowed: smoothing_strength")


def test_gptq_options_on_a_recipe_without_gptq_are_refused(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", "w4a16-awq", "--act-order", "--out", tmp_path / "q")
    assert code == 2 and on_one_line(output, "--act-order applies to GPTQ recipes")


@pytest.mark.parametrize("args,message", [
    (["--recipe", "w3a3-magic"], "unknown recipe 'w3a3-magic': choose one of fp8-dynamic"),
    (["--recipe", "fp8-dynamic", "--group-size", "64"], "--group-size applies to group-wise and block-wise recipes"),
    (["--dtype", "float8"], "unknown --dtype 'float8'"),
])
def test_bad_options_get_one_clear_line(tiny_model_dir, tmp_path, args, message):
    code, output = run("quantize", tiny_model_dir("llama"), "--out", tmp_path / "q", *args)
    assert code == 2
    assert on_one_line(output, "error:", message)
    assert "Traceback" not in output
    assert not (tmp_path / "q").exists()


def test_unknown_runtime_gets_one_clear_line(tiny_model_dir, tmp_path):
    code, output = run("bench", tiny_model_dir("llama"), "--runtime", "vllm", "--out", tmp_path / "b")
    assert code == 2 and "unknown --runtime 'vllm': use one of auto, fast, transformers" in output
    assert "Traceback" not in output and not (tmp_path / "b").exists()


def test_unknown_model_gets_one_clear_line(tmp_path):
    code, output = run("quantize", "nobody/no-such-model-xyz", "--out", tmp_path / "q")
    assert code == 2 and "unknown model" in output and "Traceback" not in output


def test_existing_output_is_refused_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, output = run("quantize", tiny_model_dir("llama"), "--out", out, "--quiet")
    assert code == 2 and "is not empty" in output and "--overwrite" in output
    assert (out / "precious.txt").read_text() == "keep me"

    # --overwrite replaces only what ptqlab wrote: this folder has no ptqlab.json.
    code, output = run("quantize", tiny_model_dir("llama"), "--out", out, "--overwrite", "--quiet")
    assert code == 2 and on_one_line(output, "did not write") and (out / "precious.txt").read_text() == "keep me"

    (out / "precious.txt").unlink()
    assert run("quantize", tiny_model_dir("llama"), "--out", out, "--quiet")[0] == 0
    (out / "extra.txt").write_text("written into a ptqlab checkpoint")
    code, output = run("quantize", tiny_model_dir("llama"), "--out", out, "--overwrite", "--quiet")
    assert code == 0, output
    assert not (out / "extra.txt").exists() and (out / "ptqlab.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ignore_takes_names_and_regexes(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", "fp8-dynamic", "--out", tmp_path / "q",
                       "--ignore", "lm_head", "--ignore", "re:.*mlp\\.down_proj$", "--quiet")
    assert code == 0, output
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head", "re:.*mlp\\.down_proj$"]
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    record = json.loads((tmp_path / "q" / "ptqlab.json").read_text())
    assert record["ignored_layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def test_ignore_pattern_that_matches_nothing_is_reported(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir("llama"), "--out", tmp_path / "q", "--ignore", "lm_haed", "--quiet")
    assert code == 0 and "'lm_haed' matched no linear layer" in output


def test_group_size_that_does_not_divide_falls_back_with_a_note(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama", hidden_size=192, intermediate_size=384)  # 128 does not divide 192
    code, output = run("quantize", model, "--recipe", "w4a16-rtn", "--out", tmp_path / "q", "--quiet")
    assert code == 0, output
    assert "using group size 64" in output
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 64

    code, output = run("quantize", model, "--recipe", "w4a16-rtn", "--group-size", "128", "--out", tmp_path / "q2")
    assert code == 2
    assert on_one_line(output, "group size 128 does not divide", "--group-size 64")


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import ptqlab.api
    real = ptqlab.api.write_checkpoint
    def slow(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        print("WRITTEN", flush=True)
        time.sleep(60)
    ptqlab.api.write_checkpoint = slow
    ptqlab.api.quantize(sys.argv[1], "w8a8-rtn", out=sys.argv[2], quiet=True)
""")


def interruptible() -> None:
    """In the child, before it starts: SIGINT back to its default. A shell without job control starts background
    commands with SIGINT ignored, and a Python started so would never see the interrupt this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_leaves_no_folder_that_looks_complete(tiny_model_dir, tmp_path, sig):
    out = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tiny_model_dir("llama")), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=interruptible)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"  # weights and config are on disk, record not yet
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    if sig == signal.SIGINT:  # a clean interrupt removes its temporary folder
        assert leftovers == []
    else:  # a hard kill can only leave the hidden temporary folder and the run's lock file, never --out
        assert all(name.startswith(".q.partial-") or name == ".q.lock" for name in leftovers)


def test_gptq_recipe_from_the_command_line(tiny_model_dir, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about number {i}."},
                                                       {"role": "assistant", "content": f"{i} is a number. " * 4}]})
                              for i in range(20)))
    code, output = run("quantize", tiny_model_dir("qwen2"), "--recipe", "w4a16", "--out", tmp_path / "q", "--dataset", data,
                       "--num-samples", "8", "--max-seq-len", "32", "--device", "cpu", "--dampening-frac", "0.02", "--quiet")
    assert code == 0, output
    record = json.loads((tmp_path / "q" / "ptqlab.json").read_text())
    assert record["recipe"]["steps"][-1]["gptq"]["dampening_frac"] == 0.02 and record["settings"]["calibration"]["num_samples"] == 8
    assert "calibration: 8 samples" in output

    code, output = run("quantize", tiny_model_dir("qwen2"), "--recipe", "w4a16", "--out", tmp_path / "q2",
                       "--dataset", tmp_path / "missing.jsonl", "--device", "cpu")
    assert code == 2 and on_one_line(output, "missing.jsonl", "does not exist") and not (tmp_path / "q2").exists()
