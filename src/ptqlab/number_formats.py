"""Number formats as a checkpoint stores them: one row per compressed-tensors format.

A row says everything that depends on how a quantized linear's tensors are laid out: the format's compressed-tensors
name, which weights it takes (number type, bits, scale granularity, fixed group size and scale dtype, with or
without quantized input activations), the tensors it stores with their shapes and dtypes, how grid values are packed
into them and unpacked, what transformers' reader makes of it, and which of the fast runtime's kernels a layer in it
can run on. The writer (formats/compressed_tensors), the validator (formats/validate), the read-back
(formats/readback), the runtime's loader (runtime/load) and `schemes` all read these rows, so a new format is one
row here plus its pack/unpack functions and tests (as ggml's type_traits: one table, read by everyone).

The arithmetic that puts values on a grid stays in quant/; this module owns only the storage: bits in words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The magnitudes FP4 E2M1 represents; a stored nibble is the index of |value| here, the sign in bit 3."""
INT32_BITS = 32


# ---------------------------------------------------------------- pack / unpack, side by side


def pack_fp4(q: torch.Tensor, num_bits: int = 4) -> torch.Tensor:
    """E2M1 values [rows, columns] (any float dtype, exact) -> uint8 [rows, columns / 2], two per byte, the even
    column in the low nibble; each nibble the index of |value| in E2M1_VALUES, the sign in bit 3."""
    rows, columns = q.shape
    if columns % 2:
        raise ValueError(f"FP4 packs two values per byte: the row length {columns} is odd")
    doubled = (q.float().abs() * 2).round()  # 0, 1, 2, 3, 4, 6, 8, 12
    index = sum((doubled >= t).to(torch.uint8) for t in (1, 2, 3, 4, 6, 8, 12))
    codes = index | (torch.signbit(q.float()).to(torch.uint8) << 3)
    pairs = codes.reshape(rows, columns // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, num_bits: int = 4, shape: torch.Size | None = None) -> torch.Tensor:
    """The inverse of pack_fp4: uint8 [rows, columns / 2] -> E2M1 values [rows, columns] as float8_e4m3fn (every
    E2M1 value is exact in E4M3: one byte per value in memory, as the other formats)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    values = torch.tensor(E2M1_VALUES, device=packed.device)[(codes & 0x07).long()]
    return torch.where((codes & 0x08).bool(), -values, values).to(torch.float8_e4m3fn)


def pack_int32(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """intN values [rows, columns] (in int8) -> int32 [rows, ceil(columns * bits / 32)], compressed-tensors' own
    packer, so that its reader unpacks exactly what was written."""
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q, num_bits)


def unpack_int32(packed: torch.Tensor, num_bits: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of pack_int32, for a weight of `shape` [rows, columns]."""
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, num_bits, shape)


def pack_int32_rows(zero_point: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Zero points [out, groups] -> int32 [ceil(out * bits / 32), groups], packed along the output dimension (as
    compressed-tensors packs them)."""
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(zero_point, num_bits, packed_dim=0)


def unpack_int32_rows(packed: torch.Tensor, num_bits: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of pack_int32_rows for zero points of `shape` [out, groups]: a transposed view (unpacked along
    dim 0)."""
    # Imported here for start-up time: compressed-tensors loads transformers' machinery.
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, num_bits, shape, packed_dim=0)


# ---------------------------------------------------------------- the rows


class WeightArgs(Protocol):
    """The weight format fields a row reads: schemes.QuantArgs, or a config group's weights as the validator parses
    them (formats/expectations.WeightFormat)."""

    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None
    block_structure: tuple[int, int] | None
    scale_dtype: str | None


@dataclass(frozen=True)
class Layout:
    """One stored tensor of a quantized linear: its shape and dtypes, and why (for a validator's message)."""

    shape: tuple[int, ...]
    why: str
    dtypes: tuple[str, ...] = ()
    """Any of these, the first the one ptqlab writes; empty: any dtype."""
    dtype_why: str = ""


GPU_GENERATIONS = ("Ampere sm80", "Ada sm89", "Hopper sm90", "Blackwell sm100/120")
"""The NVIDIA GPU generations a Deployment names a path for, in its `paths` order."""


