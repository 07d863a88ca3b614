"""What a new user meets first: output that scripts can read, ptqlab's own progress only, float32 compute on CPUs that
only emulate bf16, and the lab's core recipes."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import ptqlab.models
import ptqlab.progress
from ptqlab import quantize
from ptqlab.cli import app
from ptqlab.data import CalibrationConfig, CalibrationSet
from ptqlab.models import compute_dtype
from ptqlab.engine.capture import MIN_FILL, make_batches


def test_a_long_error_is_one_line_at_any_width(tmp_path):
    missing = tmp_path / ("deeply-nested-folder-name-" * 4) / "model"
    for columns in ("40", "300"):
        result = CliRunner().invoke(app, ["quantize", str(missing), "--out", str(tmp_path / "q")], env={"COLUMNS": columns})
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], result.output


def test_progress_without_a_terminal_is_plain_lines_with_elapsed_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(ptqlab.progress, "PLAIN_INTERVAL_S", 0.0)
    items = list(ptqlab.progress.track(range(3), "gptq", total=3, status=lambda i: f"layer {i}"))
    assert items == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["gptq"] * 3
    assert "1/3  layer 0" in lines[0] and "3/3  layer 2" in lines[2]
    assert all("elapsed 0:0" in line and "eta 0:0" in line for line in lines)


def test_progress_without_a_terminal_keeps_a_modest_rate(capsys):
    list(ptqlab.progress.track(range(200), "layers", total=200))  # far quicker than PLAIN_INTERVAL_S
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "1/200" in lines[0] and "200/200" in lines[1]


def test_quantize_shows_ptqlab_progress_and_no_other_librarys_bars(tiny_model_dir, tmp_path, calibration_file):
    args = ["quantize", str(tiny_model_dir("llama")), "--recipe", "w4a16", "--group-size", "32", "--dataset",
            str(calibration_file), "--num-samples", "8", "--max-seq-len", "32", "--device", "cpu", "--out", str(tmp_path / "q")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "w4a16 (gptq): 1/2" in result.output and "w4a16 (gptq): 2/2" in result.output
    # tqdm bars (transformers' "Loading weights", compressed-tensors' "Compressing model") draw "it/s" and "|";
    # warnings print their category.
    assert "it/s" not in result.output and "Warning" not in result.output and "|" not in result.output


@pytest.mark.parametrize("features,expected", [
    (set(), torch.float32), ({"avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16),
])
def test_bf16_computes_in_float32_on_a_cpu_without_native_bf16(monkeypatch, features, expected):
    monkeypatch.setattr(ptqlab.models.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ptqlab.models.platform, "system", lambda: "Linux")
    monkeypatch.setattr(ptqlab.models, "_cpu_flags", lambda: frozenset(features | {"avx2", "fma"}))
    assert compute_dtype(torch.device("cpu"), torch.bfloat16) == expected
    assert compute_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert compute_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16


def test_arm_cpus_with_bf16_keep_it(monkeypatch):
    monkeypatch.setattr(ptqlab.models.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(ptqlab.models.platform, "system", lambda: "Linux")
    monkeypatch.setattr(ptqlab.models, "_cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))
    assert compute_dtype(torch.device("cpu"), torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(ptqlab.models, "_cpu_flags", lambda: frozenset({"fp", "asimd"}))
    assert compute_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32


def _stored_tensor_dtypes(folder):
    dtypes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            dtypes.update({name: f.get_slice(name).get_dtype() for name in f.keys()})
    return dtypes


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
def test_calibration_computes_in_float32_and_the_checkpoint_keeps_bf16(tiny_model_dir, tmp_path, calibration_file,
                                                                       monkeypatch, native):
    monkeypatch.setattr(ptqlab.models, "cpu_has_native", lambda dtype: native or dtype == torch.float32)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(tiny_model_dir("llama", torch.bfloat16)), "w8a8", tmp_path / "q", calibration=calibration,
                   device="cpu", quiet=True)
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["settings"]["dtype"] == "bfloat16"
    assert record["settings"]["compute_dtype"] == ("bfloat16" if native else "float32")
    assert any("computed in float32" in note for note in record["notes"]) != native
    floating = {name: dtype for name, dtype in _stored_tensor_dtypes(out).items() if dtype.startswith(("F", "BF"))}
    assert floating and set(floating.values()) == {"BF16"}  # scales, norms (smoothed ones too), embeddings


def test_float32_calibration_leaves_the_model_in_its_own_dtypes(tiny_model_dir, calibration_file, monkeypatch):
    """The engine computes in float32 but hands back every tensor in the dtype it had (bf16 weights, fp32 rotary
    tables), with smoothed norms rounded to bf16 values: what calibrated the next layer is what the checkpoint holds."""
    from ptqlab.data import load_calibration
    from ptqlab.pipeline import quantize_model
    from ptqlab.recipes import get_recipe
    from ptqlab.engine.propagate import floating_dtypes

    loaded = ptqlab.models.load_model(str(tiny_model_dir("llama", torch.bfloat16)))
    before = floating_dtypes(loaded.model)
    calibration = load_calibration(loaded.tokenizer, CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32))
    quantize_model(loaded.model, get_recipe("w8a8"), calibration, quiet=True, device=torch.device("cpu"),
                   compute_dtype=torch.float32)
    after = floating_dtypes(loaded.model)
    kept = [name for name in before if name in after]  # quantized linears' weights became grid values and scales
    assert len(kept) >= 8 and all(after[name] == before[name] for name in kept)
    assert {before[name] for name in kept} == {torch.bfloat16, torch.float32}  # the rotary table stays fp32
    assert all(dtype == torch.bfloat16 for name, dtype in after.items() if name not in before)  # new scales


def test_batches_keep_padding_under_a_quarter_of_each_row():
    lengths = [512, 313, 188, 135, 124, 116, 87, 84, 81, 69, 49, 40, 12, 11, 3]
    samples = [torch.arange(n) for n in lengths]
    batches = make_batches(CalibrationSet(samples, "test", pad_id=0), batch_size=4)
    assert sorted(int(n) for b in batches for n in b.attention_mask.sum(1)) == sorted(lengths)
    for batch in batches:
        assert batch.input_ids.shape[0] <= 4
        assert int(batch.attention_mask.sum(1).min()) >= MIN_FILL * batch.input_ids.shape[1]


def test_lab_runs_the_core_recipes_by_default():
    from ptqlab.suite import DEFAULT_LAB_RECIPES

    assert DEFAULT_LAB_RECIPES == ("fp8-dynamic", "w4a16", "w8a8")
