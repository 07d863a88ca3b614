"""What a lab's measurements say: the quality budget, the recommendation (the smallest variant within the budget, the
fastest decode and throughput, the fastest variant at each batch size, the Pareto front of size against KL), and
results.json's content. Data in, data out: report.py renders it as Markdown and HTML."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone

from ptqlab.embedded import DEFAULT_MODEL_NAME, NOTE
from ptqlab.record import versions


SCHEMA = "ptqlab.results/1"


MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Budget:
    """The quality budget a variant must meet to be recommended: how far its next-token distributions and its
    perplexity may move from the baseline's. It lives here, beside `recommend`, the one place that applies it."""

    max_kl: float = 0.05
    """Mean KL divergence from the baseline, in nats per token."""
    max_ppl_increase: float = 5.0
    """Perplexity increase over the baseline, in percent."""

    def verdict(self, kl: float | None, ppl_increase: float) -> tuple[bool, str]:
        """(whether a variant with this mean KL and perplexity increase is within the budget, those figures in words).
        A variant without a KL is not: its distance from the baseline is unknown."""
        fits = kl is not None and kl <= self.max_kl and ppl_increase <= self.max_ppl_increase
        kl_words = "KL not measured" if kl is None else f"KL {kl:.4f} nats"
        return fits, f"{kl_words}, perplexity {ppl_increase:+.2f}%"

    def describe(self) -> str:
        return f"mean KL at most {self.max_kl:g} nats per token, perplexity at most {self.max_ppl_increase:+g}% over the baseline"


def recommend(variants: list[dict], baseline: str | None, budget: Budget) -> dict:
    """The smallest variant within the quality budget, the fastest decode, the fastest batched throughput."""
    base = next((v for v in variants if v["name"] == baseline), None)

    def within(v: dict) -> tuple[bool, str]:
        if base is None:
            return True, "no baseline to compare with"
        if v["name"] == baseline:
            return True, "the baseline"
        kl = (v.get("kl") or {}).get("mean")
        return budget.verdict(kl, 100 * (v["perplexity"]["value"] / base["perplexity"]["value"] - 1))

    verdicts = {v["name"]: within(v) for v in variants}
    eligible = [v for v in variants if verdicts[v["name"]][0]]
    out = {"budget": dataclasses.asdict(budget), "within_budget": [v["name"] for v in eligible],
           "verdicts": {k: {"within_budget": ok, "why": why} for k, (ok, why) in verdicts.items()}}

    def pick(key, label: str, unit: str, best=max) -> dict | None:
        measured = [v for v in eligible if key(v) is not None]  # a GGUF variant has no speed figures of its own
        if not measured:
            return None
        winner = best(measured, key=key)
        return {"variant": winner["name"], "value": key(winner),
                "why": f"{label} {key(winner):,.1f} {unit} among the {len(measured)} variants within budget ({verdicts[winner['name']][1]})"}

    out["smallest"] = pick(lambda v: v["size"]["weights_bytes"] / MiB, "weights", "MiB", best=min)
    out["fastest_decode"] = pick(lambda v: v["speed"]["decode_tok_s"], "decode", "tok/s at batch 1")
    out["fastest_throughput"] = pick(lambda v: v["speed"]["throughput_tok_s"], "throughput", "tok/s")
    out["pareto_front"] = pareto_front(size_kl_points(variants, baseline))
    out["fastest_by_batch"] = fastest_by_batch(eligible)
    return out


def fastest_by_batch(variants: list[dict]) -> list[dict]:
    """At each batch size of the variants' decode sweep, the variant with the most decode tok/s (all sequences
    together): [{batch, variant, decode_tok_s, runner_up, runner_up_tok_s}], smallest batch first. A batch size some
    variant did not run is judged among those that did."""
    by_batch: dict[int, list[tuple[float, str]]] = {}
    for v in variants:
        for point in (v.get("speed") or {}).get("sweep") or []:
            by_batch.setdefault(point["batch"], []).append((point["decode_tok_s"], v["name"]))
    table = []
    for batch in sorted(by_batch):
        ranked = sorted(by_batch[batch], reverse=True)
        (rate, name), runner = ranked[0], (ranked[1] if len(ranked) > 1 else (None, None))
        table.append({"batch": batch, "variant": name, "decode_tok_s": rate, "runner_up": runner[1],
                      "runner_up_tok_s": runner[0]})
    return table


