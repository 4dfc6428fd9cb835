"""Which ops onnxruntime-training can train through, measured: run with the ADJUNCT's python.

    ~/.cache/onnxopt/train-env/bin/python tools/probe_gradients.py            # every case
    ~/.cache/onnxopt/train-env/bin/python tools/probe_gradients.py Relu LSTM  # some
    ... tools/probe_gradients.py --json                                        # for tests

For each op it builds ``x -> Conv(W) -> op -> z`` (opset 17, Gelu 20; static shapes), generates
the training artifacts with ``W`` trainable and an MSE loss, and runs one AdamW step.
``ok`` means the step ran and moved ``W``; ``no-builder``: "The gradient builder has not
been registered"; ``no-kernel``: a gradient op without a CPU kernel; ``fails``: any other
error (the message is printed). Each case runs in a child process: some gradient
builders crash the interpreter (SIGSEGV), which is reported as ``crash``.

``onnxopt/train/coverage.py`` (GRADIENT_OPS / NO_GRADIENT_OPS) holds the results for
onnxruntime-training 1.19.2; ``tests/test_distill.py`` re-probes a sample of them.
Needs only numpy, onnx and onnxruntime-training (the adjunct has nothing else).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

SHAPE = [1, 4, 8, 8]
R = "random"  # a float32 initializer of the given shape


def _case(op, attrs=None, extra=(), inputs=None, outputs=1, opset=17):
    return {
        "op": op, "attrs": attrs or {}, "extra": list(extra), "inputs": inputs, "out": outputs,
        "opset": opset,
    }  # fmt: skip


CASES = {
    **{
        op: _case(op)
        for op in (
            "Abs", "Ceil", "Celu", "Clip", "Cos", "Dropout", "Elu", "Erf", "Exp", "Floor",
            "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Hardmax",
            "Identity", "Log", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Shrink",
            "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tanh",
            "ThresholdedRelu", "Flatten",
        )
    },
    **{
        op: _case(op, extra=[("b", [], 0.1)])
        for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean")
    },
    "Mod": _case("Mod", {"fmod": 1}, [("b", [], 0.5)]),
    "LeakyRelu": _case("LeakyRelu", {"alpha": 0.1}),
    "PRelu": _case("PRelu", extra=[("slope", [4, 1, 1], R)]),
    "Softmax": _case("Softmax", {"axis": -1}),
    "LogSoftmax": _case("LogSoftmax", {"axis": -1}),
    "Hardmax(axis=-1)": _case("Hardmax", {"axis": -1}),
    "AveragePool": _case("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "MaxPool": _case("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "Resize": _case("Resize", {"mode": "nearest"}, [("roi", [0], R), ("scales", [4], "1,1,2,2")]),
    "Resize(linear)": _case(
        "Resize", {"mode": "linear"}, [("roi", [0], R), ("scales", [4], "1,1,2,2")]
    ),
    **{
        op: _case(op, {"axes": [2, 3]})
        for op in (
            "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp",
            "ReduceProd", "ReduceSumSquare",
        )
    },
    "ReduceSum": _case("ReduceSum", extra=[("axes", [2], "i:2,3")]),
    "Pad": _case("Pad", {"mode": "constant"}, [("pads", [8], "i:0,0,1,1,0,0,1,1")]),
    "Pad(reflect)": _case("Pad", {"mode": "reflect"}, [("pads", [8], "i:0,0,1,1,0,0,1,1")]),
    "Einsum": _case("Einsum", {"equation": "bchw->bhwc"}),
    "Transpose": _case("Transpose", {"perm": [0, 2, 3, 1]}),
    "Reshape": _case("Reshape", extra=[("shape", [2], "i:1,-1")]),
    "Squeeze": _case("Squeeze", extra=[("axes", [1], "i:0")]),
    "Unsqueeze": _case("Unsqueeze", extra=[("axes", [1], "i:0")]),
    "Slice": _case("Slice", extra=[("s", [1], "i:1"), ("e", [1], "i:3"), ("a", [1], "i:1")]),
    "Split": _case("Split", {"axis": 1}, [("split", [2], "i:2,2")], outputs=2),
    "Concat": _case("Concat", {"axis": 1}, inputs=["y", "y"]),
    "Expand": _case("Expand", extra=[("shape", [4], "i:2,4,8,8")]),
    "Tile": _case("Tile", extra=[("repeats", [4], "i:1,1,2,1")]),
    "Gather": _case("Gather", {"axis": 3}, [("indices", [4], "i:3,2,1,0")]),
    "GatherElements": _case("GatherElements", {"axis": 3}, [("indices", SHAPE, "i:0")]),
    "Cast": _case("Cast", {"to": 1}),
    "Gelu": _case("Gelu", opset=20),
    "Where": _case("Where", extra=[("other", [], 0.0)], inputs=["cond", "y", "other"]),
    "CumSum": _case("CumSum", extra=[("axis", [], "i:1")]),
    "DepthToSpace": _case("DepthToSpace", {"blocksize": 2}),
    "SpaceToDepth": _case("SpaceToDepth", {"blocksize": 2}),
    "MatMul": _case("MatMul", extra=[("m", [8, 8], R)]),
    "Gemm": _case("Gemm", extra=[("m", [8, 8], R)], inputs=["flat", "m"]),
    "Conv": _case("Conv", extra=[("k", [4, 4, 3, 3], R)]),
    "ConvTranspose": _case("ConvTranspose", {"strides": [2, 2]}, [("k", [4, 3, 2, 2], R)]),
    "LayerNormalization": _case(
        "LayerNormalization", {"axis": -1}, [("s", [8], R), ("b", [8], R)], outputs=3
    ),
    "LayerNormalization(one output)": _case(
        "LayerNormalization", {"axis": -1}, [("s", [8], R), ("b", [8], R)]
    ),
    "InstanceNormalization": _case("InstanceNormalization", extra=[("s", [4], R), ("b", [4], R)]),
    "LSTM": _case(
        "LSTM",
        {"hidden_size": 5},
        [("w", [1, 20, 32], R), ("r", [1, 20, 5], R)],
        inputs=["seq", "w", "r"],
    ),
    "GRU": _case(
        "GRU",
        {"hidden_size": 5},
        [("w", [1, 15, 32], R), ("r", [1, 15, 5], R)],
        inputs=["seq", "w", "r"],
    ),
}  # fmt: skip


def build(case):
    """The probe model of one case (onnx only; importable without onnxruntime)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.5 * rng.random((4, 4, 1, 1))).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"])]
    for name, shape, value in case["extra"]:
        if value == R:
            array = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif isinstance(value, str):
            kind, _, text = value.rpartition(":")
            numbers = [float(v) for v in text.split(",")]
            dtype = np.int64 if kind == "i" else np.float32
            array = np.resize(np.array(numbers, dtype), shape) if shape else np.array(numbers[0])
            array = array.astype(dtype)
        else:
            array = np.array(value, np.float32)
        inits.append(numpy_helper.from_array(array, name))
    inputs = case["inputs"] or ["y"] + [name for name, _, _ in case["extra"]]
    if "cond" in inputs:
        inits.append(numpy_helper.from_array(np.array([True, False] * 4), "cond"))
    if "seq" in inputs:
        inits.append(numpy_helper.from_array(np.array([8, 1, 32], np.int64), "seq_shape"))
        nodes.append(helper.make_node("Reshape", ["y", "seq_shape"], ["seq"]))
    if "flat" in inputs:
        inits.append(numpy_helper.from_array(np.array([32, 8], np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["y", "flat_shape"], ["flat"]))
    if case["op"] == "Resize":
        inputs = ["y", "", "scales"]
    outputs = ["z"] + [f"z{k}" for k in range(1, case["out"])]
    nodes.append(helper.make_node(case["op"], inputs, outputs, **case["attrs"]))
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case["opset"])])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def probe(name):
    """(status, detail) of one case, in this process."""
    import numpy as np
    import onnxruntime
    from onnxruntime.training import artifacts, onnxblock
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    onnxruntime.set_default_logger_severity(3)
    model = build(CASES[name])
    x = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    target = session.run(["z"], {"x": x})[0] + 0.1

    class Loss(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self.mse = onnxblock.loss.MSELoss()

        def build(self, output):
            return self.mse(output, "target")

    folder = tempfile.mkdtemp(prefix="onnxopt-probe-")
    os.chdir(folder)
    try:
        artifacts.generate_artifacts(
            model, requires_grad=["W"], loss=Loss(), optimizer=artifacts.OptimType.AdamW,
            artifact_directory=folder,
        )  # fmt: skip
        state = CheckpointState.load_checkpoint(os.path.join(folder, "checkpoint"))
        module = Module(os.path.join(folder, "training_model.onnx"), state)
        optimizer = Optimizer(os.path.join(folder, "optimizer_model.onnx"), module)
        before = np.array(state.parameters["W"].data, copy=True)
        module.train()
        module(x, target)
        optimizer.step()
        moved = float(np.abs(np.array(state.parameters["W"].data) - before).max())
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "gradient builder has not been registered" in text:
            return "no-builder", ""
        if "Could not find an implementation for" in text:
            return "no-kernel", text.split("Could not find an implementation for ")[1][:60]
        return "fails", text[-160:]
    return ("ok", "") if moved > 0 else ("fails", "the weight did not move")


def main(argv):
    as_json = "--json" in argv
    names = [a for a in argv if a != "--json"] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
        return 2
    results = {}
    for name in names:
        if os.environ.get("ONNXOPT_PROBE_CHILD"):
            status, detail = probe(name)
        else:  # one child per case: some builders crash the interpreter
            child = subprocess.run(
                [sys.executable, __file__, "--json", name],
                capture_output=True,
                text=True,
                env={**os.environ, "ONNXOPT_PROBE_CHILD": "1"},
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode < 0 or not lines:
                status, detail = "crash", f"exit {child.returncode}"
            else:
                status, detail = json.loads(lines[-1])[name]
        results[name] = (status, detail)
        if not as_json:
            print(f"{name:32s} {status:10s} {detail}", flush=True)
    if as_json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
