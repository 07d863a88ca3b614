"""The report: results.json (everything), summary.md (one table), report.html (tables, plots, recommendation), written
from the measurements and what recommend.py makes of them.

The HTML is self-contained (inline CSS and SVG, no scripts, no CDN), so it renders offline. Its plots place their
labels by estimated text boxes (`place_labels`), since no browser measures them at write time; the size-vs-KL
plot and the recommendation name the Pareto front; sample completions sit side by side, one row per prompt.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from ptqlab.errors import PtqlabError
from ptqlab.measure.quality import perplexity_change
from ptqlab.output import write_atomically
from ptqlab.plots import FRONT_COLOUR, bars as _bars, layer_bars, scatter as _scatter
from ptqlab.recommend import MiB, Budget, build_results, crossover_words, size_kl_points


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


PARETO_LABEL = "Pareto front (size vs KL)"
CARD_COLUMNS = ("variant", "format", "weights MiB", "perplexity", "ppl Δ%", "KL mean", "top-1 %", "decode tok/s")
"""The results table's columns a model card or an issue needs (with the throughput column, named by its batch size);
the rest (load time, memory, tail KL) stay in summary.md and report.html."""
RESULTS_MD = "results.md"


def results_markdown(results: dict) -> str:
    """The results table as Markdown, from results.json alone (so an old lab folder exports too), with the protocol
    beside it, since perplexities from different tools and settings are not comparable, and the deployment paths."""
    rows = [{k: v for k, v in row.items() if k in CARD_COLUMNS or k.startswith("batch-")}
            for row in _rows(results["variants"], results.get("baseline"))]
    text = results["text"]
    versions = results.get("versions") or {}
    protocol = (f"Perplexity: {text['name']} ({text.get('source', '')}), {results['settings']['protocol']}, context "
                f"{results['context']}, {results['tokens_scored']} tokens scored; KL against {results.get('baseline')}. "
                f"Device: {results['device']}. ptqlab {versions.get('ptqlab', '?')}, transformers "
                f"{versions.get('transformers', '?')}, torch {versions.get('torch', '?')}.")
    lines = [markdown_table(rows), "", protocol] + deployment_lines(results["variants"])
    return "\n".join(lines) + "\n"


def write_results_markdown(folder: Path) -> Path:
    """results.md beside the report, from its results.json; a folder without one is refused in one line."""
    source = Path(folder) / "results.json"
    if not source.is_file():
        raise PtqlabError(f"{folder}: no results.json to export; run the lab there first (or name its folder with --out)")
    path = Path(folder) / RESULTS_MD
    write_atomically(path, results_markdown(json.loads(source.read_text())))
    return path


def _recommendation_lines(rec: dict) -> list[str]:
    lines = [f"Quality budget: {Budget(**rec['budget']).describe()}."]
    for key, label in (("smallest", "Smallest within the quality budget"), ("fastest_decode", "Fastest decode (batch 1)"),
                       ("fastest_throughput", "Fastest batched throughput")):
        pick = rec.get(key)
        lines.append(f"{label}: **{pick['variant']}** — {pick['why']}." if pick else f"{label}: none within budget.")
    if rec.get("fastest_by_batch"):
        lines.append(f"Fastest decode by batch size (all sequences' tok/s, within budget): "
                     f"{crossover_words(rec['fastest_by_batch'])}.")
    front = rec.get("pareto_front")
    if front is not None:
        lines.append(f"{PARETO_LABEL}: {', '.join(front) if front else 'none (no variant has a measured KL)'}.")
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
    scoring = results["variants"][0]["perplexity"].get("protocol") or {}
    how = f" ({scoring['scored']}; {scoring['bos']})" if "bos" in scoring else ""
    notes.append(f"Protocol: {text['protocol']}{how}, {results['tokens_scored']:,} tokens scored in windows of {results['context']} tokens. "
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
    emulated = [v["name"] for v in results["variants"] if v["speed"].get("runtime") == "fast" and v.get("format") != "dense"
                and any(kernel in ("dequantized", "mixed") for role, kernel in (v.get("kernels") or {}).items()
                        if role != "lm_head")]
    if emulated:
        notes.append(f"Speed of {', '.join(emulated)}: emulated, no kernel for this format in ptqlab's runtime on this "
                     "device yet: layers are dequantized to 16-bit and computed as such, so the speed is not what the "
                     "format can reach (its quality figures are real).")
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


def sweep_lines(variants: list[dict]) -> list[str]:
    """A markdown table of decode tok/s (all sequences together) per variant and batch size, when measured."""
    sizes = sorted({p["batch"] for v in variants for p in (v["speed"].get("sweep") or [])})
    if not sizes:
        return []
    lines = ["", "## Decode by batch size", "", "tok/s of all sequences together, prefill excluded.", "",
             "| variant | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for v in variants:
        rates = {p["batch"]: p["decode_tok_s"] for p in v["speed"].get("sweep") or []}
        lines.append(f"| {v['name']} | " + " | ".join(_fmt(rates.get(b)) for b in sizes) + " |")
    return lines


def deployment_lines(variants: list[dict]) -> list[str]:
    """A markdown table of the engine path that serves each quantized variant on each GPU generation (a row per
    config group family; the 16-bit baseline and GGUF variants have none), with the versions it was read from: the
    fastest variant on this machine may have no fast path on the reader's GPU."""
    rows = [(v["name"], d) for v in variants for d in v.get("deployment") or []]
    if not rows:
        return []
    generations = list(rows[0][1]["paths"])
    sources = list(dict.fromkeys(d["source"] for _, d in rows))
    lines = ["", "## Deployment paths", "", "Which serving kernel runs each variant, per GPU generation. Read from: "
             + "; ".join(sources) + ".", "",
             "| variant | family | " + " | ".join(generations) + " |", "|---|---|" + "---|" * len(generations)]
    lines += [f"| {name} | {d['family']} | " + " | ".join(d["paths"].get(g, "–") for g in generations) + " |"
              for name, d in rows]
    return lines


