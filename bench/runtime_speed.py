"""Fast-runtime speed: batch-1 decode tokens/s and 4,096-token prefill tokens/s per scheme, each against its floor.

    python bench/runtime_speed.py --shape llama-3-8b --out bench/results/runtime_speed_llama-3-8b.json
    python bench/runtime_speed.py --shape llama-3-8b --schemes bf16,fp8-dynamic,w8a8,w4a16 --batch-sizes 1,8,32 \
        --out bench/results/batch_sweep_llama-3-8b.json       # + decode tok/s at each batch size, and the crossover

For each scheme (bf16, fp8-dynamic, w8a8, w4a16) a random-weight model of the real shape is quantized in memory
with the recipe's data-free twin (speed does not depend on weight values: fp8-dynamic, w8a8-rtn, w4a16-rtn write
the same formats as the calibrated w8a8 / w4a16) and loaded into the runtime from its compressed-tensors tensors.

Floors, measured on the same GPU at the start: decode is memory-bound, so its floor is bytes read per token
(every weight, scale and bias the step touches, the 16-bit head, the whole static KV cache) over the measured
copy bandwidth; prefill is compute-bound, so its floor is the matmul FLOPs over the measured dense rate of the
scheme's matmul (bf16 for bf16 and w4a16, whose prefill dequantizes into bf16 cuBLAS; fp8 `_scaled_mm`; int8
`_int_mm`), plus attention FLOPs at the bf16 rate. `--kernels` first times ptqlab's int4 kernels (several tiles)
against bf16 `F.linear`, PyTorch's `_weight_int4pack_mm` (tinygemm) and a kernel that only loads the packed weight,
on the shape's layers at 1 and 8 rows, each over weight copies larger than L2 as in a model.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_speed import SHAPES

from ptqlab.runtime.kernels import RuntimeOptions
from ptqlab.triton_support import tl, triton

SCHEMES = {"bf16": None, "fp8-dynamic": "fp8-dynamic", "w8a8": "w8a8-rtn", "w4a16": "w4a16-rtn",
           "fp8-dynamic-precise": "fp8-dynamic", "w4a16-no-pdl": "w4a16-rtn", "w4a16-tile256": "w4a16-rtn"}
"""Variant -> the recipe whose format it runs. The -precise, -no-pdl and -tile256 variants run the same checkpoint
with one of the runtime's options switched from its default (OPTIONS)."""
OPTIONS = {"fp8-dynamic-precise": RuntimeOptions(fp8_fast_accum=False), "w4a16-no-pdl": RuntimeOptions(pdl=False),
           "w4a16-tile256": RuntimeOptions(gemv_tile=(8, 256, 2))}
"""Variant -> the runtime options it runs with; variants not listed run the defaults."""
RATE = {"bf16": "bf16_flops", "w4a16": "bf16_flops", "fp8-dynamic": "fp8_flops", "fp8-dynamic-precise": "fp8_flops",
        "w8a8": "int8_ops", "w4a16-no-pdl": "bf16_flops", "w4a16-tile256": "bf16_flops"}
"""The dense matmul rate each variant's prefill floor is computed at."""


def median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and dense matmul rates, measured here."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), repeats=10)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16_ms = median_ms(lambda: a @ b, repeats=10)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    fp8_ms = median_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), repeats=10)
    ai, bi = torch.randint(-128, 127, (n, n), device="cuda", dtype=torch.int8), torch.randint(-128, 127, (n, n), device="cuda", dtype=torch.int8)
    int8_ms = median_ms(lambda: torch._int_mm(ai, bi.t()), repeats=10)
    flops = 2 * n**3
    return {"copy_bytes_per_s": 2 * src.numel() * 4 / (copy_ms / 1e3), "bf16_flops": flops / (bf16_ms / 1e3),
            "fp8_flops": flops / (fp8_ms / 1e3), "int8_ops": flops / (int8_ms / 1e3)}


