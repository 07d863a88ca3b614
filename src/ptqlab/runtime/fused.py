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
"""

from __future__ import annotations

import torch

from ptqlab.quant.token_triton import QuantizedRows, TokenGrid, empty_rows
from ptqlab.runtime.kernels import PAIR_ROWS, RuntimeOptions, pdl_launch
from ptqlab.triton_support import tl, triton

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
    def _rope_cache_kernel(QKV, COS, SIN, POS, KC, VC, stride_t, tokens_per_row, heads, kv_heads, cache_len,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, WRITE_CACHE: tl.constexpr, PDL: tl.constexpr):
        """One program per (token, head of q or k): rotate in place; k heads also write k and v into the cache."""
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
                tl.store(KC + slot + d, out1)
                tl.store(KC + slot + HALF + d, out2)
                full = tl.arange(0, 2 * HALF)
                v = tl.load(QKV + t * stride_t + (heads + kv_heads + kv) * HEAD_DIM + full)
                tl.store(VC + slot + full, v)

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
    def _decode_attention_kernel(Q, KC, VC, POS, O, COS, SIN, stride_qb, stride_ob, heads, kv_heads, cache_len, scale,
                                 softcap, window, GROUPS: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_T: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                 ROPE: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, kv head): its GROUPS query heads attend to cache positions 0..pos (online softmax).
        ROPE: Q is the row's whole qkv before the rotary embedding; the program rotates its query heads and its new
        key (as _rope_cache_kernel does), writes the key and value into the cache at pos, then attends."""
        await_inputs(PDL)
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        pos = tl.load(POS)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        q_heads = kv * GROUPS + g
        cache = (b * kv_heads + kv) * cache_len * HEAD_DIM
        if ROPE:
            half = tl.arange(0, HEAD_DIM // 2)
            cos = tl.load(COS + pos * (HEAD_DIM // 2) + half).to(tl.float32)
            sin = tl.load(SIN + pos * (HEAD_DIM // 2) + half).to(tl.float32)
            at = Q + b * stride_qb + q_heads[:, None] * HEAD_DIM + half[None, :]
            q1 = tl.load(at, mask=g[:, None] < GROUPS, other=0.0).to(tl.float32)
            q2 = tl.load(at + HEAD_DIM // 2, mask=g[:, None] < GROUPS, other=0.0).to(tl.float32)
            q1, q2 = (q1 * cos - q2 * sin).to(Q.dtype.element_ty), (q2 * cos + q1 * sin).to(Q.dtype.element_ty)
            q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (G_PAD, HEAD_DIM))
            k_at = Q + b * stride_qb + (heads + kv) * HEAD_DIM + half
            k1 = tl.load(k_at).to(tl.float32)
            k2 = tl.load(k_at + HEAD_DIM // 2).to(tl.float32)
            slot = cache + pos * HEAD_DIM
            tl.store(KC + slot + half, (k1 * cos - k2 * sin).to(KC.dtype.element_ty))
            tl.store(KC + slot + HEAD_DIM // 2 + half, (k2 * cos + k1 * sin).to(KC.dtype.element_ty))
            tl.store(VC + slot + d, tl.load(Q + b * stride_qb + (heads + kv_heads + kv) * HEAD_DIM + d))
            tl.debug_barrier()  # the new key and value, written by some threads, are read by all below
        else:
            q = tl.load(Q + b * stride_qb + q_heads[:, None] * HEAD_DIM + d[None, :], mask=g[:, None] < GROUPS, other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(pos - window + 1, 0) // BLOCK_T * BLOCK_T
        for t0 in range(start, pos + 1, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t <= pos
            if HAS_WINDOW:
                valid = valid & (t > pos - window)
            k = tl.load(KC + cache + t[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(VC + cache + t[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / total[:, None]
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
                   pdl: bool = RuntimeOptions.pdl) -> None:
    """Rotate the q and k heads of qkv [B, L, (H + 2 Hkv) D] in place (full-width rotary; cos, sin [P, D/2] per
    position), and when a cache is given write k and v at positions pos [L]."""
    b, length, width = qkv.shape
    rows = qkv.reshape(b * length, width)
    write = k_cache is not None
    _rope_cache_kernel[(b * length, heads + kv_heads)](
        rows, cos, sin, pos, k_cache if write else rows, v_cache if write else rows, rows.stride(0), length, heads,
        kv_heads, k_cache.shape[2] if write else 0, HEAD_DIM=head_dim, HALF=head_dim // 2, WRITE_CACHE=write,
        num_warps=1 if head_dim <= 128 else 2, **pdl_launch(qkv.device, pdl))


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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                     softcap: float | None, window: int | None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                     pdl: bool = RuntimeOptions.pdl) -> torch.Tensor:
    """One new token per row: q [B, 1, H * D] (may be a strided view) over the cache [B, Hkv, T, D] up to pos[0].
    With `rotary` (cos, sin [P, D/2]), q is the whole qkv [B, 1, (H + 2 Hkv) D] before the rotary embedding: the
    kernel also rotates q and the new k and writes k and v into the cache (what rope_and_cache does), in one launch."""
    b, _, width = q.shape
    kv_heads, cache_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = width // head_dim - (2 * kv_heads if rotary is not None else 0)
    groups = heads // kv_heads
    out = torch.empty((b, 1, heads * head_dim), dtype=q.dtype, device=q.device)
    cos, sin = rotary if rotary is not None else (q, q)
    _decode_attention_kernel[(b, kv_heads)](
        q, k_cache, v_cache, pos, out, cos, sin, q.stride(0), out.stride(0), heads, kv_heads, cache_len, scale,
        softcap or 1.0, window or 0, GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim,
        BLOCK_T=64, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, ROPE=rotary is not None,
        num_warps=4, **pdl_launch(q.device, pdl))
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
