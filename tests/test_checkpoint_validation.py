"""validate_checkpoint: every checkpoint ptqlab writes passes; each planted corruption is refused in one line that
names the folder, the tensor and the mismatch; and bench refuses a corrupt variant instead of ranking it."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptqlab import get_recipe, load_model, quantize, quantize_model
from ptqlab.errors import PtqlabError
from ptqlab.formats.compressed_tensors import write_checkpoint
from ptqlab.formats.validate import validate_checkpoint
from tiny import ARCHS

ASYMMETRIC = "w4a16-asym-rtn"
RECIPES = ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn", ASYMMETRIC, "nvfp4a16", "mxfp4a16"]
CORRUPTED = "the checkpoint is corrupted; quantize it again"


def recipe(name):
    if name != ASYMMETRIC:
        return name
    base = get_recipe("w4a16-rtn")
    weights = replace(base.scheme.weights, symmetric=False)
    return replace(base, name=ASYMMETRIC, scheme=replace(base.scheme, weights=weights))


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """One checkpoint per recipe, of the tiny llama (float32; group 128; down_proj is [256, 512])."""
    root = tmp_path_factory.mktemp("checkpoints")
    src = str(tiny_model_dir("llama"))
    return {name: quantize(src, recipe(name), out=root / name, quiet=True) for name in RECIPES}


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder):
        return shutil.copytree(folder, tmp_path / folder.name)

    return copy


def rewrite(file, change):
    """Rewrite a safetensors file with `change` applied to its tensors (a valid file with altered contents)."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def refusal(folder):
    """validate_checkpoint's one-line message for `folder`."""
    with pytest.raises(PtqlabError) as caught:
        validate_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(folder))
    return message


# ---------------------------------------------------------------- valid folders pass


@pytest.mark.parametrize("name", RECIPES)
def test_every_checkpoint_ptqlab_writes_passes(checkpoints, name):
    validate_checkpoint(checkpoints[name])


@pytest.mark.parametrize("arch", ARCHS)
def test_16bit_folders_of_every_standard_architecture_pass(tiny_model_dir, arch):
    validate_checkpoint(tiny_model_dir(arch))


def test_fused_biased_tied_and_bf16_checkpoints_pass(tiny_model_dir, tmp_path):
    validate_checkpoint(quantize(str(tiny_model_dir("phi3")), recipe(ASYMMETRIC), out=tmp_path / "phi3", quiet=True))
    tied = tiny_model_dir("qwen2", torch.bfloat16, tie_word_embeddings=True)
    validate_checkpoint(tied)
    validate_checkpoint(quantize(str(tied), "w8a8-rtn", out=tmp_path / "qwen2", quiet=True))
    validate_checkpoint(quantize(str(tied), "fp8-dynamic", out=tmp_path / "head", ignore=[], quiet=True))


def test_sharded_checkpoint_passes_and_a_missing_shard_is_named(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir("llama")))
    result = quantize_model(loaded.model, get_recipe("w4a16-rtn"), quiet=True)
    write_checkpoint(tmp_path, loaded.model, loaded.tokenizer, result.recipe, max_shard_bytes=200_000)
    validate_checkpoint(tmp_path)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    listed = sorted(k for k, v in weight_map.items() if v == shard)
    (tmp_path / shard).unlink()
    assert refusal(tmp_path) == (
        f"{tmp_path}: {shard} is missing; model.safetensors.index.json lists {len(listed)} tensors in it "
        f"(e.g. {listed[0]}): the checkpoint is incomplete; quantize it again")


# ---------------------------------------------------------------- planted corruptions


@pytest.mark.parametrize("name,tensor,cut,config", [
    ("w4a16-rtn", "model.layers.1.mlp.down_proj.weight_scale", (256, 3), "group size 128, input 512"),
    ("w8a8-rtn", "model.layers.0.self_attn.k_proj.weight_scale", (127, 1), "per-channel scales, output 128"),
])
def test_a_weight_scale_cut_to_the_wrong_shape_is_named(checkpoints, copy_of, name, tensor, cut, config):
    folder = copy_of(checkpoints[name])
    rewrite(folder / "model.safetensors", lambda t: t.update({tensor: t[tensor][: cut[0], : cut[1]].clone()}))
    good = (cut[0] + 1, 1) if cut[1] == 1 else (cut[0], cut[1] + 1)
    assert refusal(folder) == (f"{folder}: {tensor} has shape [{cut[0]}, {cut[1]}], the config ({config}) needs "
                               f"[{good[0]}, {good[1]}]: {CORRUPTED}")


def test_a_missing_zero_point_on_asymmetric_weights_is_named(checkpoints, copy_of):
    folder = copy_of(checkpoints[ASYMMETRIC])
    rewrite(folder / "model.safetensors", lambda t: t.pop("model.layers.0.mlp.down_proj.weight_zero_point"))
    assert refusal(folder) == (
        f"{folder}: model.layers.0.mlp.down_proj.weight_zero_point is missing, the config (asymmetric int4 weights, "
        f"group size 128, input 512, packed into int32 along output 256) needs it: {CORRUPTED}")


