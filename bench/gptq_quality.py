"""GPTQ quality against the incumbent on real weights: ptqlab's w4a16 and llm-compressor's GPTQ W4A16 on the embedded
SmolLM2-135M-Instruct, calibrated on the same samples, then benchmarked side by side (perplexity, KL, top-1) with the
16-bit baseline and round-to-nearest.

    python bench/gptq_quality.py --out bench/results/gptq_quality_smollm2

Runs on a CPU (minutes) or a GPU. Writes the usual ptqlab report (results.json, summary.md, report.html) into --out
plus quality.json with the settings, versions and timings of both quantizers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def llmcompressor_gptq(model_path: Path, samples: list[torch.Tensor], group_size: int, out: Path, device: str) -> float:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Dataset.from_dict({"input_ids": [s.tolist() for s in samples], "attention_mask": [[1] * len(s) for s in samples]})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                             strategy="group", group_size=group_size))
    start = time.perf_counter()
    oneshot(model=model, dataset=data, processor=tokenizer, num_calibration_samples=len(samples),
            max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False,
            recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01))
    seconds = time.perf_counter() - start
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return seconds


def main() -> None:
    from ptqlab import quantize
    from ptqlab.bench.variant import QUICK_CONTEXT, QUICK_WINDOWS, BenchSettings
    from ptqlab.data import CalibrationConfig, load_calibration
    from ptqlab.embedded import default_model_path
    from ptqlab.suite import bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gptq_quality_smollm2"))
    parser.add_argument("--work", type=Path, default=Path("out/gptq_quality"), help="where the checkpoints go")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--dataset", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ppl-full", action="store_true", help="score the whole text (default: the quick probe)")
    args = parser.parse_args()

    base = default_model_path()
    from transformers import AutoTokenizer

    calibration = CalibrationConfig(dataset=args.dataset, num_samples=args.num_samples, max_seq_len=args.max_seq_len)
    samples = load_calibration(AutoTokenizer.from_pretrained(base), calibration)
    args.work.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    ours = quantize(str(base), "w4a16", out=args.work / "ptqlab-w4a16", overwrite=True, calibration=calibration,
                    device=args.device, quiet=True)
    timings["ptqlab_w4a16_s"] = time.perf_counter() - start
    group_size = json.loads((ours / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"]
    rtn = quantize(str(base), "w4a16-rtn", out=args.work / "ptqlab-w4a16-rtn", overwrite=True, quiet=True)
    theirs = args.work / "llmcompressor-w4a16"
    timings["llmcompressor_w4a16_oneshot_s"] = llmcompressor_gptq(base, samples.samples, group_size, theirs, args.device)

    windows = {} if args.ppl_full else {"ppl_context": QUICK_CONTEXT, "ppl_windows": QUICK_WINDOWS}
    settings = BenchSettings(max_new_tokens=32, repeats=3, sample_tokens=48, device=args.device, **windows)
    bench([str(base), str(ours), str(theirs), str(rtn)], args.out, settings=settings)
    results = json.loads((args.out / "results.json").read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    summary = {
        "benchmark": "gptq_quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (embedded)", "device": results["device"], "versions": results["versions"],
        "calibration": {"source": samples.source, "samples": len(samples.samples), "tokens": samples.tokens,
                        "max_seq_len": args.max_seq_len, "group_size": group_size},
        "timings": timings,
        "quality": {name: {"perplexity": v["perplexity"]["value"], "kl": v["kl"]} for name, v in by_name.items()},
        "text": results["text"],
    }
    (args.out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'variant':<28}{'perplexity':>12}{'KL mean':>10}{'top-1 %':>9}")
    for name, q in summary["quality"].items():
        kl = q["kl"] or {}
        print(f"{name:<28}{q['perplexity']:>12.3f}{kl.get('mean', 0):>10.4f}{kl.get('top1_agreement_pct', 100):>9.2f}")


if __name__ == "__main__":
    main()
