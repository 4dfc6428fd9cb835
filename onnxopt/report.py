"""The run report: a JSON-serializable dict and a terminal table built from it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from onnxopt import __version__, html
from onnxopt.check import worst
from onnxopt.pipeline import ModelStats, RunOutcome, StepRecord
from onnxopt.results import skip_label

REPORT_VERSION = 1


def build_report(outcome: RunOutcome, **extra: Any) -> dict[str, Any]:
    return {
        "onnxopt_version": __version__,
        "report_version": REPORT_VERSION,
        "pipeline": outcome.pipeline,
        "data": outcome.data_source,
        "seconds": round(outcome.seconds, 3),
        "aborted": outcome.aborted,
        "original_check_failures": outcome.baseline_failures,
        "original": _stats(outcome.original),
        "final": _stats(outcome.final),
        "steps": [_step(r) for r in outcome.steps],
        **extra,
    }


def _stats(stats: ModelStats | None) -> dict[str, Any] | None:
    return dataclasses.asdict(stats) if stats is not None else None


def _step(record: StepRecord) -> dict[str, Any]:
    result = record.result
    return {
        "index": record.index,
        "step": record.step,
        "required_by": record.required_by,
        "status": record.status,
        "reason": record.reason,
        "lossless": record.lossless,
        "budget": record.budget,
        "compared_with": "previous step" if record.lossless else "original model",
        "seconds": round(record.seconds, 3),
        "iterations": record.iterations,
        "before": _stats(record.before),
        "after": _stats(record.after),
        "metrics_vs_original": {k: m.as_dict() for k, m in record.vs_original.items()},
        "metrics_vs_previous": {k: m.as_dict() for k, m in record.vs_previous.items()},
        "worst_vs_original": _clean(worst(record.vs_original)) if record.vs_original else {},
        "metrics_vs_original_deployed": {
            k: m.as_dict() for k, m in record.vs_original_deployed.items()
        },
        "worst_vs_original_deployed": (
            _clean(worst(record.vs_original_deployed)) if record.vs_original_deployed else {}
        ),
        "counts": result.counts if result else {},
        "details": _clean(result.details) if result else {},
        "notes": result.notes if result else [],
        "skipped": [s.as_dict() for s in result.skipped] if result else [],
        "prerequisites": [_step(p) for p in record.prerequisites],
    }


def worst_of(first: dict, second: dict | None) -> dict:
    """Per metric, the worse of two summaries (a step as written and as deployed)."""
    if not second:
        return first
    lowest = ("cosine", "sqnr", "top1")
    merged = dict(first)
    for key, value in second.items():
        old = merged.get(key)
        if value is None or old is None:
            merged[key] = old if old is not None else value
            continue
        pick = min if key in lowest else max
        # infinities are "inf" strings in the report (JSON): compare them as floats
        merged[key] = pick(old, value, key=float)
    return merged


def _clean(value: Any) -> Any:
    """Make numpy scalars and infinities JSON-friendly."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report atomically: an HTML page for ``.html``/``.htm``, else JSON."""
    target = Path(path)
    if target.suffix.lower() in (".html", ".htm"):
        from onnxopt.report_html import render_report

        return html.write_text(render_report(report), target)
    return html.write_text(json.dumps(report, indent=2, sort_keys=False, default=str), target)


def _human_bytes(n: int | None) -> str:
    return "-" if n is None else html.format_bytes(n)


