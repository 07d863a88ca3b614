"""Checking a model folder before it is benchmarked: its safetensors files are whole, and every tensor has the
shape and dtype that config.json implies.

Why: a benchmark loads a folder and measures whatever comes out. A `weight_scale` cut to the wrong shape can still
load, score, be ranked and be recommended; a truncated file fails with a traceback from deep inside a library.
`validate_checkpoint` catches both first and says so in one line that names the folder, the tensor and the
mismatch.

It is cheap: it reads config.json, model.safetensors.index.json and each file's safetensors header (an 8-byte
little-endian length, then a JSON table of dtype, shape and data_offsets per tensor). Of the tensor data it reads
only the 16-byte `weight_shape` tensors of pack-quantized layers.

What it checks:
- files: each header parses and its data_offsets tile the data exactly (a truncated or padded file is refused,
  as safetensors itself refuses it); each shard that the index lists exists and holds what the index says;
- quantized linears of a compressed-tensors checkpoint (pack-, int-, float- and naive-quantized, nvfp4- and
  mxfp4-pack-quantized, the layouts ptqlab.formats.compressed_tensors writes): the weight (`weight_packed` int32
  [out, ceil(in * bits / 32)] with `weight_shape` [out, in], or uint8 [out, ceil(in / 2)] for FP4, or `weight` int8 /
  float8_e4m3fn [out, in]), `weight_scale` (per tensor [1], per channel [out, 1], per group [out, ceil(in /
  group_size)], per block) in the model's float dtype or the config's scale_dtype, `weight_zero_point` wherever the
  weights are asymmetric, and NVFP4's fp32 `weight_global_scale` (and `input_global_scale`) [1];
- dense tensors under the standard Llama / Mistral / Qwen / Gemma / Phi-3 names: embedding, lm_head, norms and
  projections against vocab_size, hidden_size, intermediate_size, the heads and head_dim; and that each decoder
  layer 0 .. num_hidden_layers - 1 is there.
Other architectures and quantization methods get the file checks and whichever of the others apply.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ptqlab.errors import PtqlabError
from ptqlab.safetensors_files import (INDEX_NAME, SAFETENSORS_DTYPES, StoredTensor, read_header, read_ints,
                                      shape_text, weight_files)
from ptqlab.schemes import claiming_group, matches

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
CHECKED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "nvfp4-pack-quantized",
                   "mxfp4-pack-quantized")
FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")
"""Two E2M1 values per uint8 in `weight_packed` [out, in / 2], no weight_shape."""
"""compressed-tensors formats whose per-linear tensors are checked (others get the file and dense checks)."""

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
QUANT_SUFFIXES = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx",
                  "weight_global_scale", "input_global_scale")


# ---------------------------------------------------------------- safetensors headers


def index_problems(weight_map: dict[str, str], tensors: dict[str, StoredTensor]) -> list[str]:
    """Tensors the index places in a file that does not hold them."""
    return [f"{INDEX_NAME} puts {name} in {file}, which does not hold it"
            for name, file in sorted(weight_map.items())
            if name not in tensors or tensors[name].file.name != file]


# ---------------------------------------------------------------- what config.json implies


@dataclass(frozen=True)
class Need:
    """A tensor's shape (and dtypes) as the config implies them, and which config values imply them."""

    shape: tuple[int, ...]
    why: str
    dtypes: tuple[str, ...] = ()
    """Any of these; empty: any dtype."""
    dtype_why: str = ""


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


