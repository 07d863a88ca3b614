"""The report reads at a glance: samples side by side per prompt, plot labels that never overlap, the Pareto front
of size against KL, and an HTML page that stays well-formed and script-free (checked in headless Chromium where
one is installed)."""

import itertools
import json
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ptqlab.measure.variant import BenchSettings
from ptqlab.plots import (MARKER_RADIUS, box_inside, boxes_overlap, fit_text, group_coincident, label_candidates,
                          place_labels, segment_crosses_box, text_width)
from ptqlab.recommend import Budget, pareto_front, recommend
from ptqlab.report import completions_by_prompt, first_difference, sample_completion_lines, samples_table_html, write_report

MiB = 2**20
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
LONG_NAME = "w4a16-gptq-g128-act-order-damp0.01-calibrated-on-ultrachat-long-recipe-name"


def variant(name, mib, ppl, kl, completions=None, decode=40.0, throughput=150.0):
    """A variant dict in the shape `bench` writes, with only what the report reads."""
    completions = completions or {p: f" answer of {name}" for p in PROMPTS}
    return {
        "name": name, "format": "dense" if kl is None else "pack-quantized", "device": "cpu (test)",
        "size": {"weights_bytes": int(mib * MiB), "folder_bytes": int(mib * MiB) + 4096},
        "load_s": 0.5, "peak_memory_bytes": int(2 * mib * MiB), "dtype": "float32", "stored_dtype": "float32",
        "perplexity": {"value": ppl, "stderr": 0.1, "tokens_scored": 252, "context": 64},
        "kl": None if kl is None else {"mean": kl, "median": kl / 2, "p99": kl * 5, "p99_9": kl * 9,
                                       "top1_agreement_pct": 99.0 - 10 * kl},
        "delta_p": None if kl is None else {"mean_pct": -kl},
        "speed": {"runtime": "transformers", "ttft_ms": 12.0, "decode_tok_s": decode, "throughput_tok_s": throughput,
                  "batch_size": 2},
        "samples": [{"prompt": p, "completion": c} for p, c in completions.items()],
        "text": {"name": "python-docs", "source": "python docs (test)", "protocol": "gptq", "fallback": False},
    }


def adversarial_lab() -> list[dict]:
    """Twelve variants: near-equal points (fp8-dynamic and w8a8-rtn), exact duplicates, a very long name, a dominated
    point and one without a KL."""
    return [
        variant("baseline", 256, 10.0, None),
        variant("fp8-dynamic", 160.02, 10.21, 0.01001),
        variant("w8a8-rtn", 160.0, 10.2, 0.0100),
        variant("w8a8-smoothquant", 160.0, 10.2, 0.0100),
        variant("w8a8-gptq", 160.0, 10.2, 0.0100),
        variant("w4a16-rtn", 96.0, 12.5, 0.21),
        variant("w4a16-gptq", 96.1, 11.4, 0.09),
        variant("w4a16-awq", 96.1, 11.3, 0.085),
        variant(LONG_NAME, 98.0, 11.35, 0.088),
        variant("w4a16-gptq-g32", 104.0, 11.0, 0.06),
        variant("w8a16-rtn", 170.0, 10.3, 0.02),  # dominated by w8a8-rtn
        variant("nvfp4", 90.0, 13.0, None) | {"kl": None},
    ]


# ---------------------------------------------------------------- Pareto front


def test_pareto_front_keeps_only_points_no_other_beats_on_both_size_and_kl():
    points = [("baseline", 256, 0.0), ("w8", 160, 0.01), ("w8-worse", 170, 0.02), ("w4", 96, 0.2),
              ("w4-bad", 100, 0.3), ("w6", 128, 0.01)]
    # w8 is dominated by w6 (smaller, same KL); w8-worse by w8 and w6; w4-bad by w4.
    assert pareto_front(points) == ["w4", "w6", "baseline"]


def test_pareto_front_keeps_ties_and_leaves_out_variants_without_kl():
    points = [("a", 100, 0.05), ("b", 100, 0.05), ("unknown", 10, None), ("nan", 10, float("nan")), ("c", 200, 0.0)]
    assert pareto_front(points) == ["a", "b", "c"]  # equal points do not dominate each other; no KL, no place
    assert pareto_front([("only-unknown", 1, None)]) == []
    # Same size, lower KL dominates; same KL, smaller size dominates.
    assert pareto_front([("x", 100, 0.1), ("y", 100, 0.05)]) == ["y"]
    assert pareto_front([("x", 100, 0.1), ("y", 90, 0.1)]) == ["y"]


