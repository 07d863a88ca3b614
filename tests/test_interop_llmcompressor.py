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
from tiny import VLM_ARCHS

pytest.importorskip("llmcompressor")

W8A16_FP8 = {"W8A16_FP8": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                                "strategy": "channel", "dynamic": False}}}
"""FP8 weights per channel, 16-bit activations: no compressed-tensors preset names it, so its config group."""
SCHEMES = [("FP8_DYNAMIC", "fp8-dynamic"), ("W4A16", "w4a16-rtn"), ("W8A8", "w8a8-rtn"), ("W4AFP8", "w4a8-rtn"),
           ("FP8_BLOCK", "fp8-block"), (W8A16_FP8, "w8a16-fp8")]


def modifier(scheme, ignore):
    """llm-compressor's QuantizationModifier for a preset scheme's name or a dict of config groups."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if isinstance(scheme, dict):
        return QuantizationModifier(config_groups=scheme, ignore=ignore)
    return QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)


def llmcompressor_checkpoint(src, scheme, out):
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    oneshot(model=model, recipe=modifier(scheme, ["lm_head"]))
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


def llama4_with_vision(src, out):
    """The full Llama 4 (Llama4ForConditionalGeneration, a tiny random vision tower) whose language model is the tiny
    Llama4ForCausalLM in `src`: llm-compressor 0.14 linearizes Llama 4's experts only there (its Llama4 module reads
    config.text_config)."""
    from transformers import AutoModelForCausalLM, Llama4Config, Llama4ForConditionalGeneration

    text = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(0)
    full = Llama4ForConditionalGeneration(Llama4Config(text_config=text.config.to_dict(), vision_config=vision))
    full.language_model.load_state_dict(text.state_dict())
    full.save_pretrained(out)  # oneshot reads the model's config from its folder
    return Llama4ForConditionalGeneration.from_pretrained(out, dtype="auto")


@pytest.mark.parametrize("scheme,recipe", SCHEMES)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "llama4_text"])
def test_moe_checkpoints_hold_what_llmcompressor_writes(tiny_model_dir, tmp_path, scheme, recipe, arch):
    """Mixture-of-experts models (fp32): every expert's tensors bitwise equal and the same quantization_config, with
    llm-compressor told to keep the routers 16-bit as ptqlab does. The names agree but for Mixtral's experts, where
    ptqlab keeps the hub checkpoints' w1/w3/w2 (what vLLM's Mixtral loader maps) and llm-compressor 0.14 writes
    gate_proj/up_proj/down_proj. gpt-oss: the experts' biases too, and the attention sinks as they were. Llama 4:
    llm-compressor runs on the full model (llama4_with_vision), whose language model's tensors and ignore list are
    ptqlab's under the prefix `language_model.`."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from ptqlab.families import FAMILIES

    src = tiny_model_dir(arch)
    ours = quantize(str(src), recipe, out=tmp_path / "ours", quiet=True)
    ignore = ["lm_head", *FAMILIES[arch].experts.keep]
    if arch == "llama4_text":
        model = llama4_with_vision(src, tmp_path / "full")
        ignore = ["re:.*lm_head$", *FAMILIES[arch].experts.keep, "re:vision_model.*", "re:multi_modal_projector.*"]
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    oneshot(model=model, recipe=modifier(scheme, ignore))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    if arch == "llama4_text":
        their_config["ignore"] = [n.removeprefix("language_model.") for n in their_config["ignore"]
                                  if n.startswith("language_model.")]
        b = {key.removeprefix("language_model."): t for key, t in b.items() if key.startswith("language_model.")}
        assert any(".feed_forward.experts.7.down_proj." in key for key in a)
        assert any(".feed_forward.shared_expert.up_proj." in key for key in a)
    assert our_config == their_config
    if arch == "mixtral":
        assert any(".experts.0.w1." in key for key in a)
        hub = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
        b = {next((key.replace(theirs, ours) for theirs, ours in hub.items() if ".experts." in key and theirs in key),
                  key): tensor for key, tensor in b.items()}
    if arch == "gpt_oss":
        assert {"model.layers.1.mlp.experts.7.up_proj.bias", "model.layers.1.self_attn.sinks"} <= set(a)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kv,strategy", [("fp8", "tensor"), ("fp8-head", "attn_head")])
