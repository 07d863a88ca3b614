"""GPU kernels of mixture-of-experts decode (Triton): the router's top-k, one matmul over the chosen experts of
stacked 16-bit, FP8 or INT8 weights, and the weighted sum of each token's experts. (Int4 experts run the one-row
int4 kernel of kernels.py, which takes the same expert indices.)

A decode step of a few tokens reads only the experts its tokens chose. Everything stays on the device: the router's
choice is an index tensor the matmuls read, never a host-side list, so that the step has no host sync and a CUDA
graph can hold it (the eager grouped-by-expert loop of runtime/moe.py serves prefill). Work is laid out as pairs
p = token · k + slot: pair p multiplies its token's row by expert experts[p].
"""

from __future__ import annotations

import torch

from ptqlab.runtime.kernels import RuntimeOptions, pdl_launch
from ptqlab.triton_support import tl, triton

if triton is not None:
    from ptqlab.runtime.kernels import await_inputs

    @triton.jit
    def _route_kernel(Logits, Experts, Weights, E, stride_lm, TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
                      ROUND: tl.constexpr, BF16: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr):
        """One token: softmax in fp32 over its E router logits, the TOP_K largest (first index on ties, largest
        first, as torch.topk), renormalized when NORMALIZE, rounded to the model's 16-bit dtype (bf16 or fp16)
        when ROUND, for the architectures that keep their routing weights there."""
        await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        logits = tl.load(Logits + row * stride_lm + e, mask=e < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)
        slots = tl.arange(0, BLOCK_K)
        chosen = tl.zeros([BLOCK_K], dtype=tl.int32)
        weight = tl.zeros([BLOCK_K], dtype=tl.float32)
        left = tl.where(e < E, p, -1.0)
        for i in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            index = tl.min(tl.where(left == best, e, BLOCK_E), axis=0)
            chosen = tl.where(slots == i, index, chosen)
            weight = tl.where(slots == i, best, weight)
            left = tl.where(e == index, -2.0, left)
        if NORMALIZE:
            weight = weight / tl.sum(weight, axis=0)
        if ROUND:
            weight = weight.to(tl.bfloat16 if BF16 else tl.float16).to(tl.float32)
        mask = slots < TOP_K
        tl.store(Experts + row * TOP_K + slots, chosen, mask=mask)
        tl.store(Weights + row * TOP_K + slots, weight, mask=mask)

    @triton.jit
    def _expert_gemv_kernel(X, XS, W, WS, Experts, Weights, Y, N, K, stride_xm, stride_we, stride_wn, stride_se,
                            stride_ym, X_DIV: tl.constexpr, HAS_XS: tl.constexpr, HAS_WS: tl.constexpr,
                            WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Pair p = program_id(1): y[p, n] = Σ_k x[p // X_DIV, k] W[expert, n, k] over BLOCK_N outputs, in fp32, times
        the row's activation scale XS (FP8 / INT8 inputs), the expert's row scales WS and the routing weight."""
        await_inputs(PDL)
        pair = tl.program_id(1)
        expert = tl.load(Experts + pair).to(tl.int64)
        row = (pair // X_DIV).to(tl.int64)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        rows = W + expert * stride_we + rn[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_mask = k < K
            x = tl.load(X + row * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            acc += w * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_XS:
            y *= tl.load(XS + row)
        if HAS_WS:
            y *= tl.load(WS + expert * stride_se + rn, mask=n_mask, other=0.0)
        if WEIGHTED:
            y *= tl.load(Weights + pair)
        tl.store(Y + pair * stride_ym + rn, y.to(Y.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _sum_slots_kernel(Y, Out, N, stride_ym, stride_om, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
        """One token's TOP_K weighted expert outputs (fp32) added, in slot order, and rounded once."""
        await_inputs(PDL)
        token = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = rn < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            acc += tl.load(Y + (token * TOP_K + slot) * stride_ym + rn, mask=mask, other=0.0)
        tl.store(Out + token * stride_om + rn, acc.to(Out.dtype.element_ty), mask=mask)


def route(logits: torch.Tensor, top_k: int, normalize: bool, weight_dtype: torch.dtype | None,
          pdl: bool = RuntimeOptions.pdl) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [M, E] -> (experts int32 [M · top_k], fp32 weights [M · top_k]), token-major.
    weight_dtype: the dtype the architecture rounds its routing weights to (None: they stay fp32)."""
    m, e = logits.shape
    experts = torch.empty(m * top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(m * top_k, dtype=torch.float32, device=logits.device)
    _route_kernel[(m,)](logits, experts, weights, e, logits.stride(0), TOP_K=top_k, NORMALIZE=normalize,
                        ROUND=weight_dtype in (torch.bfloat16, torch.float16), BF16=weight_dtype == torch.bfloat16,
                        BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
                        num_warps=1 if e <= 256 else 4, **pdl_launch(logits.device, pdl))
    return experts, weights


def expert_gemv(x: torch.Tensor, experts: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                x_scale: torch.Tensor | None = None, rows_per_input: int = 1, weights: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, block_n: int = 8, block_k: int = 512, num_warps: int = 4,
                pdl: bool = RuntimeOptions.pdl) -> torch.Tensor:
    """Stacked experts' weights [E, N, K] (16-bit; or FP8 / INT8 with fp32 row scales weight_scale [E, N], x then
    being the input's grid values with its per-row fp32 x_scale). Pair p multiplies row p // rows_per_input of x
    [rows, K] by expert experts[p] -> [P, N] in `out_dtype` (default: x's), or in fp32 times weights[p] when
    `weights` is given."""
    _, n, k = weight.shape
    pairs = experts.shape[0]
    out_dtype = torch.float32 if weights is not None else out_dtype or x.dtype
    out = torch.empty((pairs, n), dtype=out_dtype, device=x.device)
    ws = weight_scale if weight_scale is not None else weight
    block_k = min(block_k, triton.next_power_of_2(k))
    _expert_gemv_kernel[(triton.cdiv(n, block_n), pairs)](
        x, x_scale if x_scale is not None else x, weight, ws, experts, weights if weights is not None else ws, out,
        n, k, x.stride(0), weight.stride(0), weight.stride(1), ws.stride(0) if weight_scale is not None else 0,
        out.stride(0), X_DIV=rows_per_input, HAS_XS=x_scale is not None, HAS_WS=weight_scale is not None,
        WEIGHTED=weights is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        **pdl_launch(x.device, pdl))
    return out


def sum_slots(y: torch.Tensor, top_k: int, dtype: torch.dtype, pdl: bool = RuntimeOptions.pdl) -> torch.Tensor:
    """y [M · top_k, N] (fp32, weighted) -> [M, N] in `dtype`: each token's experts added."""
    pairs, n = y.shape
    out = torch.empty((pairs // top_k, n), dtype=dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(n))
    _sum_slots_kernel[(pairs // top_k, triton.cdiv(n, block))](y, out, n, y.stride(0), out.stride(0), TOP_K=top_k,
                                                                BLOCK=block, num_warps=4, **pdl_launch(y.device, pdl))
    return out
