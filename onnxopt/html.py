"""Self-contained HTML pages with inline SVG charts: no JavaScript, no network, no
dependency beyond the standard library.

Reports (the ``tune`` Pareto page, the run report) are *views* of data that is
already computed: this module only draws. It knows nothing about onnxopt's records.

Building blocks, each returning an HTML fragment (a ``str``):

- :func:`scatter` — an SVG scatter plot. Each :class:`Series` has a style
  (``"primary"`` solid blue, ``"muted"`` grey — e.g. dominated trials, ``"failed"``
  hollow grey crosses, ``"reference"`` a black diamond), optionally a line through its
  points (``line="step"`` for a Pareto front, ``"straight"``), a legend entry, and
  per-point labels and hover text (``<title>``, shown by any browser as a tooltip).
  Axes are linear or logarithmic (``log=True``), with 1-2-5 ticks and a tick
  formatter; points without a finite coordinate are left out (and counted in a note
  under the chart), never drawn at a made-up place.
- :func:`bars` — horizontal (grouped) bars from zero, one row per label.
- :func:`details` — a collapsible block that works without scripts.
- :func:`table` — a table from a header and rows; cells are escaped text, numbers
  are right-aligned; a row may carry a CSS class (``"muted"``, ``"failed"``,
  ``"primary"``).
- :func:`section`, :func:`paragraph`, :func:`definition_list` — small text blocks.
- :func:`page` — the document shell (title, inline stylesheet, fragments in order).
- :func:`write_page` — writes a page atomically (temporary file, then rename).

Every string that comes from data is escaped; nothing is fetched when the page is
opened. The pages read the same printed as on screen (no interaction needed).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxopt.files import write_atomic

STYLES = ("primary", "muted", "failed", "reference")
LINES = (None, "step", "straight")

_COLORS = {
    "primary": "#1f6feb",
    "muted": "#a0a4a8",
    "failed": "#b8bbbe",
    "reference": "#202124",
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #202124; background: #fff; margin: 24px auto; max-width: 1100px;
       padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; }
p.sub { color: #5f6368; margin: 0 0 16px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figcaption { color: #5f6368; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #3c4043; }
svg .axis-label { font-size: 12px; fill: #202124; }
svg .title { font-size: 13px; font-weight: 600; fill: #202124; }
svg .grid { stroke: #eceff1; }
svg .axis { stroke: #5f6368; }
svg .pt-label { font-size: 10px; fill: #1f3b6b; }
div.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border-bottom: 1px solid #e0e3e7; padding: 3px 10px; text-align: left;
         vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.muted td { color: #80868b; }
tr.failed td { color: #9aa0a6; font-style: italic; }
tr.primary td { font-weight: 600; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { color: #5f6368; }
dd { margin: 0; }
"""


# ------------------------------------------------------------------------ scatter


@dataclass
class Point:
    x: float | None
    y: float | None
    label: str = ""  # drawn next to the point (keep it short)
    hover: str = ""  # tooltip text (<title>)


@dataclass
class Series:
    name: str
    points: Sequence[Point]
    style: str = "primary"  # one of STYLES
    line: str | None = None  # one of LINES: connect the points (sorted by x)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"series {self.name!r}: style {self.style!r}, expected {STYLES}")
        if self.line not in LINES:
            raise ValueError(f"series {self.name!r}: line {self.line!r}, expected {LINES}")


@dataclass
class Axis:
    label: str
    log: bool = False
    fmt: Callable[[float], str] = field(default=lambda v: f"{v:g}")
    # where the "better" end is, drawn as a hint in the label ("lower is better")
    better: str | None = None  # "low" | "high" | None


def scatter(
    series: Sequence[Series],
    x: Axis,
    y: Axis,
    *,
    title: str = "",
    width: int = 520,
    height: int = 360,
    caption: str = "",
) -> str:
    """An inline SVG scatter plot (see the module docstring) inside a <figure>."""
    plot = _Plot(width, height, x, y)
    drawable = [(s, [p for p in s.points if plot.accepts(p)]) for s in series]
    plot.fit([p for _, pts in drawable for p in pts])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title or y.label)}">',
        '<rect width="100%" height="100%" fill="#fff"/>',
    ]
    if title:
        parts.append(f'<text class="title" x="{plot.left}" y="16">{_esc(title)}</text>')
    parts += plot.axes()
    for s, pts in sorted(drawable, key=lambda item: _draw_order(item[0].style)):
        parts += plot.series(s, pts)
    parts += plot.legend(series)
    parts.append("</svg>")
    skipped = sum(len(s.points) for s in series) - sum(len(p) for _, p in drawable)
    notes = [caption] if caption else []
    if skipped:
        notes.append(f"{skipped} point(s) without a finite value on an axis are not drawn.")
    cap = f"<figcaption>{_esc(' '.join(notes))}</figcaption>" if notes else ""
    return f'<figure style="width:{width}px">' + "".join(parts) + cap + "</figure>"


