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

from ptqlab.measure.sensitivity import SENSITIVITY_WINDOWS
from ptqlab.measure.variant import BenchSettings, check_variant, device_name, fingerprint, run_isolated, variant_config
from ptqlab.models import check_model_folder, resolve_device
from ptqlab.errors import PtqlabError
from ptqlab.output import locked
from ptqlab.progress import format_seconds, log_event, say
from ptqlab.record import read_record
from ptqlab.report import Budget, write_report
from ptqlab.version import __version__


# The mission's core three, on every device: FP8 dynamic (data-free), GPTQ W4A16, SmoothQuant + GPTQ W8A8.
DEFAULT_LAB_RECIPES = ("fp8-dynamic", "w4a16", "w8a8")


LAB_CPU_CALIBRATION = {"num_samples": 32, "max_seq_len": 512}
"""The lab's calibration size on a CPU (the quantize defaults, 256 x 1024, are for GPUs): enough tokens for every
Hessian of a small model to be full rank, and minutes, not an hour, on two cores."""


def lab_calibration_size(settings: BenchSettings, num_samples: int | None, max_seq_len: int | None,
                         quiet: bool = False) -> dict:
    """num_samples and max_seq_len for the lab: as given, else the quantize defaults on a GPU, LAB_CPU_CALIBRATION on a CPU."""
    from ptqlab.data import CalibrationConfig

    on_cpu = resolve_device(settings.device).type == "cpu"
    defaults = LAB_CPU_CALIBRATION if on_cpu else {"num_samples": CalibrationConfig.num_samples,
                                                   "max_seq_len": CalibrationConfig.max_seq_len}
    if on_cpu and (num_samples is None or max_seq_len is None):
        _say(f"[yellow]note:[/] no GPU: calibrated recipes use {defaults['num_samples']} samples of at most "
             f"{defaults['max_seq_len']} tokens; --num-samples and --max-seq-len change them", quiet)
    return {"num_samples": defaults["num_samples"] if num_samples is None else num_samples,
            "max_seq_len": defaults["max_seq_len"] if max_seq_len is None else max_seq_len}


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        say(message)


def _reusable(result_json: Path, path: Path, settings: BenchSettings, context: dict, needs: Path | None = None) -> dict | None:
    """A finished result, if everything that determined it is unchanged: settings (text, protocol, runtime, speed),
    the measured folder's identity, and `context` (the baseline its KL was computed against, ptqlab's version, the
    device)."""
    if not result_json.is_file() or (needs is not None and not needs.is_file()):
        return None
    result = json.loads(result_json.read_text())
    if (result.get("settings_digest") != settings.digest() or result.get("path") != str(path.resolve())
            or result.get("fingerprint") != fingerprint(path) or result.get("context") != context):
        return None
    return result


def tokenizer_identity(tokenizer_json: dict) -> str:
    """A digest of what decides token ids in a tokenizer.json: the model's type, vocabulary and merges, and the added
    tokens. Not its serialization: a tokenizer loaded and saved again by another version of the tokenizers library
    writes merges as pairs instead of strings, "" for None and other normalizer or pre-tokenizer spellings, and is
    still the same tokenizer."""
    import hashlib

    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        vocab = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
    added = sorted((t.get("id"), t.get("content")) for t in tokenizer_json.get("added_tokens") or [])
    return hashlib.sha256(json.dumps([model.get("type"), vocab, merges, added]).encode()).hexdigest()


def _vocabulary(folder: Path) -> tuple[int | None, str | None]:
    """(vocab_size from config.json (a GGUF variant's metadata), tokenizer_identity of tokenizer.json if the folder
    has one)."""
    config = variant_config(folder)
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    tokenizer = folder / "tokenizer.json"
    return size, tokenizer_identity(json.loads(tokenizer.read_text())) if tokenizer.is_file() else None


