"""Task accuracy through lm-evaluation-harness scores what the model's logits say.

The adapter's log-likelihoods are checked against a float64 computation written out here from the same logits
(tolerance 1e-4: the adapter runs the model in float32 and takes a float32 log-softmax; the difference measured
on these tiny models is far below it). The local tasks under tests/data/tasks are scored end to end through lm-eval
and compared with the accuracy computed directly: argmax over choices of the continuation's summed log-probability.
Every model is a tiny random one (tests/tiny.py); nothing touches the Hub. Tests that need lm-eval skip without it
(`pip install 'ptqlab[eval]'`); `recovery` is pure and always runs.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from ptqlab.errors import PtqlabError
from ptqlab.measure import tasks as task_accuracy
from ptqlab.measure.tasks import recovery

DATA = Path(__file__).parent / "data" / "tasks"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="task accuracy needs lm-eval: pip install 'ptqlab[eval]'")


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def models(folder):
    """The same weights as a transformers model (float32, has .generate), ptqlab's runtime model (float32, no
    .generate: the adapter's own decoding loop) and a float64 reference."""
    from transformers import AutoModelForCausalLM

    from ptqlab.runtime import load_runtime

    return {"transformers": AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            "runtime": load_runtime(folder, dtype=torch.float32),
            "float64": AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()}


def request(*arguments, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


@torch.no_grad()
def direct_logprob(model64, tokenizer, context: str, continuation: str, max_length: int = 10**9) -> tuple[float, bool]:
    """log P(continuation | context) in float64 and whether every continuation token is the argmax: the whole
    string encoded once and split at the context's length (HFLM's rule; the tiny tokenizer adds no special
    tokens; a context's trailing spaces belong to the continuation), an empty context replaced by EOS (it has no
    BOS), inputs cut to max_length from the left."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context:
        whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    else:
        context_ids = [tokenizer.eos_token_id]
        whole = context_ids + tokenizer.encode(continuation)
    targets = whole[len(context_ids):]
    inputs = whole[:-1][-max_length:]
    logprobs = model64(torch.tensor([inputs])).logits[0].log_softmax(-1)  # [len(inputs), vocab], float64
    scored = logprobs[len(inputs) - len(targets):]
    target = torch.tensor(targets)
    return float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all())


def greedy_continuation(model64, tokenizer, context: str, tokens: int) -> list[int]:
    """Up to `tokens` argmax tokens after the context, stopping at EOS."""
    ids = tokenizer.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(tokens):
            token = int(model64(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


def write_task(folder: Path, yaml_name: str, data_file: Path) -> Path:
    """A copy of a task YAML whose data_files is absolute (datasets resolves a relative one against the working
    directory) and whose datasets cache is in `folder` (nothing written to the home cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((DATA / yaml_name).read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file.resolve())}, "cache_dir": str(folder / "cache")}
    (folder / yaml_name).write_text(yaml.safe_dump(config))
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("kind", ["transformers", "runtime"])
def test_loglikelihood_equals_float64_logprob_of_continuation(lm_eval, models, tokenizer, kind):
    pairs = [("The quick brown", " fox jumps over"), ("Paris is the capital of ", "France."),
             ("", "The lazy dog"), ("A language model", " predicts the next token from the tokens before it")]
    # One continuation that is greedy by construction: the reference's own next tokens (from the first context
    # where they decode to text that encodes back to the same tokens; a random model picks odd byte tokens).
    for context in ("The quick brown fox", "Paris is the capital of", "Quantization maps weights onto a"):
        greedy = greedy_continuation(models["float64"], tokenizer, context, 3)
        continuation = tokenizer.decode(greedy)
        if tokenizer.encode(context + continuation)[len(tokenizer.encode(context)):] == greedy:
            pairs.append((context, continuation))
            break
    adapter = task_accuracy.LogitsLM(models[kind], tokenizer)
    ours = adapter.loglikelihood([request(c, k) for c, k in pairs])
    expected = [direct_logprob(models["float64"], tokenizer, c, k) for c, k in pairs]
    for (logprob, greedy), (want, want_greedy) in zip(ours, expected):
        assert logprob == pytest.approx(want, abs=TOLERANCE)
        assert greedy == want_greedy
    assert expected[-1][1], "no candidate context gave greedy tokens that re-encode as themselves"


def test_long_context_loses_tokens_on_the_left(lm_eval, models, tokenizer):
    context, continuation = "The quick brown fox jumps over the lazy dog. " * 4, "Paris is the capital"
    adapter = task_accuracy.LogitsLM(models["transformers"], tokenizer, max_length=16)
    ((logprob, greedy),) = adapter.loglikelihood([request(context, continuation)])
    want, want_greedy = direct_logprob(models["float64"], tokenizer, context, continuation, max_length=16)
    assert logprob == pytest.approx(want, abs=TOLERANCE) and greedy == want_greedy