def _tick(line: tuple, at: tuple, anchor: str, label: str) -> list[str]:
    """A grid line across the plot and the tick label at its end (coordinates as
    they are written: numbers or already formatted text)."""
    x1, y1, x2, y2 = line
    return [
        f'<line class="grid" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}"/>',
        f'<text x="{at[0]}" y="{at[1]}" text-anchor="{anchor}">{_esc(label)}</text>',
    ]


def _draw_order(style: str) -> int:
    return {"failed": 0, "muted": 1, "reference": 2, "primary": 3}[style]


class _Plot:
    """Pixel mapping and drawing of one chart; margins leave room for tick labels."""

    left, right, top, bottom = 64, 16, 28, 64

    def __init__(self, width: int, height: int, x: Axis, y: Axis) -> None:
        self.width, self.height, self.x, self.y = width, height, x, y
        self.x_range = self.y_range = (0.0, 1.0)

    def accepts(self, p: Point) -> bool:
        return _usable(p.x, self.x.log) and _usable(p.y, self.y.log)

    def fit(self, points: Sequence[Point]) -> None:
        self.x_range = _range([p.x for p in points], self.x.log)
        self.y_range = _range([p.y for p in points], self.y.log)

    def px(self, value: float) -> float:
        lo, hi = self.x_range
        frac = (_t(value, self.x.log) - lo) / (hi - lo)
        return self.left + frac * (self.width - self.left - self.right)

    def py(self, value: float) -> float:
        lo, hi = self.y_range
        frac = (_t(value, self.y.log) - lo) / (hi - lo)
        return self.height - self.bottom - frac * (self.height - self.top - self.bottom)

    def axes(self) -> list[str]:
        x0, x1 = self.left, self.width - self.right
        y0, y1 = self.height - self.bottom, self.top
        out = []
        for value in _ticks(self.x_range, self.x.log):
            px = f"{self.px(value):.1f}"
            out += _tick((px, y0, px, y1), (px, y0 + 14), "middle", self.x.fmt(value))
        for value in _ticks(self.y_range, self.y.log):
            py = self.py(value)
            line = (x0, f"{py:.1f}", x1, f"{py:.1f}")
            out += _tick(line, (x0 - 6, f"{py + 4:.1f}"), "end", self.y.fmt(value))
        out.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>')
        out.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>')
        out.append(
            f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{y0 + 32}" '
            f'text-anchor="middle">{_esc(_axis_text(self.x))}</text>'
        )
        cy = (y0 + y1) / 2
        out.append(
            f'<text class="axis-label" x="14" y="{cy:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {cy:.1f})">{_esc(_axis_text(self.y))}</text>'
        )
        return out

    def series(self, s: Series, points: Sequence[Point]) -> list[str]:
        color = _COLORS[s.style]
        out = [f'<g class="series {s.style}" data-name="{_esc(s.name)}">']
        if s.line and len(points) > 1:
            out.append(self._line(s.line, points, color))
        for p in points:
            out.append(self._marker(s.style, self.px(p.x), self.py(p.y), color, p.hover))
            if p.label:
                out.append(self._label(p))
        out.append("</g>")
        return out

    def _label(self, p: Point) -> str:
        x, y = self.px(p.x), self.py(p.y) - 6
        if x + 7 + 6 * len(p.label) > self.width:  # near the right edge: write it leftwards
            return (
                f'<text class="pt-label" x="{x - 7:.1f}" y="{y:.1f}" text-anchor="end">'
                f"{_esc(p.label)}</text>"
            )
        return f'<text class="pt-label" x="{x + 7:.1f}" y="{y:.1f}">{_esc(p.label)}</text>'

    def _line(self, kind: str, points: Sequence[Point], color: str) -> str:
        ordered = sorted(points, key=lambda p: (p.x, p.y))
        coords = []
        for i, p in enumerate(ordered):
            if kind == "step" and i:
                coords.append((self.px(p.x), self.py(ordered[i - 1].y)))
            coords.append((self.px(p.x), self.py(p.y)))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        return (
            f'<polyline points="{path}" fill="none" stroke="{color}" '
            'stroke-width="1.5" stroke-opacity="0.6"/>'
        )

    def _marker(self, style: str, x: float, y: float, color: str, hover: str) -> str:
        tip = f"<title>{_esc(hover)}</title>" if hover else ""
        if style == "failed":
            d = 4
            return (
                f'<path class="marker" d="M{x - d:.1f},{y - d:.1f}L{x + d:.1f},{y + d:.1f}'
                f'M{x - d:.1f},{y + d:.1f}L{x + d:.1f},{y - d:.1f}" stroke="{color}" '
                f'stroke-width="1.5">{tip}</path>'
            )
        if style == "reference":
            d = 6
            return (
                f'<path class="marker" d="M{x:.1f},{y - d:.1f}L{x + d:.1f},{y:.1f}'
                f'L{x:.1f},{y + d:.1f}L{x - d:.1f},{y:.1f}Z" fill="{color}">{tip}</path>'
            )
        radius = 5 if style == "primary" else 4
        return (
            f'<circle class="marker" cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{color}" '
            f'fill-opacity="{0.9 if style == "primary" else 0.6}">{tip}</circle>'
        )

    def legend(self, series: Sequence[Series]) -> list[str]:
        out, x = [], self.left
        y = self.height - 12
        for s in series:
            if not s.points:
                continue
            out.append(self._marker(s.style, x + 5, y - 4, _COLORS[s.style], ""))
            out.append(f'<text x="{x + 14}" y="{y}">{_esc(s.name)}</text>')
            x += 24 + 6.5 * len(s.name)
        return out


