"""Resume (engine/resume.py): a calibrated run stopped after any layer continues, when started again with the same
settings and --out, from the next layer, and writes the very files an uninterrupted run writes; a run of other
settings never picks up someone else's partial state."""

import json

import pytest
import torch

from ptqlab import quantize
from ptqlab.data import CalibrationConfig
from ptqlab.engine import resume as resume_module

LAYERS = 4


class Killed(Exception):
    """Stands for the process being killed right after a layer's state reached the disk."""


@pytest.fixture
def run(tiny_model_dir, calibration_file):
    src = tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS)

    def go(out, seed=0, **options):
        calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
        return quantize(str(src), "w4a16", out=out, calibration=calibration, quiet=True, device="cpu", seed=seed,
                        **options)

    return go


def kill_after(monkeypatch, layer: int) -> list[int]:
    """Make the run die once the state after `layer` is saved; -> the layers the engine computes, as it goes."""
    computed = []
    save = resume_module.Checkpointer.save

    def save_then_die(self, index, batches, reports):
        computed.append(index)
        save(self, index, batches, reports)
        if index == layer:
            raise Killed

    monkeypatch.setattr(resume_module.Checkpointer, "save", save_then_die)
    return computed


def killed_then_rerun(monkeypatch, layer: int, first, second) -> list[int]:
    """Run `first()` until it dies once the state after `layer` is saved, undo the test's patches, then run
    `second()` (which may change the kept state or the model first) -> the layers `second` computes."""
    computed = kill_after(monkeypatch, layer)
    with pytest.raises(Killed):
        first()
    computed.clear()
    monkeypatch.undo()
    counting(monkeypatch, computed)
    second()
    return computed


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or
            p.name in ("config.json", "model.safetensors.index.json")}


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("killed_after", [0, 2])
def test_a_killed_run_resumes_and_writes_the_uninterrupted_files(run, tmp_path, monkeypatch, stream, killed_after):
    whole = run(tmp_path / "whole", stream=stream)
    out = tmp_path / "resumed"

    def resume():
        assert not out.exists() and (tmp_path / ".resumed.partial" / "resume.json").is_file()
        run(out, stream=stream)

    computed = killed_then_rerun(monkeypatch, killed_after, lambda: run(out, stream=stream), resume)
    assert computed == list(range(killed_after + 1, LAYERS))  # only the layers not done before
    assert files(out) == files(whole)
    record = json.loads((out / "ptqlab.json").read_text())
    assert f"resumed from layer {killed_after + 1}" in " ".join(record["notes"])
    assert [layer["index"] for layer in record["layers"]] == list(range(LAYERS))
    assert not (tmp_path / ".resumed.partial").exists() and not (out / "resume.json").exists()


def counting(monkeypatch, computed: list[int]) -> None:
    """Record the layers the engine computes (it saves the state after each)."""
    original = resume_module.Checkpointer.save

    def save(self, index, batches, reports):
        computed.append(index)
        return original(self, index, batches, reports)

    monkeypatch.setattr(resume_module.Checkpointer, "save", save)


def test_other_settings_never_resume_a_partial_run(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # another seed: another calibration draw
    computed = killed_then_rerun(monkeypatch, 1, lambda: run(out, seed=0), lambda: run(out, seed=1))
    assert computed == list(range(LAYERS))
    notes = " ".join(json.loads((out / "ptqlab.json").read_text())["notes"])
    assert "discarded an unfinished run of other settings" in notes and "resumed" not in notes
    assert files(out) == files(run(tmp_path / "fresh", seed=1))


def test_weights_replaced_at_the_same_path_start_over_and_say_why(tiny_model_dir, calibration_file, tmp_path,
                                                                  monkeypatch):
    """A killed run, then the model folder's weights replaced (same path, same config): the fingerprint covers the
    model's files (sizes and modification times), so the run starts over, says why, and writes what a clean run on
    the new weights writes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS), model)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)

    def go(out):
        return quantize(str(model), "w4a16", out=out, calibration=calibration, quiet=True, device="cpu")

    out = tmp_path / "out"

    def replaced_then_go():
        shutil.copy(tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS, seed=1) / "model.safetensors",
                    model / "model.safetensors")  # another model's weights, same config
        go(out)

    computed = killed_then_rerun(monkeypatch, 1, lambda: go(out), replaced_then_go)
    assert computed == list(range(LAYERS))
    notes = " ".join(json.loads((out / "ptqlab.json").read_text())["notes"])
    assert "the model's files changed since" in notes and "resumed" not in notes
    assert files(out) == files(go(tmp_path / "fresh"))


def test_the_model_by_absolute_or_relative_path_resumes(tiny_model_dir, calibration_file, tmp_path, monkeypatch):
    """The same model folder named relatively, then absolutely: the same run, resumed."""
    src = tiny_model_dir("llama", torch.bfloat16, num_hidden_layers=LAYERS)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    monkeypatch.chdir(src.parent)
    out = tmp_path / "out"
    computed = killed_then_rerun(  # undoing the patches leaves src's parent: the second names it absolutely anyway
        monkeypatch, 1, lambda: quantize(src.name, "w4a16", out=out, calibration=calibration, quiet=True, device="cpu"),
        lambda: quantize(str(src.resolve()), "w4a16", out=out, calibration=calibration, quiet=True, device="cpu"))
    assert computed == list(range(2, LAYERS))


@pytest.mark.parametrize("state", ["[1, 2]", "null", '{"fingerprint": 3}'])
def test_a_resume_state_that_is_not_an_object_starts_over_and_says_so(run, tmp_path, state):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "resume.json").write_text(state)
    out = run(tmp_path / "out")
    notes = " ".join(json.loads((out / "ptqlab.json").read_text())["notes"])
    assert "its resume.json is damaged" in notes and not partial.exists()


def test_a_stopped_run_says_what_it_kept_and_how_to_resume(run, tmp_path, monkeypatch, capsys):
    """SIGTERM (`timeout`, Slurm, `docker stop`: the CLI's handler raises SystemExit(143)) after layer 1: one line
    names the kept layers, where, and that the same command resumes."""
    save = resume_module.Checkpointer.save

    def save_then_stop(self, index, batches, reports):
        save(self, index, batches, reports)
        if index == 1:
            raise SystemExit(143)

    monkeypatch.setattr(resume_module.Checkpointer, "save", save_then_stop)
    with pytest.raises(SystemExit):
        run(tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if "stopped" in line]  # not transformers' bars
    assert lines == [f"stopped: decoder layers 0-1 are kept in {tmp_path / '.out.partial'}; the same command resumes "
                     "from layer 2"]


@pytest.mark.parametrize("damaged", ["layers/00001.safetensors", "hidden-00003/b00000.safetensors"],
                         ids=["finished-layer", "hidden-states"])
def test_a_truncated_resume_state_is_set_aside_and_the_run_starts_over(run, tmp_path, monkeypatch, damaged):
    """A kept file cut short (a full disk, a kill mid-write): checked before it is trusted, the state is set aside
    with one note and the run starts over, instead of a SafetensorError on every retry."""
    out = tmp_path / "out"

    def truncated_then_run():
        file = tmp_path / ".out.partial" / damaged
        file.write_bytes(file.read_bytes()[:-100])
        run(out)

    computed = killed_then_rerun(monkeypatch, 2, lambda: run(out), truncated_then_run)
    assert computed == list(range(LAYERS))
    notes = " ".join(json.loads((out / "ptqlab.json").read_text())["notes"])
    assert f"resume state damaged ({damaged}:" in notes and "resumed" not in notes
    assert files(out) == files(run(tmp_path / "fresh"))
