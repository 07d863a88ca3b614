"""Verified export: the checkpoint just written is read back by transformers (the official compressed-tensors reader)
and by ptqlab's own runtime, and each reader's logits on a few seeded sequences must match those of the quantized
model still in memory.

What this catches is a checkpoint that loads without an error and computes something else: expert tensors under
names the loader does not map (it then initializes those experts at random), a config that leaves layers out, a
layout read transposed, a scale written for the wrong row. Mixture-of-experts checkpoints have shipped like that,
loading fine and scoring at chance. All sides compute in float32 (the stored values are exact in it) and without
quantizing activations (each implementation rounds its dynamic activation scales its own way; the weights are what
a checkpoint carries), so that what differs is what the reader reads, not rounding. The match is judged on the
logits' relative error (scale-free, so a tiny random model is judged as a real one), against a bound per reader
(`BOUNDS`, the same for every scheme but those whose format declares its own transformers bound: FP4's, which
transformers reads rounded to bf16, number_formats.FP4_TRANSFORMERS_BOUND); the KL divergence and
greedy agreement are recorded beside it.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES, text_config
from ptqlab.models import auto_model_class
from ptqlab.number_formats import BY_NAME, NumberFormat
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.safetensors_files import read_header
from ptqlab.version import __version__

BOUNDS = {"transformers": 1e-3, "ptqlab runtime": 1e-3}
"""Largest ‖Δ logits‖ / ‖logits − their mean‖ accepted from each reader, for every scheme: both dequantize the stored
values in float32 as the model in memory does, so only the order of float32 sums differs."""
MOE_TRANSFORMERS_BOUND = 0.1
"""transformers on a mixture-of-experts checkpoint: it fuses the experts dequantized in the checkpoint's dtype (bf16),
which a faithful read keeps well below this; experts it did not map (left at their random initialization) land well
above it, on tiny random models as on real ones."""
SEQUENCES, LENGTH = 2, 32
IN_MEMORY = "the quantized model"


def unreadable_experts(scheme) -> str | None:
    """Why transformers' loader cannot read back an MoE's per-expert tensors in `scheme`, or None when it can: it
    fuses the experts dequantized, from FP8 `weight` or packed `weight_packed` tensors with their scales (the formats
    whose row says `transformers_reads_experts`), and maps neither INT8 `weight` tensors, nor zero points, nor
    block-wise scales."""
    if not scheme.number_format.transformers_reads_experts:
        return f"{scheme.format} experts"
    if not scheme.weights.symmetric:
        return "experts with zero points (asymmetric)"
    if scheme.weights.strategy == "block":
        return "experts with block-wise scales"
    return None


def several_expert_schemes(schemes) -> str | None:
    """Why transformers' merged reading (`expert_reading`) cannot read an MoE checkpoint whose expert linears are of
    several schemes, given each one's scheme (None: 16-bit), or None when they share one: its conversion mapping
    dequantizes every expert with the scheme of the config group targeting `Linear` (an expert at another scheme
    comes out wrong) and does not map a 16-bit expert's `weight` at all (it stays at its random initialization)."""
    distinct = list(dict.fromkeys(schemes))
    if len(distinct) <= 1:
        return None
    names = ["16-bit" if s is None else f"{s.weights.type}{s.weights.num_bits}" for s in distinct]
    return f"experts of several schemes in one checkpoint ({', '.join(dict.fromkeys(names))})"


EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.[^.]+\.weight(_packed)?$")
"""A per-expert linear's stored weight, 16-bit or quantized (its name less the last part: the linear's)."""


def stored_expert_schemes(folder: Path) -> dict:
    """Each per-expert linear of a checkpoint, by its name in the checkpoint, with the scheme its quantization_config
    gives it (None: 16-bit), from config.json and the safetensors headers (nothing is loaded)."""
    # Imported here for start-up time: the runtime's loader imports its kernels.
    from ptqlab.runtime.load import SchemeResolver

    resolve = SchemeResolver(json.loads((Path(folder) / "config.json").read_text()).get("quantization_config"))
    names = {name.rpartition(".")[0] for file in sorted(Path(folder).glob("*.safetensors")) for name in read_header(file)
             if EXPERT_WEIGHT.search(name)}
    return {name: resolve(name) for name in sorted(names)}


def experts_misread(model: nn.Module, schemes) -> str | None:
    """Why transformers does not read a checkpoint's per-expert linears (`schemes`: each one's, None for 16-bit) into
    `model`'s architecture as they are stored, or None where it does (or there are none)."""
    schemes = list(schemes)
    reading = expert_reading(model) if schemes else "linears"
    if reading == "linears":
        return None
    if reading is None:
        return f"{model.config.model_type}'s per-expert tensors"
    return next(filter(None, map(unreadable_experts, filter(None, schemes))), None) or several_expert_schemes(schemes)