def test_kv_cache_scales_and_scheme_as_llmcompressor_writes_them(tiny_model_dir, tmp_path, calibration_file, kv,
                                                                  strategy):
    """`kv: fp8` / `fp8-head` against llm-compressor's `kv_cache_scheme` (per tensor / per attention head) with its
    static_minmax observer (the running absmax; its default, minmax, is a moving average of per-batch ranges, which
    depends on how the samples are batched and ordered), on the same calibration tokens: ptqlab's calibration set,
    given to llm-compressor one sample per batch, ptqlab batching them with padding. The same names, dtypes, shapes
    and quantization_config, and the same scales to fp32 rounding. The attention projections and layer 0's MLP stay
    16-bit in both, so that every layer's keys and values come from the same weights: ptqlab observes them as the
    quantized layer propagates (what the checkpoint will cache), llm-compressor in its calibration pass, before it
    quantizes the layer, so with quantized k_proj / v_proj the two would observe states a weight rounding apart."""
    from compressed_tensors.quantization import QuantizationArgs
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptqlab.data import CalibrationConfig, load_calibration

    src = tiny_model_dir("llama")
    # Names, in module order, as llm-compressor lists what it left out.
    ignore = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    ignore = ignore[:4] + [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")] + ignore[4:] + ["lm_head"]
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=12, max_seq_len=256, seed=0)
    ours = quantize(str(src), "w4a16-rtn", out=tmp_path / "ours", ignore=ignore, kv_cache=kv, calibration=calibration,
                    calib_batch_size=4, quiet=True)
    samples = [s.tolist() for s in load_calibration(AutoTokenizer.from_pretrained(src), calibration).samples]
    assert len({len(s) for s in samples}) > 1  # ptqlab's batches carry padding

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    scheme = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False,
                              observer="static_minmax")
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    oneshot(model=model, dataset=dataset, num_calibration_samples=len(samples),
            recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=ignore, kv_cache_scheme=scheme))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert our_config == their_config and our_config["kv_cache_scheme"]["strategy"] == strategy
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(a) == sorted(b)
    scales = [k for k in a if k.endswith(("k_scale", "v_scale"))]
    assert len(scales) == 4
    for key in scales:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=0), (key, a[key], b[key])


FP4_SCHEMES = [("NVFP4A16", "nvfp4a16"), ("MXFP4A16", "mxfp4a16")]


@pytest.mark.parametrize("scheme,recipe", FP4_SCHEMES)
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen3_moe", torch.float32)],
                         ids=["llama-fp32", "llama-bf16", "qwen3_moe"])
def test_fp4_checkpoints_hold_llmcompressors_tensors_bit_for_bit(tiny_model_dir, tmp_path, scheme, recipe, arch, dtype):
    """FP4 (data-free): every tensor bitwise equal and the same quantization_config, for bf16 models too (FP4 divides
    in fp32, so no double rounding), and with the global scales NVFP4 shares across q/k/v and gate/up (every expert's
    too) as vLLM's fused layers need them. Routers stay 16-bit in both, as in the MoE test above."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    from ptqlab.families import FAMILIES

    src = tiny_model_dir(arch, dtype)
    ours = quantize(str(src), recipe, out=tmp_path / "ours", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    ignore = ["lm_head", *(FAMILIES[arch].experts.keep if FAMILIES[arch].experts else [])]
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert our_config == their_config
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    if scheme == "NVFP4A16":
        prefix = "model.layers.1.mlp.experts.5." if arch == "qwen3_moe" else "model.layers.1.mlp."
        for names in (["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"],
                      [prefix + "gate_proj", prefix + "up_proj"]):
            assert len({float(a[f"{name}.weight_global_scale"]) for name in names}) == 1, names


@pytest.mark.parametrize("layer0", ["quantized", "16-bit"])
def test_nvfp4_weights_and_input_global_scales_as_llmcompressor_writes_them(tiny_model_dir, tmp_path, calibration_file,
                                                                            layer0):
    """NVFP4 (W4A4) on the same calibration tokens (ptqlab's calibration set, given to llm-compressor one sample per
    batch; ptqlab batches them with padding, masked out): the same names, dtypes, shapes and quantization_config;
    the weights' tensors (grid values, FP8 scales, global scales) bitwise equal; each input_global_scale (2688 / the
    input's absmax over the calibration set: llm-compressor's static_minmax observer) equal to fp32 rounding wherever
    both tools calibrate on the same activations: every layer whose inputs no quantized layer has touched. Past a
    quantized layer they differ by design, and are not compared: ptqlab calibrates each layer on what the quantized
    layers before it feed it (FP4 activations included), llm-compressor's QuantizationModifier on the float model's
    activations. So the run with layer 0 kept 16-bit (in both) compares every input scale of layer 1, the run with
    every layer quantized those of layer 0."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptqlab.data import CalibrationConfig, load_calibration

    src = tiny_model_dir("llama")
    ignore = ([f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [f"model.layers.0.mlp.{p}_proj" for p in
                                                                       ("gate", "up", "down")]) if layer0 == "16-bit" else []
    ignore.append("lm_head")  # module order, as llm-compressor lists what it left out
    calibration = CalibrationConfig(dataset=str(calibration_file), num_samples=12, max_seq_len=256, seed=0)
    ours = quantize(str(src), "nvfp4", out=tmp_path / "ours", ignore=ignore, calibration=calibration,
                    calib_batch_size=4, quiet=True)
    samples = [s.tolist() for s in load_calibration(AutoTokenizer.from_pretrained(src), calibration).samples]
    assert len({len(s) for s in samples}) > 1  # ptqlab's batches carry padding

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    oneshot(model=model, dataset=dataset, num_calibration_samples=len(samples),
            recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=ignore))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert our_config == their_config
    a, b = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(a) == sorted(b)
    inputs = [k for k in a if k.endswith(".input_global_scale")]
    assert len(inputs) == (7 if layer0 == "16-bit" else 14)
    for key in a:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        if key not in inputs:
            assert torch.equal(a[key], b[key]), key
    first = "model.layers.1." if layer0 == "16-bit" else "model.layers.0."
    compared = [key for key in inputs if key.startswith(first)]
    assert len(compared) == 7
    for key in compared:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=0), (key, a[key], b[key])


