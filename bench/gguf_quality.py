"""GGUF export quality on real weights: the embedded SmolLM2-135M-Instruct exported by `ptqlab export-gguf` as Q8_0,
Q4_0 and Q4_K_M, the Q4 types also with an importance matrix from ptqlab's calibration (Q8_0 ignores one, as in
llama.cpp), each read back by transformers' GGUF reader (dequantized, computed in float32) and scored against the
bf16 model on held-out text: KL from bf16 (top-32 coarse KL, ptqlab's measure/quality.py), top-1 agreement,
perplexity, file size, export time. Where llama_cpp (llama-cpp-python) is importable, llama.cpp itself loads and
runs each file on the same token windows (its KL, top-1 and perplexity; it also rounds activations to 8 bits in its
quantized matrix products), checks that it tokenizes the evaluation text as the source tokenizer does, and its own
quantize of ptqlab's unquantized (F32) file gives the reference for the plain types.

    python bench/gguf_quality.py                      # all variants, writes bench/results/gguf_quality_smollm2.json

Held-out text: the Python Language Reference topics that ship with CPython (pydoc_data; ptqlab's offline
evaluation text), the first --windows windows of --context tokens, every token but each window's first scored
(ptqlab's gptq protocol). Calibration for the importance matrix: ptqlab's offline calibration set (standard-library
docstrings, disjoint from the evaluation text). SmolLM2's rows of 576 values are not a multiple of 256, so
llama.cpp's Q4_K_M mix (and ptqlab's, which follows it) falls back to Q5_0 / Q8_0 for most of its tensors; only
ffn_down (1536 columns) gets Q4_K / Q6_K. The embedded weights already sit on a 4-bit grid (GGUF Q4_1 upstream): a
real but not a typical experiment.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a bar per file; read when tqdm loads
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VARIANTS = ("Q8_0", "Q4_0", "Q4_0+imatrix", "Q4_K_M", "Q4_K_M+imatrix")
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
"""llama.cpp's LLAMA_FTYPE_MOSTLY_* of each --type."""


def llama_cpp_module():
    """llama_cpp with its C library's log silenced (quantize prints a line per tensor), or None where not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    global _SILENCE  # the callback must outlive every call into the library
    _SILENCE = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_SILENCE, None)
    return llama_cpp


def llama_cpp_scores(llama_cpp, path: Path, token_ids: torch.Tensor, windows, baseline_topk, threads: int) -> dict:
    """llama.cpp's own logits on the same windows, scored as ptqlab scores a variant: coarse KL against the bf16
    top-32, top-1 agreement, perplexity over every token but each window's first."""
    import numpy as np

    from ptqlab.measure.quality import coarse_kl

    context = windows[0][1] - windows[0][0]
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False, n_threads=threads)
    kls, agree, nll, offset = [], 0, 0.0, 0
    try:
        for begin, end in windows:
            llm.reset()
            ids = token_ids[begin:end]
            llm.eval(ids.tolist())
            logprobs = torch.tensor(np.array(llm.scores[:end - begin]), dtype=torch.float32)[:-1].log_softmax(-1)
            n = logprobs.shape[0]
            base_ids, base_logprobs = baseline_topk.ids[offset:offset + n], baseline_topk.logprobs[offset:offset + n]
            kls.append(coarse_kl(base_ids, base_logprobs, logprobs))
            agree += int((logprobs.argmax(-1) == base_ids[:, 0].long()).sum())
            nll -= float(logprobs.gather(-1, ids[1:].unsqueeze(-1)).double().sum())
            offset += n
    finally:
        llm.close()
    kl = torch.cat(kls)
    return {"loads": True, "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
            "top1_pct": 100.0 * agree / kl.numel(), "perplexity": math.exp(nll / kl.numel()),
            "seconds": round(time.perf_counter() - start, 1)}


