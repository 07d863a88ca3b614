"""The verbs' options: what a user sets for one run, as frozen dataclasses the command line fills field by field and
the verbs carry down unchanged (`quantize` in api.py, `export_gguf`, the suite's `lab` and `sensitivity`), instead of
each verb forwarding a list of parameters to the next. Defaults are the recommended values, the command line's.

RunOptions holds what every verb that loads and calibrates a model shares; QuantizeOptions adds what only a quantize
run has. The engine's own options (engine/calibrate.EngineOptions) are derived from these where a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

from ptqlab.data import CalibrationConfig
from ptqlab.engine.experts import MIN_EXPERT_TOKENS


@dataclass(frozen=True)
class RunOptions:
    """How a verb loads, calibrates and writes: shared by quantize, export_gguf, lab and sensitivity."""

    dtype: str = "auto"
    """Load dtype: auto (the model's own), bfloat16, float16, float32."""
    seed: int = 0
    """The one seed of a run: the calibration draw and every other random choice; recorded in what it writes."""
    device: str = "auto"
    """Where calibration runs: auto (the GPU if there is one), cpu, cuda, cuda:N."""
    calibration: CalibrationConfig | None = None
    """The calibration samples (None: CalibrationConfig()'s), drawn with `seed`; unused by a data-free run."""
    calib_batch_size: int = 16
    """Calibration sequences per forward."""
    overwrite: bool = False
    """Replace an existing output that ptqlab wrote (never anything else)."""
    quiet: bool = False
    """No progress bars."""


@dataclass(frozen=True)
class QuantizeOptions(RunOptions):
    """A quantize run's options: RunOptions, plus the recipe changes the command line offers and the run's memory."""

    ignore: list[str] | tuple[str, ...] | None = None
    """Layers to keep 16-bit (names or re: patterns), replacing the recipe's list; None: the recipe's."""
    group_size: int | None = None
    """The recipe's group size, changed; None: the recipe's."""
    kv_cache: str | None = None
    """fp8 or fp8-head: sets the recipe's `kv` (an FP8 KV cache with calibrated scales); None: the recipe's."""
    stream: bool = False
    """Read the model one decoder layer at a time from its safetensors files and write the checkpoint as layers
    finish (engine/stream.py): neither is ever whole in memory; the tensors are the same."""
    max_gpu_memory: str | int | None = None
    """The GPU memory the run may use at its peak, bytes or '24GiB'; None: what the GPU has free (the plan keeps its
    own margin: engine/gpu_memory.py). Also enforced on the allocator when given."""
    max_cpu_memory: str | int | None = None
    """The CPU memory the run may use at its peak, bytes or '8GiB'; None: 90 % of what is available."""
    min_expert_tokens: int = MIN_EXPERT_TOKENS
    """Mixture-of-experts models: an expert routed fewer calibration tokens than this in a layer is calibrated on all
    of that layer's tokens (engine/experts.py)."""

    def __post_init__(self) -> None:
        # A budget that cannot be read is refused on every run, not only where it applies (a GPU one on a GPU)
        from ptqlab.engine.memory import parse_bytes  # start-up time: imported on first use

        for option, value in (("--max-gpu-memory", self.max_gpu_memory), ("--max-cpu-memory", self.max_cpu_memory)):
            if isinstance(value, str):
                parse_bytes(value, option)


Options = TypeVar("Options", bound=RunOptions)


def given(options: Options | None, kind: type[Options], changes: dict) -> Options:
    """`options` (default: `kind()`) with the fields named in `changes` set: how a verb's keyword arguments map into
    its options object, so that `quantize(model, recipe, quiet=True)` and `quantize(model, recipe,
    options=QuantizeOptions(quiet=True))` are the same call. An unknown name fails as an unknown keyword does."""
    return replace(kind() if options is None else options, **changes)


def widened(options: RunOptions, kind: type[Options], **changes) -> Options:
    """`options` as the options of a verb that takes more, with `changes` (a lab's RunOptions as one of its
    quantize runs' QuantizeOptions); the fields it lacks take their defaults."""
    return kind(**{**{f.name: getattr(options, f.name) for f in fields(RunOptions)}, **changes})
