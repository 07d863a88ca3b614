"""SVG plots for the offline report: scatter plots whose labels never overlap, and bar charts.

No browser measures text when the report is written, so labels are placed by estimated text boxes (`place_labels`),
wider than common sans-serif fonts draw them: candidate places around each marker, then further out with a leader
line, then a number and a legend under the plot. The geometry is pure functions over boxes, which the tests check.
"""

from __future__ import annotations

import html
import math
from typing import NamedTuple

# ---------------------------------------------------------------- label placement

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in SVG pixels, y downwards."""
Segment = tuple[float, float, float, float]
"""(x1, y1, x2, y2) in SVG pixels."""

LABEL_FONT = 11
MARKER_RADIUS = 5
LABEL_GAP = 3
"""Pixels kept clear between a label and a marker or another label, and between a marker and its label."""
ASCENT, DESCENT = 0.95, 0.3
"""A label box's extent above and below the text's baseline, in font sizes: more than common sans-serif fonts use."""
WIDE_CHARACTERS = frozenset("mwMW@%…")


class Label(NamedTuple):
    """What is drawn beside one spot: the names of its markers, a line each (markers closer than a marker's radius
    draw as one blob, so they share a label), or, where the names found no room, their legend numbers. box is None
    where even the numbers found none; the legend still explains them."""

    lines: tuple[str, ...]
    members: tuple[int, ...]
    """Indices of the markers it labels."""
    box: Box | None
    leader: Segment | None


def text_width(text: str, font_size: float) -> float:
    """An upper estimate of `text`'s rendered width: 0.64 em a character (sans-serif digits and lower case fit
    in that), a full em for capitals and the wide letters, so a box drawn from it never turns out narrower than the
    text."""
    return font_size * sum(1.0 if c.isupper() or c in WIDE_CHARACTERS else 0.64 for c in text)


def text_height(font_size: float) -> float:
    return (ASCENT + DESCENT) * font_size


def fit_text(text: str, max_width: float, font_size: float) -> str:
    """`text`, cut short with an ellipsis where its estimated width exceeds `max_width`."""
    if text_width(text, font_size) <= max_width:
        return text
    while text and text_width(text + "…", font_size) > max_width:
        text = text[:-1]
    return text + "…"


def boxes_overlap(a: Box, b: Box, gap: float = 0.0) -> bool:
    """Whether two boxes come closer than `gap` (0: whether they intersect; touching edges do not)."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def box_inside(box: Box, area: Box) -> bool:
    return area[0] <= box[0] and area[1] <= box[1] and box[2] <= area[2] and box[3] <= area[3]


def segment_crosses_box(segment: Segment, box: Box) -> bool:
    """Whether any part of the segment lies strictly inside the box (Liang–Barsky clipping)."""
    x1, y1, x2, y2 = segment
    low, high = 0.0, 1.0
    for delta, start, lo, hi in ((x2 - x1, x1, box[0], box[2]), (y2 - y1, y1, box[1], box[3])):
        if delta == 0:
            if not lo < start < hi:
                return False
            continue
        t1, t2 = sorted(((lo - start) / delta, (hi - start) / delta))
        low, high = max(low, t1), min(high, t2)
    return low < high


def _box_towards(x: float, y: float, dx: float, dy: float, width: float, height: float) -> Box:
    """The box that touches the point (x, y) and lies on its (dx, dy) side (centred along an axis where that
    direction has little of it)."""
    left = x if dx > 0.3 else x - width if dx < -0.3 else x - width / 2
    top = y if dy > 0.3 else y - height if dy < -0.3 else y - height / 2
    return left, top, left + width, top + height


