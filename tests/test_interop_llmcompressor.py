"""Interoperability with the incumbent: ptqlab's checkpoints hold what llm-compressor's hold, for the same model.

llm-compressor runs `oneshot(QuantizationModifier(targets="Linear", scheme=..., ignore=["lm_head"]))`.
On fp32 models every tensor is bitwise identical and the quantization_config equal. On bf16 models names,
dtypes, shapes, scales and config are identical, and the grid values differ in a few percent of elements:
llm-compressor rounds the quotient weight/scale to bf16 before rounding it to the grid (double rounding),
ptqlab rounds the exact quotient. The test checks that every such element differs by one grid step and
that ptqlab's value is the closer one to the original weight, never the farther.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from ptqlab import quantize

pytest.importorskip("llmcompressor")

SCHEMES = [("FP8_DYNAMIC", "fp8-dynamic"), ("W4A16", "w4a16-rtn"), ("W8A8", "w8a8-rtn"), ("W4AFP8", "w4a8-rtn"), ("FP8_BLOCK", "fp8-block")]


def llmcompressor_checkpoint(src, scheme, out):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    return out


def dequantized(tensors, name, shape):
    """A linear's weight from its stored tensors, via compressed-tensors' own unpacking."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scale = tensors[f"{name}.weight_scale"].double()
    if f"{name}.weight_packed" in tensors:
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size(shape)).double()
    else:
        q = tensors[f"{name}.weight"].double()
    if scale.shape[0] != q.shape[0]:  # 2-D blocks: [row blocks, column blocks], edge blocks partial
        height, width = -(-q.shape[0] // scale.shape[0]), -(-q.shape[1] // scale.shape[1])
        return q * scale.repeat_interleave(height, 0).repeat_interleave(width, 1)[:q.shape[0], :q.shape[1]]
    groups = scale.shape[1]
    return (q.unflatten(1, (groups, -1)) * scale.unsqueeze(-1)).flatten(1)


@pytest.mark.parametrize("scheme,recipe", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_tensors_and_config_as_llmcompressor(tiny_model_dir, tmp_path, scheme, recipe, dtype):
    src = tiny_model_dir("llama", dtype)
    ours = quantize(str(src), recipe, out=tmp_path / "ours", quiet=True)
    theirs = llmcompressor_checkpoint(src, scheme, tmp_path / "theirs")

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert our_config == their_config

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert {k: (t.dtype, t.shape) for k, t in a.items()} == {k: (t.dtype, t.shape) for k, t in b.items()}
    grid_keys = {k for k in a if k.endswith((".weight_packed",)) or (k.endswith(".weight") and a[k].dtype in (torch.int8, torch.float8_e4m3fn))}
    for key in set(a) - grid_keys:
        assert torch.equal(a[key], b[key]), key  # scales, shapes, norms, embeddings, lm_head

    base = load_file(src / "model.safetensors")
    differing = total = 0
    for key in grid_keys:
        name = key.rpartition(".")[0]
        weight = base[f"{name}.weight"].double()
        ours_w, theirs_w = dequantized(a, name, weight.shape), dequantized(b, name, weight.shape)
        if dtype == torch.float32:
            assert torch.equal(ours_w, theirs_w), name
            continue
        differs = ours_w != theirs_w
        differing, total = differing + int(differs.sum()), total + differs.numel()
        # Where the two disagree, ptqlab is strictly closer to the float weight.
        assert ((ours_w - weight).abs() < (theirs_w - weight).abs())[differs].all(), name
        if a[key].dtype != torch.float8_e4m3fn:  # int grids: the two differ by exactly one step
            step = (ours_w - theirs_w).abs()[differs]
            scale = a[f"{name}.weight_scale"].double()
            scale = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)[differs]
            assert torch.allclose(step, scale), name
    if dtype == torch.bfloat16:
        assert 0 < differing < 0.15 * total


@pytest.mark.parametrize("scheme,recipe", SCHEMES)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_checkpoints_hold_what_llmcompressor_writes(tiny_model_dir, tmp_path, scheme, recipe, arch):
    """Mixture-of-experts models (fp32): every expert's tensors bitwise equal and the same quantization_config, with
    llm-compressor told to keep the routers 16-bit as ptqlab does. The names agree but for Mixtral's experts, where
    ptqlab keeps the hub checkpoints' w1/w3/w2 (what vLLM's Mixtral loader maps) and llm-compressor 0.14 writes
    gate_proj/up_proj/down_proj."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    from ptqlab.models import MOE_LAYOUTS

    src = tiny_model_dir(arch)
    ours = quantize(str(src), recipe, out=tmp_path / "ours", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    ignore = ["lm_head", *MOE_LAYOUTS[arch].keep]
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert our_config == their_config
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    if arch == "mixtral":
        assert any(".experts.0.w1." in key for key in a)
        hub = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
        b = {next((key.replace(theirs, ours) for theirs, ours in hub.items() if ".experts." in key and theirs in key),
                  key): tensor for key, tensor in b.items()}
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
