"""Mixture-of-experts models: each expert's projections as nn.Linear modules of their own, so that every expert is
calibrated on the tokens its router sends it, quantized like a dense MLP and written under the names of the hub
checkpoints.

transformers 5 keeps the experts as two 3-D parameters per layer, in the layout the family row names
(ExpertLayout): `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (Qwen2-MoE, Qwen3-MoE, Mixtral); transposed,
[E, H, 2I] and [E, I, H] (Llama 4); transposed with gate and up interleaved and with biases (gpt-oss). Hub
checkpoints, vLLM's loaders and llm-compressor's outputs store one tensor per expert projection
(`mlp.experts.7.gate_proj.weight`; Mixtral: `block_sparse_moe.experts.7.w1.weight`). `unfuse` swaps the fused
module for `RoutedExperts`, which computes the same thing through per-expert linears whose names are the
checkpoint's, so the engine's targets, hooks and writers need nothing MoE-specific. Llama 4's block calls its fused
experts on every token of every expert, the routing weight multiplied into their input (zero for the experts not
chosen): `unfuse` swaps that block for `InputWeightedMoe`, which computes the same through RoutedExperts called as
every other family's are.

While the engine gathers statistics (`routing`), RoutedExperts leaves padding out of every expert's input and, for
experts named in `all_tokens`, computes on every real token of the batch instead of the routed ones: the fallback
for an expert the router starved, whose statistics would otherwise come from a handful of tokens or none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ptqlab.families import ExpertLayout, moe_layout

MIN_EXPERT_TOKENS = 128
"""Default: an expert routed fewer real calibration tokens than this in a layer is calibrated on all of that
layer's tokens instead (its statistics from a few tokens would be noise, from none a zero Hessian)."""


@dataclass(frozen=True)
class Gated:
    """act(gate) * up, the gated MLP of most families."""

    act: nn.Module

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's experts: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit), in the
    order of transformers' GptOssExperts._apply_gate (so the same floats come out)."""

    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def _combine(layout: ExpertLayout, fused: nn.Module):
    """How the experts of `fused` (transformers' module) combine their gate and up outputs."""
    if layout.activation == "clamped_swiglu":
        return ClampedSwiGLU(fused.alpha, fused.limit)
    if layout.activation == "gated":
        return Gated(fused.act_fn)
    raise ValueError(f"unknown expert activation {layout.activation!r} (ExpertLayout.activation)")


class _Expert(nn.Module):
    """One expert's three projections, under the checkpoint's names (with their biases, where the family has them)."""

    def __init__(self, names: tuple[str, str, str], weights: tuple[torch.Tensor, ...],
                 biases: tuple[torch.Tensor | None, ...] = (None, None, None)):
        super().__init__()
        self.names = names
        for name, weight, bias in zip(names, weights, biases):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=False)
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor, combine) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(combine(gate(x), up(x)))


class RoutedExperts(nn.ModuleList):
    """Stands in for transformers' fused experts module, with the same call (hidden states [N, H], the router's
    top-k expert indices and weights [N, k]) and the same arithmetic, one _Expert per expert. `weight_on_input`:
    the routing weight multiplies each expert's input instead of its output (Llama 4)."""

    def __init__(self, experts: list[_Expert], combine, weight_on_input: bool = False):
        super().__init__(experts)
        object.__setattr__(self, "combine", combine)  # not a child: the experts are the list's only entries
        self.weight_on_input = weight_on_input
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
            weights = top_k_weights[token, slot, None]
            expert = self[index]
            if index in self.all_tokens:  # its input: every real token; its output still goes to the routed ones
                x = hidden_states if real is None else hidden_states[real.nonzero().flatten()]
                position = token if real is None else torch.cumsum(real, 0)[token] - 1  # of each routed token in x
                if self.weight_on_input:  # the routed tokens at their weight, the others at full weight
                    x = x.index_put((position,), x[position] * weights)
                result = expert(x, self.combine)[position]
            else:
                x = hidden_states[token]
                result = expert(x * weights if self.weight_on_input else x, self.combine)
            if not self.weight_on_input:
                result = result * weights
            out.index_add_(0, token, result.to(out.dtype))
        return out


class InputWeightedMoe(nn.Module):
    """Stands in for Llama 4's MoE block (Llama4TextMoe), with its router and shared expert: the router gives each
    token sigmoid(logit) for its top-k experts and 0 for the others ([N, E]); the fused experts compute on every
    token of every expert, the input multiplied by that weight, and the block adds the shared expert's output to
    their sum. Here the routed experts compute on their top-k tokens only (an expert of a zero input gives zero:
    no biases, act(0) * 0 = 0), the same sums."""

    def __init__(self, block: nn.Module, experts: RoutedExperts):
        super().__init__()
        self.router, self.shared_expert, self.experts = block.router, block.shared_expert, experts
        self.top_k, self.hidden_dim = block.top_k, block.hidden_dim

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        scores, logits = self.router(hidden_states)
        top_k_index = torch.topk(logits, self.top_k, dim=1).indices  # the router's own choice, recomputed
        out = self.shared_expert(hidden_states)
        out.add_(self.experts(hidden_states, top_k_index, scores.gather(1, top_k_index)))
        return out, logits


def _per_expert(layout: ExpertLayout, fused: nn.Module, e: int) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """Expert e's (gate, up, down) weights [out, in] as views of the fused parameters, and their biases (or Nones)."""
    gate_up, down = fused.gate_up_proj.data[e], fused.down_proj.data[e]
    if layout.transposed:  # x @ W: [H, 2I] and [I, H]
        gate_up, down = gate_up.T, down.T
    inner = gate_up.shape[0] // 2
    rows = (slice(0, None, 2), slice(1, None, 2)) if layout.interleaved else (slice(0, inner), slice(inner, None))
    weights = (gate_up[rows[0]], gate_up[rows[1]], down)
    bias = getattr(fused, "gate_up_proj_bias", None)
    if bias is None:
        return weights, (None, None, None)
    return weights, (bias.data[e, rows[0]], bias.data[e, rows[1]], fused.down_proj_bias.data[e])


def unfuse(model: nn.Module) -> int:
    """Replace every fused experts module of a supported MoE `model` by RoutedExperts (the weights are views of the
    fused ones: no copy; with `router_weight_on_input`, the whole block by InputWeightedMoe) -> how many were
    replaced. Works on the meta device too (a streamed model's skeleton)."""
    layout = moe_layout(model.config)
    if layout is None:
        return 0
    fused = [(name, module) for name, module in model.named_modules()
             if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and module.gate_up_proj.dim() == 3]
    for name, module in fused:
        experts = [_Expert(layout.projections, *_per_expert(layout, module, e)) for e in range(module.gate_up_proj.shape[0])]
        routed = RoutedExperts(experts, _combine(layout, module), layout.router_weight_on_input)
        parent, _, child = name.rpartition(".")
        if layout.router_weight_on_input:
            block = model.get_submodule(parent)
            routed = InputWeightedMoe(block, routed)
            parent, _, child = parent.rpartition(".")
        setattr(model.get_submodule(parent), child, routed)
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
