import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny import CHATS, save_tiny_model, write_jsonl  # noqa: E402


@pytest.fixture
def calibration_file(tmp_path):
    """A .jsonl of 40 short chats."""
    return write_jsonl(tmp_path / "chats.jsonl", CHATS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a saved tiny random model (config + safetensors + tokenizer), built once per (arch, dtype)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, **config) -> Path:
        key = (arch, dtype, tuple(sorted(config.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{str(dtype).removeprefix('torch.')}")
            cache[key] = save_tiny_model(folder, arch, dtype, **config)
        return cache[key]

    return make
