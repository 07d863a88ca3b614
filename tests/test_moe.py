"""Mixture-of-experts models (engine/experts.py): every expert's projections are linears of their own that compute
what transformers' fused experts compute; each expert is calibrated on the tokens routed to it, or on all of its
layer's tokens when the router starved it; the checkpoint names one tensor per expert projection as the hub
checkpoints do, keeps the routers 16-bit and loads back in transformers; an unsupported MoE is refused in one line."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from ptqlab import quantize
from ptqlab.data import CalibrationConfig, CalibrationSet
from ptqlab.engine.capture import capture, make_batches
from ptqlab.engine.experts import RoutedExperts, routed_experts, unfuse
from ptqlab.engine.statistics import collect
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES
from ptqlab.models import decoder_layers
from tiny import tiny_model

MOE = ["qwen3_moe", "qwen2_moe", "mixtral", "llama4_text", "gpt_oss"]
EXPERT = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"), "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
          "mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "gpt_oss": ("mlp", "gate_proj", "up_proj", "down_proj"),
          "llama4_text": ("feed_forward", "gate_proj", "up_proj", "down_proj")}
EXPERTS = 8
MOE_LAYERS = {"llama4_text": [1]}
"""The tiny models' MoE layers where not every layer (tests/tiny.EXTRA: Llama 4's layer 0 is dense)."""


def checkpoint_keys(folder) -> set[str]:
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize("arch", MOE)
def test_unfused_experts_compute_what_the_fused_ones_compute(arch):
    model = tiny_model(arch)
    if arch == "gpt_oss":  # expert weights large enough that the SwiGLU's clamps (±7) engage
        for layer in decoder_layers(model):
            layer.mlp.experts.gate_up_proj.data *= 300
    tokens = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    fused = model(tokens).logits
    if arch == "gpt_oss":
        inputs = []
        hook = decoder_layers(model)[0].mlp.experts.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        model(tokens)
        hook.remove()
        assert ((inputs[0] @ decoder_layers(model)[0].mlp.experts.gate_up_proj[0]).abs() > 7).float().mean() > 0.1
    layers = MOE_LAYERS.get(arch, range(model.config.num_hidden_layers))
    assert unfuse(model) == len(layers)
    block = FAMILIES[arch].experts.module
    assert all(isinstance(routed_experts(decoder_layers(model)[i]).get(f"{block}.experts"), RoutedExperts) for i in layers)
    torch.testing.assert_close(model(tokens).logits, fused, rtol=1e-5, atol=1e-5)


def test_llama4_experts_are_calibrated_on_their_tokens_scaled_by_the_routing_weight():
    """Llama 4 multiplies an expert's input by sigmoid(the token's logit for it): what the expert's linears see
    (and their statistics count) is each routed token, weighted, and no other."""
    model = tiny_model("llama4_text", num_hidden_layers=1, interleave_moe_layer_step=1)
    unfuse(model)
    block = decoder_layers(model)[0].feed_forward
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    seen = {}
    hooks = [block.experts[e].gate_proj.register_forward_pre_hook(lambda m, args, e=e: seen.__setitem__(e, args[0]))
             for e in range(EXPERTS)]
    block(x)
    for hook in hooks:
        hook.remove()
    logits = block.router(x)[1]
    top = torch.topk(logits, model.config.num_experts_per_tok, dim=1).indices
    for e in range(EXPERTS):
        _, tokens = torch.where(top.T == e)  # slot by slot, as transformers takes them
        expected = x[tokens] * torch.sigmoid(logits[tokens, e, None])
        if len(tokens):
            torch.testing.assert_close(seen[e], expected, rtol=1e-6, atol=1e-7)
        else:
            assert e not in seen


def _first_layer_statistics(arch, min_expert_tokens):
    model = tiny_model(arch, num_hidden_layers=1, **({"interleave_moe_layer_step": 1} if arch == "llama4_text" else {}))
    unfuse(model)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (30, 30, 25, 12)]
    batches = make_batches(CalibrationSet(samples, "random tokens"), 4)
    capture(model, batches, torch.device("cpu"))
    layer = decoder_layers(model)[0]
    linears = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    masks = [None if bool(b.attention_mask.all()) else b.attention_mask for b in batches]
    stats = collect(layer, linears, batches, masks, 0, torch.device("cpu"), frozenset({"hessian"}), "model.layers.0",
                    min_expert_tokens)
    return model, stats, sum(len(s) for s in samples)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "llama4_text", "gpt_oss"])
def test_each_expert_counts_the_real_tokens_routed_to_it(arch):
    """Padding never reaches an expert's statistics, and every real token reaches exactly top-k experts."""
    model, stats, real = _first_layer_statistics(arch, min_expert_tokens=1)
    [coverage] = stats.coverage
    assert sum(coverage["tokens"]) == model.config.num_experts_per_tok * real
    fell_back = set(coverage["fell_back"])
    assert fell_back == {e for e, n in enumerate(coverage["tokens"]) if n < 1}
    for e, n in enumerate(coverage["tokens"]):
        if e not in fell_back:
            name = f"model.layers.0.{FAMILIES[arch].experts.module}.experts.{e}.{EXPERT[arch][1]}"
            assert stats.counts[name] == n and torch.isfinite(stats.hessian(name)).all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_a_starved_expert_is_calibrated_on_every_real_token_of_its_layer(arch):
    model, stats, real = _first_layer_statistics(arch, min_expert_tokens=10**6)
    [coverage] = stats.coverage
    assert coverage["fell_back"] == list(range(EXPERTS))
    _, gate, up, down = EXPERT[arch]
    layer = decoder_layers(model)[0]
    for e in range(EXPERTS):
        prefix = f"model.layers.0.mlp.experts.{e}"
        assert stats.counts[stats.owner(f"{prefix}.{gate}")] == real and stats.counts[f"{prefix}.{down}"] == real
        # gate/up read the layer's MoE input for every real token: the same Hessian for every expert
        torch.testing.assert_close(stats.hessian(f"{prefix}.{up}"), stats.hessian(f"model.layers.0.mlp.experts.0.{up}"))
    assert isinstance(layer.mlp.experts, RoutedExperts) and not layer.mlp.experts.all_tokens  # reset after


