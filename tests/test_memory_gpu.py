"""A GPU shared with another process (issue 37): the memory plan counts what the process takes there besides its
tensors (its CUDA context and libraries, measured once per device; the allocator's rounding; a stated margin) against
what cudaMemGetInfo reports free, and moves more to the CPU or refuses in one line before loading; a GPU that runs out
of memory during the run ends it in one line naming the phase, the layer and what to change, and the same command
resumes from the last finished layer. No GPU here: the measurement and the free figure are faked where the run reads
them, and the out-of-memory error is raised inside the layer loop as torch raises it."""

import importlib
import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from ptqlab import api
from ptqlab.cli import app
from ptqlab.engine import gpu_memory
from ptqlab.engine.gpu_memory import check_gpu_budget, non_tensor_bytes, out_of_memory_line
from ptqlab.engine.memory import (GIB, GPU_MARGIN_MIN, LIBRARIES_PART, MARGIN_PART, ROUNDING_PART, ModelShape,
                                  estimate, format_bytes, parse_bytes, size_flag)
from ptqlab.errors import OutOfMemory, PtqlabError
from ptqlab.options import QuantizeOptions
from test_memory_plan import run_shape
from test_resume import LAYERS, counting, files
from tiny import tiny_config

MIB = 2**20
runner = CliRunner()
calibrate_module = importlib.import_module("ptqlab.engine.calibrate")  # the package's `calibrate` is the function


def test_the_libraries_memory_is_the_drop_in_free_memory_across_their_first_use():
    free = iter([10 * GIB, 10 * GIB - 700 * MIB])
    used = []
    assert non_tensor_bytes(lambda: next(free), lambda: used.append(True)) == 700 * MIB
    assert used == [True]
    grown = iter([10 * GIB, 11 * GIB])  # another process freed memory meanwhile: nothing is negative
    assert non_tensor_bytes(lambda: next(grown), lambda: None) == 0


def test_the_context_and_libraries_are_measured_once_per_device(monkeypatch):
    """The context (NVML's figure) plus the libraries' drop in free memory, measured on a device's first use only."""
    contexts, frees = [], iter([10 * GIB, 9 * GIB, 20 * GIB, 20 * GIB - 300 * MIB])
    monkeypatch.setattr(gpu_memory, "_OVERHEAD", {})
    monkeypatch.setattr(gpu_memory, "_context_bytes", lambda index: contexts.append(index) or 500 * MIB)
    monkeypatch.setattr(gpu_memory, "_free_to_cudamalloc", lambda index: next(frees))
    monkeypatch.setattr(gpu_memory, "_use_libraries", lambda index: None)
    assert [gpu_memory.cuda_overhead(torch.device("cuda", i)) for i in (0, 0, 1, 1)] == [
        500 * MIB + GIB, 500 * MIB + GIB, 800 * MIB, 800 * MIB]
    assert contexts == [0, 1]


def test_the_gpu_plan_adds_the_measured_libraries_the_rounding_and_the_margin():
    model = ModelShape.from_config(tiny_config("llama", num_hidden_layers=8))
    bare, measured = estimate(model, run_shape()), estimate(model, run_shape(gpu_overhead=700 * MIB))
    assert measured.gpu_bytes - bare.gpu_bytes == 700 * MIB
    assert measured.parts[LIBRARIES_PART] == 700 * MIB
    assert measured.parts[MARGIN_PART] >= GPU_MARGIN_MIN and measured.parts[ROUNDING_PART] >= 2 * MIB * 8
    head = measured.lines()[0]
    assert "700 MiB of CUDA context and libraries measured" in head and "a 512 MiB margin" in head
    assert "of allocator rounding" in head
    assert estimate(model, run_shape(device="cpu", gpu_overhead=700 * MIB)).gpu_bytes is None  # a CPU run: no GPU


def test_with_the_libraries_counted_the_plan_moves_more_to_the_cpu():
    """A budget that fits every layer on the GPU when the libraries cost nothing: with their measured memory counted,
    the same budget gets one layer at a time, and with more, the hidden states in pinned CPU memory too."""
    model = ModelShape.from_config(tiny_config("llama", num_hidden_layers=8))
    roomy = estimate(model, run_shape(samples=256), 10**12)
    assert roomy.layers_on_gpu
    budget = roomy.gpu_bytes
    assert estimate(model, run_shape(samples=256), budget).layers_on_gpu
    layered = estimate(model, run_shape(samples=256, gpu_overhead=64 * MIB), budget)
    assert (layered.layers_on_gpu, layered.activations_on_gpu) == (False, True) and layered.gpu_bytes <= budget
    pinned = estimate(model, run_shape(samples=256, gpu_overhead=budget - layered.gpu_bytes + 64 * MIB + 1), budget)
    assert (pinned.layers_on_gpu, pinned.activations_on_gpu) == (False, False) and pinned.gpu_bytes <= budget


