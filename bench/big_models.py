"""Models larger than the GPU and than CPU memory (issue 15): peak memory, time and identity of the result.

Case b (`--case b`): a Qwen2.5-14B-shaped model with random bf16 weights is written to disk as a safetensors folder,
then quantized with `w4a16` (GPTQ) from disk with `--stream` under CPU and GPU budgets, in a child process that
reports its own peak RSS and peak GPU memory; then the same model through the in-memory path (no budgets). The two
checkpoints are compared tensor by tensor (bitwise), and the streamed one is loaded by ptqlab's runtime.

Case a (`--case a`): a Qwen2.5-32B-shaped model with random bf16 weights in CPU memory, `w4a16` with 128 x 1024
random calibration tokens, once with the GPU limited to `--gpu-budget` (the allocator's per-process fraction: what a
shared GPU with that much free allows) and once with the whole GPU, each in its own child process placing layers and
activations as its memory plan says (engine/memory.py). With two GPUs the two children run at the same time, one per
GPU (side by side: the same machine, the same moment); else one after the other.

Prints a table and writes bench/results/big_models.json (`"cases"`, one entry per case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}
WORDS = [f"w{i}" for i in range(900)]
GIB = 2**30


def config_of(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                       dtype="bfloat16", bos_token_id=None, eos_token_id=1, pad_token_id=0)


def random_tensors(config, device: torch.device, seed: int):
    """(name, tensor) of a random bf16 model of `config`, one parameter at a time (never the whole model): std-0.02
    weights, unit norms, as transformers initializes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in skeleton.named_parameters():
        if "norm" in name:
            yield name, torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            yield name, (torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(
                torch.bfloat16).cpu()


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the calibration words (what a qwen2 config's tokenizer class rebuilds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>").save_pretrained(folder)


def write_model(folder: Path, shape: str, device: torch.device, seed: int, shard_bytes: int = 4 * GIB) -> int:
    """A random model as a safetensors folder, written shard by shard; -> bytes written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = config_of(shape)
    config.save_pretrained(folder)
    write_tokenizer(folder)
    shards, current, size, total = [], {}, 0, 0  # shards: the tensor names of each file written
    for name, tensor in random_tensors(config, device, seed):
        current[name] = tensor
        size += tensor.numel() * 2
        if size >= shard_bytes:
            shards.append(list(current))
            save_file(current, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            total += size
            current, size = {}, 0
    if current:
        shards.append(list(current))
        save_file(current, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        total += size
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return total


def write_calibration(path: Path, samples: int, seq_len: int, seed: int) -> None:
    """Plain-text samples of `seq_len` + 16 random words: every sample fills the calibration length."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(seq_len + 16)) for _ in range(samples)) + "\n")


CHILD_QUANTIZE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
from big_models import peak_rss
from ptqlab.api import quantize
from ptqlab.data import CalibrationConfig
args = json.loads(sys.argv[1])
calibration = CalibrationConfig(dataset=args.pop("calibration"), num_samples=args.pop("samples"),
                                max_seq_len=args.pop("seq_len"))
start = time.perf_counter()
quantize(calibration=calibration, quiet=True, **args)
seconds = time.perf_counter() - start
cuda = torch.cuda.is_available()
print("RESULT " + json.dumps({"seconds": seconds,
      "peak_gpu_bytes": torch.cuda.max_memory_reserved() if cuda else None,
      "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
      "peak_cpu_rss_bytes": peak_rss()}))
"""

CHILD_IN_CPU_MEMORY = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
import big_models
from big_models import peak_rss
from ptqlab.api import gpu_memory_limit
from ptqlab.data import CalibrationSet
from ptqlab.engine.memory import MARGIN, ModelShape, RunShape, estimate
from ptqlab.pipeline import quantize_model
from ptqlab.recipes import get_recipe
from transformers import AutoModelForCausalLM
from accelerate import init_empty_weights
args = json.loads(sys.argv[1])
device = torch.device(args["device"])
config = big_models.config_of(args["shape"])
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.load_state_dict(dict(big_models.random_tensors(config, device, args["seed"])), assign=True)
model.eval()
g = torch.Generator().manual_seed(args["seed"] + 1)
tokens = torch.randint(2, config.vocab_size, (args["samples"], args["seq_len"]), generator=g)
cuda = device.type == "cuda"
budget = (args["gpu_budget"] or int(MARGIN * torch.cuda.mem_get_info(device)[0])) if cuda else None
plan = estimate(ModelShape.from_config(config), RunShape(args["samples"], args["seq_len"], args["batch_size"], 2, 2, True,
                True, 4, 128, False, device.type), budget)
torch.cuda.reset_peak_memory_stats() if cuda else None
start = time.perf_counter()
with gpu_memory_limit(device.type, args["gpu_budget"]):  # as ptqlab.quantize runs the engine
    quantize_model(model, get_recipe("w4a16"), CalibrationSet(list(tokens), "random tokens"), quiet=True,
                   device=device, batch_size=args["batch_size"], offload=not plan.layers_on_gpu,
                   activations_on_gpu=plan.activations_on_gpu)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "memory_plan": plan.to_dict(),
      "peak_gpu_bytes": torch.cuda.max_memory_reserved() if device.type == "cuda" else None,
      "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
      "peak_cpu_rss_bytes": peak_rss()}))
"""


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), which, unlike getrusage's ru_maxrss, a child does not inherit
    from the parent that started it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(code: str, args: dict, timeout: float, gpu: int | None = None) -> dict:
    return finish_child(start_child(code, args, gpu), timeout)


def start_child(code: str, args: dict, gpu: int | None = None) -> tuple[subprocess.Popen, object, object]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    # Output to files, not pipes: a child is never blocked on a full pipe while the other is waited for.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args), str(ROOT / "bench")], stdout=out, stderr=err,
                            text=True, env=env)
    return proc, out, err


