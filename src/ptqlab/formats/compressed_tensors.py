"""Writing a quantized model as a compressed-tensors checkpoint (what vLLM, SGLang and transformers load).

The `quantization_config` is built with compressed-tensors' own pydantic models and each linear's tensors are
those of its scheme's stored format (number_formats: int weights packed with compressed-tensors' own
`pack_to_int32`), so the output is exactly what that library reads back. Tensor names, dtypes and layouts per
format (as llm-compressor writes them; number_formats.FORMATS is the table the code reads):
- float-quantized: `weight` float8_e4m3fn [out, in], `weight_scale` [out, 1] in the model dtype;
- int-quantized:   `weight` int8 [out, in], `weight_scale` [out, 1] (+ `weight_zero_point` int8 if asymmetric);
- pack-quantized:  `weight_packed` int32 [out, in * bits / 32], `weight_scale` [out, in / group],
                   `weight_shape` int64 [2] (+ `weight_zero_point` int32 packed along the output dim if asymmetric);
- nvfp4-pack-quantized: `weight_packed` uint8 [out, in / 2] (two E2M1 values per byte, quant/fp4.py), `weight_scale`
                   float8_e4m3fn [out, in / 16], `weight_global_scale` fp32 [1] (+ `input_global_scale` fp32 [1] with
                   NVFP4 activations);
- mxfp4-pack-quantized: `weight_packed` uint8 [out, in / 2], `weight_scale` uint8 E8M0 exponents [out, in / 32].
A recipe with `overrides` gets one config group per scheme, each with its own format (`config_groups`); a linear's
tensors are those of its own scheme. A quantized KV cache (a recipe's `kv`): `kv_cache_scheme` in the config, and
each attention module's `k_scale` / `v_scale` ([1] per tensor, [kv_heads, 1, 1] per head, in the model dtype), buffers
the engine registered.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from ptqlab.families import FAMILIES, ExpertLayout, checkpoint_name, moe_layout
from ptqlab.safetensors_files import MAX_SHARD_BYTES, STREAM_SHARD_BYTES
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.quant.kv_cache import kv_cache_format
from ptqlab.quant import fp4
from ptqlab.schemes import QuantArgs, Scheme



class Override(Protocol):
    """Part of a model at a second scheme: the linears its `targets` name (names, `re:` expressions)."""

    scheme: Scheme
    targets: Sequence[str]


class Quantization(Protocol):
    """What a checkpoint's quantization_config declares, as a recipe (recipes.Recipe) holds it: its scheme, the parts
    at other schemes, the linears kept 16-bit and the KV cache format."""

    scheme: Scheme
    overrides: Sequence[Override]
    ignore: Sequence[str]
    kv: str | None


def _ct_args(args: QuantArgs):
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=args.num_bits,
        type=args.type,
        symmetric=args.symmetric,
        strategy=args.strategy,
        group_size=args.group_size,
        block_structure=None if args.block_structure is None else list(args.block_structure),
        dynamic=args.dynamic,
        # Scales are min-max over each block, recomputed per tensor (no running statistics); NVFP4 activations'
        # global scale is the absmax over the whole calibration set.
        observer={False: "memoryless_minmax", "local": "static_minmax"}.get(args.dynamic),
        scale_dtype=None if args.scale_dtype is None else getattr(torch, args.scale_dtype),
    )


def _kv_cache_args(kv: str | None):
    """llm-compressor's `kv_cache_scheme` for a recipe's `kv` (None: a 16-bit cache)."""
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.quantization import QuantizationArgs

    fmt = kv_cache_format(kv)
    if fmt is None:
        return None
    # Static scales from the largest |key| / |value| over the whole calibration set: llm-compressor's static_minmax
    # observer (its default for a kv_cache_scheme, minmax, is a moving average of per-batch ranges).
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=fmt.strategy, dynamic=False,
                            observer="static_minmax")


def _ct_scheme(scheme, targets: list[str]):
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(
        targets=targets,
        weights=_ct_args(scheme.weights),
        input_activations=None if scheme.input_activations is None else _ct_args(scheme.input_activations),
        format=scheme.format,
    )


def config_groups(recipe: Quantization) -> dict[str, tuple[list[str], object]]:
    """The config groups of a checkpoint quantized with `recipe` -> {group name: (targets, Scheme)}: one per distinct
    scheme of its `overrides`, targeting their names and regexes (which compressed-tensors and vLLM rank above the
    class `Linear` whatever the order: schemes.claiming_group), then its own scheme for every `Linear`. The overrides
    come first because compressed-tensors, applying a config, marks a target as used only where it is the first
    in the config to match a module, and warns of every other ("Could not match"). An override of the recipe's own
    scheme needs no group."""
    groups: dict = {}
    for override in recipe.overrides:
        if override.scheme != recipe.scheme:
            targets = groups.setdefault(override.scheme, [])
            targets += [t for t in override.targets if t not in targets]
    groups[recipe.scheme] = ["Linear"]
    return {f"group_{i}": (targets, scheme) for i, (scheme, targets) in enumerate(groups.items())}


def quantization_config(recipe: Quantization) -> dict:
    """The config.json `quantization_config` for a model quantized with `recipe`: one config group per scheme, each
    with its own format; the config's format is theirs, or `mixed-precision` where they differ (compressed-tensors'
    rule)."""
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    groups = config_groups(recipe)
    formats = list(dict.fromkeys(scheme.format for _, scheme in groups.values()))
    config = QuantizationConfig(
        config_groups={name: _ct_scheme(scheme, targets) for name, (targets, scheme) in groups.items()},
        format=formats[0] if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=list(recipe.ignore),
        kv_cache_scheme=_kv_cache_args(recipe.kv),
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}),
    }


def _linear_tensors(name: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors as its format (number_formats) stores them."""
    args, fmt = layer.scheme.weights, layer.scheme.number_format
    out = {f"{name}.weight_scale": layer.weight_scale}
    out.update({f"{name}.{suffix}": t for suffix, t in fmt.stored_weight(layer.weight_q, args.num_bits).items()})
    if fmt.global_scales:
        if layer.weight_global_scale is not None:
            out[f"{name}.weight_global_scale"] = layer.weight_global_scale
        if fp4.has_input_global_scale(layer.scheme):
            if layer.input_global_scale is None:
                raise ValueError(f"{name}: NVFP4 activations without their calibrated input_global_scale")
            out[f"{name}.input_global_scale"] = layer.input_global_scale
    if layer.weight_zero_point is not None:
        out[f"{name}.weight_zero_point"] = fmt.stored_zero_point(layer.weight_zero_point, args.num_bits)
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def _head_is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return isinstance(head, nn.Linear) and head.weight is embed.weight