@dataclass(frozen=True)
class Deployment:
    """Which serving engine's kernel runs one family of schemes stored in a format, per GPU generation: what a user
    picking a variant for their GPU needs to know, and what the engine's kernel selection decides (not ptqlab)."""

    family: str
    """The family in words, with the preset names it covers."""
    bits: tuple[int, ...]
    """Weight bits it covers."""
    activations: str | None
    """Quantized input activations it covers, `int8`, `fp8` or `fp4`; None: 16-bit activations (weight-only)."""
    paths: tuple[str, str, str, str]
    """The path per GPU_GENERATIONS entry."""
    source: str
    """The engine version and code the paths were read from: they change with each release."""
    strategies: tuple[str, ...] = ()
    """Weight scale granularities it covers; empty: any the format takes."""

    def covers(self, weights: WeightArgs, activations: str | None) -> bool:
        """Whether a scheme with these weights and activations (activation_kind's key) belongs to this family."""
        return (weights.num_bits in self.bits and activations == self.activations
                and (not self.strategies or weights.strategy in self.strategies))

    def to_dict(self) -> dict:
        """As results.json records it: a report written later still says what this version of ptqlab read."""
        return {"family": self.family, "paths": dict(zip(GPU_GENERATIONS, self.paths)), "source": self.source}


VLLM_011 = "vLLM 0.11 kernel selection"
VLLM_MP = f"{VLLM_011} (mixed_precision/__init__.py: Machete, AllSpark, Marlin; Machete sm90 only, no zero points)"
VLLM_SCALED_MM = f"{VLLM_011} (cutlass scaled_mm_entry.cu: sm80/sm89/sm90/sm100/sm120 dispatch)"
NO_VLLM_KERNEL = "no vLLM kernel: ptqlab's runtime, or llama.cpp via ptqlab export-gguf"
WNA16_PATHS = ("vLLM Marlin", "vLLM Marlin", "vLLM Machete (symmetric); Marlin (zero points)", "vLLM Marlin")
FP8_MARLIN = "vLLM Marlin FP8, weight-only (activations stay 16-bit)"
FP4_MARLIN = "vLLM Marlin FP4, weight-only (activations stay 16-bit)"

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
"""The float dtypes a checkpoint keeps its unquantized tensors (and the scales of most formats) in."""


