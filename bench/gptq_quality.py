"""Calibrated recipes against the incumbent on real weights: ptqlab's w4a16 (GPTQ), w4a16-awq and w8a8 and
llm-compressor's GPTQ W4A16 and SmoothQuant + GPTQ W8A8 on the embedded SmolLM2-135M-Instruct, calibrated on the same
samples, scored side by side (perplexity, KL from the 16-bit baseline, top-1 agreement, quantization time), over
several calibration seeds so that a difference can be told from run-to-run noise.

    python bench/gptq_quality.py --out bench/results/gptq_quality_smollm2 --seeds 0,1,2,3

Each seed draws another calibration subset; both tools get exactly the same token ids. Variants (--variants):
  ptqlab            recipe w4a16 as shipped (clipping-searched scales, calibration batch 16)
  ptqlab-b1         the same with calibration batch 1 (llm-compressor's batching: no padding)
  ptqlab-minmax     the same with plain min-max scales, as llm-compressor computes them
  llmcompressor     oneshot(GPTQModifier(W4A16 at the same group size, ignore lm_head, dampening 0.01))
  rtn               ptqlab w4a16-rtn (data-free, seed-independent: measured once)
  awq               ptqlab w4a16-awq (AWQ scales, then int4 asymmetric round-to-nearest)
  w8a8              ptqlab w8a8 (SmoothQuant 0.8, then GPTQ int8 weights; dynamic int8 activations)
  w8a8-rtn          ptqlab w8a8-rtn (data-free: measured once)
  llmcompressor-w8a8  oneshot([SmoothQuantModifier(0.8), GPTQModifier(W8A8, ignore lm_head, dampening 0.01)])
Writes quality.json (settings, versions, per-run and per-variant mean / std, paired differences against
llm-compressor) into --out and prints a table. Runs on a GPU in minutes; on a CPU, expect ~5 minutes per run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VARIANTS = ("ptqlab", "ptqlab-b1", "ptqlab-minmax", "llmcompressor", "rtn", "awq", "w8a8", "w8a8-rtn", "llmcompressor-w8a8")
DATA_FREE = ("rtn", "w8a8-rtn")


def llmcompressor_gptq(model_path: Path, samples: list[torch.Tensor], group_size: int, out: Path, device: str,
                       w8a8: bool = False) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Dataset.from_dict({"input_ids": [s.tolist() for s in samples], "attention_mask": [[1] * len(s) for s in samples]})
    if w8a8:
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], dampening_frac=0.01)]
    else:
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                                 strategy="group", group_size=group_size))
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)
    oneshot(model=model, dataset=data, processor=tokenizer, num_calibration_samples=len(samples),
            max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def make_variant(variant: str, base: Path, out: Path, calibration, samples, group_size: int, device: str) -> None:
    from ptqlab import quantize
    from ptqlab.recipes import get_recipe

    w4a16 = get_recipe("w4a16")
    if variant in ("llmcompressor", "llmcompressor-w8a8"):
        llmcompressor_gptq(base, samples, group_size, out, device, w8a8=variant == "llmcompressor-w8a8")
    elif variant in DATA_FREE:
        quantize(str(base), "w4a16-rtn" if variant == "rtn" else variant, out=out, overwrite=True, quiet=True)
    else:
        recipe = {"ptqlab-minmax": w4a16.with_gptq(scale_search=False), "awq": get_recipe("w4a16-awq"),
                  "w8a8": get_recipe("w8a8")}.get(variant, w4a16)
        quantize(str(base), recipe, out=out, overwrite=True, calibration=calibration, seed=calibration.seed,
                 calib_batch_size=1 if variant == "ptqlab-b1" else 16, device=device, quiet=True)


def score(path: Path, token_ids, windows, baseline, device: str):
    from transformers import AutoModelForCausalLM

    from ptqlab.measure.quality import evaluate

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    result = evaluate(model, token_ids, windows, baseline, quiet=True)
    del model
    gc.collect()
    return result


def main() -> None:
    from transformers import AutoTokenizer

    from ptqlab.record import versions
    from ptqlab.measure.quality import make_windows
    from ptqlab.measure.text import load_eval_text
    from ptqlab.measure.variant import device_name
    from ptqlab.data import CalibrationConfig, load_calibration
    from ptqlab.embedded import default_model_path
    from ptqlab.models import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gptq_quality_smollm2"))
    parser.add_argument("--work", type=Path, default=Path("out/gptq_quality"), help="where the checkpoints go")
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds")
    parser.add_argument("--variants", default="ptqlab,llmcompressor,rtn", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--dataset", default="auto")
    parser.add_argument("--ppl-context", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=None, help="score the first N windows (default: all)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    device = str(resolve_device(args.device))

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = load_eval_text("wikitext-2")
    token_ids = tokenizer(text.text, return_tensors="pt", verbose=False)["input_ids"][0]
    windows = make_windows(len(token_ids), args.ppl_context, args.ppl_windows)
    baseline = score(base, token_ids, windows, None, device)
    print(f"baseline perplexity {baseline.perplexity:.3f} over {baseline.tokens:,} tokens of {text.name}", flush=True)

    runs = []
    group_size = None
    for seed in seeds:
        calibration = CalibrationConfig(dataset=args.dataset, num_samples=args.num_samples, max_seq_len=args.max_seq_len, seed=seed)
        samples = load_calibration(tokenizer, calibration)
        for variant in variants:
            if variant in DATA_FREE and seed != seeds[0]:
                continue
            out = args.work / f"seed{seed}" / variant
            start = time.perf_counter()
            make_variant(variant, base, out, calibration, samples.samples, group_size or 64, device)
            seconds = time.perf_counter() - start
            if group_size is None and variant in ("ptqlab", "ptqlab-b1", "ptqlab-minmax"):
                config = json.loads((out / "config.json").read_text())
                group_size = config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"]
            result = score(out, token_ids, windows, baseline.topk, device)
            summary = result.summary()
            run = {"variant": variant, "seed": seed, "quantize_s": seconds, "perplexity": result.perplexity,
                   "kl_mean": summary["kl"]["mean"], "top1_pct": summary["kl"]["top1_agreement_pct"]}
            runs.append(run)
            print(f"seed {seed:>2} {variant:<15} ppl {run['perplexity']:.3f}  KL {run['kl_mean']:.4f}  "
                  f"top-1 {run['top1_pct']:.2f} %  ({seconds:.0f} s)", flush=True)

    aggregate = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        aggregate[variant] = {key: {"mean": statistics.fmean(r[key] for r in mine),
                                    "std": statistics.stdev(r[key] for r in mine) if len(mine) > 1 else 0.0}
                              for key in ("perplexity", "kl_mean", "top1_pct", "quantize_s")}
        aggregate[variant]["runs"] = len(mine)
    paired = {}
    for peer, mine in (("llmcompressor", ("ptqlab", "ptqlab-b1", "ptqlab-minmax", "awq")), ("llmcompressor-w8a8", ("w8a8",))):
        if peer not in variants:
            continue
        theirs = {r["seed"]: r for r in runs if r["variant"] == peer}
        for variant in variants:
            if variant not in mine:
                continue
            diffs = [(r["kl_mean"] / theirs[r["seed"]]["kl_mean"] - 1) * 100 for r in runs if r["variant"] == variant]
            ppl = [(r["perplexity"] / theirs[r["seed"]]["perplexity"] - 1) * 100 for r in runs if r["variant"] == variant]
            paired[variant] = {"against": peer, "kl_vs_llmcompressor_pct": diffs, "ppl_vs_llmcompressor_pct": ppl,
                               "seeds_kl_lower_or_equal": sum(d <= 0 for d in diffs)}

    record = {
        "benchmark": "gptq_quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (embedded, bf16)", "device": device_name(torch.device(device)),
        "versions": {**versions(), **_llmc_version()},
        "settings": {"seeds": seeds, "num_samples": args.num_samples, "max_seq_len": args.max_seq_len,
                     "calibration": samples.source, "group_size": group_size, "eval_text": text.name,
                     "ppl_context": args.ppl_context, "windows": len(windows), "tokens_scored": baseline.tokens},
        "baseline_perplexity": baseline.perplexity,
        "runs": runs, "aggregate": aggregate, "paired": paired,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'variant':<20}{'runs':>5}{'perplexity':>18}{'KL mean':>20}{'top-1 %':>18}{'time s':>9}")
    for variant, agg in aggregate.items():
        cells = [f"{agg[k]['mean']:.4f} ± {agg[k]['std']:.4f}" for k in ("perplexity", "kl_mean", "top1_pct")]
        print(f"{variant:<20}{agg['runs']:>5}{cells[0]:>18}{cells[1]:>20}{cells[2]:>18}{agg['quantize_s']['mean']:>9.1f}")
    for variant, p in paired.items():
        print(f"{variant} vs {p['against']}, per seed: KL " + ", ".join(f"{d:+.1f} %" for d in p["kl_vs_llmcompressor_pct"])
              + " ; perplexity " + ", ".join(f"{d:+.2f} %" for d in p["ppl_vs_llmcompressor_pct"]))


def _llmc_version() -> dict:
    try:
        from importlib.metadata import version
        return {"llmcompressor": version("llmcompressor")}
    except Exception:
        return {}


if __name__ == "__main__":
    main()
