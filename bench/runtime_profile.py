"""Where a decode step's time goes, before any kernel is written: per scheme and batch size, the GPU time of every
kernel in one decode step (torch profiler over CUDA-graph replays), next to the step's bytes over the measured copy
bandwidth; and one layer's matmul per implementation at 1, 8 and 32 rows on the shape's four layers: ptqlab's
kernels, cuBLAS, PyTorch's tinygemm, and the field's maintained libraries where importable (gemlite's Triton
kernels, torchao's int4 / fp8 / int8 paths), side by side in one process.

    python bench/runtime_profile.py --shape llama-3-8b --out bench/results/runtime_profile_llama-3-8b.json

Each matmul is timed as in bench/runtime_speed.py: called over copies of its weights adding up to 4x L2 inside one
CUDA graph (as a model's layers miss L2), median of 10 replays. Its error is against float64 on the weight that
implementation stores (grid values times scales where it exposes them, else the bf16 weight it was made from:
then the error includes its quantization).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_speed import SHAPES
from runtime_speed import SCHEMES, build_runtime, device_ceilings, graph_us

from ptqlab.runtime.kernels import RuntimeOptions

CATEGORIES = [  # (category, regex over the kernel name), first match wins
    ("int4 matmul", r"_int4_(gemv|small_m)|int4pack|_scaled_matmul_kernel.*INT4"),
    ("int4 dequantize", r"_int4_dequant"),
    ("8-bit matmul", r"_scaled_matmul|_fp8_block_gemv|_scaled_gemv|_scaled_small_m|_int8_gemv|sm90.*(e4m3|f8|s8|i8)"
                     r"|(e4m3|fp8|i8|s8|int8).*gemm|gemm.*(e4m3|fp8|i8|s8|int8)|cutlass.*(e4m3|s8)"),
    ("bf16 matmul", r"gemm|gemv|nvjet|sm90_xmma|cutlass|Kernel2|splitKreduce|cublas"),
    ("split-K sum", r"_sum_splits"),
    ("int8 epilogue", r"_int8_epilogue"),
    ("activation quantize", r"_token_quant|_group_quant|_gated_act_quant"),
    ("attention", r"_decode_attention|_decode_combine|flash|attention|sdpa"),
    ("norm", r"_rms_norm"),
    ("gated activation", r"_gated_act"),
    ("rope / cache", r"_rope"),
    ("argmax / sampling", r"_argmax|argmax"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def _device_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profile_step(runtime, batch: int, prompt_tokens: int, steps: int) -> dict:
    """GPU time per kernel per decode step at `batch` rows (graph replays under the profiler; eager steps if the
    profiler sees no kernel inside the graph), and the step's wall time outside the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from ptqlab.runtime import Generator

    ids = torch.randint(0, runtime.arch.vocab_size, (batch, prompt_tokens), device="cuda")
    generator = Generator(runtime, batch, prompt_tokens + 2 * steps + 16)
    generator.timed(ids, 8)  # capture + warm-up
    walls = [generator.timed(ids, steps + 1)["decode_s"] / steps for _ in range(3)]
    generator.prefill(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generator.decode(steps)
        torch.cuda.synchronize()
    kernels = {e.key: _device_us(e) / steps for e in prof.key_averages() if _device_us(e) > 0}
    source = "graph"
    if sum(kernels.values()) < 1e-3:
        source = "eager"
        generator.prefill(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                generator._step()
            torch.cuda.synchronize()
        kernels = {e.key: _device_us(e) / steps for e in prof.key_averages() if _device_us(e) > 0}
    del generator
    runtime.drop_cache()
    torch.cuda.empty_cache()
    by_category = defaultdict(float)
    for name, us in kernels.items():
        by_category[category(name)] += us
    return {"batch": batch, "step_wall_us": 1e6 * statistics.median(walls), "source": source,
            "kernel_sum_us": sum(kernels.values()), "by_category_us": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "kernels_us": dict(sorted(kernels.items(), key=lambda kv: -kv[1]))}


def step_bytes(runtime, batch: int, cache_positions: int) -> int:
    """Bytes a decode step must read: every distinct weight buffer once (the untied embedding not at all) and the
    KV cache of every row."""
    from runtime_speed import decode_bytes

    a = runtime.arch
    kv_one_row = 2 * a.num_layers * a.num_kv_heads * a.head_dim * cache_positions * runtime.dtype.itemsize
    return decode_bytes(runtime, cache_positions) + (batch - 1) * kv_one_row


# --- one layer's matmul, per implementation --------------------------------------------------------------------------

def _ptqlab_impls(w: torch.Tensor) -> dict:
    """name -> (function of x, the float64 weight it computes with[, the rows it serves]) for each kernel of ptqlab's
    layers built from w [N, K]."""
    from ptqlab.quant.linear import rtn
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime.linear import Fp8Linear, Int4Linear, Int8Linear

    out = {}
    q, scale, _ = rtn(w, get_recipe("w4a16").scheme.weights, torch.bfloat16)
    ref4 = (q.double().unflatten(1, (-1, 128)) * scale.double().unsqueeze(-1)).flatten(1)
    opts = RuntimeOptions()
    serves = {"gemv": (1,), "small-m": tuple(range(2, 17))}
    from ptqlab.runtime.small_batch import TILES

    tiled = [f"small-batch {tile}" for tile in TILES]
    for kernel in ("gemv", *tiled, "small-m", "dequantize+cublas"):
        def make(kernel=kernel):
            layer = Int4Linear(q, scale, None, None, opts.gemv_tile, opts.pdl, torch.bfloat16)
            return lambda x: layer(x, kernel)
        out[f"ptqlab int4 {kernel}"] = (make, ref4, serves.get(kernel))
    amax = w.float().abs().amax(1, keepdim=True)
    s8 = (amax / 448).float()
    w8 = (w.float() / s8).to(torch.float8_e4m3fn)
    si = (amax / 127).float()
    wi = torch.round(w.float() / si).clamp(-128, 127).to(torch.int8)
    for kernel in (*tiled, "cublas"):
        def make8(kernel=kernel):
            layer = Fp8Linear(w8, s8, None, torch.bfloat16, True)
            return lambda x: layer(x, kernel)

        def makei(kernel=kernel):
            layer = Int8Linear(wi, si, None, torch.bfloat16)
            return lambda x: layer(x, kernel)
        out[f"ptqlab fp8 {kernel}"] = (make8, w8.double() * s8.double(), None)
        out[f"ptqlab int8 {kernel}"] = (makei, wi.double() * si.double(), None)
    tiny_u = (q.to(torch.int32) + 8)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack((tiny_u[:, ::2] << 4 | tiny_u[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([scale.T, torch.zeros_like(scale.T)], -1).contiguous()

        def tinygemm():
            p = packed.clone()
            return lambda x: torch.ops.aten._weight_int4pack_mm(x, p, 128, sz)
        out["torch tinygemm int4"] = (tinygemm, ref4, None)
    except RuntimeError:
        pass
    return out


def _gemlite_impls(w: torch.Tensor) -> dict:
    import gemlite
    from gemlite.helper import A8W8_fp8_dynamic, A8W8_int8_dynamic, A16W8_FP8, A16Wn

    from ptqlab.quant.linear import rtn
    from ptqlab.recipes import get_recipe

    q, scale, _ = rtn(w, get_recipe("w4a16").scheme.weights, torch.bfloat16)
    ref4 = (q.double().unflatten(1, (-1, 128)) * scale.double().unsqueeze(-1)).flatten(1)
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    zeros = torch.full_like(scale, 8)
    out = {
        "gemlite int4 (A16W4)": (lambda: A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
            u.clone(), scale, zeros, 4, 128), ref4, None),
        "gemlite fp8 dynamic (A8W8)": (lambda: A8W8_fp8_dynamic(device="cuda", dtype=torch.bfloat16).from_weights(
            w.clone()), w.double(), None),
        "gemlite int8 dynamic (A8W8)": (lambda: A8W8_int8_dynamic(device="cuda", dtype=torch.bfloat16).from_weights(
            w.clone()), w.double(), None),
        "gemlite fp8 weight-only (A16W8)": (lambda: A16W8_FP8(device="cuda", dtype=torch.bfloat16).from_weights(
            w.clone()), w.double(), None),
    }
    del gemlite
    return out


def _torchao_impls(w: torch.Tensor) -> dict:
    from torch import nn
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig, PerRow, quantize_

    def make(config):
        def build():
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
            layer.weight.data.copy_(w)
            quantize_(layer, config)
            return layer
        return build

    # torchao's int8 dynamic path is left out: its forward cannot be captured in a CUDA graph here (capture
    # invalidated, torch 2.11 / torchao 0.17), and a failed capture leaves the process unable to go on.
    configs = {"torchao fp8 dynamic per-row": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}
    for fmt in ("tile_packed_to_4d", "plain"):
        try:
            configs[f"torchao int4 ({fmt})"] = Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt)
        except TypeError:
            configs["torchao int4"] = Int4WeightOnlyConfig(group_size=128)
            break
    return {name: (make(config), w.double(), None) for name, config in configs.items()}


def layer_table(shape: str, rows_list: list[int], libraries: dict) -> list[dict]:
    _, p = SHAPES[shape]
    h, i = p["hidden_size"], p["intermediate_size"]
    kv = p["num_key_value_heads"] * h // p["num_attention_heads"]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    table = []
    for role, (n, k) in {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        makers = {"bf16 F.linear (cuBLAS)": (lambda: (lambda x, c=w.clone(): F.linear(x, c)), w.double(), None)}
        for lib, factory in [("ptqlab", _ptqlab_impls), *libraries.items()]:
            try:
                makers.update(factory(w))
            except Exception as e:  # a library that does not import or build here: say so, measure the rest
                print(f"  {lib}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
                libraries_failed[lib] = f"{type(e).__name__}: {e}"[:500]
        for name, (make, ref_w, serves) in makers.items():
            try:
                first = make()
                size = nominal_bytes(name, n, k)
                count = max(2, -(-4 * l2 // size))
                fns = [first] + [make() for _ in range(count - 1)]
            except Exception as e:
                print(f"  {role} {name}: build failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                table.append({"role": role, "n": n, "k": k, "impl": name, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            for rows in rows_list:
                if serves is not None and rows not in serves:
                    continue
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                row = {"role": role, "n": n, "k": k, "rows": rows, "impl": name, "weight_bytes": size}
                try:
                    with torch.no_grad():
                        y = fns[0](x)
                        ref = x.double() @ ref_w.T
                        row["rel_err"] = float((y.double() - ref).norm() / ref.norm())
                        row["us"] = graph_us([partial(f, x) for f in fns])
                    row["weight_tb_s"] = size / row["us"] / 1e6
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                table.append(row)
                if "us" in row:
                    print(f"  {role:8s} [{rows:2d} x {k}] @ [{k} x {n}]ᵀ {name:34s} {row['us']:8.1f} us "
                          f"{row['weight_tb_s']:5.2f} TB/s err {row['rel_err']:.2e}", flush=True)
                else:
                    print(f"  {role:8s} rows {rows} {name}: {row['error'][:160]}", flush=True)
            del fns, first
            gc.collect()
            torch.cuda.empty_cache()
    return table


libraries_failed: dict[str, str] = {}


def nominal_bytes(impl: str, n: int, k: int) -> int:
    """The weight bytes an implementation must read: its values at their width plus one 16-bit scale per group of
    128 (int4) or per row (8-bit)."""
    if "int4" in impl:
        return n * k // 2 + 2 * n * (k // 128)
    if "bf16" in impl:
        return 2 * n * k
    return n * k + 4 * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--schemes", default="bf16,fp8-dynamic,w8a8,w4a16")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layer-rows", default="1,8,32")
    parser.add_argument("--no-steps", action="store_true", help="only the per-layer table")
    parser.add_argument("--no-layers", action="store_true", help="only the decode-step profiles")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    ceilings = device_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 {ceilings['bf16_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    steps = {}
    if not args.no_steps:
        for scheme in args.schemes.split(","):
            runtime = build_runtime(args.shape, SCHEMES[scheme], 0, 2048, RuntimeOptions())
            steps[scheme] = []
            for batch in batches:
                prof = profile_step(runtime, batch, args.prompt_tokens, args.steps)
                cache = args.prompt_tokens + 2 * args.steps + 16
                from ptqlab.runtime.model import cache_length

                nbytes = step_bytes(runtime, batch, cache_length(cache))
                prof["step_bytes"] = nbytes
                prof["floor_us"] = 1e6 * nbytes / ceilings["copy_bytes_per_s"]
                steps[scheme].append(prof)
                top = ", ".join(f"{c} {us:.0f}" for c, us in list(prof["by_category_us"].items())[:6])
                print(f"{scheme:12s} batch {batch:2d}: step {prof['step_wall_us']:7.0f} us (kernels {prof['kernel_sum_us']:.0f}, "
                      f"floor {prof['floor_us']:.0f}, {prof['source']}): {top}", flush=True)
            del runtime
            gc.collect()
            torch.cuda.empty_cache()
    layers = None
    if not args.no_layers:
        libraries = {}
        try:
            import gemlite

            if torch.cuda.get_device_properties(0).name.lower().find("h100") < 0:  # its shipped tuning for Hopper
                gemlite.load_config(str(Path(gemlite.__file__).parent / "configs" / "h100.json"))
            libraries["gemlite"] = _gemlite_impls
        except Exception as e:
            libraries_failed["gemlite"] = f"{type(e).__name__}: {e}"[:500]
        try:
            import torchao  # noqa: F401

            libraries["torchao"] = _torchao_impls
        except Exception as e:
            libraries_failed["torchao"] = f"{type(e).__name__}: {e}"[:500]
        layers = layer_table(args.shape, [int(r) for r in args.layer_rows.split(",")], libraries)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for lib in ("triton", "gemlite", "torchao"):
        try:
            versions[lib] = __import__(lib).__version__
        except Exception:
            pass
    record = {"shape": args.shape, "device": torch.cuda.get_device_name(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions,
              "command": " ".join(sys.argv), "settings": vars(args) | {"out": str(args.out)}, "ceilings": ceilings,
              "decode_steps": steps, "layers": layers, "libraries_not_measured": libraries_failed,
              "seconds": time.perf_counter() - start}
    if layers:
        print("\nfastest per (layer, rows):")
        best = {}
        for row in layers:
            if "us" in row:
                key = (row["role"], row["rows"])
                if key not in best or row["us"] < best[key]["us"]:
                    best[key] = row
        for (role, rows), row in best.items():
            bf16 = next(r["us"] for r in layers if r.get("rows") == rows and r["role"] == role and r["impl"].startswith("bf16"))
            print(f"  {role:8s} rows {rows:2d}: {row['impl']:34s} {row['us']:7.1f} us ({bf16 / row['us']:.2f}x bf16)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
