"""Honest numbers: perplexity by hand, KL's zero and ordering, timing that excludes warm-up, the report."""

import time

import pytest
import torch

from ptqlab.measure.quality import PPL_PROTOCOLS, TopK, coarse_kl, evaluate, make_windows
from ptqlab.measure.speed import SPEED_PROMPT, TransformersEngine, chat_prompt_ids, greedy_decode, measure_speed, repeat_timed
from ptqlab.errors import PtqlabError
from ptqlab.measure.variant import BenchSettings
from ptqlab.recommend import recommend
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", torch.float32)


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 384, (5 * 64 + 10,), generator=torch.Generator().manual_seed(0))


def test_perplexity_is_exp_of_mean_nll_over_exactly_the_scored_tokens(model, token_ids):
    windows = make_windows(len(token_ids), 64)
    assert windows == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 320)]  # the 10 leftover tokens dropped
    result = evaluate(model, token_ids, windows, quiet=True)

    nll, scored = 0.0, 0
    with torch.no_grad():
        for start, end in windows:
            window = token_ids[start:end]
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(len(window) - 1):  # position t predicts token t+1; the window's first token is not scored
                nll -= float(logprobs[t, window[t + 1]])
                scored += 1
    assert result.tokens == scored == 5 * 63
    assert result.perplexity == pytest.approx(float(torch.tensor(nll / scored).exp()), rel=1e-5)
    assert result.summary()["perplexity"]["tokens_scored"] == 315


def test_the_llama_cpp_protocol_scores_the_second_half_of_windows_that_start_with_bos(model, token_ids):
    windows = make_windows(len(token_ids), 64)
    bos = 7
    result = evaluate(model, token_ids, windows, quiet=True, protocol=PPL_PROTOCOLS["llama.cpp"], bos_id=bos)

    nll, scored = 0.0, 0
    with torch.no_grad():
        for start, end in windows:
            window = token_ids[start:end].clone()
            window[0] = bos
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(32, 63):  # llama.cpp: first = n_ctx/2; positions first..n_ctx-2 predict the next token
                nll -= float(logprobs[t, window[t + 1]])
                scored += 1
    assert result.tokens == scored == 5 * 31
    assert result.perplexity == pytest.approx(float(torch.tensor(nll / scored).exp()), rel=1e-5)
    protocol = result.summary()["perplexity"]["protocol"]
    assert protocol["name"] == "llama.cpp" and "BOS (token 7)" in protocol["bos"] and "34..64" in protocol["scored"]
    gptq = evaluate(model, token_ids, windows, quiet=True)
    with pytest.raises(PtqlabError, match="other tokens"):  # KL never pairs positions of two protocols
        evaluate(model, token_ids, windows, baseline=gptq.topk, quiet=True, protocol=PPL_PROTOCOLS["llama.cpp"], bos_id=bos)
    with pytest.raises(PtqlabError, match="unknown --ppl-protocol 'llamacpp': use one of gptq, llama.cpp"):
        BenchSettings(ppl_protocol="llamacpp")


def test_quick_probe_takes_the_first_windows_and_short_texts_are_refused():
    assert make_windows(10_000, 512, 20) == [(i * 512, (i + 1) * 512) for i in range(19)]
    assert len(make_windows(100_000, 512, 20)) == 20
    with pytest.raises(PtqlabError, match="fewer than one window"):
        make_windows(100, 512)


def test_kl_is_zero_for_the_baseline_against_itself(model, token_ids):
    windows = make_windows(len(token_ids), 64)
    base = evaluate(model, token_ids, windows, quiet=True)
    again = evaluate(model, token_ids, windows, baseline=base.topk, quiet=True)
    assert torch.equal(again.kl, torch.zeros_like(again.kl))
    assert again.top1_agreement == 1.0
    assert again.summary()["kl"]["positions"] == 315


def test_kl_is_positive_for_a_perturbed_copy(model, token_ids):
    windows = make_windows(len(token_ids), 64)
    base = evaluate(model, token_ids, windows, quiet=True)
    noisy = tiny_model("llama", torch.float32)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    result = evaluate(noisy, token_ids, windows, baseline=base.topk, quiet=True)
    assert (result.kl >= 0).all() and result.kl.mean() > 1e-4
    assert result.top1_agreement < 1.0


