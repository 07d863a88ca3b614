"""Quantization primitives against an independent float64 reference written here.

Inputs are random with the hard cases mixed in: outliers (100x), an all-zero row, a row of tiny values and
a row of huge values (extreme scales). Properties: grid values equal the float64 reference's nearest grid
point (a difference of one step is allowed only where the exact quotient is a rounding tie to within fp32
precision), every error is within the format's bound, and nothing is NaN or infinite.
"""

import pytest
import torch

from ptqlab.quant.linear import rtn
from ptqlab.quant.primitives import FP8_DTYPE, dequantize, fake_quantize, quant_params, quantize
from ptqlab.schemes import QuantArgs


def hard_matrix(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    outliers = torch.rand(rows, cols, generator=g) < 0.01
    x[outliers] *= 100
    x[1] = 0.0  # all-zero row
    x[2] *= 1e-6 if dtype == torch.float16 else 1e-30  # tiny scale
    if dtype != torch.float16:
        x[3] *= 1e30  # huge scale
    x[4, : cols // 2] = 0.0  # half-zero row: exercises zero groups
    x[5] = x[5].abs()  # one-signed row: exercises asymmetric zero points at the grid's edge
    return x.to(dtype)


def reference_int(x: torch.Tensor, scale: torch.Tensor, zero_point, args: QuantArgs):
    """Nearest grid point in float64, using the stored scale/zero point. -> (q, exact quotient)."""
    qmin, qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    s = scale.double()
    z = torch.zeros_like(s) if zero_point is None else zero_point.double()
    if args.strategy == "group":
        s, z = s.repeat_interleave(args.group_size, dim=-1), z.repeat_interleave(args.group_size, dim=-1)
    exact = x.double() / s + z
    return exact.round().clamp(qmin, qmax), exact


def fp8_grid() -> torch.Tensor:
    """Every finite FP8 E4M3 value, ascending, in float64."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).double()
    return torch.unique(values[torch.isfinite(values)])


def reference_fp8(y: torch.Tensor) -> torch.Tensor:
    """Nearest FP8 E4M3 value of y (float64), by search over the whole grid."""
    grid = fp8_grid()
    y = y.clamp(grid[0], grid[-1])
    idx = torch.searchsorted(grid, y).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    return torch.where((y - lo) <= (hi - y), lo, hi)


INT_CASES = [
    QuantArgs(num_bits=bits, symmetric=sym, strategy=strategy, group_size=group)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for strategy, group in (("tensor", None), ("channel", None), ("group", 8), ("group", 24), ("group", 64), ("group", 192))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("args", INT_CASES, ids=lambda a: f"int{a.num_bits}-{'sym' if a.symmetric else 'asym'}-{a.strategy}{a.group_size or ''}")
def test_int_quantization_matches_float64_reference(args, dtype):
    x = hard_matrix(16, 192, dtype)
    if args.strategy == "tensor":  # one scale for everything: keep the extremes out or nothing else survives
        x = hard_matrix(16, 192, dtype)[6:]
    q, scale, zero_point = rtn(x, args, scale_dtype=dtype)
    assert q.dtype == torch.int8 and scale.dtype == dtype and q.shape == x.shape
    assert torch.isfinite(scale).all() and (scale > 0).all()

    ref_q, exact = reference_int(x, scale, zero_point, args)
    differs = q.double() != ref_q
    # Only a rounding tie (to fp32 precision of the quotient) may go either way.
    tie = ((exact - exact.floor() - 0.5).abs() < 1e-5 * exact.abs().clamp(min=1)) & ((q.double() - ref_q).abs() <= 1)
    assert (~differs | tie).all(), f"{int(differs.sum())} grid values differ from the float64 reference"

    xhat = dequantize(q, scale, zero_point, args, dtype=torch.float64)
    assert torch.isfinite(xhat).all()
    step = scale.double()
    if args.strategy == "group":
        step = step.repeat_interleave(args.group_size, dim=-1)
    # Half a step from rounding, plus the clamp of the extreme value when the stored scale was rounded down
    # to its dtype (relative eps of that dtype times the grid's span).
    span = 2**args.num_bits - 1
    bound = step * (0.5 + span * torch.finfo(dtype).eps) + 1e-300
    err = (xhat - x.double()).abs()
    assert (err <= bound).all(), f"max error {float((err / bound).max()):.3f} x bound"


@pytest.mark.parametrize("args", [a for a in INT_CASES if a.strategy == "group"][:6])
def test_zero_block_dequantizes_to_exact_zero(args):
    x = hard_matrix(16, 192, torch.float32)
    q, scale, zero_point = rtn(x, args)
    xhat = dequantize(q, scale, zero_point, args)
    assert (xhat[1] == 0).all() and (xhat[4, :96] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_fp8_quantization_matches_float64_reference(strategy, dtype):
    args = QuantArgs(num_bits=8, type="float", strategy=strategy)
    x = hard_matrix(16, 192, dtype)
    if strategy == "tensor":
        x = x[6:]
    q, scale, _ = rtn(x, args, scale_dtype=dtype)
    assert q.dtype == FP8_DTYPE and scale.dtype == dtype
    assert torch.isfinite(scale).all() and (scale > 0).all()

    y = x.double() / scale.double()
    ref = reference_fp8(y)
    differs = q.double() != ref
    # Ties between two FP8 neighbours (to fp32 precision of the quotient) may go either way.
    grid = fp8_grid()
    idx = torch.searchsorted(grid, y.clamp(grid[0], grid[-1])).clamp(1, len(grid) - 1)
    midpoint = (grid[idx - 1] + grid[idx]) / 2
    tie = (y - midpoint).abs() <= 1e-6 * y.abs()
    assert (~differs | tie).all(), f"{int(differs.sum())} FP8 values differ from the float64 reference"

    xhat = dequantize(q, scale, None, args, dtype=torch.float64)
    assert torch.isfinite(xhat).all()
    s = scale.double()
    # E4M3 has 3 mantissa bits: half an ulp is 2^-4 of the value for normals; below 2^-6 the subnormal step
    # is 2^-9, so half of it (times the scale) bounds the absolute error. The clamp at 448 adds the scale's
    # own rounding to its dtype.
    bound = x.double().abs() * (2.0**-4 + 448 * torch.finfo(dtype).eps / 448) + s * 2.0**-10 + 1e-300
    err = (xhat - x.double()).abs()
    assert (err <= bound).all(), f"max error {float((err / bound).max()):.3f} x bound"


@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True),
    QuantArgs(num_bits=8, strategy="token", dynamic=True),
], ids=["fp8", "int8"])
def test_dynamic_token_quantization_has_one_scale_per_token(args):
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    x[0, 0] = 0.0
    x[1, 2] *= 1000
    scale, _ = quant_params(x, args, scale_dtype=torch.float32)
    assert scale.shape == (3, 5, 1)
    absmax = x.float().abs().amax(-1, keepdim=True)
    half = 448.0 if args.type == "float" else 127.5
    expected = torch.where(absmax == 0, torch.finfo(torch.float32).tiny, absmax / half)
    assert torch.equal(scale, expected)
    xhat = fake_quantize(x, args)
    assert xhat.dtype == x.dtype and torch.isfinite(xhat).all()
    assert (xhat[0, 0] == 0).all()
    # A 1000x token does not change its neighbours' quantization: scales are per token.
    y = x.clone()
    y[1, 2] /= 1000
    assert torch.equal(fake_quantize(y, args)[1, 3], xhat[1, 3])


def test_group_size_must_divide_the_row():
    with pytest.raises(ValueError, match="does not divide"):
        quant_params(torch.randn(4, 100), QuantArgs(num_bits=4, strategy="group", group_size=64))


def test_int_quantize_of_dequantized_values_is_identity():
    """Quantizing an on-grid tensor again with the same scale returns the same grid values."""
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    x = hard_matrix(16, 192, torch.float32)
    q, scale, zp = rtn(x, args)
    again = quantize(dequantize(q, scale, zp, args), scale, zp, args)
    assert torch.equal(again, q)


@pytest.mark.parametrize("kwargs", [
    dict(num_bits=5), dict(num_bits=4, type="float"), dict(strategy="group"), dict(strategy="channel", group_size=64),
])
def test_invalid_quant_args_are_refused(kwargs):
    with pytest.raises(ValueError):
        QuantArgs(**kwargs)


# ---- clipping search of the scales -------------------------------------------------------------------------------

SEARCH_ARGS = [
    QuantArgs(num_bits=4, strategy="group", group_size=32),
    QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
    QuantArgs(num_bits=3, strategy="group", group_size=64),
    QuantArgs(num_bits=8, strategy="channel"),
]
SEARCH_IDS = ["int4-g32", "int4-asym-g32", "int3-g64", "int8-channel"]


def reference_search(x: torch.Tensor, args: QuantArgs, importance: torch.Tensor, scale_dtype, candidates=None):
    """Brute force in float64: every candidate range (min-max's lo and hi times the candidate's factors; default the
    search's own candidates), each block's weighted squared error -> the best error per block [rows, n_blocks]."""
    from ptqlab.quant.primitives import search_candidates

    candidates = search_candidates(args.symmetric) if candidates is None else candidates
    qmin, qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    gs = args.group_size if args.strategy == "group" else x.shape[1]
    blocks = x.double().unflatten(-1, (x.shape[1] // gs, gs))
    imp = importance.double().unflatten(-1, (x.shape[1] // gs, gs))
    best = None
    for lo_factor, hi_factor in candidates.double():
        if args.symmetric:
            scale = (blocks.abs().amax(-1) * hi_factor / ((qmax - qmin) / 2)).to(scale_dtype).double()
            zero = torch.zeros_like(scale)
        else:
            lo, hi = blocks.amin(-1).clamp(max=0) * lo_factor, blocks.amax(-1).clamp(min=0) * hi_factor
            scale = ((hi - lo) / (qmax - qmin)).to(scale_dtype).double()
            zero = (qmin - lo / scale).round().clamp(qmin, qmax)
        approx = ((blocks / scale[..., None] + zero[..., None]).round().clamp(qmin, qmax) - zero[..., None]) * scale[..., None]
        err = ((approx - blocks) ** 2 * imp).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    return best


def block_errors(x, scale, zero_point, args, importance):
    approx = dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, torch.float64)
    gs = args.group_size if args.strategy == "group" else x.shape[1]
    sq = ((approx - x.double()) ** 2 * importance.double()).unflatten(-1, (x.shape[1] // gs, gs))
    return sq.sum(-1)


@pytest.mark.parametrize("args", SEARCH_ARGS, ids=SEARCH_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_search_finds_the_best_candidate_and_never_loses_to_minmax(args, dtype):
    from ptqlab.quant.primitives import search_quant_params

    torch.manual_seed(5)
    x = (torch.distributions.StudentT(3).sample((48, 128)) * 0.02).to(dtype)
    importance = torch.rand(128) + 0.1
    scale, zero_point = search_quant_params(x, args, importance=importance)
    assert scale.dtype == dtype and scale.shape == quant_params(x, args)[0].shape
    ours = block_errors(x, scale, zero_point, args, importance)
    best = reference_search(x, args, importance, dtype)
    minmax = block_errors(x, *quant_params(x, args), args, importance)
    assert torch.allclose(ours, best, rtol=1e-5, atol=0)  # the optimum over the candidates, to fp32 error sums
    assert (ours <= minmax * (1 + 1e-6)).all()
    if args.num_bits <= 4:
        assert ours.sum() < 0.97 * minmax.sum()  # heavy tails on a coarse grid: clipping pays


def test_scale_search_clips_an_outlier_on_an_unimportant_input():
    from ptqlab.quant.primitives import search_quant_params

    args = QuantArgs(num_bits=4, strategy="channel")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6)) * 0.1
    x[:, 0] = 1.0  # an outlier column
    unimportant = torch.ones(64)
    unimportant[0] = 0.0
    clipped, _ = search_quant_params(x, args, importance=unimportant)
    kept, _ = search_quant_params(x, args, importance=torch.ones(64))
    minmax, _ = quant_params(x, args)
    assert (clipped < 0.7 * minmax).all()  # the search stops at its widest clipping (40 %)...
    assert (kept > clipped).all()  # ... but not when the outlier's input matters


def common_factor_candidates():
    """The search before lo and hi were clipped apart: one factor p on both ends (its symmetric candidates)."""
    from ptqlab.quant.primitives import search_candidates

    return search_candidates(symmetric=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asymmetric_search_never_loses_to_a_common_clipping_factor(dtype):
    """Small blocks (16), skewed heavy tails: against float64 brute force, the search hits the optimum over its own
    candidates, and that optimum is at most the common factor's on every block (its candidates are among them)."""
    from ptqlab.quant.primitives import search_quant_params

    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16)
    torch.manual_seed(11)
    x = ((torch.distributions.StudentT(3).sample((32, 64)) + 0.5 * torch.rand(32, 64) ** 8 * 20) * 0.02).to(dtype)
    importance = torch.rand(64) + 0.1
    scale, zero_point = search_quant_params(x, args, importance=importance)
    ours = block_errors(x, scale, zero_point, args, importance)
    best = reference_search(x, args, importance, dtype)
    common = reference_search(x, args, importance, dtype, common_factor_candidates())
    assert (best <= common).all()  # a superset's minimum, both in float64
    assert torch.allclose(ours, best, rtol=1e-5, atol=0)  # fp32 error sums may flip a tie of candidates
    assert (ours <= common * (1 + 1e-5)).all()  # so what the search returns is no worse either, up to such a tie
    assert (best < common).sum() >= 0.15 * best.numel()  # skewed blocks: clipping one end alone often pays (27 %+)


def test_asymmetric_search_clips_only_the_outlier_end():
    """One big positive weight among small negatives, on an input that is barely active (importance 0.05): clipping
    hi alone (to 3/4) rounds the negatives on a finer grid at little cost; a common factor must clip the negatives
    too, so it barely moves from min-max. The separate search's error is clearly lower (0.74x in float64)."""
    from ptqlab.quant.primitives import search_quant_params

    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    x = torch.cat([-torch.linspace(0.0, 0.3, 31), torch.tensor([1.0])])[None]
    importance = torch.ones(32)
    importance[-1] = 0.05
    scale, zero_point = search_quant_params(x, args, importance=importance)
    ours = block_errors(x, scale, zero_point, args, importance)
    common = reference_search(x, args, importance, torch.float32, common_factor_candidates())
    assert ours < 0.8 * common
    approx = dequantize(quantize(x, scale, zero_point, args), scale, zero_point, args, torch.float64)
    assert approx.min() <= -0.3 + 0.5 * scale.double()  # lo kept: the most negative weight is not clipped
    assert approx.max() < 0.9  # hi clipped


@pytest.mark.parametrize("shape", [(256, 384), (10, 7), (130, 260)], ids=["whole blocks", "one partial block", "partial edges"])
@pytest.mark.parametrize("block", [(128, 128), (4, 3)])
def test_fp8_block_scales_are_each_blocks_absmax_and_the_error_is_within_fp8_rounding(shape, block):
    args = QuantArgs(num_bits=8, type="float", strategy="block", block_structure=block)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, shape[1])
    scale, zero_point = quant_params(x, args, torch.float32)
    rows, cols = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    assert scale.shape == (rows, cols) and zero_point is None
    x64 = x.double()
    for i in range(rows):
        for j in range(cols):
            tile = x64[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            assert scale[i, j].item() == pytest.approx(float(tile.abs().max() / 448), rel=1e-6)
    q = quantize(x, scale, zero_point, args)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    full = scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:shape[0], :shape[1]]
    error = (dequantize(q, scale, zero_point, args, torch.float64) - x64).abs()
    # E4M3: 3 mantissa bits (half a step is 2^-4 of the value), subnormal step 2^-9 of the scale
    assert (error <= x64.abs() * 2**-4 + full * 2**-10 + 1e-12).all()


def test_dynamic_token_group_quantization_has_one_scale_per_group_of_each_token():
    args = QuantArgs(num_bits=8, type="float", strategy="group", group_size=4, dynamic=True)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    out = fake_quantize(x, args)
    for group in range(2):
        part = x[..., 4 * group:4 * (group + 1)]
        scale = part.abs().amax(-1, keepdim=True) / 448
        expected = (part / scale).to(FP8_DTYPE).float() * scale
        assert torch.equal(out[..., 4 * group:4 * (group + 1)], expected)