def test_recommendation_names_the_front_with_the_baseline_at_kl_zero():
    rec = recommend(adversarial_lab(), "baseline", Budget())
    front = rec["pareto_front"]
    assert front[-1] == "baseline" and "nvfp4" not in front and "w8a16-rtn" not in front and "w4a16-rtn" in front
    sizes = {v["name"]: v["size"]["weights_bytes"] for v in adversarial_lab()}
    assert [sizes[n] for n in front] == sorted(sizes[n] for n in front)


# ---------------------------------------------------------------- label placement


def assert_labels_are_clear(markers, area, labels, legend):
    """No two label boxes intersect, every box lies inside the area and clear of every marker, no leader line runs
    through another label, and every marker is labelled once: by its name, or by a number the legend explains."""
    boxes = [label.box for label in labels if label.box is not None]
    for a, b in itertools.combinations(boxes, 2):
        assert not boxes_overlap(a, b), (a, b)
    for box in boxes:
        assert box_inside(box, area), (box, area)
        for _, cx, cy in markers:
            marker = (cx - MARKER_RADIUS, cy - MARKER_RADIUS, cx + MARKER_RADIUS, cy + MARKER_RADIUS)
            assert not boxes_overlap(box, marker), (box, marker)
    for label in labels:
        if label.leader is not None:
            assert not any(segment_crosses_box(label.leader, other.box) for other in labels
                           if other is not label and other.box is not None)
        if label.box is not None:
            assert label.box[2] - label.box[0] == pytest.approx(max(text_width(line, 11) for line in label.lines))
    assert sorted(i for label in labels for i in label.members) == list(range(len(markers)))
    numbers = dict(legend)
    assert len(numbers) == len(legend)
    for label in labels:
        names = tuple(markers[i][0] for i in label.members)
        if label.lines != names:
            assert sorted(name for name in numbers.values() if name in names) == sorted(names)
            assert label.lines[0].split(",")[0].split("–")[0] in numbers


AREA = (62.0, 4.0, 516.0, 258.0)


def spread(names, cx, cy, jitter, seed=0):
    rng = random.Random(seed)
    return [(name, cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)) for name in names]


ADVERSARIAL_MARKERS = {
    "twelve at one spot": [(f"variant-{i}", 300.0, 150.0) for i in range(12)],
    "near-equal fp8 and w8a8": [("fp8-dynamic", 300.2, 150.1), ("w8a8-rtn", 300.0, 150.0), ("w8a8-gptq", 300.0, 150.3)],
    "long names": [(LONG_NAME, 200.0, 100.0), (LONG_NAME + "-b", 201.0, 101.0), ("short", 202.0, 100.0)],
    "in a corner": [(f"w{i}a16-corner-case", 510.0, 8.0) for i in range(6)],
    "twelve crowded": spread([f"w{b}a{a}-{m}" for b, a, m in itertools.product((4, 8), (8, 16), ("rtn", "gptq", "awq"))],
                             290.0, 140.0, 12.0),
    "twelve anywhere": spread([f"recipe-{i:02d}-name" for i in range(12)], 290.0, 130.0, 200.0, seed=3),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL_MARKERS))
def test_no_two_labels_overlap_and_all_stay_inside_the_plot(case):
    markers = [(n, min(max(x, AREA[0]), AREA[2]), min(max(y, AREA[1]), AREA[3])) for n, x, y in ADVERSARIAL_MARKERS[case]]
    labels, legend = place_labels(markers, AREA)
    assert_labels_are_clear(markers, AREA, labels, legend)
    placed = [i for label in labels if label.box is not None for i in label.members]
    assert len(placed) >= min(len(markers), 6)  # most get a place at all


def test_labels_stay_clear_for_many_random_layouts():
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(2, 12)
        names = [rng.choice(["fp8-dynamic", "w8a8-rtn", "w4a16-gptq", LONG_NAME[: rng.randint(3, 60)]]) + str(i)
                 for i in range(n)]
        cx, cy = rng.uniform(AREA[0], AREA[2]), rng.uniform(AREA[1], AREA[3])
        markers = [(name, min(max(cx + rng.gauss(0, 8), AREA[0]), AREA[2]),
                    min(max(cy + rng.gauss(0, 8), AREA[1]), AREA[3])) for name in names]
        assert_labels_are_clear(markers, AREA, *place_labels(markers, AREA))