@pytest.mark.parametrize("arch", MOE)
def test_the_fallback_to_every_token_leaves_the_layer_output_unchanged(arch):
    """A starved expert computes on every real token for its statistics; its output still goes to the routed tokens
    only, at their weight (Llama 4: its routed tokens' inputs weighted as when routed)."""
    from ptqlab.engine.experts import routing

    model = tiny_model(arch, num_hidden_layers=1, **({"interleave_moe_layer_step": 1} if arch == "llama4_text" else {}))
    unfuse(model)
    layer = decoder_layers(model)[0]
    block = layer.get_submodule(FAMILIES[arch].experts.module)
    x = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, 9:] = False
    plain = block(x)
    with routing(layer, real, {f"{FAMILIES[arch].experts.module}.experts": frozenset(range(EXPERTS))}):
        fallback = block(x)
    # padding leaves the statistics, not the output: compare the real tokens
    plain, fallback = (out[0] if isinstance(out, tuple) else out for out in (plain, fallback))
    mask = real.flatten()
    torch.testing.assert_close(fallback.reshape(-1, x.shape[-1])[mask], plain.reshape(-1, x.shape[-1])[mask],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_a_quantized_moe_checkpoint_has_one_tensor_per_expert_projection_and_loads_back(arch, tiny_model_dir,
                                                                                       calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(arch)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(src), "w4a16", out=tmp_path / "q", calibration=calibration, quiet=True, device="cpu")
    keys = checkpoint_keys(out)
    block, *projections = EXPERT[arch]
    for layer in range(2):
        for e in range(EXPERTS):
            for projection in projections:
                assert f"model.layers.{layer}.{block}.experts.{e}.{projection}.weight_packed" in keys
        assert f"model.layers.{layer}.{block}.gate.weight" in keys  # the router, 16-bit
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {f"model.layers.{i}.{block}.gate" for i in range(2)} <= set(config["ignore"])  # the routers, by name
    record = json.loads((out / "ptqlab.json").read_text())
    coverage = [entry for layer in record["layers"] for entry in layer.get("experts", [])]
    assert len(coverage) == 2 and all(len(entry["tokens"]) == EXPERTS for entry in coverage)
    assert any(note.startswith("experts: 16 expert-layers routed") for note in record["notes"])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.isfinite(reloaded(torch.tensor([[5, 6, 7, 8]])).logits).all()


STORED = {"fp8-dynamic": ("weight", torch.float8_e4m3fn), "w4a16": ("weight_packed", torch.int32),
          "w8a8": ("weight", torch.int8)}
"""A quantized linear's grid tensor in each core recipe's format."""


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "w4a16", "w8a8"])
@pytest.mark.parametrize("arch", ["llama4_text", "gpt_oss"])
def test_llama4_and_gpt_oss_quantize_every_expert_and_keep_routers_and_sinks(arch, recipe, tiny_model_dir,
                                                                              calibration_file, tmp_path):
    """Every expert projection of every MoE layer quantized under the hub names (gpt-oss: with its bias, as it was),
    Llama 4's shared expert and dense layers too; the routers 16-bit and named in the ignore list, gpt-oss's
    attention sinks as they were; each layer's expert coverage recorded; the read-back verified where transformers
    reads these experts (Llama 4) and said to be impossible where it does not (gpt-oss)."""
    from safetensors.torch import load_file

    src = tiny_model_dir(arch)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(src), recipe, out=tmp_path / "q", calibration=calibration, quiet=True, device="cpu")
    tensors, source = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    block, *projections = EXPERT[arch]
    grid, dtype = STORED[recipe]
    moe_layers = MOE_LAYERS.get(arch, [0, 1])
    for layer in moe_layers:
        prefix = f"model.layers.{layer}.{block}"
        for e in range(EXPERTS):
            for projection in projections:
                assert tensors[f"{prefix}.experts.{e}.{projection}.{grid}"].dtype == dtype
        assert tensors[f"{prefix}.router.weight"].dtype == torch.float32  # 16-bit: the tiny model's own dtype
    if arch == "gpt_oss":
        for layer in moe_layers:
            fused = source[f"model.layers.{layer}.mlp.experts.gate_up_proj_bias"]
            for e in range(EXPERTS):
                expert = f"model.layers.{layer}.mlp.experts.{e}"
                assert torch.equal(tensors[f"{expert}.gate_proj.bias"], fused[e, ::2])
                assert torch.equal(tensors[f"{expert}.up_proj.bias"], fused[e, 1::2])
                assert torch.equal(tensors[f"{expert}.down_proj.bias"],
                                   source[f"model.layers.{layer}.mlp.experts.down_proj_bias"][e])
            for name in ("self_attn.sinks", "mlp.router.bias", "self_attn.q_proj.bias"):
                assert torch.equal(tensors[f"model.layers.{layer}.{name}"], source[f"model.layers.{layer}.{name}"])
    else:
        assert {f"model.layers.0.feed_forward.{p}_proj.{grid}" for p in ("gate", "up", "down")} <= set(tensors)
        assert {f"model.layers.1.feed_forward.shared_expert.{p}_proj.{grid}" for p in ("gate", "up", "down")} <= set(tensors)
        assert not any(key.startswith("model.layers.0.feed_forward.experts") for key in tensors)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == [f"model.layers.{i}.{block}.router" for i in moe_layers] + ["lm_head"]
    record = json.loads((out / "ptqlab.json").read_text())
    coverage = [entry for layer in record["layers"] for entry in layer.get("experts", [])]
    calibrated = [f"model.layers.{i}.{FAMILIES[arch].experts.module}.experts" for i in moe_layers]
    assert [entry["module"] for entry in coverage] == (calibrated if recipe != "fp8-dynamic" else [])  # data-free
    assert all(len(entry["tokens"]) == EXPERTS for entry in coverage)
    notes = " ".join(record["notes"])
    if arch == "llama4_text":
        assert "checkpoint read back by transformers: its logits are within" in notes
    else:
        assert "checkpoint not read back by transformers: it does not read gpt_oss's per-expert tensors" in notes


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, columns] -> the hub's MXFP4 (gpt-oss): blocks uint8 [..., rows, columns / 32, 16], two E2M1 codes a
    byte (the even column in the low nibble, sign in bit 3), and scales uint8 [..., rows, columns / 32], the E8M0
    exponent (bias 127) that brings each group's largest |value| into [4, 8) (rounded to the nearest E2M1 value)."""
    groups = weight.double().unflatten(-1, (-1, 32))
    exponent = torch.floor(torch.log2(groups.abs().amax(-1).clamp_min(2.0 ** -100))) - 2
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled.abs()[..., None] - E2M1.double()).abs().argmin(-1) | ((scaled < 0).long() << 3)
    return (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8), (exponent + 127).to(torch.uint8)


