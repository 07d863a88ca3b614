"""The scatter plots' axes fit the data: an 8 % perplexity increase over the baseline spans the plot, not a few
pixels above an axis that starts at 0; the baseline is marked and the right axis reads the change in percent."""

import re

import pytest

from ptqlab.plots import axis_range, nice_ticks, scatter

HEIGHT, PAD = 320, 60  # scatter's defaults: the plot area spans y = PAD .. HEIGHT - PAD
POINTS = [("baseline", 256.0, 10.0), ("w8a8", 160.0, 10.1), ("fp8-dynamic", 160.5, 10.2), ("w4a16", 96.0, 10.8)]


def ticks(svg: str, kind: str) -> list[tuple[float, float]]:
    """(value, y pixel) of each tick label of `kind` (y-tick, delta-tick)."""
    found = re.findall(rf'<text class="{kind}" x="[^"]+" y="([^"]+)"[^>]*>([^<]+)</text>', svg)
    return [(float(text.rstrip("%")), float(y) - 3) for y, text in found]


def markers(svg: str) -> dict[str, float]:
    """Each marker's cy by name (from its <title>)."""
    return {name: float(cy) for cy, name in re.findall(r'<circle cx="[^"]+" cy="([^"]+)"[^>]*><title>([^:<]+):', svg)}


def value_at(svg: str, pixel: float) -> float:
    """The y value at a pixel height, from the linear map the y ticks define."""
    (v1, p1), (v2, p2) = ticks(svg, "y-tick")[0], ticks(svg, "y-tick")[-1]
    return v1 + (pixel - p1) * (v2 - v1) / (p2 - p1)


def test_the_y_axis_fits_the_data_with_padding_not_from_zero():
    svg = scatter(POINTS, "weights (MiB)", "perplexity", baseline="baseline")
    bottom, top = value_at(svg, HEIGHT - PAD), value_at(svg, PAD)
    low, high = min(p[2] for p in POINTS), max(p[2] for p in POINTS)
    span = high - low
    assert low - 0.2 * span <= bottom < low and high < top <= high + 0.2 * span
    assert min(value for value, _ in ticks(svg, "y-tick")) > 0.9 * low  # no tick near 0
    # The 8 % increase now spans most of the plot height, not a few pixels.
    at = markers(svg)
    assert at["baseline"] - at["w4a16"] > 0.7 * (HEIGHT - 2 * PAD)


def test_the_baseline_is_a_dashed_line_at_its_height_and_the_right_axis_reads_percent():
    svg = scatter(POINTS, "weights (MiB)", "perplexity", baseline="baseline")
    line = re.search(r'<line class="baseline" x1="[^"]+" y1="([^"]+)" x2="[^"]+" y2="([^"]+)"', svg)
    assert line and line.group(1) == line.group(2)
    assert float(line.group(1)) == pytest.approx(markers(svg)["baseline"], abs=0.1)
    assert "Δ% vs baseline" in svg
    for percent, pixel in ticks(svg, "delta-tick"):  # each Δ% tick sits where baseline × (1 + Δ/100) is
        assert value_at(svg, pixel) == pytest.approx(10.0 * (1 + percent / 100), rel=1e-3)
    assert any(p == 0 for p, _ in ticks(svg, "delta-tick"))


def test_without_a_baseline_there_is_no_baseline_line_or_percent_axis():
    svg = scatter(POINTS, "weights (MiB)", "perplexity")
    assert 'class="baseline"' not in svg and "delta-tick" not in svg


def test_nonnegative_data_that_starts_at_zero_keeps_its_axis_at_zero():
    assert axis_range([0.0, 0.01, 0.2]) == (0.0, pytest.approx(0.2 + 0.08 * 0.2))  # KL: the baseline sits at 0
    low, high = axis_range([10.0, 10.8])
    assert low == pytest.approx(10.0 - 0.064) and high == pytest.approx(10.8 + 0.064)
    assert axis_range([5.0]) == (pytest.approx(4.96), pytest.approx(5.04))  # one point: 10 % of itself


@pytest.mark.parametrize("low, high", [(9.936, 10.864), (0.0, 0.216), (84.0, 268.0), (-3.1, 12.7), (1e-5, 3e-5)])
def test_ticks_are_round_values_inside_the_range(low, high):
    values = nice_ticks(low, high)
    assert 3 <= len(values) <= 11 and all(low - 1e-12 <= v <= high + 1e-12 for v in values)
    steps = {round(b - a, 12) for a, b in zip(values, values[1:])}
    assert len(steps) == 1
    mantissa = f"{steps.pop():e}".split("e")[0]
    assert float(mantissa) in (1.0, 2.0, 5.0)
