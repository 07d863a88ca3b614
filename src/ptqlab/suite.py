"""`lab` and `sensitivity`: quantize a model with each recipe (or find which parts one recipe hurts), then benchmark
every variant beside the 16-bit baseline (benchmark.py), resumably, and report.

A lab folder is a results folder (benchmark.py) plus `checkpoints/RECIPE/` (the quantized models, and GGUF exports as
`checkpoints/gguf-TYPE/`), `lab.json` (the model and recipes), and with a sensitivity run `sensitivity.json` and the
mixed recipe `RECIPE-mixed.yaml`. Re-running the same command skips every checkpoint and variant already complete
under the same settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.markup import escape

from ptqlab.api import quantize, request_of, source_folders
from ptqlab.benchmark import Steps, run_benchmarks, say_context_note, say_unless_quiet
from ptqlab.data import CalibrationConfig
from ptqlab.embedded import DEFAULT_MODEL_NAME, default_model_path
from ptqlab.errors import PtqlabError
from ptqlab.export_gguf import export_gguf, gguf_variant, read_record as read_gguf_record
from ptqlab.measure.sensitivity import (PARTS_VERSION, SENSITIVITY_WINDOWS, check_max_bytes, checkpoint_dtype,
                                        kept_scheme, measure_sensitivity, plan_mixed, safetensors_bytes)
from ptqlab.measure.variant import BenchSettings, fingerprint
from ptqlab.models import load_config, load_model, load_tokenizer, resolve_device
from ptqlab.options import QuantizeOptions, RunOptions, given, widened
from ptqlab.output import atomic_dir, check_can_write, locked, write_atomically
from ptqlab.progress import log_event
from ptqlab.recipes import get_recipe
from ptqlab.record import read_record
from ptqlab.recommend import Budget
from ptqlab.card import update_results
from ptqlab.report import write_report
from ptqlab.version import __version__


# The mission's core three, on every device: FP8 dynamic (data-free), GPTQ W4A16, SmoothQuant + GPTQ W8A8.
DEFAULT_LAB_RECIPES = ("fp8-dynamic", "w4a16", "w8a8")


LAB_CPU_CALIBRATION = {"num_samples": 32, "max_seq_len": 512}
"""The lab's calibration size on a CPU (the quantize defaults, 256 x 1024, are for GPUs): enough tokens for every
Hessian of a small model to be full rank, and minutes, not an hour, on two cores."""


def lab_calibration_size(settings: BenchSettings, num_samples: int | None, max_seq_len: int | None,
                         quiet: bool = False) -> dict:
    """num_samples and max_seq_len for the lab: as given, else the quantize defaults on a GPU, LAB_CPU_CALIBRATION on a CPU."""
    on_cpu = resolve_device(settings.device).type == "cpu"
    defaults = LAB_CPU_CALIBRATION if on_cpu else {"num_samples": CalibrationConfig.num_samples,
                                                   "max_seq_len": CalibrationConfig.max_seq_len}
    if on_cpu and (num_samples is None or max_seq_len is None):
        say_unless_quiet(f"[yellow]note:[/] no GPU: calibrated recipes use {defaults['num_samples']} samples of at most "
                         f"{defaults['max_seq_len']} tokens; --num-samples and --max-seq-len change them", quiet)
    return {"num_samples": defaults["num_samples"] if num_samples is None else num_samples,
            "max_seq_len": defaults["max_seq_len"] if max_seq_len is None else max_seq_len}


def lab(model: str | None = None, recipes: list[str] | None = None, out: str | Path = "ptqlab-lab",
        settings: BenchSettings = BenchSettings(), budget: Budget = Budget(), options: RunOptions | None = None,
        sensitivity: Sensitivity | None = None, **run) -> Path:
    """Quantize `model` with each recipe and benchmark every checkpoint next to the 16-bit baseline. With
    `sensitivity`, the recipe with the fewest weight bits is also measured part by part, and its mixed-precision
    version (the most sensitive parts kept 16-bit, or at `sensitivity.keep_bits`) joins the lab as one more variant.
    `options` (keyword arguments set its fields) say how checkpoints are made and how much the lab prints; their
    seed and device are the bench settings' (one seed and one device for the whole lab)."""
    options = _lab_options(given(options, RunOptions, run), settings)

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
    check_results_folder(out, model)
    with locked(out, "lab"):
        return _lab(model, chosen, out, settings, budget, options, sensitivity, ggufs)