def _check_same_vocabulary(baseline: Path, name: str, path: Path) -> None:
    """KL compares next-token distributions position by position: the variant must share the baseline's tokenizer.
    Checked before anything is measured, not after the baseline has run."""
    (base_size, base_digest), (size, digest) = _vocabulary(baseline), _vocabulary(path)
    if base_size != size or (base_digest and digest and base_digest != digest):
        what = f"a vocabulary of {size} tokens, the baseline {base_size}" if base_size != size else "another tokenizer than the baseline"
        raise PtqlabError(f"{name} ({path}) has {what} ({baseline}): KL needs the same tokenizer; give the 16-bit model "
                          "it was made from as --baseline")


def _context(baseline: Path | None, is_baseline: bool, settings: BenchSettings) -> dict:
    against = None if baseline is None or is_baseline else {"path": str(baseline.resolve()), "fingerprint": fingerprint(baseline)}
    return {"kl_against": against, "ptqlab": __version__, "device": device_name(resolve_device(settings.device))}


REPORT_FILES = ("results.json", "summary.md", "report.html")


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
    for report in REPORT_FILES:  # an earlier run's report must not outlive a run that fails
        (out / report).unlink(missing_ok=True)
    for name, path in jobs:  # a corrupt folder is reported as such before anything is measured, never ranked
        check_variant(path)
    if baseline is not None:
        for name, path in variants:
            _check_same_vocabulary(baseline, name, path)
    if settings.tasks:
        from ptqlab.measure.tasks import check_tasks

        check_tasks(list(settings.tasks), settings.tasks_path)
    steps = steps or Steps(len(jobs), quiet)
    results = []
    for name, path in jobs:
        result_json = out / "variants" / f"{name}.json"
        is_baseline = baseline is not None and name == "baseline"
        context = _context(baseline, is_baseline, settings)
        cached = _reusable(result_json, path, settings, context, needs=topk if is_baseline else None)
        if cached is not None and (is_baseline or not baseline or cached.get("kl") is not None):
            steps.say(f"benchmark {name}: already measured ({result_json}), reused")
            log_event(log, "bench.reused", variant=name)
            results.append(cached)
            continue
        steps.say(f"benchmark {name} ({path})")
        log_event(log, "bench.start", variant=name, path=str(path))
        start = time.perf_counter()
        result_json.unlink(missing_ok=True)  # a stale result never outlives a failed measurement
        try:
            result = run_isolated(name, path, settings, result_json, topk_out=topk if is_baseline else None,
                                  topk_in=topk if baseline is not None and not is_baseline else None, quiet=quiet)
        except PtqlabError as e:
            log_event(log, "bench.failed", variant=name, error=str(e))
            raise
        result["context"] = context
        partial = result_json.with_name(result_json.name + ".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.rename(result_json)
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
    from ptqlab.measure.gguf import gguf_file

    folders = [Path(p) for p in paths]
    for folder in folders:
        if gguf_file(folder) is None:
            check_model_folder(folder, "bench takes local folders (checkpoints, 16-bit models or GGUF variants)")
    base = Path(baseline) if baseline else _infer_baseline(folders)
    variants = [(f.name, f) for f in folders if base is None or f.resolve() != base.resolve()]
    out = Path(out)
    with locked(out, "bench"):
        results = run_benchmarks(base, variants, out, settings, quiet)
        write_report(out, results, settings, budget, baseline_name="baseline" if base else None)
    return out


def _infer_baseline(folders: list[Path]) -> Path | None:
    """The first unquantized folder, else the 16-bit model the first ptqlab checkpoint was made from, if it is here."""
    from ptqlab.measure.gguf import gguf_file

    folders = [folder for folder in folders if gguf_file(folder) is None]  # a GGUF variant is never the baseline
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        if "quantization_config" not in config:
            return folder
    for folder in folders:
        record = read_record(folder)
        if record is not None:
            source = Path(record.model_path)
            if (source / "config.json").is_file():
                return source
    return None


def lab(model: str | None = None, recipes: list[str] | None = None, out: str | Path = "ptqlab-lab",
        settings: BenchSettings = BenchSettings(), budget: Budget = Budget(), dtype: str = "auto",
        quiet: bool = False, calibration=None, calib_batch_size: int = 16, sensitivity: Sensitivity | None = None) -> Path:
    """Quantize `model` with each recipe and benchmark every checkpoint next to the 16-bit baseline. With
    `sensitivity`, the recipe with the fewest weight bits is also measured part by part, and its mixed-precision
    version (the most sensitive parts kept 16-bit, or at `sensitivity.keep_bits`) joins the lab as one more variant."""
    from ptqlab.export_gguf import gguf_variant
    from ptqlab.recipes import get_recipe

    # Presets or recipe files, read (and so checked) before any work; each is known by its recipe name from here on,
    # which is also its checkpoint's folder name. gguf-TYPE[-imatrix] entries are GGUF exports of the baseline.
    wanted = list(recipes or DEFAULT_LAB_RECIPES)
    ggufs = [variant for variant in map(gguf_variant, wanted) if variant is not None]
    chosen = [get_recipe(name) for name in wanted if gguf_variant(name) is None]
    names = [recipe.name for recipe in chosen] + [variant.name for variant in ggufs]
    if len(set(names)) != len(names):
        raise PtqlabError(f"--recipes names two recipes of the same name ({', '.join(names)}): give each recipe file its own name")
    if sensitivity is not None and not chosen:
        raise PtqlabError("--sensitivity studies a recipe part by part: add one to --recipes (GGUF variants are not studied)")
    if sensitivity is not None:
        _check_keep_bits(sensitivity_recipe(chosen), sensitivity)
    out = Path(out)
    with locked(out, "lab"):
        return _lab(model, chosen, out, settings, budget, dtype, quiet, calibration, calib_batch_size, sensitivity, ggufs)


def _baseline_path(model: str | None, out: Path, dtype: str) -> Path:
    """The 16-bit model as a local folder: the given folder, the embedded default, or a hub model saved once into
    OUT/checkpoints/baseline."""
    from ptqlab.embedded import default_model_path
    from ptqlab.models import load_config

    if model is None:
        return default_model_path()
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    load_config(model, model)
    return _local_copy(model, out / "checkpoints" / "baseline", dtype)


def _quantized(base_path: Path, recipe, out: Path, settings: BenchSettings, dtype: str, quiet: bool, calibration,
               calib_batch_size: int, steps: Steps) -> Path:
    """OUT/checkpoints/RECIPE: reused when it was made with the same settings, else made (again)."""
    from ptqlab.api import quantize, request_of

    name, folder, log = recipe.name, out / "checkpoints" / recipe.name, out / "log.jsonl"
    record = read_record(folder)
    request = request_of(str(base_path), recipe, dtype, settings.seed, calibration, settings.device)
    differs = record.request_differences(request) if record is not None else None
    if differs == []:
        steps.say(f"quantize {name}: checkpoint already in {folder}, made with the same settings, reused")
        log_event(log, "quantize.reused", recipe=name)
        return folder
    steps.say(f"quantize {name}" + (f" (the checkpoint in {folder} was made with other settings: "
                                    f"{', '.join(differs)}; made again)" if differs else ""))
    log_event(log, "quantize.start", recipe=name)
    start = time.perf_counter()
    quantize(str(base_path), recipe, out=folder, overwrite=True, dtype=dtype, seed=settings.seed, quiet=quiet,
             calibration=calibration, calib_batch_size=calib_batch_size, device=settings.device)
    log_event(log, "quantize.done", recipe=name, seconds=round(time.perf_counter() - start, 3))
    return folder


def _lab(model, recipes, out: Path, settings, budget, dtype, quiet, calibration, calib_batch_size,
         sensitivity: Sensitivity | None = None, ggufs=()) -> Path:
    from ptqlab.embedded import DEFAULT_MODEL_NAME

    source = model or DEFAULT_MODEL_NAME
    base_path = _baseline_path(model, out, dtype)
    manifest = out / "lab.json"
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("model") != source:
            raise PtqlabError(f"{out} holds a lab of {previous.get('model')!r}, not {source!r}: choose another --out")
    manifest.write_text(json.dumps({"model": source, "model_path": str(base_path),
                                    "recipes": [r.name for r in recipes] + [v.name for v in ggufs]}, indent=2) + "\n")

    steps = Steps(2 * (len(recipes) + len(ggufs)) + 1 + (3 if sensitivity else 0), quiet)
    checkpoints = [(recipe.name, _quantized(base_path, recipe, out, settings, dtype, quiet, calibration, calib_batch_size,
                                            steps)) for recipe in recipes]
    if sensitivity is not None:
        recipe = sensitivity_recipe(recipes)
        mixed = _sensitivity(base_path, recipe, dict(checkpoints)[recipe.name], out, settings, sensitivity, quiet, steps)
        if mixed is not None:
            checkpoints.append((mixed.name, _quantized(base_path, mixed, out, settings, dtype, quiet, calibration,
                                                       calib_batch_size, steps)))
    checkpoints += [(variant.name, _exported(base_path, variant, out, settings, dtype, quiet, calibration,
                                             calib_batch_size, steps)) for variant in ggufs]
    results = run_benchmarks(base_path, checkpoints, out, settings, quiet, steps)
    found = json.loads((out / "sensitivity.json").read_text()) if sensitivity is not None else None
    write_report(out, results, settings, budget, baseline_name="baseline", model=source, sensitivity=found)
    return out


def _exported(base_path: Path, variant, out: Path, settings: BenchSettings, dtype: str, quiet: bool, calibration,
              calib_batch_size: int, steps: Steps) -> Path:
    """OUT/checkpoints/gguf-TYPE[-imatrix]/: model.gguf exported from the baseline, beside the baseline's tokenizer
    files (the variant's evaluation text gets the baseline's token ids); reused when the file's ptqlab.* record
    says it was exported from the same model with the same settings, else exported (again)."""
    import dataclasses

    from ptqlab.data import CalibrationConfig
    from ptqlab.export_gguf import export_gguf, read_record as read_gguf_record
    from ptqlab.models import load_tokenizer

    folder, log = out / "checkpoints" / variant.name, out / "log.jsonl"
    file = folder / "model.gguf"
    wanted = {"ptqlab.version": __version__, "ptqlab.source_path": str(base_path), "ptqlab.type": variant.file_type,
              "ptqlab.imatrix": variant.importance}
    if variant.importance:
        drawn = dataclasses.replace(calibration or CalibrationConfig(), seed=settings.seed)
        wanted |= {"ptqlab.seed": settings.seed, "ptqlab.calibration": json.dumps(dataclasses.asdict(drawn))}
    record = read_gguf_record(file) if file.is_file() and (folder / "tokenizer.json").is_file() else None
    differs = [key.removeprefix("ptqlab.") for key, value in wanted.items() if (record or {}).get(key) != value]
    if record is not None and not differs:
        steps.say(f"export {variant.name}: already in {file}, exported with the same settings, reused")
        log_event(log, "export.reused", variant=variant.name)
        return folder
    steps.say(f"export {variant.name}" + (f" (the file in {folder} was exported with other settings: "
                                         f"{', '.join(differs)}; exported again)" if record is not None else ""))
    log_event(log, "export.start", variant=variant.name)
    start = time.perf_counter()
    tokenizer = load_tokenizer(str(base_path))
    if tokenizer is None:
        raise PtqlabError(f"{variant.name}: the baseline {base_path} has no tokenizer files; a GGUF file carries the "
                          "tokenizer: add the model's tokenizer files")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    export_gguf(str(base_path), variant.file_type, file, importance=variant.importance, calibration=calibration,
                seed=settings.seed, overwrite=True, dtype=dtype, device=settings.device,
                calib_batch_size=calib_batch_size, quiet=quiet)
    log_event(log, "export.done", variant=variant.name, seconds=round(time.perf_counter() - start, 3))
    return folder


@dataclass(frozen=True)
class Sensitivity:
    """What a sensitivity run aims at: a mean KL (nats per token) or a size for the whole checkpoint's weights."""

    target_kl: float | None = None
    max_bytes: int | None = None
    windows: int = SENSITIVITY_WINDOWS
    keep_bits: int | None = None
    """Kept parts at the recipe's scheme with this many bits (its overrides), not 16-bit (its ignore list)."""


SENSITIVITY_SETTINGS = ("ppl_text", "ppl_context", "ppl_protocol", "topk", "device", "seed")
"""The bench settings a sensitivity measurement depends on (speed and samples settings do not change it)."""


def sensitivity_recipe(recipes):
    """The lab recipe the sensitivity run studies: the one with the fewest weight bits (the most to gain), the first
    of those."""
    return min(recipes, key=lambda r: r.scheme.weights.num_bits)


def _check_keep_bits(recipe, aim: Sensitivity) -> None:
    """Refuse a --keep-bits the recipe cannot take before any work (the plan checks it again on the scheme the
    checkpoint applied)."""
    if aim.keep_bits is not None:
        from ptqlab.measure.sensitivity import kept_scheme

        kept_scheme(recipe.scheme, aim.keep_bits)


def _sensitivity(base_path: Path, recipe, checkpoint: Path, out: Path, settings: BenchSettings, aim: Sensitivity,
                 quiet: bool, steps: Steps):
    """Measure (or reuse) OUT/sensitivity.json for `checkpoint`, write the mixed recipe beside it, and return it (None
    when the uniform recipe already meets the aim: nothing to keep)."""
    import yaml

    from ptqlab.measure.sensitivity import checkpoint_dtype, measure_sensitivity, plan_mixed

    result_json = out / "sensitivity.json"
    identity = {"checkpoint_fingerprint": fingerprint(checkpoint), "windows_asked": aim.windows,
                "scoring": {k: getattr(settings, k) for k in SENSITIVITY_SETTINGS}}
    if aim.keep_bits is not None:  # pricing parts at another scheme needs what older measurements did not record
        identity["stored_dtype"] = checkpoint_dtype(checkpoint)
    result = json.loads(result_json.read_text()) if result_json.is_file() else None
    if result is not None and all(result.get(k) == v for k, v in identity.items()):
        steps.say(f"sensitivity of {recipe.name}: already measured ({result_json}), reused")
    else:
        steps.say(f"sensitivity of {recipe.name}: each decoder layer's attention and MLP alone quantized")
        result = {**measure_sensitivity(base_path, checkpoint, settings, aim.windows, quiet), **identity}
    mixed, plan = plan_mixed(result, recipe, aim.target_kl, aim.max_bytes, aim.keep_bits)
    recipe_file = out / f"{mixed.name}.yaml"
    recipe_file.write_text(yaml.safe_dump(mixed.to_dict(), sort_keys=False))
    result["mixed"] = {**plan, "recipe": mixed.name, "recipe_file": str(recipe_file)}
    partial = result_json.with_name(result_json.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.rename(result_json)
    log_event(out / "log.jsonl", "sensitivity.done", recipe=recipe.name, kept=len(plan["kept"]),
              predicted_kl=plan["predicted_kl"])
    if not plan["kept"]:
        _say(f"[yellow]note:[/] {recipe.name} already meets the aim with every part quantized: no mixed variant", quiet)
        return None
    _say(f"{mixed.name}: {len(plan['kept'])} parts kept {plan['kept_as']} (predicted KL {plan['predicted_kl']:.4f}): "
         f"{recipe_file}", quiet)
    return mixed


def sensitivity(model: str | None, recipe: str, out: str | Path = "ptqlab-sensitivity", aim: Sensitivity = Sensitivity(),
                settings: BenchSettings = BenchSettings(), dtype: str = "auto", quiet: bool = False, calibration=None,
                calib_batch_size: int = 16) -> Path:
    """Quantize `model` with `recipe` (or reuse OUT's checkpoint), measure each part's sensitivity, and write
    OUT/sensitivity.json and the mixed-precision recipe OUT/RECIPE-mixed.yaml that meets `aim`."""
    from ptqlab.recipes import get_recipe

    chosen = get_recipe(recipe)
    _check_keep_bits(chosen, aim)
    out = Path(out)
    with locked(out, "sensitivity"):
        base_path = _baseline_path(model, out, dtype)
        steps = Steps(2, quiet)
        checkpoint = _quantized(base_path, chosen, out, settings, dtype, quiet, calibration, calib_batch_size, steps)
        _sensitivity(base_path, chosen, checkpoint, out, settings, aim, quiet, steps)
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
