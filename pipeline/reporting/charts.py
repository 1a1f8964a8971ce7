"""Inline SVG charts for the run report: bars, curves and a confusion heat map.

Plain SVG strings, so the report needs no plotting library in the browser and no
network. Every label that comes from the data (class names, series names) is
HTML-escaped here; the functions return ``Markup`` that the template inserts as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from markupsafe import Markup, escape

# Colour-blind-safe (Okabe-Ito) colours for series; errors in the heat map are vermilion.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
SPLIT_COLOURS = {"train": "#0072B2", "val": "#E69F00", "test": "#009E73"}
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _num(value: float) -> str:
    return f"{value:.4g}"


def stacked_bars(
    rows: Sequence[tuple[str, dict[str, int]]], colours: dict[str, str], row_px: int = 14
) -> Markup:
    """One horizontal bar per label, split into coloured segments (e.g. train/val/test).

    ``rows``: (label, {segment: count}) in display order; segments follow ``colours``.
    """
    label_px, bar_px, value_px = 170, 520, 60
    top = 22
    height = top + row_px * len(rows) + 4
    width = label_px + bar_px + value_px
    peak = max((sum(parts.values()) for _, parts in rows), default=0) or 1
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" {FONT}>'
    ]
    x = label_px
    for name, colour in colours.items():  # legend
        out.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="13">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    for i, (label, parts) in enumerate(rows):
        y = top + i * row_px
        total = sum(parts.values())
        out.append(
            f'<text x="{label_px - 6}" y="{y + row_px - 4}" text-anchor="end">'
            f"{escape(_clip(label, 26))}<title>{escape(label)}</title></text>"
        )
        x = float(label_px)
        for name in colours:
            count = parts.get(name, 0)
            if count <= 0:
                continue
            w = bar_px * count / peak
            out.append(
                f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_px - 4}" '
                f'fill="{colours[name]}"><title>{escape(label)}: {count} {escape(name)}'
                "</title></rect>"
            )
            x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + row_px - 4}">{total}</text>')
    out.append("</svg>")
    return Markup("".join(out))


@dataclass(frozen=True)
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    dashed: bool = False


def line_chart(
    series: Sequence[Series],
    title: str,
    y_label: str,
    marker_x: float | None = None,
    marker_label: str = "",
) -> Markup:
    """Curves on shared axes (epochs on x); ``marker_x`` draws a dashed vertical line."""
    width, height = 440, 250
    left, right, top, bottom = 48, 12, 26, 52
    # Each series' plottable points (an epoch without a figure is NaN), found once.
    finite = [
        [(float(x), float(y)) for x, y in zip(s.x, s.y, strict=True) if math.isfinite(float(y))]
        for s in series
    ]
    points = [p for data in finite for p in data]
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" {FONT}><text x="{left}" y="15" font-weight="600">{escape(title)}'
        "</text>"
    ]
    if not points:
        out.append(f'<text x="{left}" y="{height / 2}">no epochs recorded</text></svg>')
        return Markup("".join(out))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>'
    )
    for tick in np.linspace(y0 + pad, y1 - pad, 4):
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" '
            f'stroke="#eee"/><text x="{left - 4}" y="{sy(tick) + 4:.1f}" text-anchor="end">'
            f"{_num(tick)}</text>"
        )
    for tick in _int_ticks(x0, x1):
        out.append(
            f'<text x="{sx(tick):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 28}" text-anchor="middle">epoch'
        f'</text><text x="12" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2})">{escape(y_label)}</text>'
    )
    if marker_x is not None and x0 <= marker_x <= x1:
        mx = sx(marker_x)
        out.append(
            f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#555" '
            f'stroke-dasharray="3 3"/><text x="{mx + 3:.1f}" y="{top + 10}">'
            f"{escape(marker_label)}</text>"
        )
    legend_x = left
    for i, (s, data) in enumerate(zip(series, finite, strict=True)):
        colour = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if data:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}>'
                f"<title>{escape(s.name)}</title></polyline>"
            )
            out.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"><title>'
                f"{escape(s.name)}, epoch {_num(x)}: {_num(y)}</title></circle>"
                for x, y in data
            )
        ly = height - 8
        out.append(
            f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{ly - 4}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="2"{dash}/><text x="{legend_x + 20}" y="{ly}">'
            f"{escape(s.name)}</text>"
        )
        legend_x += 30 + 6 * len(s.name)
    out.append("</svg>")
    return Markup("".join(out))


def heatmap(cm: np.ndarray, classes: Sequence[str]) -> Markup:
    """A row-normalised confusion matrix: rows are true classes, columns predictions.

    Correct predictions (the diagonal) shade blue, errors vermilion, by the share of the
    true class's images; only non-zero cells are drawn, so 100+ classes stay small.
    Hovering a cell names the pair and its count.
    """
    n = len(classes)
    cell = max(4, min(36, 720 // max(n, 1)))
    labelled = cell >= 12
    longest = max((len(_clip(c, 22)) for c in classes), default=0)
    margin = 16 + 7 * longest if labelled else 28  # room for the longest label
    size = margin + n * cell + 4
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    out = [
        f'<svg class="chart heatmap" role="img" viewBox="0 0 {size} {size}" width="{size}" '
        f'height="{size}" {FONT}>',
        f'<rect x="{margin}" y="{margin}" width="{n * cell}" height="{n * cell}" '
        'fill="#fafafa" stroke="#ccc"/>',
    ]
    if labelled:
        for i, name in enumerate(classes):
            c = margin + i * cell + cell / 2
            label = escape(_clip(name, 22))
            out.append(
                f'<text x="{margin - 4}" y="{c + 4:.1f}" text-anchor="end">{label}</text>'
                f'<text x="{c + 4:.1f}" y="{margin - 4}" text-anchor="start" '
                f'transform="rotate(-90 {c + 4:.1f} {margin - 4})">{label}</text>'
            )
    else:
        out.append(
            f'<text x="{margin}" y="16">predicted →</text><text x="14" y="{margin}" '
            f'transform="rotate(90 14 {margin})">true →</text>'
        )
    for i, j in zip(*np.nonzero(cm), strict=True):
        alpha = 0.15 + 0.85 * share[i, j]
        colour = "#0072B2" if i == j else "#D55E00"
        out.append(
            f'<rect x="{margin + j * cell}" y="{margin + i * cell}" width="{cell}" '
            f'height="{cell}" fill="{colour}" fill-opacity="{alpha:.2f}"><title>'
            f"{escape(classes[i])} → {escape(classes[j])}: {int(cm[i, j])} "
            f"({share[i, j]:.0%} of {escape(classes[i])})</title></rect>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def _int_ticks(lo: float, hi: float, count: int = 6) -> list[int]:
    step = max(1, math.ceil((hi - lo) / count))
    return list(range(math.ceil(lo), math.floor(hi) + 1, step))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
