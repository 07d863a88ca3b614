"""The architectures people quantize now (issue 34): each family row added for them quantizes with the core three
recipes from a tiny random model of its real config class; every expert of an MoE gets its own quantized tensors and
its coverage is recorded; what the row keeps 16-bit (routers, linear attention) stays 16-bit with a line saying why;
the checkpoint is read back (by transformers where it reads it; the run says when it does not); and it holds the
tensors and config llm-compressor writes for the same model and recipe."""

import json

import pytest
import torch
from safetensors import safe_open

from ptqlab import quantize
from ptqlab.data import CalibrationConfig
from ptqlab.engine.experts import unfuse
from ptqlab.families import FAMILIES
from ptqlab.schemes import matches
from tiny import tiny_model

DENSE = ["olmo2", "granite", "smollm3"]
MOE = ["deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe", "granitemoe", "phimoe", "qwen3_next", "qwen3_5_moe"]
CORE = ["fp8-dynamic", "w4a16", "w8a8"]


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            out |= {key: f.get_tensor(key) for key in f.keys()}
    return out


@pytest.mark.parametrize("arch", MOE)
def test_unfused_experts_compute_what_the_fused_ones_compute(arch):
    model = tiny_model(arch)
    tokens = torch.randint(3, model.config.get_text_config().vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(0))
    fused = model(tokens).logits
    assert unfuse(model) >= 1
    torch.testing.assert_close(model(tokens).logits, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", CORE)
@pytest.mark.parametrize("arch", DENSE + MOE)
def test_each_new_family_quantizes_with_the_core_recipes(arch, recipe, tiny_model_dir, calibration_file, tmp_path):
    src = tiny_model_dir(arch)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    out = quantize(str(src), recipe, out=tmp_path / "q", calibration=calibration, quiet=True, device="cpu")
    record = json.loads((out / "ptqlab.json").read_text())
    stored = tensors(out)
    quantized = {key.rpartition(".")[0] for key in stored if key.endswith(".weight_scale")}
    family = FAMILIES[arch]
    config = json.loads((out / "config.json").read_text())
    ignore = config["quantization_config"]["ignore"]
    text = config.get("text_config", config)  # a vision-language model's decoder keys (Qwen3.5)
    layers, prefix = text["num_hidden_layers"], family.layers
    if family.experts is not None:
        layout = family.experts
        count = text[layout.count_key]
        moe_layers = [i for i in range(layers) if f"{prefix}.{i}.{layout.block}.experts.0.{layout.projections[0]}"
                      in quantized]
        assert moe_layers, sorted(quantized)[:5]
        for i in moe_layers:  # every expert projection quantized, the routers not and named in ignore
            assert {f"{prefix}.{i}.{layout.block}.experts.{e}.{p}" for e in range(count)
                    for p in layout.projections} <= quantized
            assert any(name.startswith(f"{prefix}.{i}.") and name.endswith(layout.router) for name in ignore)
        assert not any(name.endswith((f".{layout.router}", f".{layout.stored_router}")) for name in quantized)
        coverage = [entry for layer in record.get("layers", []) for entry in layer.get("experts", [])]
        if recipe != "fp8-dynamic":  # calibrated recipes record how tokens reached each expert
            assert len(coverage) == len(moe_layers) and all(len(entry["tokens"]) == count for entry in coverage)
    for entry in family.keep:  # kept 16-bit, in ignore, and said why
        assert not any(matches(name, entry.pattern) for name in quantized)
        assert any(matches(name, entry.pattern) for name in ignore)
        assert any(entry.why in note for note in record["notes"])
    assert any(f"{prefix}.{i}.self_attn.o_proj" in quantized for i in range(layers))
    readers = [note for note in record["notes"] if note.startswith("checkpoint read back by")]
    not_read = [note for note in record["notes"] if note.startswith("checkpoint not read back by transformers")]
    assert readers or not_read  # read back, or the run says in one line why transformers does not read it
    assert not (readers and not_read)


@pytest.mark.parametrize("scheme, recipe", [("FP8_DYNAMIC", "fp8-dynamic"), ("W4A16", "w4a16-rtn")])
@pytest.mark.parametrize("arch", MOE + ["olmo2"])
def test_checkpoints_hold_what_llmcompressor_writes(arch, scheme, recipe, tiny_model_dir, tmp_path):
    """fp32 tiny models, llm-compressor told to keep 16-bit what ptqlab kept (its config's `ignore`): the same tensor
    names, bitwise equal tensors and the same quantization_config. (Phi-3.5-MoE's router is an nn.Linear in
    transformers, so ptqlab's `ignore` names it as transformers does, mlp.router, which transformers' loader needs to
    leave it unquantized; told only the hub's block name, block_sparse_moe.router, llm-compressor would quantize it.)"""
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    import transformers

    family = FAMILIES[arch]
    src = tiny_model_dir(arch)
    ours = quantize(str(src), recipe, out=tmp_path / "ours", quiet=True, device="cpu")
    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    model = getattr(transformers, family.auto_class).from_pretrained(src, dtype="auto")
    ignore = our_config["ignore"]  # what ptqlab kept 16-bit, by name
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    if arch == "phimoe":  # llm-compressor writes the router under the hub's block: transformers then quantizes it
        their_config["ignore"] = [name.replace("block_sparse_moe.router", "mlp.router") for name in their_config["ignore"]]
    assert our_config == their_config
    a, b = tensors(ours), tensors(tmp_path / "theirs")
    if family.experts is not None and family.experts.projections != ("gate_proj", "up_proj", "down_proj"):
        hub = dict(zip((".gate_proj.", ".up_proj.", ".down_proj."), (f".{p}." for p in family.experts.projections)))
        b = {next((key.replace(theirs, ours) for theirs, ours in hub.items() if ".experts." in key and theirs in key),
                  key): tensor for key, tensor in b.items()}
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if family.norms.offset and "norm" in key:  # llm-compressor rounds (1 + w) - 1 on the way; ptqlab keeps w
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_a_streamed_run_writes_the_in_memory_checkpoint(arch, tiny_model_dir, calibration_file, tmp_path):
    src = tiny_model_dir(arch)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    common = dict(calibration=calibration, quiet=True, device="cpu")
    in_memory = tensors(quantize(str(src), "w4a16", out=tmp_path / "memory", **common))
    streamed = tensors(quantize(str(src), "w4a16", out=tmp_path / "stream", stream=True, **common))
    assert sorted(in_memory) == sorted(streamed)
    assert all(torch.equal(in_memory[key], streamed[key]) for key in in_memory)


@pytest.mark.parametrize("arch", ["granitemoe", "llama4_text"])
def test_streaming_experts_stored_fused_is_refused_in_one_line(arch, tiny_model_dir, tmp_path):
    """The hub stores these experts in one tensor per layer (input_linear, gate_up_proj); --stream reads one tensor per
    expert projection."""
    from ptqlab.errors import PtqlabError

    with pytest.raises(PtqlabError, match="stores its experts fused .* quantize it without --stream"):
        quantize(str(tiny_model_dir(arch)), "w4a16-rtn", out=tmp_path / "q", quiet=True, device="cpu", stream=True)
    assert not (tmp_path / "q").exists()