def task_lines(variants: list[dict], baseline: str | None) -> list[str]:
    """A markdown table of task accuracy (lm-eval): each task's main metric per variant, and the variant's recovery
    (its score / the baseline's, in percent) beside it."""
    scored = [v for v in variants if v.get("tasks")]
    if not scored:
        return []
    from ptqlab.measure.tasks import recovery  # optional dependency: imports lm-eval where installed
    base = next((v for v in scored if v["name"] == baseline), None)
    tasks = sorted({t for v in scored for t in v["tasks"]["tasks"]})
    first = scored[0]["tasks"]
    limit = first["settings"].get("limit")
    lines = ["", "## Task accuracy", "",
             f"lm-eval {first['lm_eval_version']}, through each variant's runtime; the main metric of each task "
             "(acc_norm, else acc, else exact_match), and in brackets its recovery: variant / baseline × 100."
             + (f" Only the first {limit} documents of each task: a smoke test, not a result." if limit else ""), "",
             "| task | metric | " + " | ".join(v["name"] for v in scored) + " |", "|---|---|" + "---|" * len(scored)]
    recoveries = {v["name"]: recovery(v["tasks"], base["tasks"]) if base else {} for v in scored}
    for task in tasks:
        metric = next((r[task]["metric"] for r in recoveries.values() if r.get(task, {}).get("metric")), None)
        cells = []
        for v in scored:
            score = (v["tasks"]["tasks"].get(task) or {}).get(metric) if metric else None
            pct = recoveries[v["name"]].get(task, {}).get("recovery_pct")
            cells.append(_fmt(score) + (f" ({pct:.1f} %)" if pct is not None and v is not base else ""))
        lines.append(f"| {task} | {metric or '–'} | " + " | ".join(cells) + " |")
    return lines


WORST_PARTS = 10


