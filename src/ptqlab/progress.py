"""Progress for long work: a rich bar with per-item status and ETA, or nothing when quiet."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True)


def track(items: Iterable[T], description: str, total: int, quiet: bool = False, status=lambda item: "") -> Iterator[T]:
    """Yield items while a bar shows how many are done, the current item's status, elapsed time and ETA."""
    if quiet:
        yield from items
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


def log_event(log_path, event: str, **fields) -> None:
    """Append one JSON line {time, event, ...} to a machine-readable log."""
    import json
    from datetime import datetime, timezone

    record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