def crossover_words(table: list[dict]) -> str:
    """'w4a16 fastest up to 8 sequences, fp8-dynamic from 32' from fastest_by_batch's table: consecutive batch sizes
    with one winner are one stretch."""
    if not table:
        return ""
    stretches: list[list[dict]] = []
    for row in table:
        if stretches and stretches[-1][-1]["variant"] == row["variant"]:
            stretches[-1].append(row)
        else:
            stretches.append([row])
    if len(stretches) == 1:
        sizes = ", ".join(str(r["batch"]) for r in table)
        return f"{table[0]['variant']} fastest at every batch size measured ({sizes})"
    words = []
    for i, stretch in enumerate(stretches):
        first, last = stretch[0]["batch"], stretch[-1]["batch"]
        if i == 0:
            where = f"up to {last} sequences" if last != first else f"at batch {first}"
        elif i == len(stretches) - 1:
            where = f"from {first}"
        else:
            where = f"from {first} to {last}" if first != last else f"at {first}"
        close = [f"{r['runner_up']} within {100 * (1 - r['runner_up_tok_s'] / r['decode_tok_s']):.0f} % at {r['batch']}"
                 for r in stretch if r["runner_up"] and r["runner_up_tok_s"] >= (1 - CLOSE_CALL) * r["decode_tok_s"]]
        words.append(f"{stretch[0]['variant']} fastest {where}" + (f" ({'; '.join(close)})" if close else ""))
    return ", ".join(words)


CLOSE_CALL = 0.05
"""A runner-up this close (a fraction of the winner's tok/s) is named beside the winner: a difference of a few
percent can turn with the next driver or the next run."""


def size_kl_points(variants: list[dict], baseline: str | None) -> list[tuple[str, float, float | None]]:
    """(name, weights MiB, mean KL) per variant. The baseline sits at KL 0, its distance from itself; a variant whose
    KL was not measured has None."""
    return [(v["name"], v["size"]["weights_bytes"] / MiB,
             0.0 if v["name"] == baseline else (v.get("kl") or {}).get("mean")) for v in variants]


def pareto_front(points: list[tuple[str, float, float | None]]) -> list[str]:
    """The names of the (name, size, KL) points that no other point dominates (size and KL both no larger, one of
    them smaller), in order of size: the variants worth considering when trading size against quality. A point
    without a KL is at an unknown distance from the baseline, so it neither joins the front nor pushes others off;
    equal points do not dominate each other, so ties stay on the front together."""
    known = [(name, size, kl) for name, size, kl in points if kl is not None and math.isfinite(kl)]

    def dominated(p: tuple[str, float, float]) -> bool:
        return any(q[1] <= p[1] and q[2] <= p[2] and (q[1] < p[1] or q[2] < p[2]) for q in known)

    return [name for name, _, _ in sorted((p for p in known if not dominated(p)), key=lambda p: (p[1], p[2]))]


def build_results(variants: list[dict], settings, budget: Budget, baseline: str | None, model: str | None = None) -> dict:
    first = variants[0]
    model_note = None
    if model is not None:
        model_note = NOTE if model == DEFAULT_MODEL_NAME else None
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "model_note": model_note,
        "device": first["device"],
        "versions": versions(),
        "seed": settings.seed,
        "settings": {**dataclasses.asdict(settings), "protocol": settings.protocol},
        "text": first["text"],
        "tokens_scored": first["perplexity"]["tokens_scored"],
        "context": first["perplexity"]["context"],
        "baseline": baseline,
        "variants": variants,
        "recommendation": recommend(variants, baseline, budget),
    }