def llama_cpp_tokenizer_check(llama_cpp, path: Path, tokenizer, text: str, lines: int = 2000) -> dict:
    """Whether llama.cpp, reading the file's tokenizer.ggml.*, encodes each of the first `lines` non-empty lines of
    `text` to the ids the source tokenizer gives them."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        chosen = [line for line in text.splitlines() if line.strip()][:lines]
        same = sum(llm.tokenize(line.encode(), add_bos=False, special=False)
                   == tokenizer(line, add_special_tokens=False)["input_ids"] for line in chosen)
    finally:
        llm.close()
    return {"lines": len(chosen), "identical": same}


def llama_cpp_quantize(llama_cpp, source: Path, out: Path, file_type: str, threads: int) -> float:
    """llama.cpp's own quantize (llama_model_quantize, no importance matrix) of `source`; its seconds."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPES[file_type], threads
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {out}")
    return round(time.perf_counter() - start, 1)


def transformers_scores(path: Path, token_ids: torch.Tensor, windows, baseline_topk) -> dict:
    """The file read by transformers' GGUF reader (every tensor dequantized, computed in float32), scored as a
    ptqlab variant."""
    from transformers import AutoModelForCausalLM

    from ptqlab.measure.quality import evaluate

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    with torch.no_grad():
        summary = evaluate(model, token_ids, windows, baseline_topk, quiet=True).summary()
    del model
    gc.collect()
    return {"kl_mean": summary["kl"]["mean"], "kl_p99": summary["kl"]["p99"], "top1_pct": summary["kl"]["top1_agreement_pct"],
            "perplexity": summary["perplexity"]["value"], "load_s": round(load_s, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from ptqlab.data import CalibrationConfig
    from ptqlab.embedded import default_model_path
    from ptqlab.export_gguf import export_gguf
    from ptqlab.measure.quality import evaluate, make_windows
    from ptqlab.measure.text import load_eval_text
    from ptqlab.record import versions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gguf_quality_smollm2.json"))
    parser.add_argument("--work", type=Path, default=Path("out/gguf_quality"), help="where the .gguf files go")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of --context tokens")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=16,
                        help="calibration samples for the importance matrix (few: the default run is sized for a CPU)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp's threads")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()
    llama_cpp = llama_cpp_module()
    transformers_logging.disable_progress_bar()  # the GGUF reader's bar per file

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = load_eval_text("python-docs")
    token_ids = tokenizer(text.text, return_tensors="pt", verbose=False)["input_ids"][0]
    windows = make_windows(len(token_ids), args.context, args.windows)
    # The bf16 weights computed in float32 (exact for them; a CPU without native bf16 only emulates it, slowly)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        baseline = evaluate(model, token_ids, windows, None, quiet=True)
    bf16_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    del model
    gc.collect()
    print(f"bf16 baseline: perplexity {baseline.perplexity:.3f} over {baseline.tokens:,} tokens of {text.name} "
          f"({len(windows)} windows of {args.context})", flush=True)
    calibration = CalibrationConfig(dataset="offline", num_samples=args.num_samples, max_seq_len=args.max_seq_len)

    reference = {}
    if llama_cpp is not None:  # llama.cpp's own quantize of ptqlab's unquantized file: the plain types' reference
        f32 = export_gguf(None, "F32", args.work / "smollm2-F32.gguf", overwrite=True, quiet=True).path
        for file_type in sorted({v.partition("+")[0] for v in variants if "+" not in v}):
            path = args.work / f"smollm2-{file_type}-llama-quantize.gguf"
            seconds = llama_cpp_quantize(llama_cpp, f32, path, file_type, args.threads)
            reference[file_type] = {"quantize_s": seconds, "bytes": path.stat().st_size,
                                    **llama_cpp_scores(llama_cpp, path, token_ids, windows, baseline.topk, args.threads)}
            print(f"llama.cpp's quantize {file_type}: KL {reference[file_type]['kl_mean']:.4f}", flush=True)
        f32.unlink()

    results, tokenizer_check = {}, None
    for variant in variants:
        file_type, _, imatrix = variant.partition("+")
        path = args.work / f"smollm2-{variant.replace('+', '-')}.gguf"
        start = time.perf_counter()
        export = export_gguf(None, file_type, path, importance=bool(imatrix), calibration=calibration, seed=args.seed,
                             overwrite=True, quiet=True)
        seconds = time.perf_counter() - start
        entry = {"file_type": file_type, "imatrix": bool(imatrix), "bytes": export.bytes,
                 "bits_per_weight_file": 8 * export.bytes / _weight_count(base), "tensor_types": export.type_counts(),
                 "export_s": round(seconds, 1), "transformers": transformers_scores(path, token_ids, windows, baseline.topk),
                 "llama_cpp": None}
        if llama_cpp is not None:
            entry["llama_cpp"] = llama_cpp_scores(llama_cpp, path, token_ids, windows, baseline.topk, args.threads)
            if tokenizer_check is None:
                tokenizer_check = llama_cpp_tokenizer_check(llama_cpp, path, tokenizer, text.text)
        results[variant] = entry
        t, c = entry["transformers"], entry["llama_cpp"]
        extra = f"  llama.cpp: KL {c['kl_mean']:.4f}, top-1 {c['top1_pct']:.1f} %, ppl {c['perplexity']:.3f}" if c else ""
        print(f"{variant:<16} {entry['bytes'] / 2**20:6.1f} MiB  KL {t['kl_mean']:.4f}  top-1 {t['top1_pct']:.1f} %  "
              f"ppl {t['perplexity']:.3f}  (export {seconds:.0f} s){extra}", flush=True)

    record = {
        "benchmark": "gguf_quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]), "seconds": round(time.perf_counter() - started, 1),
        "model": "SmolLM2-135M-Instruct (embedded, bf16; weights from GGUF Q4_1 upstream)",
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)",
        "versions": {**versions(), **_gguf_versions()},
        "settings": {"eval_text": text.name, "eval_source": text.source, "context": args.context,
                     "windows": len(windows), "tokens_scored": baseline.tokens, "protocol": "gptq (every token but each "
                     "window's first)", "kl": "coarse KL over the bf16 top-32 + one bucket for the rest",
                     "transformers": "transformers' GGUF reader, every tensor dequantized, computed in float32",
                     "baseline": "the bf16 weights, computed in float32", "llama_cpp_threads": args.threads,
                     "calibration": {"dataset": "offline (standard-library docstrings)", "num_samples": args.num_samples,
                                     "max_seq_len": args.max_seq_len, "seed": args.seed}},
        "bf16": {"perplexity": baseline.perplexity, "bytes": bf16_bytes},
        "llama_cpp_tokenizer": tokenizer_check,
        "llama_cpp_quantize_reference": reference or None,
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\n{'variant':<16}{'MiB':>7}{'bpw':>6}{'KL':>9}{'top-1 %':>9}{'ppl':>9}  {'llama.cpp KL':>12}{'top-1 %':>9}"
          f"{'ppl':>9}  {'llama-quantize KL':>17}{'export s':>10}")
    print(f"{'bf16':<16}{bf16_bytes / 2**20:>7.1f}{16:>6}{'':>9}{'':>9}{baseline.perplexity:>9.3f}")
    for variant, r in results.items():
        t, c, q = r["transformers"], r["llama_cpp"], reference.get(variant)
        own = f"{c['kl_mean']:>12.4f}{c['top1_pct']:>9.1f}{c['perplexity']:>9.3f}" if c else f"{'–':>12}{'–':>9}{'–':>9}"
        theirs = f"{q['kl_mean']:.4f}" if q else "–"
        print(f"{variant:<16}{r['bytes'] / 2**20:>7.1f}{r['bits_per_weight_file']:>6.2f}{t['kl_mean']:>9.4f}"
              f"{t['top1_pct']:>9.1f}{t['perplexity']:>9.3f}  {own}  {theirs:>17}{r['export_s']:>10.0f}")
    if tokenizer_check:
        print(f"llama.cpp tokenizes {tokenizer_check['identical']} of {tokenizer_check['lines']} lines of the text as the "
              "source tokenizer does")
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}")


def _weight_count(folder: Path) -> int:
    """Parameters stored in the bf16 folder (the tied output head counted once, as the GGUF file stores it)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def _gguf_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gguf", "llama-cpp-python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
