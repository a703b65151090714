"""Trend charts as server-rendered inline SVG: no script, no CDN, nothing fetched by the page.

A chart is small enough to write by hand and too important to depend on a front-end library: the
published severity bands (PHQ-9 5/10/15/20, GAD-7 5/10/15) are drawn as labelled lines so a reader
sees at a glance which band each score fell in, and each point carries a ``<title>`` tooltip with
its time and value (read aloud by screen readers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape

#: Published cut-points (Kroenke 2001 for PHQ-9; Spitzer 2006 for GAD-7).
PHQ9_BANDS: tuple[tuple[float, str], ...] = ((5, "5"), (10, "10"), (15, "15"), (20, "20"))
GAD7_BANDS: tuple[tuple[float, str], ...] = ((5, "5"), (10, "10"), (15, "15"))

WIDTH, HEIGHT = 400, 210
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 10, 12, 26


@dataclass(frozen=True)
class Point:
    """One measurement: when, the value, and a short label for the tooltip (never patient text)."""

    at: datetime
    value: float
    label: str = ""


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def trend_svg(points: Sequence[Point], *, y_max: float, bands: Sequence[tuple[float, str]] = (),
              title: str, tz: ZoneInfo, empty_text: str, unit: str = "") -> Markup:
    """An accessible line chart of ``points`` (oldest to newest) on a 0..``y_max`` axis.

    Band lines are ``<line class="band" data-band="10">``; points are ``<circle class="point">``.
    With no points the chart still shows its axis and bands plus ``empty_text``.
    """
    pts = sorted(points, key=lambda p: p.at)
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM

    def y_of(v: float) -> float:
        return _TOP + plot_h * (1 - min(max(v, 0.0), y_max) / y_max)

    if len(pts) > 1:
        t0, t1 = pts[0].at.timestamp(), pts[-1].at.timestamp()
        span = (t1 - t0) or 1.0

        def x_of(p: Point) -> float:
            return _LEFT + plot_w * (p.at.timestamp() - t0) / span
    else:
        def x_of(p: Point) -> float:
            return _LEFT + plot_w / 2

    out: list[str] = [
        (f'<svg class="trend" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
         f'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">'),
        f"<title>{escape(title)}</title>",
        f'<rect class="plot" x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for value, label in bands:
        y = y_of(value)
        out.append(f'<line class="band" data-band="{_fmt(value)}" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" '
                   f'y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="band-label" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{escape(label)}</text>")
    out.append(f'<text class="axis-label" x="{_LEFT - 6}" y="{_TOP + plot_h + 4:.1f}" text-anchor="end">0</text>')
    out.append(f'<text class="axis-label" x="{_LEFT - 6}" y="{_TOP + 10:.1f}" text-anchor="end">'
               f"{_fmt(y_max)}{escape(unit)}</text>")
    if not pts:
        out.append(f'<text class="empty" x="{_LEFT + plot_w / 2:.1f}" y="{_TOP + plot_h / 2:.1f}" '
                   f'text-anchor="middle">{escape(empty_text)}</text>')
    else:
        coords = [(x_of(p), y_of(p.value)) for p in pts]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            out.append(f'<polyline class="series" points="{path}"/>')
        for p, (x, y) in zip(pts, coords):
            when = p.at.astimezone(tz).strftime("%Y-%m-%d %H:%M")
            tip = f"{when}: {_fmt(p.value)}{unit}" + (f" ({p.label})" if p.label else "")
            out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="5" data-value="{_fmt(p.value)}">'
                       f"<title>{escape(tip)}</title></circle>")
        first, last = pts[0].at.astimezone(tz), pts[-1].at.astimezone(tz)
        out.append(f'<text class="axis-label" x="{_LEFT}" y="{HEIGHT - 8}">{first:%m-%d %H:%M}</text>')
        if len(pts) > 1:
            out.append(f'<text class="axis-label" x="{WIDTH - _RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
                       f"{last:%m-%d %H:%M}</text>")
    out.append("</svg>")
    return Markup("".join(out))
