"""Mixture-of-experts models: each expert's projections as nn.Linear modules of their own, so that every expert is
calibrated on the tokens its router sends it, quantized like a dense MLP and written under the names of the hub
checkpoints.

transformers 5 keeps the experts of Qwen2-MoE, Qwen3-MoE and Mixtral as two 3-D parameters per layer (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]); hub checkpoints, vLLM's loaders and llm-compressor's outputs store one tensor per
expert projection (`mlp.experts.7.gate_proj.weight`; Mixtral: `block_sparse_moe.experts.7.w1.weight`). `unfuse`
swaps the fused module for `RoutedExperts`, which computes the same thing through per-expert linears whose names
are the checkpoint's, so the engine's targets, hooks and writers need nothing MoE-specific.

While the engine gathers statistics (`routing`), RoutedExperts leaves padding out of every expert's input and, for
experts named in `all_tokens`, computes on every real token of the batch instead of the routed ones: the fallback
for an expert the router starved, whose statistics would otherwise come from a handful of tokens or none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ptqlab.families import moe_layout

MIN_EXPERT_TOKENS = 128
"""Default: an expert routed fewer real calibration tokens than this in a layer is calibrated on all of that
layer's tokens instead (its statistics from a few tokens would be noise, from none a zero Hessian)."""


class _Expert(nn.Module):
    """One expert's three projections, under the checkpoint's names."""

    def __init__(self, names: tuple[str, str, str], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.names = names
        for name, weight in zip(names, (gate, up, down)):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor, act) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(act(gate(x)) * up(x))


class RoutedExperts(nn.ModuleList):
    """Stands in for transformers' fused experts module, with the same call (hidden states [N, H], the router's
    top-k expert indices and weights [N, k]) and the same arithmetic, one _Expert per expert."""

    def __init__(self, experts: list[_Expert], act):
        super().__init__(experts)
        object.__setattr__(self, "act", act)  # not a child: the experts are the list's only entries
        self.real_tokens: torch.Tensor | None = None
        self.all_tokens: frozenset[int] = frozenset()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        real = self.real_tokens
        routed = top_k_index.T  # [k, N]: tokens taken slot by slot, in transformers' order
        for index in sorted(set(torch.unique(top_k_index).tolist()) | self.all_tokens):
            slot, token = torch.where(routed == index)
            if real is not None:
                keep = real[token]
                slot, token = slot[keep], token[keep]
            expert = self[index]
            if index in self.all_tokens:  # its input: every real token; its output still goes to the routed ones
                rows = None if real is None else real.nonzero().flatten()
                every = expert(hidden_states if rows is None else hidden_states[rows], self.act)
                result = every[token if rows is None else torch.cumsum(real, 0)[token] - 1]
            else:
                result = expert(hidden_states[token], self.act)
            out.index_add_(0, token, (result * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def unfuse(model: nn.Module) -> int:
    """Replace every fused experts module of a supported MoE `model` by RoutedExperts (the weights are views of the
    fused ones: no copy) -> how many were replaced. Works on the meta device too (a streamed model's skeleton)."""
    layout = moe_layout(model.config)
    if layout is None:
        return 0
    fused = [(name, module) for name, module in model.named_modules()
             if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and module.gate_up_proj.dim() == 3]
    for name, module in fused:
        gate_up, down = module.gate_up_proj.data, module.down_proj.data
        inner = gate_up.shape[1] // 2
        experts = [_Expert(layout.projections, gate_up[e, :inner], gate_up[e, inner:], down[e])
                   for e in range(gate_up.shape[0])]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RoutedExperts(experts, module.act_fn))
    return len(fused)


def routed_experts(module: nn.Module) -> dict[str, RoutedExperts]:
    """The RoutedExperts inside `module`, by their name in it."""
    return {name: m for name, m in module.named_modules() if isinstance(m, RoutedExperts)}


@contextmanager
def routing(module: nn.Module, real_tokens: torch.Tensor | None, all_tokens: dict[str, frozenset[int]] | None = None
            ) -> Iterator[None]:
    """While statistics are gathered: the experts in `module` see only `real_tokens` ([B, T] mask, None: all), and
    those listed in `all_tokens` (by RoutedExperts name) every real token."""
    experts = routed_experts(module)
    for name, m in experts.items():
        m.real_tokens = None if real_tokens is None else real_tokens.flatten().bool()
        m.all_tokens = (all_tokens or {}).get(name, frozenset())
    try:
        yield
    finally:
        for m in experts.values():
            m.real_tokens, m.all_tokens = None, frozenset()


def starved_experts(layer: nn.Module, prefix: str, counts: dict[str, int], min_tokens: int
                    ) -> tuple[dict[str, frozenset[int]], list[dict]]:
    """From the tokens each expert's statistics counted (keyed by its first projection's full name): the experts
    below `min_tokens`, by RoutedExperts name in `layer`; and the layer's coverage, one entry per RoutedExperts
    (tokens per expert, which fell back)."""
    starved, coverage = {}, []
    for name, experts in routed_experts(layer).items():
        full = f"{prefix}.{name}" if prefix else name
        tokens = [counts.get(f"{full}.{e}.{expert.names[0]}", 0) for e, expert in enumerate(experts)]
        low = frozenset(e for e, n in enumerate(tokens) if n < min_tokens)
        if low:
            starved[name] = low
        coverage.append({"module": full, "tokens": tokens, "fell_back": sorted(low), "min_tokens": min_tokens})
    return starved, coverage


def expert_linear_names(layer: nn.Module, prefix: str, experts: dict[str, frozenset[int]]) -> list[str]:
    """The full names of the projections of `experts` (indices by RoutedExperts name in `layer`)."""
    out, modules = [], routed_experts(layer)
    for name, indices in experts.items():
        module = modules[name]
        full = f"{prefix}.{name}" if prefix else name
        out += [f"{full}.{e}.{projection}" for e in sorted(indices) for projection in module[e].names]
    return out