def sensitivity_lines(sensitivity: dict | None, variants: list[dict]) -> list[str]:
    """The sensitivity run's findings: the uniform recipe, the mixed recipe (predicted and, where the lab measured
    it, measured KL and size), and the most sensitive parts."""
    if not sensitivity:
        return []
    uniform, mixed = sensitivity["uniform"], sensitivity.get("mixed") or {}
    recipe = (sensitivity.get("recipe") or {}).get("name", "the recipe")
    lines = ["", f"## Sensitivity: {recipe}", "",
             f"KL from the baseline with one part at a time quantized (the rest 16-bit), on "
             f"{sensitivity['windows']} windows of {sensitivity['context']} tokens. All parts: KL "
             f"{uniform['kl_mean']:.4f}, weights {uniform['weights_bytes'] / MiB:,.1f} MiB."]
    if mixed:
        measured = next((v for v in variants if v["name"] == mixed.get("recipe")), None)
        kl = ((measured or {}).get("kl") or {}).get("mean")
        aim = (f"KL at most {mixed['target_kl']:g}" if mixed.get("target_kl") is not None
               else f"weights at most {mixed['max_bytes'] / MiB:,.1f} MiB")
        lines.append(f"Mixed recipe {mixed['recipe']} ({mixed['recipe_file']}), aiming at {aim}: keeps "
                     f"{len(mixed['kept'])} parts {mixed.get('kept_as', '16-bit')} "
                     f"({', '.join(mixed['kept']) or 'none'}); predicted KL {mixed['predicted_kl']:.4f}, weights "
                     f"{mixed['predicted_weights_bytes'] / MiB:,.1f} MiB"
                     + (f"; measured in this lab: KL {kl:.4f}, weights {measured['size']['weights_bytes'] / MiB:,.1f} MiB"
                        if kl is not None else "") + ".")
    worst = sorted(sensitivity["parts"], key=lambda p: p["kl_mean"], reverse=True)[:WORST_PARTS]
    lines += ["", "| part | KL mean | KL p99 | top-1 % | MiB to keep it 16-bit |", "|---|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['kl_mean']:.4f} | {p['kl_p99']:.4f} | {p['top1_pct']:.1f} | {p['extra_bytes'] / MiB:.2f} |"
              for p in worst]
    return lines


def write_report(out: Path, variants: list[dict], settings, budget: Budget, baseline_name: str | None, model: str | None = None,
                 sensitivity: dict | None = None) -> dict:
    """results.json, summary.md and report.html in `out`; `sensitivity`: a sensitivity run's findings to include."""
    results = build_results(variants, settings, budget, baseline_name, model)
    if sensitivity:
        results["sensitivity"] = sensitivity
    rows = _rows(variants, baseline_name)
    write_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    md = [f"# ptqlab results{f': {model}' if model else ''}", "", f"Device: {results['device']}. Created {results['created']}.", "",
          markdown_table(rows), "", "## Recommendation", ""]
    md += [f"- {line}" for line in _recommendation_lines(results["recommendation"])]
    md += deployment_lines(variants) + sweep_lines(variants) + task_lines(variants, baseline_name)
    md += sensitivity_lines(sensitivity, variants)
    md += ["", "## Notes", ""] + [f"- {n}" for n in _notes(results)]
    md += expert_coverage_lines(variants)
    md += ["", "## Sample completions", ""] + sample_completion_lines(variants, baseline_name)
    write_atomically(out / "summary.md", "\n".join(md) + "\n")
    write_atomically(out / "report.html", render_html(results, rows))
    return results


# ---------------------------------------------------------------- sample completions


def completions_by_prompt(variants: list[dict], baseline: str | None) -> tuple[list[str], list[str], dict[str, dict[str, str]]]:
    """(variant names, baseline first; prompts in order of first appearance; {prompt: {name: completion}}).
    Matched by prompt text, not position, so a variant with fewer or other prompts lines up with the rest."""
    ordered = sorted(variants, key=lambda v: v["name"] != baseline)  # stable: the others keep their order
    prompts: list[str] = []
    by_prompt: dict[str, dict[str, str]] = {}
    for v in ordered:
        for sample in v.get("samples") or []:
            if sample["prompt"] not in by_prompt:
                prompts.append(sample["prompt"])
                by_prompt[sample["prompt"]] = {}
            by_prompt[sample["prompt"]].setdefault(v["name"], sample["completion"].strip())
    return [v["name"] for v in ordered], prompts, by_prompt


