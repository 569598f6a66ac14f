"""Small hand-written inline SVG plots (no plotting library is a dependency): bars, a histogram with a
threshold, line curves with vertical markers. Every plot has a bounded number of elements."""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT, MARGIN = 560, 220, 44
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_POINTS = 400  # per curve: a run of any length draws at most this many points per series


def _frame(body: str, title: str, height: int = HEIGHT) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'role="img"><title>{html.escape(title)}</title><rect width="100%" height="100%" fill="#fff"/>{body}</svg>')


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e9 else f"{value:.3g}"


def bar_chart(labels: list[str], values: list[float], title: str, colours: list[str] | None = None) -> str:
    """Horizontal bars, one row per label (labels are drawn in the left 200 px)."""
    row = 18
    height = 20 + row * len(labels)
    top = max(values, default=0) or 1
    parts = []
    for index, (label, value) in enumerate(zip(labels, values)):
        y = 10 + index * row
        width = (WIDTH - 270) * value / top
        colour = colours[index] if colours else COLOURS[0]
        parts.append(f'<text x="196" y="{y + 12}" font-size="11" text-anchor="end">{html.escape(label[:40])}</text>'
                     f'<rect x="200" y="{y + 2}" width="{width:.1f}" height="{row - 4}" fill="{colour}"/>'
                     f'<text x="{204 + width:.1f}" y="{y + 12}" font-size="11">{_fmt(value)}</text>')
    return _frame("".join(parts), title, height)


def histogram(groups: dict[str, list[float]], title: str, threshold: float | None = None, bins: int = 40) -> str:
    """Stacked histogram of the values of each group (e.g. kept / dropped) with the threshold marked."""
    values = [v for vs in groups.values() for v in vs]
    if not values:
        return _frame('<text x="10" y="20">no values</text>', title)
    low, high = min(values + ([threshold] if threshold is not None else [])), max(values + ([threshold] if threshold is not None else []))
    high = high if high > low else low + 1.0
    step = (high - low) / bins
    counts = {name: [0] * bins for name in groups}
    for name, vs in groups.items():
        for v in vs:
            counts[name][min(int((v - low) / step), bins - 1)] += 1
    top = max(sum(counts[name][b] for name in groups) for b in range(bins)) or 1
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    parts = []
    for b in range(bins):
        base = 0
        for index, name in enumerate(groups):
            count = counts[name][b]
            if count:
                h = plot_h * count / top
                y = MARGIN + plot_h - (base + h)
                parts.append(f'<rect x="{MARGIN + b * plot_w / bins:.1f}" y="{y:.1f}" width="{plot_w / bins - 1:.1f}" '
                             f'height="{h:.1f}" fill="{COLOURS[index]}"/>')
                base += h
    if threshold is not None:
        x = MARGIN + plot_w * (threshold - low) / (high - low)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN - 6}" y2="{MARGIN + plot_h}" stroke="#000" stroke-dasharray="4 3"/>'
                     f'<text x="{x + 3:.1f}" y="{MARGIN - 8}" font-size="11">threshold {_fmt(threshold)}</text>')
    parts.append(_axes(low, high, 0, top))
    parts.append(_legend(list(groups)))
    return _frame("".join(parts), title)


def _axes(x_low: float, x_high: float, y_low: float, y_high: float) -> str:
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    bottom = MARGIN + plot_h
    return (f'<line x1="{MARGIN}" x2="{MARGIN + plot_w}" y1="{bottom}" y2="{bottom}" stroke="#444"/>'
            f'<line x1="{MARGIN}" x2="{MARGIN}" y1="{MARGIN}" y2="{bottom}" stroke="#444"/>'
            f'<text x="{MARGIN}" y="{bottom + 14}" font-size="10">{_fmt(x_low)}</text>'
            f'<text x="{MARGIN + plot_w}" y="{bottom + 14}" font-size="10" text-anchor="end">{_fmt(x_high)}</text>'
            f'<text x="{MARGIN - 3}" y="{bottom}" font-size="10" text-anchor="end">{_fmt(y_low)}</text>'
            f'<text x="{MARGIN - 3}" y="{MARGIN + 8}" font-size="10" text-anchor="end">{_fmt(y_high)}</text>')


def _legend(names: list[str]) -> str:
    return "".join(f'<rect x="{MARGIN + 10 + 120 * i}" y="6" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>'
                   f'<text x="{MARGIN + 24 + 120 * i}" y="15" font-size="11">{html.escape(name[:18])}</text>'
                   for i, name in enumerate(names))


def downsample(points: list[tuple[float, float]], max_points: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `max_points` (step, value) pairs: the mean of each of `max_points` equal runs of points
    (a curve's shape over a long run, not every step), the last point kept as it is."""
    if len(points) <= max_points:
        return points
    size = len(points) / max_points
    out = []
    for i in range(max_points):
        chunk = points[int(i * size):int((i + 1) * size)] or points[int(i * size):int(i * size) + 1]
        out.append((chunk[-1][0], sum(v for _, v in chunk) / len(chunk)))
    out[-1] = points[-1]
    return out


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, markers: list[float] = (),
               marker_label: str = "resume") -> str:
    """Curves (step, value) per named series, downsampled, with dashed vertical lines at `markers`."""
    series = {name: downsample([(s, v) for s, v in pts if v is not None and math.isfinite(v)]) for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return _frame('<text x="10" y="20">no finite values</text>', title)
    xs = [s for pts in series.values() for s, _ in pts]
    ys = [v for pts in series.values() for _, v in pts]
    x_low, x_high, y_low, y_high = min(xs), max(xs), min(ys), max(ys)
    x_high = x_high if x_high > x_low else x_low + 1
    y_high = y_high if y_high > y_low else y_low + 1
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def at(s, v):
        return MARGIN + plot_w * (s - x_low) / (x_high - x_low), MARGIN + plot_h * (1 - (v - y_low) / (y_high - y_low))

    parts = []
    for index, pts in enumerate(series.values()):
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(s, v) for s, v in pts))
        parts.append(f'<polyline fill="none" stroke="{COLOURS[index % len(COLOURS)]}" stroke-width="1.5" points="{path}"/>')
    for step in markers:
        x, _ = at(step, y_low)
        parts.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN}" y2="{MARGIN + plot_h}" stroke="#888" '
                     f'stroke-dasharray="3 3"/><text x="{x + 2:.1f}" y="{MARGIN + 10}" font-size="10">{marker_label} {step:g}</text>')
    parts.append(_axes(x_low, x_high, y_low, y_high))
    parts.append(_legend(list(series)))
    return _frame("".join(parts), title)
