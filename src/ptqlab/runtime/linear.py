"""The runtime's linear layers: one per way of computing with a stored weight.

`StoredLinear` is a layer as the checkpoint holds it (grid values unpacked to int8 or float8, scales, zero points).
`build_linear` picks how to compute with it (and hands the layer the `RuntimeOptions` its kernels take):
- `Int4Linear`: int4 weight-only (W4A16) on the GPU: the packed weight read by Triton kernels at decode,
  dequantized into cuBLAS for prefill;
- `Fp8Linear`: FP8 weights and dynamic per-token FP8 activations (one Triton pass quantizes the activation, then
  `torch._scaled_mm` with row-wise scales);
- `Int8Linear`: INT8 weights and dynamic per-token INT8 activations (`torch._int_mm`, then one pass applies the
  scales);
- `Fp8BlockLinear`: block-wise FP8 (FP8 weights with a scale per 128 x 128 block, FP8 activations with a scale per
  128 columns of each token): `fp8_kernels`' Triton kernels at decode, cuBLAS's block-wise `torch._scaled_mm` for
  prefill where torch has it and fast FP8 accumulation is on (else the Triton matmul);
- `W4A8Linear`: int4 weights with FP8 per-token activations: the int4 kernel on the FP8 grid values for one row,
  `fp8_kernels`' matmul (int4 turned FP8 in registers) for a few, the weight turned FP8 into cuBLAS's block-wise
  matmul for prefill where torch has it;
- `DequantizedLinear`: everything else, and every scheme on CPUs: the weight dequantized once at load and
  activations fake-quantized per token. This is the reference semantics (ptqlab's QuantizedLinear, the
  checkpoint's meaning), so the CPU path is correct by construction, and a 16-bit layer is the same with nothing
  to dequantize.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab import triton_support
from ptqlab.quant import token_triton
from ptqlab.quant.primitives import dequantize, fake_quantize
from ptqlab.runtime import fp8_kernels, int4_kernels, int8_gemm, kernels, small_batch
from ptqlab.runtime.choice import bucket
from ptqlab.runtime.kernels import RuntimeOptions
from ptqlab.schemes import Scheme


@dataclass
class StoredLinear:
    """One linear layer as stored: `weight` [out, in] is the float weight when `scheme` is None (16-bit), else the
    grid values (int8 holding intN values, or float8_e4m3fn: FP8, FP4's E2M1 values) with `scale` and `zero_point`
    in the checkpoint's layouts (and NVFP4's fp32 global scales of the weight and the input)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scheme: Scheme | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    weight_global_scale: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None

    def global_scales(self) -> tuple:
        """NVFP4's global scales as values (layers stacked into one matmul must share them)."""
        return tuple(None if t is None else t.tolist() for t in (self.weight_global_scale, self.input_global_scale))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def _per_channel(layer: StoredLinear) -> StoredLinear:
    """A per-tensor scale written out as the same scale for every row (exactly the same weights)."""
    if layer.scheme is None or layer.scheme.weights.strategy != "tensor":
        return layer
    scale = layer.scale.reshape(1, 1).expand(layer.out_features, 1).contiguous()
    zero = None if layer.zero_point is None else layer.zero_point.reshape(1, 1).expand(layer.out_features, 1).contiguous()
    weights = replace(layer.scheme.weights, strategy="channel")
    return replace(layer, scheme=replace(layer.scheme, weights=weights), scale=scale, zero_point=zero)


def concat_linears(parts: list[StoredLinear]) -> StoredLinear | None:
    """Layers that read the same input (q, k, v; gate, up) stacked into one along the output, so that one matmul
    serves them all. None when their formats differ (a layer kept 16-bit among quantized ones), or their NVFP4 global
    scales do."""
    if len(parts) == 1:
        return parts[0]
    parts = [_per_channel(p) for p in parts]
    first = parts[0]
    if any(p.scheme != first.scheme or p.weight.dtype != first.weight.dtype or p.global_scales() != first.global_scales()
           for p in parts):
        return None
    weights = None if first.scheme is None else first.scheme.weights
    if weights is not None and weights.strategy == "block" and any(p.out_features % weights.block_structure[0]
                                                                   for p in parts[:-1]):
        return None  # a partial block of rows inside the stack would shift every scale row after it

    def cat(tensors):
        return None if tensors[0] is None else torch.cat(tensors)

    biases = [p.bias for p in parts]
    if any(b is not None for b in biases):
        biases = [b if b is not None else torch.zeros(p.out_features, dtype=next(x for x in biases if x is not None).dtype,
                                                      device=p.weight.device) for b, p in zip(biases, parts)]
    return StoredLinear(cat([p.weight for p in parts]), cat(biases), first.scheme, cat([p.scale for p in parts]),
                        cat([p.zero_point for p in parts]), first.weight_global_scale, first.input_global_scale)


