"""Greedy generation with the static KV cache; on a GPU the one-token step is a CUDA graph.

The step (forward of one token per row, argmax, writing the token and advancing the position) touches only
buffers allocated once, so on CUDA it is captured once per (batch, cache length) and then replayed: decoding a
token costs one graph launch and no Python, which is what makes batch-1 decode approach the memory-bandwidth
floor. The next token, its position and the output row stay on the device; the host reads them only at the end
(or after each step when it must stop at an end-of-sequence token).
"""

from __future__ import annotations

import time

import torch

from ptqlab import triton_support
from ptqlab.runtime import fused
from ptqlab.runtime.model import RuntimeModel, cache_length


class Generator:
    """Greedy decoding of rows of equal length with a static cache of `max_length` positions."""

    def __init__(self, model: RuntimeModel, batch_size: int, max_length: int, graph: bool | None = None) -> None:
        self.model = model
        if max_length > model.max_positions:
            raise ValueError(f"{max_length} positions exceed the {model.max_positions} the model was loaded for")
        self.batch_size, self.max_length = batch_size, min(cache_length(max_length), model.max_positions)
        device = model.device
        self.token = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.sequence = torch.zeros((batch_size, self.max_length), dtype=torch.long, device=device)
        # An MoE layer whose experts run grouped picks them on the host (which run depends on the tokens): such a
        # step cannot be captured in a CUDA graph, so it runs eagerly.
        capturable = all(block.moe is None or block.moe.capturable(batch_size) for block in model.blocks)
        self.use_graph = device.type == "cuda" and capturable if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _own_cache(self) -> None:
        """The model holds one cache at a time: take it back (and capture again) if another generator used it."""
        if self.model.cache_owner is not self:
            self.model.setup_cache(self.batch_size, self.max_length, owner=self)
            self.graph = None

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.model(self.token, self.pos, last_only=True).logits[:, -1]
        if triton_support.available(logits):
            fused.greedy_next(logits, self.token, self.sequence, self.pos, pdl=self.model.options.pdl)
        else:
            token = logits.argmax(-1, keepdim=True)
            self.token.copy_(token)
            self.sequence.index_copy_(1, self.pos + 1, token)
        self.pos += 1

    def _capture(self) -> None:
        """Warm up (compiles kernels, creates library handles), then record the step; buffers are restored after."""
        saved = (self.token.clone(), self.pos.clone(), self.sequence.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for buffer, value in zip((self.token, self.pos, self.sequence), saved):
            buffer.copy_(value)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Run the prompt [batch, P] through the model (filling the cache) and pick the first new token."""
        length = input_ids.shape[1]
        if length >= self.max_length:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {self.max_length}")
        self._own_cache()
        logits = self.model(input_ids).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        self.sequence[:, :length] = input_ids
        self.sequence[:, length:length + 1] = token
        self.token.copy_(token)
        self.pos.fill_(length)

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """`steps` more tokens, each fed back as the next input."""
        self._own_cache()
        if self.use_graph and self.graph is None:
            self._capture()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    def generate(self, input_ids: torch.Tensor, new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation [batch, ≤ new_tokens] of input_ids; stops early only at EOS in every row."""
        length = input_ids.shape[1]
        if length + new_tokens > self.max_length:
            raise ValueError(f"{length} + {new_tokens} tokens do not fit a cache of {self.max_length}")
        self.prefill(input_ids)
        produced = 1
        while produced < new_tokens:
            if eos_token_id is not None and bool((self.sequence[:, length:length + produced] == eos_token_id).any(-1).all()):
                break
            self.decode(1)
            produced += 1
        return self.sequence[:, length:length + produced].clone()

    def timed(self, input_ids: torch.Tensor, new_tokens: int) -> dict:
        """Exactly `new_tokens` tokens, timing prefill (to the first token) and decode separately."""
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)
        self._own_cache()
        if self.use_graph and self.graph is None:
            self._capture()
        sync()
        start = time.perf_counter()
        self.prefill(input_ids)
        sync()
        first = time.perf_counter()
        self.decode(new_tokens - 1)
        sync()
        end = time.perf_counter()
        return {"ttft_s": first - start, "decode_s": end - first, "total_s": end - start}
