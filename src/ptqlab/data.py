"""Calibration data: conversations or texts, in the model's own chat format, tokenized, truncated, drawn with a seed.

Sources: a Hugging Face dataset (name, config, split; by default HuggingFaceH4/ultrachat_200k train_sft, whose
`messages` are chat conversations), or local files: `.jsonl` (one object per line with `messages` or `text`),
`.txt` (samples separated by blank lines), `.parquet` (columns `messages` or `text`). Conversations are
rendered with the tokenizer's chat template: calibrating in the format the model will serve matters. Where the
hub is unreachable, `offline` is a built-in set of real English text (the docstrings of Python's standard
library, PSF licence; deliberately not the Python Language Reference that the offline perplexity uses).
"""

from __future__ import annotations

import codecs
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
    pad_id: int = 0
    """What fills a batch's rows past a shorter sample's end (masked out of every statistic): the tokenizer's pad
    token where it has one."""

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


FILE_SUFFIXES = (".jsonl", ".txt", ".parquet")
EXPECTED = {
    ".jsonl": "one JSON object per line, with 'messages' (a list of {role, content} objects) or 'text' (a string)",
    ".txt": "plain-text samples separated by blank lines",
    ".parquet": "a Parquet table with a 'messages' or 'text' column",
}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv", ".tsv", ".arrow")
"""Files a local dataset folder must hold for `datasets.load_dataset` to find data in it."""


def _kind(value) -> str:
    """A JSON value's kind, as people name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _check_messages(messages, where: str) -> None:
    expected = "'messages' must be a list of {role, content} objects with string values"
    if not isinstance(messages, (list, tuple)):
        raise PtqlabError(f"{where}: {expected}, got {_kind(messages)}")
    if not messages:
        raise PtqlabError(f"{where}: {expected}, got an empty list")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise PtqlabError(f"{where}: {expected}; message {number} is {_kind(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise PtqlabError(f"{where}: {expected}; message {number} has no {key!r} (keys: {', '.join(message)})")
            if not isinstance(message[key], str):
                raise PtqlabError(f"{where}: {expected}; message {number}'s {key!r} is {_kind(message[key])}")


def check_record(record, where: str) -> None:
    """One calibration record: an object with `messages` (a list of {role, content} with string values) or `text`
    (a string). `where` names it in the message (`chats.jsonl:3`)."""
    if not isinstance(record, dict):
        raise PtqlabError(f"{where}: expected an object with 'messages' or 'text', got {_kind(record)}")
    if "messages" in record and (record["messages"] is not None or "text" not in record):  # a null beside a text: the text
        _check_messages(record["messages"], where)
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise PtqlabError(f"{where}: 'text' must be a string, got {_kind(record['text'])}")
    else:
        keys = f"one with keys: {', '.join(map(str, record))}" if record else "an empty object"
        raise PtqlabError(f"{where}: expected an object with 'messages' or 'text', got {keys}")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is skipped); bytes that are not UTF-8 are named by line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PtqlabError(f"cannot read calibration file {path}: {e.strerror}") from e
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PtqlabError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading has


def _records_from_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PtqlabError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be an object with 'messages' or 'text'") from e
        check_record(record, f"{path}:{number}")
        records.append(record)
    return records


def _records_from_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise PtqlabError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); give {EXPECTED['.parquet']}, "
                          "or a .jsonl or .txt file") from e
    if not {"messages", "text"} & set(table.column_names):
        raise PtqlabError(f"{path}: no 'messages' or 'text' column (columns: {', '.join(table.column_names) or 'none'})")
    records = table.to_pylist()
    for number, record in enumerate(records, 1):
        check_record(record, f"{path}: row {number}")
    return records


def _records_from_file(path: Path) -> list[dict]:
    """The records of a local calibration file, each checked; an empty file or one without records is refused."""
    if path.suffix not in FILE_SUFFIXES:
        raise PtqlabError(f"{path}: calibration files are .jsonl, .txt or .parquet")
    if path.is_dir():
        raise PtqlabError(f"calibration file {path} is a folder: give a {path.suffix} file")
    if not path.is_file():
        raise PtqlabError(f"calibration file {path} does not exist")
    if path.stat().st_size == 0:
        raise PtqlabError(f"{path}: the file is empty; expected {EXPECTED[path.suffix]}")
    if path.suffix == ".jsonl":
        records = _records_from_jsonl(path)
    elif path.suffix == ".txt":
        records = [{"text": block} for block in _read_text(path).split("\n\n")]
    else:
        records = _records_from_parquet(path)
    if not any(r.get("messages") is not None or r["text"].strip() for r in records):
        raise PtqlabError(f"{path}: no calibration samples in it (every one is blank); expected {EXPECTED[path.suffix]}")
    return records


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
    records = list(data)
    for number, record in enumerate(records, 1):
        check_record(record, f"calibration dataset {config.dataset} ({config.split}), record {number} of those drawn")
    return records


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


def _render(record: dict, tokenizer, config: CalibrationConfig) -> tuple[str, bool]:
    """A checked record (see check_record) -> (text, whether the chat template already added the special tokens)."""
    messages = record.get("messages")
    if messages is not None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False), True
        if not config.allow_plain_text:
            raise PtqlabError("the tokenizer has no chat template, so conversations cannot be rendered in the model's chat "
                              "format; pass --allow-plain-text to calibrate on the plain message texts")
        return "\n\n".join(m["content"] for m in messages), False
    return record["text"], False


def _is_file_source(dataset: str) -> bool:
    return Path(dataset).suffix in FILE_SUFFIXES


def _check_dataset_folder(folder: Path) -> None:
    """A folder given as --dataset goes to `datasets.load_dataset`, which needs data files in it."""
    if not any(p.suffix in DATA_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        raise PtqlabError(f"--dataset {folder} is a folder with no data files in it: give a .jsonl, .txt or .parquet file, "
                          "a hub dataset id, or offline")


def check_calibration(config: CalibrationConfig, batch_size: int | None = None) -> None:
    """Fail fast on settings and data that cannot work, before any model is loaded: the sizes, and a local file's
    every record (its format; the chat template is checked once the tokenizer is loaded). `batch_size`: the
    sequences per calibration forward (--calib-batch-size), when known."""
    check_sizes(config.num_samples, config.max_seq_len, batch_size)
    if _is_file_source(config.dataset):
        path = Path(config.dataset)
        _check_enough(len(_records_from_file(path)), config.num_samples, f"file {path}", "calibration records")
    elif config.dataset not in (AUTO, OFFLINE) and Path(config.dataset).is_dir():
        _check_dataset_folder(Path(config.dataset))


def check_sizes(num_samples: int, max_seq_len: int, batch_size: int | None = None) -> None:
    """The calibration's sizes, each in one line naming its option (`batch_size` when known)."""
    if num_samples < 1:
        raise PtqlabError(f"--num-samples {num_samples}: must be at least 1")
    if max_seq_len < 2:
        raise PtqlabError(f"--max-seq-len {max_seq_len}: must be at least 2 (tokens per calibration sample)")
    if batch_size is not None:
        check_batch_size(batch_size)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise PtqlabError(f"--calib-batch-size {batch_size}: must be at least 1 (sequences per calibration forward)")


