"""remove-neurons on the onnx wheel's backend ``light`` models (real topologies).

These models ship without weights: every weight is a ``ConstantOfShape`` node fed by
a shape initializer (and listed as a graph input, IR 3). ``randomized`` replaces each
by a seeded random initializer of that shape (He-scaled, BatchNormalization variances
and scales positive). Every model must come out of ``remove-neurons(mode=l1,
ratio=0.3)`` valid (full checker, strict shape inference, onnxruntime session and run:
the PassManager's checks), smaller, never rolled back, and every blocked group
must carry its reason. Weights are random, so the budget is ``none``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
import onnxopt.passes.neurons

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
FAST = ["light_squeezenet", "light_shufflenet", "light_inception_v1", "light_densenet121"]
SLOW = [
    "light_inception_v2",
    "light_resnet50",
    "light_bvlc_alexnet",
    "light_zfnet512",
    "light_vgg19",
]
# the most of its parameters each model may keep at ratio=0.3 (ShuffleNet's trunk stays
# blocked: its Sum residuals tie stages whose grouped Convs chunk the channels differently)
KEPT = {name: 0.75 for name in FAST + SLOW} | {"light_shufflenet": 0.85}


def randomized(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """``model`` with every ConstantOfShape weight replaced by a seeded random
    initializer, those names removed from the graph inputs."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    positive = set()
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            positive |= {node.input[1], node.input[4]}
    nodes, weights = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            nodes.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        if node.output[0] in positive:
            values = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            values = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        else:
            values = rng.standard_normal(shape) * 0.1
        weights.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
    used = {name for node in nodes for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used] + weights
    constant = {t.name for t in initializers}
    inputs = [i for i in graph.input if i.name not in constant and i.name not in shapes]
    new = helper.make_graph(nodes, graph.name, inputs, list(graph.output), initializers)
    out = helper.make_model(new, opset_imports=model.opset_import)
    out.ir_version = 4
    return out


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The input the onnx test runner used for these models (see test_backend_models)."""
    (value,) = model.graph.input
    shape = tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return {value.name: (np.arange(n).reshape(shape) / n).astype(np.float32)}


def _check(name: str) -> None:
    model = randomized(onnx.load(str(LIGHT / f"{name}.onnx")))
    result = onnxopt.optimize(
        model, "remove-neurons(mode=l1,ratio=0.3)", data=[_feed(model)], budget="none"
    )
    (step,) = result.steps
    assert step["status"] in ("accepted", "no-op"), f"{name}: {step['reason']}"
    counts, groups = step["counts"], step["details"]["groups"]
    assert counts["groups"] == len(groups) > 0
    for group in groups:
        if group["status"] == "blocked":
            assert group["reason"], f"{name}: group {group['producers']} blocked without reason"
        else:
            assert group["channels_after"] >= 1
    assert counts["groups_blocked"] >= 1  # at least the classifier (Softmax / output)
    assert step["status"] == "accepted"
    assert counts["params_after"] < KEPT[name] * counts["params_before"]
    assert counts["macs_after"] < counts["macs_before"]
    pruned = [g for g in groups if g["status"] == "pruned"]
    assert len(pruned) >= counts["groups"] // 2
    assert result.model.graph.output[0].name == model.graph.output[0].name


@pytest.mark.parametrize("name", FAST)
def test_light_model_prunes_to_a_valid_model(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_light_model_prunes_to_a_valid_model_slow(name):
    _check(name)


def test_every_light_model_is_covered():
    assert sorted(FAST + SLOW) == sorted(p.stem for p in LIGHT.glob("*.onnx"))
