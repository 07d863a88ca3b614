"""GGUF files for llama.cpp: what convert_hf_to_gguf.py writes for a Hugging Face model (hyperparameters,
tokenizer and chat template (formats/gguf_tokenizer.py), tensors under llama.cpp's names, q/k rows permuted for llama's rotary layout) with the
tensor types llama.cpp's quantize picks for a file type (llama_tensor_get_type: its Q8_0, Q4_0 and Q4_K_M mixes).

Architecture differences are data: a model family's row (ptqlab.families) names its llama.cpp architecture, and
`ARCHITECTURES` says per llama.cpp architecture whether q/k rows are permuted. Names come from gguf-py's own tensor
map. The file is written tensor by tensor (`write_gguf`): the header first, then each tensor's data as its bytes
are made, so that at most one quantized tensor is in memory at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T, LlamaFileType

from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES, head_dim
from ptqlab.formats.gguf_tokenizer import TokenizerMetadata
from ptqlab.quant.gguf_quants import BLOCK


@dataclass(frozen=True)
class GGUFArchitecture:
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    """llama.cpp's llama rotary pairs dimensions (i, i + 1) where Hugging Face's pairs (i, i + d/2): convert_hf_to_gguf
    reorders the rows of q and k (LlamaModel.permute). Qwen2 uses llama.cpp's NeoX rotary: no reordering."""


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GGUFArchitecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}
"""llama.cpp's architectures ptqlab writes, by the name a family row gives (ModelFamily.gguf_architecture)."""

FILE_TYPES: dict[str, tuple[LlamaFileType, T]] = {
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "F32": (LlamaFileType.ALL_F32, T.F32),
}
"""--type -> (general.file_type, the type of every tensor the mix does not single out). F32 quantizes nothing: a
file for llama.cpp's own quantize."""

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def architecture_of(config) -> GGUFArchitecture:
    """The GGUF architecture of a supported config; one line refusing anything else, before any weight is read."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or family.gguf_architecture not in ARCHITECTURES:
        supported = sorted(name for name, row in FAMILIES.items() if row.gguf_architecture in ARCHITECTURES)
        raise PtqlabError(f"GGUF export supports {', '.join(supported)} models; this one is {model_type!r}: "
                          "name its llama.cpp architecture in its row of ptqlab.families.FAMILIES (gguf_architecture; "
                          "and check llama.cpp runs it)")
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise PtqlabError(f"GGUF export: rope type {rope_type!r} of this {model_type} model is not one ptqlab writes "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    return ARCHITECTURES[family.gguf_architecture]


def gguf_name(arch: GGUFArchitecture) -> str:
    """The architecture's name in the file (general.architecture)."""
    return gguf.MODEL_ARCH_NAMES[arch.arch]


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


# ---------------------------------------------------------------- tensors


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: within each head, the rows (i, i + d/2) become neighbours."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(named: Iterator[tuple[str, torch.Tensor]], config, arch: GGUFArchitecture) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(Hugging Face name, GGUF name, tensor as GGUF stores it) for each tensor of the model: q/k permuted where the
    architecture wants it, the tied lm_head left out (llama.cpp reads token_embd for the output then)."""
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    family = FAMILIES[config.model_type]
    q, k = family.linears.qkv[:2]
    for name, tensor in named:
        if name == f"{family.head}.weight" and tied:
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise PtqlabError(f"GGUF export: the tensor {name} has no llama.cpp name for architecture "
                              f"{gguf_name(arch)}; this model has parts llama.cpp would not run")
        if arch.permute_qk and name.endswith((f"{q}.weight", f"{q}.bias")):
            tensor = permute_qk(tensor, config.num_attention_heads)
        elif arch.permute_qk and name.endswith((f"{k}.weight", f"{k}.bias")):
            tensor = permute_qk(tensor, config.num_key_value_heads)
        yield name, mapped, tensor
    freqs = llama3_rope_factors(config)
    if freqs is not None:
        yield "", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs


def llama3_rope_factors(config) -> torch.Tensor | None:
    """Llama 3.1's rope scaling as the per-frequency factors llama.cpp reads from rope_freqs (convert_hf_to_gguf's
    LlamaModel.generate_extra_tensors); None for other rope types."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def quantizable(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for these architectures: 2-D weights other than norms."""
    return len(shape) == 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name


