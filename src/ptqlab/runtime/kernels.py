"""What the fast runtime's GPU kernels share, and the small ones between matmuls (Triton; CUDA, or Triton's CPU
interpreter for tests): `RuntimeOptions`, the kernels' switches that `load_runtime` takes; the programmatic dependent
launch (`pdl_launch`, `await_inputs`) that every decode-step kernel uses; the split of K across multiprocessors and
the kernel that adds the splits' partial sums (applying a paired gate_up's activation where asked); the grouped
program order of the tiled matmuls; and the int32 -> 16-bit epilogue of INT8 matmuls. The matmuls themselves live
beside it: int4 (int4_kernels.py), FP8 with finer scales (fp8_kernels.py), a decode step's few rows
(small_batch.py), INT8 prefill (int8_gemm.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ptqlab.triton_support import gdc_launch_dependents, gdc_wait, interpreted, tl, triton


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime's GPU kernels run: switches that benchmarks compare, given to `load_runtime` and carried to
    the layers and decode-step kernels that use them. The defaults are the fast settings; none changes what a layer
    computes beyond fp32 rounding."""

    pdl: bool = True
    """Programmatic dependent launch (Hopper and newer) for the kernels of a decode step: each may start while the
    one before it finishes, request its weights, and wait (griddepcontrol.wait) only before it reads activations,
    which hides most of the launch and memory latency between the ~10 small kernels of a layer. False: plain
    launches."""
    fp8_fast_accum: bool = True
    """torch._scaled_mm(use_fast_accum=...): the tensor cores' fast FP8 accumulation, as vLLM's FP8 kernels on
    Hopper use it (their FP8FastAccum schedules). False: accumulation as precise as bf16 cuBLAS, at a slower
    prefill. Benchmarks compare both."""
    choose_kernels: bool = True
    """Where two kernels can compute a layer at a decode step's rows, take the one measured faster on this GPU for
    this shape (runtime/choice.py: measured once per device, cached). False: each layer's default kernel."""
    gemv_tile: tuple[int, int, int] = (8, 512, 4)
    """The one-row int4 kernel's tile: (outputs, words, warps). Each thread holds 8 outputs' words, so each
    activation load serves 8 rows; bench/runtime_speed.py --kernels sweeps others."""

    def __post_init__(self) -> None:
        # Triton's block shapes are powers of two: a wrong tile would otherwise fail inside the kernel's compiler.
        powers_of_two = all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in self.gemv_tile)
        if len(self.gemv_tile) != 3 or not powers_of_two:
            raise ValueError(f"gemv_tile {self.gemv_tile!r}: three powers of two are needed (outputs, words, warps)")


SMALL_M = 16
"""Rows up to which the fused int4 kernels run (decode, small batches); above it, dequantize + cuBLAS."""


def pdl_launch(device: torch.device, enabled: bool) -> dict:
    """The launch arguments of a decode-step kernel: its PDL constexpr (for `await_inputs`) and Triton's launch_pdl,
    both on when `enabled` (RuntimeOptions.pdl) and the GPU supports programmatic dependent launch."""
    use = (enabled and device.type == "cuda" and not interpreted() and gdc_wait is not None
           and _properties(device).major >= 9)
    return {"PDL": use, "launch_pdl": use}


def _properties(device: torch.device):
    """The CUDA device's properties, read once per device."""
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _properties_of(index: int):
    return torch.cuda.get_device_properties(index)


