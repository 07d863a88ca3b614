"""GPTQ: quantize a weight matrix column by column, folding each column's rounding error into the columns not
yet quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022). Pure tensor math.

The objective is the layer's output error ||XW^T - XŴ^T||² over the calibration inputs X, whose Hessian is
H = 2/n XᵀX. Columns are processed in blocks (lazy batch updates: the error of a whole block reaches the rest
of the matrix in one matmul). With act-order, columns are visited by decreasing H_ii; with static groups the
group scales are fixed from the original weight before any update, so the saved checkpoint keeps the natural
column order (no permutation index) and loads anywhere. Static groups are the default without act-order too;
`static_groups=False` computes each group's scales when the sweep reaches it (GPTQ's reference).
FP4 formats (NVFP4, MXFP4) round each column to the E2M1 grid with their stored group scales (NVFP4's FP8 scale
divided by the matrix's global scale, which is fixed before the sweep).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ptqlab.quant import fp4, gptq_triton
from ptqlab.quant.primitives import FP8_DTYPE, block_view, grid_range, quant_params, quantize, search_quant_params
from ptqlab.schemes import QuantArgs, is_fp4
from ptqlab.settings import Interval, setting


class HessianError(ValueError):
    """The Hessian cannot be used (NaN/Inf, or not positive definite even after raising the damping)."""


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's own knobs (the number format is the scheme's)."""

    block_size: int = setting(128, Interval(1, words="a positive integer, e.g. 128"))
    """Columns per lazy-batch block."""
    dampening_frac: float = setting(0.01, Interval(0, 1, open_low=True, open_high=True, words="a number in (0, 1), e.g. 0.01"))
    """Added to the diagonal: dampening_frac x mean(diag H). Raised x10 (up to 5 times) if H is not positive definite."""
    act_order: bool = True
    """Visit columns by decreasing H_ii (the most salient inputs first); implies static groups. On by default, as in
    llm-compressor (`actorder="static"`): it lowers the layer output error on real weights
    (bench/results/gptq_quality_smollm2)."""
    static_groups: bool = True
    """Group scales from the original weight, fixed before the sweep (as llm-compressor does); False: from the
    error-updated weights when the sweep reaches each group (GPTQ's reference). Static gave the lower layer output
    error on both benchmark shapes (bench/results/quantize_speed_*.json)."""
    scale_search: bool = False
    """Int formats: choose each scale by a clipping search (primitives.search_quant_params) weighted by the Hessian's
    diagonal instead of plain min-max. It pays at 3-4 bits with symmetric groups (the w4a16 and w3a16 recipes turn it
    on); on int8 per-channel and on asymmetric int4 it measured neutral to slightly worse, so the default stays
    min-max (bench/results/gptq_quality_smollm2)."""


@dataclass
class GPTQResult:
    q: torch.Tensor  # [out, in] grid values (int8 or float8_e4m3fn), natural column order
    scale: torch.Tensor  # checkpoint layout, scale dtype
    zero_point: torch.Tensor | None
    dampening_frac: float  # the damping actually used
    dead_columns: int  # inputs that were always zero in calibration
    global_scale: torch.Tensor | None = None  # NVFP4: the fp32 global scale [1] the scales are relative to


