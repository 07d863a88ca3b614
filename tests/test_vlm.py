"""Vision-language models (the families whose row names a `vision` part): their text decoder is quantized with the
core three recipes, their vision tower and projector stay 16-bit under their own names and are listed in the
config's ignore list, the processor files travel with the checkpoint, and transformers reads it back as the
vision-language model it is (formats/readback.py, run at the end of every quantize)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ptqlab import load_model, quantize, quantize_model
from ptqlab.data import CalibrationConfig
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES
from ptqlab.formats.readback import read_back
from ptqlab.formats.validate import validate_checkpoint
from ptqlab.models import decoder_layers
from ptqlab.pipeline import kept_16_bit
from ptqlab.recipes import get_recipe
from tiny import VLM_ARCHS, tiny_model

RECIPES = ["fp8-dynamic", "w4a16", "w8a8"]
PROCESSOR = {
    "preprocessor_config.json": '{"image_processor_type": "TinyImageProcessor", "patch_size": 14}\n',
    "processor_config.json": '{"processor_class": "TinyProcessor"}\n',
    "video_preprocessor_config.json": '{"video_processor_type": "TinyVideoProcessor"}\n',
    "chat_template.json": '{"chat_template": "{% for m in messages %}{{ m[\'content\'] }}{% endfor %}"}\n',
}
"""Processor files as a vision-language model's folder has them (their content is the processor's business: ptqlab
copies them unchanged)."""


@pytest.fixture
def vlm_source(tiny_model_dir):
    """Factory: a saved tiny vision-language model with its processor files."""
    def make(arch: str):
        folder = tiny_model_dir(arch)
        for name, text in PROCESSOR.items():
            (folder / name).write_text(text)
        return folder

    return make


def calibration(calibration_file) -> CalibrationConfig:
    return CalibrationConfig(dataset=str(calibration_file), num_samples=8, max_seq_len=48)


def inside(name: str, arch: str) -> bool:
    return name.startswith(tuple(f"{part}." for part in FAMILIES[arch].vision))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_text_decoder_is_quantized_and_vision_part_kept_16_bit(vlm_source, tmp_path, calibration_file, arch, recipe):
    src = vlm_source(arch)
    out = quantize(str(src), recipe, out=tmp_path / "q", device="cpu", calibration=calibration(calibration_file),
                   quiet=True)
    source = tiny_model(arch)  # the saved model, in memory: its tensors by transformers 5's module names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [type(source).__name__]
    assert {"text_config", "vision_config"} <= set(config)
    assert config["quantization_config"]["ignore"] == kept_16_bit(source)[0] + ["lm_head"]

    tensors, original = load_file(out / "model.safetensors"), source.state_dict()
    vision = {name for name in original if inside(name, arch)}
    assert vision and {name for name in tensors if inside(name, arch)} == vision
    for name in vision:
        assert torch.equal(tensors[name], original[name]), name
    decoder = [f"{FAMILIES[arch].layers}.{i}.{linear}" for i in range(2)
               for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    assert all(f"{name}.weight_scale" in tensors for name in decoder)

    validate_checkpoint(out)  # what bench checks first, from the safetensors headers and the config
    record = json.loads((out / "ptqlab.json").read_text())
    assert sum("the vision tower and projector stay 16-bit" in note for note in record["notes"]) == 1
    assert [check["reader"] for check in record["verification"]] == ["transformers"]
    for name, text in PROCESSOR.items():
        assert (out / name).read_text() == text, name


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_each_vlm_loads_whole_with_its_text_decoder_layers(tiny_model_dir, arch):
    loaded = load_model(str(tiny_model_dir(arch)))
    assert type(loaded.model).__name__.endswith("ForConditionalGeneration")
    assert len(decoder_layers(loaded.model)) == loaded.model.config.get_text_config().num_hidden_layers == 2
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template


def test_read_back_refuses_a_vision_part_transformers_would_quantize(tiny_model_dir, tmp_path):
    """An ignore list that names the vision linears as the hub's older checkpoints do (visual.*, as llm-compressor 0.14
    writes it) does not match transformers 5's module names (model.visual.*): transformers then quantizes those
    linears and initializes their missing scales. The text probe's logits cannot see that; the read-back refuses."""
    src = tiny_model_dir("qwen2_5_vl")
    out = quantize(str(src), "fp8-dynamic", out=tmp_path / "q", quiet=True)
    config = json.loads((out / "config.json").read_text())
    ignore = config["quantization_config"]["ignore"]
    config["quantization_config"]["ignore"] = [name.removeprefix("model.") for name in ignore]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(src))
    quantize_model(loaded.model, get_recipe("fp8-dynamic"), quiet=True)
    with pytest.raises(PtqlabError, match=r"does not read the vision part.*quantizes 7 of its 16-bit linears "
                                          r"\(e.g. model.visual.blocks.0.attn.qkv\)"):
        read_back(out, loaded.model)


def test_streaming_a_vlm_is_refused_in_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(PtqlabError, match="--stream does not read vision-language models yet.*gemma3 model.*without "
                                          "--stream"):
        quantize(str(tiny_model_dir("gemma3")), "fp8-dynamic", out=tmp_path / "q", stream=True, quiet=True)
    assert not (tmp_path / "q").exists()


def test_bench_loads_a_vlm_checkpoint_through_transformers(tiny_model_dir, tmp_path):
    """The fast runtime runs text-only decoders: bench measures a vision-language checkpoint through transformers,
    loaded whole by its image-text class, and decodes with it."""
    from ptqlab.measure.speed import greedy_decode
    from ptqlab.measure.variant import load_variant, resolve_runtime

    out = quantize(str(tiny_model_dir("mistral3")), "fp8-dynamic", out=tmp_path / "q", quiet=True)
    runtime, note = resolve_runtime("auto", torch.device("cuda"), out)  # on a GPU, auto would take the fast runtime
    assert runtime == "transformers" and "does not run 'mistral3' models" in note
    config = json.loads((out / "config.json").read_text())
    variant = load_variant(out, "transformers", torch.device("cpu"), config, context=32, generation=8)
    assert type(variant.model).__name__ == "Mistral3ForConditionalGeneration"
    assert greedy_decode(variant.model, torch.tensor([[5, 6, 7]]), 2, lambda: None)["decode_s"] > 0