def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors, which the split of K fills; 1 elsewhere (Triton's CPU interpreter), so that small
    test shapes split K as large layers do on a GPU."""
    return _properties(device).multi_processor_count if device.type == "cuda" else 1


PAIR_ROWS = 4
"""A gate_up layer whose one-row kernel applies the gated activation stores its rows in blocks of PAIR_ROWS gate
rows followed by the matching up rows (`pair_gate_up`), so that each program holds both halves of its outputs."""

if triton is not None:
    _PAIR_ROWS = tl.constexpr(PAIR_ROWS)

    @triton.jit
    def await_inputs(PDL: tl.constexpr):
        """With programmatic dependent launch: let the next kernel start launching, then wait until the previous
        kernel has finished and its writes are visible. Everything a kernel reads that an earlier kernel of the
        step writes (activations, positions, the cache), and everything it writes, comes after this."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles share the weight tiles they
        read while those are in L2."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * tiles_n
        first_m = (pid // in_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_rows, (pid % in_group) // group_rows

    @triton.jit
    def gated_value(gate, up, GELU: tl.constexpr):
        """act(gate) * up in fp32: SiLU, or GELU's tanh approximation (tanh(u) = 2 sigmoid(2u) - 1)."""
        if GELU:
            u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * u))
        else:
            act = gate * tl.sigmoid(gate)
        return act * up

    @triton.jit
    def _activate_pairs(values, dtype, BLOCK: tl.constexpr, GELU: tl.constexpr):
        """values [BLOCK] of a gate_up output whose rows come in blocks of PAIR_ROWS gate rows then the matching
        PAIR_ROWS up rows -> act(gate) * up [BLOCK // 2], each input rounded to `dtype` first (as the matmul's output
        would be)."""
        v = tl.reshape(values.to(dtype).to(tl.float32), [BLOCK // (2 * _PAIR_ROWS), 2, _PAIR_ROWS])
        gate, up = tl.split(tl.permute(v, (0, 2, 1)))
        return tl.reshape(gated_value(gate, up, GELU), [BLOCK // 2])

    @triton.jit
    def _sum_splits_kernel(Part, Y, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr,
                           GELU: tl.constexpr, PDL: tl.constexpr):
        await_inputs(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLITS):
            acc += tl.load(Part + s * numel + offs, mask=mask, other=0.0)
        if GATED:
            half = tl.program_id(0) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            tl.store(Y + half, _activate_pairs(acc, Y.dtype.element_ty, BLOCK, GELU).to(Y.dtype.element_ty),
                     mask=half < numel // 2)
        else:
            tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _int8_epilogue_kernel(Acc, SX, SW, Bias, Y, M, N, stride_am, stride_ym, HAS_BIAS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.load(Acc + rm[:, None] * stride_am + rn[None, :], mask=mask, other=0).to(tl.float32)
        sx = tl.load(SX + rm, mask=rm < M, other=0.0)
        sw = tl.load(SW + rn, mask=rn < N, other=0.0)
        y = acc * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            y += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _split_k(tiles_n: int, k_tiles: int, device: torch.device, programs_per_sm: int, min_tiles: int) -> tuple[int, int]:
    """(splits, tiles per split): K is split across programs only when the output tiles alone would leave the GPU
    with fewer than `programs_per_sm` programs per multiprocessor, and each split keeps `min_tiles` tiles."""
    splits = max(1, min(triton.cdiv(programs_per_sm * _multiprocessors(device), tiles_n), k_tiles // min_tiles))
    tiles_per_split = triton.cdiv(k_tiles, splits)
    return triton.cdiv(k_tiles, tiles_per_split), tiles_per_split


def _sum_splits(partial: torch.Tensor, dtype: torch.dtype, gated: str | None, pdl: bool) -> torch.Tensor:
    """The splits' fp32 partial sums added (and, when `gated`, act(gate) * up of the paired rows)."""
    if partial.shape[0] == 1:
        return partial[0]
    rows, n = partial.shape[1:]
    y = torch.empty((rows, n // 2 if gated else n), dtype=dtype, device=partial.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(rows * n, block),)](partial, y, rows * n, SPLITS=partial.shape[0], BLOCK=block,
                                                        GATED=gated is not None, GELU=gated == "gelu",
                                                        **pdl_launch(y.device, pdl))
    return y


def pair_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """A gate_up layer's per-row tensor (weights, scales, bias: [2 I, ...], gate rows then up rows) reordered into
    blocks of PAIR_ROWS gate rows followed by the matching up rows."""
    inner = rows.shape[0] // 2
    blocks = rows.reshape(2, inner // PAIR_ROWS, PAIR_ROWS, *rows.shape[1:])
    return blocks.transpose(0, 1).reshape(rows.shape).contiguous()


def int8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  rows: int, dtype: torch.dtype) -> torch.Tensor:
    """acc[:rows] (int32) * x_scale[m] * w_scale[n] (+ bias) in `dtype`, one pass."""
    n = acc.shape[1]
    y = torch.empty((rows, n), dtype=dtype, device=acc.device)
    block_m, block_n = (16, 128) if rows <= 16 else (64, 128)
    _int8_epilogue_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
        acc, x_scale, w_scale, bias if bias is not None else w_scale, y, rows, n, acc.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y