def layer_linears(d: ModelDims) -> dict[str, Need]:
    """[out, in] of each projection of a decoder layer, by its name in the layer."""
    hidden, inter, hd = d.hidden_size, d.intermediate_size, d.head_dim
    q, kv = d.num_attention_heads * hd, d.num_key_value_heads * hd
    heads = f"num_attention_heads {d.num_attention_heads} x head_dim {hd}"
    kv_heads = f"num_key_value_heads {d.num_key_value_heads} x head_dim {hd}"
    h, i = f"hidden_size {hidden}", f"intermediate_size {inter}"
    return {
        "self_attn.q_proj": Need((q, hidden), f"{heads}, {h}"),
        "self_attn.k_proj": Need((kv, hidden), f"{kv_heads}, {h}"),
        "self_attn.v_proj": Need((kv, hidden), f"{kv_heads}, {h}"),
        "self_attn.qkv_proj": Need((q + 2 * kv, hidden), f"{heads} + 2 x {kv_heads}, {h}"),
        "self_attn.o_proj": Need((hidden, q), f"{h}, {heads}"),
        "mlp.gate_proj": Need((inter, hidden), f"{i}, {h}"),
        "mlp.up_proj": Need((inter, hidden), f"{i}, {h}"),
        "mlp.gate_up_proj": Need((2 * inter, hidden), f"2 x {i}, {h}"),
        "mlp.down_proj": Need((hidden, inter), f"{h}, {i}"),
    }


def standard_linears(d: ModelDims) -> dict[str, Need]:
    """[out, in] of every linear layer of a standard architecture, by module name (alternatives included)."""
    per_layer = layer_linears(d)
    out = {f"model.layers.{n}.{name}": need for n in range(d.num_hidden_layers) for name, need in per_layer.items()}
    out["lm_head"] = Need((d.vocab_size, d.hidden_size), f"vocab_size {d.vocab_size}, hidden_size {d.hidden_size}")
    return out


def standard_vectors(d: ModelDims) -> dict[str, Need]:
    """Shapes of the embedding and the norms of a standard architecture, by tensor name."""
    h = f"hidden_size {d.hidden_size}"
    out = {"model.embed_tokens.weight": Need((d.vocab_size, d.hidden_size), f"vocab_size {d.vocab_size}, {h}"),
           "model.norm.weight": Need((d.hidden_size,), h)}
    for n in range(d.num_hidden_layers):
        out.update({f"model.layers.{n}.{norm}.weight": Need((d.hidden_size,), h) for norm in LAYER_NORMS})
        out.update({f"model.layers.{n}.{norm}.weight": Need((d.head_dim,), f"head_dim {d.head_dim}")
                    for norm in HEAD_NORMS})
    return out


@dataclass(frozen=True)
class WeightFormat:
    """One quantization_config group's weight format, as stored."""

    group: str
    format: str
    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    scale_dtype: str | None = None
    zp_dtype: str | None = None
    input_global: bool = False
    """NVFP4 activations (`dynamic: local`): an `input_global_scale` per linear."""

    def describe(self) -> str:
        kind = f"fp{self.num_bits}" if self.type == "float" else f"int{self.num_bits}"
        if self.strategy in ("group", "tensor_group"):
            granularity = f"group size {self.group_size}"
        elif self.strategy == "block":
            granularity = "blocks of {}x{}".format(*self.block_structure)
        else:
            granularity = f"per-{self.strategy} scales"
        return f"{self.group}: {'' if self.symmetric else 'asymmetric '}{kind} weights, {granularity}"


def _dtype_name(value) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


def weight_formats(quantization_config: dict) -> list[tuple[list[str], WeightFormat | None]]:
    """(targets, weight format) per config group; the format is None where it is not one this module checks."""
    qc = quantization_config
    compressed = qc.get("quant_method") == "compressed-tensors" and qc.get("quantization_status", "compressed") == "compressed"
    out = []
    for key, group in sorted((qc.get("config_groups") or {}).items()):
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            continue
        fmt = group.get("format") or qc.get("format")
        block = weights.get("block_structure")
        acts = group.get("input_activations")
        try:
            parsed = WeightFormat(
                key, fmt, int(weights["num_bits"]), weights.get("type", "int"), bool(weights.get("symmetric", True)),
                weights.get("strategy"), weights.get("group_size"),
                tuple(block) if isinstance(block, list) and len(block) == 2 else None,
                _dtype_name(weights.get("scale_dtype")), _dtype_name(weights.get("zp_dtype")),
                isinstance(acts, dict) and acts.get("dynamic") == "local")
        except (KeyError, TypeError, ValueError):
            parsed = None
        usable = (compressed and parsed is not None and fmt in CHECKED_FORMATS
                  and parsed.strategy in ("tensor", "channel", "group", "tensor_group", "block")
                  and (parsed.strategy not in ("group", "tensor_group")
                       or isinstance(parsed.group_size, int) and parsed.group_size > 0)
                  and (parsed.strategy != "block" or parsed.block_structure is not None))
        out.append((list(group.get("targets") or []), parsed if usable else None))
    return out