SMALL_BATCH_KERNELS = tuple(f"small-batch {tile}" for tile in small_batch.TILES)
"""The small-batch kernel at each of its tiles, as kernel choices name them; the first is the default."""


INT4_GEMM_KERNELS = tuple(f"int4-gemm {tile}" for tile in small_batch.PREFILL_TILES)
"""The same kernel over tiles of rows, for int4 at many rows (prefill), as kernel choices name them."""


def _tile_of(kernel: str) -> small_batch.Tile:
    """The small-batch kernel's tile named in a kernel choice ("small-batch 64x4w", "int4-gemm 128x128")."""
    family, _, name = kernel.partition(" ")
    return (small_batch.PREFILL_TILES if family == "int4-gemm" else small_batch.TILES)[name]


class ChoosingLinear(nn.Module):
    """A layer with more than one kernel for a given number of rows: it names them (`kernels_for`, the default
    first) and computes with any of them (`forward(x, kernel)`); runtime/choice.py times them once per device and
    shape and sets `kernel_by_rows` (bucket of rows -> kernel name). Until then, or with
    RuntimeOptions.choose_kernels off, the first named kernel computes."""

    kernel_by_rows: dict[int, str] | None = None
    in_features: int
    out_dtype: torch.dtype
    scale: torch.Tensor

    def choice_key(self) -> tuple[str, int, int, int] | None:
        """(format, N, K, group) that the measured choice depends on; None where there is nothing to choose."""
        return None

    def kernels_for(self, rows: int) -> list[str]:
        """The kernels that can compute `rows` rows of this layer, its default first."""
        raise NotImplementedError

    def candidates(self, rows: int) -> dict:
        """name -> function of an input of `rows` rows (as example_input makes it), for each kernel that can."""
        return {name: functools.partial(self.forward, kernel=name) for name in self.kernels_for(rows)}

    def example_input(self, rows: int) -> torch.Tensor:
        device = self.scale.device
        generator = torch.Generator(device=device).manual_seed(rows)
        return torch.randn((rows, self.in_features), generator=generator, device=device, dtype=self.out_dtype)

    def kernel_for(self, rows: int) -> str:
        if self.kernel_by_rows is not None:
            return self.kernel_by_rows[bucket(rows)]
        return self.kernels_for(rows)[0]


class DequantizedLinear(nn.Module):
    """y = fake_quant(x) @ Wᵀ + b with W dequantized once (or 16-bit as stored)."""

    kernel = "dequantized"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_args=None,
                 input_global_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("input_global_scale", input_global_scale)  # NVFP4 activations: calibrated, fp32 [1]
        self.input_args = input_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_args is not None:
            x = fake_quantize(x, self.input_args, self.input_global_scale)
        return F.linear(x, self.weight, self.bias)


