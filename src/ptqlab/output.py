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


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless overwrite was asked for."""
    if out.exists() and not out.is_dir():
        raise PtqlabError(f"--out {out} exists and is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PtqlabError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed."""
    out = Path(out).absolute()
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