def test_a_free_spot_gets_the_label_right_beside_its_point():
    (label,), legend = place_labels([("w8a8-rtn", 200.0, 100.0)], AREA)
    assert legend == [] and label.lines == ("w8a8-rtn",) and label.leader is None
    assert label.box == label_candidates(200.0, 100.0, label.box[2] - label.box[0], label.box[3] - label.box[1])[0][0]
    assert label.box[0] > 200.0  # the first choice is to the right


def test_markers_at_one_spot_share_a_label_with_a_line_each():
    markers = [("fp8-dynamic", 300.2, 150.1), ("w8a8-rtn", 300.0, 150.0), ("far", 100.0, 50.0)]
    assert group_coincident(markers) == [[0, 1], [2]]
    labels, legend = place_labels(markers, AREA)
    assert legend == [] and labels[0].lines == ("fp8-dynamic", "w8a8-rtn") and labels[1].lines == ("far",)


def test_geometry_helpers():
    assert boxes_overlap((0, 0, 10, 10), (5, 5, 15, 15)) and not boxes_overlap((0, 0, 10, 10), (10, 0, 20, 10))
    assert boxes_overlap((0, 0, 10, 10), (12, 0, 20, 10), gap=3)
    assert segment_crosses_box((-5, 5, 15, 5), (0, 0, 10, 10)) and not segment_crosses_box((-5, 15, 15, 15), (0, 0, 10, 10))
    assert not segment_crosses_box((-5, -5, -1, 20), (0, 0, 10, 10))
    assert fit_text("short", 200, 11) == "short"
    cut = fit_text(LONG_NAME, 140, 11)
    assert cut.endswith("…") and text_width(cut, 11) <= 140 and LONG_NAME.startswith(cut[:-1])


# ---------------------------------------------------------------- sample completions


