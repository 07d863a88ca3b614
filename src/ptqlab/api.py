"""The public verbs: `quantize` a model into a checkpoint folder. The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.markup import escape

from ptqlab.card import write_card
from ptqlab.data import CalibrationConfig, check_calibration, load_calibration
from ptqlab.embedded import DEFAULT_MODEL_NAME, cache_root
from ptqlab.engine import EngineOptions
from ptqlab.engine.distributed import World, join, leave, peak_gpu_bytes_per_rank, world_from_environment
from ptqlab.engine.experts import routed_experts
from ptqlab.engine.gpu_memory import check_gpu_budget, cuda_overhead, free_gpu_bytes, out_of_memory_line
from ptqlab.engine.memory import (MARGIN, MemoryPlan, ModelShape, RunShape, check_cpu_budget, estimate, free_cpu_bytes,
                                  parse_bytes, resident_bytes, size_flag)
from ptqlab.engine.resume import Checkpointer
from ptqlab.engine.steps import kind_of
from ptqlab.engine.stream import StreamedModel
from ptqlab.errors import OutOfMemory, PtqlabError
from ptqlab.formats.compressed_tensors import (ShardWriter, checkpoint_tensors, module_tensors, write_checkpoint,
                                               write_config)
from ptqlab.families import FAMILIES, moe_layout
from ptqlab.formats.readback import (MOE_TRANSFORMERS_BOUND, expert_reading, read_back, several_expert_schemes,
                                     unreadable_experts)
from ptqlab.models import (LoadedModel, ModelSource, check_source, compute_dtype, decoder_layer_names, decoding_note,
                           load_checked, load_tokenizer, model_dtype, resolve_device, stored_dtype)
from ptqlab.options import QuantizeOptions, RunOptions, given
from ptqlab.output import RESUME_NAME, atomic_dir, check_writable, resumable_partial
from ptqlab.pipeline import QuantizationResult, check_streamable_recipe, quantize_model
from ptqlab.progress import say
from ptqlab.recipe import Recipe
from ptqlab.recipes import get_recipe
from ptqlab.record import RunRecord, versions
from ptqlab.version import __version__


def request_of(model: str | None, recipe: Recipe, options: RunOptions) -> dict:
    """Everything a user asks for that determines a checkpoint's tensors: recorded in it, and compared before a
    checkpoint is reused (`lab`), so that a changed setting never passes for the old result."""
    calibration = calibration_of(recipe, options.calibration, options.seed)
    folder = Path(model).expanduser() if model is not None else None
    local = folder is not None and folder.is_dir()
    return {"model": str(folder.resolve()) if local else model, "weights": model_files_stamp(folder) if local else None,
            "recipe": recipe.to_dict(), "dtype": options.dtype, "seed": options.seed,
            "calibration": None if calibration is None else dataclasses.asdict(calibration),
            "device": resolve_device(options.device).type, "ptqlab": __version__}


MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken")
"""The files of a model folder a checkpoint is made from: weights, index, config and tokenizer."""


def model_files_stamp(folder: Path) -> list[list]:
    """[[name, bytes, mtime_ns], ...] for the model files in `folder`: the weights replaced at the same path (a
    fine-tune saved again, a download of another revision) change it, so a partial run or a checkpoint made from the
    old files is never taken for one of the new. From the file system alone: no file is read."""
    stamp = []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in MODEL_FILE_SUFFIXES and not path.name.startswith(".") and path.is_file():
            status = path.stat()  # through a link: the hub cache's blob
            stamp.append([path.name, status.st_size, status.st_mtime_ns])
    return stamp


def calibration_of(recipe: Recipe, calibration: CalibrationConfig | None, seed: int) -> CalibrationConfig | None:
    """The calibration a run uses: None for a data-free recipe, else `calibration` (default: CalibrationConfig())
    drawn with the run's `seed`, the one seed a run has."""
    if not recipe.calibrated:
        return None
    return replace(calibration or CalibrationConfig(), seed=seed)