NEAR_DIRECTIONS = ((1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (-1, -1), (1, 1), (-1, 1))
"""Right, left, above, below, then the diagonals: where a reader looks first for a point's label."""


def label_candidates(cx: float, cy: float, width: float, height: float, radius: float = MARKER_RADIUS,
                     rings: int = 6) -> list[tuple[Box, Segment | None]]:
    """Places for a width × height label of the marker at (cx, cy), in order of preference: against the marker in
    the near directions, then rings further out in 16 directions, each joined to the marker by a leader line."""
    near = radius + LABEL_GAP
    out: list[tuple[Box, Segment | None]] = [
        (_box_towards(cx + dx * near, cy + dy * near, dx, dy, width, height), None) for dx, dy in NEAR_DIRECTIONS]
    angles = [math.atan2(dy, dx) for dx, dy in NEAR_DIRECTIONS] + [math.pi / 8 * k for k in range(1, 16, 2)]
    for ring in range(1, rings + 1):
        distance = near + ring * (height + LABEL_GAP)
        for angle in angles:
            dx, dy = math.cos(angle), math.sin(angle)
            x, y = cx + dx * distance, cy + dy * distance
            out.append((_box_towards(x, y, dx, dy, width, height), (cx + dx * radius, cy + dy * radius, x, y)))
    return out


def group_coincident(markers: list[tuple[str, float, float]], radius: float = MARKER_RADIUS) -> list[list[int]]:
    """Marker indices grouped by spot: a marker joins the first group whose first marker lies within `radius` of
    it. Such markers draw as one blob; separate labels would only fight over the same places."""
    groups: list[list[int]] = []
    for i, (_, x, y) in enumerate(markers):
        near = next((g for g in groups if math.hypot(x - markers[g[0]][1], y - markers[g[0]][2]) <= radius), None)
        if near is None:
            groups.append([i])
        else:
            near.append(i)
    return groups


def _number_range(numbers: list[str]) -> str:
    return numbers[0] if len(numbers) == 1 else ",".join(numbers) if len(numbers) == 2 else f"{numbers[0]}–{numbers[-1]}"


def place_labels(markers: list[tuple[str, float, float]], area: Box, font_size: float = LABEL_FONT,
                 radius: float = MARKER_RADIUS) -> tuple[list[Label], list[tuple[str, str]]]:
    """A label for each spot of markers (name, cx, cy), first come first served: the first of `label_candidates`
    that lies inside `area` and clear of every marker, every label placed so far and their leader lines. Names with
    no free place become numbers; returns the labels and the legend [(number, name)]."""
    marker_boxes = [(cx - radius, cy - radius, cx + radius, cy + radius) for _, cx, cy in markers]
    placed: list[Box] = []
    leaders: list[Segment] = []

    def free_place(lines: tuple[str, ...], cx: float, cy: float, reach: float) -> tuple[Box, Segment | None] | None:
        width, height = max(text_width(line, font_size) for line in lines), len(lines) * text_height(font_size)
        for box, leader in label_candidates(cx, cy, width, height, reach):
            if (box_inside(box, area) and not any(boxes_overlap(box, b, LABEL_GAP) for b in placed)
                    and not any(boxes_overlap(box, m, LABEL_GAP - 1) for m in marker_boxes)
                    and not any(segment_crosses_box(s, box) for s in leaders)
                    and not (leader and any(segment_crosses_box(leader, b) for b in placed))):
                return box, leader
        return None

    labels, legend = [], []
    for members in group_coincident(markers, radius):
        _, cx, cy = markers[members[0]]
        reach = radius + max(math.hypot(markers[i][1] - cx, markers[i][2] - cy) for i in members)
        lines = tuple(markers[i][0] for i in members)
        place = free_place(lines, cx, cy, reach)
        if place is None:
            numbers = [str(len(legend) + 1 + k) for k in range(len(members))]
            legend += [(number, markers[i][0]) for number, i in zip(numbers, members)]
            lines = (_number_range(numbers),)
            place = free_place(lines, cx, cy, reach)
        if place is not None:
            placed.append(place[0])
            if place[1]:
                leaders.append(place[1])
        labels.append(Label(lines, tuple(members), *(place or (None, None))))
    return labels, legend


# ---------------------------------------------------------------- HTML and SVG

MARKER_COLOUR, FRONT_COLOUR, BASELINE_COLOUR = "#3366cc", "#2a9d48", "#777777"
AXIS_PADDING = 0.08
"""Fraction of the data's span left free beyond its extremes, so that no marker sits on an axis."""


def axis_range(values: list[float], padding: float = AXIS_PADDING) -> tuple[float, float]:
    """(low, high) that fits `values` with `padding` of their span either side, never below 0 for data that are not
    (KL, sizes): an axis from 0 would squeeze an 8 % perplexity difference into a few pixels. A single value gets a
    span of 10 % of itself (1 for 0)."""
    lo, hi = min(values), max(values)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    low, high = lo - padding * span, hi + padding * span
    if lo >= 0 and low < 0:
        low = 0.0
    return low, high


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) inside [low, high], about `count` of them (the step whose
    count comes nearest)."""
    intervals = max(count - 1, 1)
    power = 10 ** math.floor(math.log10((high - low) / intervals))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda step: abs((high - low) / step - intervals))
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((high - first) / step + 1e-9) + 1)]


def _tick_text(value: float) -> str:
    return f"{value:.4g}"


def _label_svg(label: Label, cx: float, font_size: float) -> str:
    """The label's lines inside its box, anchored on the side facing its marker (the box's width is an upper
    estimate, so the text hugs the marker), and its leader line."""
    left, top, right, _ = label.box
    x, anchor = (right, "end") if right <= cx else (left, "start") if left >= cx else ((left + right) / 2, "middle")
    parts = []
    if label.leader:
        x1, y1, x2, y2 = label.leader
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#999" stroke-width="0.8"/>')
    for i, line in enumerate(label.lines):
        y = top + i * text_height(font_size) + ASCENT * font_size
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{font_size}">{html.escape(line)}</text>')
    return "".join(parts)


def _legend_svg(rows: list[tuple[str, str]], top: float, width: float, row_height: float = 16) -> str:
    """Legend rows under a plot: (swatch SVG, text), the text cut to the plot's width with the whole in a <title>."""
    parts = []
    for i, (swatch, text) in enumerate(rows):
        y = top + i * row_height
        shown = fit_text(text, width - 40, LABEL_FONT)
        title = f"<title>{html.escape(text)}</title>" if shown != text else ""
        parts.append(f'<g transform="translate(0 {y:.1f})">{swatch}'
                     f'<text x="34" y="11" font-size="{LABEL_FONT}">{title}{html.escape(shown)}</text></g>')
    return "".join(parts)


