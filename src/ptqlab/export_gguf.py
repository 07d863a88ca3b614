"""The `export_gguf` verb: a Hugging Face model (or a ptqlab checkpoint, dequantized) as one GGUF file for llama.cpp,
in llama.cpp's Q8_0, Q4_0 or Q4_K_M mix, optionally with an importance matrix from ptqlab's own calibration.

The importance matrix is what llama.cpp's `imatrix` tool measures: per linear layer, the mean squared input of each
input channel over the calibration tokens, i.e. the diagonal of the inputs' second moment (the engine's Hessian
H = 2/n ΣXᵀX, halved). It is gathered layer by layer on the unquantized model (engine/capture, statistics,
propagate), and weighs each block's scale search (quant/gguf_quants.py). The file appears only when complete: it is
written under a temporary name beside --out and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T, GGUFReader
from rich.markup import escape
from torch import nn

from ptqlab.data import CalibrationConfig, CalibrationSet, check_calibration, load_calibration
from ptqlab.embedded import DEFAULT_MODEL_NAME
from ptqlab.engine.capture import capture, make_batches
from ptqlab.engine.propagate import cast_back, floating_dtypes, propagate
from ptqlab.engine.statistics import collect
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES
from ptqlab.formats.gguf_file import (FILE_TYPES, PlannedTensor, architecture_of, gguf_name, gguf_tensors, is_70b,
                                      quantizable, tensor_type, write_gguf, write_metadata)
from ptqlab.formats.gguf_tokenizer import tokenizer_metadata
from ptqlab.models import (LoadedModel, check_source, compute_dtype, decoder_layers, load_checked, load_config,
                           load_tokenizer, model_dtype, resolve_device)
from ptqlab.options import RunOptions, given
from ptqlab.output import atomic_file, check_can_write
from ptqlab.progress import say, track
from ptqlab.quant import gguf_quants
from ptqlab.version import __version__

GGUF_TYPES = tuple(FILE_TYPES)
RECORD_KEY = "ptqlab.version"
"""The metadata key that marks a GGUF file ptqlab wrote (--overwrite replaces only such a file)."""


@dataclass(frozen=True)
class GGUFExport:
    """What an export wrote."""

    path: Path
    file_type: str
    tensor_types: dict[str, str]
    """GGUF tensor name -> GGML type."""
    bytes: int
    seconds: float
    importance: bool
    notes: tuple[str, ...]

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.tensor_types.values()))


LAB_PREFIX = "gguf-"
IMATRIX_SUFFIX = "-imatrix"


@dataclass(frozen=True)
class GGUFVariant:
    """A GGUF export as one variant of `ptqlab lab` (--recipes gguf-Q4_K_M, gguf-Q4_K_M-imatrix): exported from the
    baseline, measured for quality through transformers' GGUF reader."""

    file_type: str
    """Q8_0, Q4_0 or Q4_K_M."""
    importance: bool = False
    """Weighed by an importance matrix from the lab's calibration."""

    @property
    def name(self) -> str:
        return f"{LAB_PREFIX}{self.file_type}{IMATRIX_SUFFIX if self.importance else ''}"


def gguf_variant(name: str) -> GGUFVariant | None:
    """The GGUF variant a --recipes entry names (gguf-TYPE[-imatrix], any case), None for a recipe; one line for
    a gguf- name that is neither."""
    if not name.lower().startswith(LAB_PREFIX) or name.lower().endswith((".yaml", ".yml")):
        return None
    rest = name[len(LAB_PREFIX):]
    importance = rest.lower().endswith(IMATRIX_SUFFIX)
    rest = rest[:-len(IMATRIX_SUFFIX)] if importance else rest
    file_type = {t.upper(): t for t in FILE_TYPES if t != "F32"}.get(rest.upper())
    if file_type is None:
        raise PtqlabError(f"--recipes {name}: a GGUF variant is gguf-TYPE or gguf-TYPE-imatrix with TYPE one of "
                          f"{', '.join(t for t in GGUF_TYPES if t != 'F32')}")
    if importance and file_type == "Q8_0":
        raise PtqlabError(f"--recipes {name}: Q8_0 ignores an importance matrix (as llama.cpp's quantize does); use gguf-Q8_0")
    return GGUFVariant(file_type, importance)


