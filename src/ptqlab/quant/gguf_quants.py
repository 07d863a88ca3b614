"""llama.cpp's block formats (GGML types) as pure, vectorized tensor math: quantize a weight matrix, pack it into
the bytes a GGUF file stores, dequantize it back.

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 with an fp16 scale (and an fp16 minimum for the _1 types). Q4_K, Q5_K:
super-blocks of 256 with fp16 `d` and `dmin` and eight 6-bit sub-block scales and minimums; Q6_K: super-blocks of
256 with an fp16 `d` and sixteen int8 sub-block scales. The algorithms are those of ggml-quants.c: the reference
quantizers (`quantize_row_*_ref`) without an importance matrix, the `quantize_row_*_impl` searches with one
(make_qx_quants, make_qkx2/3_quants, make_qp_quants), every operation in float32 in the same order as the C code
so that the result is llama.cpp's up to the order of float32 sums. Rounding: ggml's nearest_int (half to even) is
torch.round; C's roundf (half away from zero) and truncating casts are spelled out where the C code uses them.

`importance` is llama.cpp's importance matrix for one weight: the mean squared input activation per input channel
([columns]), which the searches use to weigh each element's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK = 32
QK_K = 256
GROUP_MAX_EPS = 1e-15
TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
"""The types ptqlab writes (what llama.cpp's Q8_0, Q4_0 and Q4_K_M mixes use)."""
BLOCK = {t: GGML_QUANT_SIZES[t][0] for t in TYPES}
IMPORTANCE_UNUSED = (T.Q8_0,)
"""Types whose quantizer ignores an importance matrix (as llama.cpp's does)."""


def f32(value: float) -> torch.Tensor:
    """A float32 constant, computed as C computes it (numpy float32 arithmetic) and given to torch as a 0-d
    float32 tensor, so that every operation with it stays in float32."""
    return torch.tensor(np.float32(value), dtype=torch.float32)


@dataclass(frozen=True)
class Blocks:
    """One tensor in a GGML type: `fields` are the block fields as stored (fp16 scales, integer codes, ...), all
    with the number of (super-)blocks as their first dimension; `shape` is the weight's [rows, columns]."""

    qtype: T
    shape: tuple[int, int]
    fields: dict[str, torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        """The float32 values a GGML reader computes from the stored fields (same operations, same order)."""
        return _DEQUANTIZE[self.qtype](**self.fields).reshape(self.shape)

    def to_bytes(self) -> np.ndarray:
        """The GGUF tensor data: uint8 [rows, bytes per row]."""
        packed = torch.cat([_as_bytes(f) for f in _PACK[self.qtype](**self.fields)], dim=-1)
        return packed.reshape(self.shape[0], -1).cpu().numpy()


def _as_bytes(field: torch.Tensor) -> torch.Tensor:
    """A field as its little-endian bytes, [blocks, n]."""
    field = field.contiguous()
    if field.dtype != torch.uint8:
        field = field.view(torch.uint8)
    return field.reshape(field.shape[0], -1)


def quantize(weight: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> Blocks:
    """`weight` [rows, columns] (any float dtype; computed in float32) in GGML type `qtype`; `importance`
    [columns] switches to llama.cpp's importance-weighted search (ignored by Q8_0, as in llama.cpp)."""
    if qtype not in TYPES:
        raise ValueError(f"GGML type {qtype.name} is not one ptqlab quantizes; known: {', '.join(t.name for t in TYPES)}")
    rows, columns = weight.shape
    block = BLOCK[qtype]
    if columns % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values; this weight has {columns}")
    x = weight.detach().to(torch.float32).reshape(-1, block)
    if importance is not None and qtype not in IMPORTANCE_UNUSED:
        qw = importance.detach().to(torch.float32).reshape(1, columns // block, block).expand(rows, -1, -1)
        fields = _QUANTIZE_WEIGHTED[qtype](x, qw.reshape(-1, block), columns)
    else:
        fields = _QUANTIZE[qtype](x)
    return Blocks(qtype, (rows, columns), fields)


def quantize_to_bytes(weight: torch.Tensor, qtype: T, importance: torch.Tensor | None = None,
                      chunk: int = 1 << 18) -> np.ndarray:
    """quantize(...).to_bytes() a few rows at a time (about `chunk` values each: the searches keep several float32
    copies of what they work on, which for a whole embedding matrix would be gigabytes), on one CPU thread: the
    searches are many small operations, which torch's thread pool slows down rather than speeds up, many times
    over when other processes share the cores."""
    rows, columns = weight.shape
    step = max(1, chunk // columns)
    threads = torch.get_num_threads()
    if weight.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        parts = [quantize(weight[start:start + step], qtype, importance).to_bytes() for start in range(0, rows, step)]
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------- helpers shared by the searches


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even."""
    return torch.round(x)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: floor(|x|) + floor(2 (|x| - floor(|x|)))."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _safe(denominator: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return torch.where(ok, denominator, torch.ones_like(denominator))


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the signed value where it first occurs) along the last dimension, each [..., 1]."""
    amax, index = x.abs().max(dim=-1, keepdim=True)
    return amax, x.gather(-1, index)


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1: a symmetric scale for each row of `x` [blocks, n] chosen among 19
    candidates around nmax / max by the weighted least-squares fit (weights: the importance, or x² without one)
    -> (scale [blocks, 1], codes in [0, 2 nmax) [blocks, n])."""
    amax, xmax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xmax = _safe(xmax, ~zero)
    w = x * x if weights is None else weights
    wx = w * x

    def attempt(iscale):
        l = _nearest(iscale * x).clamp(-nmax, nmax - 1)
        return l, (wx * l).sum(-1, keepdim=True), (w * l * l).sum(-1, keepdim=True)

    codes, sumlx, suml2 = attempt(f32(-nmax) / xmax)
    scale = torch.where(suml2 != 0, sumlx / _safe(suml2, suml2 != 0), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, slx, sl2 = attempt(-f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / xmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        codes = torch.where(better, l, codes)
        scale = torch.where(better, slx / _safe(sl2, better), scale)
        best = torch.where(better, scale * slx, best)
    codes = torch.where(zero, torch.full_like(codes, -nmax), codes)
    return torch.where(zero, torch.zeros_like(scale), scale), (codes + nmax).to(torch.uint8)


def make_qkx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                    nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants / make_qkx3_quants (the same search): an asymmetric grid (scale, minimum) for each
    row of `x` [blocks, n], trying nstep + 1 scales from (nmax + rmin) / range upwards by rdelta, each followed by
    the weighted least-squares fit of scale and minimum -> (scale [blocks, 1], -minimum >= 0 [blocks, 1],
    codes in [0, nmax] [blocks, n])."""
    xmin = x.min(dim=-1, keepdim=True).values.clamp(max=0)
    xmax = x.max(dim=-1, keepdim=True).values
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    flat = xmax <= xmin
    span = _safe(xmax - xmin, ~flat)

    def error(scale, minimum, codes):
        diff = scale * codes + minimum - x
        return (weights * (diff * diff)).sum(-1, keepdim=True)

    iscale = f32(nmax) / span
    scale = 1 / iscale
    codes = _nearest(iscale * (x - xmin)).clamp(0, nmax)
    best = error(scale, xmin, codes)
    minimum = xmin
    for step in range(nstep + 1):
        # ggml grids every later candidate from the best minimum so far, not from the block's own minimum
        iscale = f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)) / \
            torch.where(flat, span, xmax - minimum)
        l = _nearest(iscale * (x - minimum)).clamp(0, nmax)
        wl = weights * l
        sum_l, sum_l2, sum_xl = wl.sum(-1, keepdim=True), (wl * l).sum(-1, keepdim=True), (wl * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det, ok)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det, ok)
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / _safe(sum_l2, sum_l2 != 0), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, l)
        better = ok & (cur < best)
        codes = torch.where(better, l, codes)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    minimum = torch.where(flat, xmin, minimum)
    return scale, -minimum, codes.to(torch.uint8)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants: one positive scale for the sub-block scales (or minimums) `x` [blocks, n] of each
    super-block, searched over 9 candidates, then refined by a weighted coordinate descent over the codes
    -> (scale [blocks, 1], codes in [0, nmax] [blocks, n])."""
    xmax = x.max(dim=-1, keepdim=True).values.clamp(min=0)
    zero = xmax < GROUP_MAX_EPS
    xmax = _safe(xmax, ~zero)

    def mse(scale, codes):
        diff = x - scale * codes
        return (weights * diff * diff).sum(-1, keepdim=True)

    iscale = f32(nmax) / xmax
    best = mse(1 / iscale, _nearest(iscale * x))
    for step in range(-4, 5):
        if step == 0:
            continue
        candidate = f32(np.float32(0.1) * np.float32(step) + np.float32(nmax)) / xmax
        err = mse(1 / candidate, _nearest(candidate * x).clamp(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, candidate, iscale)
    codes = _nearest(iscale * x).clamp(max=nmax)
    sumlx = (weights * x * codes).sum(-1, keepdim=True)
    suml2 = (weights * codes * codes).sum(-1, keepdim=True)
    for _ in range(5):  # a try that changes nothing leaves every later try with nothing to change: same as C's break
        for i in range(x.shape[-1]):
            w, xi, li = weights[:, i:i + 1], x[:, i:i + 1], codes[:, i:i + 1]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            candidate = (slx > 0) & (sl2 > 0)
            new = _nearest(xi * sl2 / _safe(slx, candidate)).clamp(max=nmax)
            slx = slx + w * xi * new
            sl2 = sl2 + w * new * new
            accept = candidate & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[:, i:i + 1] = torch.where(accept, new, li)
            sumlx = torch.where(accept, slx, sumlx)
            suml2 = torch.where(accept, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 > 0), torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0, codes).clamp(0, nmax).to(torch.uint8)


def _row_sigma2(x: torch.Tensor, columns: int) -> torch.Tensor:
    """Σx² / columns of each weight row, repeated for each of its blocks ([blocks, 1]): the row-level term of the
    32-block types' importance weights."""
    per_row = (x * x).reshape(-1, columns).sum(-1, keepdim=True) / f32(columns)
    return per_row.repeat_interleave(columns // x.shape[-1], dim=0)


# ---------------------------------------------------------------- blocks of 32


def _symmetric_ref(x: torch.Tensor, nmax: int) -> dict:
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, codes trunc(x / d + nmax + 0.5)."""
    _, xmax = _first_absmax(x)
    d = xmax / f32(-nmax)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / _safe(d, d != 0))
    codes = torch.trunc(x * inverse + f32(np.float32(nmax) + np.float32(0.5))).clamp(0, 2 * nmax - 1)
    return {"d": d.to(torch.float16), "q": codes.to(torch.uint8)}


def _asymmetric_ref(x: torch.Tensor, nmax: int) -> dict:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / nmax, m = min, codes trunc((x - min) / d + 0.5)."""
    xmin = x.min(dim=-1, keepdim=True).values
    xmax = x.max(dim=-1, keepdim=True).values
    d = (xmax - xmin) / f32(nmax)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / _safe(d, d != 0))
    codes = torch.trunc((x - xmin) * inverse + f32(0.5)).clamp(0, nmax)
    return {"d": d.to(torch.float16), "m": xmin.to(torch.float16), "q": codes.to(torch.uint8)}


def _symmetric_weighted(x: torch.Tensor, qw: torch.Tensor, columns: int, nmax: int) -> dict:
    """quantize_row_q4_0_impl / q5_0_impl: make_qx_quants weighted by importance * sqrt(sigma² + x²)."""
    weights = qw * torch.sqrt(_row_sigma2(x, columns) + x * x)
    d, codes = make_qx_quants(x, nmax, weights)
    return {"d": d.to(torch.float16), "q": codes}


def _asymmetric_weighted(x: torch.Tensor, qw: torch.Tensor, columns: int, nmax: int) -> dict:
    """quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants weighted by importance * sqrt(sigma² + x²)."""
    weights = qw * torch.sqrt(_row_sigma2(x, columns) + x * x)
    d, negative_min, codes = make_qkx_quants(x, weights, nmax, -0.9, 0.05, 36)
    return {"d": d.to(torch.float16), "m": (-negative_min).to(torch.float16), "q": codes}


def _quantize_q8_0(x: torch.Tensor) -> dict:
    d = x.abs().max(dim=-1, keepdim=True).values / f32(127)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / _safe(d, d != 0))
    return {"d": d.to(torch.float16), "q": _roundf(x * inverse).to(torch.int8)}


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """32 codes -> 16 bytes: element j in the low nibble of byte j, element j + 16 in the high nibble."""
    return (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)