def test_rolling_loglikelihood_of_a_short_text_is_its_logprob_after_eos(lm_eval, models, tokenizer):
    text = "A language model predicts the next token."
    adapter = task_accuracy.LogitsLM(models["transformers"], tokenizer)
    (total,) = adapter.loglikelihood_rolling([request(text, kind="loglikelihood_rolling")])
    assert total == pytest.approx(direct_logprob(models["float64"], tokenizer, "", text)[0], abs=TOLERANCE)


def test_generate_until_stops_at_the_until_string(lm_eval, models, tokenizer):
    prompt = "The quick brown fox"
    free = {kind: task_accuracy.LogitsLM(models[kind], tokenizer).generate_until(
        [request(prompt, {"until": [], "max_gen_toks": 12}, kind="generate_until")])[0]
        for kind in ("transformers", "runtime")}
    # model.generate and the adapter's own loop decode the same greedy tokens.
    assert free["transformers"] == free["runtime"]
    text = free["transformers"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"pick another prompt: the greedy text {text!r} has no usable stop string in its middle"
    for kind in ("transformers", "runtime"):
        adapter = task_accuracy.LogitsLM(models[kind], tokenizer)
        (stopped,) = adapter.generate_until([request(prompt, {"until": [stop], "max_gen_toks": 12},
                                                     kind="generate_until")])
        assert stopped == text.split(stop)[0]
        assert len(stopped) < len(text)


def test_local_multiple_choice_accuracy_equals_direct_argmax(lm_eval, models, tokenizer, tmp_path):
    include = write_task(tmp_path / "tasks", "ptqlab_facts.yaml", DATA / "facts.jsonl")
    result = task_accuracy.evaluate_tasks(models["transformers"], tokenizer, ["ptqlab_facts"], include_path=include)
    items = read_jsonl(DATA / "facts.jsonl")
    correct = correct_norm = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        lls = torch.tensor([direct_logprob(models["float64"], tokenizer, context, " " + choice)[0]
                            for choice in item["choices"]])
        lengths = torch.tensor([float(len(choice)) for choice in item["choices"]])
        correct += int(lls.argmax()) == item["answer"]
        correct_norm += int((lls / lengths).argmax()) == item["answer"]  # lm-eval's acc_norm: per character
    scores = result["tasks"]["ptqlab_facts"]
    assert scores["acc"] == pytest.approx(correct / len(items), abs=1e-12)
    assert scores["acc_norm"] == pytest.approx(correct_norm / len(items), abs=1e-12)
    assert scores["samples"] == len(items) and scores["num_fewshot"] == 0
    assert result["lm_eval_version"] == lm_eval.__version__
    json.dumps(result, allow_nan=False)  # plain JSON types


def test_local_generation_task_exact_match_equals_direct_greedy(lm_eval, models, tokenizer, tmp_path):
    """The first two answers are replaced by the reference's own greedy answers, so exact_match is not 0 by chance."""
    items = read_jsonl(DATA / "arithmetic.jsonl")
    answers = []
    for item in items:
        text = tokenizer.decode(greedy_continuation(models["float64"], tokenizer, f"Q: {item['question']} =\nA:", 8),
                                skip_special_tokens=True)
        answers.append(task_accuracy.cut_at_stop(text, ["\n", "."]).strip())
    for item, answer in zip(items[:2], answers):
        item["answer"] = answer
    data = tmp_path / "arithmetic.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    include = write_task(tmp_path / "tasks", "ptqlab_arithmetic.yaml", data)
    result = task_accuracy.evaluate_tasks(models["transformers"], tokenizer, ["ptqlab_arithmetic"],
                                          include_path=include)
    expected = sum(answer == item["answer"] for answer, item in zip(answers, items)) / len(items)
    assert expected >= 2 / len(items)
    assert result["tasks"]["ptqlab_arithmetic"]["exact_match"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow  # indexes lm-eval's whole registry (~15 s): make test-all
def test_unknown_task_name_is_a_one_line_error(lm_eval, models, tokenizer, tmp_path):
    include = write_task(tmp_path / "tasks", "ptqlab_facts.yaml", DATA / "facts.jsonl")
    with pytest.raises(PtqlabError, match="lm-eval ls tasks") as raised:
        task_accuracy.evaluate_tasks(models["transformers"], tokenizer, ["no_such_task_anywhere"], include_path=include)
    assert "no_such_task_anywhere" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow  # indexes lm-eval's whole registry (~15 s): make test-all
def test_missing_dataset_is_a_one_line_error_naming_the_task(lm_eval, models, tokenizer, tmp_path):
    include = write_task(tmp_path / "tasks", "ptqlab_facts.yaml", tmp_path / "absent.jsonl")
    with pytest.raises(PtqlabError, match="task ptqlab_facts: its dataset could not be loaded") as raised:
        task_accuracy.evaluate_tasks(models["transformers"], tokenizer, ["ptqlab_facts"], include_path=include)
    assert "\n" not in str(raised.value)


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(task_accuracy, "IMPORT_PROBLEM", task_accuracy.INSTALL_HINT)
    with pytest.raises(PtqlabError, match=r"pip install 'ptqlab\[eval\]'"):
        task_accuracy.evaluate_tasks(torch.nn.Linear(1, 1), None, ["ptqlab_facts"])


def test_recovery_uses_acc_norm_then_acc_then_exact_match():
    baseline = {"arc": {"acc": 0.5, "acc_norm": 0.6}, "mmlu": {"acc": 0.4, "acc_stderr": 0.01},
                "gsm8k": {"exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": 0.02,
                          "exact_match,flexible-extract": 0.35}}
    variant = {"arc": {"acc": 0.45, "acc_norm": 0.3}, "mmlu": {"acc": 0.3, "acc_stderr": 0.01},
               "gsm8k": {"exact_match,strict-match": 0.15, "exact_match,flexible-extract": 0.35}}
    table = recovery(variant, baseline)
    assert table["arc"] == {"metric": "acc_norm", "variant": 0.3, "baseline": 0.6, "recovery_pct": pytest.approx(50.0)}
    assert table["mmlu"]["metric"] == "acc" and table["mmlu"]["recovery_pct"] == pytest.approx(75.0)
    assert table["gsm8k"]["metric"] == "exact_match,strict-match"
    assert table["gsm8k"]["recovery_pct"] == pytest.approx(50.0)


def test_recovery_accepts_evaluate_tasks_results_and_keeps_missing_tasks():
    baseline = {"lm_eval_version": "0.4.13", "tasks": {"arc": {"acc": 0.5}, "hellaswag": {"acc_norm": 0.4}}}
    variant = {"lm_eval_version": "0.4.13", "tasks": {"arc": {"acc": 0.5}, "piqa": {"acc": 0.7}}}
    table = recovery(variant, baseline)
    assert table["arc"]["recovery_pct"] == pytest.approx(100.0)
    assert table["hellaswag"] == {"metric": None, "variant": None, "baseline": None, "recovery_pct": None,
                                  "missing": "variant"}
    assert table["piqa"]["missing"] == "baseline" and table["piqa"]["recovery_pct"] is None


def test_recovery_is_undefined_for_a_zero_or_metricless_baseline():
    table = recovery({"a": {"acc": 0.2}, "b": {"bleu": 3.0}}, {"a": {"acc": 0.0}, "b": {"bleu": 4.0}})
    assert table["a"]["recovery_pct"] is None
    assert table["b"] == {"metric": None, "variant": None, "baseline": None, "recovery_pct": None}


def test_bench_scores_every_variant_on_the_tasks_and_reports_recovery(lm_eval, folder, tmp_path):
    from ptqlab.api import quantize
    from ptqlab.measure.variant import BenchSettings
    from ptqlab.benchmark import bench

    tasks = write_task(tmp_path / "tasks", "ptqlab_facts.yaml", DATA / "facts.jsonl")
    quantized = quantize(str(folder), "w4a16-rtn", out=tmp_path / "w4a16-rtn", quiet=True, device="cpu")
    settings = BenchSettings(ppl_text="python-docs", ppl_context=64, ppl_windows=2, max_new_tokens=2, batch_size=1,
                             batch_sizes=(1,), repeats=1, sample_tokens=2, device="cpu", tasks=("ptqlab_facts",),
                             tasks_path=str(tasks))
    out = bench([str(folder), str(quantized)], tmp_path / "bench", settings=settings, quiet=True)
    results = json.loads((out / "results.json").read_text())
    scores = {v["name"]: v["tasks"]["tasks"]["ptqlab_facts"]["acc_norm"] for v in results["variants"]}
    assert set(scores) == {"baseline", "w4a16-rtn"} and all(0 <= s <= 1 for s in scores.values())
    summary = (out / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| ptqlab_facts |"))
    if scores["baseline"]:
        assert f"({100 * scores['w4a16-rtn'] / scores['baseline']:.1f} %)" in row
    bad = BenchSettings(device="cpu", tasks=("ptqlab_no_such_task",), tasks_path=str(tasks))
    with pytest.raises(PtqlabError, match="ptqlab_no_such_task"):  # before anything is measured
        bench([str(folder)], tmp_path / "bad", settings=bad, quiet=True)
    assert not (tmp_path / "bad" / "variants" / "baseline.json").exists()
