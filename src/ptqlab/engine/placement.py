"""Where a run's tensors wait while the GPU works on others, as the memory plan (engine/memory.py) places them:
calibration hidden states in pinned CPU memory, copied to the GPU a batch ahead of the batch computing; decoder
layers in CPU memory or on disk, the next one read and copied while the current one computes. Both copies run on
a side stream, so that a run over its GPU budget's share pays little more than transfer time it would not hide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ptqlab.engine.capture import Batch


def to_host(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` in pinned CPU memory (what a side stream copies from without blocking)."""
    return hidden.to("cpu").pin_memory()


def hidden_states(batches: list[Batch], device: torch.device) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each batch with its hidden states on `device`: as they are where they live there; from pinned CPU memory,
    the next batch's copy in flight on a side stream while the caller computes on this one."""
    if not batches or device.type != "cuda" or batches[0].hidden.device.type == "cuda":
        for batch in batches:
            yield batch, batch.hidden
        return
    copies, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def start(batch: Batch) -> torch.Tensor:
        with torch.cuda.stream(copies):
            return batch.hidden.to(device, non_blocking=True)

    upcoming = start(batches[0])
    for i, batch in enumerate(batches):
        hidden = upcoming
        compute.wait_stream(copies)
        hidden.record_stream(compute)  # allocated on the side stream, used and freed on this one
        if i + 1 < len(batches):
            upcoming = start(batches[i + 1])
        yield batch, hidden


def store_hidden(batch: Batch, output: torch.Tensor) -> None:
    """The layer's output becomes the batch's hidden states, where they live: on the device, or copied back into
    the batch's pinned buffer (asynchronously: `settle` before the host reads them)."""
    if batch.hidden.device == output.device:
        batch.hidden = output
    else:
        batch.hidden.copy_(output, non_blocking=True)


def settle(device: torch.device) -> None:
    """Wait for the copies back to pinned memory (before the host, or the next layer's side stream, reads them)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class LayerPrefetcher:
    """Decoder layers on `device` in order, each read by `fetch` (from CPU memory, or from disk when streaming) and
    copied on a background thread and a side stream while the caller computes on the one before."""

    def __init__(self, fetch: Callable[[int], nn.Module], device: torch.device):
        self.fetch, self.device = fetch, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptqlab-prefetch")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict[int, object] = {}

    def _load(self, index: int):
        if self.stream is None:
            return self.fetch(index).to(self.device), None
        with torch.cuda.stream(self.stream):
            layer = self.fetch(index).to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return layer, done

    def get(self, index: int, following: int | None) -> nn.Module:
        """Layer `index` on the device (waited for), with layer `following` (if any) set on its way."""
        future = self.pending.pop(index, None) or self.pool.submit(self._load, index)
        layer, done = future.result()
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for tensor in [*layer.parameters(), *layer.buffers()]:
                if tensor.is_cuda:
                    tensor.record_stream(compute)
        if following is not None:
            self.pending[following] = self.pool.submit(self._load, following)
        return layer

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()
