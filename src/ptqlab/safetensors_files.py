"""A checkpoint's safetensors files read without their data: each file's header (an 8-byte little-endian length,
then a JSON table of dtype, shape and data_offsets per tensor), the shard index, and the shard sizes ptqlab writes.

Why its own module, below the formats: the header is the one test of a whole safetensors file, used wherever a
folder is read before its weights are (loading a model, streaming one layer by layer, validating a checkpoint, pricing
a sensitivity plan). A truncated or padded file is refused here, as safetensors itself refuses it, in a line that
says so.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ptqlab.errors import PtqlabError

INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30
"""The largest shard a checkpoint written in memory gets (formats/compressed_tensors.ShardWriter)."""
STREAM_SHARD_BYTES = 2**30
"""A streaming run holds the checkpoint shard it is writing in CPU memory: smaller shards than the in-memory
writer's keep its peak low (the memory plan, engine/memory.py, counts one)."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors refuses a longer header."""

SAFETENSORS_DTYPES = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8), "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E5M2": ("float8_e5m2", 8), "F8_E8M0": ("float8_e8m0fnu", 8), "I16": ("int16", 16), "U16": ("uint16", 16),
    "F16": ("float16", 16), "BF16": ("bfloat16", 16), "I32": ("int32", 32), "U32": ("uint32", 32),
    "F32": ("float32", 32), "I64": ("int64", 64), "U64": ("uint64", 64), "F64": ("float64", 64),
}
"""safetensors dtype -> (torch's name for it, bits per element)."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    name: str
    dtype: str
    """torch's name (float32, int8, float8_e4m3fn, ...); safetensors' own name when torch has none."""
    shape: tuple[int, ...]
    file: Path
    start: int
    """Where its data begins in the file."""
    nbytes: int


def shape_text(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def header_length(prefix: bytes, file_size: int) -> int:
    """The JSON header's length from the first 8 bytes; ValueError when the file cannot hold it."""
    if file_size < 8:
        raise ValueError(f"it has {file_size} bytes, fewer than the 8 of the header length")
    length = struct.unpack("<Q", prefix[:8])[0]
    if length > file_size - 8 or length > MAX_HEADER_BYTES:
        raise ValueError(f"its first 8 bytes give a header of {length:,} bytes, the file has {file_size:,}")
    return length


def _stored_tensor(name: str, entry, file: Path, data_start: int) -> StoredTensor:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"its header entry for {name} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if (not isinstance(dtype, str) or not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and n >= 0 for n in offsets) or offsets[0] > offsets[1]):
        raise ValueError(f"its header entry for {name} is malformed ({json.dumps(entry)[:120]})")
    torch_name, bits = SAFETENSORS_DTYPES.get(dtype, (dtype, None))
    nbytes = offsets[1] - offsets[0]
    if bits is not None and math.prod(shape) * bits // 8 != nbytes:
        raise ValueError(f"its header gives {name} ({torch_name} {shape_text(shape)}, "
                         f"{math.prod(shape) * bits // 8:,} bytes) {nbytes:,} bytes of data")
    return StoredTensor(name, torch_name, tuple(shape), file, data_start + offsets[0], nbytes)


def parse_header(header: bytes, data_bytes: int, file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors header lists; ValueError unless their data tiles the `data_bytes` after it."""
    try:
        table = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"its header is not JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError("its header is not a JSON object")
    data_start = 8 + len(header)
    tensors = {name: _stored_tensor(name, entry, file, data_start) for name, entry in table.items()
               if name != "__metadata__"}
    end = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        if t.start != end:
            raise ValueError(f"the data of {t.name} starts at byte {t.start:,}, not where the tensor before it ends "
                             f"({end:,})")
        end += t.nbytes
    if end - data_start > data_bytes:
        raise ValueError(f"its header says the tensor data takes {end - data_start:,} bytes, the file holds "
                         f"{data_bytes:,} after the header")
    if end - data_start < data_bytes:
        raise ValueError(f"it has {data_bytes - (end - data_start):,} bytes after the last tensor's data")
    return tensors


def corrupt_file(file: Path, detail: str) -> PtqlabError:
    return PtqlabError(f"{file} is truncated or corrupted: {detail}; re-download or re-create it")


def header_tensors(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file (its header only); ValueError saying what is wrong unless the header
    parses, its tensors tile the data exactly and safetensors itself opens the file. The one test of a whole
    safetensors file: loading a model (models.check_weight_files) and validating a checkpoint both use it."""
    size = file.stat().st_size
    with file.open("rb") as f:
        length = header_length(f.read(8), size)
        tensors = parse_header(f.read(length), size - 8 - length, file)
    try:
        with safe_open(file, framework="pt"):
            pass
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        raise ValueError(f"safetensors cannot open it ({e})") from None
    return tensors


def read_header(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file (its header only); PtqlabError for a truncated or corrupted file."""
    try:
        return header_tensors(file)
    except ValueError as e:
        raise corrupt_file(file, str(e)) from None


def read_ints(tensor: StoredTensor) -> list[int] | None:
    """The values of a small int32 / int64 tensor (a `weight_shape`); None for another dtype."""
    code = {"int32": "i", "int64": "q"}.get(tensor.dtype)
    if code is None or tensor.nbytes > 64:
        return None
    with tensor.file.open("rb") as f:
        f.seek(tensor.start)
        data = f.read(tensor.nbytes)
    return list(struct.unpack(f"<{tensor.nbytes // struct.calcsize(code)}{code}", data))


def weight_files(folder: Path, fix: str) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files holding the weights (those the index lists when there is one) and the index's
    weight_map; PtqlabError for a broken index or a listed file that is missing."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return sorted(folder.glob("*.safetensors")), None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a map from tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise PtqlabError(f"{index} is not a valid safetensors index ({e}): {fix}") from None
    for name in sorted(set(weight_map.values())):
        if not (folder / name).is_file():
            listed = sorted(k for k, v in weight_map.items() if v == name)
            raise PtqlabError(f"{folder}: {name} is missing; {INDEX_NAME} lists {len(listed)} tensors in it "
                              f"(e.g. {listed[0]}): {fix}")
    return [folder / name for name in sorted(set(weight_map.values()))], weight_map


def index_problems(weight_map: dict[str, str], tensors: dict[str, StoredTensor]) -> list[str]:
    """Tensors the index places in a file that does not hold them."""
    return [f"{INDEX_NAME} puts {name} in {file}, which does not hold it"
            for name, file in sorted(weight_map.items())
            if name not in tensors or tensors[name].file.name != file]


def read_tensors(files: list[Path]) -> tuple[dict[str, StoredTensor], list[str]]:
    """Every tensor of every file, by name (headers only), and the names stored in two files."""
    tensors: dict[str, StoredTensor] = {}
    twice = []
    for file in files:
        for name, tensor in read_header(file).items():
            if name in tensors:
                twice.append(f"{name} is stored twice, in {tensors[name].file.name} and {file.name}")
            tensors[name] = tensor
    return tensors, twice

