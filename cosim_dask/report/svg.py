"""Static line charts as inline SVG strings, for the training report. No JavaScript, no
dependency: every chart carries its title and axis labels as text, and every plotted series
its data in ``data-`` attributes so that tests (and readers of the source) can check them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 560, 340
LEFT, RIGHT, TOP, BOTTOM = 72, 18, 58, 52
COLORS = {"blue": "#1f77b4", "orange": "#ff7f0e", "green": "#2ca02c", "grey": "#888888",
          "red": "#d62728"}


@dataclass
class Series:
    """One polyline: ``key`` names it in ``data-key``; ``x`` and ``y`` have equal length."""

    key: str
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = "blue"
    dashed: bool = False
    markers: bool = False


@dataclass
class VMark:
    """A labelled vertical line at ``x`` (e.g. the effective rank)."""

    key: str
    x: float
    label: str


@dataclass
class Chart:
    """A chart: title, axis labels, series; ``log_y`` for a logarithmic y axis."""

    chart_id: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    log_y: bool = False
    integer_x: bool = False
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None
    marks: list[VMark] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k steps) in [lo, hi]; whole numbers if ``integer``."""
    span = hi - lo
    raw = max(span / max(n, 1), 1.0) if integer else span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + 1e-9 * span:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten in [lo, hi], thinned to at most 8; round linear ticks within a decade."""
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    every = max(1, math.ceil((b - a + 1) / 8))
    ticks = [10.0**e for e in range(a, b + 1, every)
             if lo * (1 - 1e-9) <= 10.0**e <= hi * (1 + 1e-9)]
    return ticks if len(ticks) >= 2 else [t for t in nice_ticks(lo, hi) if t > 0]


def _padded(values: list[float], log: bool) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi - lo < 1e-12:
        pad = 0.5 if log or lo == 0 else abs(lo) * 0.1
        lo, hi = lo - pad, hi + pad
    else:
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    return (10**lo, 10**hi) if log else (lo, hi)


def _fmt_tick(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:g}"


def render(chart: Chart) -> str:
    """The chart as an ``<svg>`` element (a string), with a ``role="img"`` and a title."""
    xs = [float(v) for s in chart.series for v in s.x]
    ys = [float(v) for s in chart.series for v in s.y]
    x0, x1 = chart.x_range or _padded(xs + [m.x for m in chart.marks] or [0.0, 1.0], False)
    y0, y1 = chart.y_range or _padded(ys or ([1.0] if chart.log_y else [0.0, 1.0]), chart.log_y)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        if chart.log_y:
            t = (math.log10(v) - math.log10(y0)) / (math.log10(y1) - math.log10(y0))
        else:
            t = (v - y0) / (y1 - y0)
        return TOP + (1 - t) * ph

    out = [
        f'<svg id="chart-{escape(chart.chart_id)}" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'data-log-y="{str(chart.log_y).lower()}" aria-label="{escape(chart.title)}">',
        f"<title>{escape(chart.title)}</title>",
        f'<text class="chart-title" x="{WIDTH / 2}" y="22" text-anchor="middle">'
        f"{escape(chart.title)}</text>",
        f'<rect class="plot-area" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/>',
    ]
    for t in log_ticks(y0, y1) if chart.log_y else nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick y" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{_fmt_tick(t)}</text>")
    for t in nice_ticks(x0, x1, integer=chart.integer_x):
        x = sx(t)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}"/>')
        out.append(f'<text class="tick x" x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">'
                   f"{_fmt_tick(t)}</text>")
    out.append(f'<text class="axis-label x" x="{LEFT + pw / 2}" y="{HEIGHT - 10}" '
               f'text-anchor="middle">{escape(chart.xlabel)}</text>')
    out.append(f'<text class="axis-label y" transform="translate(16 {TOP + ph / 2}) '
               f'rotate(-90)" text-anchor="middle">{escape(chart.ylabel)}</text>')
    for s in chart.series:
        pts = " ".join(f"{sx(float(a)):.2f},{sy(float(b)):.2f}" for a, b in zip(s.x, s.y,
                                                                                  strict=True))
        color = COLORS.get(s.color, s.color)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(
            f'<polyline class="series" data-key="{escape(s.key)}" data-n="{len(s.x)}" '
            f'data-x="{escape(json.dumps(list(s.x)))}" data-y="{escape(json.dumps(list(s.y)))}" '
            f'points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}>'
            f"<title>{escape(s.label)}</title></polyline>"
        )
        if s.markers:
            out.extend(f'<circle class="marker" cx="{sx(float(a)):.2f}" cy="{sy(float(b)):.2f}" '
                       f'r="3" fill="{color}"/>' for a, b in zip(s.x, s.y, strict=True))
    for m in chart.marks:
        x = sx(m.x)
        out.append(f'<line class="mark" data-key="{escape(m.key)}" data-x="{m.x!r}" '
                   f'x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#d62728" '
                   f'stroke-dasharray="4 3"/>')
        out.append(f'<text class="mark-label" x="{x + 4:.1f}" y="{TOP + 14}" fill="#d62728">'
                   f"{escape(m.label)}</text>")
    x = LEFT
    for s in chart.series:  # the legend: one row between the title and the plot
        y = TOP - 12
        color = COLORS.get(s.color, s.color)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<line x1="{x}" x2="{x + 20}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text class="legend" x="{x + 26}" y="{y}">{escape(s.label)}</text>')
        x += 40 + 6.5 * len(s.label)
    out.append("</svg>")
    return "\n".join(out)


def placeholder(chart_id: str, title: str, message: str) -> str:
    """A chart-sized box that says why there is no chart."""
    return (
        f'<svg id="chart-{escape(chart_id)}" class="chart missing" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<text class="chart-title" x="{WIDTH / 2}" y="22" text-anchor="middle">'
        f"{escape(title)}</text>"
        f'<rect class="plot-area" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{HEIGHT - TOP - BOTTOM}"/>'
        f'<text class="missing-note" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
        f"{escape(message)}</text></svg>"
    )