def default_out(source: str | None, file_type: str) -> Path:
    name = Path(source.rstrip("/")).name if source else DEFAULT_MODEL_NAME
    return Path(f"{name}-{file_type}.gguf")


def check_out(out: Path, overwrite: bool, protect: tuple[Path, ...] = ()) -> None:
    """Refuse, in one line and before any work, an --out that must not be written: not a .gguf path, a folder,
    inside the source model's folder, an existing file without --overwrite (or with it, a file ptqlab did not
    write), a folder that cannot be written."""
    if out.suffix != ".gguf":
        raise PtqlabError(f"--out {out}: a GGUF file's name ends in .gguf; e.g. --out model-Q4_K_M.gguf")
    if out.is_dir():
        raise PtqlabError(f"--out {out} is a folder: give the path of the .gguf file to write")
    resolved = out.resolve()
    for folder in protect:
        if Path(folder).resolve() in resolved.parents:
            raise PtqlabError(f"--out {out} is inside the source model {folder}: ptqlab never writes into its input; "
                              "choose another --out")
    if out.exists():
        if not overwrite:
            raise PtqlabError(f"--out {out} exists: choose another file or pass --overwrite")
        if read_record(out) is None:
            raise PtqlabError(f"--out {out} is not a GGUF file ptqlab wrote: --overwrite replaces only ptqlab's own; "
                              "choose another --out")
    check_can_write(out)


def read_record(path: Path) -> dict | None:
    """The ptqlab.* metadata of a GGUF file ptqlab wrote, or None (another writer's file, or not a GGUF file)."""
    try:
        reader = GGUFReader(path)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return None
    if RECORD_KEY not in reader.fields:
        return None
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("ptqlab.")}


def _is_checkpoint(path: str) -> bool:
    """A local folder whose config declares a compressed-tensors quantization (a ptqlab or llm-compressor checkpoint)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        quantization = json.loads(file.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors"


def _load_checkpoint(path: str, source: str) -> LoadedModel:
    """A compressed-tensors checkpoint with its weights dequantized, as a plain 16-bit model (no quantization left
    on its linears: calibrating it must not fake-quantize activations)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # start-up time: imported on first use

    load_config(path, source)  # its config readable, or one line
    try:
        compressed = AutoModelForCausalLM.from_pretrained(path, dtype="auto",
                                                          quantization_config=CompressedTensorsConfig(dequantize=True))
    except Exception as e:  # noqa: BLE001 - transformers / compressed-tensors raise many kinds
        raise PtqlabError(f"cannot dequantize the checkpoint {source!r}: {' '.join(str(e).split())[:200]}") from e
    config = compressed.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=model_dtype(compressed))
    wanted = model.state_dict()
    state = {k: v.to(wanted[k].dtype) for k, v in compressed.state_dict().items() if k in wanted}
    head = f"{FAMILIES[config.model_type].head}.weight"  # tied to the embeddings where the checkpoint has none
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if k != head]
    if missing:
        raise PtqlabError(f"the checkpoint {source!r} lacks {len(missing)} tensors its config describes (e.g. {missing[0]})")
    return LoadedModel(model=model.eval(), tokenizer=load_tokenizer(path), source=source, path=path)


