"""Batch-1 decode at long context with the KV cache in 16 bits and in FP8, side by side, for 16-bit and int4 weights.

    python bench/kv_cache_speed.py --shape llama-3-8b --context 32768 --out bench/results/kv_cache_32k.json
    python bench/kv_cache_speed.py --shape tiny --context 256 --new-tokens 4 --repeats 1   # CPU smoke check

For each weight format (bf16; w4a16: the data-free w4a16-rtn, the format the calibrated w4a16 writes) a random-weight
model of the real shape is quantized in memory and loaded into ptqlab's runtime from its compressed-tensors tensors
(runtime/load.build_model), then decoded at batch 1 from position `--context` with a static cache of context + new
tokens: first with the cache in the model dtype, then in float8 E4M3 (`use_kv_scales`). Speed does not depend on the
values: the cache is filled with random keys and values (a prefill of 32k tokens would only cost time), the KV
scales are set, not calibrated, and every step reads the whole cache up to the position as a real one does.

Each cache is run with decode attention as the runtime chooses it (split along the sequence, flash-decoding, at long
context) and, for comparison, as one program per (row, KV head) (`--unsplit`, the kernel before the split). The
floor of each row is the bytes one step reads (every weight, scale and bias, the 16-bit head, the keys and values up
to the position) over the copy bandwidth measured at the start. JSON: device, versions, date, command, settings,
every run's tok/s, the fp8 / 16-bit ratio per weight format.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_speed import SHAPES  # noqa: E402

from ptqlab.runtime import fused  # noqa: E402

WEIGHTS = {"bf16": None, "w4a16": "w4a16-rtn"}
"""Weight format -> the recipe whose format it runs (None: the 16-bit model)."""
KV_SCALE = 0.02
"""The KV scales set on every layer: any positive value reads and writes the same bytes."""


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes read + written per second by a 1 GiB device copy (the decode floor's denominator); None on a CPU."""
    if device.type != "cuda":
        return None
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times)


def build_runtime(shape: str, recipe: str | None, device: torch.device, max_positions: int, seed: int):
    """The runtime of a random-weight model of `shape`, quantized in memory with `recipe`, with KV scales set."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptqlab.formats.compressed_tensors import checkpoint_tensors, quantization_config
    from ptqlab.pipeline import quantize_model
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime.load import SchemeResolver, build_model
    from ptqlab.runtime.model import Architecture

    model_type, params = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    qc = None
    if recipe is not None:
        chosen = get_recipe(recipe)
        quantize_model(model, chosen, quiet=True)
        qc = quantization_config(chosen)
    tensors = checkpoint_tensors(model)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    del model
    arch = Architecture.from_config(config)
    runtime = build_model(config, arch, tensors, SchemeResolver(qc), device, max_positions=max_positions)
    del tensors
    scale = torch.full((arch.num_kv_heads,), KV_SCALE, dtype=torch.float32, device=device)
    runtime.kv_scales = [(scale, scale)] * arch.num_layers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runtime


def fill_cache(runtime, seed: int) -> None:
    """Random keys and values in every layer's cache (in float8: the same values over KV_SCALE)."""
    g = torch.Generator(device=runtime.device).manual_seed(seed)
    for block in runtime.blocks:
        for cache in (block.k_cache, block.v_cache):
            for row in cache.view(-1, *cache.shape[2:]):  # one (row, head) at a time: no full-size float copy
                values = torch.randn(row.shape, generator=g, device=runtime.device)
                row.copy_(values if block.kv_scales is None else values / KV_SCALE)


def weight_bytes(runtime) -> int:
    """Every distinct weight buffer one step reads (an untied embedding only as the one row it reads)."""
    head = getattr(runtime.head, "weight", None)
    tied = head is not None and head.data_ptr() == runtime.embed.data_ptr()
    seen, total = set(), 0
    for name, buffer in runtime.named_buffers():
        if buffer is None or buffer.data_ptr() in seen or (name == "embed" and not tied):
            continue
        seen.add(buffer.data_ptr())
        total += buffer.numel() * buffer.element_size()
    return total


