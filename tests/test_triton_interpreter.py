"""The Triton kernels' logic on CPU, through Triton's interpreter (TRITON_INTERPRET=1), against the pure-torch
references they stand in for (primitives, the runtime's torch path, GPTQ's plain loop). Small shapes, fp16 and
fp32 (see below for bf16), fixed seeds.

How it runs: Triton reads TRITON_INTERPRET when it decorates a kernel, i.e. when ptqlab's kernel modules are first
imported, so the suite's process (which has imported them already) cannot switch. `test_kernels_under_the_interpreter`
runs this file again in a fresh `python -m pytest` with TRITON_INTERPRET=1: there the kernel tests below run, and
here they are skipped. To run them directly: TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpreter.py

Every ptqlab kernel runs under the interpreter of Triton 3.9, FP8 grids aside (below); older interpreters stop
earlier (Triton 3.6 on any loop whose bound is a kernel argument), so the test skips itself below 3.9:
- runtime/int4_kernels.py: the one-row int4 matmul (plain and gated, split K, tiles across and inside scale groups), the
  split-K sum (plain and gated), the 2-16-row int4 matmul (tl.dot), int4 dequantization, the INT8 epilogue;
- runtime/fused.py: RMSNorm (residual add, Gemma's offset, INT8 output), rotary + cache write, the gated activation
  (plain, paired, INT8 output), decode attention (softcap, window, fused rotary), greedy argmax;
- quant/token_triton.py (the INT8 grid), quant/search_triton.py, quant/gptq_triton.py (int grids).

What the interpreter cannot run, and what the kernels do about it:
- inline PTX (`tl.inline_asm_elementwise`, the LOP3 of the one-row int4 kernel's `_nibble_pair`): NotImplementedError.
  The kernel's interpreted branch computes the same bits with Triton's and / or.
- grid dependency control (`gdc_wait`, `gdc_launch_dependents` in `await_inputs`: programmatic dependent launch):
  extern calls the interpreter has no implementation for. `pdl_launch` turns PDL on only for CUDA devices, so the
  interpreter never reaches them; PDL itself is tested on the GPU only.
- CUDA libdevice (`rint`, `div_rn` in the GPTQ, scale-search and per-token kernels): "extern_elementwise not supported".
  Under the interpreter `triton_support.libdevice` provides both from Triton's own operations, with the same values.
- a scalar comparison broadcast over a block as a load mask (the one-row kernel's next-tile mask, the small-M
  kernel's last-split mask): the interpreter turns it into int32, which tl.load rejects. Both kernels build the same
  mask as a block when interpreted.
- bf16 rounding: the interpreter truncates fp32 -> bf16 instead of rounding to nearest even, so these tests use fp16
  and fp32 (the scale search's bf16 scale storage is left to the GPU tests).
- FP8 rounding: the interpreter's fp32 -> float8e4nv conversion drops the carry into the exponent when the mantissa
  rounds up (31.6 gives 16 instead of 32), so the FP8 variants (the per-token quantizer's FP8 grid, the norm's and
  activation's FP8 output, GPTQ's FP8 block) are skipped here, with that reason, and tested on the GPU.
Cache and eviction hints are accepted and ignored, and tl.dot is a numpy matmul: these tests check the kernels'
indexing, masks and arithmetic, not their speed or the tensor cores' rounding. CUDA graphs, `torch._scaled_mm` and
`torch._int_mm` are not Triton: GPU tests only (tests/test_runtime.py, tests/test_gptq.py).
"""

import pytest
import torch
import torch.nn.functional as F

from interpreter import interpreted as interpreted_in, run_under_interpreter, starts_interpreter

from ptqlab.quant.linear import rtn
from ptqlab.quant.primitives import dequantize
from ptqlab.schemes import QuantArgs

interpreted = interpreted_in("test_kernels_under_the_interpreter")
FP8_ROUNDING = ("Triton 3.9's interpreter rounds fp32 -> float8e4nv without carrying into the exponent (31.6 becomes "
                "16, not 32): FP8 grids are tested on the GPU")


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@starts_interpreter
def test_kernels_under_the_interpreter(tmp_path):
    """This file's kernel tests, in a fresh process whose Triton interprets the kernels on CPU."""
    run_under_interpreter(__file__, tmp_path)


# ---- runtime/int4_kernels.py: int4 weights ------------------------------------------------------------------------

def int4_layer(n, k, group, symmetric, dtype, seed=0):
    """An RTN-quantized int4 layer, its runtime planes, and its dequantized weight in fp32 (exact: small integers
    times fp16 scales)."""
    from ptqlab.runtime import int4_kernels

    torch.manual_seed(seed)
    args = QuantArgs(num_bits=4, strategy="group" if group else "channel", group_size=group, symmetric=symmetric)
    q, scale, zero = rtn(torch.randn(n, k), args, dtype)
    planes = int4_kernels.int4_planes(q, int4_kernels.plane_words(k, group or k))
    return q, scale, zero, planes, dequantize(q, scale, zero, args, torch.float32), args


INT4_LAYERS = [(24, 256, 128, True), (20, 256, 64, False), (16, 384, 32, True), (8, 1024, None, True),
               (20, 96, 48, False)]
