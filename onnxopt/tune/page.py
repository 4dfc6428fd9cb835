"""The ``pareto.html`` page of one tuned model: a view of ``pareto.json``, nothing more.

Three projections of the trials (size vs fidelity, latency vs fidelity, size vs
latency): Pareto points in blue with their trial numbers and the front's staircase,
dominated trials grey, trials over budget as grey crosses, the original model as a
black diamond where it has a finite position (its fidelity is exact, so it is
described under the fidelity charts instead). Then the points and every trial as
tables, and the search settings. Drawn with :mod:`onnxopt.html` (inline SVG, no
script, no network).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from onnxopt import html

FIDELITY_LABELS = {
    "sqnr": "SQNR vs original (dB)",
    "cosine": "cosine vs original",
    "top1": "top-1 agreement",
}


def write(pareto: dict[str, Any], path: str | os.PathLike) -> Path:
    return html.write_page(render(pareto), path)


def render(pareto: dict[str, Any]) -> str:
    name = Path(pareto["model"]).name
    trials = pareto["trials"]
    counts = _counts(trials)
    subtitle = (
        f"budget {pareto['budget']} · objective {pareto['objective']} · "
        f"{len(trials)} trials ({counts}) · {len(pareto['points'])} Pareto points · "
        f"engine {pareto['engine']} × {pareto['workers']} · seed {pareto['seed']}"
    )
    return html.page(
        f"onnxopt tune: {name}",
        html.charts(*_charts(pareto)),
        html.section("Pareto points", _points_table(pareto)),
        html.section("All trials", _trials_table(pareto)),
        html.section("Search", _settings(pareto)),
        subtitle=subtitle,
    )


def _counts(trials: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _kb(record: dict[str, Any]) -> float | None:
    size = _num(record.get("size_bytes"))
    return size / 1024 if size is not None else None


def _hover(trial: dict[str, Any], pareto: dict[str, Any]) -> str:
    parts = [f"trial {trial['trial']} ({trial['status']})", trial["pipeline"]]
    if trial.get("size_bytes") is not None:
        parts.append(f"size {html.format_bytes(trial['size_bytes'])}")
    if trial.get("fidelity") is not None:
        parts.append(f"{pareto['fidelity']} {trial['fidelity']}")
    if trial.get("latency_ms") is not None:
        parts.append(f"latency {trial['latency_ms']} ms")
    if trial.get("reason"):
        parts.append(trial["reason"])
    return "\n".join(parts)


def _series(pareto: dict[str, Any], x, y, front_line: bool = False) -> list[html.Series]:
    groups: dict[str, list[html.Point]] = {"primary": [], "muted": [], "failed": []}
    for trial in pareto["trials"]:
        style = "primary" if trial.get("pareto") else "muted"
        if trial["status"] != "ok":
            style = "failed"
        label = f"#{trial['trial']}" if style == "primary" else ""
        groups[style].append(html.Point(x(trial), y(trial), label, _hover(trial, pareto)))
    return [
        html.Series("Pareto", groups["primary"], "primary", line="step" if front_line else None),
        html.Series("dominated", groups["muted"], "muted"),
        html.Series("over budget", groups["failed"], "failed"),
    ]


def _charts(pareto: dict[str, Any]) -> list[str]:
    fid_axis = html.Axis(FIDELITY_LABELS.get(pareto["fidelity"], pareto["fidelity"]), better="high")
    size_axis = html.Axis("size (KB)", log=True, better="low")
    latency_axis = html.Axis(f"latency (ms, {pareto['threads']} thread)", better="low")
    original = pareto["original"]
    orig_note = (
        f"Original: {html.format_bytes(original['size_bytes'])}"
        + (f", {original['latency_ms']} ms" if original.get("latency_ms") else "")
        + " (exact fidelity, not drawn)."
    )
    fidelity = lambda t: _num(t.get("fidelity"))  # noqa: E731
    latency = lambda t: _num(t.get("latency_ms"))  # noqa: E731
    reference = html.Series(
        "original",
        [html.Point(original["size_bytes"] / 1024, original.get("latency_ms"), "original")],
        "reference",
    )
    # fidelity against each objective; the front's staircase on the searched one's chart
    # (on neither for objective=both)
    fidelity_charts = [
        html.scatter(
            _series(pareto, x, fidelity, pareto["objective"] == objective),
            x_axis,
            fid_axis,
            title=f"{objective} vs fidelity",
            caption=orig_note,
        )
        for objective, x, x_axis in (("size", _kb, size_axis), ("latency", latency, latency_axis))
    ]
    return [
        *fidelity_charts,
        html.scatter(
            [*_series(pareto, _kb, latency), reference],
            size_axis,
            latency_axis,
            title="size vs latency",
        ),
    ]


def _points_table(pareto: dict[str, Any]) -> str:
    original = pareto["original"]
    rows = []
    for point in pareto["points"]:
        rows.append(
            [
                point["trial"],
                point["pipeline"],
                point["size_bytes"],
                f"{point['size_bytes'] / original['size_bytes']:.3f}×",
                point.get("deflated_bytes"),
                _num(point.get("latency_ms")),
                point.get("latency_ratio"),
                _fid_text(point.get("fidelity")),
                point["model"],
                point.get("worker") or "",
            ]
        )
    header = [
        "trial",
        "pipeline",
        "bytes",
        "× original",
        "deflated",
        "latency ms",
        "× original latency",
        pareto["fidelity"],
        "model",
        "worker",
    ]
    return html.table(header, rows, row_classes=["primary"] * len(rows))


def _fid_text(value: Any) -> Any:
    number = _num(value)
    finite = number is not None and math.isfinite(number)
    return round(number, 4) if finite else value


def _trials_table(pareto: dict[str, Any]) -> str:
    rows, classes = [], []
    for trial in pareto["trials"]:
        rows.append(
            [
                trial["trial"],
                trial["status"] + (" (cached)" if trial.get("cached") else ""),
                trial["pipeline"],
                trial.get("size_bytes"),
                _fid_text(trial.get("fidelity")),
                _num(trial.get("latency_ms")),
                trial.get("seconds"),
                trial.get("reason") or "",
            ]
        )
        if trial["status"] != "ok":
            classes.append("failed")
        else:
            classes.append("primary" if trial.get("pareto") else "muted")
    header = ["trial", "status", "pipeline", "bytes", pareto["fidelity"], "latency ms", "s"]
    header.append("reason")
    return html.table(header, rows, row_classes=classes)


def _settings(pareto: dict[str, Any]) -> str:
    space = pareto["space"]
    items = [
        ("model", pareto["model"]),
        ("data", pareto["data"]),
        ("budget", pareto["budget"]),
        ("objective", pareto["objective"]),
        ("fidelity", pareto["fidelity"]),
        ("sampler", f"{space['sampler']}, rounds of {space['round']}, seed {pareto['seed']}"),
        ("trials", f"{pareto['trials_requested']} requested, {pareto['trials_run']} run"),
        ("head / tail", f"{','.join(space['head']) or '-'} / {','.join(space['tail']) or '-'}"),
    ]
    for slot in space["slots"]:
        choices = [c if isinstance(c, str) else c["pass"] + _opts(c) for c in slot["choices"]]
        items.append((f"slot {slot['name']}", " | ".join(choices)))
    items.append(("onnxopt", pareto["onnxopt_version"]))
    notes = "".join(html.paragraph(n) for n in space.get("notes", []))
    return html.definition_list(items) + notes


def _opts(choice: dict[str, Any]) -> str:
    parts = []
    for key, value in choice.items():
        if key == "pass":
            continue
        if isinstance(value, dict) and "choices" in value:
            parts.append(f"{key} in {value['choices']}")
        elif isinstance(value, dict):
            parts.append(f"{key} {value.get('low')}..{value.get('high')}")
        else:
            parts.append(f"{key}={value}")
    return f"({', '.join(parts)})" if parts else ""
