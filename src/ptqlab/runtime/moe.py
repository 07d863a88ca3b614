"""Mixture-of-experts MLPs in the runtime: the router's top-k, then only the chosen experts compute, so that a decode
step reads the weights of its top-k experts only. Every expert is one of the runtime's linears (int4, FP8, INT8
kernels on a GPU; the dequantized reference on a CPU), built from the per-expert tensors the checkpoint stores
(engine/experts.py writes them under the hub checkpoints' names).

Two paths. Many tokens (prefill, CPUs): tokens grouped by expert, each chosen expert's linears run on its tokens;
which experts run is read on the host. A few tokens on a GPU (decode, up to kernels.SMALL_M rows): the experts'
weights are stacked per projection (`StackedExperts`; each expert's linears keep views of them) and the router's
choice stays an index tensor on the device that the expert kernels read (runtime/moe_kernels.py), so the step has
no host sync and runs inside the decode step's CUDA graph.

The routing follows the Hugging Face modules (softmax in fp32, top-k, renormalized where the architecture says so;
Mixtral keeps the weights in fp32, the Qwen MoEs cast them back), so that in fp32 the logits agree to rounding with
`AutoModelForCausalLM` on the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab import triton_support
from ptqlab.families import FAMILIES
from ptqlab.quant import token_triton
from ptqlab.runtime import fused, int4_kernels, kernels, moe_kernels
from ptqlab.runtime.kernels import RuntimeOptions
from ptqlab.runtime.linear import DequantizedLinear, Fp8Linear, Int4Linear, Int8Linear


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
        """The routing of a mixture-of-experts family (its layout row, ptqlab.families); None for a dense model."""
        layout = FAMILIES[config.model_type].experts
        experts = layout.count(config) if layout is not None else 0
        if not experts:
            return None
        return cls(experts, getattr(config, layout.top_k_key), layout.renormalizes(config),
                   layout.fp32_routing_weights)


class Expert(nn.Module):
    """One gated MLP: gate and up as one matmul (the runtime's fused gate_up), then down."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, act) -> None:
        super().__init__()
        self.gate_up, self.down, self.act = gate_up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


STACKED = {DequantizedLinear: ("16-bit", ("weight",)), Int4Linear: ("int4", ("planes", "scale", "zero_point")),
           Fp8Linear: ("fp8", ("weight", "scale")), Int8Linear: ("int8", ("weight", "scale"))}
"""The expert linears the decode kernels take, by module class: (format, the buffers stacked)."""


class StackedExperts(nn.Module):
    """The routed experts' gate_up and down weights stacked along a leading expert axis, for decode steps of a few
    tokens: router top-k, gate_up of each (token, expert) pair, the gated activation, down times the routing
    weight, and each token's experts summed, every step a kernel that reads the expert indices on the device."""

    def __init__(self, fmt: str, gate_up: dict[str, torch.Tensor | None], down: dict[str, torch.Tensor | None],
                 gelu: bool, options: RuntimeOptions) -> None:
        super().__init__()
        self.format, self.gelu, self.options = fmt, gelu, options
        for prefix, tensors in (("gate_up", gate_up), ("down", down)):
            for name, tensor in tensors.items():
                self.register_buffer(f"{prefix}_{name}", tensor)
        self.grid = {"fp8": Fp8Linear.input_grid, "int8": Int8Linear.input_grid}.get(fmt)

    def _matmul(self, prefix: str, x: torch.Tensor, x_scale: torch.Tensor | None, experts: torch.Tensor,
                rows_per_input: int, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        t = {name: getattr(self, f"{prefix}_{name}") for name in ("weight", "planes", "scale", "zero_point")
             if hasattr(self, f"{prefix}_{name}")}
        if self.format == "int4":
            return int4_kernels.int4_expert_gemv(x, experts, t["planes"], t["scale"], t["zero_point"], rows_per_input,
                                            weights, self.options.gemv_tile, self.options.pdl)
        return moe_kernels.expert_gemv(x, experts, t["weight"], t.get("scale"), x_scale, rows_per_input, weights,
                                       dtype, pdl=self.options.pdl)

    def forward(self, flat: torch.Tensor, logits: torch.Tensor, routing: Routing) -> torch.Tensor:
        pdl = self.options.pdl
        experts, weights = moe_kernels.route(logits, routing.top_k, routing.normalize,
                                             None if routing.fp32_weights else flat.dtype, pdl)
        x, x_scale = flat, None
        if self.grid is not None:
            rows = token_triton.quantize_tokens(flat, self.grid)
            x, x_scale = rows.q, rows.scale
        h = self._matmul("gate_up", x, x_scale, experts, routing.top_k, None, flat.dtype)
        a = fused.gated_activation(h, self.gelu, self.grid, pdl=pdl)
        if self.grid is not None:
            a, a_scale = a.q, a.scale
        else:
            a_scale = None
        y = self._matmul("down", a, a_scale, experts, 1, weights, flat.dtype)
        return moe_kernels.sum_slots(y, routing.top_k, flat.dtype, pdl)


def stack_experts(experts: list[Expert], activation: str, options: RuntimeOptions) -> StackedExperts | None:
    """The experts' weights stacked for the decode kernels, each expert's linears then holding views of them (no
    second copy); None where the kernels do not apply: CPUs, an activation the fused kernel lacks, a bias, experts
    in different formats, formats with a fake-quantized input (the dequantized reference path)."""
    first = experts[0]
    if not triton_support.available(next(iter(first.gate_up.buffers()))) or activation not in fused.ACTIVATIONS:
        return None
    stacked = {}
    for projection in ("gate_up", "down"):
        modules = [getattr(e, projection) for e in experts]
        kind = type(modules[0])
        if kind not in STACKED or any(type(m) is not kind for m in modules) or any(
                m.bias is not None or getattr(m, "input_args", None) is not None or getattr(m, "paired", False)
                for m in modules):
            return None
        fmt, names = STACKED[kind]
        if fmt == "int4" and not int4_kernels.int4_tiles_fit(modules[0].in_features, modules[0].scale, options.gemv_tile):
            return None
        tensors = {}
        for name in names:
            parts = [getattr(m, name) for m in modules]
            if parts[0] is None:
                tensors[name] = None
                continue
            if kind in (Fp8Linear, Int8Linear) and name == "scale":  # [1, N] row scales -> [E, N]
                parts = [p.reshape(-1) for p in parts]
            tensors[name] = torch.stack(parts)
            for e, m in enumerate(modules):  # each expert's module reads its slice of the stack
                setattr(m, name, tensors[name][e].reshape(getattr(m, name).shape))
        stacked[projection] = (fmt, tensors)
    (fmt, gate_up), (down_fmt, down) = stacked["gate_up"], stacked["down"]
    if fmt != down_fmt:
        return None
    return StackedExperts(fmt, gate_up, down, activation != "silu", options)


class MoEMLP(nn.Module):
    """The MLP of an MoE decoder layer: routed experts, and a shared expert behind a sigmoid gate where there is one
    (Qwen2-MoE). `stacked`: the experts' weights for few-token decode on a GPU (None: the grouped path always)."""

    def __init__(self, routing: Routing, router: torch.Tensor, experts: list[Expert], shared: Expert | None = None,
                 shared_gate: torch.Tensor | None = None, stacked: StackedExperts | None = None) -> None:
        super().__init__()
        self.routing = routing
        self.register_buffer("router", router)
        self.experts = nn.ModuleList(experts)
        self.shared = shared
        if shared_gate is not None:
            self.register_buffer("shared_gate", shared_gate)
        else:
            self.shared_gate = None
        self.stacked = stacked

    def capturable(self, rows: int) -> bool:
        """Whether a step of `rows` tokens runs without host syncs (the stacked decode path), so a CUDA graph can
        hold it."""
        return self.stacked is not None and rows <= kernels.SMALL_M

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.capturable(flat.shape[0]):
            out = self.stacked(flat, F.linear(flat, self.router), self.routing)
        else:
            out = self._grouped(flat)
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(flat, self.shared_gate)) * self.shared(flat)
        return out.reshape(shape)

    def _grouped(self, flat: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert: each chosen expert runs once, on its tokens."""
        probs = F.linear(flat, self.router).float().softmax(-1)
        weights, chosen = probs.topk(self.routing.top_k, dim=-1)
        if self.routing.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if not self.routing.fp32_weights:
            weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        by_slot = chosen.T  # [k, N]: each expert's tokens slot by slot, as the Hugging Face loop takes them
        for index in torch.unique(chosen).tolist():
            slot, token = torch.where(by_slot == index)
            result = self.experts[index](flat[token])
            out.index_add_(0, token, (result * weights[token, slot, None]).to(out.dtype))
        return out