def finish_child(started: tuple[subprocess.Popen, object, object], timeout: float) -> dict:
    proc, out, err = started
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"completed": False, "error": f"stopped by the benchmark's --timeout of {timeout:g} s"}
    stdout, stderr = (_read(file) for file in (out, err))
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"completed": False, "error": " | ".join(tail)}
    return {"completed": True, **json.loads(lines[-1].removeprefix("RESULT "))}


def _read(file) -> str:
    file.seek(0)
    return file.read()


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether two checkpoints hold the same tensors, bitwise; and how many."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False, len(ia)
    for name in sorted(ia):
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False, len(ia)
    return True, len(ia)


def case_b(args, device: torch.device, work: Path) -> dict:
    src, calib = work / "model", work / "calibration.txt"
    start = time.perf_counter()
    model_bytes = write_model(src, args.shape_b, device, args.seed)
    write_calibration(calib, args.samples, args.seq_len, args.seed)
    print(f"case b: wrote {model_bytes / GIB:.1f} GiB model in {time.perf_counter() - start:.0f} s", flush=True)
    common = {"model": str(src), "recipe": "w4a16", "calibration": str(calib), "samples": args.samples,
              "seq_len": args.seq_len, "device": device.type, "calib_batch_size": args.batch_size}
    streamed = child(CHILD_QUANTIZE, {**common, "out": str(work / "streamed"), "stream": True,
                                      "max_cpu_memory": args.cpu_budget_b, "max_gpu_memory": args.gpu_budget_b},
                     args.timeout)
    print(f"case b streamed: {streamed}", flush=True)
    in_memory = child(CHILD_QUANTIZE, {**common, "out": str(work / "in-memory")}, args.timeout) if args.compare else {}
    print(f"case b in memory: {in_memory}", flush=True)
    entry = {"case": "b", "date": _now(), "command": sys.argv,
             "name": f"{args.shape_b} from disk, --stream, --max-cpu-memory {args.cpu_budget_b} --max-gpu-memory "
                     f"{args.gpu_budget_b}", "model_bytes": model_bytes, **streamed,
             "gpu_budget_bytes": _bytes(args.gpu_budget_b), "cpu_budget_bytes": _bytes(args.cpu_budget_b),
             "in_memory_path": in_memory}
    if streamed.get("completed") and in_memory.get("completed"):
        entry["tensors_equal_in_memory_path"], entry["tensors"] = same_tensors(work / "streamed", work / "in-memory")
    if streamed.get("completed"):
        from ptqlab.runtime import load_runtime

        model = load_runtime(work / "streamed", device)
        logits = model(torch.randint(2, 900, (1, 16), device=device)).logits
        entry["runtime_loads"] = bool(torch.isfinite(logits).all())
        del model
    record = json.loads((work / "streamed" / "ptqlab.json").read_text()) if streamed.get("completed") else {}
    entry["memory_plan"] = record.get("settings", {}).get("memory_plan")
    return entry