def _run_record(loaded, result: QuantizationResult, settings: dict, seconds: float, request: dict,
                verification: list[dict] = ()) -> RunRecord:
    schemes = result.recipe.schemes  # the recipe's own, then its overrides'
    formats = {scheme.format for scheme in schemes}
    return RunRecord(
        model=loaded.source,
        model_path=loaded.path,
        model_note=loaded.note,
        recipe=result.recipe.to_dict(),
        format=formats.pop() if len(formats) == 1 else "mixed-precision",  # as the config says (compressed-tensors)
        scheme="; ".join(scheme.describe() for scheme in schemes),
        settings=settings,
        quantized_layers=len(result.quantized),
        ignored_layers=tuple(result.ignored),
        notes=tuple(result.notes),
        layers=tuple({"index": r.index, "seconds": {k: round(v, 3) for k, v in r.seconds.items()}, "details": r.details,
                      **({"experts": r.experts} if r.experts else {})} for r in result.layer_reports),
        seconds=round(seconds, 3),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=versions(),
        command=tuple(sys.argv),
        request=request,
        verification=tuple(verification),
    )


def source_folders(model: str | None) -> tuple[Path, ...]:
    """The local folder a run reads its model from (the embedded model's cache folder when none is named): what an
    --out must never be or contain."""
    if model is None:
        return (cache_root(),)
    path = Path(model).expanduser()
    return (path,) if path.is_dir() else ()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_out(source: str | None, recipe: str) -> Path:
    name = Path(source.rstrip("/")).name if source else DEFAULT_MODEL_NAME
    return Path(f"{name}-{recipe}")