def _axis_text(axis: Axis) -> str:
    hint = {"low": " (lower is better)", "high": " (higher is better)"}.get(axis.better or "", "")
    return axis.label + (" [log]" if axis.log else "") + hint


def _usable(value: float | None, log: bool) -> bool:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if log else True


def _t(value: float, log: bool) -> float:
    return math.log10(value) if log else float(value)


def _range(values: Sequence[float | None], log: bool) -> tuple[float, float]:
    """Axis range in transformed units, padded by 5 %; a single value gets a window."""
    data = [_t(v, log) for v in values if v is not None]
    if not data:
        return (0.0, 1.0)
    lo, hi = min(data), max(data)
    if hi == lo:
        pad = 0.5 if log else (abs(lo) * 0.1 or 1.0)
        return (lo - pad, hi + pad)
    pad = (hi - lo) * 0.05
    return (lo - pad, hi + pad)


def _ticks(bounds: tuple[float, float], log: bool, target: int = 6) -> list[float]:
    """1-2-5 ticks inside ``bounds`` (transformed units); values in data units."""
    lo, hi = bounds
    if log:
        out = []
        for exponent in range(math.floor(lo), math.ceil(hi) + 1):
            for mantissa in (1, 2, 5):
                value = mantissa * 10.0**exponent
                if lo <= math.log10(value) <= hi:
                    out.append(value)
        if len(out) > target + 2:
            out = [v for v in out if f"{v:e}".startswith("1")]
        if len(out) < 2:  # less than a decade: round linear ticks, placed on the log scale
            linear = _ticks((10**lo, 10**hi), log=False, target=4)
            out = [v for v in linear if v > 0]
        return out
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    count = math.floor((hi - first) / step + 1e-9) + 1
    return [round(first + i * step, 12) for i in range(max(count, 0))]


# ------------------------------------------------------------------------ bars


BAR_COLORS = ("#1f6feb", "#9ec5fe", "#d29922", "#a0a4a8")


