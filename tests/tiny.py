"""Tiny random models of every model family (ptqlab.families), built from a config in memory (no downloads), with a
tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ptqlab.families import FAMILIES

VOCAB = 384
# Every width is a multiple of 128 so that group 128 (the W4A16 default) divides every layer.
COMMON = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=2, pad_token_id=0,
)


TINY_EXPERTS = dict(count=8, top_k=2, width=128, shared_width=256)
"""A tiny mixture of experts, set through the config keys its family row names (ptqlab.families.ExpertLayout);
COMMON's keys come first (Mixtral's experts, sized by intermediate_size, are COMMON's width)."""
EXTRA = {
    "mistral": {"sliding_window": None},
    "gemma2": {"query_pre_attn_scalar": 64},
    "gemma3_text": {"query_pre_attn_scalar": 64},
    "qwen3_moe": {"norm_topk_prob": True},
    # multi-head latent attention (its low ranks wide enough for group 128), one dense layer then the experts
    "deepseek_v2": {"num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64,
                    "v_head_dim": 64, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
    "glm4_moe": {"first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64},
    # Llama 4: every other layer MoE (Maverick's interleave; vLLM decides by the step, transformers by moe_layers),
    # so layer 0 is dense, layer 1 MoE.
    "llama4_text": {"intermediate_size_mlp": 512, "interleave_moe_layer_step": 2},
    # gpt-oss: YaRN's original context a 32nd of the tiny one, as the hub config's (its factor 32 agrees).
    "gpt_oss": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8}},
    # A vision-language model's text config: multimodal rotary sections (t, h, w) that fill head_dim // 2.
    "qwen2_5_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}},
    "qwen3_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}},
    "gemma3": {"query_pre_attn_scalar": 64},
    "qwen3_5_moe": {"layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                        "mrope_section": [2, 3, 3]}},
    "mistral3": {"model_type": "mistral", "sliding_window": None},
}
EXTRA["deepseek_v3"] = EXTRA["deepseek_v2"]
"""Per architecture, settings beyond COMMON and the experts (a new family needs none to get a tiny model); a
vision-language model's go to its text config, with COMMON's."""
DERIVED = {"phi3": ("head_dim",), "deepseek_v2": ("head_dim",), "deepseek_v3": ("head_dim",)}
"""COMMON keys that a config class derives itself and must not be given."""
VISION = {
    "qwen2_5_vl": ({"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                    "out_hidden_size": COMMON["hidden_size"], "fullatt_block_indexes": [0]}, {}),
    "qwen3_vl": ({"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                  "out_hidden_size": COMMON["hidden_size"], "deepstack_visual_indexes": [0],
                  "num_position_embeddings": 64}, {}),
    "gemma3": ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 28, "patch_size": 14, "vision_use_head": False},
               {"mm_tokens_per_image": 4, "tie_word_embeddings": True}),  # Gemma 3 ties its head, as the real ones
    "qwen3_5_moe": ({"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                     "out_hidden_size": COMMON["hidden_size"], "num_position_embeddings": 64}, {}),
    "mistral3": ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "head_dim": 32, "image_size": 56, "patch_size": 14}, {}),
}
"""Per vision-language family: (its vision config, settings of the top-level config). The vision tower is a sliver:
ptqlab keeps it 16-bit, and only its names and the linears it holds matter to the tests."""


def tiny_config(arch: str, **overrides):
    """A tiny config of a family of ptqlab.families.FAMILIES (transformers' config class of that model_type)."""
    from transformers import AutoConfig  # start-up time: a test module that needs no model loads quickly

    if arch not in FAMILIES:
        raise ValueError(arch)
    layout = FAMILIES[arch].experts
    experts = {}
    if layout is not None:
        experts = {layout.count_key: TINY_EXPERTS["count"], layout.top_k_key: TINY_EXPERTS["top_k"],
                   layout.width_key: TINY_EXPERTS["width"]}
        if layout.shared_width_key:
            experts[layout.shared_width_key] = TINY_EXPERTS["shared_width"]
    params = {**experts, **COMMON, **EXTRA.get(arch, {}), **overrides}
    params = {k: v for k, v in params.items() if k not in DERIVED.get(arch, ())}
    if arch in VISION:  # the text decoder's settings go to its text config
        vision, top = VISION[arch]
        return AutoConfig.for_model(arch, text_config=params, vision_config=vision,
                                    **{"tie_word_embeddings": params["tie_word_embeddings"], **top})
    return AutoConfig.for_model(arch, **params)


CHATS = [{"messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                       {"role": "assistant", "content": f"The answer is {2 * i}. " * (1 + i % 5)}]} for i in range(40)]
"""Calibration conversations for tests (the `calibration_file` fixture writes them as .jsonl)."""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _archs(moe: bool, vision: bool = False) -> list[str]:
    return [name for name, family in FAMILIES.items()
            if (family.experts is not None) == moe and bool(family.vision) == vision]


ARCHS = _archs(moe=False)
"""Every dense family of text-only models, in the registry's order."""
MOE_ARCHS = _archs(moe=True) + _archs(moe=True, vision=True)
"""Every mixture-of-experts family (Qwen3.5's beside a vision tower too)."""
VLM_ARCHS = _archs(moe=False, vision=True)
"""Every vision-language family (a dense text decoder beside a vision tower)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights onto a small grid of values. "
    "A language model predicts the next token from the tokens before it. Paris is the capital of France. "
) * 8


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, chat_template=CHAT_TEMPLATE
    )


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    import transformers

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    auto_class = getattr(transformers, FAMILIES[arch].auto_class)  # a vision-language model's builds its vision part
    model = auto_class.from_config(config, dtype=dtype)
    # Random init gives std-0.02 weights everywhere; give norms and biases non-trivial values too so that
    # a bug that drops them shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".bias", "_bias")):  # gpt-oss: experts.gate_up_proj_bias
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_tiny_model(folder: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    model = tiny_model(arch, dtype, seed, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