@pytest.fixture
def shared_gpu(monkeypatch):
    """Make `--device cuda` plan for a GPU that another process shares: `free` bytes left by cudaMemGetInfo and
    700 MiB of measured libraries; fail the test if the model is loaded."""
    def share(free: int) -> None:
        monkeypatch.setattr(api, "resolve_device", lambda name: torch.device("cuda", 0))
        monkeypatch.setattr(api, "cuda_overhead", lambda device: 700 * MIB)
        monkeypatch.setattr(api, "free_gpu_bytes", lambda device: free)
        monkeypatch.setattr(api, "load_checked", lambda *a, **k: pytest.fail("the model was loaded before refusing"))

    return share


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


CALIBRATED = ["--recipe", "w4a16", "--num-samples", "32", "--max-seq-len", "64", "--calib-batch-size", "16"]


def test_a_plan_beyond_the_free_gpu_memory_is_refused_in_one_line_before_loading(tiny_model_dir, calibration_file,
                                                                                  tmp_path, shared_gpu):
    """The plan's tensors fit what is free, but not with the libraries, the rounding and the margin: refused before
    loading (nothing written), naming each figure and what is free; no smaller batch brings the libraries and the
    margin down, so the line says how much more the GPU must have free."""
    model = str(tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS))
    shared_gpu(free=GPU_MARGIN_MIN + 600 * MIB)
    line = one_line(runner.invoke(app, ["quantize", model, *CALIBRATED, "--dataset", str(calibration_file),
                                        "--device", "cuda", "--out", str(tmp_path / "out")]))
    assert "this run needs about" in line and "of GPU memory at its peak" in line
    assert "CUDA context and libraries 700 MiB (measured)" in line and "margin 512 MiB" in line
    assert "allocator rounding" in line
    assert "1.1 GiB is free on the GPU" in line and "--max-gpu-memory cannot raise it" in line
    assert ": free " in line and " more on the GPU;" in line  # no batch size brings the libraries and margin down
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_a_max_gpu_memory_below_the_plan_names_the_budget_that_fits(tiny_model_dir, calibration_file, tmp_path,
                                                                    shared_gpu):
    model = str(tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS))
    shared_gpu(free=8 * GIB)
    line = one_line(runner.invoke(app, ["quantize", model, *CALIBRATED, "--dataset", str(calibration_file),
                                        "--device", "cuda", "--max-gpu-memory", "1GiB",
                                        "--out", str(tmp_path / "out")]))
    assert "1.0 GiB is allowed (--max-gpu-memory) of 8.0 GiB free on the GPU" in line
    needed = float(line.split("--max-gpu-memory ")[-1].split("GiB")[0])
    assert 1 < needed < 8
    assert "--calib-batch-size" not in line  # a budget the GPU has is the fix; the batches stay as they were


