"""Where ptqlab writes, and how: the one check that an --out may and can be written, and atomic writes. A run writes
a folder into a hidden temporary sibling (`atomic_dir`) and a file into a temporary sibling (`atomic_file`), and
renames it into place when done.

A crash or Ctrl-C leaves at most a `.NAME.partial-*` folder or a `NAME.partial-*` file, never a folder or file at
its name that looks complete but is not; a hard kill (SIGKILL) also leaves the run's lock file `.NAME.lock`,
which the next run takes over.
"""

from __future__ import annotations

import glob
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


def check_can_write(out: Path, inside: bool = False) -> Path:
    """Refuse, in one line and before any work, an --out where this process cannot create a file -> the folder
    checked: the nearest existing folder above `out` (a checkpoint or a GGUF file is written as a temporary sibling
    and renamed into place), or at `out` with `inside` (a results folder, whose files are written in it). Tried with
    a real file: permission bits tell neither a root user's answer nor a read-only mount's."""
    folder = _existing_ancestor(Path(out).absolute() if inside else Path(out).absolute().parent)
    probe = folder / f".ptqlab-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PtqlabError(f"--out {out}: {folder} is not writable ({e.strerror or e}): choose another folder") from None
    return folder


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
    free = shutil.disk_usage(check_can_write(out)).free
    if needs_bytes and free < needs_bytes:
        raise PtqlabError(f"--out {out}: {free / 2**30:.2f} GiB free on that disk, the checkpoint needs at least "
                          f"{needs_bytes / 2**30:.2f} GiB: free space or choose another disk")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, protect: tuple[Path, ...] = (),
               resumable: bool = False, what: str = "ptqlab") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed. `resumable`: the folder is
    `.NAME.partial` (the same for every run), and a failure keeps it when it holds a resume state, so that the same
    run started again continues where this one stopped (engine/resume.py).

    The run holds `out` (`.NAME.lock` beside it, `what` naming the run) before it touches anything: a second run on
    the same --out, calibrated or data-free, is refused in one line and leaves the first's files alone; and `out` is
    checked again once held, so a run never replaces a checkpoint another run finished meanwhile without
    --overwrite."""
    out = Path(out).absolute()
    check_writable(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _held(out.parent / f".{out.name}.lock", out, what, remove=True):
        check_writable(out, overwrite, protect)
        tmp = resumable_partial(out) if resumable else out.parent / f".{out.name}.partial-{os.getpid()}"
        _check_partial(tmp, out)
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
        try:
            yield tmp
        except BaseException:
            if not (resumable and (tmp / RESUME_NAME).is_file()):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / LOCK_NAME).unlink(missing_ok=True)  # an older ptqlab locked inside the partial folder
        _give_umask_permissions(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)


def _umask() -> int:
    """This process's umask (read once: setting it to read it back is not safe once threads write files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _give_umask_permissions(folder: Path) -> None:
    """The files of a finished folder as any program's new files are (0644 under umask 022): safetensors writes
    its files 0600, which other users of a shared model store could not read."""
    mode = 0o666 & ~_UMASK
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _check_partial(tmp: Path, out: Path) -> None:
    """Refuse a partial folder path that is not ptqlab's to use: a symbolic link (deleting or writing through it
    would reach whatever it points at, the user's files) or something other than a folder."""
    if tmp.is_symlink():
        raise PtqlabError(f"--out {out}: {tmp} is a symbolic link, where ptqlab keeps its unfinished work; it never "
                          "follows a link there: remove the link (not what it points to) or choose another --out")
    if tmp.exists() and not tmp.is_dir():
        raise PtqlabError(f"--out {out}: {tmp} is a file, where ptqlab keeps its unfinished work in a folder: move "
                          "or remove that file, or choose another --out")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the file at; on success the file is flushed to the disk (fsync)
    and replaces `path` in one rename, on failure it is removed: a reader of `path` sees the old file or the whole
    new one, never a part (a crash between the two leaves a `NAME.partial-PID` file, which no reader opens)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, atomically (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def partial_files(path: str | Path) -> list[Path]:
    """The temporary files atomic_file left beside `path` (a writer killed before its cleanup ran)."""
    path = Path(path)
    return [p for p in path.parent.glob(f"{glob.escape(path.name)}.partial-*") if p.is_file()]


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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _held(folder / LOCK_NAME, folder, what):
        yield


@contextmanager
def _held(lock_file: Path, out: Path, what: str, remove: bool = False) -> Iterator[None]:
    """Hold `lock_file` (flock, non-blocking: refused in one line naming `out` and the holder). `remove`: the file
    goes when the run ends; a run that locked it just before it went sees another file at the path and tries again,
    so two runs never both hold `out`."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    while True:
        try:  # never through a link: the lock file's text would be written into whatever it points at
            handle = os.fdopen(os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666), "r+")
        except OSError as e:
            raise PtqlabError(f"--out {out}: cannot use {lock_file} as its lock ({e.strerror or e}; a link or a folder "
                              "there?): remove it or choose another --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise PtqlabError(f"--out {out} is in use by another ptqlab run ({holder}): wait for it to finish or "
                              "choose another --out") from None
        try:
            same = os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed it as we locked it: lock the new one
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what}, pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            if remove:
                Path(lock_file).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def end_on_sigterm() -> None:
    """Make SIGTERM (what `timeout`, Slurm and `docker stop` send) end this process as Ctrl-C does: through every
    `finally`, so child processes are stopped and temporary folders removed, not left behind."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