"""(N, K, group or None for one scale per row, symmetric): row tails against the tiles, planes of 16, 8, 4 and 6
words, zero points."""


@interpreted
@pytest.mark.parametrize("n,k,group,symmetric", INT4_LAYERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_dequantize_is_primitives_dequantize(n, k, group, symmetric, dtype):
    from ptqlab.runtime import int4_kernels

    q, scale, zero, planes, _, args = int4_layer(n, k, group, symmetric, dtype)
    assert torch.equal(int4_kernels.int4_dequantize(planes, scale, zero, k, dtype), dequantize(q, scale, zero, args, dtype))


@interpreted
@pytest.mark.parametrize("n,k,group,symmetric", INT4_LAYERS)
@pytest.mark.parametrize("tile", [(8, 512, 4), (8, 8, 1), (16, 32, 2)])  # the default, and tiles inside / across groups
def test_int4_gemv_against_float64(n, k, group, symmetric, tile):
    """One row. The tiles cover whole groups, lie inside one (8 words of a 16-word group), or cover K at once; with
    one multiprocessor (CPU) the narrow layers also split K across programs and sum the splits."""
    from ptqlab.runtime import int4_kernels

    _, scale, zero, planes, weight, _ = int4_layer(n, k, group, symmetric, torch.float16)
    words = min(tile[1], 1 << (k // 8 - 1).bit_length())  # a tile's words, as int4_gemv narrows them to the row
    group_words = (group or k) // 8
    if group_words < k // 8 and words % group_words and group_words % words:
        with pytest.raises(ValueError, match="do not line up"):
            int4_kernels.int4_gemv(torch.randn(1, k), planes, scale, zero, tile)
        return
    # fp32: the kernel sums 1 + u/16 and 1 + u/256 (no int-to-float conversion) and subtracts the offsets per
    # group, which costs a few bits of fp32; fp16: the output's rounding.
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 1e-3)):
        x = torch.randn(1, k, dtype=dtype)
        y = int4_kernels.int4_gemv(x, planes, scale, zero, tile)
        assert y.dtype == dtype and y.shape == (1, n)
        assert relative(y, x.double() @ weight.double().T) < tolerance


@interpreted
# numpy's exp overflows in GELU's sigmoid for large negative inputs; the sigmoid is then 0, which is right
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("inner,k,tile", [(16, 256, (16, 32, 2)), (8, 512, (16, 16, 1)), (32, 128, (8, 512, 4))])
@pytest.mark.parametrize("gelu", [False, True])
def test_int4_gemv_applies_the_gated_activation(inner, k, tile, gelu):
    """Paired gate_up rows: act(gate) * up of the matmul's output, each half rounded to the activation dtype first,
    in the one-row kernel or (when K is split: 8 x 512 here) in the split-sum kernel."""
    from ptqlab.runtime import int4_kernels, kernels

    _, scale, zero, planes, weight, _ = int4_layer(2 * inner, k, 128, False, torch.float16, seed=inner)
    x = torch.randn(1, k, dtype=torch.float16)
    gate, up = (x.double() @ weight.double().T).to(torch.float16).float().chunk(2, -1)
    expected = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    paired = [kernels.pair_gate_up(t) for t in (planes, scale, zero)]
    y = int4_kernels.int4_gemv(x, *paired, tile, gated="gelu" if gelu else "silu")
    assert y.shape == (1, inner) and relative(y, expected) < 2e-3  # fp16 rounding of gate, up and the result


@interpreted
@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("n,k,group,symmetric", [(24, 512, 128, True), (40, 256, 128, False), (8, 1024, None, True)])
def test_int4_matmul_small_m_against_float64(rows, n, k, group, symmetric):
    """2-16 rows on tl.dot tiles of 16 words of a group; K split in two or more (one multiprocessor)."""
    from ptqlab.runtime import int4_kernels

    _, scale, zero, planes, weight, _ = int4_layer(n, k, group, symmetric, torch.float16)
    x = torch.randn(rows, k, dtype=torch.float16)
    y = int4_kernels.int4_matmul_small_m(x, planes, scale, zero)
    assert y.dtype == torch.float16 and y.shape == (rows, n)
    assert relative(y, x.double() @ weight.double().T) < 1e-3  # x rounded to fp16 on entry; fp16 output


def checkpoint_int4_layer(n, k, group, dtype):
    """An asymmetric int4 layer as the runtime reads it from a compressed-tensors checkpoint (zero points packed along
    the output dimension, formats/compressed_tensors.py) -> (StoredLinear, its dequantized weight in fp32)."""
    from ptqlab.formats.compressed_tensors import _linear_tensors
    from ptqlab.quant.linear import QuantizedLinear
    from ptqlab.runtime.load import stored_linear
    from ptqlab.schemes import Scheme

    torch.manual_seed(n + k)
    scheme = Scheme(QuantArgs(num_bits=4, strategy="group", group_size=group, symmetric=False))
    layer = QuantizedLinear.from_weight(torch.randn(n, k).to(dtype), None, scheme)
    stored = stored_linear(_linear_tensors("layer", layer), "layer", scheme)
    return stored, dequantize(stored.weight, stored.scale, stored.zero_point, scheme.weights, torch.float32)


@interpreted
@pytest.mark.parametrize("rows", [1, 3, 40])  # one-row kernel, tl.dot tiles, dequantize + matmul
def test_int4_kernels_read_a_checkpoints_zero_points(rows):
    """An asymmetric int4 layer loaded from a checkpoint (its zero points unpacked along dim 0) computes through
    Int4Linear what its dequantized weight computes: the kernels must not read the unpacked view's transposed
    strides as the groups of a row (the 27 int4 parts of the mixed int2 lab once went wrong on the GPU this way)."""
    from ptqlab.runtime.kernels import RuntimeOptions
    from ptqlab.runtime.linear import Int4Linear

    stored, weight = checkpoint_int4_layer(48, 512, 128, torch.float16)
    layer = Int4Linear(stored.weight, stored.scale, stored.zero_point, None, RuntimeOptions.gemv_tile, pdl=False)
    x = torch.randn(rows, 512, dtype=torch.float16)
    assert relative(layer(x), x.double() @ weight.double().T) < 1e-3


@interpreted
def test_int4_kernels_refuse_a_transposed_zero_point():
    from ptqlab.runtime import int4_kernels

    stored, _ = checkpoint_int4_layer(48, 512, 128, torch.float16)
    planes = int4_kernels.int4_planes(stored.weight, int4_kernels.plane_words(512, 128))
    transposed = stored.zero_point.T.contiguous().T
    assert torch.equal(transposed, stored.zero_point) and transposed.stride(-1) != 1
    for call in (lambda: int4_kernels.int4_dequantize(planes, stored.scale, transposed, 512, torch.float16),
                 lambda: int4_kernels.int4_gemv(torch.randn(1, 512, dtype=torch.float16), planes, stored.scale, transposed),
                 lambda: int4_kernels.int4_matmul_small_m(torch.randn(3, 512, dtype=torch.float16), planes, stored.scale,
                                                     transposed)):
        with pytest.raises(ValueError, match="row-major zero_point"):
            call()


@interpreted
@pytest.mark.parametrize("has_bias", [False, True])
def test_int8_epilogue_scales_the_int32_product(has_bias):
    """acc * x_scale[m] * w_scale[n] (+ bias) in fp32, rounded once: bitwise torch's fp32 arithmetic, padding rows
    dropped."""
    from ptqlab.runtime import kernels

    torch.manual_seed(1)
    acc = torch.randint(-2**20, 2**20, (32, 136), dtype=torch.int32)
    x_scale, w_scale = torch.rand(32, 1) * 1e-3, torch.rand(1, 136) * 1e-2
    bias = torch.randn(136, dtype=torch.float16) if has_bias else None
    y = kernels.int8_epilogue(acc, x_scale, w_scale, bias, 5, torch.float16)
    expected = acc[:5].float() * x_scale[:5] * w_scale + (bias.float() if has_bias else 0)
    assert y.shape == (5, 136) and torch.equal(y, expected.to(torch.float16))


# ---- quant/: per-token quantization, scale search, GPTQ's block ---------------------------------------------------

def token_grid(name):
    """The runtime's per-token grid and the QuantArgs that primitives.fake_quantize takes for it."""
    from ptqlab.quant import token_triton

    if name == "fp8":
        return token_triton.FP8_TOKENS, QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True)
    return token_triton.INT8_TOKENS, QuantArgs(num_bits=8, strategy="token", dynamic=True)


