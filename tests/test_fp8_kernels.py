"""The kernels of block-wise FP8 and W4A8 (runtime/fp8_kernels.py, and the one-row int4 kernel on FP8 input) on CPU
through Triton's interpreter, against float64 references; and which layers the runtime gives them.

As in test_triton_interpreter.py, the kernel tests run in a fresh `python -m pytest` with TRITON_INTERPRET=1 (Triton
reads it when the kernel modules are first imported): `test_fp8_kernels_under_the_interpreter` starts it, and here
they are skipped. To run them directly: TRITON_INTERPRET=1 python -m pytest tests/test_fp8_kernels.py

The interpreter's own fp32 -> float8e4nv conversion drops the carry into the exponent; `fp8_kernels.to_fp8` rounds
exactly in fp32 first there, so the activation quantizer is checked bitwise here (the other kernels' FP8 grids are
still GPU-only, see test_triton_interpreter.py). tl.dot is a numpy matmul here: the tensor cores' rounding (FP8 tiles
accumulate with reduced precision on Hopper) is checked on the GPU (tests/test_runtime.py, bench/format_kernels.py
--check).

Error bounds. Every product q_x q_w is exact in fp32 (FP8 x FP8 and FP8 x int4 have at most 8 significant bits), so
for each output the kernels' error is fp32 rounding only: a K tile's sum of 128 products, its product with two
scales, the sum over K / 128 tiles and over the K splits, each at most one unit roundoff u = 2^-24 of the running
magnitude. So |y - y_exact| <= (128 + K / 128 + splits + 3) u Σ_k |x_k w_k| (+ the output's own rounding), which the
tests check elementwise with room: 1e-5 Σ|x w| for K <= 1024 (at most 150 u ~ 9e-6 of it is reachable). The one-row
int4 kernel sums biased terms (1 + u/16 and 16 (1 + u/256) times x, then removes 24 x and 264 x per group), up to
about 300 |x| s per input instead of |x w|, so its bound is 300 times looser: 3e-3 Σ_k |x_k| s_k.
"""

import pytest
import torch
from interpreter import interpreted as interpreted_in, run_under_interpreter, starts_interpreter

from ptqlab.quant.linear import rtn
from ptqlab.quant.primitives import dequantize, fake_quantize
from ptqlab.schemes import QuantArgs, Scheme

interpreted = interpreted_in("test_fp8_kernels_under_the_interpreter")
ACT_GROUPS = QuantArgs(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True)
ACT_TOKENS = QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True)
FP8_BLOCKS = QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(128, 128))
INT4_GROUPS = QuantArgs(num_bits=4, strategy="group", group_size=128)
U = 2.0 ** -24


@starts_interpreter
def test_fp8_kernels_under_the_interpreter(tmp_path):
    """This file's kernel tests, in a fresh process whose Triton interprets the kernels on CPU."""
    run_under_interpreter(__file__, tmp_path)


# ---- references ------------------------------------------------------------------------------------------------

