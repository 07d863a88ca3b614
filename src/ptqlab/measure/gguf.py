"""A GGUF file as a benchmark variant: a folder holding one .gguf file (what `ptqlab export-gguf` writes) and the
source model's tokenizer files, measured for quality through transformers' GGUF reader.

That reader dequantizes every tensor to the dtype it is given, so the variant's perplexity, KL and samples are
those of llama.cpp's weights computed in 16-bit (llama.cpp itself also rounds activations to 8 bits in its
quantized matrix products); its speed would be the 16-bit model's, not llama.cpp's, and is not measured. The
tokenizer files beside the file give it the baseline's token ids, which KL compares position by position.
"""

from __future__ import annotations

from pathlib import Path

from ptqlab.errors import PtqlabError

SPEED_NOTE = ("not measured: transformers' GGUF reader dequantizes the file to 16-bit, so its speed would be the "
              "16-bit model's, not llama.cpp's (measure that with llama.cpp's llama-bench)")
QUALITY_NOTE = ("its weights dequantized to the compute dtype; llama.cpp also rounds activations to 8 bits in its "
                "quantized matrix products, so its own KL from the baseline is somewhat higher")
RUNTIME = "transformers (GGUF dequantized)"
"""The runtime a GGUF variant is scored with, as the report names it."""


def gguf_file(folder: Path) -> Path | None:
    """The folder's .gguf file when it is a GGUF variant (exactly one .gguf file and no config.json), else None."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def _fields(file: Path) -> dict:
    """The file's key-value metadata (tensor data is not read); one line for a file gguf-py cannot parse."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways inside gguf-py
        raise PtqlabError(f"{file}: not a readable GGUF file ({' '.join(str(e).split())[:120]}); export it again "
                          "with ptqlab export-gguf") from e
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")}
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # its length only: decoding every token takes a while
    fields["tokens"] = len(tokens.data) if tokens is not None else None
    return fields


def check_gguf_folder(folder: Path) -> None:
    """One line unless the folder's GGUF file parses and the source's tokenizer files sit beside it."""
    file = gguf_file(folder)
    _fields(file)
    if not (Path(folder) / "tokenizer.json").is_file():
        raise PtqlabError(f"{folder}: no tokenizer.json beside {file.name}: copy the source model's tokenizer files "
                          "into the folder (KL compares the baseline's token ids)")


def gguf_config(folder: Path) -> dict:
    """What the benchmark reads from a config.json, from the file's metadata: vocab_size, max_position_embeddings,
    and as `dtype` the source model's dtype (ptqlab.dtype), which the reader dequantizes to."""
    fields = _fields(gguf_file(folder))
    arch = fields["general.architecture"]
    return {"vocab_size": fields.get(f"{arch}.vocab_size") or fields["tokens"],
            "max_position_embeddings": fields.get(f"{arch}.context_length"),
            "dtype": fields.get("ptqlab.dtype") or "float16"}


def describe_gguf(folder: Path) -> dict:
    """Recipe, format and scheme for the report: the GGUF type and whether an importance matrix weighed it."""
    fields = _fields(gguf_file(folder))
    file_type = fields.get("ptqlab.type") or f"file type {fields.get('general.file_type')}"
    imatrix = " + imatrix" if fields.get("ptqlab.imatrix") else ""
    return {"recipe": None, "format": f"gguf {file_type}{imatrix}", "scheme": f"llama.cpp {file_type}{imatrix}",
            "gguf": {"file": gguf_file(folder).name, "type": file_type, "imatrix": bool(imatrix),
                     "source": fields.get("ptqlab.source")}}


def not_measured_speed(batch_size: int) -> dict:
    """The speed entry of a GGUF variant: no figures, and why."""
    return {"runtime": RUNTIME, "measured": False, "note": SPEED_NOTE, "ttft_ms": None, "decode_tok_s": None,
            "throughput_tok_s": None, "sweep": [], "batch_size": batch_size}