def quantize(model: str | None = None, recipe: str | Recipe = "fp8-dynamic", out: str | Path | None = None,
             options: QuantizeOptions | None = None, **settings) -> Path:
    """Quantize `model` (hub id, local folder, or None for the embedded default) with `recipe` into `out`, as
    `options` say (ptqlab/options.py; keyword arguments set its fields: `quantize(model, recipe, out=..., quiet=True)`).

    Calibrated recipes (GPTQ) draw `options.calibration` samples (default: ultrachat_200k, offline text without a
    hub) with `options.seed` and run the layer-sequential engine on `options.device` (auto: the GPU if there is one).
    Before loading anything the run's memory plan (engine/memory.py) is checked against `max_gpu_memory` (default:
    what the GPU has free; the plan counts the CUDA libraries' measured memory, the allocator's rounding and a margin
    beside its tensors) and `max_cpu_memory` (default: 90 % of what is free now); an explicit GPU budget is also
    enforced on the allocator.
    With `stream`, the model is read from its safetensors files one decoder layer at a time and the checkpoint is
    written as layers finish (engine/stream.py): neither is ever whole in memory; the tensors are the same. A
    calibrated run keeps its state after every layer and resumes after a crash (engine/resume.py). In a
    mixture-of-experts model, an expert routed fewer than `min_expert_tokens` calibration tokens in a layer is
    calibrated on all of that layer's tokens (engine/experts.py). `kv_cache` (fp8, fp8-head) sets the recipe's `kv`:
    an FP8 KV cache whose scales are calibrated on the keys and values the quantized layers produce (then even a
    round-to-nearest recipe draws calibration samples).
    Returns the checkpoint folder. The folder appears only when complete (see ptqlab.output).
    """
    options = given(options, QuantizeOptions, settings)
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    recipe = recipe.with_overrides(ignore=options.ignore, group_size=options.group_size, kv_cache=options.kv_cache)
    request = request_of(model, recipe, options)
    out = Path(out) if out is not None else default_out(model, recipe.name)
    protect = source_folders(model)
    # Before the slow part: fail in a second, not after loading.
    check_writable(out, options.overwrite, protect)
    calibration = calibration_of(recipe, options.calibration, options.seed)
    if calibration is not None:
        check_calibration(calibration, batch_size=options.calib_batch_size)
    checked = check_source(model, options.dtype)
    _check_streamable(checked, options.stream)
    check_streamable_recipe(recipe, options.stream)
    gpu_budget, cpu_budget = budgets(options.device, options.max_gpu_memory, options.max_cpu_memory)
    shape, run_shape = _plan_shapes(checked, recipe, options)
    memory = estimate(shape, run_shape, gpu_budget)
    if gpu_budget is not None:
        check_gpu_budget(shape, run_shape, memory, free_gpu_bytes(resolve_device(options.device)),
                         None if options.max_gpu_memory is None else _size(options.max_gpu_memory, "--max-gpu-memory"))
    check_cpu_budget(memory, cpu_budget, options.stream)
    check_writable(out, options.overwrite, protect, memory.disk_bytes)  # free space for the checkpoint the plan sizes
    world = world_from_environment()
    if world.rank > 0:  # another rank of a run of several: it calibrates with rank 0, which writes
        if recipe.calibrated:
            _calibrate_as_helper(world, out, request, checked, recipe, options, calibration, memory)
        return out
    if not options.quiet:  # once every check has passed: a refused run prints its one line only
        say(escape(memory.lines()[0]))
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    with saying_out_of_memory(out, recipe.calibrated, shape, run_shape, memory, options), \
            saying_what_is_kept(out, recipe.calibrated), \
            atomic_dir(out, options.overwrite, protect, resumable=recipe.calibrated, what="quantize") as tmp, \
            gpu_memory_limit(options.device, options.max_gpu_memory and gpu_budget), \
            joined(world, recipe, options.device) as engine_device:
        loaded, streamed = _load(checked, options.dtype, options.stream)
        calibration_set = None if calibration is None else load_calibration(loaded.tokenizer, calibration)
        stored = model_dtype(loaded.model)
        compute = compute_dtype(engine_device, stored) if recipe.calibrated else stored
        fingerprint = _fingerprint(request, options, compute, world)
        checkpoint, writer, write_layer = _layer_writing(tmp, recipe, streamed, fingerprint, world)
        engine = EngineOptions(engine_device, options.calib_batch_size, offload=world.several or not memory.layers_on_gpu,
                               activations_on_gpu=memory.activations_on_gpu, compute_dtype=compute,
                               min_expert_tokens=options.min_expert_tokens, quiet=options.quiet, world=world,
                               resume=checkpoint)
        result = quantize_model(loaded.model, recipe, calibration_set, engine, streamed, write_layer)
        peaks = peak_gpu_bytes_per_rank(world, engine_device) if recipe.calibrated else None
        leave()  # the ranks' last collective: writing and reading back are rank 0's alone
        _write_checkpoint(tmp, loaded, result, streamed, checkpoint, writer)
        resumed = checkpoint is not None and checkpoint.start_layer > 0
        verification = _verify(tmp, loaded, streamed, result, resumed, memory.read_back_bytes, cpu_budget)
        if checkpoint is not None and checkpoint.note:
            result.notes.append(checkpoint.note)
        decoded = decoding_note(checked.config, stored, result.recipe.scheme.describe())
        if decoded is not None:
            result.notes.insert(0, decoded)
        if compute != stored:
            result.notes.append(f"calibration computed in {_dtype_name(compute)}: this CPU has no native "
                                f"{_dtype_name(stored)} arithmetic; the checkpoint keeps {_dtype_name(stored)}")
        if calibration_set is not None:
            result.notes.insert(0, f"calibration: {len(calibration_set.samples)} samples, {calibration_set.tokens:,} "
                                   f"tokens from {calibration_set.source}")
        if loaded.tokenizer is None:
            result.notes.append("the model folder has no tokenizer; the checkpoint has none either")
        settings = {"recipe": recipe.name, "dtype": _dtype_name(stored), "compute_dtype": _dtype_name(compute),
                    "seed": options.seed, "out": str(out),
                    "calibration": None if calibration is None else dataclasses.asdict(calibration),
                    "calib_batch_size": options.calib_batch_size, "min_expert_tokens": options.min_expert_tokens,
                    "device": options.device, "kv_cache": recipe.kv,
                    "stream": options.stream, "ranks": world.size, "peak_gpu_bytes_per_rank": peaks,
                    "memory_plan": memory.to_dict(), "gpu_budget_bytes": gpu_budget, "cpu_budget_bytes": cpu_budget}
        _run_record(loaded, result, settings, time.perf_counter() - start, request, verification).write(tmp)
        for line in write_card(tmp):  # README.md; what transformers cannot compute on it, said once here
            if not options.quiet:
                say(escape(line))
    return out


def kept_layers(out: Path, resumable: bool) -> tuple[Path, int]:
    """(the partial folder of a stopped run on `out`, the first decoder layer its resume state lacks: 0 when it
    keeps none)."""
    partial = resumable_partial(out)
    try:
        return partial, int(json.loads((partial / RESUME_NAME).read_text())["next_layer"]) if resumable else 0
    except (OSError, ValueError, TypeError, KeyError):
        return partial, 0


