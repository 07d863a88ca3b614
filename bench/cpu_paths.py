"""The embedded model on this CPU: float32 against bf16 compute, and decode against what the memory allows.

    python bench/cpu_paths.py --out bench/results/cpu_paths.json

ptqlab computes in float32 on a CPU without native bf16 arithmetic (no AVX-512 BF16 / AMX / ARM BF16), where torch
emulates bf16. This measures both paths side by side on the embedded SmolLM2-135M-Instruct: one 512-token forward
(the unit of the perplexity probe and of calibration), one decoder layer's calibration forward of 64 samples, batch-1
and batch-8 greedy decode through transformers; and the hardware's side: memory read bandwidth (a sum over 256 MiB)
and torch's matrix-vector bandwidth, so decode is stated beside its floor (weight bytes per token / bandwidth).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hardware() -> dict:
    a = torch.randn(64 * 2**20)  # 256 MiB, touched, so reads come from memory
    read = a.numel() * 4 / timed(lambda: a.sum(), 5)
    out = {"read_bytes_per_s": read}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(1536, 576).to(dtype) for _ in range(200)]
        x = torch.randn(1, 576).to(dtype)
        seconds = timed(lambda: [torch.nn.functional.linear(x, w) for w in weights])
        out[f"gemv_bytes_per_s_{str(dtype).removeprefix('torch.')}"] = sum(w.numel() * w.element_size() for w in weights) / seconds
    return out


def model_paths() -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptqlab.measure.speed import SPEED_PROMPT, TransformersEngine, chat_prompt_ids
    from ptqlab.measure.text import load_eval_text
    from ptqlab.data import CalibrationConfig, load_calibration
    from ptqlab.embedded import default_model_path
    from ptqlab.engine.capture import capture, make_batches

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    window = tokenizer(load_eval_text("python-docs").text, return_tensors="pt", verbose=False)["input_ids"][:, :512]
    prompt = chat_prompt_ids(tokenizer, SPEED_PROMPT)
    calibration = load_calibration(tokenizer, CalibrationConfig(dataset="offline", num_samples=64, max_seq_len=512))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        engine = TransformersEngine(model)
        with torch.no_grad():
            forward = timed(lambda: model(window))
            batches = make_batches(calibration, 16)
            capture(model, batches, torch.device("cpu"))
            layer = model.model.layers[0]
            layer_forward = timed(lambda: [layer(b.hidden, **b.layer_kwargs[0]) for b in batches])
        engine.timed(prompt, 8)
        decode = statistics.median(31 / engine.timed(prompt, 32)["decode_s"] for _ in range(2))
        batch = prompt.expand(8, -1).contiguous()
        batched = statistics.median(8 * 32 / engine.timed(batch, 32)["total_s"] for _ in range(2))
        out[name] = {"weight_bytes": weight_bytes, "forward_512_tokens_s": forward,
                     "calibration_layer_forward_s": layer_forward, "calibration_tokens": calibration.tokens,
                     "decode_tok_s": decode, "batch8_tok_s": batched}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_paths.json"))
    args = parser.parse_args()
    import transformers

    from ptqlab.models import cpu_has_native
    from ptqlab.progress import quiet_libraries

    quiet_libraries()

    hw = hardware()
    paths = model_paths()
    for name, p in paths.items():
        p["decode_floor_tok_s"] = hw["read_bytes_per_s"] / p["weight_bytes"]
        p["decode_pct_of_floor"] = 100 * p["decode_tok_s"] / p["decode_floor_tok_s"]
        p["decode_gemv_ceiling_tok_s"] = hw[f"gemv_bytes_per_s_{name}"] / p["weight_bytes"]
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"capability {torch.backends.cpu.get_cpu_capability()})",
        "native_bf16": cpu_has_native(torch.bfloat16),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "hardware": hw,
        "paths": paths,
    }
    print(f"{result['device']}; native bf16: {result['native_bf16']}; memory read {hw['read_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"{'dtype':>9} {'512-tok fwd s':>13} {'calib layer s':>13} {'decode tok/s':>12} {'floor':>7} {'% floor':>7} "
          f"{'gemv ceiling':>12} {'batch-8 tok/s':>13}")
    for name, p in paths.items():
        print(f"{name:>9} {p['forward_512_tokens_s']:13.2f} {p['calibration_layer_forward_s']:13.2f} {p['decode_tok_s']:12.1f} "
              f"{p['decode_floor_tok_s']:7.1f} {p['decode_pct_of_floor']:7.1f} {p['decode_gemv_ceiling_tok_s']:12.1f} "
              f"{p['batch8_tok_s']:13.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