def expert_reading(model: nn.Module) -> str | None:
    """How transformers reads a compressed-tensors checkpoint's per-expert tensors back into `model`'s architecture:
    "linears", kept as one linear per expert projection (what its quantizers patch in for Llama 4:
    quantizers/base.MODULES_TO_PATCH_FOR_QUANTIZATION), which reads every format compressed-tensors reads; "merged",
    dequantized and merged into its fused experts by the model type's conversion mapping (Qwen-MoE, Mixtral:
    `unreadable_experts` says which formats that takes); None, neither (gpt-oss and Granite MoE in transformers 5.17):
    it would leave the experts at their random initialization."""
    # Imported here for start-up time: transformers' quantizers and conversion mappings load its integrations.
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    from transformers.utils.quantization_config import QuantizationMethod

    modeling = sys.modules[type(model).__module__]
    if any(hasattr(modeling, name) and QuantizationMethod.COMPRESSED_TENSORS in patch["quantization_methods"]
           for name, patch in MODULES_TO_PATCH_FOR_QUANTIZATION.items()):
        return "linears"
    mapping = get_checkpoint_conversion_mapping(model.config.model_type) or []
    if any(".experts.*." in source for converter in mapping for source in getattr(converter, "source_patterns", ())):
        return "merged"  # one source tensor per expert (Granite MoE's mapping renames only the hub's fused ones)
    return None


@dataclass(frozen=True)
class ReadBack:
    reader: str
    """transformers, or ptqlab runtime."""
    versions: dict
    """The reader's packages and versions."""
    against: str
    """What its logits were compared with: the quantized model in memory, or (a resumed run, whose earlier layers
    are not in memory) the other reader."""
    relative_error: float
    kl: float
    """Mean KL(in memory ‖ read back) per token, nats."""
    top1: float
    """Share of positions whose greedy next token agrees."""

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def note(self) -> str:
        return (f"checkpoint read back by {_reader_name(self.reader)}: its logits are within {self.relative_error:.2%} "
                f"of {self.against}'s (KL {self.kl:.2g}, top-1 agreement {self.top1:.0%})")


def _reader_name(reader: str) -> str:
    return "ptqlab's runtime" if reader == "ptqlab runtime" else reader


def probe_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(3, vocab_size - 1), vocab_size, (SEQUENCES, LENGTH), generator=g)


@torch.no_grad()
def compare(expected: torch.Tensor, actual: torch.Tensor, reader: str = "", versions: dict | None = None,
            against: str = IN_MEMORY) -> ReadBack:
    """How far `actual` logits [B, T, V] are from `expected`."""
    expected, actual = expected.double(), actual.double()
    centred = expected - expected.mean(-1, keepdim=True)
    relative = float((actual - expected).norm() / centred.norm().clamp_min(1e-30))
    log_p, log_q = expected.log_softmax(-1), actual.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    top1 = float((expected.argmax(-1) == actual.argmax(-1)).double().mean())
    return ReadBack(reader, versions or {}, against, relative, kl, top1)


@torch.no_grad()
def read_back(folder: Path, model: nn.Module, skip: dict[str, str] | None = None,
              bounds: dict[str, float] | None = None, in_memory: bool = True) -> tuple[list[ReadBack], list[str]]:
    """Read `folder` back with each reader (transformers, then ptqlab's runtime; on the CPU, in float32) and compare
    its logits with `model`'s (the quantized model in memory, moved to the CPU in float32 and its activations left
    unquantized: it is done with) on a few seeded sequences -> (each reader's result, notes on readers that did not
    read it and why). `skip`: readers left out, with the reason; `bounds`: other bounds than BOUNDS. `in_memory`
    False (a resumed run: the layers done before it are not quantized in memory): the readers are compared with
    each other instead, the first that reads being the reference. PtqlabError when a reader reads something else."""
    skip, bounds = dict(skip or {}), {**BOUNDS, **_format_bounds(folder), **(bounds or {})}
    tokens = probe_tokens(text_config(model.config).vocab_size)
    expected, against = None, IN_MEMORY
    if in_memory:
        model.to("cpu", torch.float32)  # quantized layers keep their grid values (QuantizedLinear._apply)
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.scheme = replace(module.scheme, input_activations=None)
        expected = model(tokens).logits
    results, notes = [], []
    for reader, logits_of in (("transformers", _transformers_logits), ("ptqlab runtime", _runtime_logits)):
        if reader not in skip:
            try:
                actual, versions = logits_of(folder, tokens)
            except _NotRead as e:
                skip[reader] = str(e)
                continue
            finally:
                gc.collect()  # the reader's model goes before the next reader loads its own
            if expected is None:
                expected, against = actual, _reader_name(reader)
                continue
            result = compare(expected, actual, reader, versions, against)
            bound = bounds[reader] if against == IN_MEMORY else max(bounds.values())
            if not result.relative_error <= bound:
                raise PtqlabError(f"the checkpoint written to {folder} does not compute what {against} computed "
                                  f"when {_reader_name(reader)} reads it back (logits off by "
                                  f"{result.relative_error:.1%}, KL {result.kl:.3g}, top-1 agreement "
                                  f"{result.top1:.0%}): nothing was written; please report this with the model's "
                                  "config.json")
            results.append(result)
    notes += [f"checkpoint not read back by {_reader_name(r)}: {why}" for r, why in skip.items()]
    if not in_memory:
        notes.append("the run resumed, so the layers done before it are not in memory: the checkpoint's readers were "
                     "compared with each other" if results else "the run resumed and only one reader reads this "
                     "checkpoint: it was not verified")
    return results, notes


