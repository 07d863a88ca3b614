"""Capture, the engine's first phase: the calibration set as padded batches, and what the first decoder layer reads.

Every decoder layer is swapped for a catcher that records its keyword arguments (attention masks of its own kind,
position embeddings, ...) and passes the hidden states through; one forward of the base model per calibration batch
then yields layer 0's inputs and every layer's arguments, with no wasted layer compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ptqlab.data import CalibrationSet
from ptqlab.errors import PtqlabError
from ptqlab.models import decoder_layers


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    layer_kwargs: list[dict] = field(default_factory=list)  # per decoder layer
    hidden: torch.Tensor | None = None  # the current layer's input [B, T, H]
    float_hidden: torch.Tensor | None = None  # autoround: the float model's input to the current layer [B, T, H]


# A sample joins a batch only if it is at least this fraction of the batch's longest one: padding, computed and
# thrown away, then stays under a quarter of each row, whatever the spread of lengths (chats and docstrings vary
# from tens to thousands of tokens).
MIN_FILL = 0.75


def make_batches(calibration: CalibrationSet, batch_size: int) -> list[Batch]:
    """Length-bucketed batches of at most `batch_size` samples (sorted by length, each at least MIN_FILL of its
    batch's longest), right-padded with the calibration set's pad id and a mask."""
    samples = sorted(calibration.samples, key=len, reverse=True)
    groups: list[list[torch.Tensor]] = []
    for sample in samples:
        if groups and len(groups[-1]) < batch_size and len(sample) >= MIN_FILL * len(groups[-1][0]):
            groups[-1].append(sample)
        else:
            groups.append([sample])
    batches = []
    for group in groups:
        length = len(group[0])
        ids = torch.full((len(group), length), calibration.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, sample in enumerate(group):
            ids[row, :len(sample)] = sample
            mask[row, :len(sample)] = 1
        batches.append(Batch(ids, mask))
    return batches


class _LayerCatcher(nn.Module):
    """Stands in for a decoder layer during capture: records its kwargs, passes hidden states through."""

    def __init__(self, index: int, layer: nn.Module, sink: list):
        super().__init__()
        self.index, self.sink = index, sink
        self.attention_type = getattr(layer, "attention_type", None)  # models that pick masks per layer read this

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise PtqlabError("this architecture passes positional arguments to its decoder layers, which the calibration "
                              "engine does not support yet")
        self.sink.append((self.index, hidden_states, kwargs))
        return hidden_states


@torch.no_grad()
def capture(model: nn.Module, batches: list[Batch], device: torch.device, release: bool = False) -> None:
    """Fill each batch's layer-0 input and every layer's keyword arguments. `release`: move what the capture moved
    to `device` (embeddings, rotary tables, final norm) back to the CPU after it, for a run that gives the device to
    one layer at a time."""
    layers = decoder_layers(model)
    base = model.get_decoder()
    originals = list(layers)
    sink: list = []
    for i, layer in enumerate(originals):
        layers[i] = _LayerCatcher(i, layer, sink)
    try:
        base.to(device)  # with the catchers in place: embeddings, rotary, final norm only
        for batch in batches:
            sink.clear()
            base(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
            batch.hidden = sink[0][1]
            batch.layer_kwargs = [kwargs for _, _, kwargs in sorted(sink, key=lambda item: item[0])]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        if release:
            for child in base.children():
                if child is not layers:
                    child.to("cpu")
