"""`bench` and `lab`: benchmark variants side by side with the 16-bit baseline, resumably, and report.

A results folder holds `variants/NAME.json` (one per variant, written when that variant is done),
`baseline-topk.safetensors` (the baseline's distributions for KL), `log.jsonl` (machine-readable events), and
the report: `results.json`, `summary.md`, `report.html`. `lab` adds `checkpoints/RECIPE/` (the quantized models).
Re-running the same command skips every checkpoint and variant already complete under the same settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ptqlab.bench.variant import BenchSettings, fingerprint, run_isolated
from ptqlab.errors import PtqlabError
from ptqlab.progress import format_seconds, log_event, say


# The mission's core three, on every device: FP8 dynamic (data-free), GPTQ W4A16, SmoothQuant + GPTQ W8A8.
DEFAULT_LAB_RECIPES = ("fp8-dynamic", "w4a16", "w8a8")


LAB_CPU_CALIBRATION = {"num_samples": 32, "max_seq_len": 512}
"""The lab's calibration size on a CPU (the quantize defaults, 256 x 1024, are for GPUs): enough tokens for every
Hessian of a small model to be full rank, and minutes, not an hour, on two cores."""


def lab_calibration_size(settings: BenchSettings, num_samples: int | None, max_seq_len: int | None,
                         quiet: bool = False) -> dict:
    """num_samples and max_seq_len for the lab: as given, else the quantize defaults on a GPU, LAB_CPU_CALIBRATION on a CPU."""
    from ptqlab.data import CalibrationConfig
    from ptqlab.models import resolve_device

    on_cpu = resolve_device(settings.device).type == "cpu"
    defaults = LAB_CPU_CALIBRATION if on_cpu else {"num_samples": CalibrationConfig.num_samples,
                                                   "max_seq_len": CalibrationConfig.max_seq_len}
    if on_cpu and (num_samples is None or max_seq_len is None):
        _say(f"[yellow]note:[/] no GPU: calibrated recipes use {defaults['num_samples']} samples of at most "
             f"{defaults['max_seq_len']} tokens; --num-samples and --max-seq-len change them", quiet)
    return {"num_samples": defaults["num_samples"] if num_samples is None else num_samples,
            "max_seq_len": defaults["max_seq_len"] if max_seq_len is None else max_seq_len}


@dataclass(frozen=True)
class Budget:
    """The quality budget a variant must meet to be recommended."""

    max_kl: float = 0.05
    """Mean KL divergence from the baseline, in nats per token."""
    max_ppl_increase: float = 5.0
    """Perplexity increase over the baseline, in percent."""


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        say(message)


def _reusable(result_json: Path, path: Path, settings: BenchSettings, needs: Path | None = None) -> dict | None:
    if not result_json.is_file() or (needs is not None and not needs.is_file()):
        return None
    result = json.loads(result_json.read_text())
    if (result.get("settings_digest") != settings.digest() or result.get("path") != str(path.resolve())
            or result.get("fingerprint") != fingerprint(path)):
        return None
    return result


class Steps:
    """The lab's own progress: which step of how many, and the time since the run started."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.start = total, 0, quiet, time.perf_counter()

    def say(self, message: str) -> None:
        self.done += 1
        _say(f"[bold][{self.done}/{self.total}][/] {message} [dim](at {format_seconds(time.perf_counter() - self.start)})[/]",
             self.quiet)


def run_benchmarks(baseline: Path | None, variants: list[tuple[str, Path]], out: Path, settings: BenchSettings,
                   quiet: bool = False, steps: Steps | None = None) -> list[dict]:
    """Benchmark the baseline (if any) then each variant, each in its own process, reusing finished ones."""
    (out / "variants").mkdir(parents=True, exist_ok=True)
    log = out / "log.jsonl"
    topk = out / "baseline-topk.safetensors"
    jobs = ([("baseline", baseline)] if baseline else []) + list(variants)
    names = [name for name, _ in jobs]
    if len(set(names)) != len(names):
        raise PtqlabError(f"two variants share a name ({', '.join(names)}): give distinct folder names")
    steps = steps or Steps(len(jobs), quiet)
    results = []
    for name, path in jobs:
        result_json = out / "variants" / f"{name}.json"
        is_baseline = baseline is not None and name == "baseline"
        cached = _reusable(result_json, path, settings, needs=topk if is_baseline else None)
        if cached is not None and (is_baseline or not baseline or cached.get("kl") is not None):
            steps.say(f"benchmark {name}: already measured ({result_json}), reused")
            log_event(log, "bench.reused", variant=name)
            results.append(cached)
            continue
        steps.say(f"benchmark {name} ({path})")
        log_event(log, "bench.start", variant=name, path=str(path))
        start = time.perf_counter()
        result = run_isolated(name, path, settings, result_json, topk_out=topk if is_baseline else None,
                              topk_in=topk if baseline is not None and not is_baseline else None, quiet=quiet)
        log_event(log, "bench.done", variant=name, seconds=round(time.perf_counter() - start, 3),
                  perplexity=result["perplexity"]["value"], kl_mean=(result["kl"] or {}).get("mean"),
                  decode_tok_s=result["speed"]["decode_tok_s"])
        results.append(result)
    return results