def scatter(points: list[tuple[str, float, float]], x_label: str, y_label: str, front: tuple[str, ...] | list[str] = (),
             front_label: str = "Pareto front (size vs KL)", baseline: str | None = None, width=520, height=320) -> str:
    """Points with a label beside each (numbered, with a legend, where names find no room); the points named in
    `front` are coloured and joined by a step line in the given order, with a legend entry `front_label`. Both axes
    fit the data (axis_range). The point named `baseline`, where given, is grey with a dashed line across the plot
    at its height, and the right axis reads the change against it in percent: what a reader compares."""
    if not points:
        return ""
    left, pad = 72, 60
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = axis_range(xs)
    y0, y1 = axis_range(ys)
    base_y = next((y for name, _, y in points if name == baseline), None)
    right = width - (pad + 16 if base_y else pad)  # the Δ% axis's ticks and title need a wider margin

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (right - left)

    def sy(y):
        return height - pad + -(y - y0) / (y1 - y0) * (height - 2 * pad)

    markers = [(name, sx(x), sy(y)) for name, x, y in points]
    # Labels may use the top and right margins but stay clear of the axes, their ticks and titles (the Δ% axis's
    # in the right margin).
    labels, numbered = place_labels(markers, (left + 2, 4, right - 2 if base_y else width - 4, height - pad - 2))
    on_front = set(front)
    legend = []
    if on_front:
        legend.append((f'<line x1="4" y1="7" x2="26" y2="7" stroke="{FRONT_COLOUR}" stroke-width="1.5"/>'
                       f'<circle cx="15" cy="7" r="4" fill="{FRONT_COLOUR}"/>', front_label))
    unplaced = {markers[i][0] for label in labels if label.box is None for i in label.members}
    legend += [("", f"{number} = {name}" + (" (no room beside its point)" if name in unplaced else ""))
               for number, name in numbered]
    total_height = height + (8 + 16 * len(legend) if legend else 0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_height}" role="img">',
             f'<line x1="{left}" y1="{height - pad}" x2="{right}" y2="{height - pad}" stroke="#333"/>',
             f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{height - pad}" stroke="#333"/>',
             f'<text x="{(left + right) / 2}" y="{height - 15}" text-anchor="middle" font-size="12">{html.escape(x_label)}</text>',
             f'<text x="14" y="{height / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {height / 2})">{html.escape(y_label)}</text>']
    for xv in nice_ticks(x0, x1):
        parts.append(f'<text class="x-tick" x="{sx(xv):.1f}" y="{height - pad + 16}" text-anchor="middle" '
                     f'font-size="10">{_tick_text(xv)}</text>')
    for yv in nice_ticks(y0, y1):
        parts.append(f'<text class="y-tick" x="{left - 6}" y="{sy(yv) + 3:.1f}" text-anchor="end" '
                     f'font-size="10">{_tick_text(yv)}</text>')
    if base_y is not None:
        parts.append(f'<line class="baseline" x1="{left}" y1="{sy(base_y):.1f}" x2="{right}" y2="{sy(base_y):.1f}" '
                     f'stroke="{BASELINE_COLOUR}" stroke-dasharray="4 3"><title>{html.escape(baseline)}: '
                     f'{base_y:.4g}</title></line>')
    if base_y:  # a change in percent needs a baseline that is not 0
        parts.append(f'<line x1="{right}" y1="{pad}" x2="{right}" y2="{height - pad}" stroke="#999"/>')
        for dv in nice_ticks(100 * (y0 / base_y - 1), 100 * (y1 / base_y - 1)):
            parts.append(f'<text class="delta-tick" x="{right + 5}" y="{sy(base_y * (1 + dv / 100)) + 3:.1f}" '
                         f'font-size="10">{f"{dv:+.3g}" if dv else "0"}%</text>')
        parts.append(f'<text x="{width - 6}" y="{height / 2}" text-anchor="middle" font-size="12" '
                     f'transform="rotate(-90 {width - 6} {height / 2})">Δ% vs {html.escape(baseline)}</text>')
    at = {name: (cx, cy) for name, cx, cy in markers}
    steps = [at[name] for name in front if name in at]
    if len(steps) > 1:
        path = [steps[0]] + [q for p, n in zip(steps, steps[1:]) for q in ((n[0], p[1]), n)]
        parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in path)}" fill="none" '
                     f'stroke="{FRONT_COLOUR}" stroke-width="1.5"/>')
    for (name, x, y), (_, cx, cy) in zip(points, markers):
        colour = FRONT_COLOUR if name in on_front else BASELINE_COLOUR if name == baseline else MARKER_COLOUR
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{MARKER_RADIUS}" fill="{colour}">'
                     f'<title>{html.escape(name)}: {x:.4g}, {y:.4g}</title></circle>')
    parts += [_label_svg(label, markers[label.members[0]][1], LABEL_FONT) for label in labels if label.box]
    parts.append(_legend_svg(legend, height + 4, width))
    parts.append("</svg>")
    return "".join(parts)