def tokens(dtype, rows=5, columns=96, seed=8):
    """Activations with an all-zero token and an outlier channel."""
    torch.manual_seed(seed)
    x = (torch.randn(rows, columns) * torch.rand(rows, 1) * 10).to(dtype)
    x[0] = 0
    x[1:, 5] *= 50
    return x


def reference_tokens(x, grid):
    """The per-token grid as the kernels define it (and as torch computes it on a GPU, where it divides by a Python
    number through its fp32 reciprocal): scale = absmax * fp32(1 / half_range), clamped; x / scale rounded half to
    even (int8) or cast (FP8) -> (q, scale, dequantized in x.dtype)."""
    info = torch.finfo(torch.float32)
    reciprocal = torch.tensor(1.0) / torch.tensor(grid.half_range)
    scale = (x.float().abs().amax(-1, keepdim=True) * reciprocal).clamp(info.tiny, info.max)
    scaled = (x.float() / scale).clamp(grid.qmin, grid.qmax)
    q = scaled.to(torch.float8_e4m3fn).float() if grid.is_fp8 else scaled.round()
    return q, scale, (q * scale).to(x.dtype)


GRIDS = ["int8", pytest.param("fp8", marks=pytest.mark.skip(reason=FP8_ROUNDING))]


@interpreted
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_token_quantizer_puts_each_token_on_its_grid(grid, dtype):
    """quantize_tokens gives the grid values and scales bitwise, zero-padded to rows_out; fake_quantize_tokens their
    product. primitives.fake_quantize on a CPU divides by the half range where the kernels (and torch on a GPU)
    multiply by its fp32 reciprocal, so its scales may differ in the last bit and a value at a rounding boundary
    land on the neighbouring grid point: at most one step (and the output's rounding) apart."""
    from ptqlab.quant import token_triton
    from ptqlab.quant.primitives import fake_quantize

    grid, args = token_grid(grid)
    x = tokens(dtype)
    q, scale, fake = reference_tokens(x, grid)
    rows = token_triton.quantize_tokens(x, grid, rows_out=8)
    assert rows.q.dtype == grid.dtype and rows.q.shape == (8, 96) and rows.scale.shape == (8, 1)
    assert torch.equal(rows.q[:5].float(), q) and torch.equal(rows.scale[:5], scale)
    assert not rows.q[5:].float().any() and not rows.scale[5:].any()
    assert torch.equal(token_triton.fake_quantize_tokens(x, grid), fake)
    assert ((fake.float() - fake_quantize(x, args).float()).abs() <= 1.1 * scale).all()


