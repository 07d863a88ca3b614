"""The clipping search of primitives.search_quant_params on the GPU as one Triton kernel.

In torch every candidate range is ~8 passes over the weight (41 candidates: ~330 passes, seconds on an 8B model;
113 for asymmetric grids, whose lo and hi are clipped apart);
here one program holds a tile of blocks in registers, tries every candidate there and writes one scale (and zero
point) per block: one read of the weight. Same formulas as the torch path (round half to even, the scale rounded
to its storage dtype before use), two differences: the error sum runs in another order, which can flip a choice
between two candidates whose errors tie to fp32 rounding; and the range is divided by the grid's half range in
IEEE division, where torch on a GPU multiplies by the fp32 reciprocal, so fp32 scales may differ in the last bit
(scales stored in bf16/fp16 round that away).
"""

from __future__ import annotations

import torch

from ptqlab import triton_support
from ptqlab.triton_support import libdevice, tl, triton

_STORAGE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


if triton is not None:

    @triton.jit
    def _search_kernel(X, IMP, FACTORS, S_OUT, Z_OUT, n_blocks, groups_per_row, n_candidates, qmin, qmax, half_range,
                       tiny, huge, SYMMETRIC: tl.constexpr, HAS_IMP: tl.constexpr, STORAGE: tl.constexpr,
                       BLOCK_N: tl.constexpr, GS: tl.constexpr):
        b = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, GS)
        bmask = b < n_blocks
        x = tl.load(X + b[:, None] * GS + j[None, :], mask=bmask[:, None], other=0.0)
        if HAS_IMP:
            imp = tl.load(IMP + (b % groups_per_row)[:, None] * GS + j[None, :], mask=bmask[:, None], other=0.0)
        if SYMMETRIC:
            hi = tl.max(tl.abs(x), axis=1)
            lo = tl.zeros_like(hi)
        else:
            hi = tl.maximum(tl.max(x, axis=1), 0.0)
            lo = tl.minimum(tl.min(x, axis=1), 0.0)
        best_err = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_s = tl.zeros((BLOCK_N,), tl.float32)
        best_z = tl.zeros((BLOCK_N,), tl.float32)
        for k in range(0, n_candidates):
            lo_factor = tl.load(FACTORS + 2 * k)
            hi_factor = tl.load(FACTORS + 2 * k + 1)
            if SYMMETRIC:
                s = libdevice.div_rn(hi * hi_factor, half_range)
            else:
                s = libdevice.div_rn(hi * hi_factor - lo * lo_factor, qmax - qmin)
            s = tl.minimum(tl.maximum(s, tiny), huge)
            if STORAGE == 0:
                s = s.to(tl.bfloat16).to(tl.float32)
            elif STORAGE == 1:
                s = s.to(tl.float16).to(tl.float32)
            if SYMMETRIC:
                z = tl.zeros_like(s)
            else:
                z = tl.minimum(tl.maximum(libdevice.rint(qmin - libdevice.div_rn(lo * lo_factor, s)), qmin), qmax)
            q = tl.minimum(tl.maximum(libdevice.rint(libdevice.div_rn(x, s[:, None]) + z[:, None]), qmin), qmax)
            d = (q - z[:, None]) * s[:, None] - x
            d = d * d
            if HAS_IMP:
                d = d * imp
            err = tl.sum(d, axis=1)
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best_s = tl.where(better, s, best_s)
            best_z = tl.where(better, z, best_z)
        tl.store(S_OUT + b, best_s, mask=bmask)
        tl.store(Z_OUT + b, best_z, mask=bmask)


def available(x: torch.Tensor, block: int, scale_dtype: torch.dtype) -> bool:
    """The kernel takes CUDA tensors whose blocks are a power of two of at most 1024 elements."""
    return triton_support.available(x) and block & (block - 1) == 0 and block <= 1024 and scale_dtype in _STORAGE


def search_blocks(blocks: torch.Tensor, importance: torch.Tensor | None, candidates: torch.Tensor, symmetric: bool,
                  qmin: float, qmax: float, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """blocks [rows, groups, block] or [rows, block] (one block per row) fp32, importance [columns] or None,
    candidates [n, 2] (factor on lo, factor on hi: primitives.search_candidates) -> the first best scale
    [rows, groups] / [rows] in scale_dtype and zero point likewise, int8 (None if symmetric)."""
    shape, gs = blocks.shape[:-1], blocks.shape[-1]
    x = blocks.reshape(-1, gs).contiguous()
    n_blocks = x.shape[0]
    groups_per_row = shape[1] if len(shape) == 2 else 1
    scale = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    info = torch.finfo(scale_dtype)
    imp = importance.float().contiguous() if importance is not None else x  # unused when HAS_IMP is False
    block_n = max(1, min(64, 4096 // gs))
    _search_kernel[(triton.cdiv(n_blocks, block_n),)](
        x, imp, candidates.float().contiguous(), scale, zero, n_blocks, groups_per_row, candidates.shape[0], qmin, qmax,
        (qmax - qmin) / 2, info.tiny, info.max, SYMMETRIC=symmetric, HAS_IMP=importance is not None,
        STORAGE=_STORAGE[scale_dtype], BLOCK_N=block_n, GS=gs, num_warps=4)
    scale = scale.reshape(shape).to(scale_dtype)
    return scale, None if symmetric else zero.reshape(shape).to(torch.int8)
