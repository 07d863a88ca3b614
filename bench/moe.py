"""Mixture-of-experts quantization and decode (issues 16 and 34): a Qwen3-30B-A3B-shaped or a DeepSeek-V3-shaped
model (the real widths and 256 experts, 4 layers: one dense, three MoE) with random bf16 weights.

    python bench/moe.py --part quantize        # ptqlab GPTQ W4A16 of the whole model, 256 x 1024 tokens
    python bench/moe.py --part llmcompressor   # llm-compressor's GPTQ W4A16 on the first --lc-layers layers
    python bench/moe.py --part decode          # batch-1 decode tok/s of bf16, w4a16 and fp8-dynamic, ptqlab's runtime
    python bench/moe.py --shape deepseek-v3 --part quantize   # and --part llmcompressor --lc-layers 2 (a dense and an
                                                              # MoE layer: its seconds per MoE layer are the second's)

Each part runs in a child process that reports its own peak RSS (VmHWM) and peak GPU memory, and merges its keys
into bench/results/moe_<shape>.json (`ptqlab_seconds`, `ptqlab_seconds_per_layer`,
`llmcompressor_seconds_per_layer`, `peak_gpu_bytes`, `peak_cpu_rss_bytes`, `decode_tok_s`), with the device,
versions, date and command. Speed does not depend on weight values, so random weights of the real shape measure it
faithfully; the routing of random weights spreads tokens over the experts as a trained router roughly does.
The decode floor of each variant is the bytes one token reads (its top-k experts, attention, router, head) over
the GPU's memory bandwidth.
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

from big_models import peak_rss, random_tensors  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, norm_topk_prob=True, max_position_embeddings=40960,
                          rope_theta=1e6, tie_word_embeddings=False),
    # DeepSeek-V3's config.json but for its layer count (61, the first 3 dense): 4 layers, the first dense.
    "deepseek-v3": dict(model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        first_k_dense_replace=1, num_hidden_layers=4, num_attention_heads=128,
                        num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5, norm_topk_prob=True,
                        vocab_size=129280, max_position_embeddings=4096, tie_word_embeddings=False),
    "deepseek-tiny": dict(model_type="deepseek_v3", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                          first_k_dense_replace=1, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                          vocab_size=1000, max_position_embeddings=2048, tie_word_embeddings=False),
    "tiny": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000,
                 norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False),
}
HBM_BYTES_PER_S = {"NVIDIA H200": 4.8e12}
"""Peak memory bandwidth per device, for the decode floor."""


def config_of(shape: str, layers: int | None = None):
    from transformers import AutoConfig

    params = dict(SHAPES[shape])
    if layers:
        params["num_hidden_layers"] = layers
    return AutoConfig.for_model(params.pop("model_type"), **params, dtype="bfloat16", bos_token_id=None, eos_token_id=1,
                                pad_token_id=0)


def random_model(config, device: torch.device, seed: int, keep_on_device: bool = False, unfused: bool = True):
    """A random bf16 model of `config` (big_models.random_tensors: drawn on `device` one tensor at a time), in CPU
    memory or, `keep_on_device`, on the device; its experts unfused (one linear per expert projection, views of the
    fused tensors)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ptqlab.engine.experts import unfuse

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    place = device if keep_on_device else torch.device("cpu")
    missing = model.load_state_dict({n: t.to(place) for n, t in random_tensors(config, device, seed)}, assign=True,
                                    strict=False).missing_keys
    for name in missing:  # persistent buffers (DeepSeek's e_score_correction_bias): zeros, as transformers starts them
        parent, _, leaf = name.rpartition(".")
        buffer = model.get_submodule(parent).get_buffer(leaf)
        model.get_submodule(parent).register_buffer(leaf, torch.zeros(buffer.shape, dtype=buffer.dtype, device=place))
    if unfused:
        unfuse(model)
    return model.eval()


