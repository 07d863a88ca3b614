"""KV-cache calibration, in the engine's propagate phase: the largest |key| and |value| that each decoder layer's
attention hands to its cache over the calibration set's real tokens, turned into the layer's `k_scale` / `v_scale`
(registered on the attention module, so that the checkpoint stores them under llm-compressor's names).

The states observed are those llm-compressor observes (compressed-tensors' QuantizedKVCache): what the attention
module passes to `past_key_values.update`, i.e. keys after k_proj (and k_norm) and the rotary embedding, values
after v_proj, [B, kv_heads, T, D]. The module is handed a stand-in cache that records them and returns them
unchanged. They are observed while the quantized layer propagates: the keys and values that the checkpoint's
model will cache, given the inputs the quantized layers before it produce.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.families import family_of, text_config
from ptqlab.quant.kv_cache import KVCacheFormat, kv_absmax, kv_scale


def attention_of(layer: nn.Module, config) -> nn.Module:
    """A decoder layer's attention module, where its family's row says it is (ModelFamily.attention)."""
    name = family_of(config, "KV-cache quantization (kv:)").attention
    attention = getattr(layer, name, None)
    if attention is None:
        raise PtqlabError(f"{type(layer).__name__} has no {name} module: KV-cache quantization (kv:) supports "
                          f"decoder layers whose attention is `{name}`; remove kv from the recipe")
    return attention


def _cache_argument(attention: nn.Module) -> str:
    """The keyword under which the attention module takes its cache (transformers renamed it in 4.56)."""
    parameters = inspect.signature(attention.forward).parameters
    for name in ("past_key_values", "past_key_value"):
        if name in parameters:
            return name
    raise PtqlabError(f"{type(attention).__name__} takes no KV cache argument, so its keys and values cannot be "
                      "observed: KV-cache quantization (kv:) does not support this architecture; remove kv from the recipe")


class KVObserver:
    """Records the per-head absmax of the keys and values one attention module caches, batch by batch (real tokens
    only: `start_batch` gives each batch's mask). Use as a context manager around the layer's forwards."""

    def __init__(self, attention: nn.Module, kv_heads: int) -> None:
        self.attention, self.kv_heads = attention, kv_heads
        self.argument = _cache_argument(attention)
        self.absmax: torch.Tensor | None = None  # [2 (keys, values), kv_heads] float32
        self.real: torch.Tensor | None = None
        self.tokens = 0
        self._handle = None

    def __enter__(self) -> KVObserver:
        self._handle = self.attention.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs):
        kwargs[self.argument] = self
        return args, kwargs

    def start_batch(self, mask: torch.Tensor, device: torch.device) -> None:
        """`mask` [B, T]: 1 for real tokens."""
        self.real = None if bool(mask.all()) else mask.to(device).bool()
        self.tokens += int(mask.sum())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """What a transformers Cache's update does for the attention module, minus the caching."""
        seen = torch.stack([kv_absmax(key_states, self.real), kv_absmax(value_states, self.real)])
        self.absmax = seen if self.absmax is None else torch.maximum(self.absmax, seen)
        return key_states, value_states

    def attach_scales(self, fmt: KVCacheFormat, dtype: torch.dtype, reduce: bool = False) -> torch.Tensor:
        """Register k_scale and v_scale (in `dtype`, llm-compressor's shapes) on the attention module -> the absmax
        [2, kv_heads] they come from. `reduce`: take the maximum over every rank's tokens first."""
        absmax = self.absmax
        if absmax is None:  # a rank given no batch
            device = next(self.attention.parameters()).device
            absmax = torch.zeros(2, self.kv_heads, dtype=torch.float32, device=device)
        if reduce:
            import torch.distributed as dist

            dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
        for name, values in (("k_scale", absmax[0]), ("v_scale", absmax[1])):
            self.attention.register_buffer(name, kv_scale(values, fmt, dtype))
        return absmax


def kv_heads_of(config) -> int:
    config = text_config(config)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