class Int4Linear(ChoosingLinear):
    """W4A16: the weight stays packed (0.5 byte per value, in the planes of `int4_kernels.int4_planes`) and is dequantized
    inside the kernel: at one row `int4_kernels.int4_gemv`, at a few the small-batch tensor-core kernel (groups of 128 or
    more) or the older 16-row kernel, for prefill dequantized into cuBLAS. `tile` and `pdl`: RuntimeOptions.gemv_tile
    and .pdl."""

    kernel = "int4 triton (decode), dequantize + cuBLAS (prefill)"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bias: torch.Tensor | None, tile: tuple[int, int, int], pdl: bool, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tile, self.pdl = tile, pdl
        self.in_features = q.shape[1]
        self.out_dtype = dtype or (scale.dtype if scale.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16)
        """The activations' dtype (the choice table times the kernels on such inputs)."""
        self.group_words = self.in_features // scale.shape[1] // 8
        plane = int4_kernels.plane_words(self.in_features, self.group_words * 8)
        self.register_buffer("planes", int4_kernels.int4_planes(q, plane))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", bias)
        self.small_batch = small_batch.fits("int4", self.in_features, self.group_words * 8)
        self.paired = False
        """Rows in kernels.pair_gate_up's order (a gate_up layer whose kernel applies the activation)."""

    def pair_gate_up(self) -> bool:
        """Reorder this gate_up layer's rows so that one-row decode can apply the gated activation inside the matmul
        (`gated`); outputs then come in that order. False (unchanged) when it cannot: odd halves, a bias."""
        if self.paired or self.bias is not None or self.planes.shape[0] % (2 * kernels.PAIR_ROWS):
            return self.paired
        for name in ("planes", "scale", "zero_point"):
            if getattr(self, name) is not None:
                setattr(self, name, kernels.pair_gate_up(getattr(self, name)))
        self.paired = True
        return True

    def gated(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        """act(gate) * up of this paired gate_up layer for one row x [..., K] -> [..., N / 2]."""
        y = int4_kernels.int4_gemv(x.reshape(1, self.in_features), self.planes, self.scale, self.zero_point, self.tile,
                              gated="gelu" if gelu else "silu", pdl=self.pdl)
        return y.reshape(*x.shape[:-1], -1)

    def choice_key(self):
        if not self.planes.is_cuda:
            return None
        return "int4" + ("-asym" if self.zero_point is not None else ""), self.planes.shape[0], self.in_features, \
            self.group_words * 8

    def kernels_for(self, rows: int) -> list[str]:
        names = ["gemv"] if rows == 1 else []
        if self.small_batch and rows <= small_batch.SMALL_BATCH:
            names += SMALL_BATCH_KERNELS
        if 1 < rows <= kernels.SMALL_M and self.group_words >= 16:
            names.append("small-m")
        names.append("dequantize+cublas")
        if self.small_batch and rows > small_batch.SMALL_BATCH:
            names += INT4_GEMM_KERNELS
        return names

    def _compute(self, rows: torch.Tensor, kernel: str) -> torch.Tensor:
        if kernel == "gemv":
            y = int4_kernels.int4_gemv(rows, self.planes, self.scale, self.zero_point, self.tile, pdl=self.pdl)
        elif kernel.startswith(("small-batch", "int4-gemm")):
            return small_batch.small_batch_matmul("int4", rows, self.planes, self.scale, zero_point=self.zero_point,
                                                  bias=self.bias, tile=_tile_of(kernel), pdl=self.pdl)
        elif kernel == "small-m":
            y = int4_kernels.int4_matmul_small_m(rows, self.planes, self.scale, self.zero_point, pdl=self.pdl)
        else:
            weight = int4_kernels.int4_dequantize(self.planes, self.scale, self.zero_point, self.in_features, rows.dtype)
            return F.linear(rows, weight, self.bias)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return self._compute(rows, kernel or self.kernel_for(rows.shape[0])).reshape(*x.shape[:-1], -1)


class TokenQuantizedLinear(ChoosingLinear):
    """What FP8 and INT8 W8A8 share: an 8-bit weight [out, in] with one fp32 scale per output row, and an input put
    on `input_grid` per token, by this layer or already by the fused norm or activation before it. A decode step's
    rows (up to small_batch.SMALL_BATCH) take the small-batch kernel or cuBLAS, whichever the kernel choice table
    measured faster; prefill takes cuBLAS."""

    input_grid: token_triton.TokenGrid
    fmt: str
    cublas_min_rows = 1
    """Rows cuBLAS's matmul needs at least; fewer are zero-padded up to it."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 pdl: bool = RuntimeOptions.pdl) -> None:
        super().__init__()
        self.in_features, self.out_dtype, self.pdl = weight.shape[1], dtype, pdl
        self.register_buffer("weight", weight)  # row-major: its .t() is the column-major operand the matmuls take
        self.register_buffer("scale", scale.float().reshape(1, -1).contiguous())
        self.register_buffer("bias", bias)
        self.small_batch = small_batch.fits(self.fmt, self.in_features)
        self.min_rows = 1 if self.small_batch else self.cublas_min_rows
        """Rows the fused norm or activation before this layer pads its quantized output to."""

    def quantized_input(self, x: torch.Tensor | token_triton.QuantizedRows) -> token_triton.QuantizedRows:
        if isinstance(x, token_triton.QuantizedRows):
            return x
        return token_triton.quantize_tokens(x, self.input_grid, rows_out=self.min_rows)

    def choice_key(self):
        return (self.fmt, self.weight.shape[0], self.in_features, self.in_features) if self.weight.is_cuda else None

    def kernels_for(self, rows: int) -> list[str]:
        if rows <= small_batch.SMALL_BATCH:
            return [*(SMALL_BATCH_KERNELS if self.small_batch else ()), "cublas"]
        return ["cublas", *self.prefill_kernels()]

    def prefill_kernels(self) -> list[str]:
        """Kernels other than cuBLAS for many rows."""
        return []

    def cublas(self, x: token_triton.QuantizedRows, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | token_triton.QuantizedRows, kernel: str | None = None) -> torch.Tensor:
        x = self.quantized_input(x)
        rows = x.shape.numel() // x.shape[-1]
        kernel = kernel or self.kernel_for(rows)
        if kernel.startswith("small-batch"):
            y = small_batch.small_batch_matmul(self.fmt, x.q[:rows], self.weight, self.scale, x_scale=x.scale[:rows],
                                               bias=self.bias, out_dtype=self.out_dtype, tile=_tile_of(kernel),
                                               pdl=self.pdl)
        elif kernel.startswith("triton-gemm"):
            y = int8_gemm.int8_gemm(x.q[:rows], x.scale[:rows], self.weight, self.scale, self.bias, self.out_dtype,
                                    kernel.partition(" ")[2] or "128x128")
        else:
            y = self.cublas(x, rows)
        return y.reshape(*x.shape[:-1], -1)


class Fp8Linear(TokenQuantizedLinear):
    """FP8 W8A8: x quantized per token to FP8, multiplied by the FP8 weight with fp32 row and column scales: the
    small-batch kernel or `torch._scaled_mm` (cuBLAS). `fast_accum`: RuntimeOptions.fp8_fast_accum."""

    kernel = "fp8 small-batch triton (decode) / _scaled_mm"
    input_grid = token_triton.FP8_TOKENS
    fmt = "fp8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 fast_accum: bool, pdl: bool = RuntimeOptions.pdl) -> None:
        super().__init__(weight, scale, bias, dtype, pdl)
        self.fast_accum = fast_accum

    def cublas(self, x: token_triton.QuantizedRows, rows: int) -> torch.Tensor:
        y = torch._scaled_mm(x.q, self.weight.t(), scale_a=x.scale, scale_b=self.scale, out_dtype=self.out_dtype,
                             use_fast_accum=self.fast_accum)
        return y if self.bias is None else y + self.bias


class Int8Linear(TokenQuantizedLinear):
    """INT8 W8A8: x quantized per token to int8, exact int32 products: the small-batch kernel, `torch._int_mm` then
    one pass that applies the scales and bias, or for many rows runtime/int8_gemm.py (scales applied in registers)."""

    kernel = "int8 small-batch triton (decode) / _int_mm"
    input_grid = token_triton.INT8_TOKENS
    fmt = "int8"
    cublas_min_rows = 32
    """torch._int_mm wants more than 16 rows: a few rows are padded with zeros up to this."""

    def prefill_kernels(self) -> list[str]:
        return [f"triton-gemm {tile}" for tile in int8_gemm.TILES] if int8_gemm.fits(self.in_features) else []

    def cublas(self, x: token_triton.QuantizedRows, rows: int) -> torch.Tensor:
        q, scale = x.q, x.scale
        if q.shape[0] < self.cublas_min_rows:  # quantized for the small-batch kernel, unpadded
            q = F.pad(q, (0, 0, 0, self.cublas_min_rows - q.shape[0]))
            scale = F.pad(scale, (0, 0, 0, self.cublas_min_rows - scale.shape[0]))
        acc = torch._int_mm(q, self.weight.t())
        return kernels.int8_epilogue(acc, scale, self.scale, self.bias, rows, self.out_dtype)


def _cublas_blockwise(weight: torch.Tensor, block_rows: int) -> bool:
    """Whether prefill can take cuBLAS's block-wise FP8 matmul (torch._scaled_mm) for this weight [out, in] with
    weight scales per `block_rows` rows x 128 inputs: a CUDA weight whose rows come in 16s, and a torch that computes
    it right on this GPU for this shape (fp8_kernels.blockwise_scaled_mm_works)."""
    if not weight.is_cuda or weight.shape[0] % 16:
        return False
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    return fp8_kernels.blockwise_scaled_mm_works(index, block_rows, *weight.shape)


class Fp8BlockLinear(nn.Module):
    """Block-wise FP8 (DeepSeek-V3's format): an FP8 weight [out, in] with one fp32 scale per block of `block_rows`
    rows x 128 inputs, and the input put on an FP8 grid per 128 columns of each token by one small kernel. One row:
    a Triton kernel on CUDA cores; up to kernels.SMALL_M: the Triton matmul (tensor cores, split K); prefill: the
    Triton matmul, or with `fast_accum` (RuntimeOptions.fp8_fast_accum) and where torch has it cuBLAS's block-wise
    matmul, whose accumulation is as imprecise as _scaled_mm's fast accumulation. `pdl`: RuntimeOptions.pdl."""

    kernel = "fp8-block triton"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block_rows: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, fast_accum: bool, pdl: bool) -> None:
        super().__init__()
        self.in_features, self.block_rows, self.out_dtype, self.pdl = weight.shape[1], block_rows, dtype, pdl
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.float().contiguous())  # [ceil(out / block_rows), in / 128]
        self.register_buffer("bias", bias)
        self.cublas_prefill = fast_accum and _cublas_blockwise(weight, block_rows)
        if self.cublas_prefill:
            self.register_buffer("cublas_scale", fp8_kernels.cublas_weight_scale(self.scale, block_rows))
            self.kernel = "fp8-block triton (decode), cuBLAS block-wise _scaled_mm (prefill)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, x_scale = fp8_kernels.quantize_groups(rows, pdl=self.pdl)
        if rows.shape[0] == 1:
            y = fp8_kernels.fp8_block_gemv(q, x_scale, self.weight, self.scale, self.block_rows, self.bias,
                                           self.out_dtype, self.pdl)
        elif rows.shape[0] > kernels.SMALL_M and self.cublas_prefill:
            y = fp8_kernels.scaled_mm_blockwise(q, x_scale, self.weight, self.cublas_scale, self.out_dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = fp8_kernels.fp8_block_matmul(q, x_scale, self.weight, self.scale, self.block_rows, self.bias,
                                             self.out_dtype, self.pdl)
        return y.reshape(*x.shape[:-1], -1)


class W4A8Linear(nn.Module):
    """W4A8: int4 weights, symmetric, one scale per group of a multiple of 128 inputs (packed in the planes of
    `int4_kernels.int4_planes`, 0.5 byte per value), and the input on the per-token FP8 grid, put there by this layer or
    already by the fused norm or activation before it. One row: the one-row int4 kernel on the FP8 grid values,
    its sums times the token's scale; up to kernels.SMALL_M rows: `fp8_kernels.w4a8_matmul` (int4 turned FP8 in
    registers); prefill: the same, or where torch has cuBLAS's block-wise FP8 matmul the weight turned FP8 into a
    scratch buffer and multiplied there with its group scales. `tile` and `pdl`: RuntimeOptions.gemv_tile and
    .pdl."""

    kernel = "w4a8 triton"
    input_grid = token_triton.FP8_TOKENS
    min_rows = 1

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 tile: tuple[int, int, int], pdl: bool) -> None:
        super().__init__()
        self.in_features, self.out_dtype, self.tile, self.pdl = q.shape[1], dtype, tile, pdl
        self.register_buffer("planes", int4_kernels.int4_planes(q, int4_kernels.plane_words(q.shape[1], fp8_kernels.BLOCK_K)))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.one_row = int4_kernels.int4_tiles_fit(self.in_features, scale, tile)
        self.cublas_prefill = _cublas_blockwise(q, 1)
        if self.cublas_prefill:  # one scale per row and 128 inputs, as cuBLAS reads it
            per_tile = scale.float().repeat_interleave(self.in_features // scale.shape[1] // fp8_kernels.BLOCK_K, 1)
            self.register_buffer("cublas_scale", fp8_kernels.cublas_weight_scale(per_tile, 1))
            self.kernel = "w4a8 triton (decode), FP8 weight + cuBLAS block-wise _scaled_mm (prefill)"

    def forward(self, x: torch.Tensor | token_triton.QuantizedRows) -> torch.Tensor:
        if not isinstance(x, token_triton.QuantizedRows):
            x = token_triton.quantize_tokens(x, self.input_grid)
        rows = x.shape.numel() // x.shape[-1]
        if rows == 1 and self.one_row:
            y = int4_kernels.int4_gemv(x.q[:1], self.planes, self.scale, None, self.tile, pdl=self.pdl, x_scale=x.scale,
                                  out_dtype=self.out_dtype)
            if self.bias is not None:
                y = y + self.bias
        elif rows > kernels.SMALL_M and self.cublas_prefill:
            weight = fp8_kernels.int4_to_fp8(self.planes, self.in_features)
            x_scale = fp8_kernels.columns_of(x.scale[:rows], self.in_features // fp8_kernels.BLOCK_K)
            y = fp8_kernels.scaled_mm_blockwise(x.q[:rows], x_scale, weight, self.cublas_scale, self.out_dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = fp8_kernels.w4a8_matmul(x.q[:rows], x.scale[:rows], self.planes, self.scale, self.bias,
                                        self.out_dtype, self.pdl)
        return y.reshape(*x.shape[:-1], -1)


def _kernel_for(layer: StoredLinear) -> str | None:
    """Which fast kernel computes with this layer on a GPU (None: dequantized): one its stored format's row allows
    (number_formats' `runtime_kernels`) whose tiles this layer's shapes and scales fit."""
    scheme = layer.scheme
    if scheme is None or not triton_support.available(layer.weight):
        return None
    kernel = _fitting_kernel(layer)
    return kernel if kernel in scheme.number_format.runtime_kernels else None


def _fitting_kernel(layer: StoredLinear) -> str | None:
    """The kernel whose arithmetic and tiles fit the layer's scheme and shapes."""
    scheme = layer.scheme
    w, a = scheme.weights, scheme.input_activations
    out_features, in_features = layer.weight.shape
    group = w.group_size if w.strategy == "group" else in_features
    power_of_two_groups = w.strategy in ("channel", "tensor") or group & (group - 1) == 0
    if a is None and w.type == "int" and w.num_bits == 4 and power_of_two_groups \
            and int4_kernels.plane_words(in_features, group) is not None:
        return "int4"
    per_token = a is not None and a.strategy == "token" and a.symmetric and a.dynamic
    symmetric_rows = w.strategy in ("channel", "tensor") and w.symmetric
    if per_token and symmetric_rows and w.type == a.type == "float" and in_features % 16 == 0 and out_features % 16 == 0:
        return "fp8"
    if per_token and symmetric_rows and w.type == a.type == "int" and w.num_bits == a.num_bits == 8 \
            and in_features % 8 == 0 and out_features % 8 == 0:
        return "int8"
    # FP8 activations on finer grids: K tiles of 128 inputs, each one activation group and one weight scale column.
    tile = fp8_kernels.BLOCK_K
    fp8_input = a is not None and a.type == "float" and a.num_bits == 8 and a.dynamic and a.symmetric \
        and in_features % tile == 0
    if fp8_input and w.type == "float" and w.num_bits == 8 and w.strategy == "block" and a.strategy == "group" \
            and w.block_structure[1] == a.group_size == tile:
        return "fp8-block"
    if fp8_input and a.strategy == "token" and w.type == "int" and w.num_bits == 4 and w.symmetric \
            and group % tile == 0:
        return "w4a8"
    return None


def build_linear(layer: StoredLinear, dtype: torch.dtype, options: RuntimeOptions = RuntimeOptions()) -> nn.Module:
    """The module that computes with `layer` in activation dtype `dtype`, on the layer's device, its kernels run as
    `options` say."""
    bias = None if layer.bias is None else layer.bias.to(dtype)
    if layer.scheme is None:
        return DequantizedLinear(layer.weight.to(dtype), bias)
    kernel = _kernel_for(layer)
    layer = _per_channel(layer)  # the kernels take row scales; a per-tensor scale is the same scale on every row
    if kernel == "int4":
        return Int4Linear(layer.weight, layer.scale, layer.zero_point, bias, options.gemv_tile, options.pdl, dtype)
    if kernel == "fp8":
        return Fp8Linear(layer.weight, layer.scale, bias, dtype, options.fp8_fast_accum, options.pdl)
    if kernel == "int8":
        return Int8Linear(layer.weight, layer.scale, bias, dtype, options.pdl)
    if kernel == "fp8-block":
        return Fp8BlockLinear(layer.weight, layer.scale, layer.scheme.weights.block_structure[0], bias, dtype,
                              options.fp8_fast_accum, options.pdl)
    if kernel == "w4a8":
        return W4A8Linear(layer.weight, layer.scale, bias, dtype, options.gemv_tile, options.pdl)
    weight = dequantize(layer.weight, layer.scale, layer.zero_point, layer.scheme.weights, dtype, layer.weight_global_scale)
    return DequantizedLinear(weight, bias, layer.scheme.input_activations, layer.input_global_scale)