def part_quantize(args, device: torch.device) -> dict:
    """ptqlab GPTQ W4A16 of the whole model (or its first `--layers`)."""
    from ptqlab.data import CalibrationSet
    from ptqlab.engine.memory import MARGIN, ModelShape, RunShape, estimate
    from ptqlab.pipeline import quantize_model
    from ptqlab.recipes import get_recipe

    config = config_of(args.shape, args.layers)
    model = random_model(config, device, args.seed)
    tokens = calibration_tokens(args, config)
    cuda = device.type == "cuda"
    budget = int(MARGIN * torch.cuda.mem_get_info(device)[0]) if cuda else None
    plan = estimate(ModelShape.from_config(config), RunShape(args.samples, args.seq_len, args.batch_size, 2, 2, True,
                                                             True, 4, 128, False, device.type), budget)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = quantize_model(model, get_recipe("w4a16"), CalibrationSet(list(tokens), "random tokens"), quiet=False,
                            device=device, batch_size=args.batch_size, offload=not plan.layers_on_gpu,
                            activations_on_gpu=plan.activations_on_gpu)
    seconds = time.perf_counter() - start
    out = {"ptqlab_seconds": seconds, "ptqlab_seconds_per_layer": seconds / config.num_hidden_layers,
           "peak_gpu_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
           "peak_cpu_rss_bytes": peak_rss(), "memory_plan": plan.to_dict(),
           "expert_coverage_note": next((n for n in result.notes if n.startswith("experts:")), None),
           "phases_s": {k: round(sum(r.seconds.get(k, 0) for r in result.layer_reports), 2)
                        for k in result.layer_reports[0].seconds}}
    return out


def calibration_tokens(args, config) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(2, config.vocab_size, (args.samples, args.seq_len), generator=g)


def part_llmcompressor(args, device: torch.device) -> dict:
    """llm-compressor's GPTQ W4A16 on a model of the first `--lc-layers` layers of the shape, on the same
    calibration tokens, its experts calibrated as its defaults do; -> seconds per layer, or the error that stopped
    it. Prints `LC_START <unix time>` when its run begins, so that a run stopped by the timeout still gives a lower
    bound of its time."""
    import tempfile

    from datasets import Dataset

    config = config_of(args.shape)
    tokens = calibration_tokens(args, config)
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as e:
        return {"llmcompressor_seconds_per_layer": None, "llmcompressor_error": str(e)}
    small = config_of(args.shape, args.lc_layers)
    model = random_model(small, device, args.seed, keep_on_device=True, unfused=False)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    recipe = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])]
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        model.config._name_or_path = folder
        from quantize_speed import placeholder_tokenizer

        print(f"LC_START {time.time()}", flush=True)
        start = time.perf_counter()
        try:
            oneshot(model=model, dataset=data, processor=placeholder_tokenizer(), recipe=recipe,
                    num_calibration_samples=len(tokens), max_seq_length=tokens.shape[1],
                    shuffle_calibration_samples=False)
        except Exception as e:  # noqa: BLE001 (recorded: which version failed how)
            return {"llmcompressor_seconds_per_layer": None, "llmcompressor_error": f"{type(e).__name__}: {e}"[:500]}
        seconds = time.perf_counter() - start
    return {"llmcompressor_seconds": seconds, "llmcompressor_layers": args.lc_layers,
            "llmcompressor_seconds_per_layer": seconds / args.lc_layers}


def part_decode(args, device: torch.device) -> dict:
    """Batch-1 decode tok/s of the same random model in ptqlab's runtime: bf16, GPTQ-free w4a16 (RTN: decode speed
    does not depend on how the grid values were chosen) and fp8-dynamic, each built in memory from the checkpoint
    tensors ptqlab writes. Model, quantization and checkpoint tensors stay on the device."""
    from ptqlab.formats.compressed_tensors import checkpoint_tensors, quantization_config
    from ptqlab.measure.speed import FastEngine, measure_speed
    from ptqlab.pipeline import quantize_model
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime.load import SchemeResolver, build_model
    from ptqlab.runtime.model import Architecture

    config = config_of(args.shape)
    arch = Architecture.from_config(config)
    speeds, floors = {}, {}
    for variant in ("bf16", "w4a16-rtn", "fp8-dynamic"):
        model = random_model(config, device, args.seed, keep_on_device=True)
        resolve = SchemeResolver(None)
        if variant != "bf16":
            result = quantize_model(model, get_recipe(variant), quiet=True, device=device)
            resolve = SchemeResolver(quantization_config(result.recipe))
        tensors = {k: v.to(device) for k, v in checkpoint_tensors(model).items()}
        del model
        runtime = build_model(config, arch, tensors, resolve, device, torch.bfloat16, 2048)
        name = "w4a16" if variant == "w4a16-rtn" else variant
        engine = FastEngine(runtime, 64 + args.decode_tokens)
        speeds[name] = measure_speed(engine, torch.tensor([[5, 6, 7, 8]], device=device), args.decode_tokens,
                                     batch_size=8, repeats=args.repeats)
        speeds[name]["kernels"] = runtime.kernels
        floors[name] = active_bytes(runtime, config)
        del engine, runtime, tensors  # the engine's CUDA graph holds the runtime: let both go before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bandwidth = HBM_BYTES_PER_S.get(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tok_s = {k: v["decode_tok_s"] for k, v in speeds.items()}
    return {"decode_tok_s": tok_s, "decode_bytes_per_token": floors,
            "decode_fraction_of_floor": {k: tok_s[k] * floors[k] / bandwidth for k in tok_s} if bandwidth else None,
            "decode_detail": speeds}