def _fmt_metric(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return f"{name}={value}"
    if name in ("cosine", "top1"):
        return f"{name}={value:.5f}" if value < 1 else f"{name}=1"
    if name == "sqnr":
        return f"sqnr={value:.1f}dB"
    return f"{name}={value:.2g}"


# Columns of the summary table, in the order they are dropped when the terminal is
# too narrow (first dropped first); "#", "step", "status", "size" and "vs original"
# always stay, the step text and the metrics shrink last.
DROP_ORDER = ("nodes", "time", "params", "deflated")
COLUMNS = ("#", "step", "status", "time", "nodes", "size", "deflated", "params", "vs original")
METRIC_ORDER = ("cosine", "sqnr", "top1", "max_abs")  # shortened from the end


def format_table(report: dict[str, Any], width: int | None = None, wide: bool = False) -> str:
    """The terminal summary: a header line (data, inputs, budget), one row per step with
    the reason of every step that was not accepted under it, and the totals. It fits
    ``width`` columns by dropping columns in ``DROP_ORDER``; ``wide`` keeps all."""
    steps = step_rows(report["steps"])
    rows = [_step_cells(s) for s in steps]
    rows.append(_total_cells(report))
    columns = list(COLUMNS)
    metrics = list(METRIC_ORDER)
    step_width = 44

    def render() -> list[str]:
        return _render(columns, rows, steps, metrics, step_width, width, wide)

    lines = render()
    if not wide and width:
        for column in DROP_ORDER:
            if max(map(len, lines)) <= width:
                break
            columns.remove(column)
            lines = render()
        # below about 70 columns the table keeps this minimal form and the terminal wraps
        while max(map(len, lines)) > width and (step_width > 16 or len(metrics) > 1):
            if step_width > 16:
                step_width -= 8
            else:
                metrics.pop()
            lines = render()
    return "\n".join([*_header_lines(report, width if not wide else None), *lines])


def step_rows(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a step table: each step, after the prerequisites its pass declared
    (an ``upgrade-opset`` step recorded in it). The terminal and the HTML page use it."""
    return [p for s in steps for p in (*s.get("prerequisites", ()), s)]


def step_label(step: dict[str, Any]) -> tuple[str, str]:
    """``(number, text)`` of a step row; a prerequisite says which step it serves."""
    required_by = step.get("required_by")
    if required_by:
        return "", f"{step['step']} (for {required_by.split('(')[0]})"
    return str(step["index"]), step["step"]


def step_reason(step: dict[str, Any]) -> str:
    """Why a step was not accepted: the failed check, else the pass's own note, else
    the first thing it skipped ("" for an accepted step). Terminal and HTML use it."""
    if step["status"] == "accepted":
        return ""
    reason = step.get("reason") or ""
    if not reason and step.get("notes"):
        reason = step["notes"][0]
    if not reason and step.get("skipped"):
        reason = skip_label(step["skipped"][0])
        if len(step["skipped"]) > 1:
            reason += f" (+{len(step['skipped']) - 1} more skipped)"
    return reason.splitlines()[0] if reason else ""


def _step_cells(s: dict[str, Any]) -> dict[str, Any]:
    after = s["after"] or s["before"] or {}
    number, text = step_label(s)
    return {
        "#": number,
        "step": text,
        "status": s["status"],
        "time": f"{s['seconds']:.2f}s",
        "nodes": str(after.get("nodes", "")),
        "size": _human_bytes(after.get("size")),
        "deflated": _human_bytes(after.get("compressed")),
        "params": f"{after.get('params', 0):,}",
        "vs original": worst_of(
            s.get("worst_vs_original") or {}, s.get("worst_vs_original_deployed")
        ),
    }


def _total_cells(report: dict[str, Any]) -> dict[str, Any]:
    o, f = report["original"], report["final"]
    return {
        "#": "",
        "step": "original -> final",
        "status": "",
        "time": f"{report['seconds']:.2f}s",
        "nodes": f"{o['nodes']}->{f['nodes']}",
        "size": f"{_human_bytes(o['size'])}->{_human_bytes(f['size'])}",
        "deflated": f"{_human_bytes(o.get('compressed'))}->{_human_bytes(f.get('compressed'))}",
        "params": f"{o['params']:,}->{f['params']:,}",
        "vs original": {},
    }


def _render(columns, rows, steps, metrics, step_width, width, wide) -> list[str]:
    def text(row: dict[str, Any], column: str) -> str:
        value = row[column]
        if column == "vs original":
            return " ".join(filter(None, (_fmt_metric(k, value.get(k)) for k in metrics)))
        if column == "step" and not wide:
            return _clip(value, step_width)
        return value

    table = [list(columns)] + [[text(row, c) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in table]
    rule = "-" * max(len(line) for line in lines)
    out = [lines[0], rule]
    for line, step in zip(lines[1:-1], steps):
        out.append(line)
        out += _reason_lines(step, width if not wide else None)
    return [*out, rule, lines[-1]]


def _reason_lines(step: dict[str, Any], width: int | None) -> list[str]:
    """Why a step was not accepted (rolled back: the failed check; no-op / skipped: the
    pass's own note, else the first thing it skipped), indented under its row."""
    limit = max(40, (width or 10**6) - 6)
    if step["status"] == "accepted":  # only what the user must see: numeric trouble
        shown = ("numpy warning", "lossless within float rounding")
        warned = [n for n in step.get("notes") or [] if n.startswith(shown)]
        return ["     " + line for n in warned for line in textwrap.wrap(f"note: {n}", limit)]
    first = step_reason(step)
    if not first:
        return []
    return ["     " + line for line in textwrap.wrap(f"why: {first}", limit)[:4]]


def _header_lines(report: dict[str, Any], width: int | None) -> list[str]:
    """One line on what the checks ran on and against what budget."""
    parts = []
    if report.get("validation_samples") is not None:
        parts.append(
            f"validated on {report['validation_samples']} samples "
            f"({report.get('calibration_samples', 0)} for calibration) from {report['data']}"
        )
    if report.get("inputs"):
        parts.append("inputs " + ", ".join(report["inputs"]))
    if report.get("budget"):
        parts.append(f"lossy budget {report['budget']}")
    if not parts:
        return []
    lines = textwrap.wrap("; ".join(parts), width or 10**6, subsequent_indent="  ")
    for note in report.get("data_notes", []):
        if note.get("level") == "note":
            lines += textwrap.wrap(f"note: {note['text']}", width or 10**6)
    return lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
