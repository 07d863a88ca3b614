"""Block-wise FP8 and W4A8 kernels on a GPU: every kernel checked against float64, then each layer of the Llama-3-8B
shape timed against its alternative, then the whole model's batch-1 decode and prefill.

    python bench/format_kernels.py --check        # seconds: every new kernel against float64 on this GPU, then stop
    python bench/format_kernels.py --out bench/results/format_kernels_h200.json      # check, layers, model

Check (always first; any failure, or a kernel that does not compile, stops the run with the error): the group
quantizer bitwise against primitives.fake_quantize (strategy group) on this GPU; fp8_block_gemv (one row),
fp8_block_matmul and w4a8_matmul at 1-300 rows, and the one-row int4 kernel on FP8 input, against the float64
product of the same grid values, elementwise within 2^-11 Σ|x w| (Hopper's FP8 tensor cores accumulate a K tile of
128 with reduced precision; everything else is fp32) or the one-row int4 kernel's own bound; int4_to_fp8 exactly;
cuBLAS's block-wise `_scaled_mm` in the layouts the runtime passes (1 x 128 weight scales within the same bound,
128 x 128 blocks within 2^-8, the accuracy of fast accumulation), and the runtime's own probe of it, which picks the
prefill path; the runtime's Fp8BlockLinear and W4A8Linear against the dequantized reference layer.

Layers (random weights of the 8B shapes: 4096 x 4096, 14336 x 4096, 4096 x 14336 as [out, in]): each runtime layer
checked against the float64 product of its format, then timed: decode (1 and 16 rows) in CUDA graphs over weight
copies larger than L2, as the layers of a model read them (W4A8 also with its input already on the FP8 grid, as the
fused norm hands it over; the one-row block-wise FP8 kernel in several tiles); prefill (2048 rows) as the median of
repeats, with the Triton matmuls that are the fallback where torch lacks block-wise scales and cuBLAS's alone.
fp8-block against fp8-dynamic (per-token FP8, `_scaled_mm`) and bf16; w4a8 against w4a16 (same int4 weight; prefill
dequantizes into bf16 cuBLAS) and fp8-dynamic. Model: the Llama-3-8B shape quantized in memory with fp8-dynamic,
fp8-block, w4a16-rtn and w4a8-rtn (data-free: the formats the calibrated recipes write; speed does not depend on the
values), loaded by ptqlab.runtime: batch-1 decode tok/s (CUDA graph) and 2048-token prefill tok/s; a layer that fell
back to the dequantized path fails the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_speed import build_runtime, graph_us, measure, median_ms  # noqa: E402

from ptqlab.quant import token_triton  # noqa: E402
from ptqlab.quant.linear import rtn  # noqa: E402
from ptqlab.quant.primitives import dequantize, fake_quantize  # noqa: E402
from ptqlab.runtime import fp8_kernels, int4_kernels, kernels# noqa: E402
from ptqlab.runtime.kernels import RuntimeOptions  # noqa: E402
from ptqlab.runtime.linear import StoredLinear, build_linear  # noqa: E402
from ptqlab.schemes import QuantArgs, Scheme  # noqa: E402

ACT_GROUPS = QuantArgs(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True)
ACT_TOKENS = QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True)
SCHEMES = {
    "fp8-dynamic": Scheme(QuantArgs(num_bits=8, type="float", strategy="channel"), ACT_TOKENS),
    "fp8-block": Scheme(QuantArgs(num_bits=8, type="float", strategy="block", block_structure=(128, 128)), ACT_GROUPS),
    "w4a16": Scheme(QuantArgs(num_bits=4, strategy="group", group_size=128)),
    "w4a8": Scheme(QuantArgs(num_bits=4, strategy="group", group_size=128), ACT_TOKENS),
}
KERNELS = {"fp8-dynamic": "fp8 _scaled_mm", "fp8-block": "fp8-block triton", "w4a16": "int4 triton",
           "w4a8": "w4a8 triton"}
"""The kernel name (its start) each scheme's runtime layer must report: a fallback to the dequantized path fails."""
RECIPES = {"fp8-dynamic": "fp8-dynamic", "fp8-block": "fp8-block", "w4a16": "w4a16-rtn", "w4a8": "w4a8-rtn"}
LAYER_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
"""[out, in] of the 8B shape's matmuls: attention's output projection, one half of gate_up, down."""
GPU_TILE_BOUND = 2.0 ** -11
"""Elementwise error bound on the GPU, times Σ|x w|: FP8 tensor-core tiles accumulate with reduced precision."""
FAST_ACCUM_BOUND = 2.0 ** -8
"""The same for cuBLAS's block-wise matmul with 128 x 128 weight blocks, whose accumulation is not promoted to fp32
per tile (errors near 2^-10 seen on an H200), like _scaled_mm's fast accumulation that fp8-dynamic uses."""


