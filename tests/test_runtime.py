"""The fast runtime computes what the checkpoint means.

CPU (every scheme computes with its dequantized weight; fp32) against transformers loading the same checkpoint in
fp32 (compressed-tensors' own decompression): logits equal to 1e-5 relative for every architecture and scheme
(measured: bitwise equal; the bound leaves room for fp32 rounding where a matmul is blocked differently, e.g. the
fused q/k/v).
Greedy generation over 32 tokens: every token the runtime picks is the reference's argmax for the same prefix
(teacher-forced, so the whole sequence is what greedy decoding of the reference gives). Decoding reads the KV cache
through a differently shaped attention matmul than a full forward, so fp32 rounding differs slightly; with 8-bit
activations that can move a value across a rounding boundary of its grid, so for fp8-dynamic and w8a8 a pick may
differ only at a near tie of the reference (top-2 gap < 0.01). Weight-only and 16-bit must match exactly.

GPU tests (skipped on CPUs) check the kernels against float64 and the reference modules, and that CUDA-graph
decoding gives the same tokens as eager decoding.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from ptqlab import quantize
from ptqlab.families import FAMILIES
from ptqlab.errors import PtqlabError
from ptqlab.runtime import Generator, RuntimeOptions, load_runtime
from ptqlab.runtime.model import grouped_attention
from tiny import ARCHS

FAST = [arch for arch in ARCHS if FAMILIES[arch].fast_runtime]
"""The dense families ptqlab's runtime runs (the others are benchmarked through transformers)."""

ACTIVATION_QUANTIZED = ("fp8-dynamic", "w8a8-rtn", "fp8-block", "w4a8-rtn")
RECIPES = [None, "fp8-dynamic", "w4a16-rtn", "w8a8-rtn"]
NEAR_TIE = 0.01
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    # Gemma 2 in eager attention: the softcap as written (HF's default sdpa path leaves it out).
    attention = "eager" if json.loads((path / "config.json").read_text())["model_type"] == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device).eval()


def token_ids(batch=2, length=24, seed=0):
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """Factory: (arch, recipe or None) -> a checkpoint folder (the 16-bit model itself for None)."""
    made = {}

    def make(arch, recipe, **config):
        key = (arch, recipe, tuple(sorted(config.items())))
        if key not in made:
            src = tiny_model_dir(arch, **config)
            made[key] = src if recipe is None else quantize(str(src), recipe, out=tmp_path_factory.mktemp(f"{arch}-{recipe}"),
                                                           quiet=True)
        return made[key]

    return make


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", FAST)
def test_logits_match_transformers(checkpoint, arch, recipe):
    path = checkpoint(arch, recipe)
    ids = token_ids()
    with torch.no_grad():
        ours = load_runtime(path, dtype=torch.float32)(ids).logits
        theirs = reference(path)(ids).logits
    assert relative(ours, theirs) <= 1e-5


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", FAST)
def test_greedy_generation_matches_reference(checkpoint, arch, recipe):
    path = checkpoint(arch, recipe)
    prompt = token_ids(1, 8, seed=1)
    model = load_runtime(path, dtype=torch.float32)
    generated = Generator(model, 1, 8 + 32).generate(prompt, 32)[0]
    assert generated.shape == (32,)
    with torch.no_grad():
        logits = reference(path)(torch.cat([prompt[0], generated])[None]).logits[0, 7:-1]
    top = logits.max(-1).values
    picked = logits.gather(-1, generated[:, None])[:, 0]
    if recipe in ACTIVATION_QUANTIZED:
        assert bool((top - picked < NEAR_TIE).all()), (top - picked).max()
    else:
        assert torch.equal(generated, logits.argmax(-1))


@pytest.mark.parametrize("arch,config", [("gemma2", {"sliding_window": 8}), ("gemma3_text", {"sliding_window": 8}),
                                         ("qwen3", {})])
