"""The runtime's decoder: the supported Hugging Face architectures (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3,
and the mixture-of-experts Qwen2-MoE, Qwen3-MoE and Mixtral, runtime/moe.py) written out plainly, with fused
projections and a static KV cache.

What differs between the families is data (`Architecture`, read from the config and the family's row,
ptqlab.families; norms by role, as the row names them): Gemma's 1 + w norms, sandwich norms, embedding scale,
softcaps and query scaling; Qwen3's q/k norms; sliding-window layers; Qwen2's projection biases; Phi-3's already
fused qkv / gate_up. Rotary tables come from the architecture's own Hugging Face rotary module, so every rope
variant (Llama 3 scaling, Gemma 3's local base, Phi-3's partial rotary) is computed by the code that defines it. The arithmetic follows the Hugging Face modules op for op (norms in fp32, softmax in fp32),
so that in fp32 the logits agree to rounding with `AutoModelForCausalLM` on the same checkpoint.

q, k, v (and gate, up) are one matmul when their formats agree, which halves the number of launches at decode.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES, ModelFamily, head_dim as config_head_dim
from ptqlab import triton_support
from ptqlab.runtime import fused
from ptqlab.quant.kv_cache import dequantize_kv, fake_quantize_kv, quantize_kv
from ptqlab.runtime.kernels import RuntimeOptions
from ptqlab.runtime.moe import MoEMLP, Routing

SUPPORTED = tuple(name for name, family in FAMILIES.items() if family.fast_runtime)
FUSED_ACTIVATIONS = fused.ACTIVATIONS


@dataclass(frozen=True)
class Architecture:
    """The numbers and switches that define a decoder of one of the supported families."""

    model_type: str
    family: ModelFamily
    """Where the checkpoint keeps each part (runtime/load.py reads the layers' linears and norms by role)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    activation: str
    norm_offset: float
    """Gemma stores norm weights w and scales by 1 + w."""
    embed_scale: float | None
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    layer_types: tuple[str, ...]
    """'full_attention' or 'sliding_attention' per layer (also the key of its rotary table)."""
    sliding_window: int | None
    routing: Routing | None = None
    """Mixture-of-experts models: how the router picks experts (runtime/moe.py); None for a dense model."""

    @classmethod
    def from_config(cls, config) -> Architecture:
        model_type = config.model_type
        if model_type not in SUPPORTED:
            raise PtqlabError(f"the fast runtime does not run {model_type!r} models (it runs {', '.join(SUPPORTED)}); "
                              "benchmark this one with --runtime transformers")
        family = FAMILIES[model_type]
        heads = config.num_attention_heads
        head_dim = config_head_dim(config)
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is None:
            types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
        if "sliding_attention" not in types:
            window = None
        scalar = getattr(config, "query_pre_attn_scalar", None)  # this and the softcaps: Gemma's config keys
        return cls(
            model_type=model_type, family=family, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            vocab_size=config.vocab_size, eps=config.rms_norm_eps,
            activation=getattr(config, "hidden_activation", None) or config.hidden_act,
            norm_offset=family.norms.offset,
            embed_scale=config.hidden_size ** 0.5 if family.scaled_embeddings else None,
            attn_scale=(scalar or head_dim) ** -0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            layer_types=tuple(types), sliding_window=window, routing=Routing.from_config(config),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """RMSNorm in fp32; Llama scales after casting back (w * x̂), Gemma before ((1 + w) x̂), as their HF modules do."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def norm_with_residual(x: torch.Tensor, weight: torch.Tensor, arch: Architecture, use_fused: bool,
                       residual: torch.Tensor | None = None, consumer: nn.Module | None = None,
                       pdl: bool = RuntimeOptions.pdl):
    """(norm(residual + x), residual + x): the sum is the new residual stream (x itself without a residual). Fused,
    the norm comes out already quantized when `consumer` (the matmul it feeds) takes int8 / FP8 input, and its
    kernel launches with programmatic dependent launch when `pdl` (RuntimeOptions.pdl)."""
    if use_fused:
        grid = getattr(consumer, "input_grid", None)
        y, stream = fused.rms_norm(x, weight, arch.eps, arch.norm_offset, residual, grid, getattr(consumer, "min_rows", 1),
                                   pdl=pdl)
        return y, x if stream is None else stream
    if residual is not None:
        x = residual + x
    return rms_norm(x, weight, arch.eps, arch.norm_offset), x


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x [B, L, heads, D] on its first cos.shape[-1] dims; cos, sin [L, R]."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)


def rotary_tables(config, positions: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos, sin [positions, rotary dims] (fp32) per layer type, from the architecture's own HF rotary module."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # start-up time: imported on first use

    module = sys.modules[MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__]
    rotary_cls = next(v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and isinstance(v, type))
    rotary = rotary_cls(config=config)
    probe = torch.zeros(1, dtype=torch.float32)
    position_ids = torch.arange(positions).unsqueeze(0)
    tables = {}
    for layer_type in sorted(set(Architecture.from_config(config).layer_types)):
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            cos, sin = rotary(probe, position_ids, layer_type=layer_type)
        else:
            cos, sin = rotary(probe, position_ids)
        tables[layer_type] = (cos[0], sin[0])
    return tables


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """Attention of q [B, H, L, D] over k, v [B, Hkv, T, D] where allowed [L, T]; each kv head serves its H / Hkv
    query heads without copying k or v. Scores in the model dtype, softmax in fp32 (as HF's eager attention)."""
    b, h, length, d = q.shape
    groups = h // k.shape[1]
    q = q.reshape(b, k.shape[1], groups * length, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed.repeat(groups, 1), float("-inf"))
    probs = scores.float().softmax(-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(b, h, length, d)


class Concat(nn.Module):
    """Layers that read the same input but could not be fused (different formats): outputs side by side."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Block(nn.Module):
    """One decoder layer: attention with a static KV cache, then the gated MLP, each with its residual."""

    def __init__(self, arch: Architecture, index: int, qkv: nn.Module, o: nn.Module, gate_up: nn.Module | None,
                 down: nn.Module | None, norms: dict[str, torch.Tensor], moe: MoEMLP | None = None) -> None:
        """norms: weights by role (families.Norms: attention_input, mlp_input, and where the family has them
        attention_output, mlp_output, query, key)."""
        super().__init__()
        self.arch, self.layer_type = arch, arch.layer_types[index]
        self.window = arch.sliding_window if self.layer_type == "sliding_attention" else None
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.moe = moe
        """An MoE layer's MLP (then gate_up and down are None)."""
        for name, weight in norms.items():
            self.register_buffer(name, weight)
        self.norm_names = set(norms)
        from transformers.activations import ACT2FN  # start-up time: imported on first use

        self.act = ACT2FN[arch.activation]
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        """An FP8 KV cache: the float32 [kv_heads] scales of keys and of values (RuntimeModel.use_kv_scales); None:
        the cache holds keys and values in the model dtype."""
        self.fused = False
        """Set by RuntimeModel on GPUs: norms, activation and decode attention as single Triton kernels."""
        self.fused_rope = False
        """Rotary embedding and cache write as one kernel (full-width rotary, no q/k norm in between)."""
        self.pdl = RuntimeOptions.pdl
        """Set by RuntimeModel from RuntimeOptions.pdl: the fused kernels launch with programmatic dependent launch."""

    def _norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None = None, consumer: nn.Module | None = None):
        return norm_with_residual(x, getattr(self, name), self.arch, self.fused, residual, consumer, self.pdl)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, pos: torch.Tensor, rotary,
                allowed: torch.Tensor | None, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output h', the residual stream x') with x' + h' the layer's result: the last add is left to
        the next norm, which does it in the same kernel."""
        n, x = self._norm("attention_input", h, residual, consumer=self.qkv)
        h = self.attention(n, pos, rotary, allowed, fresh)
        if "attention_output" in self.norm_names:  # Gemma's sandwich norms
            h = self._norm("attention_output", h)[0]
        m, x = self._norm("mlp_input", h, residual=x, consumer=self.gate_up)
        h = self.mlp(m)
        if "mlp_output" in self.norm_names:
            h = self._norm("mlp_output", h)[0]
        return h, x

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(x)
        if self.fused and self.arch.activation in FUSED_ACTIVATIONS:
            gelu = self.arch.activation != "silu"
            grid, rows = getattr(self.down, "input_grid", None), getattr(self.down, "min_rows", 1)
            paired = getattr(self.gate_up, "paired", False)
            if paired and grid is None and x.numel() == x.shape[-1]:  # one row: the int4 kernel applies the activation
                return self.down(self.gate_up.gated(x, gelu))
            return self.down(fused.gated_activation(self.gate_up(x), gelu, grid, rows, paired, pdl=self.pdl))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)

    def attention(self, x: torch.Tensor, pos: torch.Tensor, rotary, allowed: torch.Tensor | None, fresh: bool) -> torch.Tensor:
        """rotary: the full (cos, sin) tables [positions, R], and their first halves for the fused kernel.

        With an FP8 cache (kv_scales), attention always reads keys and values as the cache holds them, dequantized,
        also where it could use the fresh ones (a prefill, a scored window without a cache): what vLLM computes,
        whose attention reads the cache it has just written."""
        a = self.arch
        b, length, _ = x.shape
        qkv = self.qkv(x)
        widths = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        cached = self.k_cache is not None
        scales = self.kv_scales
        (cos, sin), (cos_half, sin_half) = rotary
        if self.fused_rope:
            if cached and not fresh and length == 1:  # decode: rotary, cache write and attention in one kernel
                out = fused.decode_attention(qkv, self.k_cache, self.v_cache, pos, a.attn_scale, a.attn_softcap,
                                             self.window, rotary=(cos_half, sin_half), kv_scales=scales, pdl=self.pdl)
                return self.o(out)
            fused.rope_and_cache(qkv, cos_half, sin_half, pos, a.num_heads, a.num_kv_heads, a.head_dim,
                                 self.k_cache, self.v_cache, kv_scales=scales, pdl=self.pdl)
        q, k, v = qkv.split(widths, -1)
        q = q.view(b, length, a.num_heads, a.head_dim)
        k = k.view(b, length, a.num_kv_heads, a.head_dim)
        v = v.view(b, length, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if self.fused_rope:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if scales is not None:  # what the kernel stored (the same division and rounding), read back
                k, v = fake_quantize_kv(k, scales[0]), fake_quantize_kv(v, scales[1])
        else:
            if "query" in self.norm_names:
                q, k = self._norm("query", q)[0], self._norm("key", k)[0]
            q, k = rope(q, cos[pos], sin[pos]).transpose(1, 2), rope(k, cos[pos], sin[pos]).transpose(1, 2)
            if scales is not None:
                k_stored, v_stored = quantize_kv(k, scales[0]), quantize_kv(v, scales[1])
                if cached:  # CPUs index_copy no float8: the same bytes as uint8
                    self.k_cache.view(torch.uint8).index_copy_(2, pos, k_stored.view(torch.uint8))
                    self.v_cache.view(torch.uint8).index_copy_(2, pos, v_stored.view(torch.uint8))
                k, v = dequantize_kv(k_stored, scales[0], k.dtype), dequantize_kv(v_stored, scales[1], v.dtype)
            elif cached:
                self.k_cache.index_copy_(2, pos, k)
                self.v_cache.index_copy_(2, pos, v)
        if allowed is None:  # fresh causal prefill without window or softcap: the fused kernel
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a.attn_scale, enable_gqa=True)
        elif cached and not fresh:
            keys, values = self.k_cache, self.v_cache
            if scales is not None:
                keys, values = dequantize_kv(keys, scales[0], q.dtype), dequantize_kv(values, scales[1], q.dtype)
            out = grouped_attention(q, keys, values, allowed, a.attn_scale, a.attn_softcap)
        else:  # a fresh sequence with a mask or softcap: k, v per query head, the matmul shapes HF's eager attention has
            groups = a.num_heads // a.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = grouped_attention(q, k, v, allowed, a.attn_scale, a.attn_softcap)
        return self.o(out.transpose(1, 2).reshape(b, length, a.num_heads * a.head_dim))


@dataclass
class Output:
    """What `model(ids)` returns, shaped like a transformers output where callers read `.logits`."""

    logits: torch.Tensor


class RuntimeModel(nn.Module):
    """A causal LM for inference: `model(ids)` scores a sequence from position 0; `setup_cache` + `step` decode."""

    def __init__(self, config, arch: Architecture, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor,
                 head: nn.Module, max_positions: int, kernels: dict[str, str],
                 options: RuntimeOptions = RuntimeOptions()) -> None:
        super().__init__()
        self.config, self.arch = config, arch
        self.options = options
        """How the kernels run (the linears were built with the same options)."""
        self.register_buffer("embed", embed)
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("norm", norm)
        self.head = head
        self.kernels = kernels
        self.kernel_choices: dict = {}
        """What runtime/choice.py chose for this model's layers (set by build_model on GPUs)."""
        """Which kernel computes each kind of layer (for reports)."""
        device, dtype = embed.device, embed.dtype
        self.rotary = {}
        """Per layer type: the full (cos, sin) tables [positions, R] and, for the fused kernel, their first halves."""
        for layer_type, (cos, sin) in rotary_tables(config, max_positions).items():
            cos, sin = cos.to(device, dtype), sin.to(device, dtype)
            half = cos.shape[-1] // 2
            self.rotary[layer_type] = ((cos, sin), (cos[:, :half].contiguous(), sin[:, :half].contiguous()))
        self.fused = triton_support.available(embed)
        rotary_dims = cos.shape[-1]
        for block in self.blocks:
            block.fused, block.pdl = self.fused, options.pdl
            block.fused_rope = (self.fused and rotary_dims == arch.head_dim and arch.head_dim & (arch.head_dim - 1) == 0
                                and "query" not in block.norm_names)
            if block.fused and arch.activation in FUSED_ACTIVATIONS and hasattr(block.gate_up, "pair_gate_up"):
                block.gate_up.pair_gate_up()
        self.max_positions = max_positions
        self.cache_shape: tuple[int, int] | None = None
        self.cache_owner: object = None
        self.kv_scales: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(blocks)
        """Per layer, the checkpoint's KV-cache scales (float32 [kv_heads] for keys, for values; runtime/load.py),
        None where it has none; use_kv_scales puts them to use."""

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def use_kv_scales(self, enabled: bool = True) -> None:
        """Keep the KV cache in float8 with the checkpoint's scales (as vLLM with kv_cache_dtype fp8), or (False) in
        the model dtype, the scales unused (kv_cache_dtype auto). Drops the cache held now: the next generation sets
        up one of the new kind."""
        if enabled and not any(s is not None for s in self.kv_scales):
            raise PtqlabError("this checkpoint has no KV-cache scales (k_scale, v_scale): quantize it with kv: fp8 "
                              "in the recipe (or --kv-cache fp8) for an FP8 KV cache")
        self.drop_cache()
        for block, scales in zip(self.blocks, self.kv_scales):
            block.kv_scales = scales if enabled else None

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache holds: float8_e4m3fn when the layers use their scales, else the model dtype."""
        return torch.float8_e4m3fn if any(block.kv_scales is not None for block in self.blocks) else self.dtype

    def setup_cache(self, batch_size: int, max_length: int, owner: object = None) -> None:
        """Allocate the static KV cache: every layer's keys and values for `max_length` positions (float8 for the
        layers that use KV-cache scales). `owner` (a Generator) marks whose cache it is: one that finds another's
        must set up its own again."""
        if max_length > self.max_positions:
            raise PtqlabError(f"a cache of {max_length} positions exceeds the {self.max_positions} this model was loaded for")
        a = self.arch
        shape = (batch_size, a.num_kv_heads, max_length, a.head_dim)
        for block in self.blocks:
            dtype = self.dtype if block.kv_scales is None else torch.float8_e4m3fn
            block.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            block.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.cache_shape = (batch_size, max_length)
        self.cache_owner = owner

    def drop_cache(self) -> None:
        for block in self.blocks:
            block.k_cache = block.v_cache = None
        self.cache_shape = self.cache_owner = None

    def _allowed(self, pos: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
        kv = torch.arange(keys, device=pos.device)
        allowed = kv[None, :] <= pos[:, None]
        if window is not None:
            allowed = allowed & (kv[None, :] > pos[:, None] - window)
        return allowed

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor | None = None, last_only: bool = False):
        """Logits [B, L, vocab] for input_ids [B, L] at positions `pos` [L] (default 0..L-1: a fresh sequence).

        With a cache set up, keys and values are written at `pos` and attention reads the whole cache; a fresh
        sequence attends only to itself (so `model(ids)` needs no cache)."""
        a = self.arch
        length = input_ids.shape[1]
        fresh = pos is None
        if fresh:
            if length > self.max_positions:
                raise PtqlabError(f"{length} tokens exceed the {self.max_positions} positions this model was loaded for")
            pos = torch.arange(length, device=input_ids.device)
        x = F.embedding(input_ids, self.embed)
        if a.embed_scale is not None:  # HF multiplies by the scale rounded to the model dtype
            x = x * float(torch.tensor(a.embed_scale, dtype=x.dtype))
        keys = length if fresh else self.cache_shape[1]
        masks: dict[str, torch.Tensor | None] = {}
        residual = None
        for block in self.blocks:
            key = block.layer_type
            if key not in masks:
                simple = fresh and a.attn_softcap is None and (block.window is None or block.window >= length)
                fused_decode = block.fused_rope and not fresh and length == 1  # masks itself
                masks[key] = None if simple or fused_decode else self._allowed(pos, keys, block.window)
            x, residual = block(x, residual, pos, self.rotary[key], masks[key], fresh)
        if last_only:
            x, residual = x[:, -1:].contiguous(), residual[:, -1:].contiguous()
        logits = self.head(norm_with_residual(x, self.norm, a, self.fused, residual, pdl=self.options.pdl)[0])
        if a.final_softcap is not None:
            logits = torch.tanh(logits / a.final_softcap) * a.final_softcap
        return Output(logits)


def cache_length(tokens: int, multiple: int = 64) -> int:
    """Cache positions for a sequence of `tokens`, rounded up (fewer distinct graphs, less re-capture)."""
    return multiple * math.ceil(tokens / multiple)