def active_bytes(runtime, config) -> int:
    """Bytes one decode token reads: every tensor but the experts and the embedding table (one row of it), plus the
    top-k experts' share of the experts. Counted by storage: the experts' linears hold views of the stacks."""

    def storages(module) -> dict[int, int]:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()] if t is not None}

    experts = {}
    for block in runtime.blocks:
        if block.moe is not None:
            experts |= storages(block.moe.experts)
            if block.moe.stacked is not None:
                experts |= storages(block.moe.stacked)
    everything = storages(runtime)
    embed_storage = runtime.embed.untyped_storage()
    tied = embed_storage.data_ptr() in storages(runtime.head)  # then the head reads it whole
    embed = 0 if tied else embed_storage.nbytes()
    expert_bytes = sum(experts.values())
    return int(sum(everything.values()) - expert_bytes - embed
               + expert_bytes * config.num_experts_per_tok / config.num_experts)


CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import moe
args = moe.parse(json.loads(sys.argv[1]))
device = torch.device(args.device)
part = {"quantize": moe.part_quantize, "llmcompressor": moe.part_llmcompressor, "decode": moe.part_decode}[args.part]
print("RESULT " + json.dumps(part(args, device)))
"""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["quantize", "llmcompressor", "decode"], required=True)
    parser.add_argument("--shape", choices=SHAPES, default="qwen3-30b-a3b")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="quantize part: this many layers (default: the shape's)")
    parser.add_argument("--lc-layers", type=int, default=1, help="llm-compressor: layers to quantize (0: skip)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/moe_<shape>.json")
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / f"moe_{args.shape}.json"
    return args


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("transformers", "compressed-tensors", "llmcompressor"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def main() -> None:
    args = parse()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    argv = sys.argv[1:]
    # The child's stderr (ptqlab's progress) passes through; its stdout carries the result line.
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), str(ROOT / "bench")],
                              stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
        stdout, returncode = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, returncode = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "", None
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    started = [float(line.split()[1]) for line in stdout.splitlines() if line.startswith("LC_START ")]
    if returncode is None and args.part == "llmcompressor" and started:
        # Stopped by the timeout: the time it had run is a lower bound of its time for its layers.
        ran = time.time() - started[0]
        found = {"llmcompressor_seconds_per_layer": None, "llmcompressor_layers": args.lc_layers,
                 "llmcompressor_seconds_per_layer_at_least": ran / args.lc_layers,
                 "llmcompressor_error": f"stopped by the {args.timeout:.0f} s timeout after {ran:.0f} s, unfinished"}
    elif returncode != 0 or not lines:
        raise SystemExit(f"the {args.part} part failed (exit {returncode}): {stdout.strip()[-2000:]}")
    else:
        found = json.loads(lines[-1].removeprefix("RESULT "))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "moe"}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    results |= found | {f"{args.part}_run": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                             "device": device, "command": ["python3", "bench/moe.py", *argv],
                                             "versions": versions(),
                                             "shape": args.shape, "samples": args.samples, "seq_len": args.seq_len}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in found.items():
        if key not in ("memory_plan", "decode_detail"):
            print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
