"""Streaming (engine/stream.py): a model read from its safetensors files one decoder layer at a time, its checkpoint
written shard by shard as layers finish, gives the very tensors of the in-memory path, while no more than one
decoder layer is ever in memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ptqlab import quantize
from ptqlab.data import CalibrationConfig
from ptqlab.engine import stream
from ptqlab.formats import compressed_tensors
from ptqlab.errors import PtqlabError
from ptqlab.models import decoder_layers


def stored_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_checkpoint(a, b) -> None:
    ta, tb = stored_tensors(a), stored_tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert different == []
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("recipe, arch, dtype", [
    ("w4a16", "llama", torch.bfloat16),      # GPTQ; bf16 stored, float32 compute on CPUs without bf16
    ("w8a8", "phi3", torch.float32),         # SmoothQuant (fused qkv / gate_up) + GPTQ
    ("w4a16-awq", "gemma2", torch.bfloat16), # AWQ, a norm with offset, tied embeddings
    ("w4a16-rtn", "qwen3", torch.float32),   # data-free
])
def test_streaming_writes_the_same_checkpoint_as_the_in_memory_path(tiny_model_dir, calibration_file, tmp_path, recipe,
                                                                    arch, dtype):
    overrides = {"tie_word_embeddings": True} if arch == "gemma2" else {}
    src = tiny_model_dir(arch, dtype, **overrides)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    common = dict(calibration=calibration, quiet=True, device="cpu")
    in_memory = quantize(str(src), recipe, out=tmp_path / "memory", **common)
    streamed = quantize(str(src), recipe, out=tmp_path / "stream", stream=True, **common)
    assert_same_checkpoint(in_memory, streamed)
    record = json.loads((streamed / "ptqlab.json").read_text())
    assert record["settings"]["stream"] is True


def test_at_most_two_decoder_layers_are_in_memory_at_a_time(tiny_model_dir, calibration_file, tmp_path, monkeypatch):
    """Every time the engine reads a layer (the next one, prefetched while the one before computes), every other
    decoder layer holds no data (meta tensors only)."""
    src = tiny_model_dir("llama", num_hidden_layers=4)
    seen = []
    original = stream.StreamedModel.load_layer

    def load_layer(self, index):
        materialized = [i for i, layer in enumerate(decoder_layers(self.model))
                        if any(t.device.type != "meta" for t in layer.state_dict().values())]
        seen.append((index, materialized))
        return original(self, index)

    monkeypatch.setattr(stream.StreamedModel, "load_layer", load_layer)
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=32)
    quantize(str(src), "w4a16", out=tmp_path / "out", calibration=calibration, quiet=True, device="cpu", stream=True)
    assert seen == [(0, [])] + [(i, [i - 1]) for i in range(1, 4)]


def test_a_streamed_checkpoint_in_several_shards_loads_and_computes_as_the_in_memory_one(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    from ptqlab.runtime import load_runtime

    src = tiny_model_dir("llama", num_hidden_layers=3)
    in_memory = quantize(str(src), "w8a8-rtn", out=tmp_path / "memory", quiet=True, device="cpu")
    monkeypatch.setattr(compressed_tensors, "STREAM_SHARD_BYTES", 200_000)
    streamed = quantize(str(src), "w8a8-rtn", out=tmp_path / "stream", quiet=True, device="cpu", stream=True)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in streamed.glob("*.safetensors"))
    assert not list(streamed.glob("*.partial"))
    assert_same_checkpoint(in_memory, streamed)
    tokens = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = [load_runtime(folder, "cpu")(tokens).logits for folder in (in_memory, streamed)]
    assert torch.equal(logits[0], logits[1])


def test_streaming_needs_safetensors_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_model_dir("llama")
    src = tmp_path / "bin-model"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((original / name).read_bytes())
    torch.save(AutoModelForCausalLM.from_pretrained(original).state_dict(), src / "pytorch_model.bin")
    with pytest.raises(PtqlabError, match=r"holds its weights only as a PyTorch pickle \(pytorch_model\.bin\)"):
        quantize(str(src), "w4a16-rtn", out=tmp_path / "out", quiet=True, device="cpu", stream=True)
    assert not (tmp_path / "out").exists()
