"""Task accuracy (MMLU, GSM8K, ARC, HellaSwag or local YAML tasks) with lm-evaluation-harness as the engine.

lm-eval owns the tasks: prompts, few-shot sampling, answer extraction, metrics and their standard errors. This
module owns the model side: `LogitsLM` answers lm-eval's three requests (log-likelihood of a continuation, rolling
log-likelihood of a text, greedy generation) with anything that maps token ids [batch, seq] to `.logits`
[batch, seq, vocab] — a transformers CausalLM or ptqlab's runtime model — so a quantized checkpoint is scored by
the same code path as its 16-bit baseline. `recovery` compares the two. lm-eval is optional (`ptqlab[eval]`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch

from ptqlab.errors import PtqlabError
from ptqlab.models import model_device

INSTALL_HINT = "task accuracy needs lm-eval: pip install 'ptqlab[eval]'"

try:
    from lm_eval.api.model import LM

    IMPORT_PROBLEM = None
except ImportError:  # evaluate_tasks says what to install; recovery() needs no lm-eval
    LM, IMPORT_PROBLEM = object, INSTALL_HINT
except Exception as error:  # noqa: BLE001 - an lm-eval too old for this transformers fails at import (0.4.9 on 5.x)
    LM, reason = object, (str(error).splitlines() or [""])[0]
    IMPORT_PROBLEM = (f"the installed lm-eval does not import ({type(error).__name__}: {reason}): "
                      "pip install -U 'ptqlab[eval]'")

DEFAULT_MAX_LENGTH = 2048
"""HFLM's context when neither the model config nor the tokenizer gives one."""

LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")
"""lm-eval logs under both names (modules use `__name__`; a few task helpers use "lm-eval")."""