@interpreted
@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=4, strategy="group", group_size=32), QuantArgs(num_bits=4, symmetric=False, strategy="group",
                                                                     group_size=128),
    QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16),
    QuantArgs(num_bits=2, symmetric=False, strategy="group", group_size=64),
    QuantArgs(num_bits=3, strategy="group", group_size=64), QuantArgs(num_bits=8, strategy="channel"),
], ids=["int4-g32", "int4-asym-g128", "int4-asym-g16", "int2-asym-g64", "int3-g64", "int8-channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scale_search_matches_the_torch_loop(args, dtype, monkeypatch):
    """search_quant_params through the kernel against its torch loop (as the GPU test does). On a CPU torch divides
    the range by the half range in IEEE division, as the kernel does, so the scales agree bitwise, except where the
    error sums (run in another order) flip a choice between candidates that tie to fp32 rounding: one block at most.
    The weights are skewed (a positive tail), so asymmetric grids take candidates that clip lo and hi apart."""
    from ptqlab.quant import search_triton
    from ptqlab.quant.primitives import search_quant_params

    torch.manual_seed(7)
    weight = ((torch.distributions.StudentT(3).sample((16, 256)) + 10 * torch.rand(16, 256) ** 8) * 0.02).to(dtype)
    importance = torch.rand(256) + 0.1
    plain = search_quant_params(weight, args, importance=importance)
    monkeypatch.setattr(search_triton, "available", lambda x, block, scale_dtype: True)  # CPU tensors, interpreted
    fused = search_quant_params(weight, args, importance=importance)
    assert fused[0].dtype == plain[0].dtype and fused[0].shape == plain[0].shape
    assert (fused[0] != plain[0]).sum() <= 1
    if args.symmetric:
        assert fused[1] is None and plain[1] is None
    else:
        assert (fused[1] != plain[1]).sum() <= 1


@interpreted
@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=4, strategy="group", group_size=32), QuantArgs(num_bits=4, symmetric=False, strategy="group",
                                                                     group_size=32),
    QuantArgs(num_bits=8, strategy="channel"),
    pytest.param(QuantArgs(num_bits=8, type="float", strategy="channel"), marks=pytest.mark.skip(reason=FP8_ROUNDING)),
], ids=["int4-g32", "int4-asym", "int8-channel", "fp8-channel"])
def test_gptq_block_kernel_matches_the_plain_loop(args, monkeypatch):
    """gptq() with its blocks through the kernel against its plain loop (as the GPU test does): the same scales, and
    the same grid values except where fp32 reassociation flips a near-tie (two of 1024 at most)."""
    from ptqlab.quant import gptq_triton
    from ptqlab.quant.gptq import GPTQConfig, gptq

    generator = torch.Generator().manual_seed(4)
    mixing = torch.randn(64, 64, generator=generator) / 8
    x = torch.randn(512, 64, generator=generator) @ (torch.eye(64) + 2 * mixing)
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(16, 64, generator=generator) * 0.05
    config = GPTQConfig(block_size=32, act_order=True)
    plain = gptq(weight, hessian, args, config)
    monkeypatch.setattr(gptq_triton, "available", lambda tensor: True)  # CPU tensors, interpreted
    fused = gptq(weight, hessian, args, config)
    assert (fused.q != plain.q).sum() <= 2
    assert torch.equal(fused.scale, plain.scale)


@interpreted
def test_gptq_block_kernel_takes_a_batch_of_matrices(monkeypatch):
    """The block kernel over B matrices (one per program column) gives each what it gives that matrix alone."""
    from ptqlab.quant import gptq_triton

    generator = torch.Generator().manual_seed(5)
    weights = torch.randn(3, 12, 32, generator=generator)
    hinv = torch.linalg.cholesky(torch.eye(32) + 0.1 * torch.ones(32, 32), upper=True).expand(3, 32, 32) * \
        torch.tensor([1.0, 0.5, 2.0])[:, None, None]
    scale = torch.full((3, 12, 32), 0.3)
    q, err = gptq_triton.gptq_block(weights, hinv, scale, None, -8.0, 7.0, False)
    for b in range(3):
        q1, err1 = gptq_triton.gptq_block(weights[b:b + 1], hinv[b:b + 1], scale[b:b + 1], None, -8.0, 7.0, False)
        assert torch.equal(q[b], q1[0]) and torch.equal(err[b], err1[0])
    assert not torch.equal(err[0], err[1])  # each matrix read its own inverse Hessian