@dataclass(frozen=True)
class Resolution:
    """What the quantization_config says of one linear layer."""

    ignored: bool = False
    targeted: bool = False
    format: WeightFormat | None = None


def resolve(name: str, ignore: list[str], groups: list[tuple[list[str], WeightFormat | None]]) -> Resolution:
    if any(matches(name, t) for t in ignore):
        return Resolution(ignored=True)
    index = claiming_group(name, [targets for targets, _ in groups])  # names and regexes before the class Linear
    return Resolution() if index is None else Resolution(targeted=True, format=groups[index][1])


def scale_shape(fmt: WeightFormat, out: int, inp: int) -> Need:
    if fmt.strategy == "tensor":
        return Need((1,), "per-tensor scale")
    if fmt.strategy == "channel":
        return Need((out, 1), f"per-channel scales, output {out}")
    if fmt.strategy in ("group", "tensor_group"):
        return Need((out, math.ceil(inp / fmt.group_size)), f"group size {fmt.group_size}, input {inp}")
    rows, cols = fmt.block_structure
    return Need((math.ceil(out / rows), math.ceil(inp / cols)), f"blocks of {rows}x{cols}, weight [{out}, {inp}]")


def quantized_tensors(fmt: WeightFormat, out: int, inp: int, weight_why: str, float_dtype: str | None) -> dict[str, Need]:
    """The tensors a quantized linear [out, in] stores in `fmt`, by suffix, with their shapes and dtypes."""
    bits, kind = fmt.num_bits, f"fp{fmt.num_bits}" if fmt.type == "float" else f"int{fmt.num_bits}"
    if fmt.scale_dtype:
        scale_dtypes, scale_why = (fmt.scale_dtype,), f"scale_dtype {fmt.scale_dtype}"
    elif float_dtype in FLOAT_DTYPES:
        scale_dtypes, scale_why = (float_dtype,), f"the model's dtype {float_dtype}"
    else:
        scale_dtypes, scale_why = FLOAT_DTYPES, "a 16- or 32-bit float scale"
    scale = scale_shape(fmt, out, inp)
    need = {"weight_scale": Need(scale.shape, scale.why, scale_dtypes, scale_why)}
    if fmt.format in FP4_FORMATS:
        need["weight_packed"] = Need((out, math.ceil(inp / 2)), f"{kind} packed two per byte, input {inp}", ("uint8",),
                                     f"{kind} packed two per byte")
        if fmt.strategy == "tensor_group":
            need["weight_global_scale"] = Need((1,), "NVFP4's per-tensor global scale", ("float32",), "NVFP4")
        if fmt.input_global:
            need["input_global_scale"] = Need((1,), "NVFP4 activations' global scale", ("float32",), "NVFP4")
    elif fmt.format == "pack-quantized":
        packed_why = f"{kind} packed into int32, input {inp}"
        need["weight_packed"] = Need((out, math.ceil(inp * bits / 32)), packed_why, ("int32",), f"{kind} packed into int32")
        need["weight_shape"] = Need((2,), "pack-quantized", ("int64", "int32"), "pack-quantized")
    else:
        weight_dtype = "float8_e4m3fn" if fmt.type == "float" else "int8"
        need["weight"] = Need((out, inp), weight_why, (weight_dtype,), f"{fmt.format} {kind} weights")
    if not fmt.symmetric:
        zp_why = f"asymmetric {kind} weights, {scale.why}"
        if fmt.format == "pack-quantized" and fmt.strategy in ("group", "channel"):
            need["weight_zero_point"] = Need((math.ceil(out * bits / 32), scale.shape[1]),
                                             f"{zp_why}, packed into int32 along output {out}", ("int32",), zp_why)
        else:
            zp_dtype = fmt.zp_dtype or "int8"
            need["weight_zero_point"] = Need(scale.shape, zp_why, (zp_dtype,), zp_why)
    return need


