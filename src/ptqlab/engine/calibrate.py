"""The engine's layer loop: each decoder layer through statistics, transforms, quantize and propagate, with the
seconds of each phase and the notes for the run record."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ptqlab.data import CalibrationSet
from ptqlab.engine.capture import Batch, capture, make_batches
from ptqlab.engine.distributed import SINGLE, World, reduce_statistics
from ptqlab.engine.experts import MIN_EXPERT_TOKENS
from ptqlab.engine.kv_cache import KVObserver, attention_of, kv_heads_of
from ptqlab.engine.plan import Plan
from ptqlab.engine.placement import LayerPrefetcher, to_host
from ptqlab.engine.propagate import cast_back, floating_dtypes, propagate
from ptqlab.engine.quantize import quantize_layer
from ptqlab.engine.statistics import InputStats, collect
from ptqlab.engine.steps import kind_of, plan_statistics
from ptqlab.engine.transforms import transform_layer
from ptqlab.errors import OutOfMemory
from ptqlab.models import decoder_layers, model_device, model_dtype, names_by_layer, synchronizer
from ptqlab.progress import track


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, as opposed to what it computes (the Plan)."""

    device: torch.device | None = None
    """Where layers compute (default: where the model is)."""
    batch_size: int = 16
    """Calibration samples per forward."""
    offload: bool | None = None
    """Keep every layer but the current one (and the next, prefetched) on the CPU; None: when the model would take
    over 60 % of the GPU's free memory. A run through ptqlab.quantize follows its memory plan."""
    activations_on_gpu: bool = True
    """Keep the calibration hidden states on the device; False: in pinned CPU memory, streamed a batch at a time
    (engine/placement.py), where the memory plan says they do not fit the GPU budget."""
    compute_dtype: torch.dtype | None = None
    """What the forwards compute in (default: the model's): float32 for a bf16 model on a CPU that only emulates
    bf16. Each finished layer is rounded back to the stored dtype before it propagates, so that the next layer is
    calibrated on exactly what the checkpoint will compute."""
    min_expert_tokens: int = MIN_EXPERT_TOKENS
    """MoE: an expert routed fewer real tokens than this in a layer is calibrated on all of that layer's tokens."""
    quiet: bool = False
    label: str = "calibrate"
    """What the progress line calls the run."""
    world: World = SINGLE
    """Several ranks (engine/distributed.py): this one forwards its share of the batches, statistics are reduced
    over all, each linear is quantized by one owner and sent to the others."""
    load_layer: Callable[[int], nn.Module] | None = None
    """Streaming (engine/stream.py): gives decoder layer i with its weights, which are elsewhere until then (the
    model's layers are on the meta device). None: every layer is in memory."""
    finish_layer: Callable[[int, nn.Module, str], None] | None = None
    """Called with (index, layer, module name) once a layer is quantized, has produced the next layer's inputs and
    holds the stored dtype again: a resumable run writes it; a streaming run also lets it go."""
    resume: object | None = None
    """engine/resume.Checkpointer: where to start (`start_layer`, the finished layers' `reports`), the next layer's
    inputs to `restore(batches)`, and `save(index, batches, reports)` after each layer, written in the background
    until `wait()`, which the engine calls before a layer's outputs replace the hidden states. None: start at layer
    0."""


@dataclass
class LayerReport:
    index: int
    seconds: dict[str, float]  # hessians (forward + statistics), transforms, quantize, propagate
    notes: list[str]
    details: list[str] = field(default_factory=list)  # per-mapping choices of the transforms (AWQ ratios, ...), the KV cache's ranges, AutoRound's errors
    experts: list[dict] = field(default_factory=list)  # MoE: per experts module, tokens per expert and fallbacks


@torch.no_grad()
def calibrate(model: nn.Module, targets: dict[str, nn.Linear], plan: Plan, calibration: CalibrationSet,
              options: EngineOptions = EngineOptions()) -> list[LayerReport]:
    """Calibrate and quantize `targets` (linears inside decoder layers) layer by layer, as `plan` says."""
    device = options.device or model_device(model)
    stored = None if options.compute_dtype in (None, model_dtype(model)) else floating_dtypes(model)
    if stored is not None:
        model.to(options.compute_dtype)
    try:
        return _calibrate_layers(model, targets, plan, calibration, options, device, stored)
    finally:
        if stored is not None:
            cast_back(model, stored, round_only=False)