@torch.no_grad()
def input_importance(model: nn.Module, calibration: CalibrationSet, batch_size: int,
                     device: torch.device, quiet: bool = True) -> dict[str, torch.Tensor]:
    """llama.cpp's importance matrix from ptqlab's calibration: for every linear of every decoder layer and for the
    output head, the mean squared input per input channel over the real calibration tokens -> module name ->
    [in_features] float32 (on the CPU)."""
    stored = model_dtype(model)
    compute = compute_dtype(device, stored)
    dtypes = floating_dtypes(model) if compute != stored else None
    if dtypes is not None:
        model.to(compute)  # a CPU without native bf16 computes in float32: exact for bf16 values, and faster
    model.to(device)
    try:
        batches = make_batches(calibration, batch_size)
        capture(model, batches, device)
        masks = [None if bool(b.attention_mask.all()) else b.attention_mask.to(device) for b in batches]
        names = {id(m): n for n, m in model.named_modules()}
        importance = {}
        layers = decoder_layers(model)
        for index, layer in track(enumerate(layers), "importance matrix", total=len(layers), quiet=quiet,
                                  status=lambda item: f"layer {item[0]}"):
            prefix = names[id(layer)]
            linears = {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            stats = collect(layer, linears, batches, masks, index, device, frozenset({"hessian"}), prefix)
            for name in linears:
                importance[name] = (stats.hessian(name).diagonal() / 2).float().cpu()  # H = 2/n ΣXᵀX
            del stats
            propagate(layer, batches, index, device)
        head = model.get_output_embeddings()
        norm = model.get_submodule(FAMILIES[model.config.model_type].final_norm)
        total, count = torch.zeros(head.in_features, dtype=torch.float64, device=device), 0
        for batch in batches:
            rows = norm(batch.hidden.to(device))[batch.attention_mask.to(device).bool()].double()
            total += (rows * rows).sum(0)
            count += rows.shape[0]
        importance[names[id(head)]] = (total / count).float().cpu()
    finally:
        model.to("cpu")
        if dtypes is not None:
            cast_back(model, dtypes, round_only=False)
    return importance


def _generation_eos(path: str) -> list[int] | None:
    file = Path(path) / "generation_config.json"
    try:
        eos = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    except ValueError:
        return None
    return [eos] if isinstance(eos, int) else eos


def plan_tensors(model: nn.Module, arch, file_type: str, imatrix: dict[str, torch.Tensor] | None):
    """Every tensor of the file in order -> (its plan: GGUF name, shape, GGML type; (the tensor as stored, its
    importance or None))."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_name = FAMILIES[config.model_type].head
    seventy_b = is_70b(config)
    state = ((n, p.detach()) for n, p in model.state_dict().items() if not n.endswith("inv_freq"))
    plan, weights = [], []
    for hf_name, name, tensor in gguf_tensors(state, config, arch):
        shape = tuple(tensor.shape)
        qtype = tensor_type(name, shape[-1], file_type, config.num_hidden_layers, tied, imatrix is not None,
                            seventy_b) if quantizable(name, shape) else T.F32  # norms, biases, rope factors: float32, as llama.cpp keeps them
        plan.append(PlannedTensor(name, shape, qtype))
        # a tied head is token_embd: the importance of what the head reads is its
        head = head_name if tied and name == "token_embd.weight" else hf_name.removesuffix(".weight")
        weights.append((tensor, None if imatrix is None else imatrix.get(head)))
    return plan, weights


def export_gguf(model: str | None = None, file_type: str = "Q4_K_M", out: str | Path | None = None,
                importance: bool = False, options: RunOptions | None = None, **settings) -> GGUFExport:
    """Write `model` (hub id, folder, a compressed-tensors checkpoint folder, or None for the embedded default) as a
    GGUF file of llama.cpp's `file_type` mix (Q8_0, Q4_0, Q4_K_M), loaded, calibrated and written as `options` say
    (ptqlab/options.py; keyword arguments set its fields). `importance`: weigh every block's scale search by the
    importance matrix of `options.calibration` (drawn with `options.seed`), as llama.cpp's quantize --imatrix does. A
    checkpoint's weights are dequantized first: quantizing them again adds the new format's error to the old."""
    options = given(options, RunOptions, settings)
    dtype, seed, quiet, calibration = options.dtype, options.seed, options.quiet, options.calibration
    file_type = {t.upper(): t for t in FILE_TYPES}.get(str(file_type).upper(), file_type)
    if file_type not in FILE_TYPES:
        raise PtqlabError(f"unknown --type {file_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    checkpoint = model is not None and Path(model).expanduser().is_dir() and _is_checkpoint(str(Path(model).expanduser()))
    if checkpoint:
        path = str(Path(model).expanduser())
        config, source, note = load_config(path, model), model, None
    else:
        checked = check_source(model, dtype)
        path, config, source, note = checked.path, checked.config, checked.source, checked.note
    arch = architecture_of(config)
    out = Path(out) if out is not None else default_out(model, file_type)
    protect = (Path(path),) if Path(path).is_dir() else ()
    check_out(out, options.overwrite, protect)
    # the tokenizer is checked before any weight is read: one llama.cpp would split differently is refused at once
    tokens = tokenizer_metadata(load_tokenizer(path), config, _generation_eos(path))
    notes = [note] if note else []
    if importance and file_type in ("Q8_0", "F32"):
        importance = False
        notes.append(f"no importance matrix gathered: {file_type} ignores one (as llama.cpp's quantize does)")
    if importance:
        calibration = dataclasses.replace(calibration or CalibrationConfig(), seed=seed)
        check_calibration(calibration, batch_size=options.calib_batch_size)
    engine_device = resolve_device(options.device)
    start = time.perf_counter()
    torch.manual_seed(seed)

    loaded = _load_checkpoint(path, source) if checkpoint else load_checked(checked, dtype)
    if checkpoint:
        notes.append("weights dequantized from the checkpoint's format: the GGUF type's error adds to that format's")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and getattr(config, "use_sliding_window", True):
        notes.append(f"sliding_window {window}: llama.cpp's {gguf_name(arch)} architecture attends to the whole context, "
                     f"so its outputs differ from the source model's past {window} tokens")
    imatrix, calibration_set = None, None
    if importance:
        calibration_set = load_calibration(loaded.tokenizer, calibration)
        if not quiet:
            say(f"importance matrix: {len(calibration_set.samples)} samples, {calibration_set.tokens:,} tokens from "
                f"{escape(calibration_set.source)}")
        imatrix = input_importance(loaded.model, calibration_set, options.calib_batch_size, engine_device, quiet)
        notes.append(f"importance matrix from {len(calibration_set.samples)} samples ({calibration_set.tokens:,} tokens) "
                     f"of {calibration_set.source}")

    plan, weights = plan_tensors(loaded.model, arch, file_type, imatrix)
    extra = {
        RECORD_KEY: __version__, "ptqlab.source": source, "ptqlab.source_path": str(path), "ptqlab.type": file_type,
        "ptqlab.imatrix": imatrix is not None, "ptqlab.seed": seed,
        "ptqlab.calibration": json.dumps(dataclasses.asdict(calibration) if imatrix is not None else None),
        "ptqlab.dequantized_checkpoint": checkpoint,
        "ptqlab.dtype": str(model_dtype(loaded.model)).removeprefix("torch."),
        "ptqlab.created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ptqlab.command": " ".join(sys.argv), "ptqlab.notes": json.dumps(notes),
    }
    if calibration_set is not None:  # the keys llama.cpp's quantize writes for an imatrix
        extra["quantize.imatrix.dataset"] = calibration_set.source
        extra["quantize.imatrix.entries_count"] = len(imatrix)
        extra["quantize.imatrix.chunks_count"] = len(calibration_set.samples)
    name = Path(str(source).rstrip("/")).name

    def data():
        for planned, (tensor, qw) in zip(plan, weights):
            if planned.qtype.name in ("F32", "F16"):
                yield tensor.float().numpy().astype("float32" if planned.qtype.name == "F32" else "float16")
            else:
                yield gguf_quants.quantize_to_bytes(tensor.float(), planned.qtype, qw)

    status = lambda item: f"{item[0].name} {item[0].qtype.name}"  # noqa: E731
    out_abs = out.absolute()
    out_abs.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(out_abs) as tmp:
            ordered = track(zip(plan, data()), f"export {file_type}", total=len(plan), quiet=quiet, status=status)
            write_gguf(tmp, arch, lambda writer: write_metadata(writer, loaded.model.config, arch, file_type, name,
                                                                tokens, extra), plan, (array for _, array in ordered))
    except OSError as e:  # a full disk after the work: one line, and no partial file
        raise PtqlabError(f"cannot write {out}: {e.strerror or e}; free space or choose another --out") from e
    return GGUFExport(out, file_type, {p.name: p.qtype.name for p in plan}, out_abs.stat().st_size,
                      time.perf_counter() - start, imatrix is not None, tuple(notes))

