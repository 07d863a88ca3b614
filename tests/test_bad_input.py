"""Bad input and faults: ptqlab never deletes what it did not write, and says in one line what is wrong and how to fix it.

The table of cases (input, expected) lives in tests/BAD_INPUT.md; each row names the test that checks it.
"""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from ptqlab.cli import app


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A user's folder of models: the tiny model and a sibling model, both must survive every run."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir("llama"), models / "tiny")
    shutil.copytree(tiny_model_dir("llama"), models / "other")
    return models


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_overwrite_never_deletes_a_folder_ptqlab_did_not_write(model_copy, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, output = run("quantize", model_copy / "tiny", "--recipe", "w8a8-rtn", "--out", ".", "--overwrite")
    assert code == 2 and "did not write" in one_error_line(output)
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["models", "models/tiny"], ids=["folder-holding-the-source", "the-source-itself"])
def test_out_never_is_or_holds_the_source_model(model_copy, tmp_path, target):
    before = tree(model_copy)
    for extra in ([], ["--overwrite"]):
        code, output = run("quantize", model_copy / "tiny", "--recipe", "w8a8-rtn", "--out", tmp_path / target, *extra)
        assert code == 2 and "source model" in one_error_line(output)
    assert tree(model_copy) == before


def test_overwrite_replaces_a_ptqlab_checkpoint(model_copy, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", model_copy / "tiny", "--recipe", "w8a8-rtn", "--out", out, "--quiet")[0] == 0
    first = json.loads((out / "ptqlab.json").read_text())["created"]
    code, output = run("quantize", model_copy / "tiny", "--recipe", "fp8-dynamic", "--out", out, "--overwrite", "--quiet")
    assert code == 0, output
    assert json.loads((out / "ptqlab.json").read_text())["recipe"]["name"] == "fp8-dynamic" and first


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_is_refused_before_any_work(model_copy, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, output = run("quantize", model_copy / "tiny", "--out", locked / "q")
        assert code == 2 and "not writable" in one_error_line(output)
    finally:
        locked.chmod(0o700)


def test_too_little_free_space_is_refused_before_any_work(model_copy, tmp_path, monkeypatch):
    import ptqlab.output

    class Usage:
        free = 1024

    monkeypatch.setattr(ptqlab.output.shutil, "disk_usage", lambda path: Usage())
    code, output = run("quantize", model_copy / "tiny", "--recipe", "w8a8-rtn", "--out", tmp_path / "q")
    assert code == 2 and "GiB free" in one_error_line(output)
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------ stale or wrong results

def _events(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _fast():
    from ptqlab.measure.variant import BenchSettings

    return BenchSettings(ppl_text="python-docs", ppl_context=64, ppl_windows=2, max_new_tokens=2, batch_size=2, repeats=1,
                         sample_tokens=2, device="cpu")


@pytest.mark.slow  # a minute on two cores: make test-all
def test_bench_with_another_baseline_measures_kl_again(tiny_model_dir, tmp_path):
    from ptqlab import quantize
    from ptqlab.benchmark import bench

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_model_dir("llama"), first)
    shutil.copytree(tiny_model_dir("llama", seed=1), second)  # same tokenizer, other weights
    checkpoint = quantize(str(first), "w8a8-rtn", out=tmp_path / "w8a8", quiet=True)
    out = tmp_path / "bench"
    bench([str(checkpoint)], out, baseline=str(first), settings=_fast(), quiet=True)
    kl_first = json.loads((out / "variants" / "w8a8.json").read_text())["kl"]["mean"]
    before = len(_events(out))
    bench([str(checkpoint)], out, baseline=str(second), settings=_fast(), quiet=True)
    started = [e["variant"] for e in _events(out)[before:] if e["event"] == "bench.start"]
    assert started == ["baseline", "w8a8"]  # the variant's KL is against the new baseline, not reused
    result = json.loads((out / "variants" / "w8a8.json").read_text())
    assert result["context"]["kl_against"]["path"] == str(second.resolve())
    assert result["kl"]["mean"] != kl_first


@pytest.mark.slow  # a minute on two cores: make test-all
def test_lab_rebuilds_a_checkpoint_made_with_other_calibration(tiny_model_dir, tmp_path, calibration_file):
    from ptqlab.data import CalibrationConfig
    from ptqlab.suite import lab

    model = str(tiny_model_dir("llama"))
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=4, max_seq_len=16)
    lab(model, ["w8a8"], tmp_path, _fast(), quiet=True, calibration=calibration)
    before = len(_events(tmp_path))
    lab(model, ["w8a8"], tmp_path, _fast(), quiet=True, calibration=CalibrationConfig(**{**calibration.__dict__, "num_samples": 6}))
    new = _events(tmp_path)[before:]
    assert [e["recipe"] for e in new if e["event"] == "quantize.start"] == ["w8a8"]
    assert [e["variant"] for e in new if e["event"] == "bench.start"] == ["w8a8"]
    record = json.loads((tmp_path / "checkpoints" / "w8a8" / "ptqlab.json").read_text())
    assert record["request"]["calibration"]["num_samples"] == 6
    before = len(_events(tmp_path))
    lab(model, ["w8a8"], tmp_path, _fast(), quiet=True, calibration=CalibrationConfig(**{**calibration.__dict__, "num_samples": 6}))
    assert [e["event"] for e in _events(tmp_path)[before:] if e["event"].startswith("quantize")] == ["quantize.reused"]


def test_bench_refuses_a_checkpoint_with_a_damaged_run_record(model_copy, tmp_path):
    """The record says which 16-bit model a checkpoint came from (bench's inferred baseline): a damaged one is one
    line naming the file, before anything is measured."""
    checkpoint = tmp_path / "q"
    assert run("quantize", model_copy / "tiny", "--recipe", "w8a8-rtn", "--out", checkpoint, "--quiet")[0] == 0
    (checkpoint / "ptqlab.json").write_text('{"model": "cut off')
    code, output = run("bench", checkpoint, "--out", tmp_path / "bench", "--quiet")
    assert code == 2 and "ptqlab.json is damaged" in one_error_line(output)
    assert not (tmp_path / "bench" / "variants").exists()


# ------------------------------------------------------------------ concurrent runs and signals

def test_a_second_run_on_the_same_out_is_refused(tiny_model_dir, tmp_path):
    from ptqlab.errors import PtqlabError
    from ptqlab.output import locked
    from ptqlab.benchmark import bench

    with locked(tmp_path / "b", "lab"):
        with pytest.raises(PtqlabError, match=r"in use by another ptqlab run \(lab, pid \d+\)"):
            bench([str(tiny_model_dir("llama"))], tmp_path / "b", settings=_fast(), quiet=True)
    bench([str(tiny_model_dir("llama"))], tmp_path / "b", settings=_fast(), quiet=True)  # free again afterwards


CALIBRATED = ["--recipe", "w4a16", "--num-samples", "4", "--max-seq-len", "16", "--calib-batch-size", "2",
              "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("what", ["link", "file"])
def test_the_partial_folder_is_never_a_link_or_a_file(model_copy, tmp_path, calibration_file, what):
    """The hidden `.OUT.partial` a calibrated run keeps its state in: a link there is never followed (the folder it
    points at is the user's), a file there is never replaced; both are one line."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    partial = tmp_path / ".q.partial"
    partial.symlink_to(mine, target_is_directory=True) if what == "link" else partial.write_text("mine")
    code, output = run("quantize", model_copy / "tiny", *CALIBRATED, "--dataset", calibration_file, "--out", tmp_path / "q")
    assert code == 2 and ("is a symbolic link" if what == "link" else "is a file") in one_error_line(output)
    assert (mine / "thesis.tex").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert partial.is_symlink() if what == "link" else partial.read_text() == "mine"
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.lock").exists()


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "data-free"])
def test_a_refused_second_run_touches_nothing_of_the_first(model_copy, tmp_path, calibration_file, calibrated):
    """Two runs on one --out, the second started while the first works: the second is refused in one line before it
    touches anything (the first's partial folder stays, its finished checkpoint is never replaced)."""
    from ptqlab.output import atomic_dir

    out = tmp_path / "q"
    recipe = [*CALIBRATED, "--dataset", calibration_file] if calibrated else ["--recipe", "w8a8-rtn", "--quiet"]
    with atomic_dir(out, resumable=calibrated, what="quantize") as first:  # the first run, at work
        (first / "layers").mkdir()
        (first / "layers" / "00000.safetensors").write_text("layer 0")
        code, output = run("quantize", model_copy / "tiny", *recipe, "--out", out)
        assert code == 2 and "in use by another ptqlab run (quantize, pid" in one_error_line(output)
        assert (first / "layers" / "00000.safetensors").read_text() == "layer 0"
        (first / "ptqlab.json").write_text("{}")
    assert (out / "layers" / "00000.safetensors").read_text() == "layer 0"  # the first's, renamed into place
    code, output = run("quantize", model_copy / "tiny", *recipe, "--out", out)  # after it: not over it unasked
    assert code == 2 and "exists and is not empty" in one_error_line(output)
    assert not (tmp_path / ".q.lock").exists()


def test_a_run_held_up_before_its_lock_never_replaces_a_checkpoint_finished_meanwhile(model_copy, tmp_path,
                                                                                       monkeypatch):
    """The second of two data-free runs passes its first check while --out is still free; the first finishes before
    the second takes the lock: the check made again under the lock refuses it."""
    from ptqlab import output
    from ptqlab.errors import PtqlabError

    out = tmp_path / "q"
    checks = []
    check = output.check_writable

    def first_finishes_between(path, overwrite, protect=(), needs_bytes=0):
        checks.append(path)
        check(path, overwrite, protect, needs_bytes)
        if len(checks) == 1:  # the run's last check before its lock: the other run completes now
            path.mkdir()
            (path / "ptqlab.json").write_text("{}")

    monkeypatch.setattr(output, "check_writable", first_finishes_between)
    from ptqlab import quantize
    with pytest.raises(PtqlabError, match="exists and is not empty"):
        quantize(str(model_copy / "tiny"), "w8a8-rtn", out=out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["ptqlab.json"]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stopped_lab_leaves_no_worker_and_no_temp_file(tiny_model_dir, tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    spool = tmp_path / "tmp"
    spool.mkdir()
    out = tmp_path / "lab"
    command = [sys.executable, "-c", "from ptqlab.cli import app; app()", "lab", str(tiny_model_dir("llama")), "--recipes",
               "fp8-dynamic", "--out", str(out), "--device", "cpu", "--ppl-quick", "--max-new-tokens", "64", "--repeats", "5"]
    # SIGINT back to its default in the child: a shell without job control starts background commands with it ignored
    lab = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(spool)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not _processes_mentioning(str(spool)) and time.monotonic() < deadline and lab.poll() is None:
        time.sleep(0.2)  # until the baseline's worker runs (its command line names its spec file in TMPDIR)
    assert _processes_mentioning(str(spool)), "the benchmark worker never started"
    time.sleep(1.0)
    written = sorted(p.name for p in (out / "variants").glob("*"))
    lab.send_signal(getattr(signal, sig))
    assert lab.wait(timeout=60) != 0
    time.sleep(2.0)  # an orphaned worker would finish and write its result in this time
    assert _processes_mentioning(str(spool)) == []
    assert list(spool.iterdir()) == []
    assert sorted(p.name for p in (out / "variants").glob("*")) == written and not (out / "results.json").exists()


def test_a_baseline_with_another_vocabulary_is_refused_before_measuring(tiny_model_dir, tmp_path):
    from ptqlab import quantize

    checkpoint = quantize(str(tiny_model_dir("llama")), "w8a8-rtn", out=tmp_path / "w8a8", quiet=True)
    other = tiny_model_dir("llama", vocab_size=300)
    code, output = run("bench", checkpoint, "--baseline", other, "--out", tmp_path / "b", "--device", "cpu", "--quiet")
    assert code == 2 and "vocabulary of" in one_error_line(output) and "--baseline" in output
    assert not (tmp_path / "b" / "variants").exists() or not list((tmp_path / "b" / "variants").iterdir())


def test_lab_takes_a_recipe_file_by_absolute_path(tiny_model_dir, tmp_path):
    import yaml

    from ptqlab.recipes import get_recipe
    from ptqlab.suite import lab

    recipe_file = tmp_path / "recipes" / "mine.yaml"
    recipe_file.parent.mkdir()
    recipe_file.write_text(yaml.safe_dump({**get_recipe("w8a8-rtn").to_dict(), "name": "my-w8a8"}))
    text = recipe_file.read_text()
    out = lab(str(tiny_model_dir("llama")), [str(recipe_file.resolve())], tmp_path / "lab", _fast(), quiet=True)
    assert (out / "checkpoints" / "my-w8a8" / "ptqlab.json").is_file() and (out / "variants" / "my-w8a8.json").is_file()
    assert recipe_file.read_text() == text


def test_a_tokenizer_saved_again_by_another_library_version_is_the_same_tokenizer(tiny_model_dir):
    from ptqlab.benchmark import tokenizer_identity

    saved = json.loads((tiny_model_dir("llama") / "tokenizer.json").read_text())
    respelled = json.loads(json.dumps(saved))
    model = respelled["model"]
    model["merges"] = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]  # pairs, not strings
    model["continuing_subword_prefix"], model["end_of_word_suffix"] = "", ""  # "" where None was written
    respelled["normalizer"] = {"type": "Sequence", "normalizers": []}
    assert tokenizer_identity(respelled) == tokenizer_identity(saved)
    other = json.loads(json.dumps(saved))
    first, second = list(other["model"]["vocab"])[:2]
    other["model"]["vocab"][first], other["model"]["vocab"][second] = other["model"]["vocab"][second], other["model"]["vocab"][first]
    assert tokenizer_identity(other) != tokenizer_identity(saved)


@pytest.mark.parametrize("command", ["lab", "sensitivity"])
@pytest.mark.parametrize("target", ["models/tiny", "models"], ids=["the-model-itself", "folder-holding-the-model"])
def test_a_lab_out_never_is_or_holds_the_model(model_copy, tmp_path, command, target):
    before = tree(model_copy)
    code, output = run(command, model_copy / "tiny", "--out", tmp_path / target, "--device", "cpu", "--quiet")
    assert code == 2 and "the model's folder" in one_error_line(output)
    assert tree(model_copy) == before and not list(model_copy.rglob(".ptqlab*"))


def test_a_link_where_the_lock_goes_is_never_written_through(model_copy, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    (tmp_path / ".q.lock").symlink_to(mine)
    code, output = run("quantize", model_copy / "tiny", "--recipe", "w8a8-rtn", "--out", tmp_path / "q", "--quiet")
    assert code == 2 and "cannot use" in one_error_line(output)
    assert mine.read_text() == "mine" and not (tmp_path / "q").exists()