@contextmanager
def saying_out_of_memory(out: Path, resumable: bool, shape: ModelShape, run: RunShape, memory: MemoryPlan,
                         options: QuantizeOptions) -> Iterator[None]:
    """A GPU out of memory anywhere in the run (engine/calibrate.py names the phase and layer; elsewhere it is the
    run's loading or writing) ends it in one line: the figures, what is kept (the partial folder keeps the finished
    layers, as after a kill) and what to change: a lower --max-gpu-memory where the plan can then move more to the
    CPU (the same command with it resumes), else a smaller --calib-batch-size."""
    try:
        yield
    except (OutOfMemory, torch.OutOfMemoryError) as e:
        where = e if isinstance(e, OutOfMemory) else OutOfMemory("loading or writing (outside the layer loop)", None,
                                                                   str(e))
        engine_device = resolve_device(options.device)
        seen = torch.cuda.max_memory_reserved(engine_device) if engine_device.type == "cuda" else None
        lower = None
        if memory.gpu_bytes is not None:  # the placement the plan picks below this one's peak
            offloaded = estimate(shape, run, memory.gpu_bytes - 1)
            if offloaded.gpu_bytes < memory.gpu_bytes:
                lower = (size_flag(offloaded.gpu_bytes), offloaded.placement())
        partial, next_layer = kept_layers(out, resumable)
        raise PtqlabError(out_of_memory_line(where.phase, where.layer, where.detail, memory.gpu_bytes, seen, lower,
                                             options.calib_batch_size, str(partial), next_layer)) from e


