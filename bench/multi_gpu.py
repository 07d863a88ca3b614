"""Several GPUs (issue 17): `ptqlab quantize --gpus N` on random models of real shapes, each GPU count in the same
call, from the same model folder and calibration file.

    python bench/multi_gpu.py --case llama-3-8b --gpus 1,2           # W4A16, 256 x 1024
    python bench/multi_gpu.py --case qwen2.5-32b --gpus 1,2
    python bench/multi_gpu.py --case qwen3-30b-a3b --gpus 1,2         # experts spread over the ranks

Each run is the command line a user types (its workers started by torch's elastic launcher); its wall time and each
rank's peak GPU memory (ptqlab.json's settings.peak_gpu_bytes_per_rank) go into bench/results/multi_gpu.json as
{"cases": [{"shape", "scheme", "gpus": [...], "seconds": [...], "peak_gpu_bytes_per_rank": [[...], ...]}]}, with
the device, versions, date and command. Speed does not depend on weight values, so random weights of the real
shape (written to --work once, in the hub's layout) measure it faithfully.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import big_models  # noqa: E402
import moe  # noqa: E402


def config_of(case: str):
    """The transformers config of a case's shape."""
    from transformers import LlamaConfig

    if case == "llama-3-8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=5e5,
                           dtype="bfloat16", bos_token_id=None, eos_token_id=1, pad_token_id=0)
    if case in big_models.SHAPES:
        return big_models.config_of(case)
    return moe.config_of(case)


def write_model(folder: Path, config, device: torch.device, seed: int) -> None:
    """A random bf16 model as a safetensors folder in the hub's layout (an MoE model's experts one tensor per
    expert projection, as the hub's checkpoints store them), one shard per decoder layer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ptqlab.engine.experts import unfuse
    from ptqlab.families import checkpoint_name, moe_layout
    from ptqlab.models import decoder_layer_names

    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(dict(big_models.random_tensors(config, device, seed)), assign=True)
    unfuse(model)
    layout = moe_layout(config)
    layers = decoder_layer_names(model)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict().items():
        layer = next((i for i, prefix in enumerate(layers) if name.startswith(prefix + ".")), None)
        shards.setdefault("rest" if layer is None else f"{layer:05d}", {})[checkpoint_name(name, layout)] = tensor
    weight_map = {}
    for i, (key, tensors) in enumerate(sorted(shards.items()), 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    big_models.write_tokenizer(folder)
    (folder / ".complete").write_text("")


def run_case(args, gpus: int, model: Path, calibration: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "ptqlab", "quantize", str(model), "--recipe", args.scheme, "--dataset",
               str(calibration), "--num-samples", str(args.samples), "--max-seq-len", str(args.seq_len),
               "--calib-batch-size", str(args.batch_size), "--gpus", str(gpus), "--out", str(out), "--overwrite",
               "--quiet", *(["--stream"] if args.stream else [])]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip()[-2000:], "seconds": seconds}
    record = json.loads((out / "ptqlab.json").read_text())
    return {"seconds": seconds, "run_seconds": record["seconds"],
            "peak_gpu_bytes_per_rank": record["settings"]["peak_gpu_bytes_per_rank"], "command": command[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=["llama-3-8b", *big_models.SHAPES, *moe.SHAPES])
    parser.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated, run in this order")
    parser.add_argument("--scheme", default="w4a16")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="each rank reads its layers from disk")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ptqlab-multi-gpu"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_gpu.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = args.work / args.case
    if not (model / ".complete").is_file():
        write_model(model, config_of(args.case), device, args.seed)
    calibration = args.work / f"calibration-{args.samples}x{args.seq_len}.txt"
    if not calibration.is_file():
        big_models.write_calibration(calibration, args.samples, args.seq_len, args.seed)
    counts = [int(n) for n in args.gpus.split(",")]
    runs = [run_case(args, n, model, calibration, args.work / f"out-{args.case}-{n}") for n in counts]
    case = {"shape": args.case, "scheme": args.scheme, "gpus": counts, "seconds": [r["seconds"] for r in runs],
            "peak_gpu_bytes_per_rank": [r.get("peak_gpu_bytes_per_rank") for r in runs],
            "speedup": [runs[0]["seconds"] / r["seconds"] for r in runs], "stream": args.stream,
            "samples": args.samples, "seq_len": args.seq_len, "runs": runs,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "versions": moe.versions(), "command": ["python3", "bench/multi_gpu.py", *sys.argv[1:]]}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "multi_gpu", "cases": []}
    results["cases"] = [c for c in results["cases"] if (c["shape"], c["scheme"]) != (args.case, args.scheme)] + [case]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for n, run in zip(counts, runs):
        print(f"{args.case} {args.scheme} gpus={n}: {run['seconds']:.1f} s"
              + (f"  peak GPU per rank {run['peak_gpu_bytes_per_rank']}" if "error" not in run else f"  {run['error']}"))


if __name__ == "__main__":
    main()