def bars(values: list[tuple[str, float]], label: str, width=520, bar_height=24) -> str:
    """Horizontal bars; the name margin widens for long names up to a limit, beyond which names are cut with an
    ellipsis and carry the whole name in a <title>."""
    if not values:
        return ""
    longest = max(text_width(name, LABEL_FONT) for name, _ in values)
    left, top = min(220, max(150, math.ceil(longest) + 12)), 30
    height = top + bar_height * len(values) + 20
    biggest = max(v for _, v in values) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{left}" y="18" font-size="12">{html.escape(label)}</text>']
    for i, (name, value) in enumerate(values):
        y = top + i * bar_height
        w = (width - left - 80) * value / biggest
        shown = fit_text(name, left - 10, LABEL_FONT)
        title = f"<title>{html.escape(name)}</title>" if shown != name else ""
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="{LABEL_FONT}">{title}{html.escape(shown)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{bar_height - 8}" fill="#dc8a33"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 15}" font-size="{LABEL_FONT}">{value:,.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


PART_COLOURS = {"attention": "#3366cc", "mlp": "#dc8a33", "experts": "#2f9e6b"}


def layer_bars(rows: list[tuple[int, str, float]], label: str, width: int = 720, height: int = 240) -> str:
    """One bar per (decoder layer, part kind, value), the kinds of a layer side by side in PART_COLOURS, layers along
    the x axis (every fifth numbered), a legend in the top right corner."""
    if not rows:
        return ""
    pad_left, pad_right, pad_top, pad_bottom = 56, 12, 28, 36
    layers = sorted({layer for layer, _, _ in rows})
    kinds = [k for k in PART_COLOURS if any(kind == k for _, kind, _ in rows)]
    biggest = max(value for _, _, value in rows) or 1.0
    slot = (width - pad_left - pad_right) / len(layers)
    bar = max(slot * 0.8 / max(len(kinds), 1), 0.5)
    plot_h = height - pad_top - pad_bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{pad_left}" y="16" font-size="12">{html.escape(label)}</text>',
             f'<line x1="{pad_left}" y1="{height - pad_bottom}" x2="{width - pad_right}" y2="{height - pad_bottom}" stroke="#333"/>',
             f'<line x1="{pad_left}" y1="{pad_top}" x2="{pad_left}" y2="{height - pad_bottom}" stroke="#333"/>']
    for frac in (0, 0.5, 1):
        y = height - pad_bottom - frac * plot_h
        parts.append(f'<text x="{pad_left - 6}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{frac * biggest:.2g}</text>')
    for layer, kind, value in rows:
        i, k = layers.index(layer), kinds.index(kind)
        x = pad_left + i * slot + slot * 0.1 + k * bar
        h = plot_h * value / biggest
        parts.append(f'<rect x="{x:.1f}" y="{height - pad_bottom - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                     f'fill="{PART_COLOURS[kind]}"><title>layer {layer} {kind}: {value:.4g}</title></rect>')
    step = max(1, math.ceil(len(layers) / 16))
    for i, layer in enumerate(layers):
        if i % step == 0:
            x = pad_left + (i + 0.5) * slot
            parts.append(f'<text x="{x:.1f}" y="{height - pad_bottom + 14}" text-anchor="middle" font-size="10">{layer}</text>')
    parts.append(f'<text x="{(pad_left + width - pad_right) / 2:.1f}" y="{height - 6}" text-anchor="middle" '
                 f'font-size="11">decoder layer</text>')
    for k, kind in enumerate(kinds):
        x = width - pad_right - 90 * (len(kinds) - k)
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{PART_COLOURS[kind]}"/>'
                     f'<text x="{x + 14}" y="17" font-size="11">{kind}</text>')
    parts.append("</svg>")
    return "".join(parts)