@dataclass(frozen=True)
class NumberFormat:
    """One compressed-tensors storage format: what it takes and what it stores per quantized linear."""

    name: str
    """compressed-tensors' format name, as config.json declares it."""
    number_types: tuple[str, ...]
    """`int`, `float` or both: the weights it takes."""
    bits: tuple[int, ...]
    """Weight bits it takes."""
    strategies: tuple[str, ...]
    """Weight scale granularities it takes."""
    with_activations: bool | None
    """True: only with quantized input activations; False: only weight-only; None: either."""
    weight_dtypes: dict[str, str]
    """The stored weight's dtype per number type, the format's own first (a config that declares the format for
    weights of the other type is checked against the second)."""
    pack: Callable | None = None
    """Grid values [out, in] -> the stored `weight_packed` (q, num_bits); None: stored as they are."""
    unpack: Callable | None = None
    """The stored `weight_packed` -> grid values [out, in] (packed, num_bits, shape)."""
    packing: str = ""
    """How several values share a word, in words: `packed into int32`, `packed two per byte`."""
    stores_shape: bool = False
    """A `weight_shape` int64 [2] beside the packed weight (its columns are not a whole number of words)."""
    packed_zero_point: bool = False
    """Zero points packed into int32 along the output dimension (else stored as they are, int8 or zp_dtype)."""
    label: str = ""
    """The format's short name where it has one (NVFP4), for messages."""
    group_size: int | None = None
    """A group size fixed by the format (what the kernels that read it take); None: the scheme's."""
    scale_dtype: str | None = None
    """The group scales' dtype fixed by the format; None: the model's float dtype."""
    scale_words: str = ""
    """What its scales are, in words, for messages."""
    global_scales: bool = False
    """An fp32 `weight_global_scale` [1] per linear (and an `input_global_scale` [1] with quantized activations):
    group scales are relative to it."""
    transformers_bound: float | None = None
    """Largest relative logit error accepted when transformers reads it back, where that reader rounds (None:
    formats/readback.BOUNDS)."""
    dequantize_at_load: bool = False
    """transformers must dequantize it while loading (CompressedTensorsConfig(dequantize=True)) to compute in
    float32."""
    transformers_reads_experts: bool = False
    """transformers' loader maps a mixture-of-experts checkpoint's per-expert tensors in this format."""
    runtime_kernels: tuple[str, ...] = ()
    """The fast runtime's kernels (runtime/linear.py's names) a layer stored in this format may run on; empty: it
    is dequantized to 16-bit at load (emulated)."""
    deployments: tuple[Deployment, ...] = ()
    """Which engine path serves each family of schemes stored in this format, per GPU generation (`deployment`)."""

    def takes(self, weights: WeightArgs, with_activations: bool | None = None) -> bool:
        """Whether these weights (with or without quantized activations; None: either) are stored in this format."""
        return (weights.type in self.number_types and weights.num_bits in self.bits
                and weights.strategy in self.strategies
                and (self.group_size is None or weights.group_size == self.group_size)
                and (self.scale_dtype is None or weights.scale_dtype == self.scale_dtype)
                and (with_activations is None or self.with_activations in (None, with_activations)))

    def deployment(self, weights: WeightArgs, activations: str | None) -> Deployment | None:
        """The row of `deployments` for these weights and activations (`int8`, `fp8`, `fp4`; None: 16-bit); None
        where no engine path is recorded."""
        return next((d for d in self.deployments if d.covers(weights, activations)), None)

    @property
    def weight_tensor(self) -> str:
        """`weight_packed` (several values per word) for a packed format, else `weight` (one value per element)."""
        return "weight" if self.pack is None else "weight_packed"

    def weight_dtype(self, number_type: str) -> str:
        """The stored weight's dtype for weights of `number_type` (a packed format has one whatever the type)."""
        return self.weight_dtypes.get(number_type) or next(iter(self.weight_dtypes.values()))

    def word_bits(self, number_type: str) -> int:
        """Bits of one stored weight element (a word holding several values when packed)."""
        return torch.finfo(dtype).bits if (dtype := getattr(torch, self.weight_dtype(number_type))).is_floating_point \
            else torch.iinfo(dtype).bits

    def weight_columns(self, columns: int, num_bits: int, number_type: str) -> int:
        """Columns of the stored weight for `columns` input columns."""
        if self.pack is None:
            return columns
        return math.ceil(columns * num_bits / self.word_bits(number_type))

    def tensors(self, weights: WeightArgs, out: int, inp: int, weight_why: str, float_dtype: str | None,
                zp_dtype: str | None = None, input_global: bool = False) -> dict[str, Layout]:
        """The tensors a linear [out, in] stores in this format, by suffix, with their shapes and dtypes (the first
        dtype of each: what ptqlab writes); `float_dtype`: the checkpoint's float dtype (None: any float),
        `input_global`: NVFP4 activations' calibrated global scale stored too."""
        w = weights
        bits, kind = w.num_bits, f"fp{w.num_bits}" if w.type == "float" else f"int{w.num_bits}"
        if w.scale_dtype:
            scale_dtypes, scale_why = (w.scale_dtype,), f"scale_dtype {w.scale_dtype}"
        elif float_dtype in FLOAT_DTYPES:
            scale_dtypes, scale_why = (float_dtype,), f"the model's dtype {float_dtype}"
        else:
            scale_dtypes, scale_why = FLOAT_DTYPES, "a 16- or 32-bit float scale"
        scale = scale_layout(w, out, inp)
        need = {"weight_scale": Layout(scale.shape, scale.why, scale_dtypes, scale_why)}
        weight_dtype = self.weight_dtype(w.type)
        if self.pack is not None:
            need["weight_packed"] = Layout((out, self.weight_columns(inp, bits, w.type)),
                                           f"{kind} {self.packing}, input {inp}", (weight_dtype,),
                                           f"{kind} {self.packing}")
        else:
            need["weight"] = Layout((out, inp), weight_why, (weight_dtype,), f"{self.name} {kind} weights")
        if self.stores_shape:
            need["weight_shape"] = Layout((2,), self.name, ("int64", "int32"), self.name)
        if self.global_scales:
            need["weight_global_scale"] = Layout((1,), f"{self.label}'s per-tensor global scale", ("float32",),
                                                 self.label)
            if input_global:
                need["input_global_scale"] = Layout((1,), f"{self.label} activations' global scale", ("float32",),
                                                    self.label)
        if not w.symmetric:
            zp_why = f"asymmetric {kind} weights, {scale.why}"
            if self.packed_zero_point and w.strategy in ("group", "channel"):
                need["weight_zero_point"] = Layout((math.ceil(out * bits / INT32_BITS), scale.shape[1]),
                                                   f"{zp_why}, packed into int32 along output {out}", ("int32",),
                                                   zp_why)
            else:
                need["weight_zero_point"] = Layout(scale.shape, zp_why, (zp_dtype or "int8",), zp_why)
        return need

    def stored_weight(self, q: torch.Tensor, num_bits: int) -> dict[str, torch.Tensor]:
        """Grid values [out, in] as this format stores them, by suffix."""
        if self.pack is None:
            return {"weight": q}
        out = {"weight_packed": self.pack(q, num_bits)}
        if self.stores_shape:
            out["weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        return out

    def stored_zero_point(self, zero_point: torch.Tensor, num_bits: int) -> torch.Tensor:
        """Zero points [out, groups] as this format stores them."""
        return pack_int32_rows(zero_point, num_bits) if self.packed_zero_point else zero_point

    def read_zero_point(self, stored: torch.Tensor, num_bits: int, shape: torch.Size) -> torch.Tensor:
        """Stored zero points -> [out, groups] of `shape` (possibly a transposed view)."""
        return unpack_int32_rows(stored, num_bits, shape) if self.packed_zero_point else stored


def scale_layout(weights: WeightArgs, out: int, inp: int) -> Layout:
    """The `weight_scale` shape of a linear [out, in] by its weights' scale granularity (every format alike)."""
    w = weights
    if w.strategy == "tensor":
        return Layout((1,), "per-tensor scale")
    if w.strategy == "channel":
        return Layout((out, 1), f"per-channel scales, output {out}")
    if w.strategy in ("group", "tensor_group"):
        return Layout((out, math.ceil(inp / w.group_size)), f"group size {w.group_size}, input {inp}")
    rows, cols = w.block_structure
    return Layout((math.ceil(out / rows), math.ceil(inp / cols)), f"blocks of {rows}x{cols}, weight [{out}, {inp}]")


FP4_TRANSFORMERS_BOUND = 0.1
"""transformers on an FP4 checkpoint: compressed-tensors' FP4 decompressor rounds each dequantized weight (E2M1 value
× scale / global scale) to bf16, up to 2^-8 of it, before the float32 model computes; a faithful read stays well below
this bound, a layout read wrong (a scale of another row, swapped nibbles) lands far above it."""

INT_BITS = (2, 3, 4, 8)
ALL_WEIGHT_STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block")

FORMATS: tuple[NumberFormat, ...] = (
    NumberFormat(
        "nvfp4-pack-quantized", ("float",), (4,), ("tensor_group",), None, {"float": "uint8"},
        pack=pack_fp4, unpack=unpack_fp4, packing="packed two per byte", label="NVFP4", group_size=16,
        scale_dtype="float8_e4m3fn", scale_words="FP8 E4M3 group scales", global_scales=True,
        transformers_bound=FP4_TRANSFORMERS_BOUND, dequantize_at_load=True,
        deployments=(
            Deployment("NVFP4 weights and activations (nvfp4)", (4,), "fp4",
                       (FP4_MARLIN, FP4_MARLIN, FP4_MARLIN,
                        "vLLM CUTLASS FP4 tensor-core GEMM (cutlass_scaled_fp4_mm)"),
                       f"{VLLM_011} (compressed_tensors_w4a4_nvfp4.py: FP4 GEMM on sm100+, else Marlin FP4)"),
            Deployment("NVFP4 weight-only (nvfp4a16)", (4,), None, (FP4_MARLIN,) * 4,
                       f"{VLLM_011} (compressed_tensors_w4a16_nvfp4.py: Marlin FP4 on every generation)"))),
    NumberFormat(
        "mxfp4-pack-quantized", ("float",), (4,), ("group",), None, {"float": "uint8"},
        pack=pack_fp4, unpack=unpack_fp4, packing="packed two per byte", label="MXFP4", group_size=32,
        scale_dtype="uint8", scale_words="power-of-two E8M0 scales",
        transformers_bound=FP4_TRANSFORMERS_BOUND, dequantize_at_load=True,
        deployments=(
            Deployment("MXFP4 weight-only (mxfp4a16)", (4,), None, (FP4_MARLIN,) * 4,
                       "vLLM after 0.11 (compressed_tensors_w4a16_mxfp4.py, Marlin MXFP4); 0.11 itself has no "
                       "compressed-tensors MXFP4 scheme"),)),
    NumberFormat(
        # FP8 with quantized activations (weight-only FP8 is naive-quantized: compressed-tensors' rule).
        "float-quantized", ("float",), (8,), ("tensor", "channel", "group", "block"), True,
        {"float": "float8_e4m3fn", "int": "int8"}, transformers_reads_experts=True,
        runtime_kernels=("fp8", "fp8-block"),
        deployments=(
            Deployment("FP8 per-channel or per-tensor weights, dynamic FP8 activations (fp8-dynamic, w8a8-fp8)", (8,),
                       "fp8", (FP8_MARLIN, "vLLM CUTLASS FP8 scaled_mm (sm89)", "vLLM CUTLASS FP8 scaled_mm (sm90)",
                               "vLLM CUTLASS FP8 scaled_mm (sm100/sm120)"),
                       f"{VLLM_SCALED_MM}; below sm89 compressed_tensors_w8a8_fp8.py falls back to Marlin FP8",
                       strategies=("tensor", "channel")),
            Deployment("FP8 128 x 128 block weights, FP8 activations per 128 columns (fp8-block)", (8,), "fp8",
                       (FP8_MARLIN, "vLLM Triton block-FP8 GEMM (w8a8_block_fp8_matmul)",
                        "vLLM CUTLASS block-scaled FP8 (DeepGEMM where installed)",
                        "vLLM CUTLASS block-scaled FP8 (sm100)"),
                       f"{VLLM_011} (cutlass_scaled_mm_supports_block_fp8: sm90+; Triton below; Marlin below sm89)",
                       strategies=("block",)))),
    NumberFormat(
        # One int8 per weight, even for int4: the layout int8 GEMM kernels (and the W4A8 kernels) read.
        "int-quantized", ("int",), INT_BITS, ("tensor", "channel", "group", "block"), True,
        {"int": "int8", "float": "float8_e4m3fn"}, runtime_kernels=("int8", "w4a8"),
        deployments=(
            Deployment("int8 weights, dynamic int8 activations (w8a8, w8a8-rtn)", (8,), "int8",
                       ("vLLM CUTLASS int8 scaled_mm (sm80)", "vLLM CUTLASS int8 scaled_mm (sm89)",
                        "vLLM CUTLASS int8 scaled_mm (sm90)",
                        "no vLLM kernel: the sm100/sm120 CUTLASS scaled_mm is FP8-only; serve fp8-dynamic"),
                       f"{VLLM_SCALED_MM}; scaled_mm_c3x_sm100.cu: int8 not supported on SM100"),
            Deployment("int4 weights, dynamic FP8 activations (w4a8, w4a8-rtn)", (4,), "fp8",
                       ("no vLLM kernel: serve w4a16 (Marlin)", "no vLLM kernel: serve w4a16 (Marlin)",
                        "vLLM CUTLASS W4A8 mixed-input GEMM",
                        "no vLLM kernel: the CUTLASS W4A8 kernel is sm90-only; serve w4a16 (Marlin)"),
                       f"{VLLM_011} (compressed_tensors_w4a8_fp8.py, CutlassW4A8LinearKernel: capability 90)"))),
    NumberFormat(
        # Weight-only: several small ints packed into each int32.
        "pack-quantized", ("int",), INT_BITS, ("tensor", "channel", "group", "block"), False, {"int": "int32"},
        pack=pack_int32, unpack=unpack_int32, packing="packed into int32", stores_shape=True,
        packed_zero_point=True, transformers_reads_experts=True, runtime_kernels=("int4",),
        deployments=(
            Deployment("int4 weight-only (w4a16 and its AWQ, RTN, asymmetric, AutoRound variants)", (4,), None,
                       WNA16_PATHS, VLLM_MP),
            Deployment("int8 weight-only (w8a16)", (8,), None,
                       WNA16_PATHS, VLLM_MP),
            Deployment("int2 and int3 weight-only (w2a16, w3a16 and variants)", (2, 3), None, (NO_VLLM_KERNEL,) * 4,
                       f"{VLLM_011} (Marlin and Machete take 4- and 8-bit weights only); llama.cpp Q2_K/Q3_K"))),
    NumberFormat(
        # compressed-tensors' fallback, one value per element: what no row above takes, FP8 weight-only (W8A16-FP8)
        # among ptqlab's schemes.
        "naive-quantized", ("int", "float"), INT_BITS, ALL_WEIGHT_STRATEGIES, None,
        {"int": "int8", "float": "float8_e4m3fn"},
        transformers_reads_experts=True,  # FP8 experts: the naive-quantized weights ptqlab writes
        deployments=(
            Deployment("FP8 weight-only (w8a16-fp8)", (8,), None, (FP8_MARLIN,) * 4,
                       f"{VLLM_011} (compressed_tensors_w8a16_fp8.py: Marlin FP8 on every generation)"),)),
)
"""Every format, first match first: a scheme is stored in the first row that takes it, as compressed-tensors
picks a compressor (compressors/format.py, COMPRESSION_FORMAT_PRIORITY: the specific formats before naive-quantized;
tests/test_number_formats.py checks that every preset lands where compressed-tensors puts it)."""
BY_NAME: dict[str, NumberFormat] = {f.name: f for f in FORMATS}
FP4_FORMATS: tuple[NumberFormat, ...] = tuple(f for f in FORMATS if f.number_types == ("float",) and f.bits == (4,))
"""The FP4 E2M1 formats (NVFP4, MXFP4): compressed-tensors' layouts exactly, what vLLM's FP4 kernels read."""


def format_of(weights: WeightArgs, with_activations: bool) -> NumberFormat:
    """The format ptqlab writes these weights in (with or without quantized input activations)."""
    for fmt in FORMATS:
        if fmt.takes(weights, with_activations):
            return fmt
    raise ValueError(f"no stored format takes {weights.type}{weights.num_bits} weights with strategy "
                     f"{weights.strategy!r}")


def activation_kind(activations) -> str | None:
    """`int8`, `fp8` or `fp4` for quantized input activations (anything with type and num_bits), None for 16-bit:
    the key a Deployment covers."""
    if activations is None:
        return None
    return f"{'fp' if activations.type == 'float' else 'int'}{activations.num_bits}"


def deployment_of(weights: WeightArgs, activations: WeightArgs | None) -> Deployment | None:
    """The engine path per GPU generation for a scheme's weights and input activations; None where no row records
    one (a custom scheme outside the presets' families)."""
    fmt = format_of(weights, activations is not None)
    return fmt.deployment(weights, activation_kind(activations))


def packed_format(weights: WeightArgs) -> NumberFormat:
    """The format a linear whose tensors include `weight_packed` is read in, from its weights alone."""
    return next(f for f in FORMATS if f.pack is not None and f.takes(weights))


def fp4_format(strategy: str) -> NumberFormat | None:
    """The FP4 format whose weight scales have this granularity (what a message about an FP4 weight's group size or
    scale dtype names); None for another strategy."""
    return next((f for f in FP4_FORMATS if strategy in f.strategies), None)


def is_fp4(values) -> bool:
    """Whether a format (an object with type and num_bits, or its fields by name) is FP4 E2M1: NVFP4 or MXFP4."""
    if not isinstance(values, dict):
        values = {"type": values.type, "num_bits": values.num_bits}
    return values["type"] == "float" and values["num_bits"] == 4
