"""`bench`: benchmark variants side by side with the 16-bit baseline, resumably, and report.

A results folder holds `variants/NAME.json` (one per variant, written when that variant is done),
`baseline-topk.safetensors` (the baseline's distributions for KL), `log.jsonl` (machine-readable events), and
the report: `results.json`, `summary.md`, `report.html`. Re-running the same command skips every variant already
complete under the same settings. The lab (suite.py) benchmarks its checkpoints through `run_benchmarks`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rich.markup import escape

from ptqlab.errors import PtqlabError
from ptqlab.measure.gguf import gguf_file
from ptqlab.measure.variant import (BenchSettings, check_variant, device_name, fingerprint, run_isolated,
                                    scoring_context, variant_config)
from ptqlab.models import check_model_folder, resolve_device
from ptqlab.output import check_can_write, locked, write_atomically
from ptqlab.progress import format_seconds, log_event, say
from ptqlab.recommend import Budget
from ptqlab.record import read_record
from ptqlab.card import update_results
from ptqlab.report import write_report
from ptqlab.version import __version__


def say_unless_quiet(message: str, quiet: bool) -> None:
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


def say_context_note(settings: BenchSettings, model: Path, quiet: bool) -> None:
    """One line where --ppl-context asks for more positions than `model` has (measure/variant.scoring_context)."""
    note = scoring_context(settings, variant_config(model))[1]
    if note is not None:
        say_unless_quiet(f"[yellow]note:[/] {escape(note)}", quiet)


REPORT_FILES = ("results.json", "summary.md", "report.html")


class Steps:
    """The lab's own progress: which step of how many, and the time since the run started."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.start = total, 0, quiet, time.perf_counter()

    def say(self, message: str) -> None:
        self.done += 1
        say_unless_quiet(f"[bold][{self.done}/{self.total}][/] {escape(message)} [dim](at {format_seconds(time.perf_counter() - self.start)})[/]",
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
        from ptqlab.measure.tasks import check_tasks  # optional dependency: imports lm-eval where installed

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
        write_atomically(result_json, json.dumps(result, indent=2) + "\n")
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
    folders = [Path(p) for p in paths]
    for folder in folders:
        if gguf_file(folder) is None:
            check_model_folder(folder, "bench takes local folders (checkpoints, 16-bit models or GGUF variants)")
    base = Path(baseline) if baseline else _infer_baseline(folders)
    variants = [(f.name, f) for f in folders if base is None or f.resolve() != base.resolve()]
    out = Path(out)
    check_can_write(out, inside=True)
    say_context_note(settings, base or folders[0], quiet)  # once, not by each variant's process
    with locked(out, "bench"):
        results = run_benchmarks(base, variants, out, settings, quiet)
        update_results(write_report(out, results, settings, budget, baseline_name="baseline" if base else None))
    return out


def _infer_baseline(folders: list[Path]) -> Path | None:
    """The first unquantized folder, else the 16-bit model the first ptqlab checkpoint was made from, if it is here."""
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