def test_cached_decode_equals_full_forward(checkpoint, arch, config):
    """Step-by-step decoding through the static cache (sliding windows shorter than the sequence included) gives the
    logits of one forward pass over the whole sequence, and both match transformers."""
    path = checkpoint(arch, None, **config)
    model = load_runtime(path, dtype=torch.float32)
    ids = token_ids(2, 30, seed=2)
    with torch.no_grad():
        full = model(ids).logits
        model.setup_cache(2, 64)
        steps = [model(ids[:, :6]).logits]
        for t in range(6, 30):
            steps.append(model(ids[:, t:t + 1], torch.tensor([t])).logits)
        theirs = reference(path)(ids).logits
    assert relative(torch.cat(steps, 1), full) <= 1e-5
    assert relative(full, theirs) <= 1e-5


def test_layers_in_different_formats_are_not_fused(tiny_model_dir, tmp_path):
    """k_proj kept 16-bit: q, k, v run as three matmuls side by side, with the same logits."""
    src = tiny_model_dir("qwen2")
    path = quantize(str(src), "w4a16-rtn", out=tmp_path / "q", ignore=["lm_head", "re:.*k_proj"], quiet=True)
    model = load_runtime(path, dtype=torch.float32)
    assert model.kernels["qkv"] == "mixed" and model.kernels["o"] == "dequantized"
    with torch.no_grad():
        assert relative(model(token_ids()).logits, reference(path)(token_ids()).logits) <= 1e-5


def test_runtime_options_reach_the_model_and_its_layers(checkpoint):
    """The options given to load_runtime are the model's and every decoder layer's (no process-wide switch)."""
    options = RuntimeOptions(pdl=False, fp8_fast_accum=False, gemv_tile=(8, 256, 2))
    model = load_runtime(checkpoint("llama", None), dtype=torch.float32, options=options)
    assert model.options is options and all(block.pdl is False for block in model.blocks)
    assert load_runtime(checkpoint("llama", None), dtype=torch.float32).options == RuntimeOptions()
    with pytest.raises(ValueError, match="powers of two"):
        RuntimeOptions(gemv_tile=(8, 300, 2))


def test_bf16_checkpoint_runs_in_its_own_dtype(tiny_model_dir, tmp_path):
    path = quantize(str(tiny_model_dir("llama", torch.bfloat16)), "w4a16-rtn", out=tmp_path / "q", quiet=True)
    model = load_runtime(path)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        ours = model(token_ids()).logits
        theirs = reference(path, torch.bfloat16)(token_ids()).logits
    assert ours.dtype == torch.bfloat16
    assert relative(ours, theirs) < 1e-2  # bf16 rounding