def first_difference(answer: str, reference: str) -> int | None:
    """Where `answer` stops agreeing with `reference`, or None where they are the same. A difference inside a word
    starts at that word, so a highlight reads as whole words; it is len(answer) where the answer merely stops
    while the reference goes on."""
    if answer == reference:
        return None
    i = len(os.path.commonprefix([answer, reference]))
    inside_word = i > 0 and _is_word_character(answer[i - 1]) and any(i < len(t) and _is_word_character(t[i])
                                                                    for t in (answer, reference))
    if not inside_word:
        return i
    return max((j + 1 for j in range(i) if not _is_word_character(answer[j])), default=0)


def _is_word_character(c: str) -> bool:
    return c.isalnum() or c == "_"


def sample_completion_lines(variants: list[dict], baseline: str | None) -> list[str]:
    """Markdown: a section per prompt, a bullet per variant; an answer equal to the baseline's says so instead of
    repeating it, a missing one is a dash."""
    names, prompts, by_prompt = completions_by_prompt(variants, baseline)
    base = baseline if baseline in names else None
    lines = []
    for prompt in prompts:
        answers = by_prompt[prompt]
        lines += [f"### {' '.join(prompt.split()) or '(empty prompt)'}", ""]
        for name in names:
            answer = answers.get(name)
            if answer is None:
                lines.append(f"- **{name}**: –")
            elif name != base and base in answers and answer == answers[base]:
                lines.append(f"- **{name}**: (same as baseline)")
            else:
                lines.append(f"- **{name}**: {answer!r}")
        lines.append("")
    return lines


def _sample_cell(answer: str | None, reference: str | None) -> str:
    """One table cell: the answer, with the part from where it leaves the reference (the baseline's answer) marked."""
    esc = html.escape
    if answer is None:
        return '<td class="missing">–</td>'
    if reference is None:
        return f"<td><pre>{esc(answer)}</pre></td>"
    start = first_difference(answer, reference)
    if start is None:
        return f'<td class="same"><span class="tag">= baseline</span><pre>{esc(answer)}</pre></td>'
    if start == len(answer):
        return f'<td class="differs"><pre>{esc(answer)}</pre><span class="tag">stops where the baseline goes on</span></td>'
    return f'<td class="differs"><pre>{esc(answer[:start])}<mark>{esc(answer[start:])}</mark></pre></td>'


def samples_table_html(variants: list[dict], baseline: str | None) -> str:
    """One row per prompt, one equal-width column per variant (baseline first), each answer compared with the
    baseline's in the same row."""
    esc = html.escape
    names, prompts, by_prompt = completions_by_prompt(variants, baseline)
    if not prompts:
        return "<p>No sample completions.</p>"
    base = baseline if baseline in names else None
    prompt_pct = 16
    cols = f'<col style="width:{prompt_pct}%">' + "".join(
        f'<col style="width:{(100 - prompt_pct) / len(names):.3f}%">' for _ in names)
    head = "<tr><th>prompt</th>" + "".join(
        f"<th>{esc(n)}{' (baseline)' if n == base else ''}</th>" for n in names) + "</tr>"
    rows = []
    for prompt in prompts:
        answers = by_prompt[prompt]
        reference = answers.get(base) if base is not None else None
        cells = [_sample_cell(answers.get(n), None if n == base else reference) for n in names]
        rows.append(f'<tr><th scope="row"><pre>{esc(prompt)}</pre></th>{"".join(cells)}</tr>')
    # Equal fixed columns keep long answers from crowding the others out; past a few variants the table scrolls
    # sideways rather than squeezing each answer into a few characters a line.
    min_width = 12 + 14 * len(names)
    return (f'<div class="samples-scroll"><table class="samples" style="min-width:{min_width}em">'
            f'<colgroup>{cols}</colgroup>{head}{"".join(rows)}</table></div>')


