"""Benchmarking one variant (a 16-bit model or a quantized checkpoint): every metric, into one JSON dict.

`run_isolated` runs it in a fresh Python process, so that load time, peak memory (CPU RSS or GPU) and any crash
belong to that variant alone; `bench_variant` is the in-process body.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from rich.markup import escape

from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES
from ptqlab.formats.quantized_layouts import deployments
from ptqlab.formats.readback import experts_misread, stored_expert_schemes
from ptqlab.formats.validate import validate_checkpoint
from ptqlab.measure.gguf import (QUALITY_NOTE, RUNTIME, SPEED_NOTE, check_gguf_folder, describe_gguf, gguf_config,
                                 gguf_file, not_measured_speed)
from ptqlab.measure.quality import PplProtocol, QualityResult, TopK, evaluate, make_windows, ppl_protocol
from ptqlab.measure.speed import (FastEngine, SAMPLE_PROMPTS, SPEED_PROMPT, TransformersEngine, chat_prompt_ids,
                                  measure_speed, sample_completions)
from ptqlab.measure.text import EvalText, load_eval_text
from ptqlab.models import auto_model_class, check_model_folder, compute_dtype, resolve_device, synchronizer
from ptqlab.output import partial_files
from ptqlab.progress import say
from ptqlab.record import read_record

# The quick probe (the default on CPUs): 10 windows of 512 tokens. A perplexity measured on so few windows carries a
# standard error of several percent, a change against the baseline (paired on the same windows) far less; the report
# prints both (measured on the embedded model: bench/results/README.md).
QUICK_CONTEXT, QUICK_WINDOWS = 512, 10
CPU_SPEED = {"max_new_tokens": 32, "repeats": 1, "sample_tokens": 32, "batch_sizes": (1, 8)}
"""Speed-run defaults on a CPU, where decoding is ~100x slower than on a GPU: short runs, still warmed up."""


RUNTIMES = ("auto", "fast", "transformers")


def check_runtime(name: str) -> None:
    """The one check of a runtime name (settings check it when made, so a typo fails before any work)."""
    if name not in RUNTIMES:
        raise PtqlabError(f"unknown --runtime {name!r}: use one of {', '.join(RUNTIMES)}")


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how. Defaults are the recommended protocol."""

    ppl_text: str = "wikitext-2"
    """Evaluation text: wikitext-2 (offline fallback: python-docs), python-docs, or a .txt path."""
    ppl_context: int | None = None
    """Window length; None: the protocol's (2,048 for gptq, 512 for llama.cpp), QUICK_CONTEXT for the quick probe
    (`ppl_windows` set); at most the model's positions either way (`scoring_context`)."""
    ppl_protocol: str = "gptq"
    """How windows are scored: gptq (every token but each window's first) or llama.cpp (BOS first, the second half
    scored), measure.quality.PPL_PROTOCOLS."""
    ppl_windows: int | None = None
    """Score only the first N windows; None: all (the full protocol). The quick probe: QUICK_WINDOWS of QUICK_CONTEXT."""
    topk: int = 32
    """Baseline log-probs kept per position for KL."""
    max_new_tokens: int = 128
    batch_size: int = 8
    """The batch of the throughput figure (prefill included)."""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    """The decode sweep: tok/s of all sequences together at each batch size."""
    repeats: int = 3
    warmup: int = 1
    sample_tokens: int = 64
    device: str = "auto"
    seed: int = 0
    runtime: str = "auto"
    """fast (ptqlab's runtime), transformers (the ordinary path), or auto: fast on a GPU, transformers on a CPU."""
    tasks: tuple[str, ...] = ()
    """lm-eval tasks scored on every variant (measure.tasks): registry names or YAML tasks in `tasks_path`."""
    tasks_path: str | None = None
    tasks_limit: int | None = None
    """The first N documents of each task (a smoke test, not a result); None: all."""
    tasks_fewshot: int | None = None

    def __post_init__(self) -> None:
        check_runtime(self.runtime)
        ppl_protocol(self.ppl_protocol)
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))  # lists when read back from JSON
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @property
    def protocol(self) -> str:
        if self.ppl_windows is None:
            return f"{self.ppl_protocol}, full: every window of the text"
        return f"{self.ppl_protocol}, quick probe: first {self.ppl_windows} windows"

    def digest(self) -> str:
        """Results computed under the same settings can be reused (lab resume)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def stored_dtype(config: dict) -> torch.dtype:
    """The 16-bit dtype a folder's config declares for its unquantized tensors (float32 when it names none)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def folder_sizes(path: Path) -> dict:
    """Bytes of the weights (safetensors files, or a GGUF variant's .gguf file) and of the whole folder."""
    files = [p for p in path.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".gguf"))
    return {"weights_bytes": weights, "folder_bytes": sum(p.stat().st_size for p in files)}