def bars(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    axis: Axis,
    *,
    title: str = "",
    width: int = 520,
    caption: str = "",
    max_rows: int = 60,
) -> str:
    """Horizontal bars, one row per label and one bar per series in it (grouped), from
    zero; ``None`` or non-finite values leave their bar out. Rows beyond ``max_rows``
    are left out and counted in the caption (a page stays readable)."""
    shown = list(labels)[:max_rows]
    name_w = min(220, 12 + 6 * max((len(label) for label in shown), default=4))
    row_h = 6 + 10 * max(1, len(series))
    top, bottom = (28 if title else 8), 40
    height = top + bottom + row_h * len(shown)
    values = [v for _, vs in series for v in vs[: len(shown)] if _usable(v, False)]
    hi = max([0.0, *values]) or 1.0
    lo = min([0.0, *values])
    x0, x1 = name_w, width - 16

    def px(value: float) -> float:
        return x0 + (value - lo) / (hi - lo) * (x1 - x0)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title or axis.label)}">',
        '<rect width="100%" height="100%" fill="#fff"/>',
    ]
    if title:
        parts.append(f'<text class="title" x="8" y="16">{_esc(title)}</text>')
    y_axis = height - bottom
    for value in _ticks((lo, hi), False, target=5):
        x = px(value)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y_axis}"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{y_axis + 14}" text-anchor="middle">'
            f"{_esc(axis.fmt(value))}</text>"
        )
    for row, label in enumerate(shown):
        y = top + row * row_h
        clipped = label if len(label) <= 34 else label[:33] + "…"
        parts.append(
            f'<text x="{x0 - 6}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end">'
            f"<title>{_esc(label)}</title>{_esc(clipped)}</text>"
        )
        for k, (name, vs) in enumerate(series):
            value = vs[row] if row < len(vs) else None
            if not _usable(value, False):
                continue
            start, end = sorted((px(0.0), px(value)))
            parts.append(
                f'<rect class="bar" x="{start:.1f}" y="{y + 3 + 10 * k}" '
                f'width="{max(end - start, 0.5):.1f}" height="8" '
                f'fill="{BAR_COLORS[k % len(BAR_COLORS)]}">'
                f"<title>{_esc(f'{label}: {name} {axis.fmt(value)}')}</title></rect>"
            )
    parts.append(f'<line class="axis" x1="{x0}" y1="{y_axis}" x2="{x1}" y2="{y_axis}"/>')
    parts.append(
        f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{y_axis + 30}" '
        f'text-anchor="middle">{_esc(_axis_text(axis))}</text>'
    )
    legend_x = x0
    for k, (name, _) in enumerate(series if len(series) > 1 else ()):
        parts.append(
            f'<rect x="{legend_x}" y="{height - 10}" width="10" height="8" '
            f'fill="{BAR_COLORS[k % len(BAR_COLORS)]}"/>'
            f'<text x="{legend_x + 14}" y="{height - 2}">{_esc(name)}</text>'
        )
        legend_x += 30 + 6.5 * len(name)
    parts.append("</svg>")
    notes = [caption] if caption else []
    if len(labels) > len(shown):
        notes.append(f"{len(labels) - len(shown)} more row(s) not drawn; the table has them all.")
    cap = f"<figcaption>{_esc(' '.join(notes))}</figcaption>" if notes else ""
    return f'<figure style="width:{width}px">' + "".join(parts) + cap + "</figure>"


def details(summary: str, *fragments: str, open_: bool = False) -> str:
    """A collapsible block that needs no script (<details>); printed pages show it."""
    flag = " open" if open_ else ""
    return f"<details{flag}><summary>{_esc(summary)}</summary>{''.join(fragments)}</details>"


# ------------------------------------------------------------------------ text blocks


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    row_classes: Sequence[str | None] | None = None,
) -> str:
    """An HTML table; numbers (int/float cells) are right-aligned."""
    classes = list(row_classes) if row_classes is not None else []
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = classes[i] if i < len(classes) else None
        attr = f' class="{_esc(css)}"' if css else ""
        cells = "".join(_cell(value) for value in row)
        body.append(f"<tr{attr}>{cells}</tr>")
    return (
        f'<div class="table"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{_esc('' if value is None else str(value))}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="num">{_esc(f"{value:.4g}")}</td>'
    return f"<td>{_esc(str(value))}</td>"


def section(heading: str, *fragments: str) -> str:
    return f"<section><h2>{_esc(heading)}</h2>{''.join(fragments)}</section>"


def paragraph(text: str, *, code: bool = False) -> str:
    inner = f"<code>{_esc(text)}</code>" if code else _esc(text)
    return f"<p>{inner}</p>"


def definition_list(items: Iterable[tuple[str, object]]) -> str:
    body = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(str(v))}</dd>" for k, v in items)
    return f"<dl>{body}</dl>"


def charts(*figures: str) -> str:
    """Figures side by side (wrapping on narrow screens)."""
    return f'<div class="charts">{"".join(figures)}</div>'


def page(title: str, *fragments: str, subtitle: str = "") -> str:
    """A complete HTML document: inline CSS, the fragments in order, no scripts."""
    sub = f'<p class="sub">{_esc(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{_esc(title)}</h1>{sub}{''.join(fragments)}</body></html>\n"
    )


def write_page(document: str, path: str | os.PathLike) -> Path:
    """Write ``document`` to ``path`` atomically (a reader never sees half a page)."""
    return write_text(document, path)


def write_text(document: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically (``onnxopt.files.write_atomic``)."""
    return write_atomic(path, document)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def format_bytes(value: float) -> str:
    """Sizes for people, in decimal units everywhere onnxopt prints one (1 kB = 1000
    bytes): the run table, inspect, tune and the HTML pages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"