def layer_of(gguf_name: str) -> int | None:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_70b(config) -> bool:
    """llama.cpp's LLM_TYPE_70B for these architectures (80 layers; for llama, with grouped-query attention): its
    Q4_K_M mix gives such a model's attn_v Q5_K where others get Q4_K (8 heads share each attn_v row)."""
    if config.num_hidden_layers != 80:
        return False
    return architecture_of(config).arch == gguf.MODEL_ARCH.QWEN2 or \
        config.num_attention_heads != getattr(config, "num_key_value_heads", None)


def tensor_type(gguf_name: str, columns: int, file_type: str, n_layers: int, tied: bool, importance: bool,
                seventy_b: bool = False) -> T:
    """The GGML type llama.cpp's quantize gives this 2-D weight in `file_type` (llama_tensor_get_type for a dense
    model; `seventy_b`: is_70b), including its fallback for rows that a 256-block type does not divide (Q4_K ->
    Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 if 32 does not divide either)."""
    chosen = FILE_TYPES[file_type][1]
    if chosen == T.F32:
        return chosen
    layer = layer_of(gguf_name)
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        if columns % BLOCK[chosen]:
            chosen = T.Q8_0
        elif chosen != T.Q8_0:
            chosen = T.Q6_K
    elif gguf_name.endswith("attn_v.weight"):
        if file_type == "Q4_K_M" and _use_more_bits(layer, n_layers):
            chosen = T.Q6_K
        elif seventy_b and chosen == T.Q4_K:
            chosen = T.Q5_K
    elif gguf_name.endswith("ffn_down.weight"):
        if file_type == "Q4_K_M" and _use_more_bits(layer, n_layers):
            chosen = T.Q6_K
        elif file_type == "Q4_0" and importance and layer < n_layers // 8:
            chosen = T.Q4_1  # llama.cpp guards the first ffn_down layers of an imatrix Q4_0 this way
    if columns % BLOCK[chosen]:
        chosen = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(chosen, chosen)
        if columns % BLOCK.get(chosen, 1):
            chosen = T.F16
    return chosen


# ---------------------------------------------------------------- the file


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, logical shape [rows, columns] (or [n]), and GGML type."""

    name: str
    shape: tuple[int, ...]
    qtype: T

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def write_metadata(writer: gguf.GGUFWriter, config, arch: GGUFArchitecture, file_type: str, name: str,
                   tokenizer: TokenizerMetadata, extra: dict[str, object]) -> None:
    """The key-value section: general.*, the architecture's hyperparameters (TextModel.set_gguf_parameters and
    LlamaModel's), tokenizer.*, and `extra` (ptqlab's record of the run, as ptqlab.* strings, numbers, booleans)."""
    writer.add_name(name)
    writer.add_quantized_by("ptqlab")
    writer.add_file_type(int(FILE_TYPES[file_type][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokenizer.tokens))
    rope = _rope(config)
    if "rope_theta" in rope or getattr(config, "rope_theta", None) is not None:
        writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", None)))
    if arch.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim(config))
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_tokenizer_model(tokenizer.model)
    if tokenizer.pre is not None:
        writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    if tokenizer.merges:
        writer.add_token_merges(tokenizer.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in tokenizer.special.items():
        adders[key](token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    for key, value in extra.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):  # llama.cpp's quantize writes its quantize.* counts as int32
            (writer.add_int32 if key.startswith("quantize.") else writer.add_int64)(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value if isinstance(value, str) else json.dumps(value))


def write_gguf(path: Path, arch: GGUFArchitecture, metadata: Callable[[gguf.GGUFWriter], None],
               plan: list[PlannedTensor], tensor_bytes: Iterator[np.ndarray]) -> None:
    """Write `path`: metadata, the tensor index of `plan`, then each tensor's data from `tensor_bytes` (in plan
    order; each array's bytes exactly its planned size)."""
    writer = gguf.GGUFWriter(path, gguf_name(arch))
    try:
        metadata(writer)
        for planned in plan:
            if planned.qtype in (T.F32, T.F16):
                dtype = np.float32 if planned.qtype == T.F32 else np.float16
                writer.add_tensor_info(planned.name, planned.shape, np.dtype(dtype), planned.nbytes)
            else:
                writer.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), planned.nbytes,
                                       raw_dtype=planned.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned, data in zip(plan, tensor_bytes, strict=True):
            if data.nbytes != planned.nbytes:
                raise RuntimeError(f"{planned.name}: {data.nbytes} bytes made, {planned.nbytes} planned")
            writer.write_tensor_data(data)
    finally:
        writer.close()
