"""Calibration data: conversations or texts, in the model's own chat format, tokenized, truncated, drawn with a seed.

Sources: a Hugging Face dataset (name, config, split; by default HuggingFaceH4/ultrachat_200k train_sft, whose
`messages` are chat conversations), or local files: `.jsonl` (one object per line with `messages` or `text`),
`.txt` (samples separated by blank lines), `.parquet` (columns `messages` or `text`). Conversations are
rendered with the tokenizer's chat template: calibrating in the format the model will serve matters. Where the
hub is unreachable, `offline` is a built-in set of real English text (the docstrings of Python's standard
library, PSF licence; deliberately not the Python Language Reference that the offline perplexity uses).
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ptqlab.errors import PtqlabError

HUB_DATASET = "HuggingFaceH4/ultrachat_200k"
DEFAULT_SPLIT = "train_sft"
OFFLINE = "offline"
AUTO = "auto"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (and offline mode is not set)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration samples come from and how many; CLI flags map one-to-one."""

    dataset: str = AUTO
    """Hub dataset id, a local .jsonl/.txt/.parquet path, `offline` (built-in text), or `auto`:
    HuggingFaceH4/ultrachat_200k where the hub is reachable, else `offline` (said in the run record)."""
    dataset_config: str | None = None
    split: str = DEFAULT_SPLIT
    num_samples: int = 256
    max_seq_len: int = 1024
    """Samples are truncated to this many tokens."""
    seed: int = 0
    """Which samples are drawn, and in what order."""
    allow_plain_text: bool = False
    """Tokenize conversations as plain text when the tokenizer has no chat template (else: an error)."""


@dataclass
class CalibrationSet:
    samples: list[torch.Tensor]  # each [tokens] int64, 1..max_seq_len long
    source: str

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def _records_from_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PtqlabError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be an object with 'messages' or 'text'") from e
        return records
    if path.suffix == ".txt":
        return [{"text": block} for block in path.read_text(encoding="utf-8").split("\n\n")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise PtqlabError(f"{path}: calibration files are .jsonl, .txt or .parquet")


def _records_from_hub(config: CalibrationConfig) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise PtqlabError("hub calibration datasets need the package datasets: pip install datasets") from e
    try:
        data = datasets.load_dataset(config.dataset, config.dataset_config, split=config.split)
    except Exception as e:  # noqa: BLE001 - connection, missing split, missing dataset: all the user's to fix
        raise PtqlabError(
            f"cannot load calibration dataset {config.dataset!r} (split {config.split!r}): {str(e).splitlines()[0]}; "
            "without the hub, use --dataset offline or a local .jsonl/.txt/.parquet file"
        ) from e
    # Shuffle before taking: a few thousand records is plenty to draw num_samples from.
    data = data.shuffle(seed=config.seed).select(range(min(len(data), max(4 * config.num_samples, 1000))))
    return list(data)


def offline_records() -> list[dict]:
    """Docstrings of Python standard library modules, classes and functions (real English, shipped offline)."""
    import importlib
    import inspect
    import sys
    import warnings

    # Modules with side effects on import, and pydoc_data: the offline perplexity text must stay unseen.
    skip = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "test", "ensurepip", "lib2to3")
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skip)
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform-specific modules
                continue
            for obj in [module] + [v for _, v in inspect.getmembers(module) if inspect.isclass(v) or inspect.isfunction(v)]:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200 and getattr(obj, "__module__", name) in (name, None):
                    records.append({"text": doc})
    return records


def _render(record: dict, tokenizer, config: CalibrationConfig) -> tuple[str | None, bool]:
    """-> (text, whether the chat template already added the special tokens)."""
    messages = record.get("messages")
    if messages:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False), True
        if not config.allow_plain_text:
            raise PtqlabError("the tokenizer has no chat template, so conversations cannot be rendered in the model's chat "
                              "format; pass --allow-plain-text to calibrate on the plain message texts")
        return "\n\n".join(m.get("content", "") for m in messages), False
    text = record.get("text")
    if text is None:
        raise PtqlabError(f"a calibration record has neither 'messages' nor 'text' (keys: {', '.join(record)})")
    return text, False


def check_calibration(config: CalibrationConfig) -> None:
    """Fail fast on settings that cannot work, before any model is loaded."""
    if config.num_samples < 1 or config.max_seq_len < 2:
        raise PtqlabError("--num-samples must be at least 1 and --max-seq-len at least 2")
    if Path(config.dataset).suffix in (".jsonl", ".txt", ".parquet") and not Path(config.dataset).is_file():
        raise PtqlabError(f"calibration file {config.dataset} does not exist")


def load_calibration(tokenizer, config: CalibrationConfig = CalibrationConfig()) -> CalibrationSet:
    """Render, tokenize, truncate and draw `num_samples` samples with `seed`."""
    if tokenizer is None:
        raise PtqlabError("calibration needs a tokenizer, and the model folder has none: add tokenizer files to it")
    if config.dataset == AUTO:
        config = replace(config, dataset=HUB_DATASET if hub_reachable() else OFFLINE)
    if config.dataset == OFFLINE:
        records, source = offline_records(), "offline: Python standard library docstrings (PSF licence)"
    elif Path(config.dataset).suffix in (".jsonl", ".txt", ".parquet"):
        path = Path(config.dataset)
        if not path.is_file():
            raise PtqlabError(f"calibration file {path} does not exist")
        records, source = _records_from_file(path), f"file {path}"
    else:
        records, source = _records_from_hub(config), f"hub {config.dataset} ({config.split})"

    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    samples = []
    for index in order:
        text, templated = _render(records[index], tokenizer, config)
        if not text or not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=not templated, return_tensors="pt",
                        truncation=True, max_length=config.max_seq_len)["input_ids"][0]
        if len(ids) >= 2:
            samples.append(ids)
        if len(samples) == config.num_samples:
            break
    if len(samples) < config.num_samples:
        raise PtqlabError(f"only {len(samples)} usable calibration samples in {source}, {config.num_samples} asked for: "
                          "lower --num-samples or give more data")
    return CalibrationSet(samples, source)