def _high_bits(codes: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 codes as 4 bytes of a little-endian uint32 (bit j: element j)."""
    bits = ((codes >> 4) & 1).reshape(-1, 4, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=codes.device)
    return bits.sum(-1).to(torch.uint8)


def _dq_symmetric(d: torch.Tensor, q: torch.Tensor, offset: int) -> torch.Tensor:
    return d.to(torch.float32) * (q.to(torch.int16) - offset).to(torch.float32)


def _dq_asymmetric(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float32) * q.to(torch.float32) + m.to(torch.float32)


# ---------------------------------------------------------------- super-blocks of 256


def _k_scales_ref(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> dict:
    """quantize_row_q4_K_ref / q5_K_ref: each 32-sub-block's (scale, min) by make_qkx2_quants weighted by
    rms(sub-block) + |x|, then both to 6 bits against the super-block's largest."""
    sub = x.reshape(-1, QK)
    av_x = torch.sqrt((sub * sub).sum(-1, keepdim=True) / f32(32))
    scales, mins, codes = make_qkx_quants(sub, av_x + sub.abs(), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = scales.max(dim=-1, keepdim=True).values.clamp(min=0)
    max_min = mins.max(dim=-1, keepdim=True).values.clamp(min=0)
    inv_scale = torch.where(max_scale > 0, f32(63) / _safe(max_scale, max_scale > 0), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, f32(63) / _safe(max_min, max_min > 0), torch.zeros_like(max_min))
    ls = torch.remainder(_nearest(inv_scale * scales), 256).clamp(max=63)  # a uint8 in C, then MIN(63, .)
    lm = torch.remainder(_nearest(inv_min * mins), 256).clamp(max=63)
    return {"d": (max_scale / f32(63)).to(torch.float16), "dmin": (max_min / f32(63)).to(torch.float16),
            "sc": ls.to(torch.uint8), "m": lm.to(torch.uint8), "q": codes.reshape(-1, QK_K)}


def _k_scales_weighted(x: torch.Tensor, qw: torch.Tensor, nmax: int) -> dict:
    """quantize_row_q4_K_impl / q5_K_impl: make_qkx3_quants weighted by importance * sqrt(sigma² + x²) per
    sub-block, then make_qp_quants fits the 6-bit scales and minimums weighted by each sub-block's total weight."""
    sigma2 = f32(2) * (x * x).sum(-1, keepdim=True) / f32(QK_K)
    weights = qw * torch.sqrt(sigma2 + x * x)
    sub_weights = weights.reshape(-1, 8, QK).sum(-1)
    scales, mins, codes = make_qkx_quants(x.reshape(-1, QK), weights.reshape(-1, QK), nmax, -0.9, 0.05, 36)
    d, ls = make_qp_quants(scales.reshape(-1, 8), 63, sub_weights)
    dmin, lm = make_qp_quants(mins.reshape(-1, 8), 63, sub_weights)
    return {"d": d.to(torch.float16), "dmin": dmin.to(torch.float16), "sc": ls, "m": lm, "q": codes.reshape(-1, QK_K)}


def _k_requantize(x: torch.Tensor, fields: dict, nmax: int) -> dict:
    """Every code again against the stored (fp16, 6-bit) sub-block grid: code = round((x + dmin m) / (d sc)),
    kept from the search where d sc is 0."""
    step = (fields["d"].to(torch.float32) * fields["sc"].to(torch.float32)).unsqueeze(-1)  # [S, 8, 1]
    shift = (fields["dmin"].to(torch.float32) * fields["m"].to(torch.float32)).unsqueeze(-1)
    sub = x.reshape(-1, 8, QK)
    fresh = _nearest((sub + shift) / _safe(step, step != 0)).clamp(0, nmax)
    kept = fields["q"].reshape(-1, 8, QK).to(torch.float32)
    fields["q"] = torch.where(step != 0, fresh, kept).reshape(-1, QK_K).to(torch.uint8)
    return fields


def _quantize_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> dict:
    return _k_requantize(x, _k_scales_ref(x, nmax, rmin, nstep), nmax)


def _quantize_k_weighted(x: torch.Tensor, qw: torch.Tensor, nmax: int) -> dict:
    return _k_requantize(x, _k_scales_weighted(x, qw, nmax), nmax)


def _quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> dict:
    """quantize_row_q6_K_ref / _impl: make_qx_quants per 16-sub-block (weighted by the raw importance when
    given), the sub-block scales to int8 against the largest in magnitude, every code again on the stored grid."""
    sub = x.reshape(-1, 16)
    scales, codes = make_qx_quants(sub, 32, None if qw is None else qw.reshape(-1, 16))
    scales, codes = scales.reshape(-1, 16), codes.reshape(-1, 16, 16)
    max_abs, max_scale = _first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = f32(-128) / _safe(max_scale, ~zero)
    d = (1 / iscale).to(torch.float16)
    sc = _nearest(iscale * scales).clamp(max=127)
    step = (d.to(torch.float32) * sc).unsqueeze(-1)
    fresh = _nearest(sub.reshape(-1, 16, 16) / _safe(step, step != 0)).clamp(-32, 31) + 32
    codes = torch.where(step != 0, fresh, codes.to(torch.float32))
    codes = torch.where(zero.unsqueeze(-1), torch.zeros_like(codes), codes)
    return {"d": torch.where(zero, torch.zeros_like(d), d), "sc": torch.where(zero, 0, sc).to(torch.int8),
            "q": codes.reshape(-1, QK_K).to(torch.uint8)}


def _pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and minimums -> 12 bytes (get_scale_min_k4's layout)."""
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([low, mid, high], dim=-1)


def _pack_q4_k(d, dmin, sc, m, q):
    q = q.reshape(-1, 4, 2, QK)
    return [d, dmin, _pack_k_scales(sc, m), ((q[:, :, 0] & 0xF) | (q[:, :, 1] << 4)).reshape(-1, 128)]


def _pack_q5_k(d, dmin, sc, m, q):
    shifts = torch.arange(8, dtype=torch.int32, device=q.device).reshape(1, 8, 1)
    high = ((q >> 4) & 1).reshape(-1, 8, QK).to(torch.int32) << shifts
    low = (q & 0xF).reshape(-1, 4, 2, QK)
    return [d, dmin, _pack_k_scales(sc, m), high.sum(1).to(torch.uint8),
            (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)]


def _pack_q6_k(d, sc, q):
    q = q.reshape(-1, 2, 4, QK)  # [S, half, quarter, 32]: element 128 h + 32 k + l
    low = q & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1)  # [S, 2, 64]
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [S, 2, 32]
    return [ql.reshape(-1, 128), qh.reshape(-1, 64), sc, d]


def _dq_k(d, dmin, sc, m, q):
    step = (d.to(torch.float32) * sc.to(torch.float32)).unsqueeze(-1)
    shift = (dmin.to(torch.float32) * m.to(torch.float32)).unsqueeze(-1)
    return (step * q.reshape(-1, 8, QK).to(torch.float32) - shift).reshape(-1, QK_K)


def _dq_q6_k(d, sc, q):
    step = (d.to(torch.float32) * sc.to(torch.float32)).unsqueeze(-1)
    return (step * (q.reshape(-1, 16, 16).to(torch.int16) - 32).to(torch.float32)).reshape(-1, QK_K)


_QUANTIZE = {
    T.Q8_0: _quantize_q8_0,
    T.Q4_0: lambda x: _symmetric_ref(x, 8),
    T.Q5_0: lambda x: _symmetric_ref(x, 16),
    T.Q4_1: lambda x: _asymmetric_ref(x, 15),
    T.Q5_1: lambda x: _asymmetric_ref(x, 31),
    T.Q4_K: lambda x: _quantize_k(x, 15, -1.0, 20),
    T.Q5_K: lambda x: _quantize_k(x, 31, -0.5, 15),
    T.Q6_K: _quantize_q6_k,
}
_QUANTIZE_WEIGHTED = {
    T.Q4_0: lambda x, qw, columns: _symmetric_weighted(x, qw, columns, 8),
    T.Q5_0: lambda x, qw, columns: _symmetric_weighted(x, qw, columns, 16),
    T.Q4_1: lambda x, qw, columns: _asymmetric_weighted(x, qw, columns, 15),
    T.Q5_1: lambda x, qw, columns: _asymmetric_weighted(x, qw, columns, 31),
    T.Q4_K: lambda x, qw, columns: _quantize_k_weighted(x, qw, 15),
    T.Q5_K: lambda x, qw, columns: _quantize_k_weighted(x, qw, 31),
    T.Q6_K: lambda x, qw, columns: _quantize_q6_k(x, qw),
}
_PACK = {
    T.Q8_0: lambda d, q: [d, q],
    T.Q4_0: lambda d, q: [d, _nibbles(q)],
    T.Q5_0: lambda d, q: [d, _high_bits(q), _nibbles(q)],
    T.Q4_1: lambda d, m, q: [d, m, _nibbles(q)],
    T.Q5_1: lambda d, m, q: [d, m, _high_bits(q), _nibbles(q)],
    T.Q4_K: _pack_q4_k,
    T.Q5_K: _pack_q5_k,
    T.Q6_K: _pack_q6_k,
}
_DEQUANTIZE = {
    T.Q8_0: lambda d, q: q.to(torch.float32) * d.to(torch.float32),
    T.Q4_0: lambda d, q: _dq_symmetric(d, q, 8),
    T.Q5_0: lambda d, q: _dq_symmetric(d, q, 16),
    T.Q4_1: _dq_asymmetric,
    T.Q5_1: _dq_asymmetric,
    T.Q4_K: _dq_k,
    T.Q5_K: _dq_k,
    T.Q6_K: _dq_q6_k,
}