def fail(message: str) -> None:
    raise SystemExit(f"CHECK FAILED: {message}")


def exact(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Grid values times their scales in float64."""
    return (q.double().unflatten(-1, (-1, group)) * scale.double().unsqueeze(-1)).flatten(-2)


def excess(y: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor, bound: float) -> float:
    """max |y - reference| / magnitude, over `bound` (> 1: out of bounds); the output's rounding allowed besides."""
    rounding = torch.finfo(y.dtype).eps / 2 * reference.abs()
    return float(((y.double() - reference).abs() - rounding).clamp(min=0).div(magnitude.clamp(min=1e-30)).max() / bound)


def layer_weights(n: int, k: int, seed: int = 0) -> dict:
    """One random bf16 weight in each format: StoredLinear per scheme, and the float64 dequantized weight."""
    torch.manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    out = {}
    for name, scheme in SCHEMES.items():
        q, scale, zero = rtn(w, scheme.weights, torch.bfloat16)
        weight = dequantize(q, scale, zero, scheme.weights, torch.float64)
        out[name] = (StoredLinear(q, None, scheme, scale, zero), weight)
    out["bf16"] = (StoredLinear(w), w.double())
    return out


def copy_of(stored: StoredLinear) -> StoredLinear:
    """The same layer in new memory (a model's layers each have their own weights, which miss L2 in turn)."""
    clone = [None if t is None else t.clone() for t in (stored.weight, stored.bias, stored.scale, stored.zero_point)]
    return StoredLinear(clone[0], clone[1], stored.scheme, clone[2], clone[3])


def copies_past_l2(nbytes: int) -> int:
    """How many layers of `nbytes` add up to at least 4x the L2 cache (at least 2)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // nbytes))


def reference_output(name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The format's product in float64: x on its activation grid (primitives, on this GPU), exact times the weight."""
    scheme = SCHEMES.get(name)
    if scheme is not None and scheme.input_activations is not None:
        x = fake_quantize(x.float(), scheme.input_activations)
    return x.double().reshape(-1, x.shape[-1]) @ weight.T


def probe_torch_blockwise() -> dict:
    """What this torch's _scaled_mm does with block-wise scales (activations 1 x 128; weights 128 x 128 as
    block-wise FP8 stores them, or 1 x 128 as W4A8's groups give them), in the layout the runtime passes
    (fp8_kernels.cublas_weight_scale) and in the other one, against float64 (128 x 128: within FAST_ACCUM_BOUND, the
    accuracy of _scaled_mm's fast accumulation; 1 x 128: within the Triton kernels' own bound); and what the
    runtime's own probe (fp8_kernels.blockwise_scaled_mm_works) decided, which picks the prefill path."""
    n, k, m = 384, 1024, 40
    torch.manual_seed(5)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, x_scale = fp8_kernels.quantize_groups(x)
    inputs = exact(q, x_scale, 128)
    result = {}
    for name, block_rows in (("fp8-block", 128), ("w4a8", 1)):
        stored, weight = layer_weights(n, k, seed=5)[name]
        if name == "w4a8":
            w8 = fp8_kernels.int4_to_fp8(int4_kernels.int4_planes(stored.weight, 16), k)
            if not torch.equal(w8.float(), stored.weight.float()):
                fail("int4_to_fp8 does not give the int4 grid values")
        else:
            w8 = stored.weight
        w_scale = stored.scale.float()
        runtime_layout = fp8_kernels.cublas_weight_scale(w_scale, block_rows)
        other = w_scale.t().contiguous() if block_rows > 1 else w_scale.t()
        device = torch.cuda.current_device()
        outcome = {"runtime_probe": fp8_kernels.blockwise_scaled_mm_works(device, block_rows, n, k)}
        for layout, scale_b in (("runtime layout", runtime_layout), ("other layout", other)):
            try:
                y = fp8_kernels.scaled_mm_blockwise(q, x_scale, w8, scale_b, torch.float32)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                outcome[layout] = str(e).splitlines()[0][:300]
                continue
            bound = FAST_ACCUM_BOUND if block_rows > 1 else GPU_TILE_BOUND
            ratio = excess(y, inputs @ weight.T, inputs.abs() @ weight.abs().T, bound)
            outcome[f"{layout}: fraction of the bound"] = ratio
            outcome[layout] = "right" if ratio <= 1 else f"wrong values: {ratio:.3g} x the bound"
        if outcome["runtime_probe"] and outcome["runtime layout"] != "right":
            fail(f"{name}: the runtime takes cuBLAS's block-wise matmul, which gives {outcome['runtime layout']}")
        result[name] = outcome
    return result


def check() -> dict:
    """Every new kernel against float64 on this GPU; SystemExit at the first failure."""
    started = time.perf_counter()
    results = {}
    torch.manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16) * 3
    x[0, :128] = 0
    x[5, 17] = 900.0
    q, scale = fp8_kernels.quantize_groups(x)
    grouped = (q.float().unflatten(-1, (-1, 128)) * scale.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    mismatches = int((grouped != fake_quantize(x, ACT_GROUPS)).sum())
    results["quantize_groups_mismatches"] = mismatches
    if mismatches:
        fail(f"quantize_groups differs from primitives.fake_quantize (strategy group) in {mismatches} values")
    worst = {}
    for n, k in ((384, 1024), (200, 512), (4096, 4096)):
        weights = layer_weights(n, k, seed=n)
        (fp8_block, w_fp8), (w4a8, w_int4) = weights["fp8-block"], weights["w4a8"]
        w_scale = fp8_block.scale.float()
        planes = int4_kernels.int4_planes(w4a8.weight, 16)
        for rows in (1, 3, 16, 17, 64, 300):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            q, x_scale = fp8_kernels.quantize_groups(x)
            inputs = exact(q, x_scale, 128)
            cases = {"fp8_block_matmul": (fp8_kernels.fp8_block_matmul(q, x_scale, fp8_block.weight, w_scale, 128,
                                                                        None, torch.float32), inputs, w_fp8)}
            if rows == 1:
                y = fp8_kernels.fp8_block_gemv(q, x_scale, fp8_block.weight, w_scale, 128, None, torch.float32)
                cases["fp8_block_gemv"] = (y, inputs, w_fp8)
            tokens = token_triton.quantize_tokens(x, token_triton.FP8_TOKENS)
            token_inputs = exact(tokens.q, tokens.scale, k)
            cases["w4a8_matmul"] = (fp8_kernels.w4a8_matmul(tokens.q, tokens.scale, planes, w4a8.scale, None,
                                                             torch.float32), token_inputs, w_int4)
            for name, (y, inputs, weight) in cases.items():
                ratio = excess(y, inputs @ weight.T, inputs.abs() @ weight.abs().T, GPU_TILE_BOUND)
                worst[name] = max(worst.get(name, 0.0), ratio)
                if ratio > 1:
                    fail(f"{name} at {rows} x {k} -> {n}: {ratio:.3g} x the bound")
            if rows == 1:  # the one-row int4 kernel on the FP8 grid (its sums are biased: a looser bound)
                y = int4_kernels.int4_gemv(tokens.q[:1], planes, w4a8.scale, None, x_scale=tokens.scale,
                                      out_dtype=torch.float32)
                magnitude = token_inputs.abs() @ w4a8.scale.double().repeat_interleave(128, -1).T
                ratio = excess(y, token_inputs @ w_int4.T, magnitude, 3e-3)
                worst["int4_gemv on FP8 input"] = max(worst.get("int4_gemv on FP8 input", 0.0), ratio)
                if ratio > 1:
                    fail(f"int4_gemv on FP8 input at {k} -> {n}: {ratio:.3g} x the bound")
    results["worst_fraction_of_bound"] = worst
    layers = {}
    for name in ("fp8-block", "w4a8"):
        stored, _ = layer_weights(384, 1024, seed=7)[name]
        stored.bias = torch.randn(384, device="cuda", dtype=torch.bfloat16)
        fast = build_linear(stored, torch.bfloat16)
        if not fast.kernel.startswith(KERNELS[name]):
            fail(f"{name}: build_linear gave {fast.kernel!r}, not {KERNELS[name]!r}")
        # The dequantized reference layer (what the runtime ran before: fake-quantized x times the weight), in fp32.
        slow = build_linear(StoredLinear(stored.weight.cpu(), stored.bias.cpu(), stored.scheme, stored.scale.cpu()),
                            torch.float32)
        for rows in (1, 8, 40):
            x = torch.randn(1, rows, 1024, device="cuda", dtype=torch.bfloat16)
            expected = slow(x.float().cpu()).double()
            error = float((fast(x).cpu().double() - expected).norm() / expected.norm())
            layers[f"{name} x {rows}"] = error
            if error > 1e-2:
                fail(f"{name} layer at {rows} rows: relative error {error:.3g} against the dequantized layer")
    results["layers_relative_error"] = layers
    results["torch_blockwise_scaled_mm"] = probe_torch_blockwise()
    results["seconds"] = time.perf_counter() - started
    return results


GEMV_TILES = [fp8_kernels.GEMV_TILE, (32, 4, 8), (16, 4, 8), (64, 4, 8), (32, 4, 4)]
"""(outputs, warps, programs per multiprocessor) tried for the one-row block-wise FP8 kernel; the first is its
default."""


def layer_table(rows_list=(1, 16, 2048)) -> list[dict]:
    """Each scheme's runtime layer at the 8B shapes, checked, then timed."""
    table = []
    for n, k in LAYER_SHAPES:
        weights = layer_weights(n, k)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"n": n, "k": k, "rows": rows}
            for name in ("bf16", "fp8-dynamic", "fp8-block", "w4a16", "w4a8"):
                stored, weight = weights[name]
                layer = build_linear(stored, torch.bfloat16)
                row[f"{name}_kernel"] = layer.kernel
                y = layer(x)
                reference = reference_output(name, x, weight)
                error = float((y.double() - reference).norm() / reference.norm())
                row[f"{name}_err"] = error
                if error > 1e-2:
                    fail(f"{name} layer {rows} x {k} -> {n}: relative error {error:.3g}")
                if rows <= kernels.SMALL_M:  # decode: CUDA graph over weight copies, as a model's layers miss L2
                    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers() if b is not None)
                    copies = [layer] + [build_linear(copy_of(stored), torch.bfloat16)
                                        for _ in range(copies_past_l2(nbytes) - 1)]
                    row[f"{name}_us"] = graph_us([partial(m, x) for m in copies])
                    row[f"{name}_tb_s"] = nbytes / row[f"{name}_us"] / 1e6
                    del copies
                else:
                    row[f"{name}_us"] = 1e3 * median_ms(lambda: layer(x), repeats=20)
                    row[f"{name}_tflop_s"] = 2 * rows * n * k / row[f"{name}_us"] / 1e6
                del layer
            stored, _ = weights["w4a8"]
            w4a8 = build_linear(stored, torch.bfloat16)
            tokens = token_triton.quantize_tokens(x, token_triton.FP8_TOKENS)
            if rows <= kernels.SMALL_M:  # as in the model: the fused norm hands the kernel its FP8 input
                nbytes = w4a8.planes.numel() * 4 + w4a8.scale.numel() * 2
                copies = [w4a8] + [build_linear(copy_of(stored), torch.bfloat16)
                                   for _ in range(copies_past_l2(nbytes) - 1)]
                row["w4a8_fp8_input_us"] = graph_us([partial(m, tokens) for m in copies])
                del copies
            else:  # prefill's parts: the Triton matmuls (the fallback where torch lacks block-wise scales), cuBLAS's
                row["w4a8_fp8_input_us"] = 1e3 * median_ms(lambda: w4a8(tokens), repeats=20)
                row["w4a8_triton_us"] = 1e3 * median_ms(lambda: fp8_kernels.w4a8_matmul(
                    tokens.q, tokens.scale, w4a8.planes, w4a8.scale, None, torch.bfloat16), repeats=20)
                stored_block, _ = weights["fp8-block"]
                q, x_scale = fp8_kernels.quantize_groups(x)
                w_scale = stored_block.scale.float()
                row["fp8_block_quantize_us"] = 1e3 * median_ms(lambda: fp8_kernels.quantize_groups(x), repeats=20)
                row["fp8_block_triton_us"] = 1e3 * median_ms(lambda: fp8_kernels.fp8_block_matmul(
                    q, x_scale, stored_block.weight, w_scale, 128, None, torch.bfloat16), repeats=20)
                if fp8_kernels.blockwise_scaled_mm_works(torch.cuda.current_device(), 128, n, k):  # fast accumulation
                    scale_b = fp8_kernels.cublas_weight_scale(w_scale, 128)
                    row["fp8_block_cublas_us"] = 1e3 * median_ms(lambda: fp8_kernels.scaled_mm_blockwise(
                        q, x_scale, stored_block.weight, scale_b, torch.bfloat16), repeats=20)
            if rows == 1:  # the one-row block-wise FP8 kernel's tiles
                stored_block, _ = weights["fp8-block"]
                nbytes = stored_block.weight.numel()
                copies = [copy_of(stored_block) for _ in range(copies_past_l2(nbytes))]
                q, x_scale = fp8_kernels.quantize_groups(x)
                for tile in GEMV_TILES:
                    row[f"fp8_block_gemv_{'x'.join(map(str, tile))}_us"] = graph_us([partial(
                        fp8_kernels.fp8_block_gemv, q, x_scale, c.weight, c.scale.float(), 128, None, torch.bfloat16,
                        True, tile) for c in copies])
                del copies
            del w4a8
            table.append(row)
            unit = "us" if rows <= kernels.SMALL_M else "us (prefill)"
            print(f"[{rows:5d} x {k:5d}] -> {n:5d} {unit}: " + ", ".join(
                f"{key[:-3]} {value:.1f}" for key, value in row.items() if key.endswith("_us")), flush=True)
        del weights
        gc.collect()
        torch.cuda.empty_cache()
    return table