def graph_us(fns, calls: int = 64) -> float:
    """GPU time of one call in microseconds, from a CUDA graph that calls `fns` in turn `calls` times in all (no
    Python launch overhead, which for a single small kernel is larger than the kernel). Each of `fns` should read
    its own copy of the weights, so that together they miss L2 as the layers of a model do."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return 1e3 * median_ms(graph.replay, repeats=10) / calls


def _copies(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Copies of `tensor` adding up to >= 4x the L2 cache (at least 2)."""
    l2 = torch.cuda.get_device_properties(tensor.device).L2_cache_size
    count = max(2, -(-4 * l2 // (tensor.numel() * tensor.element_size())))
    return [tensor.clone() for _ in range(count)]


GEMV_CONFIGS = [(8, 512, 4), (8, 256, 2), (16, 256, 4), (4, 128, 1), (8, 128, 1)]
"""(outputs, words per tile, warps) tried for the one-row int4 kernel; the first is its default
(RuntimeOptions.gemv_tile)."""

if triton is not None:  # CPU machines: the benchmark needs a GPU anyway

    @triton.jit
    def _load_only_kernel(P, Y, N, row_words, stride_pn, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
        """Reads the packed weight as the one-row kernel does, with next to no arithmetic: its bandwidth ceiling."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rp = tl.arange(0, BLOCK_KP)
        acc = tl.zeros([BLOCK_N], dtype=tl.int32)
        for w0 in range(0, row_words, BLOCK_KP):
            mask = (rn[:, None] < N) & (w0 + rp < row_words)[None, :]
            acc += tl.sum(tl.load(P + rn[:, None] * stride_pn + (w0 + rp)[None, :], mask=mask, other=0,
                                  eviction_policy="evict_first"), axis=1)
        tl.store(Y + rn, acc, mask=rn < N)


def load_only(planes: torch.Tensor) -> torch.Tensor:
    n, row_words = planes.shape
    y = torch.empty(n, dtype=torch.int32, device=planes.device)
    _load_only_kernel[(triton.cdiv(n, 8),)](planes, y, n, row_words, planes.stride(0), BLOCK_N=8, BLOCK_KP=256,
                                            num_warps=2)
    return y


def kernel_table(shape: str, rows: int = 1) -> list[dict]:
    """One layer's matmul at `rows` rows: bf16, ptqlab int4 (each tile config at one row; the tensor-core kernel at
    several), PyTorch tinygemm int4, a load-only pass over the packed weight, and ptqlab's int4 dequantization (the
    prefill path's extra pass)."""
    from ptqlab.quant.linear import rtn
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime import int4_kernels

    _, p = SHAPES[shape]
    h, i = p["hidden_size"], p["intermediate_size"]
    kv = p["num_key_value_heads"] * h // p["num_attention_heads"]
    args = get_recipe("w4a16").scheme.weights
    table = []
    for n, k in [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, scale, _ = rtn(w, args, torch.bfloat16)
        planes = int4_kernels.int4_planes(q, int4_kernels.plane_words(k, 128))
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ (q.double().unflatten(1, (-1, 128)) * scale.double().unsqueeze(-1)).flatten(1).T
        copies = _copies(planes)
        row = {"n": n, "k": k, "rows": rows, "int4_mb": planes.numel() * 4 / 1e6,
               "bf16_us": graph_us([partial(F.linear, x, c) for c in _copies(w)])}

        def timed(name, fn):
            y = fn(x, planes)
            row[f"{name}_err"] = float((y.double() - ref).norm() / ref.norm())
            row[f"{name}_us"] = graph_us([partial(fn, x, c) for c in copies])

        if rows == 1:
            for bn, bkp, warps in GEMV_CONFIGS:
                timed(f"int4_{bn}x{bkp}w{warps}", lambda x, p, c=(bn, bkp, warps): int4_kernels.int4_gemv(x, p, scale, None, c))
        else:
            timed("int4_tensor_cores", lambda x, p: int4_kernels.int4_matmul_small_m(x, p, scale, None))
        row["load_only_us"] = graph_us([partial(load_only, c) for c in copies])
        row["dequant_us"] = graph_us([partial(int4_kernels.int4_dequantize, c, scale, None, k, torch.bfloat16) for c in copies])
        try:
            u = q.to(torch.int32) + 8
            tiny = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), 8)
            sz = torch.stack([scale.T, torch.zeros_like(scale.T)], -1).contiguous()  # w = (u - 8) * s + 0
            row["tinygemm_us"] = graph_us([partial(torch.ops.aten._weight_int4pack_mm, x, c, 128, sz) for c in _copies(tiny)])
            y = torch.ops.aten._weight_int4pack_mm(x, tiny, 128, sz)
            row["tinygemm_err"] = float((y.double() - ref).norm() / ref.norm())
        except RuntimeError as e:  # not every build has it
            row["tinygemm_error"] = str(e).splitlines()[0]
        table.append(row)
        best = min((v, key) for key, v in row.items() if key.startswith("int4_") and key.endswith("_us"))
        print(f"[{rows} x {k}] @ [{k} x {n}]ᵀ: bf16 {row['bf16_us']:.1f} us, int4 best {best[0]:.1f} us ({best[1]}), "
              f"tinygemm {row.get('tinygemm_us', float('nan')):.1f} us, load only {row['load_only_us']:.1f} us, "
              f"dequant {row['dequant_us']:.1f} us; int4 at {row['int4_mb'] / best[0]:.2f} TB/s", flush=True)
    return table


def build_runtime(shape: str, recipe: str | None, seed: int, max_positions: int, options: RuntimeOptions):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptqlab.pipeline import quantize_model
    from ptqlab.formats.compressed_tensors import (
        checkpoint_tensors,
        quantization_config,
    )
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime.load import SchemeResolver, build_model
    from ptqlab.runtime.model import Architecture

    model_type, params = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    with torch.device("cuda"):
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
    runtime = build_model(config, Architecture.from_config(config), tensors, SchemeResolver(qc), torch.device("cuda"),
                          max_positions=max_positions, options=options)
    del tensors
    gc.collect()
    torch.cuda.empty_cache()
    return runtime


def decode_bytes(model, cache_positions: int) -> int:
    """Bytes one decode step must read: every distinct weight buffer (an untied embedding only as the one row it
    reads, so not at all), plus the whole static KV cache, which attention reads at every step."""
    head = getattr(model.head, "weight", None)
    tied = head is not None and head.data_ptr() == model.embed.data_ptr()
    seen, total = set(), 0
    for name, buffer in model.named_buffers():
        if buffer is None or buffer.data_ptr() in seen or (name == "embed" and not tied):
            continue
        seen.add(buffer.data_ptr())
        total += buffer.numel() * buffer.element_size()
    a = model.arch
    return total + 2 * a.num_layers * a.num_kv_heads * a.head_dim * cache_positions * model.dtype.itemsize


def _weights_in(module) -> int:
    """Weights of one runtime linear (or of each part of a Concat)."""
    if hasattr(module, "parts"):
        return sum(_weights_in(p) for p in module.parts)
    if hasattr(module, "planes"):
        return module.planes.shape[0] * module.in_features
    return module.weight.numel()


def prefill_flops(model, tokens: int) -> tuple[float, float]:
    """(FLOPs of the linears, attention FLOPs) of a causal prefill that computes the last position's logits."""
    a = model.arch
    block = model.blocks[0]
    per_layer = sum(_weights_in(m) for m in (block.qkv, block.o, block.gate_up, block.down))
    linear = 2.0 * tokens * per_layer * a.num_layers + 2.0 * a.hidden_size * a.vocab_size
    attention = 2.0 * a.num_layers * tokens * tokens * a.num_heads * a.head_dim  # causal: half of 4 L² H D
    return linear, attention


def sweep(runtime, prompt_tokens: int, new_tokens: int, repeats: int, batch_sizes: list[int]) -> list[dict]:
    """Decode tok/s of all sequences together at each batch size (one Generator, cache and graph, per size)."""
    from ptqlab.runtime import Generator

    out = []
    for size in batch_sizes:
        ids = torch.randint(0, runtime.arch.vocab_size, (size, prompt_tokens), device="cuda")
        generator = Generator(runtime, size, prompt_tokens + new_tokens)
        generator.timed(ids, 8)  # capture + warm-up
        runs = [generator.timed(ids, new_tokens) for _ in range(repeats)]
        out.append({"batch": size, "decode_tok_s": statistics.median(size * (new_tokens - 1) / r["decode_s"] for r in runs),
                    "throughput_tok_s": statistics.median(size * new_tokens / r["total_s"] for r in runs)})
        del generator
        runtime.drop_cache()
        torch.cuda.empty_cache()
    return out


def measure(runtime, prompt_tokens: int, new_tokens: int, prefill_tokens: int, repeats: int) -> dict:
    from ptqlab.runtime import Generator

    vocab = runtime.arch.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), device="cuda")
    generator = Generator(runtime, 1, prompt_tokens + new_tokens)
    generator.timed(ids, 8)  # capture + warm-up
    runs = [generator.timed(ids, new_tokens) for _ in range(repeats)]
    decode_tok_s = statistics.median((new_tokens - 1) / r["decode_s"] for r in runs)
    ttft_ms = 1e3 * statistics.median(r["ttft_s"] for r in runs)
    cache = generator.max_length
    runtime.drop_cache()
    long_ids = torch.randint(0, vocab, (1, prefill_tokens), device="cuda")
    with torch.no_grad():
        prefill_ms = median_ms(lambda: runtime(long_ids, last_only=True), repeats=repeats + 2, warmup=2)
    return {"decode_tok_s": decode_tok_s, "ttft_ms": ttft_ms, "cache_positions": cache,
            "prefill_ms": prefill_ms, "prefill_tok_s": prefill_tokens / (prefill_ms / 1e3), "runs": runs}