@contextmanager
def saying_what_is_kept(out: Path, resumable: bool) -> Iterator[None]:
    """A run stopped by SIGTERM (`timeout`, Slurm, `docker stop`) or Ctrl-C says in one line what it kept and how to
    go on, even with --quiet: a batch job's log is where its user looks for it."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        partial, next_layer = kept_layers(out, resumable)
        if next_layer > 0:
            say(escape(f"stopped: decoder layers 0-{next_layer - 1} are kept in {partial}; the same command resumes "
                       f"from layer {next_layer}"))
        else:
            say(escape(f"stopped before any layer was finished: nothing kept, no {out} written; the same command "
                       "starts over"))
        raise


def _check_streamable(checked: ModelSource, stream: bool) -> None:
    """--stream reads text-only models: a vision-language model's files name its modules as the hub does (visual.*,
    language_model.model.*), not as transformers 5 builds them, which the streamed reader does not map yet."""
    family = FAMILIES.get(checked.config.model_type)
    if stream and family is not None and family.vision:
        raise PtqlabError(f"--stream does not read vision-language models yet ({checked.source!r} is a "
                          f"{checked.config.model_type} model): quantize it without --stream, loaded whole")


@contextmanager
def joined(world: World, recipe: Recipe, device: str) -> Iterator[torch.device]:
    """The device this rank computes on (rank r of several on one machine: GPU r), inside the run's process group
    when there are several ranks and the recipe calibrates (data-free recipes need no other rank)."""
    engine_device = resolve_device(device)
    if world.several and engine_device.type == "cuda" and device in ("auto", "cuda"):
        engine_device = torch.device("cuda", world.local_rank)
    if not (world.several and recipe.calibrated):
        yield engine_device
        return
    join(world, engine_device)
    try:
        yield engine_device
    finally:
        leave()


def _fingerprint(request: dict, options: QuantizeOptions, compute: torch.dtype, world: World) -> dict:
    """What a resumed run must share with the run it continues (engine/resume.py)."""
    return {**request, "calib_batch_size": options.calib_batch_size, "compute_dtype": _dtype_name(compute),
            "min_expert_tokens": options.min_expert_tokens, "ranks": world.size}


def _calibrate_as_helper(world: World, out: Path, request: dict, checked: ModelSource, recipe: Recipe,
                         options: QuantizeOptions, calibration: CalibrationConfig, memory: MemoryPlan) -> None:
    """Rank r > 0 of a run of several: load the model (or stream it) as rank 0 does, calibrate its share of the
    batches with the others, keep its share of the resume state in rank 0's partial folder, and write nothing
    else. Like every rank of several, it keeps one decoder layer at a time on its GPU (the next prefetched): never
    a copy of the whole model per GPU."""
    torch.manual_seed(options.seed)
    with joined(world, recipe, options.device) as engine_device:
        loaded, streamed = _load(checked, options.dtype, options.stream)
        calibration_set = load_calibration(loaded.tokenizer, calibration)
        compute = compute_dtype(engine_device, model_dtype(loaded.model))
        checkpoint = Checkpointer(resumable_partial(out), _fingerprint(request, options, compute, world),
                                  world.rank, world.size)
        engine = EngineOptions(engine_device, options.calib_batch_size, offload=True,
                               activations_on_gpu=memory.activations_on_gpu, compute_dtype=compute,
                               min_expert_tokens=options.min_expert_tokens, quiet=True, world=world, resume=checkpoint)
        quantize_model(loaded.model, recipe, calibration_set, engine, streamed,
                       write_layer=None if streamed is None else (lambda *layer: None))
        peak_gpu_bytes_per_rank(world, engine_device)  # rank 0 records every rank's; the last collective


def _layer_writing(folder: Path, recipe: Recipe, streamed: StreamedModel | None, fingerprint: dict,
                   world: World):
    """How finished decoder layers are written -> (resume state, shard writer, the engine's write_layer). A calibrated
    run writes each layer into its resume state (merged into shards at the end); a streamed data-free run straight
    into shards; an in-memory data-free run writes the whole model at the end (None)."""
    if recipe.calibrated:
        checkpoint = Checkpointer(folder, fingerprint, world.rank, world.size)
        return checkpoint, None, lambda index, layer, name: checkpoint.write_layer(index, module_tensors(layer, name))
    if streamed is not None:
        writer = ShardWriter.for_streaming(folder, moe_layout(streamed.model.config))
        return None, writer, lambda index, layer, name: writer.add(module_tensors(layer, name))
    return None, None, None


def _write_checkpoint(folder: Path, loaded: LoadedModel, result: QuantizationResult, streamed: StreamedModel | None,
                      checkpoint: Checkpointer | None, writer: ShardWriter | None) -> None:
    """The checkpoint's weights (what the layers left, then the rest of the model), config and tokenizer."""
    if checkpoint is None and writer is None:
        write_checkpoint(folder, loaded.model, loaded.tokenizer, result.recipe, source=loaded.path)
        return
    if checkpoint is not None:  # the finished layers, from their files, into the checkpoint's shards
        layout = moe_layout(loaded.model.config)
        writer = ShardWriter.for_streaming(folder, layout) if streamed is not None else ShardWriter(folder, layout=layout)
        for tensors in checkpoint.finished_layers():
            writer.add(tensors)
    writer.add(checkpoint_tensors(loaded.model, skip=tuple(decoder_layer_names(loaded.model))))
    writer.close()
    write_config(folder, loaded.model, loaded.tokenizer, result.recipe, source=loaded.path)
    if checkpoint is not None:
        checkpoint.clear()


def _verify(folder: Path, loaded: LoadedModel, streamed: StreamedModel | None, result: QuantizationResult,
            resumed: bool, needed: int, cpu_budget: int | None) -> list[dict]:
    """The checkpoint read back by transformers and by ptqlab's runtime and compared with the quantized model in
    memory, or with each other when the run `resumed` (formats/readback.py: a mismatch fails the run) -> each
    reader's result for the run record; notes on how it went go into `result.notes`."""
    if streamed is not None:
        result.notes.append("checkpoint not read back: a streamed model is never whole in memory to compare it with")
        return []
    # The memory plan's read-back phase: the model in memory and one reader's copy, both in float32.
    available = min(MARGIN * free_cpu_bytes() + resident_bytes(), cpu_budget or float("inf"))
    if needed > available:
        result.notes.append(f"checkpoint not read back: it would need {needed / 2**30:.1f} GiB of CPU memory (float32 "
                            "copies), more than is free or allowed")
        return []
    skip, bounds = {}, {}
    if moe_layout(loaded.model.config) is not None:
        bounds["transformers"] = MOE_TRANSFORMERS_BOUND
        reading = expert_reading(loaded.model)
        unreadable = next(filter(None, map(unreadable_experts, result.recipe.schemes)), None) \
            or several_expert_schemes(_expert_schemes(loaded.model))
        if reading is None:
            skip["transformers"] = (f"it does not read {loaded.model.config.model_type}'s per-expert tensors (no "
                                    "conversion mapping merges them into its fused experts)")
        elif reading == "merged" and unreadable is not None:
            skip["transformers"] = f"it does not read {unreadable}"
    checks, notes = read_back(folder, loaded.model, skip, bounds, in_memory=not resumed)
    result.notes += [check.note() for check in checks] + notes
    return [check.to_dict() for check in checks]


def _expert_schemes(model: torch.nn.Module) -> list:
    """The scheme of every expert linear of a quantized model in memory, its experts unfused (None: kept 16-bit)."""
    return [getattr(linear, "scheme", None) for experts in routed_experts(model).values() for expert in experts
            for linear in expert.children()]


def memory_plan(model: str | None, recipe: Recipe, options: QuantizeOptions | None = None, **settings) -> MemoryPlan:
    """The run's memory plan from the model's config.json alone (no weight is read): what `quantize --plan` prints
    and what every run checks against its budgets first. `recipe` as the run would apply it (its options' ignore,
    group size and KV cache already set); keyword arguments set `options`' fields."""
    options = given(options, QuantizeOptions, settings)
    gpu_budget, _ = budgets(options.device, options.max_gpu_memory, None)
    return estimate(*_plan_shapes(check_source(model, options.dtype), recipe, options), gpu_budget)


def _plan_shapes(checked: ModelSource, recipe: Recipe, options: QuantizeOptions) -> tuple[ModelShape, RunShape]:
    """What the memory plan of the run depends on: the model's shape and the run's (with, on a GPU, what this
    process takes there besides its tensors, measured once per device)."""
    stored = stored_dtype(checked.config, options.dtype)
    engine_device = resolve_device(options.device)
    compute = compute_dtype(engine_device, stored) if recipe.calibrated else stored
    calibration = calibration_of(recipe, options.calibration, 0) or CalibrationConfig()
    statistics = any("hessian" in kind_of(step).statistics for step in recipe.steps)
    descent = next((step for step in recipe.steps if kind_of(step).scope == "layer"), None)  # AutoRound
    steps, samples = (descent.iters, min(descent.samples_per_step, calibration.num_samples)) if descent else (0, 0)
    run = RunShape(calibration.num_samples, calibration.max_seq_len, options.calib_batch_size, stored.itemsize,
                   compute.itemsize, recipe.calibrated, statistics, recipe.scheme.weights.num_bits,
                   recipe.scheme.weights.group_size, options.stream, engine_device.type, steps, samples,
                   cuda_overhead(engine_device) if engine_device.type == "cuda" else 0)
    return ModelShape.from_config(checked.config), run


def _size(value: str | int, option: str) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else parse_bytes(value, option)


def budgets(device: str, max_gpu_memory: str | int | None, max_cpu_memory: str | int | None) -> tuple[int | None, int]:
    """(GPU budget, or None for a CPU run; CPU budget) in bytes. GPU: what the GPU has free (cudaMemGetInfo), or less
    where --max-gpu-memory asks for less; the plan keeps its own margin. CPU: what was asked for, else 90 % of what
    is available."""
    engine_device = resolve_device(device)
    gpu = None
    if engine_device.type == "cuda":
        gpu = free_gpu_bytes(engine_device)
        if max_gpu_memory is not None:
            gpu = min(gpu, _size(max_gpu_memory, "--max-gpu-memory"))
    cpu = _size(max_cpu_memory, "--max-cpu-memory") if max_cpu_memory is not None else int(MARGIN * free_cpu_bytes())
    return gpu, cpu


@contextmanager
def gpu_memory_limit(device: str, budget: int | None) -> Iterator[None]:
    """The allocator for the length of a run on a GPU: expandable segments (unless PYTORCH_CUDA_ALLOC_CONF says
    otherwise), since a layer-by-layer run allocates Hessians and weights of many sizes that fixed segments leave
    fragmented under a tight budget; and with an explicit `budget`, a per-process limit the allocator refuses to
    pass."""
    engine_device = resolve_device(device)
    if engine_device.type != "cuda":
        yield
        return
    expandable = "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and hasattr(torch.cuda.memory, "_set_allocator_settings")
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    index = engine_device.index if engine_device.index is not None else torch.cuda.current_device()
    if budget:
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
    try:
        yield
    finally:
        if budget:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")


def _load(checked: ModelSource, dtype: str, stream: bool) -> tuple[LoadedModel, StreamedModel | None]:
    """The model to quantize: loaded whole, or (`stream`) with its decoder layers left on disk until needed."""
    if not stream:
        return load_checked(checked, dtype), None
    folder = Path(checked.path)
    if not folder.is_dir():
        folder = _download(checked.path)
    streamed = StreamedModel(folder, checked.config, stored_dtype(checked.config, dtype), checked.source)
    loaded = LoadedModel(model=streamed.model, tokenizer=load_tokenizer(str(folder)), source=checked.source,
                         path=str(folder), note=checked.note)
    return loaded, streamed


def _download(repo: str) -> Path:
    """A hub model's files in the local cache (what streaming reads); one line when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 (the hub client raises many kinds)
        raise PtqlabError(f"cannot download {repo!r} to stream it ({' '.join(str(e).split())[:200]}); download it "
                          "first (huggingface-cli download) and give the folder") from None


__all__ = ["quantize", "QuantizeOptions", "PtqlabError"]
