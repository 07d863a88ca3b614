"""Results for other readers: `ptqlab lab --export-md` writes the results table as Markdown whose numbers are
results.json's, and `ptqlab bench --json` prints results.json on stdout and nothing else there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptqlab.cli import app
from ptqlab.errors import PtqlabError
from ptqlab.measure.variant import BenchSettings
from ptqlab.recipes import PRESETS
from ptqlab.report import RESULTS_MD, write_results_markdown
from ptqlab.suite import lab

# Small enough for CI, as tests/test_lab.py: 4 windows of 64 tokens, 4 generated tokens, batch 2, one repeat.
FAST = BenchSettings(ppl_text="python-docs", ppl_context=64, ppl_windows=4, max_new_tokens=4, batch_size=2, repeats=1,
                     sample_tokens=4, device="cpu")
MiB = 2**20
runner = CliRunner()


@pytest.fixture(scope="module")
def finished_lab(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("lab")
    lab(str(tiny_model_dir("llama")), ["w4a16-rtn"], out, FAST, quiet=True)  # one variant: the suite's time
    return out


def table(markdown: str) -> list[dict[str, str]]:
    """The first Markdown table's rows as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table (deployment paths)
        body.append(dict(zip(header, cells)))
    return body


def shown(cell: str) -> tuple[float, float]:
    """A printed number and half a unit of its last digit: what rounding to the digits shown may have changed."""
    text = cell.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text), 0.5 * 10 ** -decimals + 1e-12


def test_the_markdown_tables_numbers_are_results_jsons(finished_lab):
    path = write_results_markdown(finished_lab)
    assert path == finished_lab / RESULTS_MD
    results = json.loads((finished_lab / "results.json").read_text())
    rows = table(path.read_text())
    assert [r["variant"] for r in rows] == [v["name"] for v in results["variants"]]
    base = results["variants"][0]
    batch = f"batch-{base['speed']['batch_size']} tok/s"
    for row, v in zip(rows, results["variants"]):
        expected = {"weights MiB": v["size"]["weights_bytes"] / MiB, "perplexity": v["perplexity"]["value"],
                    "decode tok/s": v["speed"]["decode_tok_s"], batch: v["speed"]["throughput_tok_s"]}
        if v["kl"]:
            expected |= {"KL mean": v["kl"]["mean"], "top-1 %": v["kl"]["top1_agreement_pct"],
                         # same windows, same token counts: the paired change is the ratio of perplexities
                         "ppl Δ%": 100 * (v["perplexity"]["value"] / base["perplexity"]["value"] - 1)}
        else:
            assert row["KL mean"] == "–"
        for column, value in expected.items():
            number, half_unit = shown(row[column])
            assert abs(number - value) <= half_unit + 1e-9 * abs(value), (v["name"], column, row[column], value)
        assert row["format"] == v["format"]


def test_the_markdown_says_its_protocol_and_deployment_paths(finished_lab):
    text = write_results_markdown(finished_lab).read_text()
    results = json.loads((finished_lab / "results.json").read_text())
    assert results["settings"]["protocol"] in text and f"context {results['context']}" in text
    assert results["text"]["name"] in text and results["device"] in text
    assert " | ".join(PRESETS["w4a16-rtn"].scheme.deployment.paths) in text


def test_lab_export_md_writes_results_md_and_prints_only_it_on_stdout(finished_lab, monkeypatch):
    import ptqlab.suite

    (finished_lab / RESULTS_MD).unlink(missing_ok=True)
    monkeypatch.setattr(ptqlab.suite, "lab", lambda **kwargs: finished_lab)  # the run itself: tested above
    result = runner.invoke(app, ["lab", "--out", str(finished_lab), "--device", "cpu", "--quiet", "--export-md"])
    assert result.exit_code == 0, result.output
    written = (finished_lab / RESULTS_MD).read_text()
    assert result.stdout == written and "| variant |" in written
    assert str(finished_lab / RESULTS_MD) in result.stderr


def test_export_of_a_folder_without_results_is_refused_in_one_line(tmp_path):
    with pytest.raises(PtqlabError, match=r"no results.json to export; run the lab there first") as caught:
        write_results_markdown(tmp_path)
    assert "\n" not in str(caught.value)


def test_bench_json_prints_only_results_json_on_stdout(finished_lab, tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = subprocess.run([sys.executable, "-m", "ptqlab", "bench", str(finished_lab / "checkpoints" / "w4a16-rtn"),
                          "--out", str(out), "--device", "cpu", "--ppl-text", "python-docs", "--ppl-context", "64",
                          "--max-new-tokens", "4", "--batch-size", "2", "--batch-sizes", "1", "--repeats", "1",
                          "--sample-tokens", "4", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout)  # the whole of stdout: nothing but the result
    assert printed == json.loads((out / "results.json").read_text())
    assert [v["name"] for v in printed["variants"]] == ["baseline", "w4a16-rtn"]
    assert "results.json" in run.stderr  # the summary and notes still reach the user, on stderr


def test_bench_json_that_fails_prints_nothing_on_stdout_and_one_line_on_stderr(tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path / "missing"), "--out", str(tmp_path / "b"), "--device", "cpu",
                                 "--quiet", "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