class _NotRead(Exception):
    """A reader that does not read this checkpoint at all (an architecture or format it does not run)."""


def _transformers_logits(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    # Imported here for start-up time: transformers' model classes and compressed-tensors load slowly.
    import compressed_tensors
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text())
    try:
        # In the checkpoint's dtype, then float32 (nn.Module's cast: transformers refuses to cast a quantized model,
        # whose weights it has dequantized here): asked for float32, it fuses dequantized experts in the
        # checkpoint's dtype anyway and then fails on the dtype mismatch.
        reloaded, info = auto_model_class(config).from_pretrained(folder, dtype="auto", device_map="cpu",
                                                                  output_loading_info=True, **_dequantize_at_load(folder))
        reloaded = nn.Module.float(reloaded)
        for module in reloaded.modules():  # compressed-tensors' schemes on the reader's linears
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None:
                scheme.input_activations = None
        logits = reloaded(tokens).logits
    except Exception as e:  # whatever the reader raises, the run fails in one line
        first = " ".join(str(e).split())[:200]
        raise PtqlabError(f"transformers cannot read back the checkpoint written to {folder} ({type(e).__name__}: "
                          f"{first}): nothing was written; please report this with the model's config.json") from e
    _check_vision_read(folder, reloaded, info)
    return logits, {"transformers": transformers.__version__, "compressed-tensors": compressed_tensors.__version__}


def _check_vision_read(folder: Path, reloaded: nn.Module, info: dict) -> None:
    """A vision-language model's vision part, which the text probe's logits never reach: transformers must read it
    16-bit and whole. A quantization_config whose ignore list names it otherwise than transformers names its modules
    (llm-compressor 0.14 writes the hub's older names there) makes transformers quantize those linears and initialize
    the scales the checkpoint lacks."""
    family = FAMILIES.get(reloaded.config.model_type)
    if family is None or not family.vision:
        return
    inside = tuple(f"{name}." for name in family.vision)
    quantized = [name for name, module in reloaded.named_modules()
                 if name.startswith(inside) and getattr(module, "quantization_scheme", None) is not None]
    missing = sorted(name for name in info.get("missing_keys") or () if name.startswith(inside))
    if quantized or missing:
        what = (f"quantizes {len(quantized)} of its 16-bit linears (e.g. {quantized[0]})" if quantized else
                f"initializes {len(missing)} of its tensors that the checkpoint lacks (e.g. {missing[0]})")
        raise PtqlabError(f"transformers does not read the vision part of the checkpoint written to {folder} as it was "
                          f"written: it {what}; nothing was written; please report this with the model's config.json")


def _formats(folder: Path) -> set[str]:
    """The compressed-tensors formats config.json declares: the config's and each config group's (a checkpoint of
    several schemes declares `mixed-precision` and its groups' own)."""
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    groups = (qc.get("config_groups") or {}).values()
    return {qc.get("format"), *(g.get("format") for g in groups if isinstance(g, dict))} - {None}


def stored_formats(folder: Path) -> list[NumberFormat]:
    """The rows of number_formats for the formats config.json declares (those it has)."""
    return [BY_NAME[name] for name in sorted(_formats(folder)) if name in BY_NAME]


def _format_bounds(folder: Path) -> dict[str, float]:
    """Bounds other than BOUNDS for the checkpoint's formats: the largest `transformers_bound` of theirs (FP4's:
    transformers reads it rounded to bf16)."""
    bounds = [f.transformers_bound for f in stored_formats(folder) if f.transformers_bound is not None]
    return {"transformers": max(bounds)} if bounds else {}


def _dequantize_at_load(folder: Path) -> dict:
    """from_pretrained's arguments that make compressed-tensors dequantize a checkpoint while loading where one of its
    formats needs it (FP4: left to the first forward, its decompressor gives bf16 weights, which a float32 model then
    refuses)."""
    # Imported here for start-up time: transformers' quantizer configs load its integrations.
    from transformers import CompressedTensorsConfig

    if any(f.dequantize_at_load for f in stored_formats(folder)):
        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def _runtime_logits(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    # Imported here for start-up time: the runtime loads Triton and its kernels, which `import ptqlab` does not.
    from ptqlab.runtime import load_runtime
    from ptqlab.runtime.linear import DequantizedLinear
    from ptqlab.runtime.load import check_supported

    try:
        check_supported(folder)
    except PtqlabError as e:
        raise _NotRead(str(e).split(": ", 1)[-1]) from None
    runtime = load_runtime(folder, "cpu", torch.float32)
    for module in runtime.modules():  # weights only, as on the other side
        if isinstance(module, DequantizedLinear):
            module.input_args = None
    if runtime.kv_cache_dtype == torch.float8_e4m3fn:  # keys and values unquantized too (transformers: input_activations)
        runtime.use_kv_scales(False)
    return runtime(tokens).logits, {"ptqlab": __version__}