class Tree(HTMLParser):
    """Checks that tags balance (void elements aside) and collects the sample table's cells."""

    VOID = {"meta", "br", "col", "img", "input", "hr", "link"}
    SELF_CLOSED_SVG = {"line", "circle", "rect", "polyline", "path"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.rows, self.in_samples = [], [], [], 0
        self.cell = None

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        attrs = dict(attrs)
        self.stack.append(tag)
        if tag == "table" and "samples" in (attrs.get("class") or ""):
            self.in_samples = len(self.stack)
        if self.in_samples and tag == "tr":
            self.rows.append([])
        if self.in_samples and tag in ("td", "th"):
            self.cell = {"tag": tag, "class": attrs.get("class") or "", "html": "", "text": ""}
            self.rows[-1].append(self.cell)
        elif self.cell is not None:
            self.cell["html"] += f"<{tag}>"

    def handle_startendtag(self, tag, attrs):
        if tag not in self.VOID | self.SELF_CLOSED_SVG:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        if self.in_samples == len(self.stack):
            self.in_samples = 0
        self.stack.pop()
        if tag in ("td", "th"):
            self.cell = None
        elif self.cell is not None:
            self.cell["html"] += f"</{tag}>"

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["html"] += data
            self.cell["text"] += data


def parse(page: str) -> Tree:
    tree = Tree()
    tree.feed(page)
    tree.close()
    return tree


def test_first_difference_starts_at_the_word_that_differs():
    assert first_difference("Paris is big", "Paris is big") is None
    assert first_difference("Paris is large", "Paris is lovely") == len("Paris is ")
    assert first_difference("Paris, France", "Paris is") == len("Paris")  # the comma itself differs
    assert first_difference("Paris", "Paris is big") == len("Paris")  # stops where the baseline goes on
    assert first_difference("Lyon", "Paris") == 0


def test_samples_table_has_a_row_per_prompt_and_a_column_per_variant_baseline_first():
    base = variant("baseline", 256, 10.0, None, {p: f" {p} and so on." for p in PROMPTS})
    same = variant("fp8-dynamic", 160, 10.2, 0.01, {p: f" {p} and so on." for p in PROMPTS})
    differs = variant("w4a16-rtn", 96, 12.0, 0.2, {PROMPTS[0]: f" {PROMPTS[0]} and so forth.",
                                                   PROMPTS[1]: f" {PROMPTS[1]} and so on.",
                                                   PROMPTS[2]: " something else entirely"})
    tree = parse(samples_table_html([same, differs, base], "baseline"))
    assert tree.errors == []
    header, *rows = tree.rows
    assert [c["text"] for c in header] == ["prompt", "baseline (baseline)", "fp8-dynamic", "w4a16-rtn"]
    assert [r[0]["text"] for r in rows] == PROMPTS
    assert all(len(r) == 4 for r in rows)
    for r in rows:
        assert "<mark>" not in r[1]["html"]  # the baseline is the reference, never marked
        assert "same" in r[2]["class"] and "= baseline" in r[2]["text"]
    assert "differs" in rows[0][3]["class"] and "<mark>forth.</mark>" in rows[0][3]["html"]
    assert "same" in rows[1][3]["class"]
    assert "<mark>something else entirely</mark>" in rows[2][3]["html"]


def test_samples_escape_html_and_line_up_by_prompt_when_variants_differ():
    base = variant("baseline", 256, 10.0, None, {"<b>": " <i>x</i>", "p2": " two"})
    other = variant("w4", 96, 12.0, 0.2, {"p2": " two", "p3": " three"})
    tree = parse(samples_table_html([base, other], "baseline"))
    assert tree.errors == []
    _, *rows = tree.rows
    assert [r[0]["text"] for r in rows] == ["<b>", "p2", "p3"]
    assert rows[0][1]["text"] == "<i>x</i>" and rows[0][2]["text"] == "–" and "missing" in rows[0][2]["class"]
    assert "same" in rows[1][2]["class"]
    assert rows[2][1]["text"] == "–" and "<mark>" not in rows[2][2]["html"]  # nothing to compare with


def test_summary_has_a_section_per_prompt_and_says_which_answers_equal_the_baseline():
    base = variant("baseline", 256, 10.0, None, {"p1": " yes", "p2": " no"})
    fp8 = variant("fp8", 160, 10.2, 0.01, {"p1": " yes", "p2": " maybe"})
    w4 = variant("w4", 96, 12.0, 0.2, {"p1": " yes"})
    lines = sample_completion_lines([fp8, w4, base], "baseline")
    assert [line for line in lines if line.startswith("### ")] == ["### p1", "### p2"]
    p2 = lines[lines.index("### p2"):]
    assert "- **baseline**: 'no'" in p2 and "- **fp8**: 'maybe'" in p2 and "- **w4**: –" in p2
    assert "- **fp8**: (same as baseline)" in lines[:lines.index("### p2")]
    assert completions_by_prompt([fp8, base], "baseline")[0] == ["baseline", "fp8"]


# ---------------------------------------------------------------- the whole report


@pytest.fixture
def adversarial_report(tmp_path) -> Path:
    write_report(tmp_path, adversarial_lab(), BenchSettings(), Budget(), "baseline")
    return tmp_path


def test_report_html_is_well_formed_and_script_free(adversarial_report):
    page = (adversarial_report / "report.html").read_text()
    assert "<script" not in page.lower()
    tree = parse(page)
    assert tree.errors == [] and tree.stack == []
    assert page.count("<svg") == page.count("</svg>") == 4
    assert page.count("<table") == page.count("</table>") == 2


def test_report_marks_the_front_and_keeps_the_results_keys(adversarial_report):
    results = json.loads((adversarial_report / "results.json").read_text())
    assert {"schema", "created", "model", "device", "versions", "seed", "settings", "text", "tokens_scored", "context",
            "baseline", "variants", "recommendation"} <= set(results)
    front = results["recommendation"]["pareto_front"]
    page = (adversarial_report / "report.html").read_text()
    assert page.count('<tr class="front">') == len(front) and "Pareto front (size vs KL)" in page
    summary = (adversarial_report / "summary.md").read_text()
    assert f"- Pareto front (size vs KL): {', '.join(front)}." in summary
    head, samples = summary.split("## Sample completions")
    assert "Pareto front" in head and all(f"### {p}" in samples for p in PROMPTS)


def test_long_bar_names_are_cut_with_the_whole_name_in_a_title(adversarial_report):
    page = (adversarial_report / "report.html").read_text()
    for svg in re.findall(r"<svg.*?</svg>", page, re.S)[-2:]:
        assert f"<title>{LONG_NAME}</title>" in svg and f">{LONG_NAME}<" not in svg.replace("<title>", "<t ")


# ---------------------------------------------------------------- in a browser

CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH (chromium, chromium-browser, "
                                                              "google-chrome, chrome): the in-browser layout check needs one")

MEASURE_TEXT = """<script>
// Test-only: every SVG's <text> boxes as the browser lays them out; overlapping pairs and any text outside its SVG.
const found = {overlaps: [], outside: [], texts: 0, svgs: 0};
const slack = 0.5;
document.querySelectorAll("svg").forEach((svg, s) => {
  found.svgs += 1;
  const frame = svg.getBoundingClientRect();
  const boxes = [...svg.querySelectorAll("text")].map(t => [t.textContent, t.getBoundingClientRect(), t.getBBox()]);
  found.texts += boxes.length;
  boxes.forEach(([text, r, b]) => {
    if (b.width <= 0 || r.left < frame.left - slack || r.top < frame.top - slack ||
        r.right > frame.right + slack || r.bottom > frame.bottom + slack) found.outside.push([s, text]);
  });
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, p] = [boxes[i][1], boxes[j][1]];
    if (a.left < p.right - slack && p.left < a.right - slack && a.top < p.bottom - slack && p.top < a.bottom - slack)
      found.overlaps.push([s, boxes[i][0], boxes[j][0]]);
  }
});
const out = document.createElement("pre");
out.id = "check";
out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=60)


@needs_chromium
def test_no_plot_text_overlaps_or_leaves_its_svg_in_chromium(adversarial_report, tmp_path):
    page = (adversarial_report / "report.html").read_text()
    assert "<script" not in page.lower()
    probe = tmp_path / "probe.html"  # a test-only copy: the report itself stays script-free
    probe.write_text(page.replace("</body>", MEASURE_TEXT + "</body>"))
    run = chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="check">(.*?)</pre>', run.stdout, re.S)
    assert found, f"Chromium wrote no check (exit {run.returncode}): {run.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert check["svgs"] == 4 and check["texts"] > 40
    assert check["overlaps"] == [] and check["outside"] == []


@needs_chromium
def test_report_screenshot_is_a_png(adversarial_report, tmp_path):
    shot = tmp_path / "report.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,2000", (adversarial_report / "report.html").as_uri(),
                   profile=tmp_path / "profile")
    assert shot.is_file(), f"no screenshot (exit {run.returncode}): {run.stderr[-2000:]}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def _swept(name: str, rates: dict[int, float]) -> dict:
    return {"name": name, "speed": {"sweep": [{"batch": b, "decode_tok_s": r} for b, r in rates.items()]}}


def test_the_crossover_names_the_fastest_variant_of_each_stretch_of_batch_sizes():
    from ptqlab.recommend import crossover_words, fastest_by_batch

    table = fastest_by_batch([_swept("bf16", {1: 100, 8: 700, 32: 2000}), _swept("w4a16", {1: 220, 8: 1000, 32: 1500}),
                              _swept("fp8", {1: 150, 8: 900, 32: 2400})])
    assert [(r["batch"], r["variant"], r["runner_up"]) for r in table] == [(1, "w4a16", "fp8"), (8, "w4a16", "fp8"),
                                                                           (32, "fp8", "bf16")]
    assert crossover_words(table) == "w4a16 fastest up to 8 sequences, fp8 fastest from 32"
    three = fastest_by_batch([_swept("a", {1: 3, 8: 1, 32: 1}), _swept("b", {1: 1, 8: 3, 32: 1}),
                              _swept("c", {1: 1, 8: 1, 32: 3, 64: 3})])
    assert crossover_words(three) == "a fastest at batch 1, b fastest at 8, c fastest from 32"
    assert crossover_words(fastest_by_batch([_swept("a", {1: 2, 8: 9})])) == "a fastest at every batch size measured (1, 8)"
    close = fastest_by_batch([_swept("w4a16", {1: 490, 8: 1777}), _swept("fp8", {1: 214, 8: 1985}), _swept("w8a8", {1: 245, 8: 1935})])
    assert crossover_words(close) == "w4a16 fastest at batch 1, fp8 fastest from 8 (w8a8 within 3 % at 8)"
    assert fastest_by_batch([{"name": "old", "speed": {}}]) == [] and crossover_words([]) == ""


def test_a_variant_without_a_kernel_for_its_format_is_labelled_emulated(tmp_path):
    from ptqlab.report import _notes

    def variant(name, fmt, kernels):
        return {"name": name, "format": fmt, "speed": {"runtime": "fast"}, "kernels": kernels}

    results = {"text": {"source": "t", "protocol": "p"}, "tokens_scored": 1, "context": 2, "model_note": None,
               "variants": [{**variant("baseline", "dense", {"qkv": "dequantized", "lm_head": "dequantized"}),
                             "perplexity": {}},
                            variant("w4a16", "pack-quantized", {"qkv": "int4 triton", "lm_head": "dequantized"}),
                            variant("fp8-block", "float-quantized", {"qkv": "dequantized", "lm_head": "dequantized"})]}
    emulated = [n for n in _notes(results) if "emulated" in n]
    assert len(emulated) == 1 and emulated[0].startswith("Speed of fp8-block: emulated")
