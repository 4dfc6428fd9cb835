"""``onnxopt inspect``: what a model is made of (opset, ops, parameters, weights)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt import graph as graph_utils
from onnxopt.data import input_specs
from onnxopt.html import format_bytes
from onnxopt.model import load_model
from onnxopt.store import spill_threshold
from onnxopt.stored import external_file, read_external_array
from onnxopt.wire import compressed_size, proto_nbytes


def describe(path: str | os.PathLike) -> dict[str, Any]:
    # large external data stays on disk; each weight is read, measured and dropped
    loaded = load_model(path, lazy_over=spill_threshold())
    model = loaded.proto
    graph = graph_utils.to_graph(model)
    weights = []
    for tensor in sorted(graph_utils.constants(graph), key=lambda t: t.name):
        values = _read(tensor, loaded)
        if values.dtype == np.int64 and values.size < 64:
            continue  # shape / axes constants are not weights
        weights.append(
            {
                "name": tensor.name,
                "dtype": str(
                    tensor.export_dtype
                    if not isinstance(tensor.export_dtype, int)
                    else values.dtype
                ),
                "shape": list(values.shape),
                "elements": int(values.size),
                "sparsity": (values.size - np.count_nonzero(values)) / values.size
                if values.size
                else 0.0,
            }
        )
    size = proto_nbytes(model)
    return {
        "path": str(loaded.path),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [s.describe() for s in input_specs(model)],
        "outputs": [o.name for o in model.graph.output],
        "nodes": len(graph.nodes),
        "ops": graph_utils.op_histogram(graph),
        "params": graph_utils.param_count(graph),
        "size_bytes": size,
        "compressed_bytes": (
            compressed_size(model) if size < 512 * 2**20 and not loaded.lazy else None
        ),
        "external_data_files": [str(p) for p in loaded.external_files],
        "subgraphs": sum(
            1 for n in graph.nodes for v in n.attrs.values() if isinstance(v, gs.Graph)
        ),
        "weights": weights,
    }


def _read(tensor: gs.Constant, loaded) -> np.ndarray:
    """A constant's values, not cached in the graph (one weight in memory at a time)."""
    lazy = tensor._values
    if not isinstance(lazy, LazyValues):
        return tensor.values
    proto = lazy.tensor
    if (
        loaded.lazy
        and isinstance(proto, onnx.TensorProto)
        and proto.data_location == onnx.TensorProto.EXTERNAL
    ):
        return read_external_array(proto, external_file(proto, loaded.base_dir))
    return lazy.load()


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"model      {info['path']}",
        f"ir/opset   IR {info['ir_version']}, "
        + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
        f"producer   {info['producer'] or '-'}",
        f"inputs     {'; '.join(info['inputs'])}",
        f"outputs    {', '.join(info['outputs'])}",
        f"nodes      {info['nodes']}: " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()),
        f"params     {info['params']:,}",
        f"size       {format_bytes(info['size_bytes'])} ({info['size_bytes']:,} bytes"
        + (
            f"; {format_bytes(info['compressed_bytes'])} deflated)"
            if info["compressed_bytes"]
            else ")"
        ),
    ]
    if info["subgraphs"]:
        lines.append(f"subgraphs  {info['subgraphs']} (If/Loop/Scan bodies)")
    if info["weights"]:
        lines.append("")
        rows = [("weight", "dtype", "shape", "elements", "sparsity")]
        for w in info["weights"]:
            rows.append(
                (
                    w["name"],
                    w["dtype"],
                    "x".join(map(str, w["shape"])) or "scalar",
                    f"{w['elements']:,}",
                    f"{w['sparsity']:.1%}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
