"""Where the smoothing transforms (engine/smoothquant.py, engine/awq.py) put their factors: move a per-input-channel
factor s from a linear's input into its weights.

A linear that reads y = f(x) / s through weights W·diag(s) computes exactly what it computed before, so the float
model is unchanged; only what quantization sees changes. SmoothQuant picks s to shrink activation outliers (W8A8:
activations are quantized too); AWQ picks s to enlarge the weight columns of salient inputs (W4A16: their rounding
error shrinks relative to them).

`mappings` says, inside one decoder layer, which module's output is divided by s (`smooth`: a norm, or some output
rows of a linear) and which linears read it (`balance`: their columns multiplied by s), derived from the roles of the
model's family row (ptqlab.families):

| smooth                                   | balance                                  |
|------------------------------------------|------------------------------------------|
| the attention's input norm               | q, k, v (Phi-3: qkv)                     |
| v (Phi-3: qkv's v rows)                  | o  (only without GQA)                    |
| the MLP's input norm (Gemma: pre-FF)     | gate, up (Phi-3: gate_up)                |
| up (Phi-3: gate_up's up half)            | down                                     |
| MoE layers: each expert's up (w3)        | its down (w2)                            |
|             the shared expert's up       | its down                                 |

v -> o is exact only when every o_proj input channel comes from its own v channel, i.e. without grouped-query
attention (one v head per query head); otherwise it is skipped. up -> down is exact because the MLP multiplies
act(gate) by up elementwise. In an MoE layer the MLP's input norm feeds the router too, which stays 16-bit: that
pair is skipped. Gemma's norms compute x̂·(1 + w), so w' = (1 + w)/s - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptqlab.engine.experts import routed_experts
from ptqlab.families import ModelFamily, family_of, head_dim


@dataclass(frozen=True)
class Mapping:
    smooth: str
    """Module inside the decoder layer whose output is divided by s: a norm, or a linear (see `rows`)."""
    balance: tuple[str, ...]
    """Linears inside the decoder layer that read `smooth`'s output; their weight columns are multiplied by s."""
    rows: Literal["all", "v", "up"] = "all"
    """Which output rows of a linear `smooth` feed `balance`: all, the v part of a fused qkv, the up half of a fused
    gate_up."""


def attention_mappings(family: ModelFamily) -> tuple[Mapping, ...]:
    """The attention's mappings, from its family's roles (the table above): those whose roles the family has."""
    linears, norms = family.linears, family.norms
    out = [] if norms.attention_input is None else [Mapping(norms.attention_input, linears.qkv)]
    if linears.o_reads_v:
        out.append(Mapping(linears.v, (linears.o,), rows="v" if linears.fused_qkv else "all"))
    return tuple(out) + tuple(Mapping(norm, readers) for norm, readers in norms.low_rank)


def mappings(family: ModelFamily) -> tuple[Mapping, ...]:
    """A dense decoder layer's mappings, from its family's roles (the table above)."""
    linears, norms = family.linears, family.norms
    mlp = () if norms.mlp_input is None else (Mapping(norms.mlp_input, linears.gate_up),)
    return attention_mappings(family) + mlp + (
        Mapping(linears.up, (linears.down,), rows="up" if linears.fused_gate_up else "all"),)


@dataclass
class ResolvedMapping:
    """A mapping bound to the modules of one decoder layer."""

    mapping: Mapping
    smooth: nn.Module
    rows: slice
    balance: dict[str, nn.Linear]  # relative name -> module
    norm_offset: float


def resolve_mappings(layer: nn.Module, config) -> tuple[list[ResolvedMapping], list[str]]:
    """The mappings of `config.model_type` that apply exactly to this layer, and why any others were skipped."""
    family = family_of(config, "smoothing (SmoothQuant/AWQ)")
    resolved, skipped = [], []
    layer_mappings = mappings(family)
    experts = routed_experts(layer)
    if experts:
        layer_mappings = _moe_mappings(layer, family, experts)
        skipped.append(f"{family.norms.mlp_input} -> the experts' gate/up: the router reads it too and stays 16-bit, "
                       "so smoothing it would change the routing: skipped")
    modules = dict(layer.named_modules())
    for mapping in layer_mappings:
        if not all(name in modules for name in (mapping.smooth, *mapping.balance)):
            continue  # a layer of another kind than the row's roles describe (a dense layer of an MoE, linear attention)
        smooth = modules[mapping.smooth]
        balance = {name: modules[name] for name in mapping.balance}
        rows = _rows(mapping, smooth, config)
        width = _width(smooth, rows)
        bad = [name for name, linear in balance.items() if linear.in_features != width]
        if bad:
            skipped.append(f"{mapping.smooth} -> {', '.join(mapping.balance)}: {width} smoothed channels but "
                           f"{bad[0]} reads {balance[bad[0]].in_features} (grouped-query attention): not exact, skipped")
            continue
        resolved.append(ResolvedMapping(mapping, smooth, rows, balance, family.norms.offset))
    return resolved, skipped


def _moe_mappings(layer: nn.Module, family: ModelFamily, experts: dict) -> list[Mapping]:
    """An MoE layer: the attention's mappings, and up -> down inside each expert where down reads act(gate) * up (not
    gpt-oss's clamped (up + 1) * ..., which scaling up would change), and in a shared expert."""
    out = list(attention_mappings(family))
    layout = family.experts
    for name, module in experts.items() if layout is None or layout.activation == "gated" else ():
        for index, expert in enumerate(module):
            _, up, down = expert.names
            out.append(Mapping(f"{name}.{index}.{up}", (f"{name}.{index}.{down}",)))
    shared = f"{layout.module}.{layout.shared_expert}" if layout and layout.shared_expert else None
    if shared is not None and shared in dict(layer.named_modules()):
        _, up, down = layout.shared_projections
        out.append(Mapping(f"{shared}.{up}", (f"{shared}.{down}",)))
    return out


def _rows(mapping: Mapping, smooth: nn.Module, config) -> slice:
    if mapping.rows == "all":
        return slice(None)
    out = smooth.out_features
    if mapping.rows == "up":
        return slice(out // 2, out)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    width = head_dim(config)
    q, kv = heads * width, kv_heads * width
    return slice(q + kv, q + 2 * kv)


def _width(smooth: nn.Module, rows: slice) -> int:
    if isinstance(smooth, nn.Linear):
        return len(range(smooth.out_features)[rows])
    return smooth.weight.shape[0]


@torch.no_grad()
def apply_scales(m: ResolvedMapping, scales: torch.Tensor) -> None:
    """Divide smooth's output channels by `scales` and multiply the balance linears' columns by them: the layer
    computes the same function (exactly in exact arithmetic; to the weights' dtype rounding otherwise)."""
    s = scales.float()
    if isinstance(m.smooth, nn.Linear):
        w = m.smooth.weight
        w[m.rows] = (w[m.rows].float() / s.to(w.device).unsqueeze(1)).to(w.dtype)
        if m.smooth.bias is not None:
            b = m.smooth.bias
            b[m.rows] = (b[m.rows].float() / s.to(b.device)).to(b.dtype)
    else:
        w = m.smooth.weight
        w.copy_(((w.float() + m.norm_offset) / s.to(w.device) - m.norm_offset).to(w.dtype))
        if getattr(m.smooth, "bias", None) is not None:
            m.smooth.bias.copy_((m.smooth.bias.float() / s.to(w.device)).to(m.smooth.bias.dtype))
    for linear in m.balance.values():
        linear.weight.copy_((linear.weight.float() * s.to(linear.weight.device)).to(linear.weight.dtype))
