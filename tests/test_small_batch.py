"""The small-batch matmul (runtime/small_batch.py) on CPU through Triton's interpreter, against float64 references:
FP8 and INT8 W8A8 with per-token activations, int4 W4A16 (symmetric and with zero points); and the runtime's layers
that take it for a decode step's rows.

The kernel tests run in a fresh `python -m pytest` with TRITON_INTERPRET=1 (tests/interpreter.py):
`test_small_batch_kernels_under_the_interpreter` starts it, and here they are skipped. To run them directly:
TRITON_INTERPRET=1 python -m pytest tests/test_small_batch.py

Error bounds. FP8 x FP8 and INT8 x INT8 products are exact (fp32 / int32), and so are int4 values times 16-bit
activations (at most 8 + 11 significant bits in fp32). Each output's error is then fp32 rounding of a tile's sum of
128 products, its product with the scales, the sums over K / 128 tiles and over the K splits, and for zero points the
subtraction of zero x Σ x (a term as large as 8 |x| s per input): within (128 + K / 128 + splits + 4) u of
Σ_k |x_k| |w_k| (u = 2^-24), and for int4 of Σ_k |x_k| s_k (|q - z| + |z|), checked with room at 1e-5 (K <= 1024),
plus the output's own rounding. INT8 sums are exact in int32, so their only error is the scaling's.
"""

import pytest
import torch
from interpreter import interpreted as interpreted_in, run_under_interpreter, starts_interpreter

from ptqlab.quant.linear import rtn
from ptqlab.schemes import QuantArgs

interpreted = interpreted_in("test_small_batch_kernels_under_the_interpreter")


@starts_interpreter
def test_small_batch_kernels_under_the_interpreter(tmp_path):
    """This file's kernel tests, in a fresh process whose Triton interprets the kernels on CPU."""
    run_under_interpreter(__file__, tmp_path)


def activations(rows, k, seed=0):
    """Rows of varied size with an all-zero tile and an outlier column."""
    torch.manual_seed(seed)
    x = torch.randn(rows, k) * (torch.rand(rows, 1) * 4 + 0.1)
    x[0, :128] = 0
    x[-1, 5] *= 30
    return x


def within(y, reference, magnitude, bound, out_dtype):
    """|y - reference| <= bound * magnitude + the output's rounding (half a unit in the last place of out_dtype)."""
    rounding = torch.finfo(out_dtype).eps / 2 * reference.abs()
    excess = (y.double() - reference).abs() - bound * magnitude - rounding
    return float(excess.max()) <= 0, float(((y.double() - reference).abs() / magnitude.clamp(min=1e-30)).max())


def per_token(x, grid):
    """x [M, K] on its per-token grid as the runtime's quantizer computes it (scale = absmax / half range, IEEE
    division, FP8 rounding to nearest even or int8 rounding half to even): (q, scale [M, 1] fp32)."""
    info = torch.finfo(torch.float32)
    half = 448.0 if grid == "fp8" else 127.5
    scale = (x.abs().amax(1, keepdim=True) * (torch.tensor(1.0) / torch.tensor(half))).clamp(info.tiny, info.max)
    if grid == "fp8":
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale
    return torch.round(x / scale).clamp(-128, 127).to(torch.int8), scale


