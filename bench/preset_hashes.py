"""Every preset recipe on every architecture of the tests' tiny-model factory, each checkpoint's files hashed: the
check that a refactoring changed no behaviour.

    python bench/preset_hashes.py --out bench/results/house_hashes_before.json
    ... change the code ...
    python bench/preset_hashes.py --out bench/results/house_hashes_after.json
    python bench/preset_hashes.py --compare bench/results/house_hashes_before.json bench/results/house_hashes_after.json

A run takes several minutes: to go on editing meanwhile, run it from a copy of the tree (`git archive HEAD | tar -x
-C COPY`, then `COPY/bench/preset_hashes.py --commit $(git rev-parse HEAD)`). Run both on the same machine (the CPU's
float sums decide GPTQ's roundings): then every file's sha256 is equal. Each tiny model (tests/tiny.py, seeded,
float32) is quantized through `ptqlab.quantize` with each preset, with one torch thread; calibrated presets draw a
few short samples from the tests' offline chats. The files are hashed as written but for the run
record, ptqlab.json, whose keys that vary from run to run (wall times, the creation time, the command, the memory
budgets of this moment, the work folder's path) are removed before hashing. A preset that an architecture refuses is
recorded as refused, with the first line of the error, and that line is compared too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe", "qwen2_moe", "mixtral")
"""Every architecture tests/tiny.tiny_config builds (its ARCHS and its mixture-of-experts ones)."""
NUM_SAMPLES, MAX_SEQ_LEN = 4, 24
"""Calibration for calibrated presets: enough for every step to see data, few enough for a 2-core CPU."""
VOLATILE_RECORD = ("seconds", "created", "command", "versions")
"""ptqlab.json keys that differ between two runs of the same code."""
VOLATILE_SETTINGS = ("memory_plan", "gpu_budget_bytes", "cpu_budget_bytes", "peak_gpu_bytes_per_rank")
"""ptqlab.json `settings` keys that follow this moment's free memory."""


def record_bytes(file: Path, work: Path) -> bytes:
    """ptqlab.json without what varies from run to run, the work folder's path replaced by `<work>`."""
    record = json.loads(file.read_text())
    for key in VOLATILE_RECORD:
        record.pop(key, None)
    for key in VOLATILE_SETTINGS:
        record.get("settings", {}).pop(key, None)
    for layer in record.get("layers", []):
        layer.pop("seconds", None)
    return json.dumps(record, sort_keys=True).replace(str(work), "<work>").encode()


def folder_hashes(folder: Path, work: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder, by its path in the folder."""
    out = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(file.relative_to(folder))
        data = record_bytes(file, work) if name == "ptqlab.json" else file.read_bytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def run(presets: list[str], archs: list[str], work: Path) -> dict:
    import torch

    from tiny import CHATS, save_tiny_model, write_jsonl

    import ptqlab
    from ptqlab.data import CalibrationConfig

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per checkpoint, not the loader's bars
    # One thread: the same float sums whatever the machine's load, and no oversubscribed threads spinning on a shared
    # CPU (which slows small GPTQ and AutoRound steps many times over).
    torch.set_num_threads(1)
    chats = write_jsonl(work / "chats.jsonl", CHATS)
    calibration = CalibrationConfig(dataset=str(chats), num_samples=NUM_SAMPLES, max_seq_len=MAX_SEQ_LEN)
    results: dict[str, dict] = {preset: {} for preset in presets}
    for arch in archs:
        model = save_tiny_model(work / "models" / arch, arch)
        for preset in presets:
            out = work / "out" / f"{arch}-{preset}"
            start = time.perf_counter()
            try:
                ptqlab.quantize(str(model), preset, out, quiet=True, calibration=calibration, device="cpu")
            except Exception as e:  # noqa: BLE001 (a refusal is a result, compared like the files)
                first = str(e).splitlines()[0] if str(e) else ""
                results[preset][arch] = {"refused": f"{type(e).__name__}: {first}".replace(str(work), "<work>")}
            else:
                results[preset][arch] = folder_hashes(out, work)
            print(f"{arch:12} {preset:12} {time.perf_counter() - start:6.1f} s "
                  f"{'refused' if 'refused' in results[preset][arch] else 'ok'}", flush=True)
    return results


def compare(before: dict, after: dict) -> list[str]:
    """Every (preset, arch, file) whose hash differs, or that one run has and the other lacks; a preset that only the
    later run has (a new one) is not compared."""
    diffs = []
    for preset in sorted(before["results"]):
        b, a = before["results"][preset], after["results"].get(preset, {})
        for arch in sorted(set(b) | set(a)):
            fb, fa = b.get(arch, {}), a.get(arch, {})
            diffs += [f"{preset} {arch} {name}: {fb.get(name)} -> {fa.get(name)}"
                      for name in sorted(set(fb) | set(fa)) if fb.get(name) != fa.get(name)]
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the JSON goes")
    parser.add_argument("--presets", nargs="*", help="default: every preset")
    parser.add_argument("--archs", nargs="*", default=list(ARCHS))
    parser.add_argument("--work", type=Path, help="folder for the models and checkpoints (default: a temporary one)")
    parser.add_argument("--commit", help="the commit of this tree, for a copy outside git (default: git's HEAD here)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="compare two result files and exit (status 1 if any hash differs)")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(before, after)
        print("\n".join(diffs) if diffs else f"equal: {sum(len(v) for v in before['results'].values())} "
                                             "preset x architecture results")
        added = sorted(set(after["results"]) - set(before["results"]))
        if added:
            print(f"new presets, not compared: {', '.join(added)}")
        sys.exit(1 if diffs else 0)
    if args.out is None:
        parser.error("--out is required (or --compare)")
    from ptqlab.recipes import PRESETS

    presets = args.presets or list(PRESETS)
    if args.commit:
        commit, dirty = args.commit, False
    else:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True,
                                    text=True).stdout.strip())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="preset_hashes_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(presets, args.archs, work)
    seconds = time.perf_counter() - start
    payload = {"commit": commit + ("-dirty" if dirty else ""),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(seconds, 1), "settings": {"archs": args.archs, "num_samples": NUM_SAMPLES,
                                                          "max_seq_len": MAX_SEQ_LEN, "dtype": "float32"},
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    refused = sum("refused" in r for per in results.values() for r in per.values())
    print(f"{sum(len(v) for v in results.values())} results ({refused} refused) in {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