def from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The values MXFP4 encodes, in float64: E2M1 value times 2^(scale - 127)."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    values = E2M1.double()[codes & 7] * torch.where(codes & 8 > 0, -1.0, 1.0)
    return (values * torch.exp2(scales.double() - 127)[..., None]).flatten(-2)  # [..., rows, groups, 32] -> columns


def save_mxfp4_gpt_oss(folder) -> dict[str, torch.Tensor]:
    """A tiny gpt-oss checkpoint as the hub ships gpt-oss (bf16, experts in MXFP4: `<fused>_blocks` and `_scales`
    per expert [out, in] row, biases bf16, quantization_config mxfp4) -> the expert weights it encodes, by their name
    in transformers' model ([E, in, out], float64)."""
    from safetensors.torch import load_file, save_file

    from tiny import save_tiny_model

    save_tiny_model(folder, "gpt_oss", torch.bfloat16)
    tensors, encoded = load_file(folder / "model.safetensors"), {}
    g = torch.Generator().manual_seed(5)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weight = tensors.pop(key).transpose(1, 2)  # [E, out, in], as the hub stores them
        weight = weight * torch.exp2(torch.randint(-8, 4, weight.shape[:2], generator=g))[..., None]  # scales spread
        blocks, scales = to_mxfp4(weight)
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
        encoded[key] = from_mxfp4(blocks, scales).transpose(1, 2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return encoded


def test_gpt_oss_shipped_in_mxfp4_is_decoded_exactly_and_quantized_again(calibration_file, tmp_path):
    """gpt-oss as the hub ships it: its MXFP4 experts load as exactly the values they encode (E2M1 times
    2^(scale - 127), in bf16), the run says so in one line, and the checkpoint holds them quantized by the recipe
    (compressed-tensors, one tensor per expert projection), no MXFP4 left. float16, which cannot hold every such
    value, is refused."""
    from ptqlab.models import load_model

    src = tmp_path / "gpt-oss-mxfp4"
    encoded = save_mxfp4_gpt_oss(src)
    model = load_model(str(src)).model
    assert len(encoded) == 4 and model.dtype == torch.bfloat16
    for name, values in encoded.items():
        decoded = model.get_parameter(name)
        assert decoded.dtype == torch.bfloat16 and torch.equal(decoded.double(), values), name
        assert len(torch.unique(values.abs())) > 3 * len(E2M1)  # E2M1 magnitudes under many scales: no trivial encoding

    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(src), "w4a16", out=tmp_path / "q", calibration=calibration, quiet=True, device="cpu")
    record = json.loads((out / "ptqlab.json").read_text())
    assert [n for n in record["notes"] if "MXFP4" in n] == [
        "gpt_oss experts shipped in MXFP4: decoded exactly to bfloat16 and re-quantized as int4 symmetric weights "
        "(group 128), 16-bit activations"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    keys = checkpoint_keys(out)
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in keys
    assert not any(key.endswith(("_blocks", "_scales")) for key in keys)
    with pytest.raises(PtqlabError, match=r"ships its experts in MXFP4, whose power-of-two scales reach beyond "
                                          r"float16's range: use --dtype bfloat16 or float32"):
        quantize(str(src), "w4a16-rtn", out=tmp_path / "fp16", dtype="float16", quiet=True, device="cpu")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_streamed_moe_run_writes_the_in_memory_checkpoint(arch, tiny_model_dir, calibration_file, tmp_path):
    src = tiny_model_dir(arch)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    common = dict(calibration=calibration, quiet=True, device="cpu")
    in_memory = quantize(str(src), "w4a16", out=tmp_path / "memory", **common)
    streamed = quantize(str(src), "w4a16", out=tmp_path / "stream", stream=True, **common)
    assert checkpoint_keys(in_memory) == checkpoint_keys(streamed)
    for file in in_memory.glob("*.safetensors"):
        with safe_open(file, "pt") as a, safe_open(streamed / file.name, "pt") as b:
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "w8a8", "w4a16-awq", "w4a16-rtn", "w8a8-rtn"])
def test_every_recipe_quantizes_every_expert(recipe, tiny_model_dir, calibration_file, tmp_path):
    src = tiny_model_dir("qwen2_moe")
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(src), recipe, out=tmp_path / "q", calibration=calibration, quiet=True, device="cpu")
    record = json.loads((out / "ptqlab.json").read_text())
    keys = checkpoint_keys(out)
    scales = {k.rpartition(".")[0] for k in keys if k.endswith(".weight_scale")}
    expected = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(EXPERTS)
                for p in ("gate_proj", "up_proj", "down_proj")}
    assert expected <= scales, sorted(expected - scales)[:3]
    assert {f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")} <= scales
    assert not any("shared_expert_gate" in s or s.endswith("mlp.gate") for s in scales)  # routers stay 16-bit
    assert record["quantized_layers"] == len(expected) + 2 * (4 + 3)  # + attention and shared expert per layer


def test_an_unsupported_moe_architecture_is_refused_in_one_line(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("ernie4_5_moe", vocab_size=300, hidden_size=64, intermediate_size=32,
                                  moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, moe_num_experts=4, moe_k=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ernie")
    supported = ", ".join(sorted(name for name, row in FAMILIES.items() if row.experts is not None))
    with pytest.raises(PtqlabError, match=r"^ernie4_5_moe is a mixture-of-experts architecture ptqlab does not support "
                                          rf"yet \(supported: {re.escape(supported)}\)"):
        quantize(str(tmp_path / "ernie"), "w4a16-rtn", out=tmp_path / "q", quiet=True, device="cpu")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch, recipe", [("qwen3_moe", "w4a16"), ("qwen2_moe", "w4a16-rtn"), ("mixtral", "w4a16"),
                                          ("qwen3_moe", None)])
def test_the_runtime_runs_moe_checkpoints_as_transformers_reads_them(arch, recipe, tiny_model_dir, calibration_file,
                                                                     tmp_path):
    """ptqlab's runtime (its CPU reference path) against transformers on the same checkpoint, in fp32: the routing
    and every expert agree to rounding, 16-bit and quantized."""
    from transformers import AutoModelForCausalLM

    from ptqlab.runtime import load_runtime

    folder = tiny_model_dir(arch)
    if recipe is not None:
        calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
        folder = quantize(str(folder), recipe, out=tmp_path / "q", calibration=calibration, quiet=True, device="cpu")
    tokens = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(tokens).logits
    runtime = load_runtime(folder, "cpu", torch.float32)
    assert runtime.blocks[0].moe is not None and len(runtime.blocks[0].moe.experts) == EXPERTS
    torch.testing.assert_close(runtime(tokens).logits, reference, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_that_reads_back_differently_fails_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """Expert tensors under names the loader does not map (it initializes those experts at random) load without an
    error: the read-back catches it, and nothing is written."""
    import ptqlab.formats.compressed_tensors as ct

    src = tiny_model_dir("qwen3_moe")
    good = quantize(str(src), "w4a16-rtn", out=tmp_path / "good", quiet=True, device="cpu")
    notes = " ".join(json.loads((good / "ptqlab.json").read_text())["notes"])
    assert "checkpoint read back by transformers: its logits are within" in notes
    monkeypatch.setattr(ct, "checkpoint_name", lambda name, layout: name.replace(".experts.", ".expert."))
    with pytest.raises(PtqlabError, match=r"^the checkpoint written to .* does not compute what the quantized model "
                                          r"computed when transformers reads it back"):
        quantize(str(src), "w4a16-rtn", out=tmp_path / "bad", quiet=True, device="cpu")
    assert not (tmp_path / "bad").exists()


def test_the_report_shows_each_moe_variants_expert_coverage(tiny_model_dir, calibration_file, tmp_path):
    from ptqlab.measure.variant import describe_checkpoint
    from ptqlab.report import expert_coverage_lines

    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(tiny_model_dir("qwen3_moe")), "w4a16", out=tmp_path / "q", calibration=calibration, quiet=True,
                   device="cpu", min_expert_tokens=40)
    record = json.loads((out / "ptqlab.json").read_text())
    identity = describe_checkpoint(out)
    coverage = identity["expert_coverage"]
    assert [c["layer"] for c in coverage] == [0, 1]
    for c, layer in zip(coverage, record["layers"]):
        [entry] = layer["experts"]
        assert (c["min"], c["max"], c["fell_back"]) == (min(entry["tokens"]), max(entry["tokens"]),
                                                        sum(n < 40 for n in entry["tokens"]))
    lines = expert_coverage_lines([{"name": "w4a16", **identity}, {"name": "bf16"}])
    assert lines[1] == "## Expert coverage: w4a16" and len(lines) == 5 + len(coverage)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("arch, recipe, fmt", [("qwen3_moe", None, "16-bit"), ("qwen3_moe", "w4a16-rtn", "int4"),
                                               ("qwen2_moe", "fp8-dynamic", "fp8"), ("mixtral", "w8a8-rtn", "int8")])
def test_gpu_decode_runs_the_stacked_experts_in_a_cuda_graph(arch, recipe, fmt, tiny_model_dir, tmp_path):
    """On a GPU a step of a few tokens runs the stacked expert kernels (only the chosen experts' weights read, no
    host sync): they agree with the grouped per-expert path, and greedy decoding in a CUDA graph generates exactly
    what eager steps generate."""
    from ptqlab.runtime import load_runtime
    from ptqlab.runtime.generate import Generator

    folder = tiny_model_dir(arch)
    if recipe is not None:
        folder = quantize(str(folder), recipe, out=tmp_path / "q", quiet=True, device="cpu")
    runtime = load_runtime(folder, "cuda", torch.bfloat16)
    moe = runtime.blocks[0].moe
    assert moe.stacked is not None and moe.stacked.format == fmt and "stacked" in runtime.kernels["experts"]
    x = torch.randn(4, 1, runtime.config.hidden_size, device="cuda", dtype=torch.bfloat16,
                    generator=torch.Generator("cuda").manual_seed(0))
    stacked = moe(x)
    moe.stacked, kept = None, moe.stacked
    grouped = moe(x)
    moe.stacked = kept
    # bf16 rounding (the stacked kernels accumulate in fp32 and round once); 8-bit inputs requantized from it
    assert float((stacked - grouped).float().norm() / grouped.float().norm()) < 3e-2
    prompt = torch.randint(3, 300, (2, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    graphed = Generator(runtime, 2, 32)
    assert graphed.use_graph
    tokens = graphed.generate(prompt, 12)
    assert graphed.graph is not None
    assert torch.equal(tokens, Generator(runtime, 2, 32, graph=False).generate(prompt, 12))


def test_experts_quantized_in_batches_equal_experts_quantized_one_by_one(tiny_model_dir, calibration_file, tmp_path,
                                                                          monkeypatch):
    """GPTQ of an MoE layer's same-shaped expert linears runs batched (engine/quantize.py `batches`): the checkpoint
    is bitwise what quantizing them one at a time writes."""
    import ptqlab.engine.quantize as engine_quantize

    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    src = str(tiny_model_dir("qwen3_moe"))
    batched = quantize(src, "w4a16", out=tmp_path / "batched", calibration=calibration, quiet=True, device="cpu")
    layer = dict.fromkeys(f"model.layers.0.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj"))
    assert any(len(group) >= engine_quantize.BATCH_MIN for group in engine_quantize.batches(
        {name: torch.nn.Linear(256, 128) for name in layer}))
    monkeypatch.setattr(engine_quantize, "BATCH_MIN", 10**9)
    alone = quantize(src, "w4a16", out=tmp_path / "alone", calibration=calibration, quiet=True, device="cpu")
    keys = checkpoint_keys(batched)
    assert keys == checkpoint_keys(alone) and any(".experts.7.down_proj.weight_packed" in k for k in keys)
    for file in batched.glob("*.safetensors"):
        with safe_open(file, "pt") as a, safe_open(alone / file.name, "pt") as b:
            for key in a.keys():  # noqa: SIM118 (a safetensors handle)
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
