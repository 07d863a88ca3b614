"""Loading a causal LM (hub id, local folder, or the embedded default) and finding its decoder layers.

Where an architecture keeps its decoder layers is its family row's (ptqlab.families); an architecture without a
row works here if it has exactly one ModuleList of `num_hidden_layers` blocks, and is refused with a clear message
otherwise.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ptqlab.embedded import DEFAULT_MODEL_NAME, NOTE as EMBEDDED_NOTE, default_model_path
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES, moe_layout, text_config
from ptqlab.record import read_record
from ptqlab.safetensors_files import header_tensors

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    """A model ready to quantize, with where it came from."""

    model: nn.Module
    tokenizer: object | None
    source: str
    """What the user asked for: a hub id, a folder, or the embedded default's name."""
    path: str
    """Where it was loaded from (hub id or local folder)."""
    note: str | None = None
    """A caveat to carry into records and reports (e.g. the embedded model's provenance)."""


def resolve_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise PtqlabError(f"unknown --dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU if torch sees one, else the CPU; or an explicit torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise PtqlabError(f"--device {name!r}: not a device name; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PtqlabError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
    return device


# CPU features that give native arithmetic in a 16-bit float (flags as Linux's /proc/cpuinfo and torch name them).
# Without them, torch emulates the format (convert, compute in fp32, round), several times slower than fp32.
NATIVE_CPU_FEATURES = {
    torch.bfloat16: {"x86_64": ("avx512_bf16", "amx_bf16"), "arm64": ("bf16",)},
    torch.float16: {"x86_64": ("avx512_fp16", "amx_fp16"), "arm64": ("fphp", "asimdhp")},
}
_MAC_FEATURES = {torch.bfloat16: "hw.optional.arm.FEAT_BF16", torch.float16: "hw.optional.arm.FEAT_FP16"}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: torch's own detection where it has it, else /proc/cpuinfo (Linux)."""
    flags = set()
    capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if capabilities is not None:
        try:
            flags |= {name for name, present in capabilities().items() if present is True}
        except RuntimeError:  # pragma: no cover
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags |= set(value.split())
    except OSError:
        pass
    return frozenset(flags)


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes in `dtype` natively (float32 always; bf16/fp16 only with the features above)."""
    if dtype not in NATIVE_CPU_FEATURES:
        return True
    machine = platform.machine().lower()
    if platform.system() == "Darwin" and machine == "arm64":
        import subprocess

        answer = subprocess.run(["sysctl", "-n", _MAC_FEATURES[dtype]], capture_output=True, text=True).stdout.strip()
        return answer == "1"
    arch = "arm64" if machine in ("arm64", "aarch64") else "x86_64"
    return any(flag in _cpu_flags() for flag in NATIVE_CPU_FEATURES[dtype][arch])


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype to compute in: the stored one, except a 16-bit float on a CPU that would only emulate it, where
    float32 is exact for its values and faster. Weights keep their stored format on disk either way."""
    if device.type == "cpu" and stored.is_floating_point and not cpu_has_native(stored):
        return torch.float32
    return stored


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights live (its first parameter or, for modules that hold only buffers, its first buffer)."""
    return next(itertools.chain(model.parameters(), model.buffers())).device


def synchronizer(device: torch.device):
    """A function that waits for the device's queued work (timestamps must not race ahead of the GPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _read_config_json(folder: Path, source: str) -> dict:
    """A local folder's config.json as a dict, refused in one line when it is not a JSON object of a known model type."""
    from transformers import CONFIG_MAPPING, __version__  # start-up time: imported on first use

    file = folder / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PtqlabError(f"{file}: not UTF-8 text; restore the model's own config.json") from e
    except json.JSONDecodeError as e:
        raise PtqlabError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); restore the model's own config.json") from e
    if not isinstance(config, dict):
        raise PtqlabError(f"{file}: expected a JSON object of model settings, got a {type(config).__name__}; restore the model's own config.json")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        raise PtqlabError(f"{source!r} has model type {model_type!r}, which transformers {__version__} does not know: upgrade "
                          "transformers (pip install -U transformers), or give a model of a supported architecture")
    return config


