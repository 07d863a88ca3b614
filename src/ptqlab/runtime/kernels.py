"""GPU kernels of the fast runtime: int4 weight-only matmuls (Triton), int4 dequantization for prefill (Triton),
and the int32 -> 16-bit epilogue of INT8 matmuls (Triton). Pure functions over tensors; CUDA (or Triton's CPU
interpreter, for tests). Also `RuntimeOptions`, the kernels' switches that `load_runtime` takes, and the
programmatic dependent launch (`pdl_launch`, `await_inputs`) that every decode-step kernel here and in fused.py uses.

Int4 weights hold q + 8 (u = 0..15) in int32 words of 8 values. The checkpoint (compressed-tensors
`pack-quantized`) stores value k of a row in nibble k % 8 of word k // 8; at load the runtime re-packs each row into
*planes* (`int4_planes`): every run of 8 P values (P = `plane_words`, 16 for groups of 128 or more) becomes P words
whose nibble j holds values j P .. j P + P - 1. A word's 8 values then lie in one scale group, as before, and the
activations that nibble j of neighbouring words multiplies are contiguous, so the one-row kernel loads them as
vectors instead of one by one. The weight is (q - zero_point) * scale computed in fp32, exactly as
`primitives.dequantize` does; products accumulate in fp32.

Decode at one row (`int4_gemv`) is bound by memory and by the integer work of unpacking 8 values per word on CUDA
cores; it spends 1.5 instructions per value on that (one funnel shift per two nibbles, one LOP3 per nibble that
masks it into the mantissa of an fp32 1.0) plus one FMA, and requests the next tile before the current one's
arithmetic. For a gate_up layer whose rows are paired (`pair_gate_up`) it applies the gated activation itself, so a
decode step skips the activation kernel. 2-16 rows (`int4_matmul_small_m`) dequantize each nibble's tile and use
the tensor cores. Prefill (many rows) is compute-bound: the weight is dequantized once into a scratch buffer and
multiplied by cuBLAS, which costs little next to the matmul itself.
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
    _INTERPRETED = tl.constexpr(interpreted())
    """Triton's CPU interpreter (kernel development and tests without a GPU): it runs no inline PTX and mishandles
    a scalar mask over a block, so those few lines take an equivalent form there."""
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
    def _nibble_pair(words, j: tl.constexpr):
        """Nibbles j (odd) and j - 1 of uint32 words as fp32 1 + u/16 and 1 + u/256, with no int-to-float conversion:
        one funnel shift puts them at bits 19..22 and 15..18, the top of an fp32 mantissa, and one LOP3 each masks
        the nibble and ors in the bits of 1.0 (Triton's own and/or compiles to two instructions here)."""
        shift: tl.constexpr = (19 - 4 * j) % 32
        moved = (words << shift) | (words >> (32 - shift))
        if _INTERPRETED:
            hi = (moved & 0x00780000) | 0x3F800000
            lo = (moved & 0x00078000) | 0x3F800000
        else:
            hi, lo = tl.inline_asm_elementwise(
                "lop3.b32 $0, $2, 0x00780000, 0x3F800000, 0xEA; lop3.b32 $1, $2, 0x00078000, 0x3F800000, 0xEA;",
                "=r,=r,r", [moved], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        return hi.to(tl.float32, bitcast=True), lo.to(tl.float32, bitcast=True)

    @triton.jit
    def _plane_offsets(words, PLANE: tl.constexpr):
        """Input index of nibble 0 of each word in the plane layout (nibble j: + j PLANE)."""
        return (words // PLANE) * (8 * PLANE) + words % PLANE

    @triton.jit
    def _nibble(packed, j: tl.constexpr):
        """Value j (0..15) of each packed word as fp32, without an int-to-float conversion (a slow instruction, 8
        per word): the nibble is or-ed into the mantissa of 2^23, whose float value minus 2^23 is exactly it."""
        bits = ((packed >> (4 * j)) & 0xF) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int4_gemv_kernel(X, P, S, Z, Y, N, row_words, tiles_per_split, stride_pn, stride_sn, stride_zn, stride_ys,
                          Experts, Weights, XS, stride_xm, stride_pe, stride_se, stride_ze, X_DIV: tl.constexpr,
                          PLANE: tl.constexpr, GROUP_WORDS: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
                          HAS_ZERO: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
                          GATED: tl.constexpr, GELU: tl.constexpr, EXPERTS: tl.constexpr, WEIGHTED: tl.constexpr,
                          X_SCALED: tl.constexpr, PDL: tl.constexpr):
        """One activation row: y[n] = Σ_k x[k] w[n, k] over BLOCK_N outputs and this split's tiles of BLOCK_KP
        words. Per word, nibbles j and j - 1 come out as 1 + u/16 and 1 + u/256 (`_nibble_pair`); the second
        multiplies 16 x so that both accumulate at one scale, 16 Σ (1 + u/16) x. Per scale group,
        Σ (u - 8 - zero) x = 16 Σ sums - Σ (24 x_odd + 264 x_even) - zero Σ x, scaled once. EVEN: the tiles cover N
        and K exactly (no masks, 16-byte loads). X_SCALED: x holds FP8 grid values (W4A8) and the sums are
        multiplied by its fp32 scale XS[0] before anything else.

        EXPERTS: the second grid axis is a (row, expert) pair instead of a split of K: pair p multiplies activation
        row p // X_DIV by expert Experts[p] of the stacked weights (strides *_e) into output row p, times
        Weights[p] (fp32) when WEIGHTED. The expert is known only once the router's kernel has run, so such a
        program waits for it before its first load."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        if EXPERTS:
            await_inputs(PDL)
            expert = tl.load(Experts + split).to(tl.int64)
            P += expert * stride_pe
            S += expert * stride_se
            Z += expert * stride_ze
            X += (split // X_DIV).to(tl.int64) * stride_xm
            w0 = split * 0
        else:
            w0 = split * tiles_per_split * BLOCK_KP
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rp = tl.arange(0, BLOCK_KP)
        rows = P + rn[:, None] * stride_pn
        if EVEN:
            tile = tl.load(rows + (w0 + rp)[None, :], eviction_policy="evict_first")
        else:
            tile = tl.load(rows + (w0 + rp)[None, :], mask=n_mask[:, None] & (w0 + rp < row_words)[None, :], other=0,
                           eviction_policy="evict_first")
        if not EXPERTS:
            await_inputs(PDL)  # the first weight tile is on its way while the kernel before finishes
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(tiles_per_split):
            words = w0 + rp
            # The next tile is requested before this one's arithmetic, so that its loads overlap it.
            more = i + 1 < tiles_per_split
            if _INTERPRETED:
                # The same mask as a block: Triton's interpreter turns a scalar comparison broadcast over a block
                # into int32, which tl.load refuses as a mask.
                more = (0 * rp + i + 1)[None, :] < tiles_per_split
            if EVEN:
                next_tile = tl.load(rows + (words + BLOCK_KP)[None, :], mask=more, other=0, eviction_policy="evict_first")
                w_mask = None
                fill = None  # what masked loads read; no masks here
            else:
                next_tile = tl.load(rows + (words + BLOCK_KP)[None, :],
                                    mask=more & n_mask[:, None] & (words + BLOCK_KP < row_words)[None, :], other=0,
                                    eviction_policy="evict_first")
                w_mask = words < row_words
                fill = 0.0
            u = tile.to(tl.uint32, bitcast=True)
            x_at = X + _plane_offsets(words, PLANE)
            sums = tl.zeros([BLOCK_N, BLOCK_KP], dtype=tl.float32)
            c = tl.zeros([BLOCK_KP], dtype=tl.float32)
            x_sum = tl.zeros([BLOCK_KP], dtype=tl.float32)
            for j in tl.static_range(1, 8, 2):
                hi, lo = _nibble_pair(u, j)
                x_hi = tl.load(x_at + j * PLANE, mask=w_mask, other=fill).to(tl.float32)
                x_lo = tl.load(x_at + (j - 1) * PLANE, mask=w_mask, other=fill).to(tl.float32)
                sums += hi * x_hi[None, :]
                sums += lo * (16.0 * x_lo)[None, :]
                c += 24.0 * x_hi + 264.0 * x_lo
                if HAS_ZERO:
                    x_sum += x_hi + x_lo
            groups = w0 // GROUP_WORDS + tl.arange(0, GROUPS_PER_TILE)
            if EVEN:
                g_mask = None
            else:
                g_mask = n_mask[:, None] & (groups * GROUP_WORDS < row_words)[None, :]
            scale = tl.load(S + rn[:, None] * stride_sn + groups[None, :], mask=g_mask, other=fill).to(tl.float32)
            if GROUPS_PER_TILE == 1:
                group_sums = tl.sum(sums, axis=1)[:, None]
                group_c = tl.sum(c, axis=0)
                group_x = tl.sum(x_sum, axis=0)
            else:
                group_sums = tl.sum(tl.reshape(sums, [BLOCK_N, GROUPS_PER_TILE, BLOCK_KP // GROUPS_PER_TILE]), axis=2)
                group_c = tl.sum(tl.reshape(c, [GROUPS_PER_TILE, BLOCK_KP // GROUPS_PER_TILE]), axis=1)[None, :]
                group_x = tl.sum(tl.reshape(x_sum, [GROUPS_PER_TILE, BLOCK_KP // GROUPS_PER_TILE]), axis=1)[None, :]
            value = 16.0 * group_sums - group_c
            if HAS_ZERO:
                zero = tl.load(Z + rn[:, None] * stride_zn + groups[None, :], mask=g_mask, other=fill).to(tl.float32)
                value -= zero * group_x
            acc += tl.sum(value * scale, axis=1)
            w0 += BLOCK_KP
            tile = next_tile
        if X_SCALED:
            acc *= tl.load(XS)
        if WEIGHTED:
            acc *= tl.load(Weights + split)
        if GATED:  # rows paired (pair_gate_up): write act(gate) * up, half as many outputs
            half = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            y = _activate_pairs(acc, Y.dtype.element_ty, BLOCK_N, GELU)
            tl.store(Y + split * stride_ys + half, y.to(Y.dtype.element_ty), mask=half < N // 2)
        else:
            tl.store(Y + split * stride_ys + rn, acc.to(Y.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _int4_small_m_kernel(X, P, S, Z, Y, M, N, K, tiles_per_split, stride_xm, stride_pn, stride_sn, stride_zn,
                             stride_ys, stride_ym, PLANE: tl.constexpr, GROUP_WORDS: tl.constexpr,
                             HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
        """2-16 rows. A tile is BLOCK_N outputs x BLOCK_KP words inside one scale group; each nibble's weights are
        dequantized to the activation dtype and multiplied on the tensor cores with the 16 (masked) rows."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rp = tl.arange(0, BLOCK_KP)
        rm = tl.arange(0, 16)
        row_words = K // 8
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for i in range(tiles_per_split):
            w0 = (split * tiles_per_split + i) * BLOCK_KP
            words = w0 + rp
            w_mask = words < row_words
            packed = tl.load(P + rn[:, None] * stride_pn + words[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0,
                             eviction_policy="evict_first")
            group = w0 // GROUP_WORDS
            in_row = w0 < row_words  # the last split may run past the row
            if _INTERPRETED:  # the same mask as a block (see _int4_gemv_kernel)
                in_row = 0 * rn + w0 < row_words
            tile_mask = n_mask & in_row
            scale = tl.load(S + rn * stride_sn + group, mask=tile_mask, other=0.0).to(tl.float32)
            offset = tl.full([BLOCK_N], 8.0, tl.float32)
            if HAS_ZERO:
                offset += tl.load(Z + rn * stride_zn + group, mask=tile_mask, other=0).to(tl.float32)
            x_at = X + rm[:, None] * stride_xm + _plane_offsets(words, PLANE)[None, :]
            for j in tl.static_range(8):
                x = tl.load(x_at + j * PLANE, mask=(rm[:, None] < M) & w_mask[None, :], other=0.0)
                w = ((_nibble(packed, j) - offset[:, None]) * scale[:, None]).to(x.dtype)
                acc += tl.dot(x, tl.trans(w))
        y = Y + split * stride_ys + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & n_mask[None, :])

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
    def _int4_dequant_kernel(P, S, Z, W, N, K, stride_pn, stride_sn, stride_zn, stride_wn, PLANE: tl.constexpr,
                             GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Writes the weight in input order, contiguous rows: value k comes from nibble (k mod 8 PLANE) // PLANE of
        word (k // 8 PLANE) PLANE + k mod PLANE. A run of PLANE inputs reads PLANE consecutive words, so the loads
        stay coalesced; each word is read by 8 such runs, from cache after the first."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (k[None, :] < K)
        word = (k // (8 * PLANE)) * PLANE + k % PLANE
        shift = 4 * ((k % (8 * PLANE)) // PLANE)
        packed = tl.load(P + rn[:, None] * stride_pn + word[None, :], mask=mask, other=0)
        group = k[None, :] // GROUP
        scale = tl.load(S + rn[:, None] * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
        offset = 8.0
        if HAS_ZERO:
            offset = offset + tl.load(Z + rn[:, None] * stride_zn + group, mask=mask, other=0).to(tl.float32)
        value = (_nibble(packed >> shift[None, :], 0) - offset) * scale
        tl.store(W + rn[:, None] * stride_wn + k[None, :], value.to(W.dtype.element_ty), mask=mask)

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


def _row_major(scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
    """The int4 kernels step through a row's scales and zero points one element at a time (only the row stride is
    passed): a transposed view (what unpacking a checkpoint's zero points along dim 0 gives) would be read as other
    groups' values, silently. ValueError instead."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"the int4 kernels need a row-major {name}; got strides {t.stride()} (call .contiguous())")


def _group(scale: torch.Tensor, k: int) -> int:
    """Columns per scale: the group size, or K for one scale per row."""
    return k // scale.shape[1]


def plane_words(k: int, group: int) -> int | None:
    """Words per plane of the runtime's int4 layout for K inputs in scale groups of `group` (K for one scale per row):
    16, or fewer so that a word's 8 values stay in one group; None when K or the group is not a multiple of 8
    planes' worth (then the layer is dequantized at load instead)."""
    plane = min(16, group // 8)
    if plane < 1 or group % (8 * plane) or k % (8 * plane):
        return None
    return plane


def int4_planes(q: torch.Tensor, plane: int) -> torch.Tensor:
    """Int4 grid values q [N, K] (int8, -8..7) packed into planes: int32 [N, K / 8] where, in each run of 8 `plane`
    values of a row, nibble j of word w holds u = q + 8 of value j plane + w."""
    n, k = q.shape
    u = (q.to(torch.int64) + 8).reshape(n, k // (8 * plane), 8, plane)
    words = torch.zeros((n, k // (8 * plane), plane), dtype=torch.int64, device=q.device)
    for j in range(8):
        words |= u[:, :, j] << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n, k // 8)


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


def _gemv_tiles(k: int, row_words: int, scale: torch.Tensor, block_kp: int) -> tuple[int, int, int, int]:
    """The one-row int4 kernel's geometry for K inputs: (words per scale group, plane width, words per tile, scale
    groups per tile)."""
    group_words = _group(scale, k) // 8
    plane = plane_words(k, group_words * 8)
    block_kp = min(block_kp, triton.next_power_of_2(row_words))
    if group_words >= row_words:  # one scale per row
        groups_per_tile = 1
    elif group_words <= block_kp and block_kp % group_words == 0:  # whole groups
        groups_per_tile = block_kp // group_words
    elif group_words > block_kp and group_words % block_kp == 0:  # inside one group
        groups_per_tile = 1
    else:
        raise ValueError(f"tiles of {block_kp} words do not line up with {group_words}-word scale groups")
    return group_words, plane, block_kp, groups_per_tile


def int4_tiles_fit(k: int, scale: torch.Tensor, tile: tuple[int, int, int]) -> bool:
    """Whether the one-row kernel's tiles line up with this layer's scale groups (K inputs, scale [N, groups])."""
    try:
        _gemv_tiles(k, k // 8, scale, tile[1])
    except ValueError:
        return False
    return True


def int4_expert_gemv(x: torch.Tensor, experts: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor | None, rows_per_input: int = 1, weights: torch.Tensor | None = None,
                     tile: tuple[int, int, int] = RuntimeOptions.gemv_tile,
                     pdl: bool = RuntimeOptions.pdl) -> torch.Tensor:
    """Mixture-of-experts decode: stacked int4 experts planes [E, N, K / 8] (each as `int4_planes` packs it), scale
    and zero_point [E, N, groups]. Pair p multiplies row p // rows_per_input of x [rows, K] by expert experts[p]
    (int32 [P], on the device: no host sync, so a CUDA graph can hold it) -> [P, N] in x.dtype, or in fp32 times
    weights[p] when `weights` (the router's, summed over a token's experts next). Only the chosen experts' weights
    are read."""
    _row_major(scale, zero_point)
    block_n, block_kp, num_warps = tile
    k = x.shape[1]
    _, n, row_words = planes.shape
    group_words, plane, block_kp, groups_per_tile = _gemv_tiles(k, row_words, scale[0], block_kp)
    pairs = experts.shape[0]
    k_tiles = triton.cdiv(row_words, block_kp)
    even = n % block_n == 0 and row_words % block_kp == 0
    out = torch.empty((pairs, n), dtype=torch.float32 if weights is not None else x.dtype, device=x.device)
    zero = zero_point if zero_point is not None else scale
    _int4_gemv_kernel[(triton.cdiv(n, block_n), pairs)](
        x, planes, scale, zero, out, n, row_words, k_tiles, planes.stride(1), scale.stride(1), zero.stride(1),
        out.stride(0), experts, weights if weights is not None else scale, scale, x.stride(0), planes.stride(0),
        scale.stride(0), zero.stride(0), X_DIV=rows_per_input, PLANE=plane, GROUP_WORDS=group_words,
        GROUPS_PER_TILE=groups_per_tile, HAS_ZERO=zero_point is not None, EVEN=even, BLOCK_N=block_n,
        BLOCK_KP=block_kp, GATED=False, GELU=False, EXPERTS=True, WEIGHTED=weights is not None, X_SCALED=False,
        num_warps=num_warps, **pdl_launch(x.device, pdl))
    return out


def int4_gemv(x: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
              tile: tuple[int, int, int] = RuntimeOptions.gemv_tile, gated: str | None = None,
              pdl: bool = RuntimeOptions.pdl, x_scale: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] @ dequant(planes)ᵀ -> [1, N] in out_dtype (default x.dtype), with the plane width `plane_words`
    gives (as `int4_planes` packs), in tiles of (outputs, words, warps) (RuntimeOptions.gemv_tile). gated ("silu" or
    "gelu"): the rows are a paired gate_up (`pair_gate_up`) and the result is act(gate) * up [1, N / 2], each
    rounded to out_dtype first. pdl: programmatic dependent launch where the GPU has it (RuntimeOptions.pdl).
    x_scale: x holds FP8 grid values and this fp32 [1, 1] its per-token scale (W4A8), applied to the fp32 sums."""
    _row_major(scale, zero_point)
    block_n, block_kp, num_warps = tile
    out_dtype = out_dtype or x.dtype
    if gated is not None and block_n % (2 * PAIR_ROWS):
        raise ValueError(f"a gated tile needs whole blocks of {2 * PAIR_ROWS} paired rows, not {block_n} rows")
    k = x.shape[1]
    n, row_words = planes.shape
    group_words, plane, block_kp, groups_per_tile = _gemv_tiles(k, row_words, scale, block_kp)
    tiles_n = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(row_words, block_kp)
    splits, tiles_per_split = _split_k(tiles_n, k_tiles, x.device, programs_per_sm=2, min_tiles=1)
    even = n % block_n == 0 and row_words % block_kp == 0 and k_tiles % splits == 0
    out = torch.empty((splits, 1, n), dtype=torch.float32 if splits > 1 else out_dtype, device=x.device)
    zero = zero_point if zero_point is not None else scale
    _int4_gemv_kernel[(tiles_n, splits)](
        x, planes, scale, zero, out, n, row_words, tiles_per_split, planes.stride(0), scale.stride(0), zero.stride(0),
        out.stride(0), x, x, x_scale if x_scale is not None else scale, 0, 0, 0, 0, X_DIV=1, PLANE=plane,
        GROUP_WORDS=group_words, GROUPS_PER_TILE=groups_per_tile, HAS_ZERO=zero_point is not None, EVEN=even,
        BLOCK_N=block_n, BLOCK_KP=block_kp, GATED=gated is not None and splits == 1, GELU=gated == "gelu",
        EXPERTS=False, WEIGHTED=False, X_SCALED=x_scale is not None, num_warps=num_warps, **pdl_launch(x.device, pdl))
    if gated is not None and splits == 1:
        return out[0, :, :n // 2]
    return _sum_splits(out, out_dtype, gated, pdl)


def int4_matmul_small_m(x: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        block_n: int = 128, block_kp: int = 16, num_warps: int = 4,
                        pdl: bool = RuntimeOptions.pdl) -> torch.Tensor:
    """x [2 <= M <= 16, K] @ dequant(planes)ᵀ -> [M, N] in x.dtype. Tiles lie inside one scale group and need 16
    words of it (tensor-core tiles of 128 values). pdl: the split-K sum launches with programmatic dependent launch
    where the GPU has it (RuntimeOptions.pdl)."""
    _row_major(scale, zero_point)
    m, k = x.shape
    n = planes.shape[0]
    group_words = _group(scale, k) // 8
    block_kp = min(block_kp, group_words)
    if block_kp < 16 or group_words % block_kp:
        raise ValueError(f"several rows need tiles of 16 packed words inside a scale group; groups here have {group_words}")
    tiles_n = triton.cdiv(n, block_n)
    splits, tiles_per_split = _split_k(tiles_n, triton.cdiv(k // 8, block_kp), x.device, programs_per_sm=4, min_tiles=2)
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    zero = zero_point if zero_point is not None else scale
    _int4_small_m_kernel[(tiles_n, splits)](
        x, planes, scale, zero, out, m, n, k, tiles_per_split, x.stride(0), planes.stride(0), scale.stride(0),
        zero.stride(0), out.stride(0), out.stride(1), PLANE=plane_words(k, group_words * 8), GROUP_WORDS=group_words,
        HAS_ZERO=zero_point is not None, BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=num_warps)
    return _sum_splits(out, x.dtype, None, pdl)


def int4_dequantize(planes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, k: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`."""
    _row_major(scale, zero_point)
    n = planes.shape[0]
    w = torch.empty((n, k), dtype=dtype, device=planes.device)
    zero = zero_point if zero_point is not None else scale
    group = _group(scale, k)
    block_n, block_k = 16, 256
    _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        planes, scale, zero, w, n, k, planes.stride(0), scale.stride(0), zero.stride(0), w.stride(0),
        PLANE=plane_words(k, group), GROUP=group, HAS_ZERO=zero_point is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4)
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