def test_unsupported_architecture_says_what_to_do(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(PtqlabError, match="--runtime transformers"):
        load_runtime(tmp_path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(PtqlabError, match="no config.json"):
        load_runtime(tmp_path)


def test_reads_llmcompressor_checkpoints(tiny_model_dir, tmp_path):
    pytest.importorskip("llmcompressor")
    from test_interop_llmcompressor import llmcompressor_checkpoint

    src = tiny_model_dir("llama")
    for scheme in ("W4A16", "W8A8", "FP8_DYNAMIC"):
        path = llmcompressor_checkpoint(src, scheme, tmp_path / scheme)
        with torch.no_grad():
            ours = load_runtime(path, dtype=torch.float32)(token_ids()).logits
            theirs = reference(path)(token_ids()).logits
        assert relative(ours, theirs) <= (1e-2 if scheme != "W4A16" else 1e-5), scheme


@pytest.mark.parametrize("k,group,plane", [(512, 128, 16), (896, 128, 16), (512, 64, 8), (256, 32, 4), (384, 384, 16),
                                           (200, 200, None), (96, 48, 6), (100, 50, None)])
def test_int4_planes_put_each_value_where_the_kernels_read_it(k, group, plane):
    """Value v of a row: nibble (v mod 8P) // P of word (v // 8P) P + v mod P (P = plane width); the packing is
    lossless and a word's 8 values share one scale group."""
    from ptqlab.runtime import int4_kernels

    assert int4_kernels.plane_words(k, group) == plane
    if plane is None:
        return
    q = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    planes = int4_kernels.int4_planes(q, plane)
    assert planes.dtype == torch.int32 and planes.shape == (5, k // 8)
    v = torch.arange(k)
    word = (v // (8 * plane)) * plane + v % plane
    nibble = (v % (8 * plane)) // plane
    unpacked = ((planes[:, word] >> (4 * nibble).to(torch.int32)) & 0xF) - 8
    assert torch.equal(unpacked.to(torch.int8), q)
    group_of = torch.empty(k // 8, 8, dtype=torch.long)
    group_of[word, nibble] = v // group
    assert (group_of == group_of[:, :1]).all()


# ---- GPU: kernels and CUDA graphs -------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group,symmetric", [(1000, 1024, 128, False), (384, 2048, 256, True),
                                                   (136, 512, None, True)])
def test_every_int4_kernel_choice_against_float64(dtype, n, k, group, symmetric):
    """Each kernel the choice table may pick for an Int4Linear (one-row GEMV, the small-batch tiles, the 16-row
    kernel, dequantize + cuBLAS, the prefill tiles) at the rows of each bucket and off them, in both 16-bit dtypes
    (each has its own unpacking), with zero points and a bias: all within one 16-bit rounding of float64."""
    from ptqlab.quant.linear import rtn
    from ptqlab.quant.primitives import dequantize
    from ptqlab.runtime.linear import Int4Linear
    from ptqlab.schemes import QuantArgs

    torch.manual_seed(n + k)
    args = QuantArgs(num_bits=4, strategy="group" if group else "channel", group_size=group, symmetric=symmetric)
    q, scale, zero = rtn(torch.randn(n, k, device="cuda", dtype=dtype), args, dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    layer = Int4Linear(q, scale, zero, bias, RuntimeOptions.gemv_tile, pdl=True, dtype=dtype)
    weight = dequantize(q, scale, zero, args, torch.float64)
    seen = set()
    for rows in (1, 5, 16, 40, 64, 300):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        exact = x.double() @ weight.T + bias.double()
        for kernel in layer.kernels_for(rows):
            y = layer(x, kernel=kernel)
            assert y.dtype == dtype and y.shape == (rows, n), kernel
            assert relative(y, exact) < 4e-3, (kernel, rows, relative(y, exact))
            seen.add(kernel.split(" ")[0])
    assert {"gemv", "small-batch", "dequantize+cublas", "int4-gemm"} <= seen


@gpu
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n,k,group,symmetric", [(96, 256, 128, True), (200, 512, 64, False), (64, 4096, 128, True),
                                                   (1152, 896, 128, True), (100, 4864, 128, False), (256, 384, None, True),
                                                   (64, 8192, 4096, True), (48, 512, 32, True)])
def test_int4_kernels_against_float64(rows, n, k, group, symmetric):
    """Row tails (100), K tails (896, 4864: 112 and 608 words), split K (64 x 4096), small groups (32, 64: narrower
    planes), tiles inside a group (4096), one scale per row, zero points."""
    from ptqlab.quant.linear import rtn
    from ptqlab.quant.primitives import dequantize
    from ptqlab.runtime import int4_kernels
    from ptqlab.schemes import QuantArgs

    torch.manual_seed(n + k + rows)
    args = QuantArgs(num_bits=4, strategy="group" if group else "channel", group_size=group, symmetric=symmetric)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    q, scale, zero = rtn(w, args, torch.bfloat16)
    planes = int4_kernels.int4_planes(q, int4_kernels.plane_words(k, group or k))
    reference_w = dequantize(q, scale, zero, args, torch.bfloat16)
    assert torch.equal(int4_kernels.int4_dequantize(planes, scale, zero, k, torch.bfloat16), reference_w)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    exact = x.double() @ reference_w.double().T
    if rows == 1:
        outputs = [int4_kernels.int4_gemv(x, planes, scale, zero, tile) for tile in [(8, 256, 2), (16, 64, 4), (4, 512, 2)]]
    elif (group or k) < 128:  # tensor-core tiles need 128 values of one group; Int4Linear dequantizes
        with pytest.raises(ValueError, match="16 packed words"):
            int4_kernels.int4_matmul_small_m(x, planes, scale, zero)
        return
    else:
        outputs = [int4_kernels.int4_matmul_small_m(x, planes, scale, zero)]
    for y in outputs:
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert relative(y, exact) < 4e-3  # fp32 accumulation, one bf16 rounding of the output


@gpu
@pytest.mark.parametrize("inner,k,recipe", [(4864, 896, "w4a16-rtn"), (96, 14336, "w4a16-asym")])
@pytest.mark.parametrize("gelu", [False, True])
def test_int4_gate_up_applies_the_activation_like_the_separate_kernel(inner, k, recipe, gelu):
    """Paired rows (one program holds a gate and its up): one row's act(gate) * up straight from the int4 kernel
    equals the gate_up output put through the activation kernel, bitwise; several rows and prefill go through the
    activation kernel in paired order. (96 x 14336 splits K, so the activation runs in the split-sum kernel.)"""
    from ptqlab.quant.linear import rtn
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime import fused
    from ptqlab.runtime.linear import StoredLinear, build_linear

    scheme = get_recipe(recipe).scheme
    torch.manual_seed(inner)
    w = torch.randn(2 * inner, k, device="cuda", dtype=torch.bfloat16) * 0.05
    q, scale, zero = rtn(w, scheme.weights, torch.bfloat16)
    plain = build_linear(StoredLinear(q, None, scheme, scale, zero), torch.bfloat16)
    paired = build_linear(StoredLinear(q, None, scheme, scale, zero), torch.bfloat16)
    assert paired.pair_gate_up() and paired.paired
    for rows in (1, 5, 40):
        x = torch.randn(1, rows, k, device="cuda", dtype=torch.bfloat16)
        expected = fused.gated_activation(plain(x), gelu)
        assert torch.equal(fused.gated_activation(paired(x), gelu, paired=True), expected)
        if rows == 1:
            assert torch.equal(paired.gated(x, gelu), expected)


@gpu
@pytest.mark.parametrize("grid", ["fp8", "int8"])
def test_token_quantizer_gives_the_fake_quantized_values(grid):
    from ptqlab.quant import token_triton

    grid = token_triton.FP8_TOKENS if grid == "fp8" else token_triton.INT8_TOKENS
    x = torch.randn(5, 896, device="cuda", dtype=torch.bfloat16) * 3
    rows = token_triton.quantize_tokens(x, grid, rows_out=32)
    assert rows.q.shape == (32, 896) and rows.scale.shape == (32, 1) and rows.shape == x.shape
    fake = token_triton.fake_quantize_tokens(x, grid)
    assert torch.equal((rows.q[:5].float() * rows.scale[:5]).to(torch.bfloat16), fake)
    assert not rows.q[5:].float().any()


@gpu
@pytest.mark.parametrize("grid", ["fp8", "int8"])
@pytest.mark.parametrize("gelu", [False, True])
def test_fused_norm_and_activation_quantize_like_the_separate_kernel(grid, gelu):
    """The norm / activation that hands an int8 or FP8 matmul its input already quantized gives bitwise the values
    the separate quantizer would give for its 16-bit output."""
    from ptqlab.quant import token_triton
    from ptqlab.runtime import fused

    grid = token_triton.FP8_TOKENS if grid == "fp8" else token_triton.INT8_TOKENS
    x, r = (torch.randn(7, 896, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(896, device="cuda", dtype=torch.bfloat16)
    offset = 1.0 if gelu else 0.0
    rows, stream = fused.rms_norm(x, w, 1e-6, offset, residual=r, grid=grid, rows_out=32)
    y, _ = fused.rms_norm(x, w, 1e-6, offset, residual=r)
    expected = token_triton.quantize_tokens(y, grid, rows_out=32)
    assert torch.equal(stream, x + r) and rows.shape == x.shape
    assert torch.equal(rows.q.float(), expected.q.float()) and torch.equal(rows.scale, expected.scale)
    gate_up = torch.randn(7, 2 * 4864, device="cuda", dtype=torch.bfloat16)
    rows = fused.gated_activation(gate_up, gelu, grid)
    expected = token_triton.quantize_tokens(fused.gated_activation(gate_up, gelu), grid)
    assert torch.equal(rows.q.float(), expected.q.float()) and torch.equal(rows.scale, expected.scale)


@gpu
@pytest.mark.parametrize("recipe,kernel", [("fp8-dynamic", "fp8 "), ("w8a8-rtn", "int8 "),
                                           ("w4a16-rtn", "int4 "), ("fp8-block", "fp8-block triton"),
                                           ("w4a8-rtn", "w4a8 triton")])
@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("options", [RuntimeOptions(), RuntimeOptions(pdl=False, fp8_fast_accum=False, gemv_tile=(8, 256, 2))],
                         ids=["default", "other"])
def test_fast_linears_match_the_dequantized_reference(recipe, kernel, rows, options):
    """Every kernel path: one row (decode), a few (batched decode), many (prefill); each kernel option."""
    from ptqlab.quant.linear import rtn
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime.linear import StoredLinear, build_linear

    scheme = get_recipe(recipe).scheme
    torch.manual_seed(rows)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    bias = torch.randn(384, device="cuda", dtype=torch.bfloat16)
    q, scale, zero = rtn(w, scheme.weights, torch.bfloat16)
    stored = StoredLinear(q, bias, scheme, scale, zero)
    fast = build_linear(stored, torch.bfloat16, options)
    assert fast.kernel.startswith(kernel)
    assert getattr(fast, "fast_accum", options.fp8_fast_accum) == options.fp8_fast_accum
    assert getattr(fast, "tile", options.gemv_tile) == options.gemv_tile
    slow = build_linear(StoredLinear(q.cpu(), bias.cpu(), scheme, scale.cpu(), None if zero is None else zero.cpu()),
                        torch.float32)
    x = torch.randn(1, rows, 512, device="cuda", dtype=torch.bfloat16)
    exact = slow(x.float().cpu())
    assert relative(fast(x).cpu(), exact) < 1e-2
    if hasattr(fast, "candidates"):  # every kernel the choice table may pick at these rows (runtime/choice.py)
        for name, compute in fast.candidates(rows).items():
            assert relative(compute(x.reshape(rows, 512)).cpu().reshape(exact.shape), exact) < 1e-2, name


@gpu
def test_greedy_next_picks_the_first_maximum_like_torch():
    from ptqlab.runtime import fused

    torch.manual_seed(0)
    logits = torch.randn(3, 128256, device="cuda", dtype=torch.bfloat16)
    logits[1, 7000] = logits[1, 90000] = 100.0  # a tie across chunks: the first wins
    logits[2, 128255] = 100.0  # the last, partial chunk
    token = torch.zeros(3, 1, dtype=torch.long, device="cuda")
    sequence = torch.zeros(3, 10, dtype=torch.long, device="cuda")
    pos = torch.tensor([4], device="cuda")
    fused.greedy_next(logits, token, sequence, pos)
    expected = logits.argmax(-1)
    assert expected[1] == 7000 and expected[2] == 128255
    assert torch.equal(token[:, 0], expected) and torch.equal(sequence[:, 5], expected)
    assert not sequence[:, :5].any() and not sequence[:, 6:].any()


@gpu
def test_fused_kernels_match_the_torch_path():
    """Norm (with residual), rotary + cache write, gated activation and decode attention (softcap, window), bf16."""
    from ptqlab.runtime import fused
    from ptqlab.runtime.model import rms_norm, rope

    torch.manual_seed(0)
    x, r, w = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in ((6, 896), (6, 896), 896))
    for offset in (0.0, 1.0):
        y, res = fused.rms_norm(x, w, 1e-6, offset, residual=r)
        assert torch.equal(res, x + r)
        assert relative(y, rms_norm(x + r, w, 1e-6, offset)) < 1e-2
    gu = torch.randn(3, 2 * 4864, device="cuda", dtype=torch.bfloat16)
    gate, up = gu.float().chunk(2, -1)
    assert relative(fused.gated_activation(gu, False), F.silu(gate) * up) < 1e-2
    assert relative(fused.gated_activation(gu, True), F.gelu(gate, approximate="tanh") * up) < 1e-2
    b, h, hkv, d, positions = 2, 14, 2, 64, 200
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(b, hkv, positions, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    angles = torch.rand(positions, d // 2, device="cuda") * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    pos = torch.tensor([150], device="cuda")
    q, k, v = qkv.clone().split([h * d, hkv * d, hkv * d], -1)
    q_ref = rope(q.view(b, 1, h, d), cos[pos], sin[pos])
    k_ref = rope(k.view(b, 1, hkv, d), cos[pos], sin[pos])
    fused.rope_and_cache(qkv, cos[:, :d // 2].contiguous(), sin[:, :d // 2].contiguous(), pos, h, hkv, d, k_cache, v_cache)
    assert relative(qkv[..., :h * d].view(b, 1, h, d), q_ref) < 1e-2
    assert relative(k_cache[:, :, 150], k_ref[:, 0]) < 1e-2 and torch.equal(v_cache[:, :, 150], v.view(b, hkv, d))
    for softcap, window in [(None, None), (50.0, None), (None, 32)]:
        out = fused.decode_attention(qkv[..., :h * d], k_cache, v_cache, pos, 0.125, softcap, window)
        keys = torch.arange(positions, device="cuda")
        allowed = (keys <= 150) & ((keys > 150 - window) if window else True)
        ref = grouped_attention(qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2).float(), k_cache.float(), v_cache.float(),
                                allowed[None, :], 0.125, softcap)
        assert relative(out.view(b, 1, h, d).transpose(1, 2), ref) < 1e-2, (softcap, window)
    # Decode's single kernel (rotary, cache write, attention) = the two kernels above, on fresh copies.
    raw = torch.randn_like(qkv)
    half = (cos[:, :d // 2].contiguous(), sin[:, :d // 2].contiguous())
    for softcap, window in [(None, None), (50.0, 32)]:
        caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
        one = fused.decode_attention(raw.clone(), *caches[0], pos, 0.125, softcap, window, rotary=half)
        rotated = raw.clone()
        fused.rope_and_cache(rotated, *half, pos, h, hkv, d, *caches[1])
        two = fused.decode_attention(rotated[..., :h * d], *caches[1], pos, 0.125, softcap, window)
        assert torch.equal(caches[0][1], caches[1][1])
        assert relative(caches[0][0], caches[1][0]) < 1e-3 and relative(one, two) < 1e-2


@gpu
@pytest.mark.parametrize("arch,recipe,config", [("qwen2", r, {}) for r in RECIPES + ["fp8-block", "w4a8-rtn", "w4a16-asym"]]
                         + [("gemma2", "w4a16-rtn", {"sliding_window": 8})])
def test_gpu_runtime_matches_reference_and_graphs_match_eager(checkpoint, arch, recipe, config):
    path = checkpoint(arch, recipe, **config)
    model = load_runtime(path, device="cuda", dtype=torch.bfloat16)
    ids = token_ids().cuda()
    with torch.no_grad():
        ours = model(ids).logits
        theirs = reference(path, torch.float32, "cuda")(ids).logits
    assert relative(ours, theirs) < (5e-2 if recipe in ACTIVATION_QUANTIZED else 2e-2)
    prompt = ids[:1, :8]
    graphed = Generator(model, 1, 40, graph=True).generate(prompt, 32)
    eager = Generator(model, 1, 40, graph=False).generate(prompt, 32)
    assert torch.equal(graphed, eager)


def test_auto_runtime_falls_back_with_a_note_and_fast_refuses(tmp_path):
    """--runtime auto on a GPU takes transformers for what the fast runtime cannot run, and says why; --runtime
    fast refuses it with the same reason (decided from the folder alone: no GPU needed to test it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ptqlab.measure.variant import resolve_runtime

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    runtime, note = resolve_runtime("auto", gpu, tmp_path)
    assert runtime == "transformers" and "does not run 'gpt2'" in note
    with pytest.raises(PtqlabError, match="does not run 'gpt2'"):
        resolve_runtime("fast", cpu, tmp_path)
    assert resolve_runtime("auto", cpu, tmp_path) == ("transformers", None)


def test_auto_runtime_takes_the_fast_one_on_a_gpu(checkpoint):
    from ptqlab.measure.variant import resolve_runtime

    assert resolve_runtime("auto", torch.device("cuda"), checkpoint("llama", "w4a16-rtn")) == ("fast", None)