def test_a_refusal_names_the_largest_batch_size_that_fits():
    """An 8B-wide layer at 4096 tokens: the batch's forward dominates, so a smaller --calib-batch-size fits where the
    GPU has room for its plan; the line names the largest that does, and its peak."""
    model = ModelShape.from_config(tiny_config("llama", hidden_size=4096, intermediate_size=14336,
                                               num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    run = run_shape(samples=64, seq_len=4096, gpu_overhead=700 * MIB)
    free = estimate(model, replace(run, batch_size=4), 1).gpu_bytes  # the most offloaded placement at batch size 4
    assert estimate(model, replace(run, batch_size=8), 1).gpu_bytes > free
    plan = estimate(model, run, free)
    with pytest.raises(PtqlabError) as caught:
        check_gpu_budget(model, run, plan, free, None)
    assert f"use --calib-batch-size 4 (peak {format_bytes(free)})" in str(caught.value)
    check_gpu_budget(model, replace(run, batch_size=4), estimate(model, replace(run, batch_size=4), free), free, None)


def test_the_printed_plan_names_the_libraries_and_the_margin(tiny_model_dir, shared_gpu):
    model = str(tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS))
    shared_gpu(free=8 * GIB)
    result = runner.invoke(app, ["quantize", model, *CALIBRATED, "--device", "cuda", "--plan"])
    assert result.exit_code == 0, result.output
    head = result.output.splitlines()[0]
    assert "700 MiB of CUDA context and libraries measured" in head and "512 MiB margin" in head, head
    assert f"  {LIBRARIES_PART}: 700 MiB" in result.output and f"  {MARGIN_PART}: 512 MiB" in result.output


def fail_at_layer(monkeypatch, layer: int) -> None:
    """The fake allocator limit: GPTQ of decoder layer `layer` raises what torch's CUDA allocator raises when it
    cannot allocate."""
    quantize_layer = calibrate_module.quantize_layer

    def limited(model, targets, *args, **kwargs):
        if any(f".layers.{layer}." in name for name in targets):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 79.11 GiB of which 1.20 GiB is free.\nIncluding non-PyTorch memory ...")
        return quantize_layer(model, targets, *args, **kwargs)

    monkeypatch.setattr(calibrate_module, "quantize_layer", limited)


def test_out_of_memory_in_a_layer_is_one_line_and_the_same_command_resumes(tiny_model_dir, calibration_file, tmp_path,
                                                                            monkeypatch):
    """GPTQ of layer 2 runs out of GPU memory: one line naming the phase, the layer, torch's size and what to change,
    exit status 2, the finished layers kept; the same command computes only layers 2 and 3 and writes the files a
    run that never failed writes."""
    model = str(tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS))
    command = ["quantize", model, "--recipe", "w4a16", "--dataset", str(calibration_file), "--num-samples", "8",
               "--max-seq-len", "32", "--calib-batch-size", "2", "--device", "cpu", "--quiet"]
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    fail_at_layer(monkeypatch, 2)
    line = one_line(runner.invoke(app, [*command, "--out", str(out)]))
    assert line.startswith("error: the GPU ran out of memory in quantize of layer 2 (tried to allocate 2.00 GiB)")
    assert f"decoder layers 0-1 are kept in {partial}" in line
    assert line.endswith("use --calib-batch-size 1 (starts over: the kept state is per batch) or fewer --num-samples")
    assert json.loads((partial / "resume.json").read_text())["next_layer"] == 2 and not out.exists()

    monkeypatch.undo()  # a GPU's advice, a lower --max-gpu-memory, is no part of the resume state: it resumes
    computed = []
    counting(monkeypatch, computed)
    result = runner.invoke(app, [*command, "--out", str(out), "--max-gpu-memory", "4GiB"])
    assert result.exit_code == 0, result.output
    assert "resumed from layer 2: layers 0-1 were done by an earlier run" in result.output
    assert computed == [2, 3]
    clean = runner.invoke(app, [*command, "--out", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.output
    assert files(out) == files(tmp_path / "clean")


def test_out_of_memory_on_a_gpu_advises_the_budget_whose_plan_moves_more_to_the_cpu(tmp_path):
    """A run that held every layer on the GPU and ran out: the line gives the plan's peak and a --max-gpu-memory
    whose plan keeps one layer at a time (the same command with it resumes: the budget is not part of the resume
    state), with the layers kept."""
    shape = ModelShape.from_config(tiny_config("llama", num_hidden_layers=8))
    run = run_shape(samples=256, gpu_overhead=300 * MIB)
    memory = estimate(shape, run, 10**12)
    assert memory.layers_on_gpu
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "resume.json").write_text(json.dumps({"next_layer": 3}))
    with pytest.raises(PtqlabError) as caught:
        with api.saying_out_of_memory(tmp_path / "out", True, shape, run, memory, QuantizeOptions(device="cpu")):
            raise OutOfMemory("propagate", 3, "CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 ...")
    line = str(caught.value)
    lower = estimate(shape, run, memory.gpu_bytes - 1)
    assert not lower.layers_on_gpu and lower.gpu_bytes < memory.gpu_bytes
    assert line.startswith(f"the GPU ran out of memory in propagate of layer 3 (tried to allocate 512.00 MiB; the "
                           f"plan's GPU peak {format_bytes(memory.gpu_bytes)}): ")
    assert (f"decoder layers 0-2 are kept in {partial}; the same command with --max-gpu-memory "
            f"{size_flag(lower.gpu_bytes)} ({lower.placement()}) resumes from layer 3" in line)


def test_out_of_memory_before_any_layer_says_nothing_is_kept():
    line = out_of_memory_line("capture (layer 0's inputs)", None, "CUDA out of memory.", 6 * GIB, 7 * GIB, None, 1,
                              None, 0)
    assert line == ("the GPU ran out of memory in capture (layer 0's inputs) (the plan's GPU peak 6.0 GiB; the peak "
                    "seen 7.0 GiB (reserved by torch)): no layer was finished, nothing kept; use fewer --num-samples "
                    "or a shorter --max-seq-len, or free memory on the GPU")


def test_out_of_memory_outside_the_layer_loop_is_one_line_too(tiny_model_dir, calibration_file, tmp_path,
                                                              monkeypatch):
    """Loading or writing (no phase of the engine's): still one line, with torch's size, and nothing kept."""
    def load(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 ...")

    monkeypatch.setattr(api, "_load", load)
    line = one_line(runner.invoke(app, ["quantize", str(tiny_model_dir("llama", torch.bfloat16)), "--recipe", "w4a16",
                                        "--dataset", str(calibration_file), "--num-samples", "8", "--device", "cpu",
                                        "--quiet", "--out", str(tmp_path / "out")]))
    assert line == ("error: the GPU ran out of memory in loading or writing (outside the layer loop) (tried to "
                    "allocate 20.00 MiB): no layer was finished, nothing kept; use --calib-batch-size 8 or fewer "
                    "--num-samples")
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [1, 700 * MIB + 1, GIB, 7 * GIB + 1, 79 * GIB - 3])
def test_a_suggested_size_reads_back_as_at_least_what_is_needed(n):
    assert n <= parse_bytes(size_flag(n), "--max-gpu-memory") <= n + GIB // 10
