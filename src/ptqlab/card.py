"""The model card, README.md, that every checkpoint folder `quantize` writes: hub front matter, the recipe as run,
the calibration, what stayed 16-bit, the read-back checks and how to load it; and, once `bench` or `lab` has
measured the checkpoint, its quality and speed beside the baseline in a marked section that later measurements
replace in place. Everything it says comes from the run record (record.py) and the measurements (results.json):
the card restates, it owns no fact of its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.markup import escape

from ptqlab.embedded import DEFAULT_MODEL_NAME
from ptqlab.errors import PtqlabError
from ptqlab.formats.readback import stored_formats
from ptqlab.output import write_atomically
from ptqlab.progress import say
from ptqlab.record import RunRecord, read_record

CARD_NAME = "README.md"
RESULTS_START = "<!-- ptqlab:results start -->"
RESULTS_END = "<!-- ptqlab:results end -->"
"""The marks around the section `bench`/`lab` rewrite; text outside them is the user's and is kept as it is."""


@dataclass(frozen=True)
class CardFacts:
    """What a card says about one checkpoint, gathered from its folder (facts_of) so that rendering is pure."""

    base_model: str
    """The source as the hub names it (hub id), else its folder's name."""
    record: RunRecord
    """The run record: recipe, settings (calibration), ignored layers, notes, read-back checks."""
    license: str | None = None
    """The source's license, from its README front matter or config; None where it names none (then omitted)."""
    transformers_limits: tuple[str, ...] = ()
    """What transformers cannot compute on this checkpoint as stored, one sentence each (transformers_limits)."""


def transformers_limits(formats) -> tuple[str, ...]:
    """What transformers cannot compute on checkpoints stored in these formats (number_formats rows), from the rows'
    `dequantize_at_load`, the fact's one owner: loaded as stored, such a checkpoint hands bf16 weights to a float32
    model, which fails inside compressed-tensors."""
    return tuple(f"{f.label or f.name}: transformers computes it only dequantized at load; with dtype=float32 a "
                 f"checkpoint loaded as stored fails inside compressed-tensors (its weights come out bf16). Pass "
                 f"quantization_config=CompressedTensorsConfig(dequantize=True), as below."
                 for f in {f.name: f for f in formats}.values() if f.dequantize_at_load)


