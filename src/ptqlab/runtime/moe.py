"""Mixture-of-experts MLPs in the runtime: the router's top-k, then each chosen expert computes on the tokens routed
to it (tokens grouped by expert), so that a decode step reads the weights of its top-k experts only. Every expert is
one of the runtime's linears (int4, FP8, INT8 kernels on a GPU; the dequantized reference on a CPU), built from the
per-expert tensors the checkpoint stores (engine/experts.py writes them under the hub checkpoints' names).

The routing follows the Hugging Face modules (softmax in fp32, top-k, renormalized where the architecture says so;
Mixtral keeps the weights in fp32, the Qwen MoEs cast them back), so that in fp32 the logits agree to rounding with
`AutoModelForCausalLM` on the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab.models import expert_count


@dataclass(frozen=True)
class Routing:
    """How an architecture's router picks and weighs experts."""

    experts: int
    top_k: int
    normalize: bool
    """The top-k probabilities renormalized to sum to one."""
    fp32_weights: bool
    """The routing weights stay fp32 (Mixtral) instead of the model dtype."""

    @classmethod
    def from_config(cls, config) -> Routing | None:
        experts = expert_count(config)
        if not experts:
            return None
        mixtral = config.model_type == "mixtral"
        return cls(experts, config.num_experts_per_tok, mixtral or bool(getattr(config, "norm_topk_prob", False)),
                   mixtral)


class Expert(nn.Module):
    """One gated MLP: gate and up as one matmul (the runtime's fused gate_up), then down."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, act) -> None:
        super().__init__()
        self.gate_up, self.down, self.act = gate_up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class MoEMLP(nn.Module):
    """The MLP of an MoE decoder layer: routed experts, and a shared expert behind a sigmoid gate where there is one
    (Qwen2-MoE)."""

    def __init__(self, routing: Routing, router: torch.Tensor, experts: list[Expert], shared: Expert | None = None,
                 shared_gate: torch.Tensor | None = None) -> None:
        super().__init__()
        self.routing = routing
        self.register_buffer("router", router)
        self.experts = nn.ModuleList(experts)
        self.shared = shared
        if shared_gate is not None:
            self.register_buffer("shared_gate", shared_gate)
        else:
            self.shared_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.linear(flat, self.router).float().softmax(-1)
        weights, chosen = probs.topk(self.routing.top_k, dim=-1)
        if self.routing.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if not self.routing.fp32_weights:
            weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        by_slot = chosen.T  # [k, N]: each expert's tokens slot by slot, as the Hugging Face loop takes them
        for index in torch.unique(chosen).tolist():
            slot, token = torch.where(by_slot == index)
            result = self.experts[index](flat[token])
            out.index_add_(0, token, (result * weights[token, slot, None]).to(out.dtype))
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(flat, self.shared_gate)) * self.shared(flat)
        return out.reshape(shape)