def fp8_grid(x, group):
    """x [M, K] on an FP8 grid per `group` columns as the kernels (and torch on a GPU) compute it: scale = absmax
    times the fp32 reciprocal of 448, clamped; x / scale cast to FP8 (torch rounds to nearest even) -> (q [M, K]
    float8, scale [M, K / group] fp32)."""
    info = torch.finfo(torch.float32)
    blocks = x.float().unflatten(-1, (-1, group))
    reciprocal = torch.tensor(1.0) / torch.tensor(448.0)
    scale = (blocks.abs().amax(-1, keepdim=True) * reciprocal).clamp(info.tiny, info.max)
    q = (blocks / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale.squeeze(-1)


def exact(q, scale, group):
    """Grid values times their scales in float64 (exact)."""
    return (q.double().unflatten(-1, (-1, group)) * scale.double().unsqueeze(-1)).flatten(-2)


def activations(rows, k, seed=0, dtype=torch.float32):
    """Rows of varied size with an all-zero group and an outlier column."""
    torch.manual_seed(seed)
    x = torch.randn(rows, k) * (torch.rand(rows, 1) * 4 + 0.1)
    x[0, :128] = 0
    x[-1, 5] *= 30
    return x.to(dtype)


def fp8_block_layer(n, k, seed=1):
    torch.manual_seed(seed)
    q, scale, _ = rtn(torch.randn(n, k) * 0.05, FP8_BLOCKS, torch.float16)
    return q, scale, dequantize(q, scale, None, FP8_BLOCKS, torch.float64)


def int4_layer(n, k, group, seed=2):
    from ptqlab.runtime import int4_kernels

    torch.manual_seed(seed)
    args = QuantArgs(num_bits=4, strategy="group", group_size=group) if group else QuantArgs(num_bits=4)
    q, scale, _ = rtn(torch.randn(n, k) * 0.05, args, torch.float16)
    return int4_kernels.int4_planes(q, 16), scale, dequantize(q, scale, None, args, torch.float64)


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def within(y, reference, magnitude, bound, out_dtype=torch.float32):
    """|y - reference| <= bound * magnitude + the output's rounding (half a unit in the last place of out_dtype)."""
    rounding = torch.finfo(out_dtype).eps / 2 * reference.abs()
    excess = (y.double() - reference).abs() - bound * magnitude - rounding
    return float(excess.max()) <= 0, float(((y.double() - reference).abs() / magnitude.clamp(min=1e-30)).max())


# ---- the activation quantizer -----------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_group_quantizer_puts_each_group_on_its_fp8_grid(dtype):
    """quantize_groups gives the grid values and scales bitwise (scale tensor column-major); primitives'
    fake_quantize on a CPU divides by 448 where the kernels (and torch on a GPU) multiply by its fp32 reciprocal, so
    a value at a rounding boundary may land on the neighbouring FP8 value: at most one step (1/8 of the value's
    binade, 2^-9 scales below 2^-6) apart."""
    from ptqlab.runtime import fp8_kernels

    x = activations(5, 384, dtype=dtype)
    q, scale = fp8_kernels.quantize_groups(x)
    expected_q, expected_scale = fp8_grid(x, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, 384) and scale.shape == (5, 3)
    assert scale.stride() == (1, 5)
    assert torch.equal(q.float(), expected_q.float()) and torch.equal(scale, expected_scale)
    fake = exact(q, scale, 128)
    step = (fake.abs() / 8).clamp(min=2.0 ** -9 * scale.double().repeat_interleave(128, -1))
    assert ((fake - fake_quantize(x.float(), ACT_GROUPS).double()).abs() <= step * 1.01).all()


@interpreted
def test_fp8_rounding_carries_into_the_exponent_and_ties_to_even():
    """A group whose absmax is 448 has scale 1 exactly, so its values are rounded as given: 31.6 carries into the next
    binade (32), 17 and 19 are ties (16 and 20: even mantissas), 2^-10 and 3 2^-10 are subnormal ties (0 and 2^-8),
    0.001 rounds up to the smallest subnormal 2^-9; every value as torch's own conversion rounds it."""
    from ptqlab.runtime import fp8_kernels

    values = torch.tensor([448.0, 31.6, -31.6, 17.0, 19.0, 2.0 ** -10, 3 * 2.0 ** -10, 0.001, -0.0029, 447.0, 0.2,
                           -5.5, 239.9, 0.0, 1e-8, 100.0])
    x = torch.zeros(1, 128)
    x[0, :16] = values
    q, scale = fp8_kernels.quantize_groups(x)
    assert scale.item() == 1.0
    assert torch.equal(q.float(), x.to(torch.float8_e4m3fn).float())
    assert q[0, :8].float().tolist() == [448.0, 32.0, -32.0, 16.0, 20.0, 0.0, 2.0 ** -8, 2.0 ** -9]


# ---- block-wise FP8 ---------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("rows,n,k", [(1, 136, 1024), (5, 200, 256), (16, 128, 384), (20, 384, 256), (70, 136, 256)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fp8_block_matmul_against_float64(rows, n, k, out_dtype):
    """x from quantize_groups; up to 16 rows tiles of 16 rows with fp16 products (K split in two at 1 x 136 x 1024
    on one multiprocessor), one row also on CUDA cores (fp8_block_gemv, split too); 20 and 70 rows tiles of 64 and
    128 rows with FP8 products. N off the 128-row weight blocks (136, 200: a partial block of scales) and off the
    tiles; bias added once."""
    from ptqlab.runtime import fp8_kernels

    x = activations(rows, k, seed=rows)
    w_q, w_scale, weight = fp8_block_layer(n, k)
    bias = torch.randn(n, dtype=out_dtype)
    q, scale = fp8_grid(x, 128)
    reference = exact(q, scale, 128) @ weight.T + bias.double()
    magnitude = exact(q, scale, 128).abs() @ weight.abs().T
    grid = fp8_kernels.quantize_groups(x)
    outputs = [fp8_kernels.fp8_block_matmul(*grid, w_q, w_scale, 128, bias, out_dtype)]
    if rows == 1:
        outputs.append(fp8_kernels.fp8_block_gemv(*grid, w_q, w_scale, 128, bias, out_dtype))
    for y in outputs:
        assert y.dtype == out_dtype and y.shape == (rows, n)
        ok, worst = within(y, reference, magnitude + bias.double().abs(), 1e-5, out_dtype)
        assert ok, worst


# ---- W4A8 -------------------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("rows,n,k,group", [(1, 72, 1024, 128), (3, 136, 256, 128), (16, 384, 512, 256),
                                            (40, 200, 384, None)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_w4a8_matmul_against_float64(rows, n, k, group, out_dtype):
    """Int4 planes turned FP8 in registers, FP8 x FP8 (fp16 below 17 rows) per K tile times the group scale, the
    token's scale at the end: groups of 128 and 256 and one scale per row (None), K split (1 x 72 x 1024), N off the
    tiles."""
    from ptqlab.runtime import fp8_kernels

    x = activations(rows, k, seed=rows)
    planes, w_scale, weight = int4_layer(n, k, group)
    bias = torch.randn(n, dtype=out_dtype)
    q, scale = fp8_grid(x, k)
    inputs = exact(q, scale, k)
    y = fp8_kernels.w4a8_matmul(q, scale, planes, w_scale, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (rows, n)
    ok, worst = within(y, inputs @ weight.T + bias.double(), inputs.abs() @ weight.abs().T + bias.double().abs(), 1e-5,
                       out_dtype)
    assert ok, worst


@interpreted
def test_int4_planes_become_their_fp8_grid_values():
    """The prefill path's scratch weight: every int4 value of the planes as FP8, exactly, in input order."""
    from ptqlab.runtime import fp8_kernels, int4_kernels

    q = torch.randint(-8, 8, (24, 384), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    weight = fp8_kernels.int4_to_fp8(int4_kernels.int4_planes(q, 16), 384)
    assert weight.dtype == torch.float8_e4m3fn and torch.equal(weight.float(), q.float())


@interpreted
@pytest.mark.parametrize("n,k,tile", [(200, 256, (8, 512, 4)), (8, 1024, (8, 8, 1))])
def test_one_row_int4_kernel_on_the_fp8_grid_is_the_fake_quantized_product(n, k, tile):
    """W4A8 decode: the one-row int4 kernel reads the FP8 grid values and multiplies its fp32 sums by the token's
    scale. That is W4A16's kernel on the fake-quantized row q s (primitives.fake_quantize's per-token grid), up to
    fp32 rounding: both within the int4 kernel's bound of the float64 product (a tile across two groups; tiles
    inside a group, K split in 2, at 8 x 1024)."""
    from ptqlab.runtime import int4_kernels

    x = activations(1, k, seed=n)
    planes, w_scale, weight = int4_layer(n, k, 128)
    q, scale = fp8_grid(x, k)
    inputs = exact(q, scale, k)
    reference = inputs @ weight.T
    magnitude = inputs.abs() @ w_scale.double().repeat_interleave(128, -1).T
    on_grid = int4_kernels.int4_gemv(q, planes, w_scale, None, tile, x_scale=scale, out_dtype=torch.float32)
    fake = int4_kernels.int4_gemv(inputs.float(), planes, w_scale, None, tile)
    assert on_grid.dtype == torch.float32 and on_grid.shape == (1, n)
    for y in (on_grid, fake):
        ok, worst = within(y, reference, magnitude, 3e-3)
        assert ok, worst


# ---- the runtime's layers ---------------------------------------------------------------------------------------

@interpreted
def test_runtime_layers_compute_the_formats():
    """Fp8BlockLinear and W4A8Linear from build_linear (CPU tensors, interpreted), [batch, tokens, K] in and out: a
    decode step and a prefill each; W4A8 takes its input already on the per-token grid, as the fused norm hands it
    over (the interpreter cannot run the per-token quantizer's FP8 conversion)."""
    from ptqlab.quant.token_triton import QuantizedRows
    from ptqlab.runtime import linear

    torch.manual_seed(3)
    w = torch.randn(136, 256) * 0.05
    bias = torch.randn(136)
    for scheme in (Scheme(FP8_BLOCKS, ACT_GROUPS), Scheme(INT4_GROUPS, ACT_TOKENS)):
        q, scale, _ = rtn(w, scheme.weights, torch.float16)
        reference = linear.build_linear(linear.StoredLinear(q, bias, scheme, scale), torch.float32)
        assert reference.kernel == "dequantized"  # CPU tensors: fake-quantized x times the dequantized weight
        w4a8 = scheme.weights.type == "int"
        fast = (linear.W4A8Linear(q, scale, bias, torch.float32, (8, 512, 4), pdl=False) if w4a8 else
                linear.Fp8BlockLinear(q, scale, 128, bias, torch.float32, fast_accum=True, pdl=False))
        for tokens in (1, 24):
            x = activations(2 * tokens, 256, seed=tokens).reshape(2, tokens, 256)[:1 if tokens == 1 else 2]
            if w4a8:
                y = fast(QuantizedRows(*fp8_grid(x.reshape(-1, 256), 256), x.shape))
            else:
                y = fast(x)
            assert y.shape == (*x.shape[:-1], 136)
            # fake_quantize on a CPU may put a boundary value one FP8 step away from the kernels' grid (see above).
            assert relative(y, reference(x)) < 1e-4


def test_kernel_choice_follows_the_format(monkeypatch):
    """On a GPU, fp8-block and w4a8 take their kernels where the tiles fit (K a multiple of 128, weight block width =
    activation group = 128; int4 groups a multiple of 128, symmetric) and the dequantized reference elsewhere; the
    layer names its kernel for reports."""
    from ptqlab.runtime import linear

    monkeypatch.setattr(linear.triton_support, "available", lambda tensor: True)

    def kernel(scheme, n=256, k=384):
        q, scale, zero = rtn(torch.randn(n, k) * 0.05, scheme.weights, torch.float16)
        return linear._kernel_for(linear.StoredLinear(q, None, scheme, scale, zero))

    fp8_block, w4a8 = Scheme(FP8_BLOCKS, ACT_GROUPS), Scheme(INT4_GROUPS, ACT_TOKENS)
    assert kernel(fp8_block) == "fp8-block" and kernel(fp8_block, n=200) == "fp8-block"
    assert kernel(w4a8) == "w4a8" and kernel(Scheme(QuantArgs(num_bits=4), ACT_TOKENS)) == "w4a8"
    assert kernel(fp8_block, k=320) is None  # K off the 128-column tiles (group 64 activations)
    assert kernel(Scheme(QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(128, 64)),
                         QuantArgs(num_bits=8, type="float", strategy="group", group_size=64, dynamic=True))) is None
    assert kernel(Scheme(QuantArgs(num_bits=4, strategy="group", group_size=64), ACT_TOKENS)) is None
    assert kernel(Scheme(QuantArgs(num_bits=4, strategy="group", group_size=128, symmetric=False), ACT_TOKENS)) is None
    assert kernel(Scheme(QuantArgs(num_bits=4), ACT_TOKENS), k=320) is None
    q, scale, _ = rtn(torch.randn(256, 384) * 0.05, INT4_GROUPS, torch.float16)
    built = linear.build_linear(linear.StoredLinear(q, None, w4a8, scale), torch.bfloat16)
    assert isinstance(built, linear.W4A8Linear) and built.kernel == "w4a8 triton"
    q, scale, _ = rtn(torch.randn(256, 384) * 0.05, FP8_BLOCKS, torch.float16)
    built = linear.build_linear(linear.StoredLinear(q, None, fp8_block, scale), torch.bfloat16)
    assert isinstance(built, linear.Fp8BlockLinear) and built.kernel == "fp8-block triton"


def test_the_stored_formats_row_decides_which_kernels_may_run(monkeypatch):
    """A kernel runs a layer only where its stored format's row (number_formats.FORMATS) lists it: with the
    pack-quantized row's `runtime_kernels` emptied, an int4 layer that fits the int4 kernel is dequantized instead."""
    from dataclasses import replace

    from ptqlab import number_formats
    from ptqlab.runtime import linear

    monkeypatch.setattr(linear.triton_support, "available", lambda tensor: True)
    scheme = Scheme(QuantArgs(num_bits=4, strategy="group", group_size=128))
    q, scale, zero = rtn(torch.randn(256, 384) * 0.05, scheme.weights, torch.float16)
    layer = linear.StoredLinear(q, None, scheme, scale, zero)
    assert linear._kernel_for(layer) == "int4"
    rows = tuple(replace(f, runtime_kernels=()) if "int4" in f.runtime_kernels else f for f in number_formats.FORMATS)
    monkeypatch.setattr(number_formats, "FORMATS", rows)
    assert linear._kernel_for(layer) is None