def _check_enough(found: int, asked: int, source: str, what: str = "usable calibration samples") -> None:
    if found < asked:
        raise PtqlabError(f"only {found} {what} in {source}, {asked} asked for (--num-samples): lower --num-samples or "
                          "give more data")


def load_calibration(tokenizer, config: CalibrationConfig = CalibrationConfig()) -> CalibrationSet:
    """Render, tokenize, truncate and draw `num_samples` samples with `seed`."""
    if tokenizer is None:
        raise PtqlabError("calibration needs a tokenizer, and none could be loaded from the model folder: add (or repair) "
                          "its tokenizer files")
    if config.dataset == AUTO:
        config = replace(config, dataset=HUB_DATASET if hub_reachable() else OFFLINE)
    if config.dataset == OFFLINE:
        records, source = offline_records(), "offline: Python standard library docstrings (PSF licence)"
    elif _is_file_source(config.dataset):
        path = Path(config.dataset)
        records, source = _records_from_file(path), f"file {path}"
    else:
        records, source = _records_from_hub(config), f"hub {config.dataset} ({config.split})"

    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    samples = []
    for index in order:
        text, templated = _render(records[index], tokenizer, config)
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=not templated, return_tensors="pt",
                        truncation=True, max_length=config.max_seq_len)["input_ids"][0]
        if len(ids) >= 2:
            samples.append(ids)
        if len(samples) == config.num_samples:
            break
    _check_enough(len(samples), config.num_samples, source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return CalibrationSet(samples, source, pad_id)