def check_model_folder(folder: Path, purpose: str) -> None:
    """A local folder that holds a model has its config.json; else one line naming what `purpose` takes."""
    if not (Path(folder) / "config.json").is_file():
        raise PtqlabError(f"{folder}: not a model folder (no config.json); {purpose}")


def load_config(path: str, source: str):
    from huggingface_hub.errors import StrictDataclassError  # start-up time: imported on first use
    from transformers import AutoConfig  # start-up time: imported on first use

    is_local = os.path.isdir(path)
    if os.path.exists(path) and not is_local:
        raise PtqlabError(f"{source!r} is a file, not a model folder: give the folder holding config.json")
    if is_local and not (Path(path) / "config.json").is_file():
        raise PtqlabError(f"{source!r} has no config.json: give a Hugging Face model folder (config.json + weights)")
    if is_local:
        _read_config_json(Path(path), source)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as e:
        if is_local:
            raise PtqlabError(f"cannot read the config in {source!r}: {_first_line(e)}") from e
        raise PtqlabError(
            f"unknown model {source!r}: not a local folder, and the Hugging Face Hub has no such model or is "
            "unreachable; give a local folder or a hub id such as Qwen/Qwen2.5-0.5B-Instruct "
            "(or no MODEL for the embedded default)"
        ) from e


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def _quant_method(config) -> str | None:
    """The quant_method of a config's quantization_config (a dict or transformers' object), None without one."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return getattr(method, "value", method)


def decoded_format(config) -> str | None:
    """The quant_method of a source checkpoint whose experts ship in a format that loading decodes exactly to 16-bit
    (its family row's `decoded_formats`: gpt-oss's mxfp4), else None."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    layout = family.experts if family is not None else None
    method = _quant_method(config)
    return method if layout is not None and method in layout.decoded_formats else None


def decoding_note(config, dtype: torch.dtype, scheme: str) -> str | None:
    """The run's one line on experts decoded at loading (None when none were), `scheme` what they became."""
    method = decoded_format(config)
    if method is None:
        return None
    return (f"{config.model_type} experts shipped in {method.upper()}: decoded exactly to "
            f"{str(dtype).removeprefix('torch.')} and re-quantized as {scheme}")


