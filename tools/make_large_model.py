"""Write a synthetic model over 2 GB (external data) for the large-model runs.

A chain of ``--layers`` MatMul+Add+Relu blocks with ``--width`` x ``--width`` float32
weights (seeded), saved with all weights in ``MODEL.onnx.data``. The defaults
(8 layers of 8192 x 8192) give 2.0 GiB (2.15 GB) of weights.

    python tools/make_large_model.py /tmp/large/big.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, layers: int, width: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    for i in range(layers):
        weight = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(
            np.float32
        )
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"))
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"]),
            helper.make_node("Relu", [f"add{i}"], [f"relu{i}"] if i < layers - 1 else ["output"]),
        ]
        current = f"relu{i}"
        del weight
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return sum(t.ByteSize() for t in inits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = build(args.output, args.layers, args.width, args.seed)
    print(f"wrote {args.output} with {size / 2**30:.2f} GiB of weights in {args.output.name}.data")


if __name__ == "__main__":
    main()
