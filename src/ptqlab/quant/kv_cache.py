"""The FP8 KV cache's arithmetic: keys and values stored as float8 E4M3 with a static scale per layer (or per KV
head), value / scale saturated to ±448 on the way in, value × scale on the way out.

The format is llm-compressor's `kv_cache_scheme` (compressed-tensors' QuantizationArgs: 8-bit float, symmetric,
static, strategy `tensor` or `attn_head`), which vLLM reads from the checkpoint's `k_scale` / `v_scale` tensors of
each attention module: shape [1] per tensor, [kv_heads, 1, 1] per head, in the model's dtype. A scale is the
calibration set's largest |key| (or |value|), as the attention module hands it to its cache (keys after the rotary
embedding), over 448: nothing the calibration saw is clipped, and FP8's relative precision is the same across its
range, so a larger scale costs only the smallest values' precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0
"""The largest finite float8 E4M3 (fn) value: quantized keys and values saturate there, as vLLM's cache write does."""


@dataclass(frozen=True)
class KVCacheFormat:
    """A quantized KV cache: the recipe key's value and what the checkpoint declares."""

    name: str
    """The recipe's `kv` value: fp8, fp8-head."""
    strategy: str
    """compressed-tensors' strategy: tensor (one scale for K and one for V per layer) or attn_head (per KV head)."""
    description: str

    def scale_shape(self, kv_heads: int) -> tuple[int, ...]:
        """The shape of a layer's k_scale / v_scale as llm-compressor stores them."""
        return (1,) if self.strategy == "tensor" else (kv_heads, 1, 1)


KV_CACHE_FORMATS = {f.name: f for f in (
    KVCacheFormat("fp8", "tensor", "FP8 E4M3 keys and values, one calibrated scale each per layer"),
    KVCacheFormat("fp8-head", "attn_head", "FP8 E4M3 keys and values, one calibrated scale each per KV head (vLLM "
                                           "reads these on its Flash Attention backend)"),
)}
KV_CACHE_WORDS = "fp8 (one scale per layer for keys and one for values), fp8-head (one per KV head)"


def kv_cache_format(name) -> KVCacheFormat | None:
    """The format a recipe's `kv` value names (None: a 16-bit cache); ValueError for anything else."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in KV_CACHE_FORMATS:
        raise ValueError(f"allowed: {KV_CACHE_WORDS}")
    return KV_CACHE_FORMATS[name]


def format_of_strategy(strategy: str) -> KVCacheFormat | None:
    return next((f for f in KV_CACHE_FORMATS.values() if f.strategy == strategy), None)


def kv_absmax(states: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Per KV head, the largest |value| of keys or values states [B, kv_heads, T, D] over the real tokens (`real`
    [B, T] True; None: all) -> [kv_heads] float32. Padding is left out: its states are never attended to."""
    rows = states.transpose(1, 2)  # [B, T, kv_heads, D]
    rows = rows[real] if real is not None else rows.reshape(-1, *rows.shape[2:])
    if rows.shape[0] == 0:
        return torch.zeros(states.shape[1], dtype=torch.float32, device=states.device)
    return rows.abs().amax(dim=(0, 2)).float()


def kv_scale(absmax: torch.Tensor, fmt: KVCacheFormat, dtype: torch.dtype) -> torch.Tensor:
    """A layer's k_scale or v_scale from the per-head absmax [kv_heads]: absmax / 448 (the per-tensor format takes
    the largest head), in `dtype`, shaped as llm-compressor stores it. A scale of 0 (nothing but zeros seen) becomes
    the dtype's epsilon, as compressed-tensors makes it, so that dividing by it stays finite."""
    if fmt.strategy == "tensor":
        absmax = absmax.max().reshape(1)
    scale = (absmax.float() / FP8_MAX).to(dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device), scale)
    return scale.reshape(fmt.scale_shape(absmax.numel()))


def per_head(scale: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A stored k_scale / v_scale ([1] or [kv_heads, 1, 1]) as float32 [kv_heads]: one scale per head either way."""
    return scale.float().reshape(-1).expand(kv_heads).contiguous()


def quantize_kv(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 E4M3 of states [B, kv_heads, T, D] / scale [kv_heads] (float32 division, correctly rounded), saturated
    to ±448."""
    scaled = states.float() / scale.float().view(1, -1, 1, 1)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_kv(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stored [B, kv_heads, T, D] float8 × scale [kv_heads], in float32, rounded once to `dtype`."""
    return (stored.float() * scale.float().view(1, -1, 1, 1)).to(dtype)


def fake_quantize_kv(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What attention reads back from an FP8 cache for `states`: dequantize_kv(quantize_kv(states))."""
    return dequantize_kv(quantize_kv(states, scale), scale, states.dtype)
