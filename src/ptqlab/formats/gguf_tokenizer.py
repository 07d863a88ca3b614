"""A tokenizer as GGUF metadata (tokenizer.ggml.*, tokenizer.chat_template): what convert_hf_to_gguf.py writes, so
that llama.cpp splits and encodes text as the Hugging Face tokenizer does. Byte-level BPE tokenizers become
llama.cpp's `gpt2` model with the `tokenizer.ggml.pre` whose splitting matches their pre-tokenizer (a table, read
from llama.cpp's llama-vocab.cpp); SentencePiece-style BPE tokenizers with byte fallback become `llama`, through
gguf-py's own LlamaHfVocab, scored by the order of their merges. Anything else is refused in one line: llama.cpp
would tokenize it differently.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from ptqlab.errors import PtqlabError


LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace("\\p{N}{1,3}", "\\p{N}")
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", LLAMA3_REGEX), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_REGEX), ("ByteLevel", False, False)): "qwen2",
}
"""A tokenizer.json pre-tokenizer -> llama.cpp's tokenizer.ggml.pre whose splitting is the same (llama-vocab.cpp).
ByteLevel parts are (use_regex, add_prefix_space): llama.cpp's byte-level models add no space before the text."""


def _pre_tokenizer_signature(pre: dict | None) -> tuple:
    parts = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    signature = []
    for part in parts:
        kind = (part or {}).get("type")
        if kind == "ByteLevel":
            signature.append(("ByteLevel", part.get("use_regex", True), bool(part.get("add_prefix_space", False))))
        elif kind == "Digits":
            signature.append(("Digits", part.get("individual_digits", False)))
        elif kind == "Split":
            signature.append(("Split", (part.get("pattern") or {}).get("Regex")))
        else:
            signature.append((kind,))
    return tuple(signature)


@dataclass(frozen=True)
class TokenizerMetadata:
    """What llama.cpp needs to tokenize as the source tokenizer does (tokenizer.ggml.* and the chat template)."""

    model: str
    """gpt2 (byte-level BPE) or llama (SentencePiece-style BPE with byte fallback)."""
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special: dict[str, int]
    """bos, eos, unk, pad -> token id (those the tokenizer has)."""
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def tokenizer_metadata(tokenizer, config, generation_eos: list[int] | None = None) -> TokenizerMetadata:
    """The GGUF tokenizer of a fast (tokenizer.json) tokenizer; one line refusing one llama.cpp would split
    differently."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise PtqlabError("GGUF export needs the model's fast tokenizer (tokenizer.json): the folder has none; add the "
                          "model's tokenizer files")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise PtqlabError(f"GGUF export: the tokenizer is a {model.get('type')} model; ptqlab writes byte-level BPE "
                          "(gpt2) and SentencePiece-style BPE (llama) tokenizers")
    signature = _pre_tokenizer_signature(spec.get("pre_tokenizer"))
    byte_level = any(part[0] == "ByteLevel" for part in signature)
    vocab_size = getattr(config, "vocab_size", None) or len(tokenizer)
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:  # llama.cpp sizes its vocabulary by the token list, the embedding by the config
        raise PtqlabError(f"GGUF export: the tokenizer has token id {largest}, past the model's vocab_size {vocab_size} "
                          "(config.json): the tokenizer does not belong to this model; give its own tokenizer files")
    if byte_level:
        pre = PRE_TOKENIZERS.get(signature)
        if pre is None:
            raise PtqlabError(f"GGUF export: the tokenizer's pre-tokenizer {signature} is not one ptqlab knows llama.cpp's "
                              f"name for (known: {', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text "
                              "differently")
        tokens, types = _byte_level_tokens(tokenizer, vocab_size)
        scores, kind = None, "gpt2"
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    elif model.get("byte_fallback"):
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        tokens, scores, types = _sentencepiece_tokens(tokenizer, vocab_size, merges)
        pre, kind, merges = "default", "llama", []
    else:
        raise PtqlabError(f"GGUF export: the tokenizer (pre-tokenizer {signature}) is neither byte-level BPE nor "
                          "SentencePiece-style BPE with byte fallback; llama.cpp would not tokenize as it does")
    special = {key: value for key, value in (("bos", tokenizer.bos_token_id), ("eos", _eos(tokenizer, config, generation_eos)),
                                             ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id))
               if value is not None}
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in special and len(with_special) > len(without) and with_special[0] == special["bos"]
    add_eos = "eos" in special and len(with_special) > len(without) and with_special[-1] == special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return TokenizerMetadata(kind, pre, tokens, types, scores, merges, special, add_bos, add_eos, template)


def _eos(tokenizer, config, generation_eos: list[int] | None) -> int | None:
    """The tokenizer's end-of-sequence token, unless the model's own config names others and not it (a tokenizer
    carried through a conversion can name the wrong one): then the config's first."""
    named = generation_eos or getattr(config, "eos_token_id", None)
    named = [named] if isinstance(named, int) else list(named or [])
    if named and tokenizer.eos_token_id not in named:
        return named[0]
    return tokenizer.eos_token_id


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens that are control tokens in all but name."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<unused") and token.endswith(">"))


def _byte_level_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf's get_vocab_base: every id's token text, and its type (control, user-defined, normal;
    ids the tokenizer lacks are unused padding)."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens as the normalizer would leave them
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            control = added[i].special or _looks_special(token)
            tokens.append(token if control else token.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _sentencepiece_tokens(tokenizer, vocab_size: int, merges: list[str]) -> tuple[list[str], list[float], list[int]]:
    """Token texts and types as gguf-py's LlamaHfVocab gives them (what convert_hf_to_gguf uses for a tokenizer.json
    llama tokenizer), padded to the model's vocabulary, with scores from the merges: a token that merge number r
    makes scores -r, everything else below every merge. LlamaHfVocab scores every token -1000; llama.cpp's
    SentencePiece tokenizer merges the adjacent pair whose result scores highest (and transformers' GGUF reader
    orders its merges by those scores), so equal scores merge left to right instead of in the BPE's order."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab = gguf.LlamaHfVocab(Path(folder))
        entries = list(vocab.all_tokens())
    tokens = [text.decode("utf-8") if isinstance(text, bytes) else text for text, _, _ in entries]
    types = [int(kind) for _, _, kind in entries]
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)  # "▁T he" -> "▁The": SentencePiece pieces hold no spaces
    unmerged = -float(len(merges) + 1)
    scores = [-float(rank[token]) if token in rank else unmerged for token in tokens]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(unmerged)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types