def model_table(shape: str, prompt_tokens: int, new_tokens: int, prefill_tokens: int, repeats: int) -> dict:
    results = {}
    for name, recipe in RECIPES.items():
        start = time.perf_counter()
        runtime = build_runtime(shape, recipe, 0, prompt_tokens + new_tokens + prefill_tokens, RuntimeOptions())
        build_s = time.perf_counter() - start
        wrong = {role: kernel for role, kernel in runtime.kernels.items()
                 if role != "lm_head" and not kernel.startswith(KERNELS[name])}
        if wrong:
            fail(f"{name}: the model's layers did not take the kernel {KERNELS[name]!r}: {wrong}")
        measured = measure(runtime, prompt_tokens, new_tokens, prefill_tokens, repeats)
        results[name] = {**measured, "kernels": runtime.kernels, "build_s": build_s}
        print(f"{name:12s} decode {measured['decode_tok_s']:7.1f} tok/s  prefill "
              f"{measured['prefill_tok_s']:8.0f} tok/s", flush=True)
        del runtime
        gc.collect()
        torch.cuda.empty_cache()
    return results


def print_tables(layers: list[dict], model: dict | None) -> None:
    names = ("bf16", "fp8-dynamic", "fp8-block", "w4a16", "w4a8", "w4a8_fp8_input")
    header = "".join(f"{n.replace('_fp8_input', ' fp8-in'):>13s}" for n in names)
    print(f"\n{'layer, us: rows x in -> out':30s}{header}")
    for r in layers:
        cells = [r.get(f"{n}_us") for n in names]
        print(f"{r['rows']:5d} x {r['k']:5d} -> {r['n']:5d}          " + "".join(f"{c:13.1f}" for c in cells))
        extra = {key[:-3]: value for key, value in r.items() if key.endswith("_us") and key[:-3] not in names}
        if extra:
            print("      " + ", ".join(f"{key} {value:.1f}" for key, value in extra.items()))
    print("paths: " + "; ".join(sorted({f"{key[:-7]}: {value}" for r in layers for key, value in r.items()
                                        if key.endswith("_kernel")})))
    if model:
        print(f"\n{'model':12s} {'decode tok/s':>13s} {'prefill tok/s':>14s}")
        for name, r in model.items():
            print(f"{name:12s} {r['decode_tok_s']:13.1f} {r['prefill_tok_s']:14.0f}")
        for a, b in [("fp8-block", "fp8-dynamic"), ("w4a8", "w4a16"), ("w4a8", "fp8-dynamic")]:
            if a in model and b in model:
                print(f"{a} / {b}: decode {model[a]['decode_tok_s'] / model[b]['decode_tok_s']:.2f}x, prefill "
                      f"{model[a]['prefill_tok_s'] / model[b]['prefill_tok_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check every kernel against float64 (seconds)")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model decode and prefill")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    started = time.perf_counter()
    checked = check()
    print(f"check passed in {checked['seconds']:.1f} s: worst fraction of each bound "
          + ", ".join(f"{k} {v:.3f}" for k, v in checked["worst_fraction_of_bound"].items())
          + "; layers against the dequantized reference: max relative "
          + f"{max(checked['layers_relative_error'].values()):.2e}"
          + f"; torch block-wise _scaled_mm: {checked['torch_blockwise_scaled_mm']}", flush=True)
    layers = model = None
    if not args.check:
        layers = layer_table()
        if not args.no_model:
            model = model_table(args.shape, args.prompt_tokens, args.new_tokens, args.prefill_tokens, args.repeats)
        print_tables(layers, model)
    if args.out:
        import transformers
        import triton

        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {"device": torch.cuda.get_device_name(), "date": date,
                  "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                               "transformers": transformers.__version__, "python": platform.python_version()},
                  "settings": vars(args) | {"out": str(args.out)}, "check": checked, "layers": layers, "model": model,
                  "seconds": time.perf_counter() - started}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
