"""Fused GPU kernels for the work between the matmuls: RMSNorm (with the residual add), rotary embedding with the
KV-cache write, the gated activation, and single-token attention over the cache.

Why: at batch 1 a decoder layer's matmuls are a handful of launches, but written as torch ops the rest is ~40
small kernels (casts, powers, means, slices, concatenations, masks, softmax...). Inside a CUDA graph each still
costs a couple of microseconds, which for a 0.5B model is most of the time per token. Each function here is one
kernel, one read and one write of its data. Arithmetic is fp32 with one rounding to the model dtype at the end
(torch rounds after every op in bf16), so results agree with the torch path to bf16 rounding, not bitwise; the
torch path stays the CPU implementation and the reference. Where the next matmul takes int8 / FP8 activations,
the norm and the activation put their (rounded) output on its per-token grid themselves, which saves a pass over
the activations per matmul (about 5 % of an FP8 prefill).

The KV cache may be float8 (quant/kv_cache.py: value / scale per KV head, saturated at ±448): the cache writes
quantize exactly as quantize_kv does, and decode attention reads float8 keys and values into fp16 dot products with
the scales folded into q and the output. At long context decode attention is split along the sequence
(flash-decoding): at batch 1 one program per (row, KV head) is 8 programs for Llama-3's 8 KV heads, which leaves most
multiprocessors idle while the cache is read; split, the programs write partial softmax results that a second kernel
combines. The same split serves 16-bit and FP8 caches.
"""

from __future__ import annotations

import functools

import torch

from ptqlab.quant.token_triton import QuantizedRows, TokenGrid, empty_rows
from ptqlab.runtime.kernels import PAIR_ROWS, RuntimeOptions, pdl_launch
from ptqlab.triton_support import libdevice, tl, triton

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
"""The gated activations the fused kernels compute (SiLU; GELU's tanh approximation)."""