@contextmanager
def running(phase: str, layer: int | None = None) -> Iterator[None]:
    """A GPU out-of-memory error inside `phase` (of decoder layer `layer`) becomes an OutOfMemory that says where,
    instead of torch's multi-screen traceback from deep inside a library."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(phase, layer, str(e)) from e


class _PhaseClock:
    """Seconds per phase of one layer, each measured after the device has finished the phase's work."""

    def __init__(self, device: torch.device):
        self.sync, self.seconds, self.last = synchronizer(device), {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[phase], self.last = now - self.last, now


def _calibrate_layers(model: nn.Module, targets: dict[str, nn.Linear], plan: Plan, calibration: CalibrationSet,
                      options: EngineOptions, device: torch.device,
                      stored: dict[str, torch.dtype] | None) -> list[LayerReport]:
    layers = decoder_layers(model)
    offload = options.offload
    if options.load_layer is not None:
        offload = True  # the layers are not in memory at all
    elif offload is None:
        offload = device.type == "cuda" and _bytes(model) > 0.6 * torch.cuda.mem_get_info(device)[0]
    with running("placing the model on the GPU"):
        if not offload:
            model.to(device)
    batches = options.world.share(make_batches(calibration, options.batch_size))
    with running("capture (layer 0's inputs)"):
        capture(model, batches, device, release=offload)  # with offload, the layers stay on the CPU; one at a time
    if not options.activations_on_gpu and device.type == "cuda":
        for batch in batches:
            batch.hidden = to_host(batch.hidden)
    grouped, _ = names_by_layer(model, targets)
    prefixes = {id(module): name for name, module in model.named_modules()}
    masks = [None if bool(b.attention_mask.all()) else b.attention_mask.to(device) for b in batches]
    reports: list[LayerReport] = []
    start = 0
    if options.resume is not None:
        options.resume.restore(batches)
        start, reports = options.resume.start_layer, list(options.resume.reports)
    status = lambda i: "" if not reports else f"layer {reports[-1].index}: " + ", ".join(  # noqa: E731
        f"{k} {v:.1f}s" for k, v in reports[-1].seconds.items())
    remaining = range(start, len(layers))
    fetch = (lambda i: layers[i]) if options.load_layer is None else options.load_layer
    prefetcher = LayerPrefetcher(fetch, device) if offload else None  # the next layer comes while this one computes
    try:
        for index in track(remaining, options.label, total=len(remaining), quiet=options.quiet, status=status):
            following = index + 1 if index + 1 < len(layers) else None
            with running("loading", index):
                layer = layers[index].to(device) if prefetcher is None else prefetcher.get(index, following)
            prefix = prefixes[id(layer)]
            layer_targets = {name: targets[name] for name in grouped[index]}  # meta when streaming: names only
            reports.append(_calibrate_layer(model, layer, index, prefix, layer_targets, plan, batches, masks, device,
                                            stored, saved=None if options.resume is None else options.resume.wait,
                                            min_expert_tokens=options.min_expert_tokens, world=options.world))
            if stored is not None:
                cast_back(layer, stored, prefix, round_only=False)  # done computing: the checkpoint's dtypes
            if options.finish_layer is not None:
                options.finish_layer(index, layer, prefix)
            if offload and options.load_layer is None:
                layer.to("cpu")
            if options.resume is not None:
                options.resume.save(index, batches, reports)
    finally:
        if prefetcher is not None:
            prefetcher.close()
        if options.resume is not None:
            options.resume.wait()
    return reports


def _calibrate_layer(model: nn.Module, layer: nn.Module, index: int, prefix: str, targets: dict[str, nn.Linear],
                     plan: Plan, batches: list[Batch], masks: list, device: torch.device,
                     stored: dict[str, torch.dtype] | None, saved: Callable[[], None] | None = None,
                     min_expert_tokens: int = MIN_EXPERT_TOKENS, world: World = SINGLE) -> LayerReport:
    """One layer's phases; `saved` waits for a background save of the layer's inputs (engine/resume.py) before its
    outputs replace them."""
    clock = _PhaseClock(device)
    # Statistics of every linear of the layer (a transform may rescale an ignored one); only targets are quantized.
    linears = {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    statistics = plan_statistics(plan)
    with running("hessians", index):
        if statistics:
            stats = collect(layer, linears, batches, masks, index, device, statistics, prefix, min_expert_tokens,
                            reduce_statistics if world.several else None)
        else:  # round-to-nearest calibrating only the KV cache: no step reads the inputs' statistics
            stats = InputStats(linears, device, frozenset())
    clock.lap("hessians")
    notes, details = [], []
    if plan.transforms:
        with running("transforms", index):
            details, notes = transform_layer(layer, model.config, prefix, plan, stats, first=index == 0)
        clock.lap("transforms")
    quantizer = kind_of(plan.quantizer)
    with running("quantize", index):
        if quantizer.scope == "layer":  # the whole layer at once, from its inputs (engine/autoround.py)
            layer_notes, layer_details = quantizer.run(plan.quantizer, model, layer, targets, plan, batches, index,
                                                       device, world, stats)
            notes, details = notes + layer_notes, details + layer_details
        else:
            notes += quantize_layer(model, targets, plan, quantizer, stats, world)
    stats_coverage = stats.coverage
    del stats
    if stored is not None:  # the values the checkpoint will hold: smoothed norms, layers kept 16-bit
        cast_back(layer, stored, prefix)
    clock.lap("quantize")
    if saved is not None:
        saved()
    kv = None if plan.kv is None else KVObserver(attention_of(layer, model.config), kv_heads_of(model.config))
    with running("propagate", index):
        propagate(layer, batches, index, device, kv)
    if kv is not None:
        absmax = kv.attach_scales(plan.kv, plan.scale_dtype, reduce=world.several)
        details.append(f"kv cache ({plan.kv.name}): max |key| {float(absmax[0].max()):.4g}, max |value| "
                       f"{float(absmax[1].max()):.4g} over {kv.tokens} tokens")
    clock.lap("propagate")
    return LayerReport(index, clock.seconds, notes, details, stats_coverage)


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