class LogitsLM(LM):
    """lm-eval's model interface over a model whose `model(ids).logits` scores token ids from position 0.

    Greedy only: a task that asks for sampling still gets the greedy continuation (every registry task that
    ptqlab reports — MMLU, GSM8K, ARC, HellaSwag — is greedy or log-likelihood based)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int | None = None, max_gen_toks: int = 256,
                 batch_tokens: int = 8192, add_special_tokens: bool | None = None,
                 device: str | torch.device | None = None) -> None:
        """max_length: the longest input the model sees (default: the model's context, as HFLM resolves it);
        longer contexts lose tokens on the left. max_gen_toks: the generation limit when a task sets none (HFLM's
        256). batch_tokens: rows of equal length are scored together up to this many tokens per forward (it bounds
        the logits' memory: batch_tokens × vocab). add_special_tokens: None keeps the tokenizer's own rule (a BOS
        where it adds one), as HFLM does; True/False forces it (HFLM's `add_bos_token`). device: where token ids
        go (default: where the model's weights are)."""
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or context_length(model, tokenizer)
        self.max_gen_toks, self.batch_tokens = max_gen_toks, batch_tokens
        self.add_special_tokens = add_special_tokens
        self._device = torch.device(device) if device is not None else model_device(model)

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by (HFLM's rule: BOS, else EOS): the first token needs a condition."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids as HFLM's `tok_encode` makes them: the tokenizer's special tokens unless told otherwise, and
        none when the text already starts with the BOS string (a template may have put it there)."""
        add = add_special_tokens if add_special_tokens is not None else self.add_special_tokens
        bos = self.tokenizer.bos_token
        if add is None and bos and text.startswith(bos):
            add = False
        return self.tokenizer.encode(text, **({} if add is None else {"add_special_tokens": add}))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split the way lm-eval's HFLM splits them.

        Trailing spaces of the context move to the continuation (" Paris" is one token, "Paris" after a space is
        another). Non-empty context: the whole string is encoded once and split at the length of the context's
        own encoding, so the continuation gets the tokens the model would see in running text rather than the
        tokens of the continuation encoded alone. Empty context: the continuation, without special tokens, is
        conditioned on the prefix token (BOS, else EOS), unless it already starts with that token."""
        if not context:
            continuation_ids = self.encode(continuation, add_special_tokens=False)
            if continuation_ids and continuation_ids[0] == self.prefix_token_id:
                return continuation_ids[:1], continuation_ids[1:]
            return [self.prefix_token_id], continuation_ids
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the summed log-probability of the continuation and whether
        greedy decoding would produce it. Inputs longer than max_length lose context tokens on the left (HFLM's
        rule); rows of equal length share a forward, so no padding ever reaches the model."""
        inputs = []
        for context, continuation in pairs:
            if not continuation:
                raise PtqlabError("lm-eval asked for the log-likelihood of an empty continuation: the task's "
                                  "choices or target render as empty strings; check its doc_to_choice/doc_to_target")
            if len(continuation) > self.max_length:
                raise PtqlabError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                  f"{self.max_length}-token context")
            # The last token is only predicted, never an input.
            inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, ids in enumerate(inputs):
            by_length[len(ids)].append(index)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for length, indices in by_length.items():
            rows = max(1, self.batch_tokens // length)
            for start in range(0, len(indices), rows):
                chunk = indices[start:start + rows]
                ids = torch.tensor([inputs[i] for i in chunk], dtype=torch.int64, device=self._device)
                logits = self.model(ids).logits  # [rows, length, vocab]
                for row, index in enumerate(chunk):
                    continuation = pairs[index][1]
                    # float32 log-softmax: a 16-bit one loses the small differences between choices.
                    logprobs = logits[row, length - len(continuation):].float().log_softmax(-1)
                    target = torch.tensor(continuation, dtype=torch.int64, device=logprobs.device)
                    picked = logprobs.gather(-1, target[:, None])[:, 0]
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    results[index] = (float(picked.double().sum()), greedy)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's (context, continuation) requests -> (log P(continuation | context), is greedy)."""
        return self.score([self.encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's (text,) requests -> log P(text), every token scored once (perplexity tasks).

        lm-eval's own window rule (`get_rolling_token_windows`, context 1): the first window is the prefix token
        and up to max_length - 1 tokens; each later window predicts the next tokens with as much preceding text as
        fits. The text is encoded without special tokens: the prefix token (BOS, else EOS) is its condition."""
        from lm_eval import utils

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [utils.make_disjoint_window(window) for window in utils.get_rolling_token_windows(
                token_list=self.encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            totals.append(sum(logprob for logprob, _ in self.score(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """lm-eval's (context, generation kwargs) requests -> the greedy continuation, cut before the first `until`
        string; generation also stops at EOS and after max_gen_toks tokens. The context loses tokens on the left
        to leave room for max_gen_toks (HFLM's rule)."""
        outputs = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks)
            room = self.max_length - max_new
            if room <= 0:
                raise PtqlabError(f"the task asks for {max_new} generated tokens, as many as the model's "
                                  f"{self.max_length}-token context: lower its max_gen_toks")
            ids = torch.tensor([self.encode(context)[-room:]], dtype=torch.int64, device=self._device)
            outputs.append(cut_at_stop(self.tokenizer.decode(self.greedy(ids, max_new, until),
                                                             skip_special_tokens=True), until))
        return outputs

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, max_new: int, until: list[str]) -> list[int]:
        """Greedy new token ids after ids [1, P]: the model's own `generate` where it has one, else a loop that runs
        the whole sequence through the forward for every token (no cache: slow, but the same forward that
        scoring uses, so it is right for any model that scores)."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if callable(getattr(self.model, "generate", None)):
            stop = {"stop_strings": until, "tokenizer": self.tokenizer} if until else {}
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos if pad is None else pad, **stop)
            new = out[0, ids.shape[1]:].tolist()
            return new[:new.index(eos)] if eos in new else new
        new: list[int] = []
        for _ in range(max_new):
            token = int(self.model(ids).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            if until and any(s in self.tokenizer.decode(new, skip_special_tokens=True) for s in until):
                break
        return new


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string (lm-eval's post-processing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def context_length(model: torch.nn.Module, tokenizer) -> int:
    """The longest input the model takes, as HFLM resolves it (config's context, else the tokenizer's, else 2048),
    capped at the positions ptqlab's runtime model was loaded for."""
    config = getattr(model, "config", None)
    length = None
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attribute, None):
            length = int(getattr(config, attribute))
            break
    if length is None:
        # transformers' "unset" model_max_length is a huge number.
        tokenizer_length = getattr(tokenizer, "model_max_length", None)
        length = tokenizer_length if tokenizer_length and tokenizer_length < 10**9 else DEFAULT_MAX_LENGTH
    runtime_positions = getattr(model, "max_positions", None)
    return min(length, runtime_positions) if runtime_positions else length


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool):
    """lm-eval's task index, kept for the process: indexing the registry reads thousands of YAML files (tens of
    seconds on a small machine). A task file added to include_path later is not seen until the process restarts."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def find_tasks(tasks: list[str], include_path: str | None):
    """The task index that knows every name in `tasks`. Local tasks alone index in a blink, so the registry is
    indexed only when a name is not in include_path."""
    if include_path is not None:
        local = task_manager(include_path, False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = task_manager(include_path, True)
    for name in tasks:
        if name not in manager.all_tasks:
            where = f" nor in {include_path}" if include_path is not None else ""
            raise PtqlabError(f"task {name!r}: not a task, group or tag in lm-eval's registry{where}: list the names "
                              "with `lm-eval ls tasks`, or give the folder of your YAML task files as include_path")
    return manager


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Fail now, in one line, if lm-eval is missing or a task name is unknown: before any variant is measured."""
    if IMPORT_PROBLEM is not None:
        raise PtqlabError(IMPORT_PROBLEM)
    with quiet_lm_eval(False):
        find_tasks(list(tasks), str(Path(include_path).resolve()) if include_path is not None else None)


def raised_by_datasets(error: BaseException) -> bool:
    """Whether `error` came from inside the datasets library (or the Hub client under it). During an evaluation
    only the loading of a task's dataset calls it, so this is how a data failure is told from a model failure."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__", "").split(".")[0] in ("datasets", "huggingface_hub"):
            return True
        frame = frame.tb_next
    return False


@contextlib.contextmanager
def quiet_lm_eval(verbose: bool):
    """lm-eval and datasets log every step and draw progress bars on stderr; keep only errors unless verbose."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in LM_EVAL_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        # Progress bars write to sys.stderr when they start; logging handlers keep the real stream.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def json_number(value) -> float | int | None:
    """A metric value as JSON: numpy scalars become Python numbers; lm-eval's "N/A" and NaN become None."""
    value = value.item() if hasattr(value, "item") else value
    if not isinstance(value, (int, float)) or isinstance(value, float) and math.isnan(value):
        return None
    return value


def task_table(results: dict) -> dict[str, dict]:
    """lm-eval's results -> per task (and group) {metric: value, metric_stderr: value, "samples", "version",
    "num_fewshot"}. lm-eval keys metrics "metric,filter"; with the default filter ("none") the key is the metric's
    name alone, otherwise lm-eval's key is kept (gsm8k: "exact_match,strict-match")."""
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})

    def samples(name: str) -> int:
        if name in n_samples:
            return int(n_samples[name]["effective"])
        return sum(samples(child) for child in subtasks.get(name, []))

    table = {}
    for name, metrics in results["results"].items():
        scores = {}
        for key, value in metrics.items():
            if "," not in key:  # "alias" and other labels
                continue
            metric, _, filter_name = key.partition(",")
            scores[metric if filter_name == "none" else key] = json_number(value)
        scores["samples"] = samples(name)
        version = results.get("versions", {}).get(name)
        scores["version"] = version if version is None or isinstance(version, str) else json_number(version)
        shots = results.get("n-shot", {}).get(name)
        scores["num_fewshot"] = None if shots is None else int(shots)
        table[name] = scores
    return table


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], *, limit: int | None = None,
                   num_fewshot: int | None = None, seed: int = 1234, include_path: str | Path | None = None,
                   device: str | torch.device | None = None, max_length: int | None = None,
                   verbose: bool = False) -> dict:
    """Score `model` on lm-eval tasks; returns {"lm_eval_version", "settings", "tasks": {name: {metric: value,
    metric_stderr: value, "samples", "version", "num_fewshot"}}} in plain JSON types.

    tasks: names in lm-eval's registry (they fetch their data from the Hugging Face Hub) or of YAML tasks in the
    folder include_path. limit: the first `limit` documents of each task (a smoke test, not a result). num_fewshot:
    overrides the tasks' own (a task that fixes 0 keeps 0). seed: Python, NumPy, torch and few-shot sampling seeds.
    Each task runs on its own, so a failure names its task."""
    if IMPORT_PROBLEM is not None:
        raise PtqlabError(IMPORT_PROBLEM)
    import lm_eval
    from lm_eval import evaluator

    include = str(Path(include_path).resolve()) if include_path is not None else None
    adapter = LogitsLM(model, tokenizer, max_length=max_length, device=device)
    table: dict[str, dict] = {}
    with quiet_lm_eval(verbose):
        manager = find_tasks(list(tasks), include)
        for name in tasks:
            try:
                results = evaluator.simple_evaluate(
                    model=adapter, tasks=[name], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                    log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed)
            except Exception as error:
                if not raised_by_datasets(error):
                    raise
                local = include is not None and name in task_manager(include, False).all_tasks
                hint = ("a relative data_files path resolves against the working directory, not the YAML's folder"
                        if local else "offline? registry tasks fetch their data from the Hugging Face Hub")
                message = (str(error).strip().splitlines() or [""])[0]
                raise PtqlabError(f"task {name}: its dataset could not be loaded ({hint}): "
                                  f"{type(error).__name__}: {message}") from error
            table.update(task_table(results))
    return {"lm_eval_version": lm_eval.__version__,
            "settings": {"limit": limit, "num_fewshot": num_fewshot, "seed": seed, "include_path": include,
                         "max_length": adapter.max_length},
            "tasks": table}


