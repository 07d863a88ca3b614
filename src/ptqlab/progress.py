"""What the user sees while ptqlab works: ptqlab's own progress, and nothing of other libraries' unless asked.

In a terminal, progress is a rich bar with per-item status, elapsed time and ETA, and messages wrap to its width.
Written to anything else (a log file, a batch job's output), every message is one line, never hard-wrapped, so
scripts can grep it, and progress is plain lines at a modest rate: the first item, then at most one line every
`PLAIN_INTERVAL_S` seconds, and the last.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

PLAIN_INTERVAL_S = 5.0


class _Console(Console):
    """rich's console, soft-wrapping (one message, one line) whenever it is not writing to a terminal. Decided per
    print, since the stream behind stderr can change (a test runner's capture, a redirected worker)."""

    @property
    def soft_wrap(self) -> bool:
        return not self.is_terminal

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:  # rich's constructor assigns it; the property decides
        pass


console = _Console(stderr=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout meanwhile goes to stderr: ptqlab's prints, a library's, and a worker process's
    (it inherits file descriptor 1, so the descriptor itself is redirected). For a command whose stdout carries
    only its machine-readable result (bench --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def say(message: str) -> None:
    """One message to the user (rich markup allowed)."""
    console.print(message, highlight=False)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def track(items: Iterable[T], description: str, total: int, quiet: bool = False, status=lambda item: "") -> Iterator[T]:
    """Yield items while showing how many are done, the current item's status, elapsed time and ETA."""
    if quiet:
        yield from items
        return
    if not console.is_terminal:
        yield from _plain_track(items, description, total, status)
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            progress.update(task, status=status(item))
            yield item
            progress.advance(task)


def _plain_track(items: Iterable[T], description: str, total: int, status) -> Iterator[T]:
    start = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if done == 1 or done == total or now - last >= PLAIN_INTERVAL_S:
            last = now
            elapsed = now - start
            eta = elapsed / done * (total - done)
            text = status(item)
            console.print(f"{description}: {done}/{total}{'  ' + text if text else ''}  elapsed {format_seconds(elapsed)}"
                          f"  eta {format_seconds(eta)}", highlight=False, markup=False)


# Environment read by libraries as they import (and inherited by ptqlab's benchmark processes).
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


VERBOSE_ENV = "PTQLAB_VERBOSE"
"""Set to 1 by a --verbose run, so that its benchmark processes leave the libraries alone too."""


def quiet_libraries(verbose: bool = False) -> None:
    """Keep other libraries' progress bars, warnings and log lines off the user's terminal (ptqlab's own progress
    tells the story); `verbose` leaves them as they are."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    for name in ("transformers", "compressed_tensors", "datasets", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _silence_tqdm()
    try:  # already imported modules read their settings at import: tell them directly
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _silence_tqdm() -> None:
    """tqdm's TQDM_DISABLE only fills arguments a caller leaves out, and libraries pass `disable=` themselves
    (compressed-tensors' "Compressing model", "Dispatching model"): every tqdm bar of this process is disabled."""
    try:
        from tqdm import std
    except ImportError:  # pragma: no cover
        return
    if getattr(std.tqdm, "_ptqlab_silenced", False):
        return
    init = std.tqdm.__init__

    @functools.wraps(init)
    def silenced(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = silenced
    std.tqdm._ptqlab_silenced = True


def log_event(log_path, event: str, **fields) -> None:
    """Append one JSON line {time, event, ...} to a machine-readable log."""
    import json
    from datetime import datetime, timezone

    record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