def bench(paths: list[str], out: str | Path = "ptqlab-bench", baseline: str | None = None,
          settings: BenchSettings = BenchSettings(), budget: Budget = Budget(), quiet: bool = False) -> Path:
    """Benchmark checkpoints or 16-bit model folders side by side; KL against `baseline` if given.

    Without `baseline`, the first path that is not quantized is the baseline, else the 16-bit model a ptqlab
    checkpoint was made from (its ptqlab.json), when that folder exists here.
    """
    from ptqlab.report import write_report

    folders = [Path(p) for p in paths]
    for folder in folders:
        if not (folder / "config.json").is_file():
            raise PtqlabError(f"{folder}: not a model folder (no config.json); bench takes local folders")
    base = Path(baseline) if baseline else _infer_baseline(folders)
    variants = [(f.name, f) for f in folders if base is None or f.resolve() != base.resolve()]
    out = Path(out)
    results = run_benchmarks(base, variants, out, settings, quiet)
    write_report(out, results, settings, budget, baseline_name="baseline" if base else None)
    return out


def _infer_baseline(folders: list[Path]) -> Path | None:
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        if "quantization_config" not in config:
            return folder
    for folder in folders:
        record = folder / "ptqlab.json"
        if record.is_file():
            source = Path(json.loads(record.read_text())["model_path"])
            if (source / "config.json").is_file():
                return source
    return None


def lab(model: str | None = None, recipes: list[str] | None = None, out: str | Path = "ptqlab-lab",
        settings: BenchSettings = BenchSettings(), budget: Budget = Budget(), dtype: str = "auto",
        quiet: bool = False, calibration=None, calib_batch_size: int = 16) -> Path:
    """Quantize `model` with each recipe and benchmark every checkpoint next to the 16-bit baseline."""
    from ptqlab.api import quantize
    from ptqlab.models import load_config
    from ptqlab.embedded import DEFAULT_MODEL_NAME, default_model_path
    from ptqlab.recipes import get_recipe
    from ptqlab.report import write_report

    recipes = recipes or list(DEFAULT_LAB_RECIPES)
    for name in recipes:
        get_recipe(name)  # fail on a typo before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = model or DEFAULT_MODEL_NAME
    base_path = Path(model).expanduser() if model and Path(model).expanduser().is_dir() else None
    if model is None:
        base_path = default_model_path()
    elif base_path is None:
        # A hub id: the baseline is benchmarked from a local 16-bit copy, saved once into the lab folder.
        load_config(model, model)
        base_path = _local_copy(model, out / "checkpoints" / "baseline", dtype)

    manifest = out / "lab.json"
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("model") != source:
            raise PtqlabError(f"{out} holds a lab of {previous.get('model')!r}, not {source!r}: choose another --out")
    manifest.write_text(json.dumps({"model": source, "model_path": str(base_path), "recipes": recipes}, indent=2) + "\n")

    log = out / "log.jsonl"
    steps = Steps(2 * len(recipes) + 1, quiet)
    checkpoints = []
    for name in recipes:
        folder = out / "checkpoints" / name
        if (folder / "ptqlab.json").is_file():
            steps.say(f"quantize {name}: checkpoint already in {folder}, reused")
            log_event(log, "quantize.reused", recipe=name)
        else:
            steps.say(f"quantize {name}")
            log_event(log, "quantize.start", recipe=name)
            start = time.perf_counter()
            quantize(str(base_path), name, out=folder, overwrite=True, dtype=dtype, seed=settings.seed, quiet=quiet,
                     calibration=calibration, calib_batch_size=calib_batch_size, device=settings.device)
            log_event(log, "quantize.done", recipe=name, seconds=round(time.perf_counter() - start, 3))
        checkpoints.append((name, folder))
    results = run_benchmarks(base_path, checkpoints, out, settings, quiet, steps)
    write_report(out, results, settings, budget, baseline_name="baseline", model=source)
    return out


def _local_copy(model_id: str, folder: Path, dtype: str) -> Path:
    """Save a hub model once as a local folder, so that it is benchmarked like any checkpoint."""
    if (folder / "config.json").is_file():
        return folder
    from ptqlab.models import load_model
    from ptqlab.output import atomic_dir

    loaded = load_model(model_id, dtype=dtype)
    with atomic_dir(folder, overwrite=True) as tmp:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return folder
