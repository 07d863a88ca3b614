"""Propagate, the engine's last phase for a layer: the next layer's inputs, computed by the quantized layer, so that
every layer is calibrated on what the quantized model really feeds it. Also the dtype bookkeeping of an engine that
computes in another dtype than the checkpoint stores (float32 on a CPU without native bf16): each finished layer is
rounded back to the stored dtype before it propagates."""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from ptqlab.engine.capture import Batch
from ptqlab.engine.placement import hidden_states, settle, store_hidden
from ptqlab.quant.linear import reuse_dequantized_weights


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def propagate(layer: nn.Module, batches: list[Batch], index: int, device: torch.device, kv=None) -> None:
    """Replace every batch's hidden states by decoder layer `index`'s output (its quantized weights dequantized
    once for all batches), where they live (engine/placement.py). `kv` (engine/kv_cache.KVObserver) records the
    keys and values the layer caches on the way."""
    with reuse_dequantized_weights(layer, batches[0].hidden.dtype), kv or contextlib.nullcontext():
        for batch, hidden in hidden_states(batches, device):
            if kv is not None:
                kv.start_batch(batch.attention_mask, device)
            store_hidden(batch, _output(layer(hidden, **batch.layer_kwargs[index])))
    settle(device)


def floating_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every floating parameter and buffer, by qualified name (a model can mix them: fp32 rotary
    tables beside bf16 weights)."""
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def cast_back(module: nn.Module, dtypes: dict[str, torch.dtype], prefix: str = "", round_only: bool = True) -> None:
    """Give each floating tensor of `module` named in `dtypes` its dtype back; `round_only`: keep the tensor's dtype
    but round its values to that dtype's (what the checkpoint will hold). Tensors made since (a quantized layer's
    scales, already in the stored dtype) are left alone."""
    for name, child in module.named_modules(prefix=prefix):
        for registry in (child._parameters, child._buffers):
            for key, tensor in registry.items():
                target = dtypes.get(f"{name}.{key}" if name else key)
                if tensor is None or target is None or tensor.dtype == target:
                    continue
                if round_only:
                    tensor.data.copy_(tensor.data.to(target))
                else:
                    tensor.data = tensor.data.to(target)