def decode_run(runtime, context: int, new_tokens: int, repeats: int, graph: bool | None, seed: int) -> dict:
    """Decode `new_tokens` at batch 1 from position `context`, `repeats` times after a warm-up (which captures the
    CUDA graph) -> tok/s (median) and the raw seconds."""
    from ptqlab.runtime import Generator

    generator = Generator(runtime, 1, context + new_tokens + 8, graph=graph)
    generator._own_cache()
    fill_cache(runtime, seed)
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    seconds = []
    for attempt in range(repeats + 1):
        generator.pos.fill_(context)
        generator.token.fill_(1)
        sync()
        start = time.perf_counter()
        generator.decode(new_tokens)
        sync()
        if attempt:  # the first is the warm-up
            seconds.append(time.perf_counter() - start)
    cache = generator.max_length
    runtime.drop_cache()
    return {"decode_tok_s": new_tokens / statistics.median(seconds), "seconds": seconds, "cache_positions": cache}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--weights", default=",".join(WEIGHTS), help="comma-separated: " + ", ".join(WEIGHTS))
    parser.add_argument("--context", type=int, default=32768, help="the position decoding starts from")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-unsplit", dest="unsplit", action="store_false",
                        help="skip the runs with one decode-attention program per (row, KV head)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import transformers

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    if bandwidth:
        print(f"copy {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    automatic = fused.decode_splits
    results = {}
    for weights in args.weights.split(","):
        runtime = build_runtime(args.shape, WEIGHTS[weights], device, args.context + args.new_tokens + 72, args.seed)
        a = runtime.arch
        per_position = 2 * a.num_layers * a.num_kv_heads * a.head_dim  # keys and values, every layer
        results[weights] = {}
        for cache in ("16-bit", "fp8"):
            runtime.use_kv_scales(cache == "fp8")
            kv_bytes = per_position * args.context * (1 if cache == "fp8" else runtime.dtype.itemsize)
            step_bytes = weight_bytes(runtime) + kv_bytes
            for attention in ("split", "unsplit") if args.unsplit else ("split",):
                fused.decode_splits = automatic if attention == "split" else (lambda *_: 1)
                try:
                    run = decode_run(runtime, args.context, args.new_tokens, args.repeats, None, args.seed)
                finally:
                    fused.decode_splits = automatic
                splits = automatic(1, a.num_kv_heads, run["cache_positions"], device) if attention == "split" else 1
                floor = bandwidth / step_bytes if bandwidth else None
                run.update({"splits": splits, "kv_cache_bytes": kv_bytes, "step_bytes": step_bytes,
                            "floor_tok_s": floor, "fraction_of_floor": run["decode_tok_s"] / floor if floor else None})
                results[weights][f"{cache}, {attention}"] = run
                of_floor = f" ({100 * run['fraction_of_floor']:4.1f} % of {floor:.0f})" if floor else ""
                print(f"{weights:6s} {cache:6s} cache, {attention:7s} attention ({splits:2d} split"
                      f"{'s' if splits > 1 else ''}): {run['decode_tok_s']:8.1f} tok/s{of_floor}", flush=True)
        del runtime
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    def speed(weights: str, run: str) -> float:
        return results[weights][run]["decode_tok_s"]

    ratios = {}
    for weights in results:
        ratios[weights] = {"fp8_over_16bit": speed(weights, "fp8, split") / speed(weights, "16-bit, split")}
        if args.unsplit:
            ratios[weights].update({
                "split_over_unsplit_16bit": speed(weights, "16-bit, split") / speed(weights, "16-bit, unsplit"),
                "split_over_unsplit_fp8": speed(weights, "fp8, split") / speed(weights, "fp8, unsplit")})
    print(f"\nbatch-1 decode at position {args.context} ({args.shape}):")
    for weights, ratio in ratios.items():
        print(f"  {weights}: fp8 cache / 16-bit cache = {ratio['fp8_over_16bit']:.3f}x"
              + (f"; split / unsplit attention: 16-bit {ratio['split_over_unsplit_16bit']:.2f}x, fp8 "
                 f"{ratio['split_over_unsplit_fp8']:.2f}x" if args.unsplit else ""))
    if args.out:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version()}
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            pass
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
        record = {"shape": args.shape, "device": device_name,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["python", *sys.argv]), "versions": versions,
                  "settings": vars(args) | {"out": str(args.out)}, "copy_bytes_per_s": bandwidth, "kv_scale": KV_SCALE,
                  "results": results, "ratios": ratios}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