# ---- runtime/fused.py: the work between the matmuls ---------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fused_norm_matches_the_torch_path(offset):
    """RMSNorm with the residual add (Llama's w * round(x̂), Gemma's (1 + w) x̂); with a grid, bitwise the per-token
    quantizer applied to its 16-bit output."""
    from ptqlab.quant import token_triton
    from ptqlab.runtime import fused
    from ptqlab.runtime.model import rms_norm

    torch.manual_seed(0)
    x, r = torch.randn(6, 96, dtype=torch.float16), torch.randn(6, 96, dtype=torch.float16)
    w = torch.randn(96, dtype=torch.float16)
    y, stream = fused.rms_norm(x, w, 1e-6, offset, residual=r)
    assert torch.equal(stream, x + r)
    assert relative(y, rms_norm(x + r, w, 1e-6, offset)) < 1e-3  # fp32 inside, one rounding (torch rounds more often)
    grid = token_triton.INT8_TOKENS  # FP8: see FP8_ROUNDING
    rows, _ = fused.rms_norm(x, w, 1e-6, offset, residual=r, grid=grid, rows_out=8)
    expected = token_triton.quantize_tokens(y, grid, rows_out=8)
    assert torch.equal(rows.q, expected.q) and torch.equal(rows.scale, expected.scale)


@interpreted
@pytest.mark.parametrize("gelu", [False, True])
def test_fused_activation_matches_the_torch_path(gelu):
    """act(gate) * up; gate_up in pair_gate_up's column order gives bitwise the same; with a grid, bitwise the
    per-token quantizer applied to its 16-bit output."""
    from ptqlab.quant import token_triton
    from ptqlab.runtime import fused, kernels

    torch.manual_seed(1)
    gate_up = torch.randn(3, 2 * 80, dtype=torch.float16)
    gate, up = gate_up.float().chunk(2, -1)
    y = fused.gated_activation(gate_up, gelu)
    assert relative(y, (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up) < 1e-3
    paired = kernels.pair_gate_up(gate_up.T).T.contiguous()
    assert torch.equal(fused.gated_activation(paired, gelu, paired=True), y)
    grid = token_triton.INT8_TOKENS  # FP8: see FP8_ROUNDING
    rows = fused.gated_activation(gate_up, gelu, grid)
    expected = token_triton.quantize_tokens(y, grid)
    assert torch.equal(rows.q, expected.q) and torch.equal(rows.scale, expected.scale)


@interpreted
def test_rotary_cache_write_and_decode_attention_match_the_torch_path():
    """Rotary + cache write against model.rope; decode attention (plain, softcap, a window that skips a block of the
    cache) against grouped_attention; the single decode kernel (rotary, cache write, attention) against the two."""
    from ptqlab.runtime import fused
    from ptqlab.runtime.model import grouped_attention, rope

    torch.manual_seed(0)
    b, h, hkv, d, positions, at = 2, 4, 2, 16, 160, 150
    dtype = torch.float16
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, dtype=dtype)
    k_cache, v_cache = (torch.randn(b, hkv, positions, d, dtype=dtype) for _ in range(2))
    angles = torch.rand(positions, d // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    half = (cos[:, :d // 2].contiguous(), sin[:, :d // 2].contiguous())
    pos = torch.tensor([at])
    q, k, v = qkv.clone().split([h * d, hkv * d, hkv * d], -1)
    fused.rope_and_cache(qkv, *half, pos, h, hkv, d, k_cache, v_cache)
    assert relative(qkv[..., :h * d].view(b, 1, h, d), rope(q.view(b, 1, h, d), cos[pos], sin[pos])) < 1e-3
    assert relative(k_cache[:, :, at], rope(k.view(b, 1, hkv, d), cos[pos], sin[pos])[:, 0]) < 1e-3
    assert torch.equal(v_cache[:, :, at], v.view(b, hkv, d))
    keys = torch.arange(positions)
    for softcap, window in [(None, None), (50.0, None), (None, 32)]:
        out = fused.decode_attention(qkv[..., :h * d], k_cache, v_cache, pos, 0.25, softcap, window)
        allowed = (keys <= at) & ((keys > at - window) if window else True)
        expected = grouped_attention(qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2).float(), k_cache.float(),
                                     v_cache.float(), allowed[None, :], 0.25, softcap)
        assert relative(out.view(b, 1, h, d).transpose(1, 2), expected) < 2e-3, (softcap, window)
    raw = torch.randn_like(qkv)
    for softcap, window in [(None, None), (50.0, 32)]:
        caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
        one = fused.decode_attention(raw.clone(), *caches[0], pos, 0.25, softcap, window, rotary=half)
        rotated = raw.clone()
        fused.rope_and_cache(rotated, *half, pos, h, hkv, d, *caches[1])
        two = fused.decode_attention(rotated[..., :h * d], *caches[1], pos, 0.25, softcap, window)
        assert torch.equal(caches[0][1], caches[1][1]) and relative(caches[0][0], caches[1][0]) < 1e-3
        assert relative(one, two) < 2e-3


