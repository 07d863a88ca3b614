"""Statistics, the engine's second phase: what every linear of a decoder layer reads, over real tokens only.

For every distinct input (q/k/v share one, gate/up share one), padding masked out, hooks accumulate what the recipe's
steps ask for (their `statistics` in engine/steps.py): H = 2/n Σ XᵀX (`hessian`: GPTQ, AWQ), the per-channel
max |x| (`absmax`: SmoothQuant) and mean |x| (`abssum`: AWQ). A transform that rescales an input updates them
exactly (`InputStats.rescale`) instead of forwarding the calibration set again.

Hessians are accumulated with fp32 matmuls; where activations are bf16/fp16, TF32 tensor cores are exact for them
(a bf16 value has 8 significant bits, TF32 keeps 11), so the fast path loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ptqlab.engine.capture import Batch
from ptqlab.engine.experts import MIN_EXPERT_TOKENS, expert_linear_names, routing, starved_experts
from ptqlab.engine.placement import hidden_states
from ptqlab.errors import PtqlabError

STATISTICS = ("hessian", "absmax", "abssum")


class InputStats:
    """Per distinct input tensor the hooked linears read (q/k/v share one, gate/up share one), over real tokens:
    Σ XᵀX (GPTQ, AWQ), the per-channel max |x| (SmoothQuant) and Σ |x| (AWQ)."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device, wanted=frozenset({"hessian"})):
        unknown = set(wanted) - set(STATISTICS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {', '.join(STATISTICS)}")
        self.linears, self.device = linears, device
        self.want = {name: name in wanted for name in STATISTICS}
        self.sums: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.abssum: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # linear -> the linear whose statistics it shares
        self.mask: torch.Tensor | None = None
        self.batches = 0
        self.coverage: list[dict] = []  # MoE layers: tokens per expert, which fell back (see collect)
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def start_batch(self, mask: torch.Tensor | None) -> None:
        """`mask` [B, T] marks real tokens; None when the batch has no padding (no gather needed)."""
        self.mask = None if mask is None else mask.bool()
        self.batches += 1
        self._seen = {}  # only filled during the first batch, see _hook

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            x = args[0]
            if self.batches == 1:
                # Which linears read the very same tensor (q/k/v, gate/up) is decided once, on the first batch,
                # holding each input alive so that no later tensor can reuse its address within the forward.
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                owner = self._seen.get(key)
                if owner is not None:
                    self.shared[name] = owner[0]
                    return
                self._seen[key] = (name, x)
            elif name in self.shared:
                return
            rows = x[self.mask] if self.mask is not None and x.shape[:2] == self.mask.shape else x.reshape(-1, x.shape[-1])
            if name not in self.counts:
                self.counts[name] = 0
                if self.want["hessian"]:
                    self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                if self.want["absmax"]:
                    self.absmax[name] = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
                if self.want["abssum"]:
                    self.abssum[name] = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
            if self.want["hessian"]:
                self.sums[name] += gram(rows)
            if self.want["absmax"] or self.want["abssum"]:
                magnitude = rows.abs().float()
                if self.want["absmax"]:
                    torch.maximum(self.absmax[name], magnitude.amax(dim=0), out=self.absmax[name])
                if self.want["abssum"]:
                    self.abssum[name] += magnitude.sum(dim=0)
            self.counts[name] += rows.shape[0]
        return hook

    def owner(self, name: str) -> str:
        owner = self.shared.get(name, name)
        if self.counts.get(owner, 0) == 0:
            raise PtqlabError(f"{name}: no calibration token reached this layer; check the calibration data")
        return owner

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.owner(name)
        return self.sums[owner] * (2.0 / self.counts[owner])

    def channel_max(self, name: str) -> torch.Tensor:
        return self.absmax[self.owner(name)]

    def channel_mean(self, name: str) -> torch.Tensor:
        owner = self.owner(name)
        return self.abssum[owner] / self.counts[owner]

    def take(self, other: InputStats) -> None:
        """Replace the statistics of the linears `other` hooked by its own (a second pass over other tokens)."""
        for name in other.linears:
            for table in (self.sums, self.absmax, self.abssum, self.counts, self.shared):
                table.pop(name, None)
        for table, theirs in ((self.sums, other.sums), (self.absmax, other.absmax), (self.abssum, other.abssum),
                              (self.counts, other.counts), (self.shared, other.shared)):
            table.update(theirs)

    def rescale(self, name: str, scales: torch.Tensor) -> None:
        """The input of `name` (and of every linear sharing it) is now x / scales per channel: update the statistics
        exactly (H -> H / (s sᵀ)) instead of forwarding the calibration set again."""
        owner = self.owner(name)
        s = scales.float().to(self.device)
        if owner in self.sums:
            self.sums[owner] /= torch.outer(s, s)
        if owner in self.absmax:
            self.absmax[owner] /= s
        if owner in self.abssum:
            self.abssum[owner] /= s


def gram(rows: torch.Tensor) -> torch.Tensor:
    """rowsᵀ rows in fp32. bf16/fp16 inputs on a GPU: tensor-core matmul with fp32 accumulation and output, which is
    exact for the products; elsewhere an fp32 matmul (TF32 allowed only for bf16/fp16 values, where it is exact)."""
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(rows.T, rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=...)
            pass
    half = rows.dtype in (torch.bfloat16, torch.float16)
    rows = rows.float()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = half
    try:
        return rows.T @ rows
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def collect(layer: nn.Module, linears: dict[str, nn.Linear], batches: list[Batch], masks: list, index: int,
            device: torch.device, wanted: frozenset[str], prefix: str = "",
            min_expert_tokens: int = MIN_EXPERT_TOKENS,
            reduce: Callable[[InputStats], None] | None = None) -> InputStats:
    """Forward every calibration batch through decoder layer `index` (named `prefix`) while hooks on `linears`
    accumulate `wanted`. In an MoE layer each expert counts the real tokens routed to it; the experts routed fewer
    than `min_expert_tokens` are gathered again, from every real token of the layer (engine/experts.py); which
    did, and each expert's count, is the statistics' `coverage`. `reduce` (several ranks, engine/distributed.py)
    combines each pass's statistics with the other ranks' before anything is decided from them."""
    stats = _forward_all(layer, linears, batches, masks, index, device, wanted, None)
    if reduce is not None:
        reduce(stats)
    starved, stats.coverage = starved_experts(layer, prefix, stats.counts, min_expert_tokens)
    if starved:
        names = expert_linear_names(layer, prefix, starved)
        again = _forward_all(layer, {n: linears[n] for n in names if n in linears}, batches, masks, index, device,
                             wanted, starved)
        if reduce is not None:
            reduce(again)
        stats.take(again)
    return stats


def _forward_all(layer: nn.Module, linears: dict[str, nn.Linear], batches: list[Batch], masks: list, index: int,
                 device: torch.device, wanted: frozenset[str], all_tokens: dict | None) -> InputStats:
    with InputStats(linears, device, wanted) as stats:
        for (batch, hidden), mask in zip(hidden_states(batches, device), masks):
            stats.start_batch(mask)
            with routing(layer, mask, all_tokens):
                layer(hidden, **batch.layer_kwargs[index])
    return stats
