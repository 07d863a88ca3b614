"""What config.json implies for the dense tensors of a standard decoder-only architecture (Llama, Mistral, Qwen,
Gemma, Phi-3): their names and shapes from vocab_size, hidden_size, intermediate_size, the heads and head_dim.

The validator (formats/validate.py) compares a checkpoint's stored tensors with these; a linear layer's [out, in]
here is also what its quantized tensors' shapes follow from (formats/quantized_layouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptqlab.number_formats import Layout

KNOWN_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
"""model_types whose tensor names and shapes are the standard decoder ones checked against config.json."""

LAYER_PROJECTIONS = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.qkv_proj",)),
                     (("self_attn.o_proj",),),
                     (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",)),
                     (("mlp.down_proj",),))
"""Each decoder layer has every one of these projections, stored separately or fused (Phi-3)."""
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")
REQUIRED_NORMS = ("input_layernorm", "post_attention_layernorm")
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class ModelDims:
    """The dimensions config.json gives a decoder-only transformer."""

    model_type: str | None
    hidden_size: int | None
    intermediate_size: int | None
    vocab_size: int | None
    num_hidden_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    tie_word_embeddings: bool | None

    @classmethod
    def from_config(cls, config: dict) -> ModelDims:
        def number(key):
            value = config.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        hidden, heads = number("hidden_size"), number("num_attention_heads")
        head_dim = number("head_dim") or (hidden // heads if hidden and heads else None)
        tied = config.get("tie_word_embeddings")
        return cls(config.get("model_type"), hidden, number("intermediate_size"), number("vocab_size"),
                   number("num_hidden_layers"), heads, number("num_key_value_heads") or heads, head_dim,
                   tied if isinstance(tied, bool) else None)

    @property
    def standard(self) -> bool:
        """A known architecture with every dimension given: its tensors' names and shapes are checked."""
        return self.model_type in KNOWN_ARCHITECTURES and None not in (
            self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers,
            self.num_attention_heads, self.num_key_value_heads, self.head_dim)


def layer_linears(d: ModelDims) -> dict[str, Layout]:
    """[out, in] of each projection of a decoder layer, by its name in the layer."""
    hidden, inter, hd = d.hidden_size, d.intermediate_size, d.head_dim
    q, kv = d.num_attention_heads * hd, d.num_key_value_heads * hd
    heads = f"num_attention_heads {d.num_attention_heads} x head_dim {hd}"
    kv_heads = f"num_key_value_heads {d.num_key_value_heads} x head_dim {hd}"
    h, i = f"hidden_size {hidden}", f"intermediate_size {inter}"
    return {
        "self_attn.q_proj": Layout((q, hidden), f"{heads}, {h}"),
        "self_attn.k_proj": Layout((kv, hidden), f"{kv_heads}, {h}"),
        "self_attn.v_proj": Layout((kv, hidden), f"{kv_heads}, {h}"),
        "self_attn.qkv_proj": Layout((q + 2 * kv, hidden), f"{heads} + 2 x {kv_heads}, {h}"),
        "self_attn.o_proj": Layout((hidden, q), f"{h}, {heads}"),
        "mlp.gate_proj": Layout((inter, hidden), f"{i}, {h}"),
        "mlp.up_proj": Layout((inter, hidden), f"{i}, {h}"),
        "mlp.gate_up_proj": Layout((2 * inter, hidden), f"2 x {i}, {h}"),
        "mlp.down_proj": Layout((hidden, inter), f"{h}, {i}"),
    }


def standard_linears(d: ModelDims) -> dict[str, Layout]:
    """[out, in] of every linear layer of a standard architecture, by module name (alternatives included)."""
    per_layer = layer_linears(d)
    out = {f"model.layers.{n}.{name}": need for n in range(d.num_hidden_layers) for name, need in per_layer.items()}
    out["lm_head"] = Layout((d.vocab_size, d.hidden_size), f"vocab_size {d.vocab_size}, hidden_size {d.hidden_size}")
    return out


def standard_vectors(d: ModelDims) -> dict[str, Layout]:
    """Shapes of the embedding and the norms of a standard architecture, by tensor name."""
    h = f"hidden_size {d.hidden_size}"
    out = {"model.embed_tokens.weight": Layout((d.vocab_size, d.hidden_size), f"vocab_size {d.vocab_size}, {h}"),
           "model.norm.weight": Layout((d.hidden_size,), h)}
    for n in range(d.num_hidden_layers):
        out.update({f"model.layers.{n}.{norm}.weight": Layout((d.hidden_size,), h) for norm in LAYER_NORMS})
        out.update({f"model.layers.{n}.{norm}.weight": Layout((d.head_dim,), f"head_dim {d.head_dim}")
                    for norm in HEAD_NORMS})
    return out