def fingerprint(path: Path) -> str:
    """Changes whenever the folder's weights or config are rewritten: a benchmark result is reused only for the
    very checkpoint it measured."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".gguf", ".json") and f.is_file():
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def expert_coverage(layers) -> list[dict]:
    """Per MoE layer of a run record: calibration tokens per expert (min, median, max) and how many experts fell back
    to all of the layer's tokens."""
    out = []
    for layer in layers:
        for entry in layer.get("experts", []):
            tokens = sorted(entry["tokens"])
            out.append({"layer": layer["index"], "experts": len(tokens), "min": tokens[0],
                        "median": tokens[len(tokens) // 2], "max": tokens[-1], "fell_back": len(entry["fell_back"])})
    return out


def describe_checkpoint(path: Path) -> dict:
    """Recipe, format and scheme from the run record (ptqlab.json) or config.json, 16-bit when not quantized; and the
    engine path per GPU generation of each of config.json's quantization groups (number_formats' rows)."""
    record = read_record(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    deployment = {"deployment": deployments(qc)} if isinstance(qc, dict) else {}
    if record is not None:
        coverage = expert_coverage(record.layers)
        return {"recipe": record.recipe_name, "format": record.format, "scheme": record.scheme, **deployment,
                **({"expert_coverage": coverage} if coverage else {})}
    if qc:
        return {"recipe": None, "format": qc.get("format"), "scheme": qc.get("quant_method"), **deployment}
    return {"recipe": None, "format": "dense", "scheme": f"{config.get('dtype') or config.get('torch_dtype') or '16-bit'} (not quantized)"}




def check_variant(path: Path) -> None:
    """One line, before anything is measured, unless the folder is whole: a checkpoint's or 16-bit model's
    safetensors agree with its config (formats.validate), a GGUF variant's file parses (measure.gguf)."""
    if gguf_file(path) is not None:
        check_gguf_folder(path)
    else:
        validate_checkpoint(path)


def variant_config(path: Path) -> dict:
    """config.json, or for a GGUF variant the few entries the benchmark reads, from the file's metadata."""
    if gguf_file(path) is not None:
        return gguf_config(path)
    return json.loads((path / "config.json").read_text())


def resolve_runtime(name: str, device: torch.device, path: Path) -> tuple[str, str | None]:
    """(runtime to use, a note when auto fell back). auto: the fast runtime on a GPU when it runs this checkpoint;
    transformers on a CPU (where the fast runtime computes with dequantized weights, so it shows no speed-up), unless
    transformers does not read the checkpoint's experts as stored (`transformers_misreads`): its scores would be a
    model with wrong experts."""
    check_runtime(name)
    misread = None
    if name == "transformers" or (name == "auto" and device.type != "cuda"):
        misread = transformers_misreads(path)
        if misread is None:
            return "transformers", None
        if name == "transformers":
            raise PtqlabError(f"{path}: transformers does not read {misread}; benchmark it with --runtime fast or auto")
    from ptqlab.runtime.load import check_supported  # start-up time: the runtime imports Triton; only a run of the fast runtime needs it

    try:
        check_supported(path)
    except PtqlabError as e:
        if name == "fast":
            raise
        if misread is not None:
            raise PtqlabError(f"{path}: transformers does not read {misread}, and ptqlab's runtime does not run it "
                              f"({e}): it cannot be benchmarked") from None
        return "transformers", f"fast runtime not used: {e}"
    return "fast", None if misread is None else f"transformers not used: it does not read {misread}"


def transformers_misreads(path: Path) -> str | None:
    """Why transformers does not read a mixture-of-experts checkpoint's experts as stored (formats/readback
    `experts_misread`: e.g. experts of several schemes, which it dequantizes on one grid), or None."""
    # Imported here for start-up time: transformers' config classes load slowly.
    from transformers import AutoConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    family = FAMILIES.get(raw.get("model_type"))
    if not raw.get("quantization_config") or family is None or family.experts is None:
        return None
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # the architecture, not its weights: which modules transformers builds
        model = auto_model_class(config).from_config(config)
    return experts_misread(model, stored_expert_schemes(path).values())


@dataclass(frozen=True)
class EvaluationTokens:
    """The evaluation text, tokenized once, and the windows that perplexity and KL score."""

    text: EvalText
    token_ids: torch.Tensor  # [tokens of the whole text]
    context: int
    windows: list[tuple[int, int]]
    protocol: PplProtocol
    bos_id: int | None
    """The BOS token the protocol puts first in every window; None where it puts none or the tokenizer adds none."""


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoded text with BOS (llama.cpp's add_bos)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass(frozen=True)
class LoadedVariant:
    """A variant on its device, ready to score and to generate."""

    model: torch.nn.Module
    engine: object
    """What speed and samples drive (speed.TransformersEngine or speed.FastEngine)."""
    seconds: float
    """Load time, device synchronised."""
    stored: torch.dtype
    """The dtype the folder declares for its unquantized tensors."""
    compute: torch.dtype
    """The dtype it computes in: float32 on a CPU without native arithmetic in the stored dtype."""


def model_positions(config: dict) -> int | None:
    """The positions a model was trained for: config.json's max_position_embeddings (a vision-language model's text
    config's); None where it does not say."""
    return config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")


def scoring_context(settings: BenchSettings, config: dict) -> tuple[int, str | None]:
    """(the scoring window's length, the note saying --ppl-context was clamped, or None). At most the model's
    positions: past them, learned position embeddings do not exist and rotary ones extrapolate, so the score would
    measure that, not the quantization."""
    positions = model_positions(config)
    default = QUICK_CONTEXT if settings.ppl_windows is not None else ppl_protocol(settings.ppl_protocol).context
    asked = settings.ppl_context or default
    if positions is None or asked <= positions:
        return asked, None
    if not settings.ppl_context:  # a default window: fitted to the model without a word
        return positions, None
    return positions, (f"--ppl-context {asked} is past the model's {positions} positions (max_position_embeddings): "
                       f"scored in windows of {positions} tokens; give --ppl-context {positions} or less")


def evaluation_tokens(tokenizer, settings: BenchSettings, config: dict) -> EvaluationTokens:
    """Tokenize the evaluation text and cut it into windows of the protocol's context (`scoring_context`)."""
    protocol = ppl_protocol(settings.ppl_protocol)
    text = load_eval_text(settings.ppl_text)
    token_ids = tokenizer(text.text, return_tensors="pt", verbose=False)["input_ids"][0]
    context, _ = scoring_context(settings, config)
    bos_id = tokenizer.bos_token_id if protocol.bos and adds_bos(tokenizer) else None
    return EvaluationTokens(text, token_ids, context, make_windows(len(token_ids), context, settings.ppl_windows), protocol,
                            bos_id)


def load_variant(path: Path, runtime: str, device: torch.device, config: dict, context: int,
                 generation: int, gguf: Path | None = None) -> LoadedVariant:
    """Load the folder with `runtime`, timed with the device synchronised at both ends: the load time the report
    gives. The fast runtime's static cache is sized for the longer of a scoring window (`context`) and a generation
    (`generation`: prompt plus new tokens). `gguf`: the folder's GGUF file, which transformers' reader dequantizes
    to the compute dtype."""
    stored = stored_dtype(config)
    compute = compute_dtype(device, stored)
    sync = synchronizer(device)
    sync()
    start = time.perf_counter()
    if runtime == "fast":
        from ptqlab.runtime import load_runtime  # start-up time: the runtime imports Triton; only a run of the fast runtime needs it

        model = load_runtime(path, device, dtype=compute, max_positions=max(context, generation))
        engine = FastEngine(model, generation)
    else:
        extra = {"gguf_file": gguf.name} if gguf is not None else {}
        model = auto_model_class(config).from_pretrained(path, dtype=compute, **extra).to(device).eval()
        engine = TransformersEngine(model)
    sync()
    return LoadedVariant(model, engine, time.perf_counter() - start, stored, compute)


def measure_quality(model, tokens: EvaluationTokens, settings: BenchSettings, topk_in: Path | None,
                    topk_out: Path | None, quiet: bool) -> QualityResult:
    """Perplexity over the windows; KL against the baseline's stored top-k when `topk_in` is given. The baseline
    stores its own top-k in `topk_out` for the variants after it."""
    baseline = TopK.load(topk_in) if topk_in else None
    quality = evaluate(model, tokens.token_ids, tokens.windows, baseline, settings.topk, quiet=quiet,
                       protocol=tokens.protocol, bos_id=tokens.bos_id)
    if topk_out:
        quality.topk.save(Path(topk_out))
    return quality


def peak_memory(device: torch.device) -> dict:
    """The peak memory of this process so far: allocated GPU memory on a GPU, the process's maximum RSS on a CPU."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "memory_kind": "cuda_max_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "memory_kind": "cpu_max_rss"}


def bench_variant(name: str, path: str | Path, settings: BenchSettings, topk_out: Path | None = None,
                  topk_in: Path | None = None, quiet: bool = False) -> dict:
    """Measure everything for one variant. The baseline passes `topk_out`; the others pass `topk_in` for KL.

    Phases, in order: load, quality, speed, samples, task accuracy (if asked); peak memory is read after the last,
    so that it covers them all."""
    from transformers import AutoTokenizer


    path = Path(path)
    gguf = gguf_file(path)
    if gguf is None:
        check_model_folder(path, "bench takes local folders (checkpoints, 16-bit models or GGUF variants)")
    check_variant(path)  # a corrupt folder fails here, in one line, and is never measured or ranked
    identity = describe_checkpoint(path) if gguf is None else describe_gguf(path)  # so does a damaged run record
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def phase(message: str) -> None:
        if not quiet:
            say(escape(f"{name}: {message}"))

    if gguf is None:
        runtime, runtime_note = resolve_runtime(settings.runtime, device, path)
    else:
        runtime, runtime_note = "transformers", f"{gguf.name} read by transformers' GGUF reader ({QUALITY_NOTE}); speed {SPEED_NOTE}"
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = chat_prompt_ids(tokenizer, SPEED_PROMPT)
    config = variant_config(path)
    tokens = evaluation_tokens(tokenizer, settings, config)
    generation = prompt_ids.shape[1] + max(settings.max_new_tokens, settings.sample_tokens)
    loaded = load_variant(path, runtime, device, config, tokens.context, generation, gguf)

    phase(f"loaded in {loaded.seconds:.1f} s ({runtime}, computing in {str(loaded.compute).removeprefix('torch.')}); "
          f"perplexity{' and KL' if topk_in else ''} over {len(tokens.windows)} windows of {tokens.context} tokens")
    quality = measure_quality(loaded.model, tokens, settings, topk_in, topk_out, quiet)

    if gguf is None:
        sizes = ", ".join(str(b) for b in sorted({1, settings.batch_size, *settings.batch_sizes}))
        phase(f"speed: {settings.max_new_tokens} tokens at batch {sizes}, {settings.repeats} timed "
              f"run{'s' if settings.repeats != 1 else ''} after {settings.warmup} warm-up")
        speed = measure_speed(loaded.engine, prompt_ids, settings.max_new_tokens, settings.batch_size, settings.repeats,
                              settings.warmup, settings.batch_sizes)
        phase(f"decode {speed['decode_tok_s']:.1f} tok/s; sample answers to {len(SAMPLE_PROMPTS)} prompts")
    else:
        speed = not_measured_speed(settings.batch_size)
        phase(f"speed {SPEED_NOTE.split(':')[0]} ({RUNTIME}); sample answers to {len(SAMPLE_PROMPTS)} prompts")
    samples = sample_completions(loaded.engine, tokenizer, settings.sample_tokens)
    tasks = None
    if settings.tasks:
        from ptqlab.measure.tasks import evaluate_tasks  # optional dependency: imports lm-eval where installed

        phase(f"task accuracy: {', '.join(settings.tasks)}")
        tasks = evaluate_tasks(loaded.model, tokenizer, list(settings.tasks), limit=settings.tasks_limit,
                               num_fewshot=settings.tasks_fewshot, seed=settings.seed, include_path=settings.tasks_path,
                               device=device)
    memory = peak_memory(device)

    return {
        "name": name,
        "path": str(path.resolve()),
        **identity,
        "runtime": runtime,
        "runtime_note": runtime_note,
        "kernels": getattr(loaded.model, "kernels", None),
        "device": device_name(device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "stored_dtype": str(loaded.stored).removeprefix("torch."),
        "size": folder_sizes(path),
        "load_s": loaded.seconds,
        **memory,
        "text": {"name": tokens.text.name, "source": tokens.text.source, "fallback": tokens.text.fallback,
                 "tokens_total": len(tokens.token_ids), "protocol": settings.protocol},
        **quality.summary(),
        "speed": speed,
        "samples": samples,
        "tasks": tasks,
        "settings_digest": settings.digest(),
        "fingerprint": fingerprint(path),
    }


def run_isolated(name: str, path: Path, settings: BenchSettings, result_json: Path, topk_out: Path | None = None,
                 topk_in: Path | None = None, quiet: bool = False) -> dict:
    """bench_variant in a fresh process; writes and returns its result."""
    spec = {"name": name, "path": str(path), "settings": dataclasses.asdict(settings), "result_json": str(result_json),
            "topk_out": str(topk_out) if topk_out else None, "topk_in": str(topk_in) if topk_in else None, "quiet": quiet}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        # On any exception here (Ctrl-C, or SIGTERM through output.end_on_sigterm) subprocess.run kills the worker
        # and waits for it: no orphan writes a result after this process has gone.
        proc = subprocess.run([sys.executable, "-m", "ptqlab.measure.worker", f.name])
    finally:
        os.unlink(f.name)
        for partial in partial_files(result_json):  # a killed worker's
            partial.unlink(missing_ok=True)
    if proc.returncode != 0 or not result_json.is_file():
        raise PtqlabError(f"benchmarking {name} ({path}) failed with exit status {proc.returncode}; its error is printed above. "
                          "Finished variants are kept: run the same command again to resume")
    return json.loads(result_json.read_text())
