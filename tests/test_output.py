"""Where ptqlab writes: the atomic file writer and the one --out check every writer uses (ptqlab/output.py)."""

import os
from pathlib import Path

import pytest

from ptqlab.errors import PtqlabError
from ptqlab.options import QuantizeOptions, RunOptions, given, widened
from ptqlab.output import atomic_dir, atomic_file, check_can_write, partial_files, write_atomically


def test_an_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    write_atomically(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and partial_files(path) == []


def test_a_killed_writers_partial_file_is_found(tmp_path):
    path = tmp_path / "a[1].json"  # glob characters in the name are taken literally
    left = tmp_path / f"a[1].json.partial-{os.getpid() + 1}"
    left.write_text("half")
    assert partial_files(path) == [left]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_refused_in_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PtqlabError, match=r"^--out .*/locked/new/q: .*/locked is not writable \(.+\): choose another folder$"):
            check_can_write(locked / "new" / "q")
    finally:
        locked.chmod(0o700)


def test_the_folder_checked_is_the_nearest_existing_one_above_out(tmp_path):
    assert check_can_write(tmp_path / "a" / "b" / "out.gguf") == tmp_path
    (tmp_path / "out").mkdir()  # an existing --out is replaced by a sibling renamed over it: its parent is checked
    assert check_can_write(tmp_path / "out") == tmp_path


def test_keyword_arguments_set_the_options_fields():
    assert given(None, QuantizeOptions, {"quiet": True, "seed": 3}) == QuantizeOptions(quiet=True, seed=3)
    assert given(QuantizeOptions(stream=True), QuantizeOptions, {"seed": 3}) == QuantizeOptions(stream=True, seed=3)
    with pytest.raises(TypeError, match="quiett"):
        given(None, RunOptions, {"quiett": True})


def test_a_run_options_widens_to_a_quantize_options():
    run = RunOptions(dtype="float32", seed=5, quiet=True)
    assert widened(run, QuantizeOptions, overwrite=True) == QuantizeOptions(dtype="float32", seed=5, quiet=True,
                                                                           overwrite=True)


def test_the_refusal_names_out_the_folder_and_the_reason(tmp_path, monkeypatch):
    """As any user, root included (who passes permission bits): the probe file's error is what the line reports."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "touch", refuse)
    with pytest.raises(PtqlabError) as caught:
        check_can_write(tmp_path / "q")
    assert str(caught.value) == f"--out {tmp_path / 'q'}: {tmp_path} is not writable (Permission denied): choose another folder"


def test_a_results_folder_is_checked_where_its_files_go(tmp_path):
    (tmp_path / "lab").mkdir()
    assert check_can_write(tmp_path / "lab", inside=True) == tmp_path / "lab"
    assert check_can_write(tmp_path / "new" / "lab", inside=True) == tmp_path


def test_a_finished_folders_files_get_the_umask_permissions(tmp_path):
    """safetensors writes 0600; a checkpoint's files are as any new file under the process's umask (0644 under 022),
    so that the other users of a shared model store can read them."""
    import stat

    import torch
    from safetensors.torch import save_file

    from ptqlab import output

    with atomic_dir(tmp_path / "q") as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
        (tmp / "config.json").write_text("{}")
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "q" / name).stat().st_mode) == 0o666 & ~output._UMASK
