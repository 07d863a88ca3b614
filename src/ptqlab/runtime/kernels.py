"""GPU kernels of the fast runtime: int4 weight-only matmul (Triton), int4 dequantization for prefill (Triton),
and the int32 -> 16-bit epilogue of INT8 matmuls (Triton). Pure functions over tensors; CUDA only.

Int4 weights stay in the checkpoint's own packing (compressed-tensors `pack-quantized`): int32 [N, K / 8], value k of
a row in bits 4 (k % 8) .. 4 (k % 8) + 3 of word k // 8, stored as q + 8. The weight is (q - zero_point) * scale
computed in fp32 and rounded to the activation dtype, exactly as `primitives.dequantize` does, so the runtime's
weights are bit for bit the reference model's; products accumulate in fp32.

Decode (few rows) reads the packed weight once: each program dequantizes a [BLOCK_N, BLOCK_K] tile in registers
and multiplies it with up to 16 activation rows on the tensor cores; the K range is split across programs when the
layer has too few output tiles to fill the GPU, with one small reduction after. Prefill (many rows) is compute-bound:
the weight is dequantized once into a scratch buffer and multiplied by cuBLAS, which costs little next to the
matmul itself.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

SMALL_M = 16
"""Rows up to which the fused int4 kernel runs (decode, small batches); above it, dequantize + cuBLAS."""


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _int4_tile(P, S, Z, rn, k, N, K, stride_pn, stride_sn, stride_zn, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
        """Dequantized weights W[rn, k] in fp32: [BLOCK_N, BLOCK_K]."""
        mask = (rn[:, None] < N) & (k[None, :] < K)
        packed = tl.load(P + rn[:, None] * stride_pn + (k[None, :] // 8), mask=mask, other=0)
        q = ((packed >> ((k[None, :] % 8) * 4)) & 0xF) - 8
        group = k[None, :] // GROUP
        if HAS_ZERO:
            q = q - tl.load(Z + rn[:, None] * stride_zn + group, mask=mask, other=0).to(tl.int32)
        scale = tl.load(S + rn[:, None] * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
        return q.to(tl.float32) * scale

    @triton.jit
    def _int4_small_m_kernel(X, P, S, Z, Y, M, N, K, k_per_split, stride_xm, stride_pn, stride_sn, stride_zn,
                             stride_ys, stride_ym, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = split * k_per_split
        for k_offset in range(0, k_per_split, BLOCK_K):
            k = k_start + k_offset + rk
            x = tl.load(X + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
            w = _int4_tile(P, S, Z, rn, k, N, K, stride_pn, stride_sn, stride_zn, GROUP, HAS_ZERO).to(x.dtype)
            acc += tl.dot(x, tl.trans(w))
        y = Y + split * stride_ys + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _sum_splits_kernel(Part, Y, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLITS):
            acc += tl.load(Part + s * numel + offs, mask=mask, other=0.0)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _int4_dequant_kernel(P, S, Z, W, N, K, stride_pn, stride_sn, stride_zn, stride_wn, GROUP: tl.constexpr,
                             HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        w = _int4_tile(P, S, Z, rn, k, N, K, stride_pn, stride_sn, stride_zn, GROUP, HAS_ZERO)
        tl.store(W + rn[:, None] * stride_wn + k[None, :], w.to(W.dtype.element_ty), mask=(rn[:, None] < N) & (k[None, :] < K))

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


def _group(scale: torch.Tensor, k: int) -> int:
    """Columns per scale: the group size, or K for one scale per row."""
    return k // scale.shape[1]


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def int4_matmul_small_m(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [M <= 16, K] @ dequant(packed)ᵀ -> [M, N] in x.dtype."""
    m, k = x.shape
    n = packed.shape[0]
    tiles_n = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    # Enough programs to give every multiprocessor two, but each keeps at least 4 K tiles of work.
    splits = max(1, min(triton.cdiv(2 * _sm_count(x.device), tiles_n), k_tiles // 4))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    zero = zero_point if zero_point is not None else scale
    _int4_small_m_kernel[(tiles_n, splits)](
        x, packed, scale, zero, out, m, n, k, k_per_split, x.stride(0), packed.stride(0), scale.stride(0), zero.stride(0),
        out.stride(0), out.stride(1), GROUP=_group(scale, k), HAS_ZERO=zero_point is not None,
        BLOCK_M=SMALL_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    if splits == 1:
        return out[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, SPLITS=splits, BLOCK=block)
    return y


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, k: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] weight in `dtype` (into `out` when given: a reusable scratch buffer)."""
    n = packed.shape[0]
    w = out if out is not None else torch.empty((n, k), dtype=dtype, device=packed.device)
    zero = zero_point if zero_point is not None else scale
    block_n, block_k = 32, 256
    _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        packed, scale, zero, w, n, k, packed.stride(0), scale.stride(0), zero.stride(0), w.stride(0),
        GROUP=_group(scale, k), HAS_ZERO=zero_point is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return w


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
