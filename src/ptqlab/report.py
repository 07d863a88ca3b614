"""The report: results.json (everything), summary.md (one table), report.html (tables, plots, recommendation).

The HTML is self-contained (inline CSS and SVG, no scripts, no CDN), so it renders offline.
"""

from __future__ import annotations

import dataclasses
import html
import json
from datetime import datetime, timezone
from pathlib import Path

from ptqlab.measure.quality import perplexity_change
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
        if not eligible:
            return None
        winner = best(eligible, key=key)
        return {"variant": winner["name"], "value": key(winner),
                "why": f"{label} {key(winner):,.1f} {unit} among the {len(eligible)} variants within budget ({verdicts[winner['name']][1]})"}

    out["smallest"] = pick(lambda v: v["size"]["weights_bytes"] / MiB, "weights", "MiB", best=min)
    out["fastest_decode"] = pick(lambda v: v["speed"]["decode_tok_s"], "decode", "tok/s at batch 1")
    out["fastest_throughput"] = pick(lambda v: v["speed"]["throughput_tok_s"], "throughput", "tok/s")
    return out


def _ppl_change(v: dict, base: dict | None) -> tuple[float | None, float | None]:
    """Perplexity change against the baseline in percent, and its paired standard error where both results carry
    per-window losses on the same windows."""
    if base is None:
        return None, None
    windows, base_windows = v["perplexity"].get("window_nll"), base["perplexity"].get("window_nll")
    if windows and base_windows and len(windows) == len(base_windows):
        return perplexity_change(windows, base_windows)
    return 100 * (v["perplexity"]["value"] / base["perplexity"]["value"] - 1), None


def _rows(variants: list[dict], baseline: str | None) -> list[dict]:
    base = next((v for v in variants if v["name"] == baseline), None)
    rows = []
    for v in variants:
        kl = v.get("kl") or {}
        ppl = v["perplexity"]["value"]
        change, change_se = _ppl_change(v, base)
        rows.append({
            "variant": v["name"], "format": v["format"], "weights MiB": v["size"]["weights_bytes"] / MiB,
            "folder MiB": v["size"]["folder_bytes"] / MiB, "load s": v["load_s"], "peak mem MiB": v["peak_memory_bytes"] / MiB,
            "perplexity": ppl, "ppl s.e.": v["perplexity"].get("stderr"), "ppl Δ%": change, "Δ% s.e.": change_se,
            "KL mean": kl.get("mean"), "KL median": kl.get("median"), "KL p99": kl.get("p99"),
            "KL p99.9": kl.get("p99_9"), "top-1 %": kl.get("top1_agreement_pct"),
            "Δp mean %": (v.get("delta_p") or {}).get("mean_pct"), "runtime": v["speed"].get("runtime", "transformers"),
            "TTFT ms": v["speed"]["ttft_ms"],
            "decode tok/s": v["speed"]["decode_tok_s"], f"batch-{v['speed']['batch_size']} tok/s": v["speed"]["throughput_tok_s"],
        })
    return rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _recommendation_lines(rec: dict) -> list[str]:
    lines = [f"Quality budget: {Budget(**rec['budget']).describe()}."]
    for key, label in (("smallest", "Smallest within the quality budget"), ("fastest_decode", "Fastest decode (batch 1)"),
                       ("fastest_throughput", "Fastest batched throughput")):
        pick = rec.get(key)
        lines.append(f"{label}: **{pick['variant']}** — {pick['why']}." if pick else f"{label}: none within budget.")
    outside = [k for k, v in rec["verdicts"].items() if not v["within_budget"]]
    if outside:
        lines.append("Outside the budget: " + "; ".join(f"{k} ({rec['verdicts'][k]['why']})" for k in outside) + ".")
    return lines


RUNTIME_NOTES = {
    "fast": "ptqlab's runtime (quantized kernels computing with the stored weights, a static KV cache, CUDA-graph "
            "decode on GPUs; on CPUs it computes with dequantized weights). Perplexity, KL and samples come from the same "
            "runtime.",
    "transformers": "the ordinary path (eager forward with a dynamic KV cache; quantized checkpoints loaded the "
                    "ordinary way). These figures show that runtime's overhead, not what quantized kernels can do.",
}
"""What each runtime's speed figures mean, for the report's notes."""


def _notes(results: dict) -> list[str]:
    notes = []
    text = results["text"]
    if text.get("fallback"):
        notes.append(f"Perplexity/KL text: {text['source']}. These perplexities are not comparable with published WikiText-2 numbers.")
    else:
        notes.append(f"Perplexity/KL text: {text['source']}.")
    notes.append(f"Protocol: {text['protocol']}, {results['tokens_scored']:,} tokens scored in windows of {results['context']} tokens. "
                 "s.e.: standard error over windows; the change against the baseline is paired (per-window differences "
                 "on the same text), so it is much tighter than either perplexity's own.")
    computed = {v["name"]: (v.get("dtype"), v.get("stored_dtype")) for v in results["variants"]}
    upcast = [name for name, (dtype, stored) in computed.items() if stored and dtype != stored]
    if upcast:
        dtype, stored = computed[upcast[0]]
        notes.append(f"Compute dtype: {dtype} for {', '.join(upcast)} (stored as {stored}): this CPU has no native {stored} "
                     "arithmetic, which torch would emulate several times slower; quantized weights are the checkpoint's.")
    runtimes = {v["name"]: v["speed"].get("runtime", "transformers") for v in results["variants"]}
    for runtime, text in RUNTIME_NOTES.items():
        names = [name for name, r in runtimes.items() if r == runtime]
        if names:
            notes.append(f"Speed of {', '.join(names)}: runtime `{runtime}`, {text}")
    notes += [f"{v['name']}: {v['runtime_note']}." for v in results["variants"] if v.get("runtime_note")]
    if results.get("model_note"):
        notes.append(f"Model: {results['model_note']}.")
    return notes


