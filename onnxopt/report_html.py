"""The run report as one self-contained HTML page (``--report out.html``).

A view of the same report dict the JSON file and the terminal table show: this module
computes no figure of its own, it only lays out what the run recorded.

- the run: pipeline, data, inputs, budget, time, and warnings about the data;
- the step table (status, reason, sizes, fidelity vs the original);
- fidelity across steps: worst-output SQNR and cosine vs the original, as written and
  as deployed where the step measured it, and top-1 agreement where outputs are class
  scores;
- size and deflated size after each step (a waterfall from the original);
- per-layer detail where a pass reports it, drawn by the rules in ``LAYER_VIEWS``
  (sparsity per weight, fallback sensitivity per node, codebook bits per tensor,
  channels kept per group...) and, for every list of records a pass reports, a table
  in a collapsible block.

Charts are inline SVG (onnxopt/html.py): the page loads nothing, runs no script, and
reads the same printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onnxopt import html
from onnxopt.report import step_label, step_reason, step_rows

# ---------------------------------------------------------------------------- page


def render_report(report: dict[str, Any]) -> str:
    steps = report.get("steps", [])
    fragments = [
        html.definition_list(_run_facts(report)),
        *_warnings(report),
        html.section("Steps", _step_table(steps)),
    ]
    if steps:
        fragments.append(
            html.section(
                "Fidelity and size across steps",
                html.charts(_fidelity_chart(report, "sqnr"), _fidelity_chart(report, "cosine")),
                html.charts(*_top1_chart(report), _size_chart(report)),
            )
        )
    for step in steps:
        block = _step_detail(step)
        if block:
            fragments.append(block)
    subtitle = f"onnxopt {report.get('onnxopt_version', '')} · {report.get('input') or ''}"
    return html.page("onnxopt run report", *fragments, subtitle=subtitle)


def _run_facts(report: dict[str, Any]) -> list[tuple[str, object]]:
    facts: list[tuple[str, object]] = [("pipeline", report.get("pipeline", ""))]
    if report.get("validation_samples") is not None:
        facts.append(
            (
                "data",
                f"{report['validation_samples']} validation and "
                f"{report.get('calibration_samples', 0)} calibration samples from "
                f"{report.get('data', '')}",
            )
        )
    else:
        facts.append(("data", report.get("data", "")))
    if report.get("inputs"):
        facts.append(("inputs", ", ".join(report["inputs"])))
    if report.get("budget"):
        facts.append(("lossy budget", report["budget"]))
    facts.append(("time", f"{report.get('seconds', 0):.2f} s"))
    original, final = report.get("original") or {}, report.get("final") or {}
    if original and final:
        facts.append(("size", f"{_bytes(original.get('size'))} → {_bytes(final.get('size'))}"))
        facts.append(
            (
                "deflated",
                f"{_bytes(original.get('compressed'))} → {_bytes(final.get('compressed'))}",
            )
        )
    if report.get("output"):
        facts.append(("written to", report["output"]))
    return facts


def _warnings(report: dict[str, Any]) -> list[str]:
    lines = [n["text"] for n in report.get("data_notes", []) if isinstance(n, dict)]
    lines += [
        f"the original model already fails {check}: {message} (not held against the steps)"
        for check, message in (report.get("original_check_failures") or {}).items()
    ]
    return [html.section("Notes", *(html.paragraph(line) for line in lines))] if lines else []


def _step_table(steps: list[dict[str, Any]]) -> str:
    header = (
        "#",
        "step",
        "status",
        "time s",
        "size",
        "deflated",
        "params",
        "SQNR dB",
        "cosine",
        "top-1",
        "why (when not accepted)",
    )
    rows, classes = [], []
    for s in step_rows(steps):
        after = s.get("after") or s.get("before") or {}
        worst = _worst(s)
        number, text = step_label(s)
        rows.append(
            (
                number,
                text,
                s["status"],
                float(s.get("seconds", 0.0)),
                _bytes(after.get("size")),
                _bytes(after.get("compressed")),
                after.get("params"),
                _num(worst.get("sqnr")),
                _num(worst.get("cosine")),
                _num(worst.get("top1")),
                step_reason(s),
            )
        )
        classes.append({"rolled back": "failed", "no-op": "muted"}.get(s["status"]))
    return html.table(header, rows, row_classes=classes)


def _worst(step: dict[str, Any]) -> dict[str, Any]:
    """The worse of as written / as deployed, per metric (as the terminal table)."""
    from onnxopt.report import worst_of

    return worst_of(step.get("worst_vs_original") or {}, step.get("worst_vs_original_deployed"))


# ---------------------------------------------------------------------------- charts


def _fidelity_chart(report: dict[str, Any], metric: str) -> str:
    steps = report["steps"]
    label = {"sqnr": "worst-output SQNR vs original, dB", "cosine": "worst-output cosine"}[metric]
    written = [
        html.Point(s["index"], _metric(s, metric), hover=_hover(s))
        for s in steps
        if s["status"] == "accepted"
    ]
    deployed = [
        html.Point(
            s["index"],
            _capped(metric, _num((s.get("worst_vs_original_deployed") or {}).get(metric))),
            hover=_hover(s),
        )
        for s in steps
        if s["status"] == "accepted" and s.get("worst_vs_original_deployed")
    ]
    rejected = [
        html.Point(s["index"], _metric(s, metric), hover=_hover(s))
        for s in steps
        if s["status"] == "rolled back"
    ]
    series = [html.Series("as written", written, line="straight")]
    if deployed:
        series.append(html.Series("as deployed", deployed, style="reference"))
    if rejected:
        series.append(html.Series("rolled back", rejected, style="failed"))
    caption = (
        "Accepted steps (cumulative, against the original model); rolled-back candidates "
        f"as crosses. Values above {SQNR_CEILING:g} dB (float round-off, an exact match) "
        f"are drawn at {SQNR_CEILING:g}."
        if metric == "sqnr"
        else "Accepted steps, worst output; 1 is identical."
    )
    return html.scatter(
        series,
        html.Axis("step", fmt=lambda v: f"{v:g}" if float(v).is_integer() else ""),
        html.Axis(label, better="high"),
        title=label,
        caption=caption,
    )


def _top1_chart(report: dict[str, Any]) -> list[str]:
    points = [
        html.Point(s["index"], _metric(s, "top1"), hover=_hover(s))
        for s in report["steps"]
        if s["status"] == "accepted"
    ]
    if not any(p.y is not None for p in points):
        return []
    return [
        html.scatter(
            [html.Series("top-1 agreement", points, line="straight")],
            html.Axis("step", fmt=lambda v: f"{v:g}" if float(v).is_integer() else ""),
            html.Axis("top-1 agreement with the original", better="high"),
            title="top-1 agreement (class-score outputs)",
        )
    ]


def _size_chart(report: dict[str, Any]) -> str:
    labels = ["original"]
    size = [(report.get("original") or {}).get("size")]
    deflated = [(report.get("original") or {}).get("compressed")]
    for s in report["steps"]:
        after = s.get("after") or s.get("before") or {}
        labels.append(f"{s['index']} {s['step']} ({s['status']})")
        size.append(after.get("size"))
        deflated.append(after.get("compressed"))
    return html.bars(
        labels,
        [("file", size), ("deflated", deflated)],
        html.Axis("bytes", fmt=html.format_bytes),
        title="model size after each step",
        caption="A rolled-back or no-op step keeps the size before it.",
    )


SQNR_CEILING = 80.0  # dB; above it an output is numerically the same (lossless steps)


def _metric(step: dict[str, Any], metric: str) -> float | None:
    return _capped(metric, _num((step.get("worst_vs_original") or {}).get(metric)))


def _capped(metric: str, value: float | None) -> float | None:
    if metric == "sqnr" and value is not None:
        return min(value, SQNR_CEILING)
    return value


def _hover(step: dict[str, Any]) -> str:
    return f"{step['index']} {step['step']}: {step['status']}"


# ---------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerView:
    """How to draw one per-layer detail a pass reports: ``details[key]`` is a list of
    records (or a name -> value mapping); one bar per record."""

    key: str
    label: str  # record field naming the row
    values: tuple[tuple[str, str], ...]  # (record field, legend name)
    title: str
    axis: str
    fmt: Callable[[float], str] = lambda v: f"{v:g}"


def _percent(value: float) -> str:
    return f"{value * 100:.0f}%"


LAYER_VIEWS: tuple[LayerView, ...] = (
    LayerView(
        "tensors",
        "tensor",
        (("sparsity_before", "before"), ("sparsity_after", "after")),
        "sparsity per weight",
        "zeros",
        _percent,
    ),
    LayerView("tensors", "tensor", (("bits", "bits"),), "codebook bits per tensor", "bits"),
    LayerView("tensors", "tensor", (("sqnr_db", "SQNR"),), "codebook error per tensor", "SQNR dB"),
    LayerView(
        "tensors",
        "tensor",
        (("fraction", "clipped"),),
        "values clipped per weight",
        "clipped",
        _percent,
    ),
    LayerView(
        "groups",
        "group",
        (("channels_before", "before"), ("channels_after", "after")),
        "channels per group",
        "channels",
    ),
    LayerView(
        "fallback.sensitivity_sqnr_db",
        "",
        (("", "SQNR"),),
        "quantization sensitivity per node (SQNR with only that node int8)",
        "SQNR dB",
    ),
)


def _step_detail(step: dict[str, Any]) -> str:
    details = step.get("details") or {}
    figures = [figure for view in LAYER_VIEWS if (figure := _layer_chart(view, details))]
    tables = [
        html.details(f"{key} ({len(records)})", _records_table(records))
        for key, records in details.items()
        if _is_records(records)
    ]
    skipped = step.get("skipped") or []
    if skipped:
        tables.append(html.details(f"skipped ({len(skipped)})", _records_table(skipped)))
    counts = step.get("counts") or {}
    notes = step.get("notes") or []
    if not (figures or tables or counts or notes):
        return ""
    fragments = []
    if counts:
        fragments.append(html.definition_list((k, _plain(v)) for k, v in counts.items()))
    fragments += [html.paragraph(note) for note in notes[:20]]
    if figures:
        fragments.append(html.charts(*figures))
    fragments += tables
    return html.section(f"Step {step['index']}: {step['step']} — {step['status']}", *fragments)


def _layer_chart(view: LayerView, details: dict[str, Any]) -> str:
    data: Any = details
    for part in view.key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    if isinstance(data, dict) and view.label == "":
        labels = [str(k) for k in data]
        series = [(view.values[0][1], [_num(v) for v in data.values()])]
    elif _is_records(data):
        rows = [r for r in data if all(f in r for f, _ in view.values) and view.label in r]
        if not rows:
            return ""
        labels = [str(r[view.label]) for r in rows]
        series = [(name, [_num(r[field]) for r in rows]) for field, name in view.values]
    else:
        return ""
    if not labels or not any(v is not None for _, vs in series for v in vs):
        return ""
    return html.bars(labels, series, html.Axis(view.axis, fmt=view.fmt), title=view.title)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _records_table(records: list[dict[str, Any]]) -> str:
    header: list[str] = []
    for record in records:
        header += [k for k in record if k not in header]
    rows = [[_plain(record.get(k)) for k in header] for record in records[:500]]
    return html.table(header, rows)


def _plain(value: Any) -> object:
    """A cell: numbers stay numbers (right-aligned), the rest becomes short text."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return value
    text = str(value)
    return text if len(text) <= 120 else text[:119] + "…"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # "inf" strings from the JSON-friendly report
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _bytes(value: Any) -> str:
    return "-" if value is None else html.format_bytes(value)