def _front_matter(path: Path) -> dict:
    """The YAML front matter of a README.md (empty where it has none or it does not parse)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    try:
        found = yaml.safe_load(parts[0].removeprefix("---")) if len(parts) == 2 else None
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def source_license(source: Path) -> str | None:
    """The license the source model states: its README front matter's `license`, else config.json's."""
    found = _front_matter(source / CARD_NAME).get("license")
    if not found:
        try:
            found = json.loads((source / "config.json").read_text()).get("license")
        except (OSError, ValueError, AttributeError):
            found = None
    return str(found) if found else None


def facts_of(folder: Path) -> CardFacts:
    """The facts of the checkpoint in `folder` (its run record must be there)."""
    record = read_record(folder)
    if record is None:
        raise PtqlabError(f"{folder} has no run record (ptqlab.json): a model card is written only for a checkpoint "
                          "ptqlab quantized; run `ptqlab quantize` into it")
    base = record.model if record.model else DEFAULT_MODEL_NAME
    if Path(base).expanduser().is_dir():  # a local folder: the hub knows it by no path of this machine
        base = Path(base).expanduser().resolve().name
    return CardFacts(base, record, source_license(Path(record.model_path)),
                     transformers_limits(stored_formats(folder)))


def _tags(record: RunRecord) -> list[str]:
    """The hub tags: ptqlab, the format, the recipe, its scheme's short name (w4a16 of w4a16-awq) and its steps
    (gptq, awq, smoothquant, rtn), which is what people search the hub by."""
    scheme = re.match(r"(w\d+a\d+|fp8|nvfp4|mxfp4)", record.recipe_name)  # a user recipe's name may say none
    steps = [step if isinstance(step, str) else next(iter(step), "") for step in record.recipe.get("steps") or []]
    return list(dict.fromkeys(filter(None, ["ptqlab", "compressed-tensors", record.format,
                                            scheme and scheme.group(1), record.recipe_name,
                                            *steps])))


def render(facts: CardFacts, results: str = "") -> str:
    """The card as markdown; `results`: the marked results section's inner text (results_section), kept as is."""
    r = facts.record
    meta = {"base_model": facts.base_model,
            "tags": _tags(r),
            **({"license": facts.license} if facts.license else {}),
            "quantized_by": "ptqlab", "library_name": "transformers", "pipeline_tag": "text-generation"}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {facts.base_model} — {r.recipe_name} ({r.format})", "",
             f"{facts.base_model} quantized by ptqlab {r.versions.get('ptqlab', '')} with the recipe `{r.recipe_name}`: "
             f"{r.scheme}. {r.quantized_layers} linear layers quantized; created {r.created}.", ""]
    if r.model_note:
        lines += [f"Note on the source model: {r.model_note}", ""]
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(r.recipe, sort_keys=False).rstrip(), "```", ""]
    lines += ["## Calibration", ""]
    calibration = r.settings.get("calibration")
    if calibration:
        lines += [f"- {key}: {value}" for key, value in calibration.items() if value is not None]
        lines += [f"- {n}" for n in r.notes if n.startswith("calibration:")]
    else:
        lines += ["None: the recipe is data-free (round-to-nearest from the weights alone)."]
    lines += ["", "## Kept 16-bit", ""]
    ignore = r.recipe.get("ignore") or []
    if r.ignored_layers:
        count = f"{len(r.ignored_layers)} linear layer{'s' if len(r.ignored_layers) != 1 else ''}"
        lines += [f"{count} stay in the source dtype ({r.settings.get('dtype')}), matched by the recipe's `ignore` "
                  f"({', '.join(f'`{p}`' for p in ignore)}). By default the output head (lm_head), the embeddings and "
                  "MoE routers stay 16-bit: they are a small part of the weights, and their error lands directly on "
                  "every token's logits or on which experts it is routed to.", ""]
        lines += [f"- `{name}`" for name in r.ignored_layers]
    else:
        lines += ["No linear layer: every linear layer is quantized."]
    lines += ["", "## Verified read-back", ""]
    if r.verification:
        lines += ["The checkpoint was read back from disk and its logits compared after writing:", "",
                  "| reader | against | relative logit error | KL | top-1 agreement |", "|---|---|---|---|---|"]
        lines += [f"| {v.get('reader')} | {v.get('against')} | {v.get('relative_error', 0):.2%} | {v.get('kl', 0):.2g} | "
                  f"{v.get('top1', 0):.0%} |" for v in r.verification]
    else:
        why = [n for n in r.notes if "not read back" in n]
        lines += [why[0] if why else "Not read back in this run."]
    lines += ["", "## Loading", "", "vLLM:", "", "```python", "from vllm import LLM", "", 'llm = LLM("path/to/this/folder")',
              "```", "", "transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if facts.transformers_limits:
        lines += ["from transformers import CompressedTensorsConfig", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", '
                  "quantization_config=CompressedTensorsConfig(dequantize=True))"]
    else:
        lines += ["", 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")']
    lines += ['tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    lines += [f"What transformers cannot compute: {limit}" for limit in facts.transformers_limits]
    if facts.transformers_limits:
        lines += [""]
    lines += ["A GGUF export of the same model (`ptqlab export-gguf`) is one file for llama.cpp: "
              "`llama-cli -m file.gguf`.", ""]
    lines += ["## Results", "", RESULTS_START, results.strip() or "Not measured yet: `ptqlab bench` or `ptqlab lab` "
              "fills this section.", RESULTS_END, ""]
    notes = [n for n in r.notes if not n.startswith("calibration:")]
    if notes:
        lines += ["## Notes from the run", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def results_section(results: dict, name: str) -> str:
    """The quality and speed tables of variant `name` beside the baseline, from results.json's content as report.py
    writes it (the numbers copied, not recomputed; task recovery as the report computes it)."""
    variants = {v["name"]: v for v in results["variants"]}
    ours, base = variants[name], variants.get(results.get("baseline"))
    rows = [v for v in (base, ours) if v is not None]
    lines = [f"Measured by ptqlab on {results.get('device')} ({results.get('created')}); protocol: "
             f"{(results.get('settings') or {}).get('protocol', '')}.", "", "Quality:", "",
             "| variant | perplexity | KL mean | top-1 % |", "|---|---|---|---|"]
    for v in rows:
        kl = v.get("kl") or {}
        lines.append(f"| {v['name']} | {_num(v['perplexity']['value'], '.4f')} | {_num(kl.get('mean'), '.6f')} | "
                     f"{_num(kl.get('top1_agreement_pct'), '.2f')} |")
    if base is not None and ours.get("tasks") and base.get("tasks"):
        from ptqlab.measure.tasks import recovery  # optional dependency: imports lm-eval where installed

        lines += ["", "| task | metric | this | baseline | recovery % |", "|---|---|---|---|---|"]
        lines += [f"| {task} | {row['metric']} | {_num(row['variant'], '.4f')} | {_num(row['baseline'], '.4f')} | "
                  f"{_num(row['recovery_pct'], '.1f')} |" for task, row in recovery(ours["tasks"], base["tasks"]).items()]
    lines += ["", "Speed:", "", "| variant | runtime | weights MiB | TTFT ms | decode tok/s | batched tok/s |",
              "|---|---|---|---|---|---|"]
    for v in rows:
        s = v["speed"]
        lines.append(f"| {v['name']} | {s.get('runtime', 'transformers')} | {v['size']['weights_bytes'] / 2**20:.1f} | "
                     f"{_num(s.get('ttft_ms'), '.2f')} | {_num(s.get('decode_tok_s'), '.2f')} | "
                     f"{_num(s.get('throughput_tok_s'), '.2f')} (batch {s.get('batch_size')}) |")
    return "\n".join(lines)


def _with_section(text: str, inner: str) -> str:
    """`text` with the marked section's inside replaced by `inner` (appended with its marks where there is none)."""
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start == -1 or end < start:
        return text.rstrip("\n") + f"\n\n## Results\n\n{RESULTS_START}\n{inner}\n{RESULTS_END}\n"
    return text[:start + len(RESULTS_START)] + f"\n{inner}\n" + text[end:]


def write_card(folder: str | Path) -> list[str]:
    """Write `folder`/README.md from its run record (quantize calls it on the finished folder) -> the lines to say
    at write time: what transformers cannot compute on it."""
    folder = Path(folder)
    facts = facts_of(folder)
    write_atomically(folder / CARD_NAME, render(facts))
    return list(facts.transformers_limits)


def update_results(results: dict) -> list[Path]:
    """Put each measured ptqlab checkpoint's tables into its README.md's marked section, atomically, leaving the rest
    of the card (the user's edits) as it is -> the cards updated. `results`: what bench/lab wrote to results.json.
    A variant that is not a ptqlab checkpoint folder (the baseline, a GGUF file) has no card and is skipped; a card
    that cannot be written (a read-only folder) is said in one line and does not fail the measured run."""
    updated = []
    for variant in results.get("variants", []):
        folder = Path(variant.get("path", ""))
        card = folder / CARD_NAME
        try:
            if variant["name"] == results.get("baseline") or not folder.is_dir() or read_record(folder) is None:
                continue
            text = card.read_text() if card.is_file() else render(facts_of(folder))
            write_atomically(card, _with_section(text, results_section(results, variant["name"])))
        except (OSError, UnicodeDecodeError, PtqlabError) as e:  # the measurements stand in results.json; a card
            # is a copy of them, and a damaged run record or a read-only folder must not fail the measured run
            say(escape(f"{card}: not updated ({getattr(e, 'strerror', None) or e}); the results are in results.json"))
            continue
        updated.append(card)
    return updated