def _results_table_html(rows: list[dict], front: set[str]) -> str:
    """The results table; rows of variants on the Pareto front carry a ★ and the class "front"."""
    esc = html.escape
    out = ["<table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in rows[0]) + "</tr>"]
    for r in rows:
        on_front = r["variant"] in front
        cells = [f"<td>{esc(_fmt(r[k]))}</td>" for k in r]
        if on_front:
            cells[0] = f'<td>{esc(_fmt(r["variant"]))} <span class="star" title="{esc(PARETO_LABEL)}">★</span></td>'
        out.append(('<tr class="front">' if on_front else "<tr>") + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def markdown_html(lines: list[str]) -> str:
    """The few markdown forms the report's sections use (## headings, tables, paragraphs), as HTML."""
    esc, out, table = html.escape, [], []

    def flush() -> None:
        if table:
            header, body = table[0], [r for r in table[1:] if not set(r) <= {"---"}]
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{esc(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{esc(line)}</p>")
    flush()
    return "".join(out)


def render_html(results: dict, rows: list[dict]) -> str:
    variants = results["variants"]
    baseline = results.get("baseline")
    esc = html.escape
    front = results["recommendation"]["pareto_front"]
    size = [(v["name"], v["size"]["weights_bytes"] / MiB) for v in variants]
    plots = [_scatter([(n, s, v["perplexity"]["value"]) for (n, s), v in zip(size, variants)], "weights (MiB)", "perplexity",
                      baseline=baseline)]
    if any(v.get("kl") for v in variants):
        kl_points = [p for p in size_kl_points(variants, baseline) if p[2] is not None]
        plots.append(_scatter(kl_points, "weights (MiB)", "mean KL (nats)", front=front))
    timed = [v for v in variants if v["speed"]["decode_tok_s"] is not None]  # GGUF variants: speed not measured
    plots.append(_bars([(v["name"], v["speed"]["decode_tok_s"]) for v in timed], "decode tok/s (batch 1)"))
    plots.append(_bars([(v["name"], v["speed"]["throughput_tok_s"]) for v in timed],
                       f"throughput tok/s (batch {variants[0]['speed']['batch_size']})"))
    sensitivity = results.get("sensitivity")
    sections = markdown_html(deployment_lines(variants) + sweep_lines(variants) + task_lines(variants, baseline))
    if sensitivity:  # the findings, the per-layer plot, then the table of the worst parts
        lines = sensitivity_lines(sensitivity, variants)
        table = next(i for i, line in enumerate(lines) if line.startswith("|"))
        sections += markdown_html(lines[:table])
        sections += '<div class="plots">' + layer_bars([(p["layer"], p["kind"], p["kl_mean"]) for p in sensitivity["parts"]],
                                                      "KL with only this part quantized, per decoder layer") + "</div>"
        sections += markdown_html(lines[table:])
    recommendation = "".join(f"<li>{esc(line).replace('**', '')}</li>" for line in _recommendation_lines(results["recommendation"]))
    notes = "".join(f"<li>{esc(n)}</li>" for n in _notes(results))
    title = f"ptqlab report{': ' + results['model'] if results.get('model') else ''}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
tr.front td:first-child {{ font-weight: 600; }} .star {{ color: {FRONT_COLOUR}; }}
.plots svg {{ margin: 0 1em 1em 0; border: 1px solid #eee; }} pre {{ white-space: pre-wrap; margin: 0; }}
table.samples {{ table-layout: fixed; width: 100%; }}
.samples-scroll {{ overflow-x: auto; }}
table.samples th, table.samples td {{ text-align: left; vertical-align: top; overflow-wrap: anywhere; }}
table.samples pre {{ overflow-wrap: anywhere; max-height: 18em; overflow-y: auto; font-size: 12px; }}
table.samples td.same {{ color: #666; }} table.samples td.missing {{ color: #999; text-align: center; }}
table.samples mark {{ background: #ffe08a; }}
.tag {{ display: inline-block; font-size: 11px; color: #555; background: #eee; border-radius: 3px; padding: 0 4px; margin-bottom: 2px; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Device: {esc(results['device'])}. Created {esc(results['created'])}. Seed {results['seed']}.</p>
<h2>Recommendation</h2><ul>{recommendation}</ul>
<h2>Results</h2><div class="samples-scroll">{_results_table_html(rows, set(front))}</div>
<h2>Plots</h2><div class="plots">{''.join(plots)}</div>
{sections}
<h2>Notes</h2><ul>{notes}</ul>
<h2>Sample completions</h2>{samples_table_html(variants, baseline)}
</body></html>
"""
