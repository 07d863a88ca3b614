"""Checking a model folder before it is benchmarked: its safetensors files are whole, and every tensor has the
shape and dtype that config.json implies.

Why: a benchmark loads a folder and measures whatever comes out. A `weight_scale` cut to the wrong shape can still
load, score, be ranked and be recommended; a truncated file fails with a traceback from deep inside a library.
`validate_checkpoint` catches both first and says so in one line that names the folder, the tensor and the
mismatch.

It is cheap: it reads config.json, model.safetensors.index.json and each file's safetensors header
(safetensors_files.py). Of the tensor data it reads only the 16-byte `weight_shape` tensors of
pack-quantized layers. What the config implies comes from formats/model_shapes.py (dense tensors of the standard
architectures) and formats/quantized_layouts.py (each quantized linear's tensors, from its format's row of
number_formats); this module compares and says what is wrong.

What it checks:
- files: each header parses and its data_offsets tile the data exactly (a truncated or padded file is refused,
  as safetensors itself refuses it); each shard that the index lists exists and holds what the index says;
- quantized linears of a compressed-tensors checkpoint, in any format of number_formats: the tensors its row
  declares (the weight, packed or not, with `weight_shape` where the format stores one; `weight_scale` per tensor,
  channel, group or block, in the model's float dtype or the config's scale_dtype; `weight_zero_point` wherever the
  weights are asymmetric; NVFP4's fp32 global scales), each with its shape and dtype;
- dense tensors under the standard Llama / Mistral / Qwen / Gemma / Phi-3 names: embedding, lm_head, norms and
  projections against vocab_size, hidden_size, intermediate_size, the heads and head_dim; and that each decoder
  layer 0 .. num_hidden_layers - 1 is there.
Other architectures and quantization methods get the file checks and whichever of the others apply.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ptqlab.errors import PtqlabError
from ptqlab.formats.model_shapes import (LAYER_PROJECTIONS, REQUIRED_NORMS, ModelDims, layer_linears, standard_linears,
                                         standard_vectors)
from ptqlab.formats.quantized_layouts import (QUANT_SUFFIXES, Resolution, WeightFormat, dtype_name, quantized_tensors,
                                              resolve, weight_formats)
from ptqlab.safetensors_files import (StoredTensor, index_problems, read_ints, read_tensors, shape_text,
                                      weight_files)
from ptqlab.number_formats import FLOAT_DTYPES, Layout


# ---------------------------------------------------------------- comparing


def mismatch(name: str, tensor: StoredTensor | None, need: Layout) -> str | None:
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


def quantized_linear_problems(module: str, tensors: dict[str, StoredTensor], fmt: WeightFormat, need: Layout | None,
                              float_dtype: str | None, shape_values: dict[str, list[int] | None]) -> list[str]:
    """A quantized linear's tensors against its format; its [out, in] from the config (`need`) where the
    architecture is a standard one, else from its stored weight_shape or weight."""
    if need is not None:
        out, inp = need.shape
        why = need.why
    else:
        row, packed = fmt.number_format, tensors.get(f"{module}.weight_packed")
        per_word = row.word_bits(fmt.type) // fmt.num_bits  # values per stored element of a packed weight
        stored = (shape_values.get(f"{module}.weight_shape") if row.stores_shape
                  else [packed.shape[0], per_word * packed.shape[1]] if row.pack is not None and packed is not None
                  and len(packed.shape) == 2
                  else list(getattr(tensors.get(f"{module}.weight"), "shape", ())))
        if not stored or len(stored) != 2:
            weight = "weight_shape" if row.stores_shape else row.weight_tensor
            return [f"{module}.{weight} is missing or not 2-D, the config ({fmt.describe()}) needs it"]
        out, inp = stored
        why = f"weight [{out}, {inp}]"
    problems = []
    for suffix, tensor_need in quantized_tensors(fmt, out, inp, why, float_dtype).items():
        name = f"{module}.{suffix}"
        if suffix in ("weight_shape", "weight_packed", "weight") and name not in tensors:
            tensor_need = Layout(tensor_need.shape, f"{fmt.describe()}")
        problem = mismatch(name, tensors.get(name), tensor_need)
        if problem:
            problems.append(problem)
    values = shape_values.get(f"{module}.weight_shape")
    if fmt.number_format.stores_shape and values is not None and values != [out, inp]:
        problems.append(f"{module}.weight_shape holds {shape_text(values)}, the config ({why}) needs "
                        f"{shape_text((out, inp))}")
    if f"{module}.weight_g_idx" in tensors:
        problems.append(mismatch(f"{module}.weight_g_idx", tensors[f"{module}.weight_g_idx"],
                                 Layout((inp,), f"activation order, input {inp}", ("int32",), "activation order")))
    if f"{module}.bias" in tensors:
        problems.append(mismatch(f"{module}.bias", tensors[f"{module}.bias"], Layout((out,), f"output {out}")))
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
            weight = "weight_packed" if setting.format.number_format.pack is not None else "weight_scale"
            problems.append(f"{module}.{weight} is missing, the config ({setting.format.describe()}) needs it")
            continue
        if need is not None:
            problems += [p for p in (mismatch(f"{module}.weight", tensors.get(f"{module}.weight"), need),
                                     _bias_problem(module, tensors, need.shape[0])) if p]
    return problems


def _bias_problem(module: str, tensors: dict[str, StoredTensor], out: int) -> str | None:
    bias = tensors.get(f"{module}.bias")
    return None if bias is None else mismatch(bias.name, bias, Layout((out,), f"output {out}"))


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
    name = dtype_name(config.get("dtype") or config.get("torch_dtype"))
    return name if name in FLOAT_DTYPES else None


def format_problems(quantization_config: dict | None) -> list[str]:
    """Compression formats a compressed-tensors config names that compressed-tensors does not know: its reader (vLLM's,
    transformers', a benchmark's) fails on them before any tensor is read."""
    from compressed_tensors.config import CompressionFormat  # start-up time: imported on first use

    qc = quantization_config or {}
    if qc.get("quant_method") != "compressed-tensors":
        return []
    known = [f.value for f in CompressionFormat]
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    named = [("quantization_config.format", qc.get("format"))] + [
        (f"quantization_config.config_groups.{key}.format", group.get("format"))
        for key, group in sorted(groups.items()) if isinstance(group, dict)]
    return [f"{where} is {fmt!r}, a format compressed-tensors does not know (it knows {', '.join(known)})"
            for where, fmt in named if fmt is not None and fmt not in known]


def checkpoint_problems(config: dict, tensors: dict[str, StoredTensor],
                        shape_values: dict[str, list[int] | None]) -> list[str]:
    """Everything in `tensors` that disagrees with config.json, in the order a reader would check it."""
    dims = ModelDims.from_config(config)
    qc = config.get("quantization_config")
    qc = qc if isinstance(qc, dict) else None
    known = linear_layout_known(qc)
    problems = format_problems(qc) + layer_problems(tensors, dims)
    problems += dense_problems(tensors, dims, linears_known=known)
    if known:
        problems += linear_problems(tensors, dims, qc, model_float_dtype(config), shape_values)
    return list(dict.fromkeys(problems))


def remedy(config: dict) -> tuple[str, str]:
    """(what the folder is, how to get a good one)."""
    if isinstance(config.get("quantization_config"), dict):
        return "the checkpoint", "quantize it again"
    return "the model folder", "re-download or re-save it"


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