def case_a(args, device: torch.device) -> dict:
    common = {"shape": args.shape_a, "device": device.type, "seed": args.seed, "samples": args.samples,
              "seq_len": args.seq_len, "batch_size": args.batch_size}
    constrained_args, whole_args = {**common, "gpu_budget": _bytes(args.gpu_budget_a)}, {**common, "gpu_budget": None}
    side_by_side = args.compare and torch.cuda.device_count() >= 2
    if side_by_side:  # one child per GPU, at the same time
        running = [start_child(CHILD_IN_CPU_MEMORY, constrained_args, 0), start_child(CHILD_IN_CPU_MEMORY, whole_args, 1)]
        constrained, whole = (finish_child(proc, args.timeout) for proc in running)
    else:
        constrained = child(CHILD_IN_CPU_MEMORY, constrained_args, args.timeout)
        whole = child(CHILD_IN_CPU_MEMORY, whole_args, args.timeout) if args.compare else {}
    print(f"case a constrained: {constrained}", flush=True)
    print(f"case a whole GPU: {whole}", flush=True)
    entry = {"case": "a", "date": _now(), "command": sys.argv,
             "name": f"{args.shape_a} in CPU memory, GPU limited to {args.gpu_budget_a}", **constrained,
             "gpu_budget_bytes": _bytes(args.gpu_budget_a), "cpu_budget_bytes": None,
             "unconstrained_seconds": whole.get("seconds"), "unconstrained_peak_gpu_bytes": whole.get("peak_gpu_bytes"),
             "runs": "at the same time, one per GPU" if side_by_side else "one after the other", "unconstrained": whole}
    if constrained.get("seconds") and whole.get("seconds"):
        entry["time_ratio"] = round(constrained["seconds"] / whole["seconds"], 3)
    return entry


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _bytes(text: str) -> int:
    from ptqlab.engine.memory import parse_bytes

    return parse_bytes(text, "budget")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["a", "b"], action="append", required=True)
    parser.add_argument("--shape-a", choices=SHAPES, default="qwen2.5-32b")
    parser.add_argument("--shape-b", choices=SHAPES, default="qwen2.5-14b")
    parser.add_argument("--gpu-budget-a", default="24GiB")
    parser.add_argument("--gpu-budget-b", default="12GiB")
    parser.add_argument("--cpu-budget-b", default="8GiB")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip the reference runs")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "big_models.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="big-models-"))
    cases = []
    for name, run in (("a", lambda: case_a(args, device)), ("b", lambda: case_b(args, device, work))):
        if name in args.case:
            cases.append(run())
            write_results(args, device, cases)


def write_results(args, device: torch.device, cases: list[dict]) -> None:
    import transformers

    result = {"benchmark": "big_models", "date": _now(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "command": sys.argv, "cases": cases}
    if args.out.is_file():  # the cases not run now keep their last results, each with its own date and command
        earlier = json.loads(args.out.read_text())
        kept = [c for c in earlier.get("cases", []) if c.get("case") not in {c.get("case") for c in cases}]
        result["cases"] = sorted(kept + cases, key=lambda c: c.get("case", ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':60} {'done':5} {'seconds':>8} {'peak GPU GiB':>12} {'budget':>7} {'peak RSS GiB':>12} {'budget':>7}")
    for c in cases:
        gpu = c.get("peak_gpu_bytes")
        print(f"{c['name'][:60]:60} {str(c.get('completed')):5} {c.get('seconds') or 0:8.1f} "
              f"{(gpu or 0) / GIB:12.1f} {(c['gpu_budget_bytes'] or 0) / GIB:7.1f} "
              f"{(c.get('peak_cpu_rss_bytes') or 0) / GIB:12.1f} {(c['cpu_budget_bytes'] or 0) / GIB:7.1f}")


if __name__ == "__main__":
    main()
