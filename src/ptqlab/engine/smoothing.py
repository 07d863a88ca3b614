"""Where the smoothing transforms (engine/smoothquant.py, engine/awq.py) put their factors: move a per-input-channel
factor s from a linear's input into its weights.

A linear that reads y = f(x) / s through weights W·diag(s) computes exactly what it computed before, so the float
model is unchanged; only what quantization sees changes. SmoothQuant picks s to shrink activation outliers (W8A8:
activations are quantized too); AWQ picks s to enlarge the weight columns of salient inputs (W4A16: their rounding
error shrinks relative to them).

`MAPPINGS` says, per architecture and inside one decoder layer, which module's output is divided by s (`smooth`: a
norm, or some output rows of a linear) and which linears read it (`balance`: their columns multiplied by s):

| model_type                 | smooth                          | balance                          |
|----------------------------|---------------------------------|----------------------------------|
| llama, mistral, qwen2/3    | input_layernorm                 | q_proj, k_proj, v_proj           |
|                            | self_attn.v_proj                | o_proj  (only without GQA)       |
|                            | post_attention_layernorm        | gate_proj, up_proj               |
|                            | mlp.up_proj                     | down_proj                        |
| gemma2, gemma3_text        | input_layernorm (1 + w)         | q_proj, k_proj, v_proj           |
|                            | self_attn.v_proj                | o_proj  (only without GQA)       |
|                            | pre_feedforward_layernorm (1+w) | gate_proj, up_proj               |
|                            | mlp.up_proj                     | down_proj                        |
| phi3                       | input_layernorm                 | qkv_proj                         |
|                            | self_attn.qkv_proj (v rows)     | o_proj  (only without GQA)       |
|                            | post_attention_layernorm        | gate_up_proj                     |
|                            | mlp.gate_up_proj (up rows)      | down_proj                        |
| qwen2_moe, qwen3_moe,      | input_layernorm                 | q_proj, k_proj, v_proj           |
| mixtral (MoE layers)       | self_attn.v_proj                | o_proj  (only without GQA)       |
|                            | each expert's up (w3)           | its down (w2)                    |
|                            | mlp.shared_expert.up_proj       | mlp.shared_expert.down_proj      |

v -> o is exact only when every o_proj input channel comes from its own v channel, i.e. without grouped-query
attention (one v head per query head); otherwise it is skipped. up -> down is exact because the MLP multiplies
act(gate) by up elementwise. Gemma's norms compute x̂·(1 + w), so w' = (1 + w)/s - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptqlab.engine.experts import routed_experts
from ptqlab.errors import PtqlabError
from ptqlab.models import head_dim


@dataclass(frozen=True)
class Mapping:
    smooth: str
    """Module inside the decoder layer whose output is divided by s: a norm, or a linear (see `rows`)."""
    balance: tuple[str, ...]
    """Linears inside the decoder layer that read `smooth`'s output; their weight columns are multiplied by s."""
    rows: Literal["all", "v", "up"] = "all"
    """Which output rows of a linear `smooth` feed `balance`: all, the v part of a fused qkv, the up half of a fused
    gate_up."""


_LLAMA = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)
_GEMMA = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
    Mapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)
_PHI3 = (
    Mapping("input_layernorm", ("self_attn.qkv_proj",)),
    Mapping("self_attn.qkv_proj", ("self_attn.o_proj",), rows="v"),
    Mapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Mapping("mlp.gate_up_proj", ("mlp.down_proj",), rows="up"),
)
MAPPINGS: dict[str, tuple[Mapping, ...]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "phi3": _PHI3,
    "qwen2_moe": _LLAMA, "qwen3_moe": _LLAMA, "mixtral": _LLAMA,  # their dense layers; MoE layers: _moe_mappings
}
NORM_OFFSET = {"gemma2": 1.0, "gemma3_text": 1.0}
"""Norms that scale by (offset + weight) rather than weight."""


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
    model_type = getattr(config, "model_type", None)
    if model_type not in MAPPINGS:
        raise PtqlabError(f"smoothing (SmoothQuant/AWQ) has no mappings for model_type {model_type!r}; supported: "
                          f"{', '.join(MAPPINGS)} (add a row to ptqlab.engine.smoothing.MAPPINGS)")
    resolved, skipped = [], []
    mappings = MAPPINGS[model_type]
    experts = routed_experts(layer)
    if experts:
        mappings = _moe_mappings(layer, experts)
        skipped.append("post_attention_layernorm -> the experts' gate/up: the router reads it too and stays 16-bit, "
                       "so smoothing it would change the routing: skipped")
    for mapping in mappings:
        smooth = layer.get_submodule(mapping.smooth)
        balance = {name: layer.get_submodule(name) for name in mapping.balance}
        rows = _rows(mapping, smooth, config)
        width = _width(smooth, rows)
        bad = [name for name, linear in balance.items() if linear.in_features != width]
        if bad:
            skipped.append(f"{mapping.smooth} -> {', '.join(mapping.balance)}: {width} smoothed channels but "
                           f"{bad[0]} reads {balance[bad[0]].in_features} (grouped-query attention): not exact, skipped")
            continue
        resolved.append(ResolvedMapping(mapping, smooth, rows, balance, NORM_OFFSET.get(model_type, 0.0)))
    return resolved, skipped


def _moe_mappings(layer: nn.Module, experts: dict) -> list[Mapping]:
    """An MoE layer: the attention's mappings, and up -> down inside each expert (and a shared expert)."""
    out = list(_LLAMA[:2])
    for name, module in experts.items():
        for index, expert in enumerate(module):
            _, up, down = expert.names
            out.append(Mapping(f"{name}.{index}.{up}", (f"{name}.{index}.{down}",)))
    shared = next((n for n, _ in layer.named_modules() if n.endswith("shared_expert")), None)
    if shared is not None:
        out.append(Mapping(f"{shared}.up_proj", (f"{shared}.down_proj",)))
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