def attention_float64(q, keys, values, at, scale, softcap=None, window=None):
    """Decode attention of q [B, H, D] over keys, values [B, Hkv, T, D] at positions 0..at (within the window), in
    float64: the reference the kernels' results are bounded against."""
    q, keys, values = q.double(), keys.double(), values.double()
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = torch.einsum("bhd,bhtd->bht", q, keys) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    t = torch.arange(keys.shape[2])
    allowed = (t <= at) & ((t > at - window) if window else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bht,bhtd->bhd", probs, values)


def fp8_cache(shape, seed):
    """A float8 cache of random keys or values and their per-head scales (float32 [Hkv], a different one per head)."""
    g = torch.Generator().manual_seed(seed)
    scales = 0.01 * (1 + torch.arange(shape[1], dtype=torch.float32))
    values = torch.randn(shape, generator=g) * 100 * scales.view(1, -1, 1, 1)
    return (values / scales.view(1, -1, 1, 1)).to(torch.float8_e4m3fn), scales


@interpreted
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("fp8", [False, True], ids=["16-bit", "fp8"])
def test_split_decode_attention_is_attention(splits, fp8):
    """Decode attention cut into `splits` runs of the sequence and combined (flash-decoding), on a 16-bit and an FP8
    cache, against float64 attention over what the cache holds (dequantized): plain, softcap, and a window that
    leaves the first runs empty. 8 splits of 290 positions leave the last ones empty too. Bound: fp16 q and output,
    fp32 accumulation (the single-program kernel's own bound)."""
    from ptqlab.runtime import fused

    torch.manual_seed(0)
    b, h, hkv, d, positions, at = 2, 4, 2, 16, 320, 290
    dtype = torch.float16
    q = torch.randn(b, 1, h * d, dtype=dtype)
    if fp8:
        shape = (b, hkv, positions, d)
        (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape, 1), fp8_cache(shape, 2)
        keys, values = k_cache.float() * k_scale.view(1, -1, 1, 1), v_cache.float() * v_scale.view(1, -1, 1, 1)
        scales = (k_scale, v_scale)
    else:
        k_cache, v_cache = (torch.randn(b, hkv, positions, d, dtype=dtype) for _ in range(2))
        keys, values, scales = k_cache, v_cache, None
    pos = torch.tensor([at])
    for softcap, window in [(None, None), (30.0, None), (None, 100)]:
        out = fused.decode_attention(q, k_cache, v_cache, pos, 0.25, softcap, window, kv_scales=scales, splits=splits)
        expected = attention_float64(q.view(b, h, d), keys, values, at, 0.25, softcap, window)
        assert relative(out.view(b, h, d), expected) < 2e-3, (softcap, window)


@interpreted
def test_fp8_cache_write_is_quantize_kv():
    """The kernels' FP8 cache write (rotary + write, and the fused decode step's write of the new token, both split
    and not) stores exactly quantize_kv of the rotated key and of the value, the CPU reference: value / scale,
    rounded to nearest even on the E4M3 grid, saturated at ±448 (some keys and values here are far beyond), and the
    subnormals below 2^-6 (the tiny ones)."""
    from ptqlab.quant.kv_cache import quantize_kv
    from ptqlab.runtime import fused

    torch.manual_seed(0)
    b, h, hkv, d, positions = 2, 4, 2, 16, 96
    dtype = torch.float16
    qkv = torch.randn(b, 3, (h + 2 * hkv) * d, dtype=dtype)
    qkv[0, 0, h * d:] *= 1000.0  # beyond 448 x scale: saturates
    qkv[1, 1, h * d:] *= 1e-3  # down among the subnormals
    scales = (torch.tensor([0.02, 0.05]), torch.tensor([0.03, 0.01]))
    angles = torch.rand(positions, d // 2) * 6
    half = (angles.cos().to(dtype), angles.sin().to(dtype))
    pos = torch.tensor([40, 41, 42])
    caches = [torch.zeros(b, hkv, positions, d, dtype=torch.float8_e4m3fn) for _ in range(2)]
    rotated = qkv.clone()
    fused.rope_and_cache(rotated, *half, pos, h, hkv, d, *caches, kv_scales=scales)
    k = rotated[..., h * d:(h + hkv) * d].view(b, 3, hkv, d).transpose(1, 2)
    v = rotated[..., (h + hkv) * d:].view(b, 3, hkv, d).transpose(1, 2)
    for cache, states, scale in zip(caches, (k, v), scales):
        expected = quantize_kv(states, scale)
        assert expected.float().abs().max() == 448.0 and (expected.float().abs() < 2 ** -6).any()
        assert torch.equal(cache[:, :, 40:43].view(torch.uint8), expected.view(torch.uint8))
    for splits in (1, 3):  # the decode step's own write of the token at 42, from the unrotated qkv
        stepped = [torch.zeros_like(c) for c in caches]
        fused.decode_attention(qkv[:, 2:3].clone(), *stepped, pos[2:], 0.25, None, None, rotary=half,
                               kv_scales=scales, splits=splits)
        for mine, theirs in zip(stepped, caches):
            assert torch.equal(mine[:, :, 42].view(torch.uint8), theirs[:, :, 42].view(torch.uint8))


@interpreted
@pytest.mark.parametrize("fp8", [False, True], ids=["16-bit", "fp8"])
def test_split_fused_decode_step_matches_the_single_program(fp8):
    """The fused decode step (rotary, cache write, attention) split along the sequence gives the single program's
    result and cache; a window makes the writing run not the first."""
    from ptqlab.runtime import fused

    torch.manual_seed(1)
    b, h, hkv, d, positions, at = 1, 4, 2, 16, 400, 333
    dtype = torch.float16
    raw = torch.randn(b, 1, (h + 2 * hkv) * d, dtype=dtype)
    angles = torch.rand(positions, d // 2) * 6
    half = (angles.cos().to(dtype), angles.sin().to(dtype))
    if fp8:
        shape = (b, hkv, positions, d)
        (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape, 3), fp8_cache(shape, 4)
        scales = (k_scale, v_scale)
    else:
        k_cache, v_cache = (torch.randn(b, hkv, positions, d, dtype=dtype) for _ in range(2))
        scales = None
    for window in (None, 150):
        results = []
        for splits in (1, 5):
            caches = (k_cache.clone(), v_cache.clone())
            out = fused.decode_attention(raw.clone(), *caches, torch.tensor([at]), 0.25, None, window, rotary=half,
                                         kv_scales=scales, splits=splits)
            results.append((out, caches))
        (one, (k1, v1)), (split, (k2, v2)) = results
        assert torch.equal(k1.view(torch.uint8), k2.view(torch.uint8))
        assert torch.equal(v1.view(torch.uint8), v2.view(torch.uint8))
        assert relative(split, one) < 2e-3, window


@interpreted
def test_greedy_next_picks_the_first_maximum_like_torch():
    from ptqlab.runtime import fused

    torch.manual_seed(0)
    logits = torch.randn(3, 5000, dtype=torch.float16)
    logits[1, 700] = logits[1, 4500] = 100.0  # a tie across chunks: the first wins
    logits[2, 4999] = 100.0  # the last, partial chunk
    token = torch.zeros(3, 1, dtype=torch.long)
    sequence = torch.zeros(3, 10, dtype=torch.long)
    fused.greedy_next(logits, token, sequence, torch.tensor([4]))
    expected = logits.argmax(-1)
    assert expected[1] == 700 and expected[2] == 4999
    assert torch.equal(token[:, 0], expected) and torch.equal(sequence[:, 5], expected)
    assert not sequence[:, :5].any() and not sequence[:, 6:].any()


# ---- runtime/moe_kernels.py and the int4 kernel's expert mode: mixture-of-experts decode ------------------------

def pairs_of(tokens, top_k, experts, seed=0):
    """Random distinct experts for each token (as a router's top-k), token-major, and random routing weights."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).reshape(-1)
    return chosen.to(torch.int32), torch.rand(tokens * top_k, generator=g)


@interpreted
@pytest.mark.parametrize("experts,top_k,normalize,weight_dtype", [(16, 4, True, torch.float16), (12, 3, False, None),
                                                                   (128, 8, True, torch.float32)])
def test_route_picks_the_top_k_of_the_softmax_like_torch(experts, top_k, normalize, weight_dtype):
    """Softmax in fp32, the k largest in descending order, renormalized, rounded; on a tie the first index first
    (torch.topk leaves the order of ties unspecified)."""
    from ptqlab.runtime import moe_kernels

    torch.manual_seed(experts)
    logits = torch.randn(5, experts, dtype=torch.float16)
    logits[2, 3] = logits[2, 7] = 9.0  # a tie: expert 3 before 7, as torch.topk takes them
    chosen, weights = moe_kernels.route(logits, top_k, normalize, weight_dtype)
    probs = logits.float().softmax(-1)
    expected_w, expected = probs.topk(top_k, dim=-1)
    if normalize:
        expected_w = expected_w / expected_w.sum(-1, keepdim=True)
    if weight_dtype is not None:
        expected_w = expected_w.to(weight_dtype).float()
    untied = [0, 1, 3, 4]
    assert chosen.dtype == torch.int32 and torch.equal(chosen.reshape(5, top_k)[untied].long(), expected[untied])
    assert chosen[2 * top_k:2 * top_k + 2].tolist() == [3, 7]
    assert torch.equal(chosen[2 * top_k + 2:3 * top_k].long(), expected[2, 2:])
    assert torch.allclose(weights, expected_w.reshape(-1), rtol=1e-3 if weight_dtype == torch.float16 else 1e-6)


@interpreted
@pytest.mark.parametrize("rows_per_input,weighted", [(3, False), (1, True)])
@pytest.mark.parametrize("fmt", ["16-bit", "int8"])
def test_expert_gemv_multiplies_each_pair_by_its_expert(rows_per_input, weighted, fmt):
    """Pair p: row p // rows_per_input times expert experts[p]; 8-bit weights and inputs with their scales; N and K
    off the tiles."""
    from ptqlab.runtime import moe_kernels

    torch.manual_seed(1)
    e, n, k, tokens = 6, 20, 200, 2
    experts, route_weights = pairs_of(tokens, 3, e)
    rows = experts.shape[0] // rows_per_input
    if fmt == "16-bit":
        weight, w_scale = torch.randn(e, n, k, dtype=torch.float16), None
        x, x_scale = torch.randn(rows, k, dtype=torch.float16), None
        dense, inputs = weight.double(), x.double()
    else:
        weight, w_scale = torch.randint(-127, 128, (e, n, k), dtype=torch.int8), torch.rand(e, n) / 100
        x, x_scale = torch.randint(-127, 128, (rows, k), dtype=torch.int8), torch.rand(rows, 1) / 100
        dense, inputs = weight.double() * w_scale.double()[..., None], x.double() * x_scale.double()
    y = moe_kernels.expert_gemv(x, experts, weight, w_scale, x_scale, rows_per_input,
                                route_weights if weighted else None, out_dtype=torch.float32, block_n=8, block_k=64)
    expected = torch.stack([dense[experts[p]] @ inputs[p // rows_per_input] for p in range(experts.shape[0])])
    if weighted:
        expected = expected * route_weights.double()[:, None]
    assert y.shape == (experts.shape[0], n) and y.dtype == torch.float32
    assert relative(y, expected) < 1e-5


@interpreted
@pytest.mark.parametrize("n,k,group,symmetric", [(24, 256, 128, True), (20, 96, 32, False)])
def test_int4_expert_gemv_reads_each_pairs_expert(n, k, group, symmetric):
    """The one-row int4 kernel in expert mode: stacked planes, scales and zero points, one expert per pair."""
    from ptqlab.runtime import int4_kernels

    layers = [int4_layer(n, k, group, symmetric, torch.float32, seed=s) for s in range(5)]
    planes, scale = torch.stack([layer[3] for layer in layers]), torch.stack([layer[1] for layer in layers])
    zero = None if symmetric else torch.stack([layer[2] for layer in layers])
    experts, route_weights = pairs_of(3, 2, 5)
    x = torch.randn(3, k)
    for rows_per_input, weights in ((2, None), (1, route_weights)):
        inputs = x if rows_per_input == 2 else torch.randn(6, k)
        y = int4_kernels.int4_expert_gemv(inputs, experts, planes, scale, zero, rows_per_input, weights)
        expected = torch.stack([layers[experts[p]][4].double() @ inputs[p // rows_per_input].double()
                                for p in range(6)])
        if weights is not None:
            expected = expected * weights.double()[:, None]
        assert y.shape == (6, n) and relative(y, expected) < 1e-4


@interpreted
@pytest.mark.parametrize("fmt", ["16-bit", "int4", "int8"])
def test_stacked_expert_decode_matches_the_grouped_path(fmt, monkeypatch):
    """A few tokens through an MoE MLP: the stacked kernels (route, gate_up, activation, down, the sum of each
    token's experts) give what the grouped per-expert path gives, and each expert's linears keep reading their
    slices of the stacks."""
    from ptqlab.runtime import moe
    from ptqlab.runtime.kernels import RuntimeOptions
    from ptqlab.runtime.linear import DequantizedLinear, Int4Linear, Int8Linear

    torch.manual_seed(2)
    hidden, inner, n_experts = 64, 32, 8

    def linear(out_features, in_features):
        w = torch.randn(out_features, in_features) / in_features ** 0.5
        if fmt == "16-bit":
            return DequantizedLinear(w, None)
        if fmt == "int8":
            scale = w.abs().amax(1, keepdim=True) / 127
            return Int8Linear(torch.round(w / scale).to(torch.int8), scale.T, None, torch.float32)
        q, scale, zero = rtn(w, QuantArgs(num_bits=4, strategy="group", group_size=32), torch.float32)
        return Int4Linear(q, scale, zero, None, RuntimeOptions.gemv_tile, pdl=False)

    experts = [moe.Expert(linear(2 * inner, hidden), linear(hidden, inner), F.silu) for _ in range(n_experts)]
    monkeypatch.setattr(moe.triton_support, "available", lambda t: True)
    stacked = moe.stack_experts(experts, "silu", RuntimeOptions(pdl=False))
    assert stacked is not None and stacked.format == fmt
    mlp = moe.MoEMLP(moe.Routing(n_experts, 2, True, False), torch.randn(n_experts, hidden), experts, stacked=stacked)
    x = torch.randn(3, 1, hidden)
    assert mlp.capturable(3)
    y = mlp(x)
    reference = mlp._grouped(x.reshape(3, hidden)).reshape(x.shape)
    assert relative(y, reference) < (1e-2 if fmt == "int8" else 1e-4)  # int8: the activation's own per-token grid
    if fmt != "int4":
        assert experts[3].down.weight.data_ptr() == stacked.down_weight[3].data_ptr()
