"""Fused GPU kernels for the work between the matmuls: RMSNorm (with the residual add), rotary embedding with the
KV-cache write, the gated activation, and single-token attention over the cache.

Why: at batch 1 a decoder layer's matmuls are a handful of launches, but written as torch ops the rest is ~40
small kernels (casts, powers, means, slices, concatenations, masks, softmax...). Inside a CUDA graph each still
costs a couple of microseconds, which for a 0.5B model is most of the time per token. Each function here is one
kernel, one read and one write of its data. Arithmetic is fp32 with one rounding to the model dtype at the end
(torch rounds after every op in bf16), so results agree with the torch path to bf16 rounding, not bitwise; the
torch path stays the CPU implementation and the reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, RES, columns, stride_x, stride_r, stride_y, stride_res, eps, offset,
                         HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < columns
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # the residual stream is rounded to the model dtype, as torch's add would
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(RES + row * stride_res + c, x, mask=mask)
        h = x.to(tl.float32)
        h = h * (1.0 / tl.sqrt(tl.sum(h * h, axis=0) / columns + eps))
        w = tl.load(W + c, mask=mask, other=0.0)
        if GEMMA:  # (1 + w) x̂, rounded once
            y = h * (offset + w.to(tl.float32))
        else:  # w * round(x̂)
            y = w.to(tl.float32) * h.to(x.dtype).to(tl.float32)
        tl.store(Y + row * stride_y + c, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, KC, VC, stride_t, tokens_per_row, heads, kv_heads, cache_len,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, WRITE_CACHE: tl.constexpr):
        """One program per (token, head of q or k): rotate in place; k heads also write k and v into the cache."""
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
    def _gated_act_kernel(GU, Y, inner, stride_gu, stride_y, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < inner
        gate = tl.load(GU + row * stride_gu + c, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + row * stride_gu + inner + c, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
            u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * u))
        else:
            act = gate * tl.sigmoid(gate)
        tl.store(Y + row * stride_y + c, (act * up).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_kernel(Q, KC, VC, POS, O, stride_qb, stride_ob, heads, kv_heads, cache_len, scale, softcap,
                                 window, GROUPS: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_T: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """One program per (row, kv head): its GROUPS query heads attend to cache positions 0..pos (online softmax)."""
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        pos = tl.load(POS)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        q_heads = kv * GROUPS + g
        q = tl.load(Q + b * stride_qb + q_heads[:, None] * HEAD_DIM + d[None, :], mask=g[:, None] < GROUPS, other=0.0)
        cache = (b * kv_heads + kv) * cache_len * HEAD_DIM
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


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm of x (+ residual), x + residual or None), over the last dim, rows contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(rows)
    res = torch.empty_like(rows) if residual is not None else rows
    r = residual.reshape(-1, x.shape[-1]) if residual is not None else rows
    block = triton.next_power_of_2(rows.shape[1])
    _rms_norm_kernel[(rows.shape[0],)](rows, r, weight, y, res, rows.shape[1], rows.stride(0), r.stride(0), y.stride(0),
                                       res.stride(0), eps, offset, HAS_RESIDUAL=residual is not None, GEMMA=offset != 0,
                                       BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return y.reshape(x.shape), (res.reshape(x.shape) if residual is not None else None)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None) -> None:
    """Rotate the q and k heads of qkv [B, L, (H + 2 Hkv) D] in place (full-width rotary; cos, sin [P, D/2] per
    position), and when a cache is given write k and v at positions pos [L]."""
    b, length, width = qkv.shape
    rows = qkv.reshape(b * length, width)
    write = k_cache is not None
    _rope_cache_kernel[(b * length, heads + kv_heads)](
        rows, cos, sin, pos, k_cache if write else rows, v_cache if write else rows, rows.stride(0), length, heads,
        kv_heads, k_cache.shape[2] if write else 0, HEAD_DIM=head_dim, HALF=head_dim // 2, WRITE_CACHE=write,
        num_warps=1 if head_dim <= 128 else 2)


def gated_activation(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up for gate_up [..., 2 I] -> [..., I]."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    inner = rows.shape[1] // 2
    y = torch.empty((rows.shape[0], inner), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _gated_act_kernel[(rows.shape[0], triton.cdiv(inner, block))](rows, y, inner, rows.stride(0), y.stride(0), GELU=gelu,
                                                                 BLOCK=block, num_warps=4)
    return y.reshape(*gate_up.shape[:-1], inner)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                     softcap: float | None, window: int | None) -> torch.Tensor:
    """One new token per row: q [B, 1, H * D] (may be a strided view) over the cache [B, Hkv, T, D] up to pos[0]."""
    b, _, width = q.shape
    kv_heads, cache_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = width // head_dim
    groups = heads // kv_heads
    out = torch.empty((b, 1, width), dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(b, kv_heads)](
        q, k_cache, v_cache, pos, out, q.stride(0), out.stride(0), heads, kv_heads, cache_len, scale,
        softcap or 1.0, window or 0, GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim,
        BLOCK_T=64, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, num_warps=4)
    return out
