"""Checkpoints round-trip: read back by transformers and by the compressed-tensors library.

Tolerance: exact equality. The checkpoint stores exactly the grid values and scales the in-memory model
computes with, and both sides then run the same fp32 arithmetic: fp32 models directly; bf16 models are
loaded by transformers with dtype=float32 and compared with the in-memory model cast to fp32 (stored bf16
scales upcast exactly). In bf16 arithmetic the two sides legitimately differ for activation-quantized
schemes: compressed-tensors' reference forward rounds x/scale to bf16 before rounding to the grid, while
ptqlab (like vLLM's kernels) computes per-token activation scales and quotients in fp32;
`test_bf16_logits_differ_only_by_activation_arithmetic` pins that down.
"""

import json

import pytest
import torch
from safetensors import safe_open

from ptqlab import get_recipe, load_model, quantize, quantize_model
from ptqlab.formats.compressed_tensors import write_checkpoint
from ptqlab.quant.linear import QuantizedLinear
from tiny import ARCHS

RECIPES = ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn", "w8a16-fp8"]


def logits(model, seed=0):
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def in_memory(model_dir, recipe, dtype="auto"):
    loaded = load_model(str(model_dir), dtype=dtype)
    quantize_model(loaded.model, get_recipe(recipe) if isinstance(recipe, str) else recipe, quiet=True)
    return loaded.model


