"""AutoRound's cost beside GPTQ's: wall time, time per engine phase and peak GPU memory of quantizing a random-weight
model of a real shape, each recipe on the same calibration tokens in one process, plus how far each moved the
model's last hidden states on held-out tokens and AutoRound's layer output errors (start and tuned, from the run's
layer reports). Speed does not depend on weight values, so random weights of the real shapes measure it faithfully;
the error figures of random weights say nothing about real models (bench/results/autoround_smollm2 does).

    python bench/autoround_speed.py --shape llama-3-8b --recipes w4a16,w4a16-ar --out bench/results/autoround_speed_llama-3-8b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantize_speed import SHAPES, final_hidden, relative_error, sync  # noqa: E402


def build_model(shape: str, device: torch.device, seed: int, layers: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, params = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **(params | ({} if layers is None else {"num_hidden_layers": layers})))
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()

ERRORS = re.compile(r"layer output error (\S+) at the start \((\w+)\), (\S+) tuned")


def run(shape: str, layers: int | None, recipe_name: str, tokens: torch.Tensor, held_out: torch.Tensor, reference: torch.Tensor,
        device: torch.device, seed: int, batch_size: int) -> dict:
    from ptqlab.data import CalibrationSet
    from ptqlab.pipeline import quantize_model
    from ptqlab.recipes import get_recipe

    model = build_model(shape, device, seed, layers)
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    sync(device)
    start = time.perf_counter()
    result = quantize_model(model, get_recipe(recipe_name), CalibrationSet(list(tokens), "random tokens"), quiet=True,
                            device=device, batch_size=batch_size,
                            compute_dtype=torch.float32 if device.type == "cpu" else None)  # CPUs may emulate bf16
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    reports = result.layer_reports
    errors = [tuple(float(v) for v in (m.group(1), m.group(3))) for r in reports for line in r.details
              for m in [ERRORS.search(line)] if m]
    row = {
        "recipe": recipe_name,
        "seconds": round(seconds, 2),
        "phases_s": {k: round(sum(r.seconds[k] for r in reports), 2) for k in reports[0].seconds},
        "peak_gpu_gib": None if peak is None else round(peak / 2**30, 2),
        "hidden_relative_error": relative_error(reference, final_hidden(model, held_out)),
    }
    if errors:
        row["layer_error_start_mean"] = sum(a for a, _ in errors) / len(errors)
        row["layer_error_tuned_mean"] = sum(b for _, b in errors) / len(errors)
    row["seconds_per_layer"] = round(seconds / len(reports), 3)
    del model, result
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-3-8b")
    parser.add_argument("--layers", type=int, help="decoder layers to build (default: the shape's); the time per layer "
                        "is the same, so a few layers measure a big shape's cost per layer")
    parser.add_argument("--recipes", default="w4a16,w4a16-ar")
    parser.add_argument("--samples", type=int, default=256, help="calibration sequences (ptqlab's default)")
    parser.add_argument("--seq-len", type=int, default=1024, help="their length (ptqlab's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="ptqlab's calibration batch size")
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (args.samples, args.seq_len), generator=generator)
    held_out = torch.randint(0, vocab, (args.eval_samples, args.seq_len), generator=generator)
    reference = final_hidden(build_model(args.shape, device, args.seed, args.layers), held_out)
    gc.collect()
    rows = [run(args.shape, args.layers, name, tokens, held_out, reference, device, args.seed, args.batch_size)
            for name in args.recipes.split(",")]
    print(f"{'recipe':<12} {'seconds':>8} {'peak GiB':>9} {'hidden err':>11}  phases")
    for row in rows:
        peak = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.1f}"
        print(f"{row['recipe']:<12} {row['seconds']:>8.1f} {peak:>9} {row['hidden_relative_error']:>11.3g}  "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["phases_s"].items()))
    if args.out:
        import transformers

        from ptqlab.version import __version__

        doc = {
            "command": " ".join(sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "versions": {"ptqlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "settings": vars(args) | {"out": str(args.out)},
            "results": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
