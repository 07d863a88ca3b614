"""An FP8 KV cache on any recipe: `kv: fp8` (or `fp8-head`) in a recipe, `--kv-cache` on the command line; its
scales calibrated on the keys and values the quantized layers produce; written as llm-compressor writes them; run
by ptqlab's runtime with the cache in float8 and by transformers (compressed-tensors fake-quantizes the keys and
values on load), which compute the same logits.

The equality with llm-compressor's own scales is in test_interop_llmcompressor.py; the Triton kernels' FP8 write
and the split decode attention in test_triton_interpreter.py (CPU, interpreted) and at the end here (GPU).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptqlab import quantize
from ptqlab.data import CalibrationConfig, load_calibration
from ptqlab.errors import PtqlabError
from ptqlab.quant.kv_cache import FP8_MAX, dequantize_kv, quantize_kv
from ptqlab.recipes import get_recipe, parse_recipe
from ptqlab.runtime import Generator, load_runtime

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TF32_BOUND = 1e-5
"""fp32 logits of two implementations of the same arithmetic (tests/test_runtime.py's bound)."""


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def token_ids(batch=2, length=24, seed=0):
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kv_checkpoint(tiny_model_dir, tmp_path_factory):
    """Factory: (kv format, recipe, architecture) -> a tiny model quantized with that recipe and KV cache, on 8
    calibration chats."""
    from tiny import CHATS, write_jsonl

    made = {}
    chats = write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", CHATS)

    def make(kv="fp8", recipe="w4a16-rtn", arch="llama"):
        if (kv, recipe, arch) not in made:
            calibration = CalibrationConfig(dataset=str(chats), num_samples=8, max_seq_len=48)
            config = {"sliding_window": 8} if arch == "gemma2" else {}
            made[kv, recipe, arch] = quantize(str(tiny_model_dir(arch, **config)), recipe, quiet=True, kv_cache=kv,
                                              out=tmp_path_factory.mktemp(f"{arch}-{recipe}-{kv}"),
                                              calibration=calibration, calib_batch_size=3)
        return made[kv, recipe, arch]

    return make


# ---- the recipe key and the option ------------------------------------------------------------------------------

def test_kv_is_a_recipe_key_on_any_recipe():
    doc = {**get_recipe("w4a16-rtn").to_dict(), "kv": "fp8"}
    recipe = parse_recipe(doc)
    assert recipe.kv == "fp8" and recipe.calibrated and not get_recipe("w4a16-rtn").calibrated
    assert parse_recipe(recipe.to_dict()) == recipe and "kv" not in get_recipe("w4a16").to_dict()
    assert parse_recipe({**get_recipe("w8a8").to_dict(), "kv": "fp8-head"}).kv == "fp8-head"
    assert get_recipe("fp8-dynamic").with_overrides(kv_cache="fp8").kv == "fp8"


@pytest.mark.parametrize("value", ["fp16", "FP8", 8, ["fp8"], True, "int8"])
def test_anything_else_as_kv_is_one_clear_error(value):
    with pytest.raises(PtqlabError, match=r"kv: .* is not a KV-cache format; allowed: fp8 .*fp8-head"):
        parse_recipe({**get_recipe("w4a16-rtn").to_dict(), "kv": value})
    if isinstance(value, str):
        with pytest.raises(PtqlabError, match=r"^--kv-cache .* not a KV-cache format; allowed: fp8"):
            get_recipe("w4a16").with_overrides(kv_cache=value)


def test_the_cli_refuses_a_bad_kv_cache_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from ptqlab.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "no-model"), "--kv-cache", "int4", "--out",
                                      str(tmp_path / "q")])
    assert result.exit_code == 2
    assert any("--kv-cache 'int4': not a KV-cache format; allowed: fp8" in line for line in result.output.splitlines())


