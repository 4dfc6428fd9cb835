"""The run report: a JSON-serializable dict and a terminal table built from it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from onnxopt import __version__
from onnxopt.check import worst
from onnxopt.pipeline import ModelStats, RunOutcome, StepRecord

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
        "counts": result.counts if result else {},
        "details": _clean(result.details) if result else {},
        "notes": result.notes if result else [],
    }


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


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the JSON report atomically."""
    target = Path(path).resolve()
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2, sort_keys=False, default=str)
        temp = f.name
    os.replace(temp, target)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width summary: one row per step plus the totals."""
    header = (
        "#",
        "step",
        "status",
        "time",
        "nodes",
        "size",
        "deflated",
        "params",
        "worst vs original",
    )
    rows = []
    for s in report["steps"]:
        after = s["after"] or s["before"] or {}
        w = s["worst_vs_original"]
        metrics = " ".join(
            filter(None, (_fmt_metric(k, w.get(k)) for k in ("max_abs", "cosine", "sqnr", "top1")))
        )
        if s["status"] == "rolled back":
            metrics = (metrics + "  " if metrics else "") + "REASON: " + s["reason"].splitlines()[0]
        rows.append(
            (
                str(s["index"]),
                _clip(s["step"], 44),
                s["status"],
                f"{s['seconds']:.2f}s",
                str(after.get("nodes", "")),
                _human_bytes(after.get("size")),
                _human_bytes(after.get("compressed")),
                f"{after.get('params', 0):,}",
                metrics,
            )
        )
    o, f = report["original"], report["final"]
    rows.append(
        (
            "",
            "original -> final",
            "",
            f"{report['seconds']:.2f}s",
            f"{o['nodes']}->{f['nodes']}",
            f"{_human_bytes(o['size'])}->{_human_bytes(f['size'])}",
            f"{_human_bytes(o.get('compressed'))}->{_human_bytes(f.get('compressed'))}",
            f"{o['params']:,}->{f['params']:,}",
            "",
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