def _inverse_hessian_cholesky(working_hessian: Callable[[], torch.Tensor], damp_frac: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1, raising the damping until H + damp*I is positive definite and so is the inverse's
    factor. `working_hessian()` gives a copy of H that is damped in place and dropped once factored, so that at most
    two [in, in] matrices live here at a time (a down_proj of a 32B model has in = 27,648: 3 GB each); it is called
    again only when the inverse, not H, fails.

    GPTQ's updates use the rows of this factor: row i holds the inverse-Hessian coefficients of the columns after
    i conditioned on the ones before, exactly what the sequential error feedback needs.
    """
    H = working_hessian()
    diagonal = H.diagonal().clone()
    mean_diag = float(diagonal.mean())
    for attempt in range(6):
        frac = damp_frac * 10**attempt
        if H is None:
            H = working_hessian()
        H.diagonal().copy_(diagonal + frac * mean_diag)
        factor, info = torch.linalg.cholesky_ex(H)
        if info != 0:
            continue
        H = None
        inverse = torch.cholesky_inverse(factor)
        del factor
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if info == 0 and torch.isfinite(upper).all():
            return upper, frac
    raise HessianError(f"the Hessian is not positive definite even with dampening_frac {frac:g}")


def _working_hessian(hessian: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A fp32 copy of `hessian` in the visiting order, with 1 on the diagonal of inputs that never fired, for
    _inverse_hessian_cholesky to damp in place (permuted one index at a time: two copies at most, briefly)."""
    H = hessian.detach().float()
    if perm is not None:
        H = H[perm]
        H = H[:, perm]
        dead = dead[perm]
    elif H is hessian or H.data_ptr() == hessian.data_ptr():
        H = H.clone()
    H[dead, dead] = 1.0  # an input that never fired: any weight is free; quantize it as zero
    return H


def gptq(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, config: GPTQConfig = GPTQConfig(),
         scale_dtype: torch.dtype | None = None, global_scale: torch.Tensor | None = None) -> GPTQResult:
    """Quantize weight [out, in] given the input Hessian [in, in] (fp32). Scales are stored in `scale_dtype`. NVFP4:
    relative to `global_scale` (default: the weight's own)."""
    return gptq_many(weight[None], hessian[None], args, config, scale_dtype,
                     None if global_scale is None else [global_scale])[0]


def gptq_many(weights: torch.Tensor, hessians: torch.Tensor, args: QuantArgs, config: GPTQConfig = GPTQConfig(),
              scale_dtype: torch.dtype | None = None, global_scales: list[torch.Tensor] | None = None) -> list[GPTQResult]:
    """GPTQ of B weights of one shape [B, out, in], each with its own Hessian [B, in, in]: per matrix what gptq()
    gives for it alone, with the factorizations, the lazy updates and the block kernel batched (an MoE layer's
    experts are hundreds of small, same-shaped problems whose one-at-a-time cost is mostly launches and syncs).
    Scales and zero points are found per matrix; NVFP4's relative to each matrix's global scale (`global_scales`,
    default each weight's own, fixed before the sweep)."""
    if not torch.isfinite(hessians).all():
        raise HessianError("the Hessian holds NaN or Inf: the layer saw non-finite activations")
    scale_dtype = scale_dtype or weights.dtype
    if fp4.has_global_scale(args) and global_scales is None:
        global_scales = [fp4.globals_of(w, scale_dtype) for w in weights]
    if not fp4.has_global_scale(args):
        global_scales = None
    W = weights.detach().float().clone()
    batch, rows, columns = W.shape
    h_diag = hessians.diagonal(dim1=-2, dim2=-1).float().clone()  # natural column order (dynamic groups never permute)
    dead = h_diag == 0
    h_diag[dead] = 1.0  # as the working Hessian's diagonal
    W.masked_fill_(dead[:, None, :], 0.0)

    # Without act-order, each group's scale is computed when GPTQ reaches the group, from the weights as the
    # errors of the columns before it have updated them (GPTQ's reference behaviour, and llm-compressor's):
    # blocks are then exactly the groups. With act-order, groups are static: scales from the original weight,
    # so that the checkpoint keeps the natural column order. Per-channel and per-tensor scales are always static.
    dynamic_groups = args.strategy in ("group", "tensor_group") and not (config.act_order or config.static_groups)

    def params(w: torch.Tensor, importance: torch.Tensor, b: int):
        if config.scale_search and args.type == "int":
            return search_quant_params(w, args, scale_dtype, importance=importance)
        return quant_params(w, args, scale_dtype, None if global_scales is None else global_scales[b])

    def values(scale: torch.Tensor, b: int) -> torch.Tensor:
        """What multiplies the grid values, in fp32 (FP4: from the stored scales)."""
        if is_fp4(args):
            return fp4.scale_values(scale, args, None if global_scales is None else global_scales[b])
        return scale.float()

    scale, zero_point = map(list, zip(*(params(W[b], h_diag[b], b) for b in range(batch))))
    perm = None
    if config.act_order:  # one sort per matrix: a batched sort may order equal diagonals differently
        perm = torch.stack([torch.argsort(h_diag[b], descending=True) for b in range(batch)])
        W = _permute_columns(W, perm)
    Hinv, damp_used = _inverse_hessian_choleskys(hessians, dead, perm, config.dampening_frac)

    # Per column: the scale/zero point that apply to it (its group's, in the visiting order).
    per_column = [_per_column(values(scale[b], b), zero_point[b], args, rows, columns) for b in range(batch)]
    col_scale = torch.stack([s for s, _ in per_column])
    col_zero = None if zero_point[0] is None else torch.stack([z for _, z in per_column])
    if perm is not None:
        col_scale = _permute_columns(col_scale, perm)
        col_zero = None if col_zero is None else _permute_columns(col_zero, perm)

    Q = torch.empty_like(W)
    block_size = args.group_size if dynamic_groups else config.block_size
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        if dynamic_groups:
            group = i1 // args.group_size
            for b in range(batch):
                group_scale, group_zero = params(W[b, :, i1:i2], h_diag[b, i1:i2], b)  # [rows, 1]
                scale[b][:, group:group + 1] = group_scale
                col_scale[b, :, i1:i2] = values(group_scale, b)
                if zero_point[b] is not None:
                    zero_point[b][:, group:group + 1] = group_zero
                    col_zero[b, :, i1:i2] = group_zero.float()
        zero_block = None if col_zero is None else col_zero[:, :, i1:i2]
        Q[:, :, i1:i2], Err1 = _quantize_block(W[:, :, i1:i2].clone(), Hinv[:, i1:i2, i1:i2], col_scale[:, :, i1:i2],
                                               zero_block, args)
        # The block's error reaches the columns after it (one matrix: the plain matmul, as gptq() always did).
        if batch == 1:
            W[0, :, i2:].addmm_(Err1[0], Hinv[0, i1:i2, i2:], alpha=-1)
        else:
            W[:, :, i2:].baddbmm_(Err1, Hinv[:, i1:i2, i2:], alpha=-1)

    if perm is not None:
        Q = _permute_columns(Q, torch.argsort(perm, dim=-1))
    # Q is on the grid already: quantize recovers the grid values exactly
    return [GPTQResult(quantize(Q[b], scale[b], zero_point[b], args, gscale), scale[b], zero_point[b], damp_used[b],
                       int(dead[b].sum()), gscale)
            for b, gscale in enumerate(global_scales or [None] * batch)]


def _permute_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [B, rows, columns] with each matrix's columns in the order of its row of perm [B, columns]."""
    return torch.gather(x, 2, perm[:, None, :].expand(-1, x.shape[1], -1))


def _inverse_hessian_choleskys(hessians: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None,
                               damp_frac: float) -> tuple[torch.Tensor, list[float]]:
    """Upper Cholesky factors of each (damped, permuted) inverse Hessian [B, in, in] and the damping each used. One
    matrix: _inverse_hessian_cholesky's memory-frugal path. Several: batched at `damp_frac`, the few that fail then
    one by one with the damping raised as for one matrix, so each gets the damping it would get alone."""
    def working(b: int) -> Callable[[], torch.Tensor]:
        return lambda: _working_hessian(hessians[b], dead[b], None if perm is None else perm[b])

    batch = hessians.shape[0]
    if batch == 1:
        upper, frac = _inverse_hessian_cholesky(working(0), damp_frac)
        return upper[None], [frac]
    H = torch.stack([working(b)() for b in range(batch)])
    diagonal = H.diagonal(dim1=-2, dim2=-1)
    # As one matrix's damping: the fp32 mean diagonal times frac in double, rounded to fp32, then added.
    diagonal += (damp_frac * diagonal.mean(-1, keepdim=True).double()).float()
    factor, info = torch.linalg.cholesky_ex(H)
    del H
    inverse = torch.cholesky_inverse(factor)
    del factor
    upper, info_inverse = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    failed = (info != 0) | (info_inverse != 0) | ~torch.isfinite(upper).flatten(1).all(1)
    fracs = [damp_frac] * batch
    for b in failed.nonzero().flatten().tolist():
        upper[b], fracs[b] = _inverse_hessian_cholesky(working(b), damp_frac)
    return upper, fracs


def _quantize_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's sweep over one block of columns of B matrices [B, rows, b]: each column rounded, its error folded into
    the block's later columns -> (the block on the grid, dequantized; the errors scaled by 1 / Hinv_ii, for the
    columns after it). One Triton kernel per block on a GPU (gptq_triton.py), else the loop below per matrix."""
    if gptq_triton.available(W1) and not is_fp4(args):
        qmin, qmax = grid_range(args)
        return gptq_triton.gptq_block(W1, Hinv1, scale, zero_point, qmin, qmax, args.type == "float")
    blocks = [_quantize_block_loop(W1[b], Hinv1[b], scale[b], None if zero_point is None else zero_point[b], args)
              for b in range(W1.shape[0])]
    return torch.stack([q for q, _ in blocks]), torch.stack([e for _, e in blocks])


def _quantize_block_loop(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                         args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix's block [rows, b] on the CPU."""
    # Transposed, so that a column is a contiguous row and its update of the later columns one rank-1 BLAS call
    # (the loop runs once per input channel: per-operation overhead is what it costs on a CPU).
    W1t, Err1t = W1.T.contiguous(), torch.empty_like(W1.T, memory_format=torch.contiguous_format)
    scale_t = scale.T.contiguous()
    zero_t = None if zero_point is None else zero_point.T.contiguous()
    for i in range(W1t.shape[0]):
        w = W1t[i]
        q = _round_column(w, scale_t[i], None if zero_t is None else zero_t[i], args)
        err = torch.sub(w, q, out=Err1t[i]).div_(Hinv1[i, i])
        W1t[i] = q
        W1t[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
    return W1t.T, Err1t.T


def _per_column(scale, zero_point, args: QuantArgs, rows: int, columns: int):
    """Expand checkpoint-layout scales to one fp32 scale (and zero point) per weight element: [rows, columns]."""
    ones = torch.ones(rows, columns, device=scale.device)
    grouped = args.strategy in ("group", "tensor_group")
    s = block_view(ones, args) * (scale.float().unsqueeze(-1) if grouped else scale.float())
    z = None
    if zero_point is not None:
        z = block_view(ones, args) * (zero_point.float().unsqueeze(-1) if grouped else zero_point.float())
        z = z.reshape(rows, columns)
    return s.reshape(rows, columns), z


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Nearest grid point of one column (each row with its own scale), dequantized, fp32. [rows]

    The same arithmetic as primitives.quantize/dequantize, inlined: it runs once per column of every layer.
    """
    qmin, qmax = grid_range(args)
    scaled = w / scale
    if is_fp4(args):
        return fp4.round_to_e2m1(scaled.clamp(qmin, qmax)) * scale
    if args.type == "float":
        return scaled.clamp(qmin, qmax).to(FP8_DTYPE).float() * scale
    if zero_point is None:
        return scaled.round().clamp(qmin, qmax) * scale
    return ((scaled + zero_point).round().clamp(qmin, qmax) - zero_point) * scale


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||² / ||X Wᵀ||²: the relative layer output error GPTQ minimizes."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ weight.float().T
    return float((ref - x @ approx.float().T).pow(2).sum() / ref.pow(2).sum())
