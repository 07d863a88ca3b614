"""Model loading: every supported architecture as a tiny random model, and clear one-line errors otherwise."""

import pytest
import torch
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.models import decoder_layers, load_model
from tiny import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_with_its_decoder_layers(tiny_model_dir, arch):
    loaded = load_model(str(tiny_model_dir(arch)))
    layers = decoder_layers(loaded.model)
    assert len(layers) == loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_is_honoured(tiny_model_dir, dtype):
    loaded = load_model(str(tiny_model_dir("llama", torch.bfloat16)), dtype=dtype)
    assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)


def test_auto_dtype_keeps_the_checkpoint_dtype(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen2", torch.bfloat16)))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_unknown_hub_id_names_the_problem():
    with pytest.raises(PtqlabError, match=r"unknown model 'nobody/no-such-model-xyz'.*local folder or a hub id"):
        load_model("nobody/no-such-model-xyz")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(PtqlabError, match="has no config.json"):
        load_model(str(tmp_path))


def test_file_is_refused(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"")
    with pytest.raises(PtqlabError, match="is a file, not a model folder"):
        load_model(str(f))


def test_encoder_model_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(PtqlabError, match="BertForMaskedLM model, not a causal language model"):
        load_model(str(tmp_path))


def test_encoder_decoder_model_is_not_a_causal_lm(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)).save_pretrained(tmp_path)
    with pytest.raises(PtqlabError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_unlisted_architecture_found_by_its_layer_list():
    """An architecture without a table row still works when one ModuleList has num_hidden_layers blocks (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2))
    assert decoder_layers(model) is model.transformer.h


def test_architecture_without_findable_layers_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "oddnet", "num_hidden_layers": 3})()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(PtqlabError, match=r"cannot find the decoder layers of this oddnet model.*ptqlab.families.FAMILIES"):
        decoder_layers(Odd())