VLM_SCHEMES = [("FP8_DYNAMIC", "fp8-dynamic"), ("W4A16", "w4a16-rtn"), ("W8A8", "w8a8-rtn")]


def module_names(model, names: list[str]) -> list[str]:
    """Checkpoint names as transformers 5 names the modules: the renamings it applied loading `model`
    (from_pretrained's `_weight_conversions`), applied to `names`."""
    from transformers.core_model_loading import WeightRenaming

    renamings = [c for c in getattr(model, "_weight_conversions", None) or () if isinstance(c, WeightRenaming)]
    out = []
    for name in names:
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        out.append(name)
    return out


@pytest.mark.parametrize("scheme,recipe", VLM_SCHEMES)
@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_vlm_checkpoints_hold_what_llmcompressor_writes(tiny_model_dir, tmp_path, scheme, recipe, arch):
    """Vision-language models (fp32), llm-compressor told to keep the vision tower and projector 16-bit with the
    patterns ptqlab's row gives: the same quantization_config and every tensor bitwise equal, under the same names as
    transformers 5 names the modules. llm-compressor 0.14 writes them through save_pretrained, which turns them back
    into the hub's older layout (Qwen2.5-VL: model.layers.*, visual.*; Gemma 3, Mistral 3: language_model.model.*,
    vision_tower.*, multi_modal_projector.*; Qwen3-VL has one layout), and compressed-tensors names its ignore list
    the same way. ptqlab keeps transformers 5's names (model.language_model.*, model.visual.*, ...), in tensors and
    ignore list alike: vLLM's loaders for these models map both layouts, but transformers matches the ignore list
    against its module names only, so it reads llm-compressor's vision part as quantized
    (test_vlm.test_read_back_refuses_a_vision_part_transformers_would_quantize) and ptqlab's as written."""
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText

    from ptqlab.families import FAMILIES

    src = tiny_model_dir(arch)
    ours = quantize(str(src), recipe, out=tmp_path / "ours", quiet=True)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype="auto")
    oneshot(model=model, recipe=modifier(scheme, ["lm_head", *(kept.pattern for kept in FAMILIES[arch].keep)]))
    model.save_pretrained(tmp_path / "theirs", save_compressed=True)

    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    our_ignore, their_ignore = our_config.pop("ignore"), their_config.pop("ignore")
    assert our_config == their_config
    assert our_ignore == module_names(model, their_ignore)
    a, stored = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    b = dict(zip(module_names(model, list(stored)), stored.values()))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if FAMILIES[arch].norms.offset and key.endswith("norm.weight") and not torch.equal(a[key], b[key]):
            # llm-compressor 0.14 turns Gemma's offset norms, x̂·(1 + w), into standard ones and back in fp32 around
            # every oneshot (llmcompressor/modeling/offset_norm.py), which moves a weight by an ulp here and there,
            # the projector's norm included; ptqlab keeps them as the source has them.
            assert torch.equal(b[key], (1.0 + a[key]) - 1.0), key
            continue
        assert torch.equal(a[key], b[key]), key
    assert (sorted(a) == sorted(stored)) == (arch == "qwen3_vl")  # the names differ where the layouts do
