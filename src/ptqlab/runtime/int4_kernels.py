"""Int4 weight-only matmuls (W4A16) of the fast runtime and the int4 layout they read (Triton; CUDA, or Triton's CPU
interpreter for tests). Pure functions over tensors.

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
arithmetic. For a gate_up layer whose rows are paired (kernels.pair_gate_up) it applies the gated activation itself,
so a decode step skips the activation kernel. 2-16 rows (`int4_matmul_small_m`) dequantize each nibble's tile and
use the tensor cores (small_batch.py serves 2-64 rows where the groups hold 128 inputs). Prefill (many rows) is
compute-bound: the weight is dequantized once into a scratch buffer (`int4_dequantize`) and multiplied by cuBLAS,
which costs little next to the matmul itself, or small_batch.py's kernel runs over tiles of rows (the kernel choice
table times both). `_planes` turns two plane words into their 16 values in 16-bit with a few packed instructions;
the tensor-core kernels and the 16-plane dequantization use it.
"""

from __future__ import annotations

import torch

from ptqlab.runtime.kernels import PAIR_ROWS, RuntimeOptions, _split_k, _sum_splits, pdl_launch
from ptqlab.triton_support import interpreted, tl, triton

if triton is not None:
    from ptqlab.runtime.kernels import _activate_pairs, await_inputs

    _INTERPRETED = tl.constexpr(interpreted())
    """Triton's CPU interpreter: it runs no inline PTX and mishandles a scalar mask over a block, so those few lines
    take an equivalent form there."""

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

    def _unpack_asm(magic: int, offset: int, one: int, fma: str) -> str:
        """PTX for two plane words (the operand's neighbouring inputs w, w + 1 of one row) -> the 8 planes' values at
        both, packed in pairs: the words' low halves (nibbles 0-3) and high halves (4-7) are interleaved (prmt), so
        one lop3 puts nibble j of both words into the mantissas of two 16-bit magic numbers (128 in bf16, 1024 in
        fp16) and one packed fma subtracts magic + 8 from both, exactly. Marlin's unpacking, for Triton's registers."""
        planes = []
        for half in ("lo", "hi"):
            for j in range(4):
                shift = f"shr.u32 {half}, {half}, 4; " if j else ""
                planes.append(f"{shift}lop3.b32 t, {half}, 0x000F000F, m, 0xEA; "
                              f"fma.rn.{fma} ${len(planes)}, t, one, c;")
        return ("{ .reg .b32 lo, hi, t, m, c, one; "
                f"mov.b32 m, {magic:#x}; mov.b32 c, {offset:#x}; mov.b32 one, {one:#x}; "
                "prmt.b32 lo, $8, $9, 0x5410; prmt.b32 hi, $8, $9, 0x7632; " + " ".join(planes) + " }")

    _UNPACK_BF16 = tl.constexpr(_unpack_asm(0x43004300, 0xC308C308, 0x3F803F80, "bf16x2"))  # 128, -136, 1
    _UNPACK_FP16 = tl.constexpr(_unpack_asm(0x64006400, 0xE408E408, 0x3C003C00, "f16x2"))  # 1024, -1032, 1

    @triton.jit
    def _planes(words, DTYPE: tl.constexpr):
        """Int4 plane words [BLOCK_N, 16] -> the 8 planes' values q = u - 8, each [BLOCK_N, 16] in DTYPE (bf16 or
        fp16; fp32 under the interpreter, which runs no PTX), computed elementwise so that the words, loaded straight
        into the tensor-core operand's registers, never pass through shared memory again as 16-bit values."""
        if _INTERPRETED:
            return (_nibble(words, 0) - 8.0, _nibble(words, 1) - 8.0, _nibble(words, 2) - 8.0, _nibble(words, 3) - 8.0,
                    _nibble(words, 4) - 8.0, _nibble(words, 5) - 8.0, _nibble(words, 6) - 8.0, _nibble(words, 7) - 8.0)
        elif DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_UNPACK_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_UNPACK_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=2)

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
    def _int4_dequant_planes_kernel(P, S, Z, W, N, K, stride_pn, stride_sn, stride_zn, stride_wn, GROUP: tl.constexpr,
                                    HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr):
        """Planes of 16 words into a 16-bit weight, one 128-input run per program column: the 8 planes' values come
        from `_planes` (two values per instruction), each plane's 16 inputs are stored as one contiguous run."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        run = tl.program_id(1)
        r16 = tl.arange(0, 16)
        n_mask = rn < N
        words = tl.load(P + rn[:, None] * stride_pn + (run * 16 + r16)[None, :], mask=n_mask[:, None], other=0)
        group = (run * 128) // GROUP
        scale = tl.load(S + rn * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            zero = tl.load(Z + rn * stride_zn + group, mask=n_mask, other=0).to(tl.float32)[:, None]
        values = _planes(words, W.dtype.element_ty)
        for j in tl.static_range(8):
            q = values[j].to(tl.float32)
            if HAS_ZERO:
                q = q - zero
            tl.store(W + rn[:, None] * stride_wn + (run * 128 + 16 * j + r16)[None, :], (q * scale).to(W.dtype.element_ty),
                     mask=n_mask[:, None])


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
    if plane_words(k, group) == 16 and dtype in (torch.bfloat16, torch.float16):
        _int4_dequant_planes_kernel[(triton.cdiv(n, 64), k // 128)](
            planes, scale, zero, w, n, k, planes.stride(0), scale.stride(0), zero.stride(0), w.stride(0), GROUP=group,
            HAS_ZERO=zero_point is not None, BLOCK_N=64, num_warps=4)
        return w
    block_n, block_k = 16, 256
    _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        planes, scale, zero, w, n, k, planes.stride(0), scale.stride(0), zero.stride(0), w.stride(0),
        PLANE=plane_words(k, group), GROUP=group, HAS_ZERO=zero_point is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4)
    return w