def module_tensors(module: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint stores for `module` (named `prefix` in the model), by name: quantized linears in
    their format, the rest as they are; nothing under the module names in `skip`."""
    dot = f"{prefix}." if prefix else ""

    def kept(name: str) -> bool:
        return not any(name == s or name.startswith(f"{s}.") for s in skip)

    quantized = {full: m for name, m in module.named_modules()
                 if isinstance(m, QuantizedLinear) and kept(full := f"{dot}{name}" if name else prefix)}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict(prefix=dot).items():
        owner = key.rpartition(".")[0]
        if owner not in quantized and kept(owner):
            tensors[key] = tensor
    for name, layer in quantized.items():
        tensors.update(_linear_tensors(name, layer))
    return tensors


def checkpoint_tensors(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint of `model` stores, by name, but those under the module names in `skip` (decoder
    layers a streaming run has written already). A tied output head is stored once, as the input embedding."""
    tensors = module_tensors(model, skip=skip)
    if _head_is_tied(model):
        head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        tensors.pop(f"{head_name}.weight", None)
    return tensors


class ShardWriter:
    """Writes a checkpoint's tensors as they come, in shards of at most `max_shard_bytes` (one tensor larger than that
    gets a shard of its own), so that a model quantized layer by layer is never whole in memory. `close()` names the
    shards model-0000i-of-0000n.safetensors with their index, or model.safetensors when there is one."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES, layout: ExpertLayout | None = None):
        self.folder, self.max_shard_bytes, self.layout = Path(folder), max_shard_bytes, layout
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.pending_storage: set[int] = set()
        self.written: list[tuple[Path, list[str], int]] = []  # (file, tensor names, bytes)
        self.names: set[str] = set()

    @classmethod
    def for_streaming(cls, folder: Path, layout: ExpertLayout | None = None) -> ShardWriter:
        """A writer with the streaming shard size (STREAM_SHARD_BYTES) that the memory plan counts on."""
        return cls(folder, STREAM_SHARD_BYTES, layout)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors by their name in the model (an MoE `layout` renames blocks to the checkpoint's names)."""
        for name in sorted(tensors):
            key = checkpoint_name(name, self.layout)
            if key in self.names:
                raise ValueError(f"{key} written twice")
            self.names.add(key)
            tensor = tensors[name].detach().to("cpu").contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
                self.flush()
            if tensor.data_ptr() in self.pending_storage:
                tensor = tensor.clone()  # safetensors refuses shared storage within a file
            self.pending_storage.add(tensor.data_ptr())
            self.pending[key] = tensor
            self.pending_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        file = self.folder / f"shard-{len(self.written) + 1:05d}.safetensors.partial"
        save_file(self.pending, file, metadata={"format": "pt"})
        self.written.append((file, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes, self.pending_storage = {}, 0, set()

    def close(self) -> None:
        self.flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (file, names, nbytes) in enumerate(self.written, 1):
            filename = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            file.rename(self.folder / filename)
            weight_map.update(dict.fromkeys(names, filename))
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
"""A vision-language model's processor files (how images and videos become inputs, the processor's chat template):
its checkpoint reads the same inputs, so they are copied from the source unchanged."""


def copy_processor_files(source: str | Path, folder: Path) -> list[str]:
    """Copy the PROCESSOR_FILES that `source` (a local folder or a hub id in the local cache) has into `folder` ->
    their names."""
    # Imported here for start-up time: transformers' hub helpers load its machinery.
    from transformers.utils import cached_file

    copied = []
    for name in PROCESSOR_FILES:
        local = Path(source) / name
        found = local if local.is_file() else None
        if found is None and not Path(source).is_dir():
            found = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        if found is not None:
            shutil.copyfile(found, Path(folder) / name)
            copied.append(name)
    return copied


def write_config(folder: Path, model: nn.Module, tokenizer, recipe: Quantization,
                 source: str | Path | None = None) -> None:
    """config.json (with quantization_config), the generation config and the tokenizer; for a vision-language model
    the processor files of `source` (the model's folder or hub id) too."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config["tie_word_embeddings"] = _head_is_tied(model)
    config["quantization_config"] = quantization_config(recipe)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    family = FAMILIES.get(model.config.model_type)
    if source is not None and family is not None and family.vision:  # after the tokenizer: the source's template wins
        copy_processor_files(source, folder)


def write_checkpoint(
    folder: Path, model: nn.Module, tokenizer, recipe: Quantization, max_shard_bytes: int = MAX_SHARD_BYTES,
    source: str | Path | None = None,
) -> None:
    """Write config.json (with quantization_config), the safetensors weights, generation config and tokenizer (and a
    vision-language model's processor files from `source`)."""
    folder = Path(folder)
    writer = ShardWriter(folder, max_shard_bytes, moe_layout(model.config))
    writer.add(checkpoint_tensors(model))
    writer.close()
    write_config(folder, model, tokenizer, recipe, source)