def expert_coverage_lines(variants: list[dict]) -> list[str]:
    """A markdown section per mixture-of-experts variant: calibration tokens per expert in each layer, and how many
    experts fell back to all of the layer's tokens (the router sent them fewer than --min-expert-tokens)."""
    lines = []
    for v in variants:
        coverage = v.get("expert_coverage")
        if not coverage:
            continue
        lines += ["", f"## Expert coverage: {v['name']}", "",
                  "| layer | experts | tokens min | median | max | fell back |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['layer']} | {c['experts']} | {c['min']} | {c['median']} | {c['max']} | {c['fell_back']} |"
                  for c in coverage]
    return lines


def build_results(variants: list[dict], settings, budget: Budget, baseline: str | None, model: str | None = None) -> dict:
    first = variants[0]
    model_note = None
    if model is not None:
        from ptqlab.embedded import DEFAULT_MODEL_NAME, NOTE

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


def write_report(out: Path, variants: list[dict], settings, budget: Budget, baseline_name: str | None, model: str | None = None) -> dict:
    results = build_results(variants, settings, budget, baseline_name, model)
    rows = _rows(variants, baseline_name)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# ptqlab results{f': {model}' if model else ''}", "", f"Device: {results['device']}. Created {results['created']}.", "",
          markdown_table(rows), "", "## Recommendation", ""]
    md += [f"- {line}" for line in _recommendation_lines(results["recommendation"])]
    md += ["", "## Notes", ""] + [f"- {n}" for n in _notes(results)]
    md += expert_coverage_lines(variants)
    md += ["", "## Sample completions", ""]
    for v in variants:
        md.append(f"### {v['name']}")
        md += [f"- **{s['prompt']}** → {s['completion'].strip()!r}" for s in v["samples"]]
        md.append("")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(render_html(results, rows))
    return results


# ---------------------------------------------------------------- HTML and SVG


def _scatter(points: list[tuple[str, float, float]], x_label: str, y_label: str, width=520, height=320) -> str:
    if not points:
        return ""
    pad = 60
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.15 or 1.0

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad + -(y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle" font-size="12">{html.escape(x_label)}</text>',
             f'<text x="15" y="{height / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 15 {height / 2})">{html.escape(y_label)}</text>']
    for frac in (0, 0.5, 1):
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        parts.append(f'<text x="{sx(xv)}" y="{height - pad + 16}" text-anchor="middle" font-size="10">{xv:.3g}</text>')
        parts.append(f'<text x="{pad - 6}" y="{sy(yv) + 3}" text-anchor="end" font-size="10">{yv:.3g}</text>')
    for name, x, y in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#3366cc"/>')
        parts.append(f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bars(values: list[tuple[str, float]], label: str, width=520, bar_height=24) -> str:
    if not values:
        return ""
    left, top = 150, 30
    height = top + bar_height * len(values) + 20
    biggest = max(v for _, v in values) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{left}" y="18" font-size="12">{html.escape(label)}</text>']
    for i, (name, value) in enumerate(values):
        y = top + i * bar_height
        w = (width - left - 80) * value / biggest
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="11">{html.escape(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{bar_height - 8}" fill="#dc8a33"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 15}" font-size="11">{value:,.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(results: dict, rows: list[dict]) -> str:
    variants = results["variants"]
    esc = html.escape
    table = ["<table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in rows[0]) + "</tr>"]
    table += ["<tr>" + "".join(f"<td>{esc(_fmt(r[k]))}</td>" for k in rows[0]) + "</tr>" for r in rows]
    table.append("</table>")
    size = [(v["name"], v["size"]["weights_bytes"] / MiB) for v in variants]
    plots = [_scatter([(n, s, v["perplexity"]["value"]) for (n, s), v in zip(size, variants)], "weights (MiB)", "perplexity")]
    if any(v.get("kl") for v in variants):
        plots.append(_scatter([(n, s, v["kl"]["mean"]) for (n, s), v in zip(size, variants) if v.get("kl")], "weights (MiB)", "mean KL (nats)"))
    plots.append(_bars([(v["name"], v["speed"]["decode_tok_s"]) for v in variants], "decode tok/s (batch 1)"))
    plots.append(_bars([(v["name"], v["speed"]["throughput_tok_s"]) for v in variants],
                       f"throughput tok/s (batch {variants[0]['speed']['batch_size']})"))
    recommendation = "".join(f"<li>{esc(line).replace('**', '')}</li>" for line in _recommendation_lines(results["recommendation"]))
    notes = "".join(f"<li>{esc(n)}</li>" for n in _notes(results))
    samples = []
    for v in variants:
        samples.append(f"<h3>{esc(v['name'])}</h3><dl>")
        samples += [f"<dt>{esc(s['prompt'])}</dt><dd><pre>{esc(s['completion'].strip())}</pre></dd>" for s in v["samples"]]
        samples.append("</dl>")
    title = f"ptqlab report{': ' + results['model'] if results.get('model') else ''}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
.plots svg {{ margin: 0 1em 1em 0; border: 1px solid #eee; }} pre {{ white-space: pre-wrap; margin: 0; }}
dd {{ margin: 0 0 0.8em 1em; color: #333; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Device: {esc(results['device'])}. Created {esc(results['created'])}. Seed {results['seed']}.</p>
<h2>Recommendation</h2><ul>{recommendation}</ul>
<h2>Results</h2>{''.join(table)}
<h2>Plots</h2><div class="plots">{''.join(plots)}</div>
<h2>Notes</h2><ul>{notes}</ul>
<h2>Sample completions</h2>{''.join(samples)}
</body></html>
"""