def transformers_decode(shape: str, seed: int, prompt_tokens: int, new_tokens: int) -> float:
    """The ordinary path for comparison: HF bf16 model, greedy loop with its dynamic cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptqlab.measure.speed import greedy_decode

    model_type, params = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, prompt_tokens), device="cuda")
    greedy_decode(model, ids, 8, torch.cuda.synchronize)
    runs = [greedy_decode(model, ids, new_tokens, torch.cuda.synchronize) for _ in range(2)]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median((new_tokens - 1) / r["decode_s"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", action="store_true", help="time the int4 kernel on the shape's layers first")
    parser.add_argument("--transformers", action="store_true", help="also time plain transformers bf16 decode")
    parser.add_argument("--batch-sizes", default="", help="also a decode sweep at these batch sizes, e.g. 1,8,32, and "
                        "the fastest scheme at each (the report's crossover rule)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    start_run = time.perf_counter()
    ceilings = device_ceilings()
    print(f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ceilings['bf16_flops'] / 1e12:.0f} TFLOP/s, "
          f"fp8 {ceilings['fp8_flops'] / 1e12:.0f} TFLOP/s, int8 {ceilings['int8_ops'] / 1e12:.0f} TOP/s", flush=True)
    kernel_rows = kernel_table(args.shape) + kernel_table(args.shape, rows=8) if args.kernels else None
    results = {}
    for scheme in args.schemes.split(","):
        options = OPTIONS.get(scheme, RuntimeOptions())
        start = time.perf_counter()
        runtime = build_runtime(args.shape, SCHEMES[scheme], args.seed, args.prompt_tokens + args.new_tokens + args.prefill_tokens,
                                options)
        build_s = time.perf_counter() - start
        measured = measure(runtime, args.prompt_tokens, args.new_tokens, args.prefill_tokens, args.repeats)
        if batch_sizes:
            measured["sweep"] = sweep(runtime, args.prompt_tokens, args.new_tokens, args.repeats, batch_sizes)
            print(f"{scheme}: " + ", ".join(f"batch {s['batch']} {s['decode_tok_s']:.0f} tok/s" for s in measured["sweep"]),
                  flush=True)
        nbytes = decode_bytes(runtime, measured["cache_positions"])
        floor_tok_s = ceilings["copy_bytes_per_s"] / nbytes
        linear, attention = prefill_flops(runtime, args.prefill_tokens)
        floor_prefill_s = linear / ceilings[RATE[scheme]] + attention / ceilings["bf16_flops"]
        if measured.get("sweep"):
            measured["batch_decode_tok_s"] = {str(p["batch"]): p["decode_tok_s"] for p in measured["sweep"]}
        choices = getattr(runtime, "kernel_choices", {})
        if choices:
            from ptqlab.runtime.choice import print_table

            print(f"{scheme}: kernel choice table (measured once per device and shape, cached)\n{print_table(choices)}",
                  flush=True)
        results[scheme] = {**measured, "kernels": runtime.kernels, "kernel_choices": choices, "options": asdict(options),
                           "decode_bytes": nbytes,
                           "decode_floor_tok_s": floor_tok_s,
                           "decode_fraction_of_floor": measured["decode_tok_s"] / floor_tok_s,
                           "prefill_flops": linear + attention,
                           "prefill_floor_tok_s": args.prefill_tokens / floor_prefill_s,
                           "prefill_fraction_of_floor": floor_prefill_s / (measured["prefill_ms"] / 1e3),
                           "peak_memory_bytes": torch.cuda.max_memory_allocated(), "build_s": build_s}
        del runtime
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r = results[scheme]
        print(f"{scheme:22s} decode {r['decode_tok_s']:8.1f} tok/s ({100 * r['decode_fraction_of_floor']:4.1f} % of "
              f"{r['decode_floor_tok_s']:.0f})  prefill {r['prefill_tok_s']:9.0f} tok/s ({100 * r['prefill_fraction_of_floor']:4.1f} %"
              f" of {r['prefill_floor_tok_s']:.0f})  ttft {r['ttft_ms']:.2f} ms", flush=True)
    hf = transformers_decode(args.shape, args.seed, args.prompt_tokens, args.new_tokens) if args.transformers else None
    base = results.get("bf16")
    print(f"\n{'scheme':22s} {'decode tok/s':>12s} {'% floor':>8s} {'x bf16':>7s} {'prefill tok/s':>14s} {'% floor':>8s} {'x bf16':>7s}")
    for scheme, r in results.items():
        dx = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        px = r["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
        print(f"{scheme:22s} {r['decode_tok_s']:12.1f} {100 * r['decode_fraction_of_floor']:7.1f}% {dx:6.2f}x "
              f"{r['prefill_tok_s']:14.0f} {100 * r['prefill_fraction_of_floor']:7.1f}% {px:6.2f}x")
    if hf is not None:
        print(f"transformers bf16 decode (plain generate loop): {hf:.1f} tok/s")
    crossover = None
    if batch_sizes:
        from ptqlab.recommend import crossover_words, fastest_by_batch

        swept = [{"name": scheme, "speed": {"sweep": r["sweep"]}} for scheme, r in results.items()]
        crossover = {"fastest_by_batch": fastest_by_batch(swept), "words": crossover_words(fastest_by_batch(swept))}
        print(f"\ndecode tok/s by batch size: {crossover['words']}")
    if args.out:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            pass
        record = {"shape": args.shape, "device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": versions, "settings": vars(args) | {"out": str(args.out)}, "ceilings": ceilings,
                  "kernel_table": kernel_rows, "results": results, "transformers_bf16_decode_tok_s": hf,
                  "crossover": crossover, "command": " ".join(sys.argv), "seconds": time.perf_counter() - start_run}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