def test_the_kv_cache_option_calibrates_a_data_free_recipe(tiny_model_dir, calibration_file, tmp_path):
    """`ptqlab quantize --recipe w4a16-rtn --kv-cache fp8`: the round-to-nearest recipe draws calibration samples for
    the scales, says what it wrote, and records the KV cache in the run's settings and recipe."""
    from typer.testing import CliRunner

    from ptqlab.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir("llama")), "--recipe", "w4a16-rtn", "--kv-cache",
                                      "fp8", "--dataset", str(calibration_file), "--num-samples", "4", "--max-seq-len",
                                      "32", "--device", "cpu", "--out", str(tmp_path / "q"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "with an fp8 KV cache" in result.output and "calibration: 4 samples" in result.output
    record = json.loads((tmp_path / "q" / "ptqlab.json").read_text())
    assert record["settings"]["kv_cache"] == "fp8" and record["recipe"]["kv"] == "fp8"


# ---- calibration and the checkpoint -----------------------------------------------------------------------------

@pytest.mark.parametrize("kv", ["fp8", "fp8-head"])
def test_checkpoint_holds_the_scales_config_and_record(kv_checkpoint, tiny_model_dir, kv):
    """k_scale / v_scale of every attention module in the model dtype and llm-compressor's shape; kv_cache_scheme in
    the config; the KV cache in the run's recipe and settings. A data-free recipe with kv calibrates only the scales:
    its weights are those of the same recipe without kv."""
    path = kv_checkpoint(kv)
    tensors = load_file(path / "model.safetensors")
    shape = (1,) if kv == "fp8" else (2, 1, 1)  # the tiny llama's 2 KV heads
    for layer in range(2):
        for name in ("k_scale", "v_scale"):
            scale = tensors[f"model.layers.{layer}.self_attn.{name}"]
            assert scale.dtype == torch.float32 and scale.shape == shape and bool((scale > 0).all())
    scheme = json.loads((path / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert {k: scheme[k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic", "observer")} == {
        "num_bits": 8, "type": "float", "strategy": "tensor" if kv == "fp8" else "attn_head", "symmetric": True,
        "dynamic": False, "observer": "static_minmax"}
    record = json.loads((path / "ptqlab.json").read_text())
    assert record["settings"]["kv_cache"] == kv and record["recipe"]["kv"] == kv
    assert record["settings"]["calibration"]["num_samples"] == 8
    for layer in record["layers"]:
        assert any(line.startswith(f"kv cache ({kv}): max |key|") for line in layer["details"])
    plain = quantize(str(tiny_model_dir("llama")), "w4a16-rtn", out=path.parent / f"plain-{kv}", quiet=True)
    weights = load_file(plain / "model.safetensors")
    assert weights.keys() == {k for k in tensors if not k.endswith(("k_scale", "v_scale"))}
    assert all(torch.equal(weights[k], tensors[k]) for k in weights)


def test_scales_are_the_largest_cached_key_and_value_over_448(kv_checkpoint):
    """Independently of the engine: the checkpoint read by transformers with its KV quantization off, each
    calibration sample run alone (no padding), the keys (after the rotary embedding) and values each attention
    module hands to its cache observed through compressed-tensors' own hooks. Their largest magnitude per KV head,
    over 448, is the stored per-head scale; the per-tensor scale is the largest head's. fp32 bound: the engine ran
    the same layers on padded batches."""
    from compressed_tensors.modeling.kvcache import register_key_hook, register_value_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for kv in ("fp8", "fp8-head"):
        path = kv_checkpoint(kv)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        record = json.loads((path / "ptqlab.json").read_text())
        samples = load_calibration(AutoTokenizer.from_pretrained(path),
                                   CalibrationConfig(**record["settings"]["calibration"])).samples
        seen = {}
        for i, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            attention.quantization_scheme.input_activations = None  # read the unquantized states

            def observe(name):
                def hook(module, states):
                    peak = states.abs().amax(dim=(0, 2, 3))
                    seen[name] = peak if name not in seen else torch.maximum(seen[name], peak)
                return hook

            register_key_hook(attention, observe((i, "k_scale")))
            register_value_hook(attention, observe((i, "v_scale")))
        with torch.no_grad():
            for sample in samples:
                model(sample[None])
        stored = load_file(path / "model.safetensors")
        assert len(seen) == 2 * len(model.model.layers)
        for (i, name), peak in seen.items():
            expected = peak / FP8_MAX if kv == "fp8-head" else (peak.max() / FP8_MAX).reshape(1)
            assert torch.allclose(stored[f"model.layers.{i}.self_attn.{name}"].flatten(), expected, rtol=TF32_BOUND)


# ---- the runtime and transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("kv,arch", [("fp8", "llama"), ("fp8-head", "llama"), ("fp8", "qwen3"), ("fp8-head", "gemma2")])
def test_runtime_fp8_cache_computes_what_transformers_computes(kv_checkpoint, kv, arch):
    """Both quality paths with the FP8 cache in effect: ptqlab's runtime (CPU reference path, keys and values
    read back from float8 also in a fresh forward, as vLLM's attention reads its cache) and transformers
    (compressed-tensors' fake quantization of the cached states) agree to fp32 rounding; the runtime with its cache
    kept 16-bit is far from both, so the agreement is not the 16-bit logits agreeing. Qwen3's keys pass k_norm
    before the rotary embedding; Gemma 2 (eager attention, its softcap as written) has a window of 8."""
    from transformers import AutoModelForCausalLM

    path = kv_checkpoint(kv, arch=arch)
    model = load_runtime(path, dtype=torch.float32)
    assert model.kv_cache_dtype == torch.float8_e4m3fn and model.kernels["kv_cache"].startswith("fp8")
    ids = token_ids()
    attention = "eager" if arch == "gemma2" else "sdpa"
    with torch.no_grad():
        ours = model(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
        theirs = reference(ids).logits
        model.use_kv_scales(False)
        sixteen = model(ids).logits
    assert relative(ours, theirs) <= TF32_BOUND
    assert relative(sixteen, theirs) > 100 * TF32_BOUND
    assert model.kv_cache_dtype == torch.float32


def test_per_head_scales_reach_each_head(kv_checkpoint):
    path = kv_checkpoint("fp8-head")
    stored = load_file(path / "model.safetensors")
    model = load_runtime(path, dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        k, v = block.kv_scales
        assert torch.equal(k, stored[f"model.layers.{i}.self_attn.k_scale"].flatten())
        assert torch.equal(v, stored[f"model.layers.{i}.self_attn.v_scale"].flatten())


def test_decoding_through_the_fp8_cache_equals_the_full_forward(kv_checkpoint):
    """Step by step through the static float8 cache (what the cache holds is what a full forward reads) gives the
    full forward's logits, and greedy generation picks the full forward's argmax."""
    model = load_runtime(kv_checkpoint("fp8"), dtype=torch.float32)
    ids = token_ids(2, 30, seed=2)
    with torch.no_grad():
        full = model(ids).logits
        model.setup_cache(2, 64)
        assert model.blocks[0].k_cache.dtype == torch.float8_e4m3fn
        steps = [model(ids[:, :6]).logits]
        for t in range(6, 30):
            steps.append(model(ids[:, t:t + 1], torch.tensor([t])).logits)
    assert relative(torch.cat(steps, 1), full) <= TF32_BOUND
    prompt = ids[:1, :8]
    generated = Generator(model, 1, 8 + 16).generate(prompt, 16)[0]
    with torch.no_grad():
        logits = model(torch.cat([prompt[0], generated])[None]).logits[0, 7:-1]
    assert torch.equal(generated, logits.argmax(-1))


def test_quantize_kv_saturates_and_rounds_like_a_float8_cast():
    scale = torch.tensor([0.5, 2.0])
    states = torch.tensor([1000.0, -1000.0, 3.3, 1e-4]).view(1, 1, 4, 1).expand(1, 2, 4, 1)
    stored = quantize_kv(states, scale)
    assert stored.dtype == torch.float8_e4m3fn
    assert stored[0, 0, :2, 0].float().tolist() == [448.0, -448.0]
    assert torch.equal(stored[0, 1].float(), (states[0, 1] / 2.0).to(torch.float8_e4m3fn).float())
    assert torch.equal(dequantize_kv(stored, scale, torch.float32)[0, 0, :2, 0], torch.tensor([224.0, -224.0]))


def test_a_checkpoint_declaring_a_kv_cache_without_scales_is_refused(kv_checkpoint, tiny_model_dir, tmp_path):
    import shutil

    path = shutil.copytree(kv_checkpoint("fp8"), tmp_path / "broken")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PtqlabError, match=r"model.layers.1.self_attn.v_scale: the kv_cache_scheme \(tensor\) needs "
                                          r"shape \[1\], the checkpoint has nothing"):
        load_runtime(path)
    with pytest.raises(PtqlabError, match="has no KV-cache scales"):
        load_runtime(tiny_model_dir("llama")).use_kv_scales()


# ---- GPU: the Triton kernels in the model ------------------------------------------------------------------------

@gpu
def test_gpu_fp8_cache_write_and_split_attention():
    """bf16 on the GPU: the FP8 cache write is quantize_kv of the rotated key and of the value, bit for bit (the
    kernel divides correctly rounded and rounds on the E4M3 grid itself); decode attention split along a long
    cache (the automatic choice, and 1) against float64 attention over the dequantized cache."""
    from ptqlab.runtime import fused

    torch.manual_seed(0)
    b, h, hkv, d, positions, at = 1, 32, 8, 128, 8192, 8000
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16) * 4
    angles = torch.rand(positions, d // 2, device="cuda") * 6
    half = (angles.cos().bfloat16(), angles.sin().bfloat16())
    scales = (torch.rand(hkv, device="cuda") * 0.02 + 0.001, torch.rand(hkv, device="cuda") * 0.02 + 0.001)
    k_cache, v_cache = (torch.randn(b, hkv, positions, d, device="cuda").div(s.view(1, -1, 1, 1)).clamp(-448, 448)
                        .to(torch.float8_e4m3fn) for s in scales)  # CUDA's cast gives NaN beyond 448
    pos = torch.tensor([at], device="cuda")
    rotated = qkv.clone()
    fused.rope_and_cache(rotated, *half, pos, h, hkv, d, k_cache, v_cache, kv_scales=scales)
    k = rotated[..., h * d:(h + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
    v = rotated[..., (h + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
    assert torch.equal(k_cache[:, :, at:at + 1].view(torch.uint8), quantize_kv(k, scales[0]).view(torch.uint8))
    assert torch.equal(v_cache[:, :, at:at + 1].view(torch.uint8), quantize_kv(v, scales[1]).view(torch.uint8))
    keys, values = dequantize_kv(k_cache, scales[0], torch.float64), dequantize_kv(v_cache, scales[1], torch.float64)
    q = rotated[..., :h * d].view(b, h, d).double()
    allowed = torch.arange(positions, device="cuda") <= at
    scores = torch.einsum("bhd,bhtd->bht", q, keys.repeat_interleave(h // hkv, 1)) * d ** -0.5
    expected = torch.einsum("bht,bhtd->bhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1),
                            values.repeat_interleave(h // hkv, 1))
    assert fused.decode_splits(b, hkv, positions, torch.device("cuda")) > 1
    for splits in (None, 1):
        out = fused.decode_attention(rotated[..., :h * d], k_cache, v_cache, pos, d ** -0.5, None, None,
                                     kv_scales=scales, splits=splits)
        assert relative(out.view(b, h, d), expected) < 1e-2, splits


@gpu
@pytest.mark.parametrize("kv", ["fp8", "fp8-head"])
def test_gpu_runtime_with_fp8_cache_matches_the_reference(kv_checkpoint, kv, monkeypatch):
    """The runtime on the GPU (bf16, fused kernels, FP8 cache) against the CPU reference path in fp32, with the bound
    tests/test_runtime.py gives activation-quantized formats (bf16 keys land on the other side of an FP8 rounding
    boundary now and then); CUDA-graph decoding gives eager decoding's tokens; decode attention split along the
    sequence gives the unsplit logits."""
    from ptqlab.runtime import fused

    path = kv_checkpoint(kv)
    model = load_runtime(path, device="cuda", dtype=torch.bfloat16)
    ids = token_ids().cuda()
    with torch.no_grad():
        ours = model(ids).logits
        theirs = load_runtime(path, dtype=torch.float32)(ids.cpu()).logits
    assert relative(ours.cpu(), theirs) < 5e-2
    prompt = ids[:1, :8]
    graphed = Generator(model, 1, 40, graph=True).generate(prompt, 32)
    eager = Generator(model, 1, 40, graph=False).generate(prompt, 32)
    assert torch.equal(graphed, eager)
    long = token_ids(2, 204, seed=3).cuda()  # 3 splits of 200 positions: runs of 128, two of them used
    steps = {}
    for splits in (1, 3):
        monkeypatch.setattr(fused, "decode_splits", lambda *_, n=splits: n)
        with torch.no_grad():
            model.setup_cache(2, 256)
            model(long[:, :200])
            steps[splits] = torch.cat([model(long[:, t:t + 1], torch.tensor([t], device="cuda")).logits
                                       for t in range(200, 204)], 1)
    assert relative(steps[3], steps[1]) < 1e-2