def eight_bit_layer(n, k, grid, seed=1):
    """An 8-bit weight [N, K] with one fp32 scale per row, and its float64 values."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    q, scale = per_token(w, grid)
    return q, scale, q.double() * scale.double()


@interpreted
@pytest.mark.parametrize("grid", ["fp8", "int8"])
@pytest.mark.parametrize("rows,n,k", [(1, 72, 1024), (3, 136, 256), (16, 200, 512), (33, 128, 384), (64, 80, 256)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_eight_bit_matmul_against_float64(grid, rows, n, k, out_dtype):
    """Grid values multiplied exactly, times the token's and the row's scale, bias once: one row with K split
    (1 x 72 x 1024: 8 tiles over 8 programs on the interpreter's one multiprocessor), rows off the 16-row product
    width (3, 33), N off the 64-row tiles (72, 136, 200, 80)."""
    from ptqlab.runtime.small_batch import small_batch_matmul

    x = activations(rows, k, seed=rows)
    q, x_scale = per_token(x, grid)
    w_q, w_scale, weight = eight_bit_layer(n, k, grid)
    bias = torch.randn(n, dtype=out_dtype)
    inputs = q.double() * x_scale.double()
    y = small_batch_matmul(grid, q, w_q, w_scale, x_scale=x_scale, bias=bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (rows, n)
    ok, worst = within(y, inputs @ weight.T + bias.double(), inputs.abs() @ weight.abs().T + bias.double().abs(), 1e-5,
                       out_dtype)
    assert ok, worst


def int4_layer(n, k, group, symmetric, seed=2):
    """Int4 grid values of a random weight in the runtime's planes, scales (and zero points), float64 weight."""
    from ptqlab.quant.primitives import dequantize
    from ptqlab.runtime import int4_kernels

    torch.manual_seed(seed)
    args = QuantArgs(num_bits=4, strategy="group", group_size=group, symmetric=symmetric) if group else \
        QuantArgs(num_bits=4, symmetric=symmetric)
    q, scale, zero = rtn(torch.randn(n, k) * 0.05, args, torch.float16)
    weight = dequantize(q, scale, zero, args, torch.float64)
    zero = None if zero is None else zero.float()
    return int4_kernels.int4_planes(q, 16), scale, zero, q, weight


@interpreted
@pytest.mark.parametrize("rows,n,k,group,symmetric,tile", [
    (1, 72, 1024, 128, True, None), (5, 136, 256, 128, False, None), (16, 200, 512, 256, True, None),
    (40, 64, 384, None, False, None), (64, 128, 256, 128, False, None),
    (130, 136, 256, 128, False, "64x128"), (200, 136, 512, 256, True, "128x128")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_matmul_against_float64(rows, n, k, group, symmetric, tile, dtype):
    """Int4 planes turned into their values in registers, one plane of 16 inputs per tensor-core product, times
    16-bit x, each 128-input tile times its group's scale (less zero point x Σ x): groups of 128, 256 and one per
    row, with and without zero points, K split (1 x 72 x 1024), rows off the product width, N off the tiles; and
    the prefill tiles over several tiles of rows (the last one partial)."""
    from ptqlab.runtime.small_batch import PREFILL_TILES, small_batch_matmul

    x = activations(rows, k, seed=rows).to(dtype)
    planes, scale, zero, q, weight = int4_layer(n, k, group, symmetric)
    bias = torch.randn(n, dtype=dtype)
    groups = k // scale.shape[1]
    zeros = torch.zeros_like(scale, dtype=torch.float64) if zero is None else zero.double()
    expanded_scale = scale.double().repeat_interleave(groups, 1)
    magnitude = x.double().abs() @ (expanded_scale * (q.double() - zeros.repeat_interleave(groups, 1)).abs()
                                    + expanded_scale * zeros.repeat_interleave(groups, 1).abs()).T
    # The interpreter stores bf16 by truncation, not rounding: bf16 rows give fp32 outputs here.
    out_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    y = small_batch_matmul("int4", x, planes, scale, zero_point=zero, bias=bias, out_dtype=out_dtype,
                           tile=PREFILL_TILES[tile] if tile else None)
    assert y.dtype == out_dtype and y.shape == (rows, n)
    ok, worst = within(y, x.double() @ weight.T + bias.double(), magnitude + bias.double().abs(), 1e-5, out_dtype)
    assert ok, worst


@interpreted
def test_small_batch_refuses_what_it_does_not_compute():
    from ptqlab.runtime.small_batch import SMALL_BATCH, fits, small_batch_matmul

    assert fits("int4", 256, 128) and fits("int4", 512, 256) and fits("fp8", 384)
    assert not fits("int4", 256, 64) and not fits("int8", 320) and not fits("nvfp4", 256)
    q, scale = per_token(torch.randn(SMALL_BATCH + 1, 128), "fp8")
    with pytest.raises(ValueError, match="at most"):
        small_batch_matmul("fp8", q, q, scale, x_scale=scale)


@interpreted
@pytest.mark.parametrize("rows,n,k", [(70, 200, 256), (130, 136, 384)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", ["128x128", "128x256", "256x128"])
def test_int8_prefill_gemm_against_float64(rows, n, k, out_dtype, tile):
    """INT8 W8A8's prefill matmul (runtime/int8_gemm.py): exact int32 sums, both scales and the bias applied in
    registers; rows and N off the 128-row tiles."""
    from ptqlab.runtime.int8_gemm import int8_gemm

    x = activations(rows, k, seed=rows)
    q, x_scale = per_token(x, "int8")
    w_q, w_scale, weight = eight_bit_layer(n, k, "int8")
    bias = torch.randn(n, dtype=out_dtype)
    inputs = q.double() * x_scale.double()
    y = int8_gemm(q, x_scale, w_q, w_scale, bias, out_dtype, tile)
    assert y.dtype == out_dtype and y.shape == (rows, n)
    ok, worst = within(y, inputs @ weight.T + bias.double(), inputs.abs() @ weight.abs().T + bias.double().abs(), 1e-5,
                       out_dtype)
    assert ok, worst


def _run_unpack_ptx(ptx: str, a: int, b: int, dtype: torch.dtype) -> list[tuple[float, float]]:
    """The unpacking PTX on two words, by a model of the five instructions it uses (mov, prmt, shr.u32, lop3 with
    the (x & y) | z table 0xEA, fma.rn of 16-bit pairs), as the PTX ISA defines them: its 8 outputs, each as the
    pair (low half, high half) of 16-bit values."""
    regs = {"$8": a, "$9": b}

    def val(token):
        return regs[token] if token in regs else int(token, 0)

    def halves(word):
        packed = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
        return packed.view(dtype).float()

    for statement in filter(None, (s.strip(" {}") for s in ptx.split(";"))):
        op, _, args = statement.partition(" ")
        args = [t.strip() for t in args.split(",")]
        if op == ".reg":
            continue
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "prmt.b32":
            source = val(args[1]) | val(args[2]) << 32
            regs[args[0]] = sum(((source >> (8 * ((val(args[3]) >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "shr.u32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "lop3.b32":
            assert args[4] == "0xEA"
            regs[args[0]] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op.startswith("fma.rn."):
            x, y, z = (halves(val(t)) for t in args[1:])
            low, high = ((x.double() * y.double() + z.double()).to(dtype)  # one rounding, as fma
                         .view(torch.int16).to(torch.int32).tolist())
            regs[args[0]] = (low & 0xFFFF) | (high & 0xFFFF) << 16
        else:
            raise AssertionError(f"an instruction the model does not know: {statement}")
    return [tuple(halves(regs[f"${j}"]).tolist()) for j in range(8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_unpacking_ptx_gives_every_nibble_of_both_words_as_its_value(dtype):
    """The PTX the GPU runs to turn two plane words into their 16 values (the interpreter runs the plain form): for
    words holding every nibble in every position, output j holds nibble j of the first word in its low half and of
    the second in its high half, as u - 8, exactly."""
    from ptqlab.runtime import int4_kernels
    from ptqlab.triton_support import triton

    if triton is None:
        pytest.skip("needs Triton")
    ptx = (int4_kernels._UNPACK_BF16 if dtype == torch.bfloat16 else int4_kernels._UNPACK_FP16).value
    for shift in range(16):
        a = sum(((shift + j) % 16) << (4 * j) for j in range(8))
        b = sum(((shift + 3 * j + 5) % 16) << (4 * j) for j in range(8))
        got = _run_unpack_ptx(ptx, a, b, dtype)
        assert got == [((a >> 4 * j & 15) - 8, (b >> 4 * j & 15) - 8) for j in range(8)], (shift, got)