def load_transformers(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_loads_in_transformers_with_identical_logits(tiny_model_dir, tmp_path, arch, recipe):
    src = tiny_model_dir(arch)
    out = quantize(str(src), recipe, out=tmp_path / "q", quiet=True)
    reference = in_memory(src, recipe)
    loaded = load_transformers(out)
    assert torch.equal(logits(loaded), logits(reference))
    # ...and quantization did something: the float model's logits differ.
    assert not torch.equal(logits(load_transformers(src)), logits(reference))


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_checkpoint_round_trips_exactly_in_fp32_arithmetic(tiny_model_dir, tmp_path, recipe):
    src = tiny_model_dir("qwen2", torch.bfloat16)
    out = quantize(str(src), recipe, out=tmp_path / "q", quiet=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = in_memory(src, recipe).float()
    assert torch.equal(logits(load_transformers(out, torch.float32)), logits(reference))


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "w8a8-rtn"])
def test_bf16_logits_differ_only_by_activation_arithmetic(tiny_model_dir, tmp_path, monkeypatch, recipe):
    """In bf16 arithmetic, swapping in compressed-tensors' own bf16 activation fake-quantization makes the
    in-memory model match transformers exactly: the stored weights are identical, only that arithmetic differs."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    import ptqlab.quant.linear

    src = tiny_model_dir("llama", torch.bfloat16)
    out = quantize(str(src), recipe, out=tmp_path / "q", quiet=True)
    theirs = logits(load_transformers(out, torch.bfloat16))
    assert not torch.equal(theirs, logits(in_memory(src, recipe)))

    def bf16_reference(x, args):
        ct_args = QuantizationArgs(num_bits=8, type=args.type, strategy="token", dynamic=True, symmetric=True)
        scale, zero_point = compute_dynamic_scales_and_zp(x, ct_args, module=None)
        return ct_fake_quantize(x, scale, zero_point, ct_args)

    monkeypatch.setattr(ptqlab.quant.linear, "fake_quantize", bf16_reference)
    assert torch.equal(theirs, logits(in_memory(src, recipe)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_checkpoint_reads_back_through_compressed_tensors(tiny_model_dir, tmp_path, recipe):
    """The library's own config model parses our config; its own decompressors give our dequantized weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src = tiny_model_dir("llama", torch.bfloat16)
    out = quantize(str(src), recipe, out=tmp_path / "q", quiet=True)
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert config.quantization_status == "compressed" and config.ignore == ["lm_head"]
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(config.format)

    reference = in_memory(src, recipe)
    modules = {n: m for n, m in reference.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(modules) == 14  # 7 linears x 2 layers; lm_head kept
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" in keys and f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        for name, module in modules.items():
            state = {k.removeprefix(name + "."): f.get_tensor(k) for k in keys if k.rpartition(".")[0] == name}
            weight = compressor.decompress(state, scheme)["weight"]
            assert torch.equal(weight.to(torch.bfloat16), module.dequantized_weight(torch.bfloat16)), name


@pytest.mark.parametrize("recipe,expected", [
    ("fp8-dynamic", {"weight": (torch.float8_e4m3fn, (256, 256)), "weight_scale": (torch.bfloat16, (256, 1))}),
    ("w8a8-rtn", {"weight": (torch.int8, (256, 256)), "weight_scale": (torch.bfloat16, (256, 1))}),
    ("w8a16-fp8", {"weight": (torch.float8_e4m3fn, (256, 256)), "weight_scale": (torch.bfloat16, (256, 1))}),
    ("w4a16-rtn", {"weight_packed": (torch.int32, (256, 32)), "weight_scale": (torch.bfloat16, (256, 2)),
                   "weight_shape": (torch.int64, (2,))}),
])
def test_stored_tensor_layout_per_format(tiny_model_dir, tmp_path, recipe, expected):
    out = quantize(str(tiny_model_dir("llama", torch.bfloat16)), recipe, out=tmp_path / "q", quiet=True)
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {k.removeprefix("model.layers.0.self_attn.q_proj."): f.get_tensor(k)
                  for k in f.keys() if k.startswith("model.layers.0.self_attn.q_proj.")}
    assert {k: (t.dtype, tuple(t.shape)) for k, t in stored.items()} == expected


def test_asymmetric_int4_round_trips(tiny_model_dir, tmp_path):
    from dataclasses import replace

    recipe = get_recipe("w4a16-rtn")
    recipe = replace(recipe, name="w4a16-asym-rtn", scheme=replace(recipe.scheme, weights=replace(recipe.scheme.weights, symmetric=False)))
    src = tiny_model_dir("mistral")
    loaded = load_model(str(src))
    quantize_model(loaded.model, recipe, quiet=True)
    write_checkpoint(tmp_path, loaded.model, loaded.tokenizer, recipe)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        zp = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
    assert zp.dtype == torch.int32 and zp.shape == (256 // 8, 512 // 128)
    assert torch.equal(logits(load_transformers(tmp_path)), logits(loaded.model))


def test_tied_embeddings_are_stored_once_and_stay_tied(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2", tie_word_embeddings=True)
    out = quantize(str(src), "w8a8-rtn", out=tmp_path / "q", quiet=True)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = load_transformers(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded), logits(in_memory(src, "w8a8-rtn")))


def test_quantized_tied_head_is_untied_in_the_checkpoint(tiny_model_dir, tmp_path):
    """Quantizing lm_head of a tied model (--ignore with no lm_head) stores it separately and says so in config."""
    src = tiny_model_dir("qwen2", tie_word_embeddings=True)
    out = quantize(str(src), "fp8-dynamic", out=tmp_path / "q", ignore=[], quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float8_e4m3fn
    reference = in_memory(src, get_recipe("fp8-dynamic").with_overrides(ignore=[]))
    assert torch.equal(logits(load_transformers(out)), logits(reference))


def test_sharded_checkpoint_loads(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    loaded = load_model(str(src))
    result = quantize_model(loaded.model, get_recipe("w4a16-rtn"), quiet=True)
    write_checkpoint(tmp_path, loaded.model, loaded.tokenizer, result.recipe, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(logits(load_transformers(tmp_path)), logits(loaded.model))


def test_run_record_says_how_the_checkpoint_was_made(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = quantize(str(src), "w4a16-rtn", out=tmp_path / "q", seed=7, quiet=True)
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["recipe"]["name"] == "w4a16-rtn" and record["recipe"]["scheme"]["weights"]["group_size"] == 128
    assert record["settings"]["seed"] == 7 and record["settings"]["dtype"] == "float32"
    assert record["quantized_layers"] == 14 and record["ignored_layers"] == ["lm_head"]
    assert {"torch", "transformers", "compressed_tensors", "ptqlab"} <= set(record["versions"])
    assert record["created"] and record["model"] == str(src)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_run_record_reads_back_and_writes_the_same_file(tiny_model_dir, tmp_path):
    """ptqlab.record owns the file: reading a record and writing it again gives the very bytes quantize wrote, so the
    typed record and the on-disk format cannot drift apart."""
    from ptqlab.record import RECORD_NAME, read_record

    out = quantize(str(tiny_model_dir("llama")), "w4a16-rtn", out=tmp_path / "q", seed=7, quiet=True)
    record = read_record(out)
    assert record.recipe_name == "w4a16-rtn" and record.format == "pack-quantized"
    assert record.ignored_layers == ("lm_head",) and record.model_path == str(tiny_model_dir("llama"))
    assert record.request["seed"] == 7 and record.request_differences(record.request) == []
    assert record.to_json() == (out / RECORD_NAME).read_text()
    assert read_record(tmp_path) is None  # no record: not a ptqlab output


def _record_fields():
    return {"model": "m", "model_path": "/m", "model_note": None, "recipe": {"name": "fp8-dynamic"}, "format": "float-quantized",
            "scheme": "FP8", "settings": {}, "quantized_layers": 2, "ignored_layers": ["lm_head"], "notes": [],
            "seconds": 1.0, "created": "2026-01-01T00:00:00+00:00", "versions": {}, "command": ["ptqlab"]}


def test_a_record_from_another_version_reads(tmp_path):
    """Records written before `layers` and `request` existed, or by a newer ptqlab with keys this one does not know."""
    from ptqlab.record import RECORD_NAME, read_record

    (tmp_path / RECORD_NAME).write_text(json.dumps({**_record_fields(), "from_the_future": 1}))
    record = read_record(tmp_path)
    assert record.request is None and record.layers == () and record.recipe_name == "fp8-dynamic"
    assert record.request_differences({"seed": 0}) == ["seed"]  # no request recorded: never reused


@pytest.mark.parametrize("content, reason", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "a JSON list, not an object"),
    (json.dumps({k: v for k, v in _record_fields().items() if k != "model_path"}), "no model_path"),
    (json.dumps({**_record_fields(), "recipe": {}}), "its recipe has no name"),
    (json.dumps({**_record_fields(), "notes": "one"}), "notes is not a list"),
], ids=["not-json", "not-an-object", "key-missing", "recipe-without-name", "wrong-type"])
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, content, reason):
    from ptqlab.errors import PtqlabError
    from ptqlab.record import RECORD_NAME, read_record

    (tmp_path / RECORD_NAME).write_text(content)
    with pytest.raises(PtqlabError) as error:
        read_record(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / RECORD_NAME) in message and reason in message


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_checkpoint_is_verified_by_both_readers(recipe, tiny_model_dir, tmp_path):
    """After writing, transformers and ptqlab's runtime read the checkpoint back; ptqlab.json records who did, with
    which versions, and how close each came (weights only, float32: within the readers' bounds)."""
    from ptqlab.formats.readback import BOUNDS

    out = quantize(str(tiny_model_dir("llama")), recipe, out=tmp_path / "q", quiet=True, device="cpu")
    record = json.loads((out / "ptqlab.json").read_text())
    readers = {check["reader"]: check for check in record["verification"]}
    assert set(readers) == {"transformers", "ptqlab runtime"}
    assert "compressed-tensors" in readers["transformers"]["versions"]
    for reader, check in readers.items():
        assert check["relative_error"] <= BOUNDS[reader] and check["top1"] == 1.0
    assert readers["transformers"]["relative_error"] < 1e-5  # float32 on both sides: the sums' order only


@pytest.mark.parametrize("reader", ["transformers", "ptqlab runtime"])
def test_a_swapped_scale_is_caught_and_nothing_is_written(reader, tiny_model_dir, tmp_path, monkeypatch):
    """A corruption planted at writing (two rows of one layer's scales swapped) loads without an error; each reader
    on its own catches it, and the run leaves no checkpoint."""
    import ptqlab.formats.compressed_tensors as ct
    import ptqlab.formats.readback as readback
    from ptqlab.errors import PtqlabError

    write = ct._linear_tensors

    def swapped(name, layer):
        tensors = write(name, layer)
        if name == "model.layers.1.mlp.down_proj":
            scale = tensors[f"{name}.weight_scale"].clone()
            scale[[0, 1]] = scale[[1, 0]] * 1.5  # rows 0 and 1 traded, and off
            tensors[f"{name}.weight_scale"] = scale
        return tensors

    monkeypatch.setattr(ct, "_linear_tensors", swapped)
    other = "ptqlab runtime" if reader == "transformers" else "transformers"
    logits_of = "_runtime_logits" if other == "ptqlab runtime" else "_transformers_logits"

    def not_read(folder, tokens):
        raise readback._NotRead("left out by this test")

    monkeypatch.setattr(readback, logits_of, not_read)
    name = "ptqlab's runtime" if reader == "ptqlab runtime" else reader
    with pytest.raises(PtqlabError, match=f"does not compute what the quantized model computed when {name} reads"):
        quantize(str(tiny_model_dir("llama")), "w4a16-rtn", out=tmp_path / "q", quiet=True, device="cpu")
    assert not (tmp_path / "q").exists()
