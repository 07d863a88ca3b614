"""Quantization speed and accuracy: ptqlab against llm-compressor, in one process, on the same GPU, the same
random-weight model of a real shape and the same calibration tokens.

    python bench/quantize_speed.py --shape qwen2.5-0.5b --scheme w4a16 --out bench/results/quantize_speed_qwen.json

Prints a table of wall time, peak GPU memory and output errors, and writes JSON with the device, versions,
settings and every per-layer number. Per-layer output error (weight-only schemes) is ||X Wᵀ - X Ŵᵀ||² / ||X Wᵀ||²
for each linear, with X that linear's inputs in the float model on held-out tokens (the same X for both tools).
Model output error (every scheme) is ||h - ĥ||² / ||h||² of the last hidden states on the held-out tokens, the
quantized model computed by ptqlab's QuantizedLinear for both tools (llm-compressor's weights, scales and smoothed
norms are taken over as they are), so activation quantization and smoothing count. Speed does not depend on
weight values, so random weights of the real shapes measure it faithfully.

Schemes: w4a16 (ptqlab `w4a16` vs GPTQModifier W4A16) and w8a8 (ptqlab `w8a8` vs
[SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(W8A8)]).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                                   tie_word_embeddings=True, rope_theta=1e6)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=5e5)),
    "tiny": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048)),
}
SCHEMES = {"w4a16": ("w4a16", "W4A16"), "w8a8": ("w8a8", "W8A8")}
PHASES: dict[str, float] = {}  # ptqlab's time per engine phase, summed over layers


def build_model(shape: str, device: torch.device, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, params = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_inputs(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every linear (but lm_head) in the float model on held-out tokens. name -> [tokens, in]"""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for row in tokens:
            model.model(input_ids=row[None].to(next(model.parameters()).device))
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def final_hidden(model, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states on `tokens` [samples, T], fp32 on the CPU."""
    with torch.no_grad():
        return torch.cat([model.model(input_ids=row[None].to(next(model.parameters()).device)).last_hidden_state.float().cpu()
                          for row in tokens])


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float((ref - approx).pow(2).sum() / ref.pow(2).sum())


def layer_errors(weights: dict[str, torch.Tensor], approx: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, x in inputs.items():
        x = x.float()
        ref = x @ weights[name].to(x.device).float().T
        out[name] = float((ref - x @ approx[name].to(x.device).float().T).pow(2).sum() / ref.pow(2).sum())
    return out


def run_ptqlab(model, tokens, recipe_name: str, device, batch_size: int, static_groups: bool = True) -> dict[str, torch.Tensor]:
    from ptqlab.data import CalibrationSet
    from ptqlab.pipeline import quantize_model
    from ptqlab.quant.linear import QuantizedLinear
    from ptqlab.recipes import get_recipe

    recipe = get_recipe(recipe_name)
    recipe = recipe.with_gptq(static_groups=static_groups)
    result = quantize_model(model, recipe, CalibrationSet(list(tokens), "random tokens"), quiet=True,
                            device=device, batch_size=batch_size)
    reports = result.layer_reports
    phases = {k: sum(r.seconds[k] for r in reports) for k in reports[0].seconds}
    print("ptqlab phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    PHASES.update(phases)
    return {n: m.dequantized_weight(torch.bfloat16) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def placeholder_tokenizer():
    """oneshot insists on a processor even for pre-tokenized data; it is never used to tokenize here."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>")