def test_delta_p_is_the_change_in_the_next_tokens_probability(model, token_ids, tmp_path):
    """Δp per position against a float64 reference from both models' full softmax; the baseline's next-token
    log-probabilities survive its file; a file without them (written before) gives no Δp, not a wrong one."""
    windows = make_windows(len(token_ids), 64)
    base = evaluate(model, token_ids, windows, quiet=True)
    base.topk.save(tmp_path / "base.safetensors")
    noisy = tiny_model("llama", torch.float32)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    result = evaluate(noisy, token_ids, windows, baseline=TopK.load(tmp_path / "base.safetensors"), quiet=True)
    expected = []
    with torch.no_grad():
        for start, end in windows:
            window = token_ids[start:end]
            p_base, p_noisy = (torch.softmax(m(window[None]).logits[0, :-1].double(), -1)
                               .gather(-1, window[1:, None])[:, 0] for m in (model, noisy))
            expected.append(p_noisy - p_base)
    torch.testing.assert_close(result.delta_p, torch.cat(expected), rtol=0, atol=1e-6)
    summary = result.summary()["delta_p"]
    assert summary["positions"] == 315 and summary["min_pct"] <= summary["percentiles_pct"]["p50"] <= summary["max_pct"]
    assert summary["mean_pct"] == pytest.approx(100 * float(torch.cat(expected).mean()), abs=1e-4)
    assert result.summary()["kl"]["p99_9"] <= result.summary()["kl"]["max"]
    old = TopK(base.topk.ids, base.topk.logprobs, base.topk.digest)  # as files from before Δp were
    assert evaluate(noisy, token_ids, windows, baseline=old, quiet=True).summary()["delta_p"] is None


def test_coarse_kl_is_a_lower_bound_that_becomes_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(50, 384, generator=g) * 3, -1)
    q = torch.log_softmax(torch.randn(50, 384, generator=g) * 3, -1)
    exact = (p.double().exp() * (p.double() - q.double())).sum(-1)
    for k in (1, 8, 64):
        values, ids = p.topk(k, -1)
        assert (coarse_kl(ids, values, q) <= exact + 1e-9).all()
    values, ids = p.topk(384, -1)
    assert torch.allclose(coarse_kl(ids, values, q), exact, rtol=1e-5, atol=1e-7)


def test_kl_against_other_tokens_is_refused(model, token_ids):
    base = evaluate(model, token_ids, make_windows(len(token_ids), 64), quiet=True)
    with pytest.raises(PtqlabError, match="computed on other tokens"):
        evaluate(model, token_ids, make_windows(len(token_ids), 32), baseline=base.topk, quiet=True)


def test_topk_file_round_trips(model, token_ids, tmp_path):
    base = evaluate(model, token_ids, make_windows(len(token_ids), 64), topk=8, quiet=True)
    base.topk.save(tmp_path / "topk.safetensors")
    loaded = TopK.load(tmp_path / "topk.safetensors")
    assert torch.equal(loaded.ids, base.topk.ids) and torch.equal(loaded.logprobs, base.topk.logprobs)
    assert loaded.digest == base.topk.digest and loaded.ids.shape == (315, 8)


def test_timed_repeats_exclude_the_warmup():
    calls = []

    def run():
        start = time.perf_counter()
        time.sleep(0.3 if not calls else 0.01)  # the first call pays a one-off cost (lazy init, compilation)
        calls.append(1)
        return {"s": time.perf_counter() - start}

    timings = repeat_timed(run, warmup=1, repeats=3)
    assert len(calls) == 4 and len(timings) == 3
    assert all(t["s"] < 0.2 for t in timings)


class SlowFirstCall(torch.nn.Module):
    """Wraps a model; its very first forward sleeps, like a lazily compiled kernel."""

    def __init__(self, model):
        super().__init__()
        self.model, self.forwards = model, 0

    def forward(self, **kwargs):
        if self.forwards == 0:
            time.sleep(0.5)
        self.forwards += 1
        return self.model(**kwargs)


def test_speed_measures_exactly_the_requested_tokens_after_warmup(model):
    wrapped = SlowFirstCall(model)
    speed = measure_speed(TransformersEngine(wrapped), chat_prompt_ids(tiny_tokenizer(), SPEED_PROMPT), new_tokens=6,
                          batch_size=2, repeats=3, warmup=1)
    # warm-up (6 forwards) + 3 timed runs of 6 forwards (1 prefill + 5 decode steps), at batch 1 and at batch 2
    assert wrapped.forwards == 2 * (6 + 3 * 6)
    assert len(speed["repeats"]["batch1"]) == 3 and len(speed["repeats"]["batched"]) == 3
    assert all(r["ttft_s"] < 0.5 for r in speed["repeats"]["batch1"])  # the slow first call was the warm-up
    assert speed["new_tokens"] == 6 and speed["batch_size"] == 2 and speed["decode_tok_s"] > 0