def check_results_folder(out: Path, model: str | None) -> None:
    """Refuse, before any work, a lab's --out that is (or holds) the model's own folder: its results, checkpoints and
    lock would be written among the model's files; and one where this process cannot write."""
    resolved = out.resolve()
    for source in source_folders(model):
        source = source.resolve()
        if source == resolved or resolved in source.parents:
            what = "is" if source == resolved else "contains"
            raise PtqlabError(f"--out {out} {what} the model's folder {source}: ptqlab never writes among its input's "
                              "files; choose another --out")
    check_can_write(out, inside=True)


def _lab_options(options: RunOptions, settings: BenchSettings) -> RunOptions:
    """A lab's or sensitivity run's options with the bench settings' seed and device: its checkpoints are made with
    what its measurements use."""
    return replace(options, seed=settings.seed, device=settings.device)


def _baseline_path(model: str | None, out: Path, dtype: str) -> Path:
    """The 16-bit model as a local folder: the given folder, the embedded default, or a hub model saved once into
    OUT/checkpoints/baseline."""
    if model is None:
        return default_model_path()
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    load_config(model, model)
    return _local_copy(model, out / "checkpoints" / "baseline", dtype)


def _quantized(base_path: Path, recipe, out: Path, options: RunOptions, steps: Steps) -> Path:
    """OUT/checkpoints/RECIPE: reused when it was made with the same settings, else made (again)."""
    name, folder, log = recipe.name, out / "checkpoints" / recipe.name, out / "log.jsonl"
    record = read_record(folder)
    request = request_of(str(base_path), recipe, options)
    differs = record.request_differences(request) if record is not None else None
    if differs == []:
        steps.say(f"quantize {name}: checkpoint already in {folder}, made with the same settings, reused")
        log_event(log, "quantize.reused", recipe=name)
        return folder
    steps.say(f"quantize {name}" + (f" (the checkpoint in {folder} was made with other settings: "
                                    f"{', '.join(differs)}; made again)" if differs else ""))
    log_event(log, "quantize.start", recipe=name)
    start = time.perf_counter()
    quantize(str(base_path), recipe, out=folder, options=widened(options, QuantizeOptions, overwrite=True))
    log_event(log, "quantize.done", recipe=name, seconds=round(time.perf_counter() - start, 3))
    return folder


def _lab(model, recipes, out: Path, settings: BenchSettings, budget: Budget, options: RunOptions,
         sensitivity: Sensitivity | None = None, ggufs=()) -> Path:
    source = model or DEFAULT_MODEL_NAME
    quiet = options.quiet
    base_path = _baseline_path(model, out, options.dtype)
    say_context_note(settings, base_path, quiet)
    manifest = out / "lab.json"
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("model") != source:
            raise PtqlabError(f"{out} holds a lab of {previous.get('model')!r}, not {source!r}: choose another --out")
    write_atomically(manifest, json.dumps({"model": source, "model_path": str(base_path),
                                           "recipes": [r.name for r in recipes] + [v.name for v in ggufs]}, indent=2) + "\n")

    steps = Steps(2 * (len(recipes) + len(ggufs)) + 1 + (3 if sensitivity else 0), quiet)
    checkpoints = [(recipe.name, _quantized(base_path, recipe, out, options, steps)) for recipe in recipes]
    if sensitivity is not None:
        recipe = sensitivity_recipe(recipes)
        mixed = _sensitivity(base_path, recipe, dict(checkpoints)[recipe.name], out, settings, sensitivity, quiet, steps)
        if mixed is not None:
            checkpoints.append((mixed.name, _quantized(base_path, mixed, out, options, steps)))
    checkpoints += [(variant.name, _exported(base_path, variant, out, options, steps)) for variant in ggufs]
    results = run_benchmarks(base_path, checkpoints, out, settings, quiet, steps)
    found = json.loads((out / "sensitivity.json").read_text()) if sensitivity is not None else None
    update_results(write_report(out, results, settings, budget, baseline_name="baseline", model=source, sensitivity=found))
    return out