def run_llmcompressor(model, tokens, scheme: str, config_dir: Path) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    model.config.save_pretrained(config_dir)  # oneshot re-reads the config from the model's path
    model.config._name_or_path = str(config_dir)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    recipe = [GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], dampening_frac=0.01)]
    if scheme == "W8A8":
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=0.8))
    oneshot(model=model, dataset=data, processor=placeholder_tokenizer(), recipe=recipe,
            num_calibration_samples=len(tokens), max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
    out = {}
    for name, module in model.named_modules():
        scheme_ = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme_ is not None and scheme_.weights is not None:
            zp = getattr(module, "weight_zero_point", None)
            out[name] = fake_quantize(module.weight.data, module.weight_scale, zp, scheme_.weights)
    return out


def as_ptqlab_modules(model, scheme_name: str) -> None:
    """Swap llm-compressor's quantized linears for ptqlab's QuantizedLinear holding the same grid values and scales,
    so that both tools' models compute activations the same way in the model output error."""
    from ptqlab.models import set_submodule
    from ptqlab.quant.linear import QuantizedLinear
    from ptqlab.quant.primitives import quantize
    from ptqlab.recipes import SCHEMES as PTQLAB_SCHEMES

    scheme = PTQLAB_SCHEMES[scheme_name]
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None) is not None:
            zp = getattr(module, "weight_zero_point", None)
            zp = None if scheme.weights.symmetric else zp
            q = quantize(module.weight.data, module.weight_scale.data, zp, scheme.weights)
            set_submodule(model, name, QuantizedLinear.from_weight(module.weight.data, module.bias, scheme, q,
                                                                   module.weight_scale.data, zp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    parser.add_argument("--scheme", choices=SCHEMES, default="w4a16")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="ptqlab's calibration batch size")
    parser.add_argument("--eval-samples", type=int, default=2, help="held-out sequences for the per-layer error")
    parser.add_argument("--tools", default="ptqlab,llmcompressor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dynamic-groups", action="store_true", help="ptqlab: group scales from the error-updated weights")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    recipe_name, lc_scheme = SCHEMES[args.scheme]

    model = build_model(args.shape, device, args.seed)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (args.samples, args.seq_len), generator=g)
    held_out = torch.randint(0, vocab, (args.eval_samples, args.seq_len), generator=g)
    float_weights = {n: m.weight.detach().to("cpu", copy=True) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    state = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    inputs = capture_inputs(model, held_out) if args.scheme == "w4a16" else None
    reference_hidden = final_hidden(model, held_out)

    results = {}
    for tool in args.tools.split(","):
        if model is None:
            model = build_model(args.shape, device, args.seed)
            model.load_state_dict(state)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        if tool == "ptqlab":
            approx = run_ptqlab(model, tokens, recipe_name, device, args.batch_size, not args.dynamic_groups)
        else:
            with tempfile.TemporaryDirectory() as config_dir:
                approx = run_llmcompressor(model, tokens, lc_scheme, Path(config_dir))
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if tool == "llmcompressor":
            as_ptqlab_modules(model, lc_scheme)
        results[tool] = {"seconds": seconds, "peak_gpu_bytes": peak, **({"phases_s": dict(PHASES)} if tool == "ptqlab" else {}),
                         "model_output_error": relative_error(reference_hidden, final_hidden(model, held_out))}
        if inputs is not None:  # weight-only: the per-layer error on the float model's inputs is meaningful
            errors = layer_errors(float_weights, approx, inputs)
            results[tool] |= {"layer_errors": errors, "mean_error": statistics.mean(errors.values()),
                              "median_error": statistics.median(errors.values())}
        del approx
        model = None
        gc.collect()

    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for package in ("compressed_tensors", "llmcompressor"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001
            pass
    report = {
        "benchmark": "quantize_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions,
        "settings": vars(args) | {"out": str(args.out), "model_type": SHAPES[args.shape][0]},
        "results": results,
    }
    print(f"\n{args.shape}, {args.scheme}, {args.samples} x {args.seq_len} calibration tokens, {report['device']}")
    print(f"{'tool':<15}{'wall s':>10}{'peak GiB':>10}{'layer err mean':>16}{'median':>12}{'model err':>12}")
    for tool, r in results.items():
        peak = f"{r['peak_gpu_bytes'] / 2**30:.1f}" if r["peak_gpu_bytes"] else "-"
        layer = f"{r['mean_error']:>16.3e}{r['median_error']:>12.3e}" if "mean_error" in r else f"{'-':>16}{'-':>12}"
        print(f"{tool:<15}{r['seconds']:>10.1f}{peak:>10}{layer}{r['model_output_error']:>12.3e}")
    if {"ptqlab", "llmcompressor"} <= set(results):
        speedup = results["llmcompressor"]["seconds"] / results["ptqlab"]["seconds"]
        report["comparison"] = {"speedup": speedup}
        line = f"speed-up {speedup:.1f}x"
        if inputs is not None:
            a, b = results["ptqlab"]["layer_errors"], results["llmcompressor"]["layer_errors"]
            better = sum(a[k] <= b[k] for k in a)
            report["comparison"] |= {"layers_ptqlab_error_le": better, "layers": len(a)}
            line += f"; ptqlab's error <= llm-compressor's on {better}/{len(a)} layers"
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
