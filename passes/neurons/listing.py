"""``onnxopt inspect --prunable``: the channel groups of a model, before anything goes.

Runs the same preparation and analysis as ``remove-neurons`` (Constant lifting, shape
constant folding, shape parameters resolved, If branches) and lists every group: the
producers whose output channels it ties together, how many prunable units it has (a
unit = channels removed together: one head dimension of every head, one shuffle
position of every shuffle group...), each producer's output width, and for a blocked
group every reason (op, node, rule). Nothing is selected or removed.
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxopt.graph import to_graph
from onnxopt.passes.neurons import branches
from onnxopt.passes.neurons.constants import fold_constant_shape_ops
from onnxopt.passes.neurons.groups import ChannelGraph, analyze
from onnxopt.passes.neurons.layout import infer_shapes
from onnxopt.passes.neurons.shapes import resolve_shape_parameters, symbolic_dims


def prunable_groups(model: onnx.ModelProto) -> dict[str, Any]:
    """``{"groups": [...], "prunable": n, "blocked": n, "units": n}`` for ``model``."""
    graph = to_graph(model)
    fold_constant_shape_ops(graph)
    has_branches = branches.prepare(graph) > 0
    resolve_shape_parameters(graph)
    shapes = infer_shapes(graph)
    records = _records(analyze(graph, shapes=shapes), "main")
    if has_branches:
        symbols = symbolic_dims(graph)
        for node, key, body in list(branches.if_branches(graph)):
            resolve_shape_parameters(body, symbols)
            scope = f"{node.name or node.outputs[0].name}.{key}"
            records += _records(analyze(body, shapes=shapes), scope)
    prunable = [r for r in records if r["status"] == "prunable"]
    return {
        "groups": records,
        "prunable": len(prunable),
        "blocked": len(records) - len(prunable),
        "units": sum(r["units"] for r in prunable),
    }


def _records(cg: ChannelGraph, scope: str) -> list[dict[str, Any]]:
    records = []
    for group in cg.groups:
        producers = [p for p in group.producers if p.op != "untracked"]
        if not producers:
            continue
        removable = len(group.free) + sum(len(b) for b in group.buckets)
        records.append(
            {
                "scope": scope,
                "producers": [p.name for p in producers],
                "ops": sorted({p.op for p in producers}),
                "units": group.size,
                "removable_units": 0 if group.blocked else removable,
                "widths": {p.name: p.size for p in producers},
                "status": "blocked" if group.blocked else "prunable",
                "reasons": list(group.reasons),
            }
        )
    return records


def format_prunable(info: dict[str, Any]) -> str:
    lines = [
        f"channel groups  {len(info['groups'])}: {info['prunable']} prunable "
        f"({info['units']:,} units), {info['blocked']} blocked",
        "",
    ]
    rows = [("status", "units", "producers", "why blocked")]
    for record in info["groups"]:
        names = record["producers"]
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
        if record["scope"] != "main":
            shown = f"[{record['scope']}] {shown}"
        units = str(record["units"])
        if record["status"] == "prunable" and record["removable_units"] < record["units"]:
            units += f" ({record['removable_units']} removable)"
        rows.append((record["status"], units, shown, "; ".join(record["reasons"])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines)