def _exported(base_path: Path, variant, out: Path, options: RunOptions, steps: Steps) -> Path:
    """OUT/checkpoints/gguf-TYPE[-imatrix]/: model.gguf exported from the baseline, beside the baseline's tokenizer
    files (the variant's evaluation text gets the baseline's token ids); reused when the file's ptqlab.* record
    says it was exported from the same model with the same settings, else exported (again)."""
    folder, log = out / "checkpoints" / variant.name, out / "log.jsonl"
    file = folder / "model.gguf"
    wanted = {"ptqlab.version": __version__, "ptqlab.source_path": str(base_path), "ptqlab.type": variant.file_type,
              "ptqlab.imatrix": variant.importance}
    if variant.importance:
        drawn = replace(options.calibration or CalibrationConfig(), seed=options.seed)
        wanted |= {"ptqlab.seed": options.seed, "ptqlab.calibration": json.dumps(asdict(drawn))}
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
    export_gguf(str(base_path), variant.file_type, file, importance=variant.importance,
                options=replace(options, overwrite=True))
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
        kept_scheme(recipe.scheme, aim.keep_bits)


def _sensitivity(base_path: Path, recipe, checkpoint: Path, out: Path, settings: BenchSettings, aim: Sensitivity,
                 quiet: bool, steps: Steps):
    """Measure (or reuse) OUT/sensitivity.json for `checkpoint`, write the mixed recipe beside it, and return it (None
    when the uniform recipe already meets the aim: nothing to keep)."""
    import yaml


    check_max_bytes(aim.max_bytes, sum(safetensors_bytes(checkpoint).values()), recipe.name)  # before measuring
    result_json = out / "sensitivity.json"
    identity = {"checkpoint_fingerprint": fingerprint(checkpoint), "windows_asked": aim.windows,
                "parts_version": PARTS_VERSION,
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
    write_atomically(recipe_file, yaml.safe_dump(mixed.to_dict(), sort_keys=False))
    result["mixed"] = {**plan, "recipe": mixed.name, "recipe_file": str(recipe_file)}
    write_atomically(result_json, json.dumps(result, indent=2) + "\n")
    log_event(out / "log.jsonl", "sensitivity.done", recipe=recipe.name, kept=len(plan["kept"]),
              predicted_kl=plan["predicted_kl"])
    if not plan["kept"]:
        why = (": no part can be kept wider within --max-size" if aim.max_bytes is not None else
               " already meets the aim with every part quantized")
        say_unless_quiet(f"[yellow]note:[/] {escape(recipe.name)}{why}: no mixed variant", quiet)
        return None
    say_unless_quiet(escape(f"{mixed.name}: {len(plan['kept'])} parts kept {plan['kept_as']} (predicted KL "
                            f"{plan['predicted_kl']:.4f}): {recipe_file}"), quiet)
    return mixed


def sensitivity(model: str | None, recipe: str, out: str | Path = "ptqlab-sensitivity", aim: Sensitivity = Sensitivity(),
                settings: BenchSettings = BenchSettings(), options: RunOptions | None = None, **run) -> Path:
    """Quantize `model` with `recipe` (or reuse OUT's checkpoint), measure each part's sensitivity, and write
    OUT/sensitivity.json and the mixed-precision recipe OUT/RECIPE-mixed.yaml that meets `aim`. `options` (keyword
    arguments set its fields) as for `lab`."""
    options = _lab_options(given(options, RunOptions, run), settings)
    chosen = get_recipe(recipe)
    _check_keep_bits(chosen, aim)
    out = Path(out)
    check_results_folder(out, model)
    with locked(out, "sensitivity"):
        base_path = _baseline_path(model, out, options.dtype)
        say_context_note(settings, base_path, options.quiet)
        steps = Steps(2, options.quiet)
        checkpoint = _quantized(base_path, chosen, out, options, steps)
        _sensitivity(base_path, chosen, checkpoint, out, settings, aim, options.quiet, steps)
    return out


def _local_copy(model_id: str, folder: Path, dtype: str) -> Path:
    """Save a hub model once as a local folder, so that it is benchmarked like any checkpoint."""
    if (folder / "config.json").is_file():
        return folder

    loaded = load_model(model_id, dtype=dtype)
    with atomic_dir(folder, overwrite=True) as tmp:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return folder