def quantized_linear_bytes(scheme, out: int, inp: int, float_dtype: str) -> int:
    """Bytes of the tensors a linear [out, in] quantized to `scheme` (a schemes.Scheme) stores, its bias aside, in a
    checkpoint whose float dtype is `float_dtype`: the layouts above, each tensor in the first dtype they allow (the
    one ptqlab writes). What a sensitivity plan prices keeping a part at another scheme with."""
    w, acts = scheme.weights, scheme.input_activations
    fmt = WeightFormat("", scheme.format, w.num_bits, w.type, w.symmetric, w.strategy, w.group_size, w.block_structure,
                       w.scale_dtype, None, acts is not None and acts.dynamic == "local")
    itemsize = {name: bits // 8 for name, bits in SAFETENSORS_DTYPES.values()}
    return sum(math.prod(need.shape) * itemsize[need.dtypes[0]]
               for need in quantized_tensors(fmt, out, inp, "", float_dtype).values())


# ---------------------------------------------------------------- comparing


def mismatch(name: str, tensor: StoredTensor | None, need: Need) -> str | None:
    """What is wrong with one tensor against what the config needs; None if nothing."""
    if tensor is None:
        return f"{name} is missing, the config ({need.why}) needs it"
    if tensor.shape != need.shape:
        return f"{name} has shape {shape_text(tensor.shape)}, the config ({need.why}) needs {shape_text(need.shape)}"
    if need.dtypes and tensor.dtype not in need.dtypes:
        return f"{name} has dtype {tensor.dtype}, the config ({need.dtype_why}) needs {' or '.join(need.dtypes)}"
    return None


def stored_quantized(module: str, tensors: dict[str, StoredTensor]) -> bool:
    """Whether a module's tensors are those of a quantized linear (scales, packed or 8-bit weights)."""
    weight = tensors.get(f"{module}.weight")
    return (any(f"{module}.{s}" in tensors for s in QUANT_SUFFIXES)
            or weight is not None and weight.dtype in ("int8", "float8_e4m3fn"))


def quantized_linear_problems(module: str, tensors: dict[str, StoredTensor], fmt: WeightFormat, need: Need | None,
                              float_dtype: str | None, shape_values: dict[str, list[int] | None]) -> list[str]:
    """A quantized linear's tensors against its format; its [out, in] from the config (`need`) where the
    architecture is a standard one, else from its stored weight_shape or weight."""
    if need is not None:
        out, inp = need.shape
        why = need.why
    else:
        packed = tensors.get(f"{module}.weight_packed")
        stored = (shape_values.get(f"{module}.weight_shape") if fmt.format == "pack-quantized"
                  else [packed.shape[0], 2 * packed.shape[1]] if fmt.format in FP4_FORMATS and packed is not None
                  and len(packed.shape) == 2
                  else list(getattr(tensors.get(f"{module}.weight"), "shape", ())))
        if not stored or len(stored) != 2:
            weight = {"pack-quantized": f"{module}.weight_shape", **dict.fromkeys(FP4_FORMATS, f"{module}.weight_packed")
                      }.get(fmt.format, f"{module}.weight")
            return [f"{weight} is missing or not 2-D, the config ({fmt.describe()}) needs it"]
        out, inp = stored
        why = f"weight [{out}, {inp}]"
    problems = []
    for suffix, tensor_need in quantized_tensors(fmt, out, inp, why, float_dtype).items():
        name = f"{module}.{suffix}"
        if suffix in ("weight_shape", "weight_packed", "weight") and name not in tensors:
            tensor_need = Need(tensor_need.shape, f"{fmt.describe()}")
        problem = mismatch(name, tensors.get(name), tensor_need)
        if problem:
            problems.append(problem)
    values = shape_values.get(f"{module}.weight_shape")
    if fmt.format == "pack-quantized" and values is not None and values != [out, inp]:
        problems.append(f"{module}.weight_shape holds {shape_text(values)}, the config ({why}) needs "
                        f"{shape_text((out, inp))}")
    if f"{module}.weight_g_idx" in tensors:
        problems.append(mismatch(f"{module}.weight_g_idx", tensors[f"{module}.weight_g_idx"],
                                 Need((inp,), f"activation order, input {inp}", ("int32",), "activation order")))
    if f"{module}.bias" in tensors:
        problems.append(mismatch(f"{module}.bias", tensors[f"{module}.bias"], Need((out,), f"output {out}")))
    return [p for p in problems if p]


def linear_modules(tensors: dict[str, StoredTensor], dims: ModelDims) -> list[str]:
    """Names of the modules that are linear layers: those stored quantized, and the standard projections."""
    modules = {name.rpartition(".")[0] for name in tensors}
    quantized = {m for m in modules if stored_quantized(m, tensors)}
    standard = set(standard_linears(dims)) & modules if dims.standard else set()
    return sorted(quantized | standard)


def linear_problems(tensors: dict[str, StoredTensor], dims: ModelDims, quantization_config: dict | None,
                    float_dtype: str | None, shape_values: dict[str, list[int] | None]) -> list[str]:
    """Every linear layer's tensors against the config: quantized ones against their format, 16-bit ones against
    the architecture's dimensions."""
    qc = quantization_config or {}
    groups = weight_formats(qc) if qc else []
    ignore = list(qc.get("ignore") or [])
    expected = standard_linears(dims) if dims.standard else {}
    problems = []
    for module in linear_modules(tensors, dims):
        need = expected.get(module)
        setting = resolve(module, ignore, groups) if groups else Resolution()
        if stored_quantized(module, tensors):
            if setting.ignored:
                problems.append(f"{module} is stored quantized, the config (ignore {ignore}) keeps it 16-bit")
            elif not setting.targeted and len(groups) == 1:
                setting = Resolution(targeted=True, format=groups[0][1])
            if setting.format is not None:
                problems += quantized_linear_problems(module, tensors, setting.format, need, float_dtype, shape_values)
            continue
        if setting.format is not None and need is not None:
            weight = "weight_packed" if setting.format.format.endswith("pack-quantized") else "weight_scale"
            problems.append(f"{module}.{weight} is missing, the config ({setting.format.describe()}) needs it")
            continue
        if need is not None:
            problems += [p for p in (mismatch(f"{module}.weight", tensors.get(f"{module}.weight"), need),
                                     _bias_problem(module, tensors, need.shape[0])) if p]
    return problems


def _bias_problem(module: str, tensors: dict[str, StoredTensor], out: int) -> str | None:
    bias = tensors.get(f"{module}.bias")
    return None if bias is None else mismatch(bias.name, bias, Need((out,), f"output {out}"))


def layer_problems(tensors: dict[str, StoredTensor], dims: ModelDims) -> list[str]:
    """Decoder layers 0 .. num_hidden_layers - 1 that have no tensors at all."""
    if not dims.num_hidden_layers or not any(name.startswith("model.layers.") for name in tensors):
        return []
    present = {int(m.group(1)) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    return [f"model.layers.{n} is missing (no tensors), the config (num_hidden_layers {dims.num_hidden_layers}) "
            f"needs layers 0-{dims.num_hidden_layers - 1}" for n in range(dims.num_hidden_layers) if n not in present]


def _has_linear(module: str, tensors: dict[str, StoredTensor]) -> bool:
    return f"{module}.weight" in tensors or f"{module}.weight_packed" in tensors


def linear_layout_known(quantization_config: dict | None) -> bool:
    """Whether linear layers are stored as `weight` or compressed-tensors' `weight_packed` (16-bit models and
    dense compressed-tensors checkpoints), not in another method's layout (GPTQ's qweight, a sparse bitmask)."""
    qc = quantization_config
    return qc is None or qc.get("quant_method") == "compressed-tensors" and not qc.get("sparsity_config")


def dense_problems(tensors: dict[str, StoredTensor], dims: ModelDims, linears_known: bool = True) -> list[str]:
    """A standard architecture's embedding and norms, and (where `linears_known`) each layer's projections and
    lm_head: present, with the config's shapes."""
    if not dims.standard:
        return []
    vectors = standard_vectors(dims)
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    required += [f"model.layers.{n}.{norm}.weight" for n in range(dims.num_hidden_layers) for norm in REQUIRED_NORMS]
    problems = [mismatch(name, None, vectors[name]) for name in required if name not in tensors]
    problems += [mismatch(name, tensors[name], need) for name, need in vectors.items() if name in tensors]
    if not linears_known:
        return [p for p in problems if p]
    linears = layer_linears(dims)
    for n in range(dims.num_hidden_layers):
        for alternatives in LAYER_PROJECTIONS:
            if not any(all(_has_linear(f"model.layers.{n}.{m}", tensors) for m in names) for names in alternatives):
                names = alternatives[0]
                missing = next(m for m in names if not _has_linear(f"model.layers.{n}.{m}", tensors))
                problems.append(f"model.layers.{n}.{missing}.weight is missing, the config "
                                f"({linears[missing].why}) needs it")
    if dims.tie_word_embeddings is False and not _has_linear("lm_head", tensors):
        problems.append(f"lm_head.weight is missing, the config (tie_word_embeddings false, vocab_size "
                        f"{dims.vocab_size}) needs it")
    return [p for p in problems if p]


# ---------------------------------------------------------------- the check


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PtqlabError(f"{folder}: config.json cannot be read ({e}): re-download or re-create it") from None
    if not isinstance(config, dict):
        raise PtqlabError(f"{folder}: config.json is not a JSON object: re-download or re-create it")
    return config


def model_float_dtype(config: dict) -> str | None:
    """The float dtype config.json declares for the model's unquantized tensors (and scales)."""
    name = _dtype_name(config.get("dtype") or config.get("torch_dtype"))
    return name if name in FLOAT_DTYPES else None


def checkpoint_problems(config: dict, tensors: dict[str, StoredTensor],
                        shape_values: dict[str, list[int] | None]) -> list[str]:
    """Everything in `tensors` that disagrees with config.json, in the order a reader would check it."""
    dims = ModelDims.from_config(config)
    qc = config.get("quantization_config")
    qc = qc if isinstance(qc, dict) else None
    known = linear_layout_known(qc)
    problems = layer_problems(tensors, dims)
    problems += dense_problems(tensors, dims, linears_known=known)
    if known:
        problems += linear_problems(tensors, dims, qc, model_float_dtype(config), shape_values)
    return list(dict.fromkeys(problems))


def remedy(config: dict) -> tuple[str, str]:
    """(what the folder is, how to get a good one)."""
    if isinstance(config.get("quantization_config"), dict):
        return "the checkpoint", "quantize it again"
    return "the model folder", "re-download or re-save it"


def read_tensors(files: list[Path]) -> tuple[dict[str, StoredTensor], list[str]]:
    """Every tensor of every file, by name (headers only), and the names stored in two files."""
    tensors: dict[str, StoredTensor] = {}
    twice = []
    for file in files:
        for name, tensor in read_header(file).items():
            if name in tensors:
                twice.append(f"{name} is stored twice, in {tensors[name].file.name} and {file.name}")
            tensors[name] = tensor
    return tensors, twice


def one_line(folder: Path, problems: list[str], what: str, fix: str) -> str:
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return f"{folder}: {problems[0]}{more}: {what} is corrupted; {fix}"


def validate_checkpoint(folder: Path) -> None:
    """Raise PtqlabError, in one line naming the folder, the tensor and the mismatch, unless the folder's
    safetensors files are whole and every tensor agrees with config.json. Reads config.json, the index and the
    safetensors headers (and the 16-byte weight_shape tensors), never the weights themselves. A folder whose
    weights are only PyTorch .bin files is not checked."""
    folder = Path(folder)
    config = read_config(folder)
    what, fix = remedy(config)
    files, weight_map = weight_files(folder, f"{what} is incomplete; {fix}")
    if not files:
        if any(folder.glob("*.bin")):
            return
        raise PtqlabError(f"{folder}: no .safetensors weights: {what} is incomplete; {fix}")
    tensors, problems = read_tensors(files)
    if weight_map is not None:
        problems += index_problems(weight_map, tensors)
    shape_values = {name: read_ints(t) for name, t in tensors.items() if name.endswith(".weight_shape")}
    problems += checkpoint_problems(config, tensors, shape_values)
    if problems:
        raise PtqlabError(one_line(folder, problems, what, fix))
