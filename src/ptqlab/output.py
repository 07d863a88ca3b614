"""Atomic output folders: a run writes into a hidden temporary sibling and renames it into place when done.

A crash or Ctrl-C leaves at most a `.NAME.partial-*` folder, never a folder at `--out` that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ptqlab.errors import PtqlabError
from ptqlab.record import RECORD_NAME, has_record


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path, overwrite: bool, protect: tuple[Path, ...] = (), needs_bytes: int = 0) -> None:
    """Refuse, in one line and before any work, an --out that cannot or must not be written: a file; a folder that
    is (or holds) a protected one, such as the source model; a non-empty folder without --overwrite, or with it but
    not a ptqlab output (no run record: --overwrite replaces only what ptqlab wrote); a place without write
    permission or with less free space than `needs_bytes`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PtqlabError(f"--out {out} exists and is a file: choose a folder path")
    resolved = out.resolve()
    for path in protect:
        source = Path(path).resolve()
        if source == resolved or resolved in source.parents:
            what = "is" if source == resolved else "contains"
            raise PtqlabError(f"--out {out} {what} the source model {path}: ptqlab never writes over its input; "
                              "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PtqlabError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
        if not has_record(out):  # the run record marks a folder that ptqlab wrote, and may replace
            raise PtqlabError(f"--out {out} holds files that ptqlab did not write (no {RECORD_NAME}): --overwrite replaces "
                              "only a ptqlab checkpoint; choose another folder")
    ancestor = _existing_ancestor(out.parent if not out.exists() else out)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PtqlabError(f"--out {out}: {ancestor} is not writable (permission denied): choose another folder")
    free = shutil.disk_usage(ancestor).free
    if needs_bytes and free < needs_bytes:
        raise PtqlabError(f"--out {out}: {free / 2**30:.2f} GiB free on that disk, the checkpoint needs at least "
                          f"{needs_bytes / 2**30:.2f} GiB: free space or choose another disk")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, protect: tuple[Path, ...] = (),
               resumable: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed. `resumable`: the folder is
    `.NAME.partial` (the same for every run), and a failure keeps it when it holds a resume state, so that the same
    run started again continues where this one stopped (engine/resume.py)."""
    out = Path(out).absolute()
    check_writable(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = resumable_partial(out) if resumable else out.parent / f".{out.name}.partial-{os.getpid()}"
    if not resumable:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not (resumable and (tmp / RESUME_NAME).is_file()):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / LOCK_NAME).unlink(missing_ok=True)
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def resumable_partial(out: str | Path) -> Path:
    """The partial folder of a resumable run writing `out` (the same for every run, and every rank of one)."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


RESUME_NAME = "resume.json"
"""A resumable partial folder's state file (engine/resume.py writes it)."""
LOCK_NAME = ".ptqlab.lock"


@contextmanager
def locked(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for this run: a second run on it refuses in one line instead of mixing its files and timings
    in. The lock is the kernel's (flock), so it goes with the process, however that ends."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PtqlabError(f"--out {folder} is in use by another ptqlab run ({holder}): wait for it to finish or "
                              "choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what}, pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def end_on_sigterm() -> None:
    """Make SIGTERM (what `timeout`, Slurm and `docker stop` send) end this process as Ctrl-C does: through every
    `finally`, so child processes are stopped and temporary folders removed, not left behind."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