MAIN_METRICS = ("acc_norm", "acc", "exact_match")
"""Which metric stands for a task, first present wins: acc_norm (length-normalized choice, how ARC and HellaSwag
are reported), acc (MMLU), exact_match (GSM8K; filtered variants such as "exact_match,strict-match" count, the
first that lm-eval reported)."""


def main_metric(scores: dict) -> str | None:
    """The key in a task's scores that MAIN_METRICS picks, or None."""
    for metric in MAIN_METRICS:
        if metric in scores:
            return metric
        filtered = [key for key in scores if key.startswith(metric + ",") and "_stderr" not in key]
        if filtered:
            return filtered[0]
    return None


def recovery(variant_scores: dict, baseline_scores: dict) -> dict[str, dict]:
    """Per task: {"metric", "variant", "baseline", "recovery_pct"}, where recovery_pct = variant / baseline × 100 on
    the task's main metric (MAIN_METRICS, chosen from the baseline's scores). Takes evaluate_tasks' results or their
    "tasks" tables. A task one side lacks, or a metric that is missing or 0 on the baseline, gets recovery_pct None
    (and "missing": which side) rather than disappearing from the comparison."""
    variant, baseline = (scores["tasks"] if "lm_eval_version" in scores else scores
                         for scores in (variant_scores, baseline_scores))
    table = {}
    for task in sorted(set(variant) | set(baseline)):
        if task not in variant or task not in baseline:
            table[task] = {"metric": None, "variant": None, "baseline": None, "recovery_pct": None,
                           "missing": "variant" if task not in variant else "baseline"}
            continue
        metric = main_metric(baseline[task])
        ours = variant[task].get(metric) if metric else None
        base = baseline[task].get(metric) if metric else None
        pct = 100.0 * ours / base if ours is not None and base else None
        table[task] = {"metric": metric, "variant": ours, "baseline": base, "recovery_pct": pct}
    return table
