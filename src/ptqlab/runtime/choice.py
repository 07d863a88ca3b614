"""Which kernel computes a layer at a given number of rows, where two can: measured once per device and cached.

A decode step's matmul at 1-64 rows has more than one right kernel (for int4: the one-row kernel, the older
16-row tensor-core kernel, the small-batch kernel, dequantization + cuBLAS; for 8-bit weights: the small-batch
kernel or cuBLAS's `_scaled_mm` / `_int_mm`), and which is faster depends on the GPU, the layer's shape and the
rows, in ways a fixed rule gets wrong somewhere. So each layer offers its candidates (`candidates(rows)`), and
`choose_kernels` times them on the layer itself at each bucket of rows, keeps the fastest, and records the result in
a JSON table per device and library versions under the cache folder (`cache_root()/kernel_choices`), so that the next
load of any model with the same layer shapes on the same kind of GPU measures nothing. Layers then look their kernel
up by rows in a dict, inside or outside a CUDA graph. `print_table` shows the table (bench/runtime_speed.py prints
it).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from pathlib import Path

import torch

from ptqlab.embedded import cache_root
from ptqlab.output import write_atomically

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 2048)
"""A matmul of M rows takes the choice measured at the smallest bucket >= M; the last (prefill) at any more."""


def bucket(rows: int) -> int:
    for size in ROW_BUCKETS:
        if rows <= size:
            return size
    return ROW_BUCKETS[-1]


def table_path(device: torch.device) -> Path:
    """The cache file of this device kind and these library versions (a new torch or Triton measures again)."""
    import triton  # optional dependency: only GPU runs (choose_kernels) get here

    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    versions = f"torch{torch.__version__}-triton{triton.__version__}".replace("+", "_")
    return cache_root() / "kernel_choices" / f"{name}-{versions}.json"


def _graph_us(calls, repeats: int = 5) -> float:
    """Median GPU time of one replay of a CUDA graph that runs `calls` (no Python launch overhead: eager timing of a
    20-microsecond kernel measures the launches, not the kernel), in microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles, allocates, creates handles
        calls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the L2 cache: writing it evicts whatever a kernel read before."""
    return torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8, device=device)


def _time_us(fn, x: torch.Tensor, calls: int = 10) -> float:
    """GPU time of fn(x) as a decode step sees it: its weight not in L2 (the other layers' weights evicted it), in
    microseconds. Each call follows a write over twice the L2 cache; a graph of the writes alone is subtracted."""
    flush = _flush_buffer(x.device)

    def flushed(with_call: bool):
        def calls_():
            for _ in range(calls):
                flush.zero_()
                if with_call:
                    fn(x)
        return calls_

    return max(0.0, (_graph_us(flushed(True)) - _graph_us(flushed(False))) / calls)


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, table: dict) -> None:
    """Atomically, so that a run killed mid-write or a concurrent run never leaves half a table."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only cache: the choices hold for this process only
        pass


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(b for b in model.buffers() if b is not None and b.is_cuda).device


def choose_kernels(model: torch.nn.Module, rows: tuple[int, ...] = ROW_BUCKETS) -> dict:
    """For every layer of `model` that offers candidates, its kernel at each bucket of rows (the fastest, from the
    cached table or measured now and added to it). Returns the table's entries this model uses."""
    layers = [m for m in model.modules() if hasattr(m, "choice_key") and m.choice_key() is not None]
    if not layers:
        return {}
    path = table_path(_device_of(model))
    table = _load(path)
    used, measured = {}, False
    for layer in layers:
        fmt, n, k, group = layer.choice_key()
        chosen = {}
        for size in rows:
            key = f"{fmt} n={n} k={k} group={group} rows={size}"
            entry = table.get(key)
            candidates = layer.candidates(size)
            if entry is None or entry.get("kernel") not in candidates:
                if len(candidates) == 1:
                    entry = {"kernel": next(iter(candidates)), "us": {}}
                else:
                    x = layer.example_input(size)
                    times, failed = {}, {}
                    for name, fn in candidates.items():
                        try:
                            times[name] = _time_us(fn, x)
                        except Exception as e:  # e.g. a tile this Triton cannot compile for this GPU: not a candidate
                            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    if not times:
                        raise RuntimeError(f"{key}: no kernel ran ({failed})")
                    entry = {"kernel": min(times, key=times.get), "us": {name: round(t, 2) for name, t in times.items()}}
                    if failed:
                        entry["failed"] = failed
                    measured = True
                table[key] = entry
            chosen[size] = entry["kernel"]
            used[key] = entry
        layer.kernel_by_rows = chosen
    if measured:
        _save(path, table)
        _flush_buffer.cache_clear()
    return used


def print_table(entries: dict) -> str:
    """The choices as lines: layer shape and rows, the kernel taken, each candidate's time."""
    lines = []
    for key, entry in sorted(entries.items()):
        times = ", ".join(f"{name} {us:.1f} us" for name, us in entry.get("us", {}).items())
        lines.append(f"{key:48s} -> {entry['kernel']}" + (f"  ({times})" if times else ""))
    return "\n".join(lines)