def check_not_quantized(config, source: str, path: str, dtype: str = "auto") -> None:
    """ptqlab quantizes 16-bit models: a checkpoint whose config carries a quantization_config is refused, but for
    experts in a format its family row says loading decodes exactly (gpt-oss's MXFP4), into a dtype that holds its
    values (bf16 or fp32: E2M1 values times powers of two beyond float16's range)."""
    if getattr(config, "quantization_config", None) is None:
        return
    if decoded_format(config) is not None:
        if dtype == "float16":
            raise PtqlabError(f"{source!r} ships its experts in {decoded_format(config).upper()}, whose power-of-two "
                              "scales reach beyond float16's range: use --dtype bfloat16 or float32 (or auto)")
        return
    method = _quant_method(config)
    method = f" ({method})" if method else ""
    origin = ""
    if os.path.isdir(path):
        try:
            record = read_record(Path(path))
        except PtqlabError:  # the refusal below stands on its own; a damaged record only loses the hint
            record = None
        if record is not None:
            origin = f" (ptqlab made this one from {record.model!r})"
    raise PtqlabError(f"{source!r} is already quantized{method}: its config.json has a quantization_config; give the "
                      f"16-bit original instead{origin}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""What transformers loads from a local folder: the first of these that exists."""


def _weight_shards(index: Path, source: str) -> list[Path]:
    """The shard files a weight index lists, each present."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(content["metadata"], dict):
            raise TypeError("metadata")
        shards = sorted({str(name) for name in content["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PtqlabError(f"{index}: not a weight index (a JSON object with 'metadata' and 'weight_map'); copy or "
                          "download the model again") from e
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise PtqlabError(f"{source!r} lacks {len(missing)} of the {len(shards)} weight files that {index.name} lists "
                          f"(e.g. {missing[0]}); copy or download the model again")
    return [index.parent / shard for shard in shards]


def check_weight_files(folder: Path, source: str) -> None:
    """Before loading a local folder: the weight files transformers will read are there, every shard its index names,
    and their safetensors headers are whole (a truncated or garbled file fails here, in a second)."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise PtqlabError(f"{source!r} has a config.json but no weights (no model.safetensors or pytorch_model.bin, "
                          "whole or sharded): give the folder that holds the model's weight files too")
    if not found.name.startswith("model.safetensors"):
        # a pickle runs whatever code it holds when loaded: ptqlab reads safetensors only
        raise PtqlabError(f"{source!r} holds its weights only as a PyTorch pickle ({found.name}), which ptqlab does "
                          "not load (loading a pickle can run any code in it): give the model's safetensors files, or "
                          "convert a copy you trust with transformers (from_pretrained, then save_pretrained)")
    files = _weight_shards(found, source) if found.name.endswith(".index.json") else [found]
    held = {}
    for file in files:
        try:
            held[file] = header_tensors(file)
        except (ValueError, OSError) as e:
            raise PtqlabError(f"{file}: not a complete safetensors file ({_first_line(e)}): it is truncated or damaged; "
                              "copy or download the model again") from e
    if found.name.endswith(".index.json"):
        weight_map = json.loads(found.read_text(encoding="utf-8"))["weight_map"]
        misplaced = sorted(name for name, file in weight_map.items() if name not in held[found.parent / str(file)])
        if misplaced:
            raise PtqlabError(f"{found}: puts {misplaced[0]} in {weight_map[misplaced[0]]}, which does not hold it "
                              f"({len(misplaced)} tensor{'s' if len(misplaced) > 1 else ''} misplaced): the index "
                              "belongs to other weight files; copy or download the model again")


def auto_model_class(config):
    """transformers' auto class that loads a model of `config` (a config object, or config.json as a dict) whole: its
    family row's (a vision-language model's loads its vision part too), else AutoModelForCausalLM."""
    import transformers  # start-up time: imported on first use

    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    return getattr(transformers, family.auto_class if family is not None else "AutoModelForCausalLM")


def _load_weights(path: str, source: str, dtype: str, config):
    """from_pretrained of the auto class for `config` (auto_model_class), refusing weights that do not match the config
    instead of initializing the difference at random. Experts shipped in MXFP4 (decoded_format): transformers decodes
    them to 16-bit while loading (E2M1 values from a table, times 2^(scale - 127) by ldexp: exact in bf16 and fp32)
    instead of keeping them packed for its Triton kernels."""
    from transformers import Mxfp4Config  # start-up time: imported on first use

    decoding = {"quantization_config": Mxfp4Config(dequantize=True)} if decoded_format(config) == "mxfp4" else {}
    try:
        model, info = auto_model_class(config).from_pretrained(path, dtype=resolve_dtype(dtype), output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **decoding)
    except (OSError, SafetensorError) as e:
        raise PtqlabError(f"cannot load the weights of {source!r}: {_first_line(e)}") from e
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, stored, expected = (list(mismatched[0]) + [None, None])[:3]
        shapes = f": {tuple(stored)} stored, {tuple(expected)} in the config" if stored is not None and expected is not None else ""
        raise PtqlabError(f"the weights of {source!r} do not match its config.json: {len(mismatched)} tensors have another "
                          f"shape (e.g. {key}{shapes}); the config.json belongs to another model: restore the model's own")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise PtqlabError(f"the weights of {source!r} lack {len(missing)} tensors its config.json describes (e.g. {missing[0]}); "
                          "the config.json belongs to another model or the weights are incomplete: restore the model's own files")
    return model


CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")


def _check_causal_lm(config, source: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # start-up time: imported on first use

    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and family.vision:  # a vision-language model whose text decoder ptqlab quantizes
        return
    architectures = getattr(config, "architectures", None) or []
    # BERT-like configs sit in the causal-LM mapping too (as LM heads for decoders): trust the checkpoint's
    # own declared head when it has one.
    declared_causal = not architectures or any(a.endswith(CAUSAL_LM_HEADS) for a in architectures)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or not declared_causal or config.is_encoder_decoder:
        arch = ", ".join(architectures) or config.model_type
        raise PtqlabError(
            f"{source!r} is a {arch} model, not a causal language model: ptqlab quantizes decoder-only LMs "
            "that AutoModelForCausalLM loads (Llama, Qwen, Mistral, Gemma, Phi-3, ...) and the text decoder of the "
            f"vision-language models it has a family row for ({', '.join(n for n, f in FAMILIES.items() if f.vision)})"
        )


def _check_experts(config, source: str) -> None:
    """An MoE architecture without a layout row, or routing each token to more experts than a layer has, is refused
    here, in one line (the latter fails in top-k, in the first forward, otherwise)."""
    layout = moe_layout(config)
    if layout is None:
        return
    text = text_config(config)
    experts, top_k = layout.count(config), getattr(text, layout.top_k_key, None)
    if experts and isinstance(top_k, int) and not 1 <= top_k <= experts:
        stored = getattr(type(text), "attribute_map", {})  # config.json's key where transformers renamed it
        top_k_key, count_key = (stored.get(key, key) for key in (layout.top_k_key, layout.count_key))
        raise PtqlabError(f"{source!r}: its config.json routes each token to {top_k} experts ({top_k_key}) of the "
                          f"{experts} each layer has ({count_key}): {top_k_key} must be 1 to {experts}; restore the "
                          "model's own config.json")


@dataclass(frozen=True)
class ModelSource:
    """A model to load, checked: where it is, what the user called it, and its config."""

    path: str
    source: str
    note: str | None
    config: object


def check_source(source: str | None, dtype: str = "auto") -> ModelSource:
    """Everything about a model that can be checked before its weights are read: a known causal LM, not quantized
    already, a valid --dtype, its weight files whole. None is the embedded default."""
    note = None
    if source is None:
        path, source, note = str(default_model_path()), DEFAULT_MODEL_NAME, EMBEDDED_NOTE
    else:
        path = os.path.expanduser(source)
    config = load_config(path, source)
    _check_causal_lm(config, source)
    _check_experts(config, source)
    resolve_dtype(dtype)
    check_not_quantized(config, source, path, dtype)
    if os.path.isdir(path):
        check_weight_files(Path(path), source)
    return ModelSource(path, source, note, config)


def load_tokenizer(path: str):
    """The model's tokenizer, or None when the folder has none."""
    from transformers import AutoTokenizer  # start-up time: imported on first use

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def stored_dtype(config, dtype: str) -> torch.dtype:
    """The dtype a model loads in: --dtype, or with `auto` the config's own (float32 where it names none, as
    transformers does)."""
    chosen = resolve_dtype(dtype)
    if chosen != "auto":
        return chosen
    named = getattr(config, "dtype", None)
    return getattr(torch, named) if isinstance(named, str) else (named or torch.float32)


def load_model(source: str | None = None, dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id or local folder; None loads the embedded default."""
    return load_checked(check_source(source, dtype), dtype)


def load_checked(checked: ModelSource, dtype: str = "auto") -> LoadedModel:
    """Load the model check_source has checked (its weights, then its tokenizer)."""
    model = _load_weights(checked.path, checked.source, dtype, checked.config)
    model.eval()
    decoder_layers(model)  # fail now, not half-way through quantization
    return LoadedModel(model=model, tokenizer=load_tokenizer(checked.path), source=checked.source, path=checked.path,
                       note=checked.note)


def _get_submodule(model: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (one entry per transformer block)."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    family = FAMILIES.get(model_type)
    if family is not None:
        layers = _get_submodule(model, family.layers)
        if isinstance(layers, nn.ModuleList):
            return layers
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(getattr(config, "text_config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(candidates) == 1:
        return candidates[0]
    raise PtqlabError(
        f"cannot find the decoder layers of this {model_type} model ({type(model).__name__}): supported are "
        f"{', '.join(sorted(FAMILIES))}; add a row for {model_type!r} to ptqlab.families.FAMILIES "
        "with the dotted path of its layer list"
    )


def decoder_layer_names(model: nn.Module) -> list[str]:
    """The module names of the decoder layers, in order (model.layers.0, ...)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in decoder_layers(model)]


def names_by_layer(model: nn.Module, names) -> tuple[list[list[str]], list[str]]:
    """Module names grouped by the decoder layer that holds them (in layer order), and the names outside every layer."""
    layer_prefix = {id(m): name + "." for name, m in model.named_modules()}
    grouped = [[n for n in names if n.startswith(layer_prefix[id(layer)])] for layer in decoder_layers(model)]
    inside = {n for group in grouped for n in group}
    return grouped, sorted(n for n in names if n not in inside)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's weights."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
