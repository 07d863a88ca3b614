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
INT4_DECODE = "tinygemm"
"""Single-row int4 matmul: "tinygemm" (PyTorch's _weight_int4pack_mm on a second, re-tiled copy of the weight:
the fastest measured on an H100, 337 vs 315 tok/s for an 8B model, see bench/results) or "triton" (the kernel
below, on the checkpoint's packing, no second copy). Several rows always use the kernel below (faster than
tinygemm there), prefill the dequantization."""
FP8_FAST_ACCUM = True
"""torch._scaled_mm(use_fast_accum=...): the tensor cores' fast FP8 accumulation, as vLLM's FP8 kernels on Hopper
use it (their FP8FastAccum schedules). False: accumulation as precise as bf16 cuBLAS, ~7 % slower prefill on
an 8B shape. Benchmarks compare both."""


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _nibble_plus_one(packed, j: tl.constexpr):
        """1 + u/16 for value j (u = 0..15) of each packed word, in two integer ops and no conversion: u is moved into
        the top 4 mantissa bits of 1.0. The decode kernel multiplies these directly (one op per value fewer than
        _nibble) and removes the 1 with the activation sum once per tile."""
        if j * 4 <= 19:
            moved = packed << (19 - 4 * j)
        else:
            moved = packed >> (4 * j - 19)
        return ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _nibble(packed, j: tl.constexpr):
        """Value j (0..15) of each packed word as fp32, without an int-to-float conversion (a slow instruction, 8
        per word): the nibble is or-ed into the mantissa of 2^23, whose float value minus 2^23 is exactly it."""
        bits = ((packed >> (4 * j)) & 0xF) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int4_small_m_kernel(X, P, S, Z, Y, M, N, K, tiles_per_split, stride_xm, stride_pn, stride_sn, stride_zn,
                             stride_ys, stride_ym, GROUP_WORDS: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
                             HAS_ZERO: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_KP: tl.constexpr):
        """A tile is BLOCK_N rows x BLOCK_KP packed words (8 values each). Nibble j of every word is unpacked in turn
        (shift, mask) and multiplied with the activations at k = 8 word + j.
        One row (decode): in fp32; the tile may hold several whole scale groups, and each group's scale and -8 / zero
        point are applied once to its row sums. Up to 16 rows: the tile lies inside one group; each nibble's weights
        are dequantized to the activation dtype and multiplied on tensor cores."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rp = tl.arange(0, BLOCK_KP)
        row_words = K // 8
        if ONE_ROW:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            rm = tl.arange(0, 16)
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for i in range(tiles_per_split):
            w0 = (split * tiles_per_split + i) * BLOCK_KP
            words = w0 + rp
            w_mask = words < row_words
            packed = tl.load(P + rn[:, None] * stride_pn + words[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0,
                             eviction_policy="evict_first")
            if ONE_ROW:
                sums = tl.zeros([BLOCK_N, BLOCK_KP], dtype=tl.float32)
                x_total = tl.zeros([BLOCK_KP], dtype=tl.float32)
                for j in tl.static_range(8):
                    x = tl.load(X + words * 8 + j, mask=w_mask, other=0.0).to(tl.float32)
                    sums += _nibble_plus_one(packed, j) * x[None, :]
                    x_total += x
                # sums holds Σ (1 + u/16) x: per scale group, Σ u x = 16 (sums - Σ x), and the weight sum is
                # (Σ u x - (8 + zero) Σ x) * scale.
                groups = w0 // GROUP_WORDS + tl.arange(0, GROUPS_PER_TILE)
                g_mask = n_mask[:, None] & (groups[None, :] * GROUP_WORDS < row_words)
                scale = tl.load(S + rn[:, None] * stride_sn + groups[None, :], mask=g_mask, other=0.0).to(tl.float32)
                offset = tl.full([BLOCK_N, GROUPS_PER_TILE], 8.0, tl.float32)
                if HAS_ZERO:
                    offset += tl.load(Z + rn[:, None] * stride_zn + groups[None, :], mask=g_mask, other=0).to(tl.float32)
                if GROUPS_PER_TILE == 1:
                    group_sums = tl.sum(sums, axis=1)[:, None]
                    group_x = tl.sum(x_total, axis=0)
                else:
                    group_sums = tl.sum(tl.reshape(sums, [BLOCK_N, GROUPS_PER_TILE, BLOCK_KP // GROUPS_PER_TILE]), axis=2)
                    group_x = tl.sum(tl.reshape(x_total, [GROUPS_PER_TILE, BLOCK_KP // GROUPS_PER_TILE]), axis=1)[None, :]
                acc += tl.sum((16.0 * (group_sums - group_x) - offset * group_x) * scale, axis=1)
            else:
                group = w0 // GROUP_WORDS
                tile_mask = n_mask & (w0 < row_words)  # the last split may run past the row
                scale = tl.load(S + rn * stride_sn + group, mask=tile_mask, other=0.0).to(tl.float32)
                offset = tl.full([BLOCK_N], 8.0, tl.float32)
                if HAS_ZERO:
                    offset += tl.load(Z + rn * stride_zn + group, mask=tile_mask, other=0).to(tl.float32)
                for j in tl.static_range(8):
                    x = tl.load(X + rm[:, None] * stride_xm + words[None, :] * 8 + j,
                                mask=(rm[:, None] < M) & w_mask[None, :], other=0.0)
                    w = ((_nibble(packed, j) - offset[:, None]) * scale[:, None]).to(x.dtype)
                    acc += tl.dot(x, tl.trans(w))
        if ONE_ROW:
            tl.store(Y + split * stride_ys + rn, acc.to(Y.dtype.element_ty), mask=n_mask)
        else:
            y = Y + split * stride_ys + rm[:, None] * stride_ym + rn[None, :]
            tl.store(y, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & n_mask[None, :])

    @triton.jit
    def _sum_splits_kernel(Part, Y, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLITS):
            acc += tl.load(Part + s * numel + offs, mask=mask, other=0.0)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _int4_dequant_kernel(P, S, Z, W, N, K, stride_pn, stride_sn, stride_zn, stride_wn, GROUP_WORDS: tl.constexpr,
                             HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
        """Each packed word read once; its 8 values put back in order (nested joins: value j of a word lands at
        offset j) and written as contiguous rows."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        words = tl.program_id(1) * BLOCK_KP + tl.arange(0, BLOCK_KP)
        mask = (rn[:, None] < N) & (words[None, :] < K // 8)
        packed = tl.load(P + rn[:, None] * stride_pn + words[None, :], mask=mask, other=0)
        group = words[None, :] // GROUP_WORDS
        scale = tl.load(S + rn[:, None] * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
        offset = 8.0
        if HAS_ZERO:
            offset = offset + tl.load(Z + rn[:, None] * stride_zn + group, mask=mask, other=0).to(tl.float32)
        v0 = (_nibble(packed, 0) - offset) * scale
        v1 = (_nibble(packed, 1) - offset) * scale
        v2 = (_nibble(packed, 2) - offset) * scale
        v3 = (_nibble(packed, 3) - offset) * scale
        v4 = (_nibble(packed, 4) - offset) * scale
        v5 = (_nibble(packed, 5) - offset) * scale
        v6 = (_nibble(packed, 6) - offset) * scale
        v7 = (_nibble(packed, 7) - offset) * scale
        even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
        odd = tl.join(tl.join(v1, v5), tl.join(v3, v7))
        values = tl.reshape(tl.join(even, odd), [BLOCK_N, BLOCK_KP * 8])
        k = tl.program_id(1) * BLOCK_KP * 8 + tl.arange(0, BLOCK_KP * 8)
        tl.store(W + rn[:, None] * stride_wn + k[None, :], values.to(W.dtype.element_ty),
                 mask=(rn[:, None] < N) & (k[None, :] < K))

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
                        block_n: int | None = None, block_kp: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ dequant(packed)ᵀ -> [M, N] in x.dtype. block_kp: packed words per tile (one row: raised to
    whole scale groups; several rows: capped at one group). Default tiles, the fastest measured on an H100 over the
    Llama-3-8B layers (bench/results): one row, 8 output rows x up to 512 words (as many as a row has); several
    rows, 128 x 16."""
    m, k = x.shape
    n = packed.shape[0]
    if m == 1:
        block_n = block_n or 8
        block_kp = block_kp or min(512, triton.next_power_of_2(k // 8))
        num_warps = num_warps or (4 if block_kp >= 512 else 2)
    else:
        block_n, block_kp, num_warps = block_n or 128, block_kp or 16, num_warps or 4
    group_words = _group(scale, k) // 8
    if group_words >= k // 8:  # one scale per row: every tile lies in it
        groups_per_tile = 1
    elif m > 1:  # several rows: tiles inside one group
        block_kp = min(block_kp, group_words)
        groups_per_tile = 1
        if group_words % block_kp:
            raise ValueError(f"{block_kp} packed words per tile do not divide a scale group of {group_words}")
    else:  # one row: a tile holds whole groups
        block_kp = max(block_kp, group_words)
        groups_per_tile = block_kp // group_words
        if block_kp % group_words or groups_per_tile & (groups_per_tile - 1):
            raise ValueError(f"a tile of {block_kp} packed words must hold a power-of-two number of {group_words}-word groups")
    if m > 1 and block_kp < 16:
        raise ValueError(f"several rows need tiles of 16 packed words; scale groups here have {group_words}")
    tiles_n = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k // 8, block_kp)
    # Enough programs to give every multiprocessor four, each keeping at least 2 tiles of work.
    splits = max(1, min(triton.cdiv(4 * _sm_count(x.device), tiles_n), k_tiles // 2))
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    zero = zero_point if zero_point is not None else scale
    _int4_small_m_kernel[(tiles_n, splits)](
        x, packed, scale, zero, out, m, n, k, tiles_per_split, x.stride(0), packed.stride(0), scale.stride(0),
        zero.stride(0), out.stride(0), out.stride(1), GROUP_WORDS=group_words, GROUPS_PER_TILE=groups_per_tile,
        HAS_ZERO=zero_point is not None,
        ONE_ROW=m == 1, BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=num_warps)
    if splits == 1:
        return out[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, SPLITS=splits, BLOCK=block)
    return y


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, k: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`."""
    n = packed.shape[0]
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    zero = zero_point if zero_point is not None else scale
    block_n, block_kp = 32, 32
    _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // 8, block_kp))](
        packed, scale, zero, w, n, k, packed.stride(0), scale.stride(0), zero.stride(0), w.stride(0),
        GROUP_WORDS=_group(scale, k) // 8, HAS_ZERO=zero_point is not None, BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=4)
    return w


def tinygemm_pack(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, k: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The weight re-tiled for PyTorch's tinygemm int4 kernel (weight, scales_and_zeros, group size), or None where
    it does not apply. tinygemm computes (u - 8) * s + z for u = q + 8: z = 0, or -zero_point * s if asymmetric."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    group = _group(scale, k)
    if dtype != torch.bfloat16 or group not in (32, 64, 128, 256) or k % 128 or packed.shape[0] % 8:
        return None
    u = unpack_from_int32(packed, 4, torch.Size([packed.shape[0], k])).to(torch.int32) + 8
    weight = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), 8)
    scales = scale.to(dtype)
    zeros = torch.zeros_like(scales) if zero_point is None else -(zero_point.float() * scale.float()).to(dtype)
    return weight, torch.stack([scales.T, zeros.T], dim=-1).contiguous(), group


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