if triton is not None:
    from ptqlab.quant.token_triton import grid_row
    from ptqlab.runtime.kernels import await_inputs, gated_value


    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, RES, Q, SC, columns, stride_x, stride_r, stride_y, stride_res, stride_q, eps, offset,
                         qmin, qmax, inv_half_range, tiny, huge, HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr,
                         QUANT: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < columns
        w = tl.load(W + c, mask=mask, other=0.0)
        await_inputs(PDL)
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # the residual stream is rounded to the model dtype, as torch's add would
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(RES + row * stride_res + c, x, mask=mask)
        h = x.to(tl.float32)
        h = h * (1.0 / tl.sqrt(tl.sum(h * h, axis=0) / columns + eps))
        if GEMMA:  # (1 + w) x̂, rounded once
            y = h * (offset + w.to(tl.float32))
        else:  # w * round(x̂)
            y = w.to(tl.float32) * h.to(x.dtype).to(tl.float32)
        y = y.to(x.dtype)
        if QUANT:  # the rounded output put on the next matmul's per-token grid, as quantize_tokens would
            q, scale = grid_row(y.to(tl.float32), qmin, qmax, inv_half_range, tiny, huge, IS_FP8)
            tl.store(Q + row * stride_q + c, q.to(Q.dtype.element_ty), mask=mask)
            tl.store(SC + row, scale)
        else:
            tl.store(Y + row * stride_y + c, y, mask=mask)

    @triton.jit
    def _to_fp8(x):
        """float32 x on the float8 E4M3 grid (saturated at ±448, rounded to nearest even), then converted, exactly:
        the rounding is done here, not by the conversion, whose rounding Triton's interpreter gets wrong (it drops
        the carry into the exponent) and whose saturation depends on the instruction a GPU uses. The step of x's
        binade is built from its exponent bits (2^-9 below 2^-6: E4M3's subnormals), so that every operation but
        the rounding itself is exact."""
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        step = ((exponent + 124) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 3)
        inverse = ((130 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(3 - exponent)
        return (libdevice.rint(x * inverse) * step).to(tl.float8e4nv)

    @triton.jit
    def _cache_value(x, scale, FP8: tl.constexpr):
        """What the cache stores for x (in the model dtype): x itself, or x / scale (correctly rounded) in FP8."""
        stored = x
        if FP8:  # one return: Triton 3.6 refuses returns of two types even under a constexpr condition
            stored = _to_fp8(libdevice.div_rn(x.to(tl.float32), scale))
        return stored

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, KC, VC, KS, VS, stride_t, tokens_per_row, heads, kv_heads, cache_len,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, WRITE_CACHE: tl.constexpr, FP8: tl.constexpr,
                           PDL: tl.constexpr):
        """One program per (token, head of q or k): rotate in place; k heads also write k and v into the cache (FP8:
        divided by the head's scale KS, VS [kv_heads])."""
        await_inputs(PDL)
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        pos = tl.load(POS + t % tokens_per_row)
        d = tl.arange(0, HALF)
        base = QKV + t * stride_t + head * HEAD_DIM
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        cos = tl.load(COS + pos * HALF + d).to(tl.float32)
        sin = tl.load(SIN + pos * HALF + d).to(tl.float32)
        out1 = (x1 * cos - x2 * sin).to(QKV.dtype.element_ty)
        out2 = (x2 * cos + x1 * sin).to(QKV.dtype.element_ty)
        tl.store(base + d, out1)
        tl.store(base + HALF + d, out2)
        if WRITE_CACHE:
            if head >= heads:
                kv = head - heads
                b = t // tokens_per_row
                slot = ((b * kv_heads + kv) * cache_len + pos) * HEAD_DIM
                k_scale = 1.0
                v_scale = 1.0
                if FP8:
                    k_scale = tl.load(KS + kv)
                    v_scale = tl.load(VS + kv)
                tl.store(KC + slot + d, _cache_value(out1, k_scale, FP8))
                tl.store(KC + slot + HALF + d, _cache_value(out2, k_scale, FP8))
                full = tl.arange(0, 2 * HALF)
                v = tl.load(QKV + t * stride_t + (heads + kv_heads + kv) * HEAD_DIM + full)
                tl.store(VC + slot + full, _cache_value(v, v_scale, FP8))

    @triton.jit
    def _gated(GU, row, c, mask, inner, stride_gu, GELU: tl.constexpr, PAIRED: tl.constexpr):
        """act(gate) * up at columns c of one row, fp32. PAIRED > 0: gate_up's columns come in blocks of PAIRED gate
        then PAIRED up columns (kernels.pair_gate_up); else all gate columns, then all up columns."""
        if PAIRED:
            gate_at = (c // PAIRED) * (2 * PAIRED) + c % PAIRED
            up_at = gate_at + PAIRED
        else:
            gate_at = c
            up_at = inner + c
        gate = tl.load(GU + row * stride_gu + gate_at, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + row * stride_gu + up_at, mask=mask, other=0.0).to(tl.float32)
        return gated_value(gate, up, GELU)

    @triton.jit
    def _gated_act_kernel(GU, Y, inner, stride_gu, stride_y, GELU: tl.constexpr, PAIRED: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
        await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < inner
        y = _gated(GU, row, c, mask, inner, stride_gu, GELU, PAIRED)
        tl.store(Y + row * stride_y + c, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_act_quant_kernel(GU, Q, SC, inner, stride_gu, stride_q, qmin, qmax, inv_half_range, tiny, huge,
                                GELU: tl.constexpr, PAIRED: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr,
                                PDL: tl.constexpr):
        """The whole row at once (its scale needs its absolute maximum), rounded to the model dtype, then on its grid."""
        await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < inner
        y = _gated(GU, row, c, mask, inner, stride_gu, GELU, PAIRED).to(GU.dtype.element_ty).to(tl.float32)
        q, scale = grid_row(y, qmin, qmax, inv_half_range, tiny, huge, IS_FP8)
        tl.store(Q + row * stride_q + c, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(SC + row, scale)

    @triton.jit
    def _decode_attention_kernel(Q, KC, VC, POS, O, COS, SIN, KS, VS, PART_M, PART_L, PART_O, stride_qb, stride_ob,
                                 heads, kv_heads, cache_len, scale, softcap, window, GROUPS: tl.constexpr,
                                 G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                                 SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                 ROPE: tl.constexpr, FP8: tl.constexpr, HALF_DOTS: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, kv head, split): its GROUPS query heads attend to its share of cache positions
        0..pos (online softmax). SPLITS == 1: the whole sequence, normalized and written to O. SPLITS > 1
        (flash-decoding): the positions are cut into SPLITS runs of whole tiles, sized from pos so that the programs
        share what is there to read, and each program writes its running max, sum of exponentials and unnormalized
        output to PART_M, PART_L, PART_O for _decode_combine_kernel. ROPE: Q is the row's whole qkv before the rotary
        embedding; every program rotates its query heads, and the one whose run holds pos rotates the new key and
        writes the key and value into the cache there (as _rope_cache_kernel does), then attends. FP8: the cache
        holds float8 keys and values over their per-head scales KS, VS [kv_heads]; they enter the dot products
        converted to the model dtype (exact), and the scales multiply the scores and the output."""
        await_inputs(PDL)
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        split = tl.program_id(2)
        pos = tl.load(POS)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        q_heads = kv * GROUPS + g
        cache = (b * kv_heads + kv) * cache_len * HEAD_DIM
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(pos - window + 1, 0) // BLOCK_T * BLOCK_T
        chunk = tl.cdiv(tl.cdiv(pos + 1 - first, SPLITS), BLOCK_T) * BLOCK_T
        lo = first + split * chunk
        hi = tl.minimum(lo + chunk, pos + 1)  # empty (hi <= lo) for the splits past pos
        k_scale = 1.0
        v_scale = 1.0
        if FP8:
            k_scale = tl.load(KS + kv)
            v_scale = tl.load(VS + kv)
        if ROPE:
            half = tl.arange(0, HEAD_DIM // 2)
            cos = tl.load(COS + pos * (HEAD_DIM // 2) + half).to(tl.float32)
            sin = tl.load(SIN + pos * (HEAD_DIM // 2) + half).to(tl.float32)
            at = Q + b * stride_qb + q_heads[:, None] * HEAD_DIM + half[None, :]
            q1 = tl.load(at, mask=g[:, None] < GROUPS, other=0.0).to(tl.float32)
            q2 = tl.load(at + HEAD_DIM // 2, mask=g[:, None] < GROUPS, other=0.0).to(tl.float32)
            q1, q2 = (q1 * cos - q2 * sin).to(Q.dtype.element_ty), (q2 * cos + q1 * sin).to(Q.dtype.element_ty)
            q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (G_PAD, HEAD_DIM))
            if (lo <= pos) & (pos < hi):  # this program's run holds the new position
                k_at = Q + b * stride_qb + (heads + kv) * HEAD_DIM + half
                k1 = tl.load(k_at).to(tl.float32)
                k2 = tl.load(k_at + HEAD_DIM // 2).to(tl.float32)
                slot = cache + pos * HEAD_DIM
                tl.store(KC + slot + half, _cache_value((k1 * cos - k2 * sin).to(Q.dtype.element_ty), k_scale, FP8))
                tl.store(KC + slot + HEAD_DIM // 2 + half,
                         _cache_value((k2 * cos + k1 * sin).to(Q.dtype.element_ty), k_scale, FP8))
                v_new = tl.load(Q + b * stride_qb + (heads + kv_heads + kv) * HEAD_DIM + d)
                tl.store(VC + slot + d, _cache_value(v_new, v_scale, FP8))
            tl.debug_barrier()  # the new key and value, written by some threads, are read by all below
        else:
            q = tl.load(Q + b * stride_qb + q_heads[:, None] * HEAD_DIM + d[None, :], mask=g[:, None] < GROUPS, other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
        dot_dtype = q.dtype
        if HALF_DOTS:  # fp16 dots: float8 converts to fp16 in one instruction (to bf16 in three); q scaled first
            q = (q.to(tl.float32) * (scale * k_scale)).to(tl.float16)
            dot_dtype = tl.float16
        for t0 in range(lo, hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < hi
            if HAS_WINDOW:
                valid = valid & (t > pos - window)
            k = tl.load(KC + cache + t[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
            if HALF_DOTS:
                s = tl.dot(q, tl.trans(k.to(dot_dtype)))
            else:
                s = tl.dot(q, tl.trans(k.to(dot_dtype))) * (scale * k_scale)
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(VC + cache + t[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0).to(dot_dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if SPLITS == 1:
            out = acc * v_scale / total[:, None]
            tl.store(O + b * stride_ob + q_heads[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
                     mask=g[:, None] < GROUPS)
        else:
            part = ((b * kv_heads + kv) * SPLITS + split) * G_PAD + g
            tl.store(PART_M + part, m)
            tl.store(PART_L + part, total)
            tl.store(PART_O + part[:, None] * HEAD_DIM + d[None, :], acc * v_scale)

    @triton.jit
    def _decode_combine_kernel(PART_M, PART_L, PART_O, O, stride_ob, kv_heads, GROUPS: tl.constexpr,
                               G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, kv head): the SPLITS partial results of _decode_attention_kernel rescaled to their
        common maximum and summed, as the online softmax does tile by tile. The first run is never empty (it starts
        at the first position attended to), so the running maximum is finite from the first split on and the empty
        runs' -inf weigh exp(-inf) = 0."""
        await_inputs(PDL)
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
        for split in range(SPLITS):
            part = ((b * kv_heads + kv) * SPLITS + split) * G_PAD + g
            m_split = tl.load(PART_M + part)
            m_new = tl.maximum(m, m_split)
            alpha = tl.exp(m - m_new)
            beta = tl.exp(m_split - m_new)
            total = total * alpha + tl.load(PART_L + part) * beta
            acc = acc * alpha[:, None] + tl.load(PART_O + part[:, None] * HEAD_DIM + d[None, :]) * beta[:, None]
            m = m_new
        out = acc / total[:, None]
        q_heads = kv * GROUPS + g
        tl.store(O + b * stride_ob + q_heads[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty),
                 mask=g[:, None] < GROUPS)

    @triton.jit
    def _argmax_partial_kernel(L, VALUE, INDEX, vocab, stride_l, chunks, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Maximum of one chunk of a row of logits and its first index."""
        await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(L + row * stride_l + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        best = tl.max(x, axis=0)
        first = tl.min(tl.where(x == best, offs, vocab), axis=0)
        tl.store(VALUE + row * chunks + chunk, best)
        tl.store(INDEX + row * chunks + chunk, first)

    @triton.jit
    def _argmax_final_kernel(VALUE, INDEX, TOKEN, SEQ, POS, chunks, vocab, stride_seq, CHUNKS: tl.constexpr,
                             PDL: tl.constexpr):
        """The row's first maximum over the chunks' maxima, written as the next token and into the sequence at
        position pos + 1."""
        await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS)
        value = tl.load(VALUE + row * chunks + c, mask=c < chunks, other=float("-inf"))
        index = tl.load(INDEX + row * chunks + c, mask=c < chunks, other=vocab)
        token = tl.min(tl.where(value == tl.max(value, axis=0), index, vocab), axis=0).to(tl.int64)
        tl.store(TOKEN + row, token)
        tl.store(SEQ + row * stride_seq + tl.load(POS) + 1, token)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, residual: torch.Tensor | None = None,
             grid: TokenGrid | None = None, rows_out: int = 1, pdl: bool = RuntimeOptions.pdl):
    """(RMSNorm of x (+ residual), x + residual or None), over the last dim. With `grid`, the normalized rows come
    out already quantized for the next int8 / FP8 matmul (QuantizedRows, zero-padded to `rows_out` rows). pdl, here
    and below: launch with programmatic dependent launch where the GPU has it (RuntimeOptions.pdl)."""
    rows = x.reshape(-1, x.shape[-1])
    m, k = rows.shape
    res = torch.empty_like(rows) if residual is not None else rows
    r = residual.reshape(-1, k) if residual is not None else rows
    if grid is None:
        y = torch.empty_like(rows)
        q = scale = y
        args = (0.0, 0.0, 1.0, 0.0, 0.0)
    else:
        q, scale = empty_rows(m, k, grid, x.device, rows_out)
        y = q
        args = grid.kernel_args()
    block = triton.next_power_of_2(k)
    _rms_norm_kernel[(m,)](rows, r, weight, y, res, q, scale, k, rows.stride(0), r.stride(0), y.stride(0), res.stride(0),
                           q.stride(0), eps, offset, *args, HAS_RESIDUAL=residual is not None, GEMMA=offset != 0,
                           QUANT=grid is not None, IS_FP8=grid is not None and grid.is_fp8, BLOCK=block,
                           num_warps=4 if block <= 2048 else 8, **pdl_launch(x.device, pdl))
    out = y.reshape(x.shape) if grid is None else QuantizedRows(q, scale, x.shape)
    return out, (res.reshape(x.shape) if residual is not None else None)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                   kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None, pdl: bool = RuntimeOptions.pdl) -> None:
    """Rotate the q and k heads of qkv [B, L, (H + 2 Hkv) D] in place (full-width rotary; cos, sin [P, D/2] per
    position), and when a cache is given write k and v at positions pos [L]. kv_scales (float32 [Hkv] each): the
    cache is float8 and holds k / k_scale and v / v_scale (quant/kv_cache.quantize_kv of the rotated, rounded k)."""
    b, length, width = qkv.shape
    rows = qkv.reshape(b * length, width)
    write = k_cache is not None
    ks, vs = kv_scales if kv_scales is not None else (rows, rows)
    _rope_cache_kernel[(b * length, heads + kv_heads)](
        rows, cos, sin, pos, k_cache if write else rows, v_cache if write else rows, ks, vs, rows.stride(0), length,
        heads, kv_heads, k_cache.shape[2] if write else 0, HEAD_DIM=head_dim, HALF=head_dim // 2, WRITE_CACHE=write,
        FP8=kv_scales is not None, num_warps=1 if head_dim <= 128 else 2, **pdl_launch(qkv.device, pdl))


def gated_activation(gate_up: torch.Tensor, gelu: bool, grid: TokenGrid | None = None, rows_out: int = 1,
                     paired: bool = False, pdl: bool = RuntimeOptions.pdl):
    """act(gate) * up for gate_up [..., 2 I] -> [..., I]; with `grid`, already quantized for the next matmul.
    paired: gate_up's columns are in kernels.pair_gate_up's order."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    m, inner = rows.shape[0], rows.shape[1] // 2
    shape = (*gate_up.shape[:-1], inner)
    if grid is not None:
        q, scale = empty_rows(m, inner, grid, gate_up.device, rows_out)
        block = triton.next_power_of_2(inner)
        _gated_act_quant_kernel[(m,)](rows, q, scale, inner, rows.stride(0), q.stride(0), *grid.kernel_args(), GELU=gelu,
                                      PAIRED=PAIR_ROWS if paired else 0, IS_FP8=grid.is_fp8, BLOCK=block,
                                      num_warps=16 if block >= 8192 else 8, **pdl_launch(gate_up.device, pdl))
        return QuantizedRows(q, scale, torch.Size(shape))
    y = torch.empty((m, inner), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _gated_act_kernel[(m, triton.cdiv(inner, block))](rows, y, inner, rows.stride(0), y.stride(0), GELU=gelu,
                                                     PAIRED=PAIR_ROWS if paired else 0, BLOCK=block, num_warps=4,
                                                     **pdl_launch(gate_up.device, pdl))
    return y.reshape(shape)


DECODE_TILES = {False: (128, 4), True: (128, 4)}
"""Decode attention's (cache positions per tile, warps) for a 16-bit (False) and an FP8 (True) cache."""
FP8_HALF_DOTS = True
"""FP8 cache: the dot products in fp16 (keys and values converted from float8 exactly, q times its scales) rather
than in the model dtype."""
SPLITS_PER_MULTIPROCESSOR = 1
"""Flash-decoding's target: programs per multiprocessor, all (row, kv head, split) programs together. On an H200
(Llama-3-8B's 8 KV heads, batch 1, 32k positions) one program per multiprocessor with tiles of 128 positions read
the cache fastest of the settings tried (bench/kv_cache_speed.py); more, shorter runs were slower."""
SPLIT_MIN_POSITIONS = 512
"""Cache positions per split below which decode attention is not split: a shorter run's partial results and the
combining launch cost more than the extra parallelism gives."""
MAX_SPLITS = 64


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(batch: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """How many programs share each (row, kv head) of decode attention: one while (batch x kv heads) programs fill
    the GPU or the cache is short; else about SPLITS_PER_MULTIPROCESSOR programs per multiprocessor in all
    (flash-decoding), at most one per SPLIT_MIN_POSITIONS cache positions. Chosen from the cache's length, which a
    CUDA graph fixes, not from the position, which changes every step: each program's run is sized from the position
    inside the kernel."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    wanted = -(-SPLITS_PER_MULTIPROCESSOR * sms // (batch * kv_heads))
    return max(1, min(wanted, cache_len // SPLIT_MIN_POSITIONS, MAX_SPLITS))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                     softcap: float | None, window: int | None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                     kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None, splits: int | None = None,
                     pdl: bool = RuntimeOptions.pdl) -> torch.Tensor:
    """One new token per row: q [B, 1, H * D] (may be a strided view) over the cache [B, Hkv, T, D] up to pos[0].
    With `rotary` (cos, sin [P, D/2]), q is the whole qkv [B, 1, (H + 2 Hkv) D] before the rotary embedding: the
    kernel also rotates q and the new k and writes k and v into the cache (what rope_and_cache does), in one launch.
    kv_scales (float32 [Hkv] each): the cache is float8, values over these scales. splits: programs per (row, kv
    head) along the sequence, their partial results combined by a second kernel (default: decode_splits)."""
    b, _, width = q.shape
    kv_heads, cache_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = width // head_dim - (2 * kv_heads if rotary is not None else 0)
    groups = heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(groups))
    splits = decode_splits(b, kv_heads, cache_len, q.device) if splits is None else splits
    out = torch.empty((b, 1, heads * head_dim), dtype=q.dtype, device=q.device)
    cos, sin = rotary if rotary is not None else (q, q)
    ks, vs = kv_scales if kv_scales is not None else (out, out)
    part_m = part_l = part_o = out
    if splits > 1:
        part_m = torch.empty((b, kv_heads, splits, g_pad), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty((b, kv_heads, splits, g_pad, head_dim), dtype=torch.float32, device=q.device)
    fp8 = kv_scales is not None
    block_t, warps = DECODE_TILES[fp8]
    _decode_attention_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, pos, out, cos, sin, ks, vs, part_m, part_l, part_o, q.stride(0), out.stride(0), heads,
        kv_heads, cache_len, scale, softcap or 1.0, window or 0, GROUPS=groups, G_PAD=g_pad, HEAD_DIM=head_dim,
        BLOCK_T=block_t, SPLITS=splits, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        ROPE=rotary is not None, FP8=fp8, HALF_DOTS=fp8 and FP8_HALF_DOTS, num_warps=warps,
        **pdl_launch(q.device, pdl))
    if splits > 1:
        _decode_combine_kernel[(b, kv_heads)](part_m, part_l, part_o, out, out.stride(0), kv_heads, GROUPS=groups,
                                              G_PAD=g_pad, HEAD_DIM=head_dim, SPLITS=splits, num_warps=4,
                                              **pdl_launch(q.device, pdl))
    return out


def greedy_next(logits: torch.Tensor, token: torch.Tensor, sequence: torch.Tensor, pos: torch.Tensor,
                pdl: bool = RuntimeOptions.pdl) -> None:
    """token[b] = argmax(logits[b]) (the first maximum, as torch.argmax) and sequence[b, pos + 1] = token[b], in two
    kernels instead of torch's single-block argmax (37 us for a 128k vocabulary) and two copies."""
    rows, vocab = logits.shape
    block = 2048
    chunks = triton.cdiv(vocab, block)
    value = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device)
    _argmax_partial_kernel[(rows, chunks)](logits, value, index, vocab, logits.stride(0), chunks, BLOCK=block, num_warps=4,
                                           **pdl_launch(logits.device, pdl))
    _argmax_final_kernel[(rows,)](value, index, token, sequence, pos, chunks, vocab, sequence.stride(0),
                                  CHUNKS=triton.next_power_of_2(chunks), num_warps=4, **pdl_launch(logits.device, pdl))
