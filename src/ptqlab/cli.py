"""The `ptqlab` command line: a thin typer layer over the public API."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ptqlab.errors import PtqlabError
from ptqlab.output import end_on_sigterm
from ptqlab.progress import console, quiet_libraries, stdout_to_stderr

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Quantize Hugging Face causal LMs and prove what it cost.")


def _start(verbose: bool) -> None:
    """What every long command does first: keep other libraries quiet (unless --verbose) and let SIGTERM end the run
    through its cleanup."""
    quiet_libraries(verbose)
    end_on_sigterm()


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)  # [a-z] in a message is text
    raise typer.Exit(2)


Dataset = Annotated[str, typer.Option(help="Calibration data: hub dataset id, .jsonl/.txt/.parquet, offline, or auto (ultrachat_200k; offline text without a hub).")]
DatasetConfig = Annotated[Optional[str], typer.Option(help="Hub dataset config name.")]
Split = Annotated[str, typer.Option(help="Hub dataset split.")]
NumSamples = Annotated[int, typer.Option(help="Calibration samples.")]
MaxSeqLen = Annotated[int, typer.Option(help="Calibration samples are truncated to this many tokens.")]
CalibBatchSize = Annotated[int, typer.Option(help="Sequences per calibration forward.")]
AllowPlainText = Annotated[bool, typer.Option(help="Calibrate on plain message text when the tokenizer has no chat template.")]
QuantDevice = Annotated[str, typer.Option(help="Where calibration runs: auto (the GPU if any), cpu, cuda, cuda:N.")]
Verbose = Annotated[bool, typer.Option(help="Also show other libraries' progress bars, warnings and log lines.")]


@app.command()
def quantize(
    model: Annotated[Optional[str], typer.Argument(help="Hub id or local folder; omitted: the embedded SmolLM2-135M-Instruct.")] = None,
    recipe: Annotated[str, typer.Option(help="Preset name (see `ptqlab recipes`) or a recipe .yaml file.")] = "fp8-dynamic",
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint folder to write; default ./MODEL-RECIPE.")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer to keep 16-bit: a name or re:REGEX; repeatable; replaces the default (lm_head).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Group size for group-wise recipes (default: the recipe's, 128).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    dtype: Annotated[str, typer.Option(help="Load dtype: auto, bfloat16, float16, float32.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for every random choice; recorded in ptqlab.json.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    dataset: Dataset = "auto", dataset_config: DatasetConfig = None, split: Split = "train_sft",
    num_samples: NumSamples = 256, max_seq_len: MaxSeqLen = 1024, calib_batch_size: CalibBatchSize = 16,
    allow_plain_text: AllowPlainText = False, device: QuantDevice = "auto",
    dampening_frac: Annotated[Optional[float], typer.Option(help="GPTQ: diagonal dampening, fraction of mean(diag H) (recipe default 0.01).")] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="GPTQ: visit columns by decreasing H_ii.")] = None,
    scale_search: Annotated[Optional[bool], typer.Option("--scale-search/--no-scale-search", help="GPTQ, int formats: clipping-searched scales instead of min-max (recipe default: on for w4a16, w3a16).")] = None,
    stream: Annotated[bool, typer.Option(help="Read the model one decoder layer at a time from its safetensors files and write the checkpoint as layers finish: for models larger than memory (same tensors).")] = False,
    max_gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the run may use at its peak, e.g. 24GiB (default: what the GPU has free; the plan counts the CUDA libraries, allocator rounding and a margin beside its tensors).")] = None,
    max_cpu_memory: Annotated[Optional[str], typer.Option(help="CPU memory the run may use at its peak, e.g. 8GiB (default: 90 % of what is available).")] = None,
    plan: Annotated[bool, typer.Option(help="Print the run's estimated peak GPU and CPU memory, disk and time, and stop.")] = False,
    min_expert_tokens: Annotated[int, typer.Option(min=1, help="Mixture-of-experts models: an expert routed fewer calibration tokens than this in a layer is calibrated on all of that layer's tokens.")] = 128,
    gpus: Annotated[int, typer.Option(help="Calibrate on this many GPUs of this machine, one process each (with --device cpu: CPU processes); under torchrun, leave it at 1.")] = 1,
    kv_cache: Annotated[Optional[str], typer.Option(help="Quantize the KV cache too: fp8 (one calibrated scale per layer for keys and one for values) or fp8-head (one per KV head); sets the recipe's kv, and makes any recipe calibrated.")] = None,
    verbose: Verbose = False,
) -> None:
    """Quantize MODEL with a recipe and write a compressed-tensors checkpoint (+ tokenizer, ptqlab.json).

    Calibrated recipes (GPTQ, SmoothQuant, AWQ: all but fp8-dynamic, w4a16-rtn, w8a8-rtn; and any recipe with
    --kv-cache or a kv key) draw --num-samples chat-formatted samples of at most --max-seq-len tokens from --dataset with --seed."""
    _start(verbose)
    if gpus < 1:
        _fail(PtqlabError(f"--gpus {gpus}: must be at least 1 (the GPUs of this machine to calibrate on, one process "
                          "each; with --device cpu, CPU processes)"))
    if gpus > 1:
        # start-up time: each command imports only what it runs (torch, the engine) when it runs
        from ptqlab.launch import launch

        try:
            launch(workers=gpus, device=device, verbose=verbose)
        except PtqlabError as e:
            _fail(e)
        return
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.api import quantize as run
    from ptqlab.data import CalibrationConfig
    from ptqlab.engine.distributed import world_from_environment
    from ptqlab.recipes import get_recipe
    from ptqlab.options import QuantizeOptions
    from ptqlab.record import read_record

    try:
        chosen = get_recipe(recipe)
        gptq_changes = {k: v for k, v in [("dampening_frac", dampening_frac), ("act_order", act_order),
                                           ("scale_search", scale_search)] if v is not None}
        if gptq_changes:
            chosen = chosen.with_gptq(**gptq_changes)
        calibration = CalibrationConfig(dataset=dataset, dataset_config=dataset_config, split=split, num_samples=num_samples,
                                        max_seq_len=max_seq_len, allow_plain_text=allow_plain_text)
        options = QuantizeOptions(dtype=dtype, seed=seed, device=device, calibration=calibration,
                                  calib_batch_size=calib_batch_size, overwrite=overwrite, quiet=quiet, ignore=ignore,
                                  group_size=group_size, kv_cache=kv_cache, stream=stream,
                                  max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                                  min_expert_tokens=min_expert_tokens)
        if plan:
            # start-up time: each command imports only what it runs (torch, the engine) when it runs
            from ptqlab.api import memory_plan

            chosen = chosen.with_overrides(ignore=ignore, group_size=group_size, kv_cache=kv_cache)
            for line in memory_plan(model=model, recipe=chosen, options=options).lines():
                console.print(escape(line), highlight=False)
            return
        path = run(model=model, recipe=chosen, out=out, options=options)
        if world_from_environment().rank > 0:  # another rank of a run of several: rank 0 writes and says so
            return
        record = read_record(path)
    except PtqlabError as e:
        _fail(e)
    for note in record.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)  # a path or pattern in it is text
    console.print(
        f"[green]wrote[/] {escape(str(path))} ({record.format}"
        f"{' with an ' + record.recipe['kv'] + ' KV cache' if record.recipe.get('kv') else ''}: "
        f"{record.quantized_layers} layers quantized, "
        f"{len(record.ignored_layers)} kept 16-bit) in {record.seconds:.1f} s",
        highlight=False,
    )


@app.command("export-gguf")
def export_gguf(
    model: Annotated[Optional[str], typer.Argument(help="Hub id, local folder, or a ptqlab (compressed-tensors) checkpoint folder; omitted: the embedded SmolLM2-135M-Instruct.")] = None,
    type: Annotated[str, typer.Option("--type", help="llama.cpp's file type: Q8_0, Q4_0 or Q4_K_M (its tensor mix: Q6_K output and some attn_v / ffn_down); F32: unquantized, for llama.cpp's own quantize.")] = "Q4_K_M",
    out: Annotated[Optional[Path], typer.Option(help="The .gguf file to write; default ./MODEL-TYPE.gguf.")] = None,
    imatrix_from_calibration: Annotated[bool, typer.Option("--imatrix-from-calibration", help="Weigh each block's scale search by an importance matrix (mean squared input per channel) gathered on calibration samples, as llama.cpp's quantize --imatrix does.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out that ptqlab wrote.")] = False,
    dtype: Annotated[str, typer.Option(help="Load dtype: auto, bfloat16, float16, float32.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the calibration draw; recorded in the file's ptqlab.* metadata.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    dataset: Dataset = "auto", dataset_config: DatasetConfig = None, split: Split = "train_sft",
    num_samples: NumSamples = 256, max_seq_len: MaxSeqLen = 1024,
    calib_batch_size: CalibBatchSize = 16, allow_plain_text: AllowPlainText = False, device: QuantDevice = "auto",
    verbose: Verbose = False,
) -> None:
    """Export MODEL as one GGUF file for llama.cpp (llama, mistral, qwen2 models), quantized as llama.cpp's quantize
    would: Q8_0, Q4_0 or Q4_K_M, with --imatrix-from-calibration like quantize --imatrix.

    A ptqlab checkpoint is dequantized first: re-quantizing an already quantized model compounds the two formats'
    errors; export the 16-bit original when you have it. The calibration options apply with --imatrix-from-calibration."""
    _start(verbose)
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.data import CalibrationConfig
    from ptqlab.export_gguf import export_gguf as run
    from ptqlab.options import RunOptions

    try:
        calibration = CalibrationConfig(dataset=dataset, dataset_config=dataset_config, split=split,
                                        num_samples=num_samples, max_seq_len=max_seq_len,
                                        allow_plain_text=allow_plain_text)
        options = RunOptions(dtype=dtype, seed=seed, device=device, calibration=calibration,
                             calib_batch_size=calib_batch_size, overwrite=overwrite, quiet=quiet)
        result = run(model=model, file_type=type, out=out, importance=imatrix_from_calibration, options=options)
    except PtqlabError as e:
        _fail(e)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    mix = ", ".join(f"{n} {t}" for t, n in sorted(result.type_counts().items()))
    console.print(f"[green]wrote[/] {escape(str(result.path))} ({result.file_type}{' with an importance matrix' if result.importance else ''}: "
                  f"{result.bytes / 2**20:.1f} MiB; tensors {mix}) in {result.seconds:.1f} s", highlight=False)


@app.command()
def recipes(
    name: Annotated[Optional[str], typer.Argument(help="A preset or a recipe .yaml file: print it as YAML (a starting point for your own).")] = None,
) -> None:
    """List the preset recipes, or print one as YAML. `ptqlab quantize --recipe FILE.yaml` takes your own."""
    import yaml

    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.recipe import step_name
    from ptqlab.number_formats import GPU_GENERATIONS, VLLM_011
    from ptqlab.recipes import PRESETS, get_recipe

    if name is not None:
        try:
            recipe = get_recipe(name)
        except PtqlabError as e:
            _fail(e)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        if (deployment := recipe.scheme.deployment) is not None:  # comments: the YAML still loads as a recipe
            print(f"# deployment: {deployment.family}; {deployment.source}")
            print("".join(f"#   {gpu}: {path}\n" for gpu, path in zip(GPU_GENERATIONS, deployment.paths)), end="")
        return
    columns = ("recipe", "steps", "format", "keeps 16-bit", "what it does")
    rows = [(r.name, " → ".join(step_name(s) for s in r.steps), r.scheme.format, ", ".join(r.ignore), r.description)
            for r in PRESETS.values()]
    paths = [(r.name, *r.scheme.deployment.paths) for r in PRESETS.values()]  # tests: every preset has a row
    if not console.is_terminal:  # a script reads it: one tab-separated line per recipe, whatever the width
        print("\t".join(columns + GPU_GENERATIONS))
        for row, path in zip(rows, paths):
            print("\t".join(row + path[1:]))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    table = Table("recipe", *GPU_GENERATIONS, title="Deployment paths (" + VLLM_011 + "; ptqlab recipes NAME: sources)")
    for path in paths:
        table.add_row(*path)
    console.print(table)


def _settings(ppl_quick: bool, ppl_full: bool, ppl_context, ppl_text, max_new_tokens, batch_size, repeats, sample_tokens,
              device, seed, quiet, runtime, ppl_protocol="gptq", batch_sizes: str | None = None, tasks: dict | None = None):
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.measure.text import check_eval_text
    from ptqlab.measure.variant import CPU_SPEED, QUICK_CONTEXT, QUICK_WINDOWS, BenchSettings, check_runtime
    from ptqlab.models import resolve_device

    check_runtime(runtime)  # before the notes below: a typo fails first
    check_eval_text(ppl_text)
    if ppl_quick and ppl_full:
        raise PtqlabError("--ppl-quick and --ppl-full exclude each other")
    on_cpu = resolve_device(device).type == "cpu"
    if not ppl_quick and not ppl_full:
        # Neither given: the full protocol on a GPU, the quick probe on a CPU, said out loud.
        ppl_quick = on_cpu
        if ppl_quick and not quiet:
            console.print(f"[yellow]note:[/] no GPU: perplexity and KL use the quick probe ({QUICK_WINDOWS} windows of "
                          f"{QUICK_CONTEXT} tokens; the report gives each perplexity's standard error); pass --ppl-full "
                          "for the whole text", highlight=False)
    speed = {"max_new_tokens": max_new_tokens, "repeats": repeats, "sample_tokens": sample_tokens,
             "batch_sizes": _batch_sizes(batch_sizes) if batch_sizes else None}
    defaults = CPU_SPEED if on_cpu else {k: getattr(BenchSettings, k) for k in speed}
    if on_cpu and not quiet and any(v is None for v in speed.values()):
        console.print(f"[yellow]note:[/] no GPU: speed runs decode {CPU_SPEED['max_new_tokens']} tokens, "
                      f"{CPU_SPEED['repeats']} timed run{'s' if CPU_SPEED['repeats'] != 1 else ''} after a warm-up, at batch "
                      f"{', '.join(map(str, CPU_SPEED['batch_sizes']))}, samples of {CPU_SPEED['sample_tokens']} tokens; "
                      "--max-new-tokens, --repeats, --batch-sizes and --sample-tokens change them", highlight=False)
    speed = {k: defaults[k] if v is None else v for k, v in speed.items()}
    windows = QUICK_WINDOWS if ppl_quick else None
    return BenchSettings(ppl_text=ppl_text, ppl_context=ppl_context, ppl_windows=windows, ppl_protocol=ppl_protocol,
                         batch_size=batch_size, device=device, seed=seed, runtime=runtime, **speed, **(tasks or {}))


def _tasks(tasks: str | None, tasks_path: Path | None, tasks_limit: int | None, tasks_fewshot: int | None) -> dict:
    names = tuple(t.strip() for t in (tasks or "").split(",") if t.strip())
    if not names and (tasks_path or tasks_limit or tasks_fewshot is not None):
        raise PtqlabError("--tasks-path, --tasks-limit and --tasks-fewshot apply to --tasks: name the tasks too")
    if tasks_path is not None and not tasks_path.is_dir():
        raise PtqlabError(f"--tasks-path {tasks_path}: not a folder; give the folder of your lm-eval YAML task files")
    return {"tasks": names, "tasks_path": str(tasks_path) if tasks_path else None, "tasks_limit": tasks_limit,
            "tasks_fewshot": tasks_fewshot}


Tasks = Annotated[Optional[str], typer.Option(help="lm-eval tasks scored on every variant, comma-separated (mmlu,gsm8k,arc_challenge,... or YAML tasks in --tasks-path); needs pip install 'ptqlab[eval]'.")]
TasksPath = Annotated[Optional[Path], typer.Option(help="A folder of lm-eval YAML task files (local tasks).")]
TasksLimit = Annotated[Optional[int], typer.Option(min=1, help="Only the first N documents of each task (a smoke test).")]
TasksFewshot = Annotated[Optional[int], typer.Option(min=0, help="Few-shot examples per task (default: each task's own).")]


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise PtqlabError(f"--batch-sizes {text!r}: give batch sizes of at least 1, comma-separated, e.g. 1,8,32")
    return sizes


BatchSizes = Annotated[Optional[str], typer.Option(help="Batch sizes of the decode sweep, comma-separated; default 1,8,32 (1,8 on a CPU).")]
PplQuick = Annotated[bool, typer.Option("--ppl-quick", help="Quick probe: the first 10 windows of 512 tokens (default on CPU).")]
PplFull = Annotated[bool, typer.Option("--ppl-full", help="Full protocol: every window of the text (default on GPU).")]
PplContext = Annotated[Optional[int], typer.Option(help="Window length; default min(2048, model context), 512 for the quick probe.")]
PplProtocolOption = Annotated[str, typer.Option(help="gptq: windows of 2048, every token but each window's first scored; llama.cpp: windows of 512 starting with BOS, the second half scored (comparable with llama.cpp's perplexity tool).")]
TargetKl = Annotated[Optional[float], typer.Option(help="Sensitivity: the mean KL the mixed recipe aims at (default: --max-kl for lab, 0.05 for sensitivity).")]
MaxSize = Annotated[Optional[str], typer.Option(help="Sensitivity: instead of a KL target, the largest weights size of the mixed checkpoint, e.g. 120MiB.")]
KeepBits = Annotated[Optional[int], typer.Option(help="Sensitivity: keep the chosen parts at the recipe's own int scheme with this many bits (same groups, same quantizer; e.g. 4 for a 2-bit recipe) instead of 16-bit.")]
SensitivityWindows = Annotated[Optional[int], typer.Option(min=1, help="Sensitivity: evaluation windows of 512 tokens per part (default 4: a ranking needs fewer tokens than a verdict).")]
PplText = Annotated[str, typer.Option(help="wikitext-2 (offline fallback: python-docs), python-docs, or a .txt path.")]
MaxNewTokens = Annotated[Optional[int], typer.Option(help="Tokens generated per speed run (EOS ignored); default 128, 32 on a CPU.")]
BatchSize = Annotated[int, typer.Option(help="Batch size of the throughput run.")]
Repeats = Annotated[Optional[int], typer.Option(help="Timed repeats after one warm-up; the median is reported; default 3, 1 on a CPU.")]
SampleTokens = Annotated[Optional[int], typer.Option(help="Max tokens of each sample completion; default 64, 32 on a CPU.")]
Device = Annotated[str, typer.Option(help="auto (a GPU if present), cpu, cuda, cuda:1, ...")]
MaxKl = Annotated[float, typer.Option(help="Quality budget: mean KL from the baseline, nats per token.")]
MaxPplIncrease = Annotated[float, typer.Option(help="Quality budget: perplexity increase over the baseline, percent.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars (log.jsonl still records every step).")]
Runtime = Annotated[str, typer.Option(help="fast: ptqlab's runtime (quantized kernels, static cache, CUDA graphs); transformers: the ordinary path; auto: fast on a GPU, transformers on a CPU.")]


@app.command()
def bench(
    paths: Annotated[list[Path], typer.Argument(help="Checkpoint or 16-bit model folders.")],
    out: Annotated[Path, typer.Option(help="Results folder (resumable).")] = Path("ptqlab-bench"),
    baseline: Annotated[Optional[Path], typer.Option(help="16-bit model for KL; default: the first unquantized PATH, else the model the first checkpoint was made from.")] = None,
    ppl_quick: PplQuick = False, ppl_full: PplFull = False, ppl_context: PplContext = None, ppl_text: PplText = "wikitext-2",
    ppl_protocol: PplProtocolOption = "gptq",
    max_new_tokens: MaxNewTokens = None, batch_size: BatchSize = 8, repeats: Repeats = None, sample_tokens: SampleTokens = None,
    batch_sizes: BatchSizes = None, tasks: Tasks = None, tasks_path: TasksPath = None, tasks_limit: TasksLimit = None,
    tasks_fewshot: TasksFewshot = None,
    device: Device = "auto", seed: int = 0, max_kl: MaxKl = 0.05, max_ppl_increase: MaxPplIncrease = 5.0, quiet: Quiet = False,
    runtime: Runtime = "auto", verbose: Verbose = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print results.json to stdout and nothing else there (progress and notes go to stderr), for scripts.")] = False,
) -> None:
    """Benchmark model folders side by side: size, load time, memory, perplexity, KL, speed, samples; write a report."""
    _start(verbose)
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.benchmark import bench as run

    try:
        budget = _budget(max_kl, max_ppl_increase)
        settings = _settings(ppl_quick=ppl_quick, ppl_full=ppl_full, ppl_context=ppl_context, ppl_text=ppl_text,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, repeats=repeats,
                             sample_tokens=sample_tokens, device=device, seed=seed, quiet=quiet, runtime=runtime,
                             ppl_protocol=ppl_protocol, batch_sizes=batch_sizes,
                             tasks=_tasks(tasks, tasks_path, tasks_limit, tasks_fewshot))
        with stdout_to_stderr() if json_out else nullcontext():
            folder = run(paths=[str(p) for p in paths], out=out, baseline=str(baseline) if baseline else None,
                         settings=settings, budget=budget, quiet=quiet)
    except PtqlabError as e:
        _fail(e)
    _print_summary(folder)
    if json_out:
        print((folder / "results.json").read_text(), end="")


@app.command()
def lab(
    model: Annotated[Optional[str], typer.Argument(help="Hub id or local folder; omitted: the embedded SmolLM2-135M-Instruct.")] = None,
    recipes: Annotated[Optional[str], typer.Option(help="Comma-separated presets or recipe files; default: fp8-dynamic,w4a16,w8a8 (FP8 dynamic, GPTQ W4A16, SmoothQuant + GPTQ W8A8). gguf-Q8_0, gguf-Q4_0, gguf-Q4_K_M (add -imatrix for an importance matrix from the calibration): a GGUF export of the baseline, quality measured through transformers' GGUF reader, speed not measured.")] = None,
    out: Annotated[Path, typer.Option(help="Lab folder: checkpoints, results, report (resumable).")] = Path("ptqlab-lab"),
    dtype: Annotated[str, typer.Option(help="Load dtype for quantization.")] = "auto",
    ppl_quick: PplQuick = False, ppl_full: PplFull = False, ppl_context: PplContext = None, ppl_text: PplText = "wikitext-2",
    ppl_protocol: PplProtocolOption = "gptq",
    max_new_tokens: MaxNewTokens = None, batch_size: BatchSize = 8, repeats: Repeats = None, sample_tokens: SampleTokens = None,
    batch_sizes: BatchSizes = None, tasks: Tasks = None, tasks_path: TasksPath = None, tasks_limit: TasksLimit = None,
    tasks_fewshot: TasksFewshot = None,
    device: Device = "auto", seed: int = 0, max_kl: MaxKl = 0.05, max_ppl_increase: MaxPplIncrease = 5.0, quiet: Quiet = False,
    dataset: Dataset = "auto", num_samples: Annotated[Optional[int], typer.Option(help="Calibration samples; default 256, 32 on a CPU.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help="Calibration samples are truncated to this many tokens; default 1024, 512 on a CPU.")] = None,
    calib_batch_size: CalibBatchSize = 16,
    runtime: Runtime = "auto", verbose: Verbose = False,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Also measure each decoder layer's attention and MLP alone quantized with the recipe of fewest weight bits, and add its mixed-precision version (the most sensitive parts kept 16-bit, or at --keep-bits, to meet --target-kl or --max-size) as one more variant.")] = False,
    target_kl: TargetKl = None, max_size: MaxSize = None, sensitivity_windows: SensitivityWindows = None,
    keep_bits: KeepBits = None,
    export_md: Annotated[bool, typer.Option("--export-md", help="Also write the results table as Markdown (results.md beside the report, with the protocol and deployment paths) and print it to stdout, for a model card or an issue.")] = False,
) -> None:
    """Quantize MODEL with each recipe, benchmark every variant next to the 16-bit baseline, and report."""
    _start(verbose)
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.data import CalibrationConfig
    from ptqlab.options import RunOptions
    from ptqlab.suite import lab as run, lab_calibration_size

    try:
        budget = _budget(max_kl, max_ppl_increase)
        names = [r.strip() for r in recipes.split(",") if r.strip()] if recipes is not None else None
        if names == []:  # before the notes below: a mistake fails in its one line
            raise PtqlabError(f"--recipes {recipes!r} names no recipe: give presets or recipe files, comma-separated "
                              "(e.g. fp8-dynamic,w4a16), or leave --recipes out for the default three")
        aim = _aim(target_kl if target_kl is not None or max_size else max_kl, max_size, sensitivity_windows,
                   keep_bits) if sensitivity else None
        settings = _settings(ppl_quick=ppl_quick, ppl_full=ppl_full, ppl_context=ppl_context, ppl_text=ppl_text,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, repeats=repeats,
                             sample_tokens=sample_tokens, device=device, seed=seed, quiet=quiet, runtime=runtime,
                             ppl_protocol=ppl_protocol, batch_sizes=batch_sizes,
                             tasks=_tasks(tasks, tasks_path, tasks_limit, tasks_fewshot))
        calibration = CalibrationConfig(dataset=dataset, seed=seed, **lab_calibration_size(settings, num_samples, max_seq_len, quiet))
        options = RunOptions(dtype=dtype, seed=seed, device=device, calibration=calibration,
                             calib_batch_size=calib_batch_size, quiet=quiet)
        folder = run(model=model, recipes=names, out=out, settings=settings, budget=budget, options=options,
                     sensitivity=aim)
    except PtqlabError as e:
        _fail(e)
    _print_summary(folder)
    if export_md:
        from ptqlab.report import write_results_markdown  # start-up time, as above

        markdown = write_results_markdown(folder)
        console.print(f"[green]markdown:[/] {escape(str(markdown))}", highlight=False)
        print(markdown.read_text(), end="")  # stdout: `ptqlab lab --export-md > card.md` keeps only the table


def _budget(max_kl: float, max_ppl_increase: float):
    """The quality budget, each figure a finite number (nan fails every comparison, so it would pass no variant)."""
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.recommend import Budget

    if not 0 < max_kl < float("inf"):
        raise PtqlabError(f"--max-kl {max_kl}: must be a positive number of nats per token, e.g. 0.05")
    if not 0 <= max_ppl_increase < float("inf"):
        raise PtqlabError(f"--max-ppl-increase {max_ppl_increase}: must be a percentage of at least 0, e.g. 5")
    return Budget(max_kl, max_ppl_increase)


def _aim(target_kl: float | None, max_size: str | None, windows: int | None, keep_bits: int | None = None):
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.engine.memory import parse_bytes
    from ptqlab.suite import Sensitivity

    if target_kl is not None and max_size:
        raise PtqlabError("--target-kl and --max-size exclude each other: give one")
    if target_kl is not None and not 0 < target_kl < float("inf"):  # nan fails every comparison
        raise PtqlabError(f"--target-kl {target_kl}: must be a positive number of nats per token, e.g. 0.05 (the "
                          "mean KL from the baseline the mixed recipe aims at)")
    return Sensitivity(target_kl=target_kl, max_bytes=parse_bytes(max_size, "--max-size") if max_size else None,
                       keep_bits=keep_bits, **({} if windows is None else {"windows": windows}))


@app.command()
def sensitivity(
    model: Annotated[Optional[str], typer.Argument(help="Hub id or local folder; omitted: the embedded SmolLM2-135M-Instruct.")] = None,
    recipe: Annotated[str, typer.Option(help="Preset name or recipe .yaml file whose damage to measure.")] = "w4a16",
    out: Annotated[Path, typer.Option(help="Folder: the checkpoint, sensitivity.json, the mixed recipe (resumable).")] = Path("ptqlab-sensitivity"),
    target_kl: TargetKl = None, max_size: MaxSize = None, windows: SensitivityWindows = None,
    keep_bits: KeepBits = None,
    dtype: Annotated[str, typer.Option(help="Load dtype for quantization.")] = "auto",
    ppl_context: PplContext = None, ppl_text: PplText = "wikitext-2", ppl_protocol: PplProtocolOption = "gptq",
    device: Device = "auto", seed: int = 0, quiet: Quiet = False,
    dataset: Dataset = "auto", num_samples: Annotated[Optional[int], typer.Option(help="Calibration samples; default 256, 32 on a CPU.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(help="Calibration samples are truncated to this many tokens; default 1024, 512 on a CPU.")] = None,
    calib_batch_size: CalibBatchSize = 16, verbose: Verbose = False,
) -> None:
    """Which parts a recipe hurts: the KL of each decoder layer's attention and MLP alone quantized, and a recipe that
    keeps the most sensitive parts 16-bit (or at --keep-bits) to meet --target-kl (default 0.05) or --max-size with the
    fewest bytes."""
    _start(verbose)
    # start-up time: each command imports only what it runs (torch, the engine) when it runs
    from ptqlab.data import CalibrationConfig
    from ptqlab.measure.text import check_eval_text
    from ptqlab.measure.variant import BenchSettings
    from ptqlab.options import RunOptions
    from ptqlab.recommend import Budget
    from ptqlab.suite import lab_calibration_size, sensitivity as run

    try:
        check_eval_text(ppl_text)
        aim = _aim(target_kl if target_kl is not None or max_size else Budget().max_kl, max_size, windows, keep_bits)
        settings = BenchSettings(ppl_text=ppl_text, ppl_context=ppl_context, ppl_protocol=ppl_protocol,
                                 device=device, seed=seed)
        calibration = CalibrationConfig(dataset=dataset, seed=seed, **lab_calibration_size(settings, num_samples, max_seq_len, quiet))
        options = RunOptions(dtype=dtype, seed=seed, device=device, calibration=calibration,
                             calib_batch_size=calib_batch_size, quiet=quiet)
        folder = run(model=model, recipe=recipe, out=out, aim=aim, settings=settings, options=options)
    except PtqlabError as e:
        _fail(e)
    _print_sensitivity(folder)


def _print_sensitivity(folder: Path, worst: int = 10) -> None:
    import json

    result = json.loads((folder / "sensitivity.json").read_text())
    parts = sorted(result["parts"], key=lambda p: p["kl_mean"], reverse=True)[:worst]
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if result.get("not_measured"):
        outside = result["not_measured"]
        console.print(f"[yellow]note:[/] {len(outside)} quantized linears belong to no part and were not measured "
                      f"(e.g. {escape(outside[0])}); the mixed recipe keeps them quantized", highlight=False)
    console.print(f"uniform {escape(Path(result['checkpoint']).name)}: KL {result['uniform']['kl_mean']:.4f}, "
                  f"weights {result['uniform']['weights_bytes'] / 2**20:.1f} MiB; the {len(parts)} most sensitive parts "
                  f"(alone quantized):", highlight=False)
    for p in parts:
        console.print(f"  {escape(p['name'])}: KL {p['kl_mean']:.4f} (p99 {p['kl_p99']:.3f}), keeping it 16-bit adds "
                      f"{p['extra_bytes'] / 2**20:.2f} MiB", highlight=False)
    mixed = result["mixed"]
    console.print(f"[green]mixed recipe:[/] {escape(str(mixed['recipe_file']))}: {len(mixed['kept'])} parts kept "
                  f"{mixed.get('kept_as', '16-bit')}, predicted KL "
                  f"{mixed['predicted_kl']:.4f}, weights {mixed['predicted_weights_bytes'] / 2**20:.1f} MiB "
                  f"(measure it: ptqlab lab --recipes {escape(Path(result['checkpoint']).name)},"
                  f"{escape(str(mixed['recipe_file']))})",
                  highlight=False)


def _print_summary(folder: Path) -> None:
    console.print(escape((folder / "summary.md").read_text().split("## Sample completions")[0]), highlight=False)
    console.print(f"[green]report:[/] {escape(str(folder / 'report.html'))}  [green]data:[/] "
                  f"{escape(str(folder / 'results.json'))}", highlight=False)


def main() -> None:  # pragma: no cover
    app()