@pytest.mark.parametrize("name,tensor,dtype,needs", [
    ("fp8-dynamic", "model.layers.0.self_attn.q_proj.weight_scale", torch.float16,
     "has dtype float16, the config (the model's dtype float32) needs float32"),
    ("fp8-dynamic", "model.layers.1.mlp.up_proj.weight", torch.bfloat16,
     "has dtype bfloat16, the config (float-quantized fp8 weights) needs float8_e4m3fn"),
    ("w4a16-rtn", "model.layers.0.mlp.gate_proj.weight_packed", torch.int64,
     "has dtype int64, the config (int4 packed into int32) needs int32"),
])
def test_a_wrong_dtype_is_named(checkpoints, copy_of, name, tensor, dtype, needs):
    folder = copy_of(checkpoints[name])
    rewrite(folder / "model.safetensors", lambda t: t.update({tensor: t[tensor].to(dtype)}))
    assert refusal(folder) == f"{folder}: {tensor} {needs}: {CORRUPTED}"


def test_a_wrong_weight_shape_value_is_named(checkpoints, copy_of):
    folder = copy_of(checkpoints["w4a16-rtn"])
    tensor = "model.layers.0.self_attn.o_proj.weight_shape"
    rewrite(folder / "model.safetensors", lambda t: t.update({tensor: torch.tensor([256, 255])}))
    assert refusal(folder) == (f"{folder}: {tensor} holds [256, 255], the config (hidden_size 256, "
                               f"num_attention_heads 4 x head_dim 64) needs [256, 256]: {CORRUPTED}")


def test_a_truncated_file_is_refused_without_a_traceback(checkpoints, copy_of):
    file = copy_of(checkpoints["w8a8-rtn"]) / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    data_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")
    assert refusal(file.parent) == (
        f"{file} is truncated or corrupted: its header says the tensor data takes {data_bytes:,} bytes, the file "
        f"holds {data_bytes - 10:,} after the header; re-download or re-create it")


@pytest.mark.parametrize("start,detail", [
    (0, "its first 8 bytes give a header of 18,446,744,073,709,551,615 bytes, the file has"),
    (8, "its header is not JSON"),
])
def test_a_header_of_garbage_bytes_is_refused(checkpoints, copy_of, start, detail):
    file = copy_of(checkpoints["fp8-dynamic"]) / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[start:start + 64] = b"\xff" * 64
    file.write_bytes(bytes(data))
    message = refusal(file.parent)
    assert message.startswith(f"{file} is truncated or corrupted: {detail}")
    assert message.endswith("; re-download or re-create it")


def test_a_16bit_folder_whose_embedding_has_the_wrong_vocab_is_named(tiny_model_dir, copy_of):
    folder = copy_of(tiny_model_dir("llama"))
    name = "model.embed_tokens.weight"
    rewrite(folder / "model.safetensors", lambda t: t.update({name: t[name][:383].clone()}))
    assert refusal(folder) == (f"{folder}: {name} has shape [383, 256], the config (vocab_size 384, hidden_size 256) "
                               f"needs [384, 256]: the model folder is corrupted; re-download or re-save it")


def test_a_missing_decoder_layer_is_named(checkpoints, copy_of):
    folder = copy_of(checkpoints["w8a8-rtn"])
    rewrite(folder / "model.safetensors",
            lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    message = refusal(folder)
    assert message.startswith(f"{folder}: model.layers.1 is missing (no tensors), the config (num_hidden_layers 2) "
                              f"needs layers 0-1 (and ")
    assert message.endswith(CORRUPTED)


# ---------------------------------------------------------------- bench refuses a corrupt variant


def test_bench_refuses_a_corrupt_checkpoint_and_ranks_nothing(checkpoints, copy_of, tmp_path):
    """bench validates every folder before it measures anything: the error names the tensor, and no report of an
    earlier run in the same folder survives to rank the variant."""
    from ptqlab.measure.variant import BenchSettings
    from ptqlab.benchmark import bench

    fast = BenchSettings(ppl_text="python-docs", ppl_context=64, ppl_windows=4, max_new_tokens=4, batch_size=2,
                         repeats=1, sample_tokens=4, device="cpu")  # as in test_lab.py
    folder = copy_of(checkpoints["w4a16-rtn"])
    (folder / "ptqlab.json").unlink()  # no inferred baseline: one variant
    out = tmp_path / "bench"
    bench([str(folder)], out, settings=fast, quiet=True)
    assert (out / "results.json").is_file()
    tensor = "model.layers.1.mlp.down_proj.weight_scale"
    rewrite(folder / "model.safetensors", lambda t: t.update({tensor: t[tensor][:, :3].clone()}))
    expected = f"{folder}: {tensor} has shape [256, 3], the config (group size 128, input 512) needs [256, 4]: {CORRUPTED}"
    with pytest.raises(PtqlabError) as raised:
        bench([str(folder)], out, settings=fast, quiet=True)
    assert str(raised.value) == expected
    assert not (out / "results.json").exists() and not (out / "summary.md").exists()
