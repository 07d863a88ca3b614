"""Writing a quantized model as a compressed-tensors checkpoint (what vLLM, SGLang and transformers load).

The `quantization_config` is built with compressed-tensors' own pydantic models and int weights are packed
with its own `pack_to_int32`, so the output is exactly what that library reads back. Tensor names, dtypes and
layouts per format (as llm-compressor writes them):
- float-quantized: `weight` float8_e4m3fn [out, in], `weight_scale` [out, 1] in the model dtype;
- int-quantized:   `weight` int8 [out, in], `weight_scale` [out, 1] (+ `weight_zero_point` int8 if asymmetric);
- pack-quantized:  `weight_packed` int32 [out, in * bits / 32], `weight_scale` [out, in / group],
                   `weight_shape` int64 [2] (+ `weight_zero_point` int32 packed along the output dim if asymmetric).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ptqlab.quant.linear import QuantizedLinear
from ptqlab.recipes import Recipe
from ptqlab.schemes import QuantArgs

MAX_SHARD_BYTES = 5 * 2**30


def _ct_args(args: QuantArgs):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=args.num_bits,
        type=args.type,
        symmetric=args.symmetric,
        strategy=args.strategy,
        group_size=args.group_size,
        dynamic=args.dynamic,
        # Scales are min-max over each block, recomputed per tensor (no running statistics).
        observer=None if args.dynamic else "memoryless_minmax",
    )


def quantization_config(recipe: Recipe) -> dict:
    """The config.json `quantization_config` for a model quantized with `recipe`."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = recipe.scheme
    group = QuantizationScheme(
        targets=["Linear"],
        weights=_ct_args(scheme.weights),
        input_activations=None if scheme.input_activations is None else _ct_args(scheme.input_activations),
        format=scheme.format,
    )
    config = QuantizationConfig(
        config_groups={"group_0": group},
        format=scheme.format,
        quantization_status="compressed",
        ignore=list(recipe.ignore),
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}),
    }


def _linear_tensors(name: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    args = layer.scheme.weights
    out = {f"{name}.weight_scale": layer.weight_scale}
    zero_point = layer.weight_zero_point
    if layer.scheme.format == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_to_int32(layer.weight_q, args.num_bits)
        out[f"{name}.weight_shape"] = torch.tensor(layer.weight_q.shape, dtype=torch.int64)
        if zero_point is not None:
            # Zero points are packed along the output dimension: [out / (32 / bits), groups].
            zero_point = pack_to_int32(zero_point, args.num_bits, packed_dim=0)
    else:
        out[f"{name}.weight"] = layer.weight_q
    if zero_point is not None:
        out[f"{name}.weight_zero_point"] = zero_point
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def _head_is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return isinstance(head, nn.Linear) and head.weight is embed.weight


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint stores, by name: quantized linears in their format, the rest as they are."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] not in quantized:
            tensors[key] = tensor
    if _head_is_tied(model):
        # Tied output head: stored once, as the input embedding (config says tie_word_embeddings).
        head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        tensors.pop(f"{head_name}.weight", None)
    for name, layer in quantized.items():
        tensors.update(_linear_tensors(name, layer))
    return tensors


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / filename, metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(
    folder: Path, model: nn.Module, tokenizer, recipe: Recipe, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Write config.json (with quantization_config), the safetensors weights, generation config and tokenizer."""
    folder = Path(folder)
    tied = _head_is_tied(model)
    _write_safetensors(checkpoint_tensors(model), folder, max_shard_bytes)
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config["tie_word_embeddings"] = tied
    config["quantization_config"] = quantization_config(recipe)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