def test_greedy_decode_ignores_eos(model):
    """Every variant decodes the same number of tokens: a model that predicts end-of-sequence at every step is still
    run for the prefill and exactly N - 1 decode steps."""
    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    calls = []

    def always_eos(*args, **kwargs):
        out = model(*args, **kwargs)
        out.logits[..., eos] = out.logits.max() + 1.0
        calls.append(kwargs["input_ids"].shape[1])
        return out

    timing = greedy_decode(always_eos, torch.tensor([[5, 6, 7]]), 10, lambda: None)
    assert calls == [3] + [1] * 9
    assert timing["total_s"] >= timing["ttft_s"] and timing["total_s"] >= timing["decode_s"]


def variant(name, mib, ppl, kl, decode, throughput):
    return {"name": name, "size": {"weights_bytes": mib * 2**20}, "perplexity": {"value": ppl},
            "kl": None if kl is None else {"mean": kl}, "speed": {"decode_tok_s": decode, "throughput_tok_s": throughput}}


def test_recommendation_picks_within_the_quality_budget():
    from ptqlab.recommend import Budget

    variants = [variant("baseline", 256, 10.0, None, 30, 100), variant("fp8", 160, 10.2, 0.01, 40, 150),
                variant("w8a8", 160, 10.3, 0.02, 45, 140), variant("w4", 110, 14.0, 0.30, 60, 90)]
    rec = recommend(variants, "baseline", Budget(max_kl=0.05, max_ppl_increase=5.0))
    assert rec["within_budget"] == ["baseline", "fp8", "w8a8"]
    assert rec["smallest"]["variant"] in ("fp8", "w8a8") and rec["fastest_decode"]["variant"] == "w8a8"
    assert rec["fastest_throughput"]["variant"] == "fp8"
    assert not rec["verdicts"]["w4"]["within_budget"] and "KL 0.3000" in rec["verdicts"]["w4"]["why"]
    loose = recommend(variants, "baseline", Budget(max_kl=1.0, max_ppl_increase=50.0))
    assert loose["smallest"]["variant"] == "w4" and loose["fastest_decode"]["variant"] == "w4"



def test_budget_says_whether_a_variant_fits_and_why():
    from ptqlab.recommend import Budget

    budget = Budget(max_kl=0.05, max_ppl_increase=5.0)
    assert budget.verdict(0.05, 5.0) == (True, "KL 0.0500 nats, perplexity +5.00%")  # the limits are inclusive
    assert budget.verdict(0.051, 1.0)[0] is False and budget.verdict(0.01, 5.1)[0] is False
    assert budget.verdict(None, 0.0) == (False, "KL not measured, perplexity +0.00%")  # unknown distance never fits
    assert budget.describe() == "mean KL at most 0.05 nats per token, perplexity at most +5% over the baseline"

def test_ptqlab_bench_is_the_verb_even_after_the_measurement_package_is_imported():
    """One meaning per name: importing the measurement package must not replace `ptqlab.bench` with a module."""
    import ptqlab
    import ptqlab.measure.variant
    import ptqlab.measure.worker  # noqa: F401
    import ptqlab.benchmark

    assert ptqlab.bench is ptqlab.benchmark.bench and callable(ptqlab.bench)


class ClockEngine:
    """An engine whose decode step costs 10 ms plus 1 ms per sequence: the sweep's figures are known exactly."""

    name, device = "clock", torch.device("cpu")

    def __init__(self) -> None:
        self.calls = []

    def timed(self, ids, new_tokens):
        self.calls.append((ids.shape[0], new_tokens))
        step = 0.010 + 0.001 * ids.shape[0]
        return {"ttft_s": 0.05, "decode_s": step * (new_tokens - 1), "total_s": 0.05 + step * (new_tokens - 1)}


def test_the_batch_sweep_gives_the_decode_rate_of_all_sequences_at_every_batch_size():
    engine = ClockEngine()
    speed = measure_speed(engine, torch.ones(1, 5, dtype=torch.long), new_tokens=9, batch_size=4, repeats=2, warmup=1,
                          batch_sizes=(1, 8, 32))
    assert [s["batch"] for s in speed["sweep"]] == [1, 4, 8, 32]  # batch_size joins the sweep
    for s in speed["sweep"]:
        assert s["decode_tok_s"] == pytest.approx(s["batch"] / (0.010 + 0.001 * s["batch"]))
        assert s["throughput_tok_s"] == pytest.approx(s["batch"] * 9 / (0.05 + 8 * (0.010 + 0.001 * s["batch"])))
    assert speed["decode_tok_s"] == speed["sweep"][0]["decode_tok_s"]
    assert speed["throughput_tok_s"] == speed["sweep"][1]["throughput_tok_s"]
    # every batch size: one short warm-up, then the timed repeats of the full length
    assert engine.calls == [call for b in (1, 4, 8, 32) for call in [(b, 9)] + [(b, 9)] * 2]
