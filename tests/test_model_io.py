"""Model IO: external data (and hostile external data), atomic saves, Constant-node weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import model_path, run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.check import assert_equivalent
from onnxopt.errors import ModelError
from onnxopt.graph import to_graph, to_model
from onnxopt.model import load_model, save_model


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external_model(folder: Path, location: str = "weights.bin") -> Path:
    weight = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100
    model = _matmul_model(weight)
    path = folder / "m.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=location, size_threshold=0
    )
    return path


def _set_location(path: Path, **fields: str) -> None:
    """Rewrite the external_data entries of every external tensor (without loading data)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in fields:
                entry.value = fields[entry.key]
        present = {e.key for e in tensor.external_data}
        for key, value in fields.items():
            if key not in present:
                tensor.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def test_external_data_roundtrip(tmp_path):
    path = _external_model(tmp_path)
    loaded = load_model(path)
    assert loaded.external_files == [(tmp_path / "weights.bin").resolve()]
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    save_model(loaded.proto, out, external_data=True)
    data_files = list(out.parent.glob("o.onnx.*.data"))
    assert len(data_files) == 1
    # saving again (same content) keeps one data file; other content replaces it
    save_model(loaded.proto, out, external_data=True)
    assert list(out.parent.glob("o.onnx.*.data")) == data_files
    save_model(_matmul_model(np.ones((64, 32), np.float32)), out, external_data=True)
    assert len(list(out.parent.glob("o.onnx.*.data"))) == 1
    assert list(out.parent.glob("o.onnx.*.data")) != data_files
    save_model(loaded.proto, out, external_data=True)
    again = load_model(out)
    feeds = seeded_feeds(again.proto, 2)
    assert_equivalent(run(loaded.proto, feeds), run(again.proto, feeds), "atol=0,rtol=0")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".onnxopt-")]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"location": "../weights.bin"}, "contains '..'"),
        ({"location": "/etc/passwd"}, "absolute path"),
        ({"location": "sub/../../weights.bin"}, "contains '..'"),
        ({"location": "missing.bin"}, "not found"),
        ({"offset": "4096000"}, "only"),
        ({"length": "999999999"}, "only"),
        ({"offset": "-4"}, "negative"),
        ({"offset": "abc"}, "non-integer"),
    ],
)
def test_hostile_external_data_is_refused(tmp_path, fields, message):
    path = _external_model(tmp_path)
    _set_location(path, **fields)
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert message in str(info.value)


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    path = _external_model(inside)
    os.replace(inside / "weights.bin", outside / "weights.bin")
    (inside / "weights.bin").symlink_to(outside / "weights.bin")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)


def test_enormous_declared_shape_is_refused_before_reading(tmp_path):
    path = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([1 << 20, 1 << 20])
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="needs bytes"):
        load_model(path)


def test_save_is_atomic_and_refuses_input(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(_matmul_model(np.ones((4, 4), np.float32)), path)
    before = path.read_bytes()
    with pytest.raises(ModelError, match="refusing to overwrite"):
        save_model(_matmul_model(np.zeros((4, 4), np.float32)), path, protect=[path])
    assert path.read_bytes() == before
    with pytest.raises(ModelError, match="does not exist"):
        save_model(_matmul_model(np.ones((4, 4), np.float32)), tmp_path / "nope" / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_automatic_external_data_threshold(tmp_path, monkeypatch):
    import onnxopt.model as model_module

    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "big.onnx"
    save_model(_matmul_model(np.ones((64, 64), np.float32)), out)
    (data,) = tmp_path.glob("big.onnx.*.data")
    assert data.stat().st_size >= 64 * 64 * 4
    assert out.stat().st_size < 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an ONNX model"),
        (b"\x08\x07garbage-garbage", "not"),
        (b"hello world, this is not a model", "not"),
    ],
)
def test_non_onnx_files(tmp_path, content, message):
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert message in str(info.value)


def test_truncated_model(tmp_path):
    data = model_path("digits_cnn").read_bytes()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"not a readable ONNX model|not an ONNX model"):
        load_model(path)


def test_constant_node_weights_are_lifted_like_initializers():
    model = onnx.load(str(model_path("digits_mlp_op11_constants")))
    assert not model.graph.initializer
    graph = to_graph(model)
    assert not [n for n in graph.nodes if n.op == "Constant"]
    lifted = to_model(graph, model)
    assert len(lifted.graph.initializer) == 6
    feeds = seeded_feeds(model, 4)
    assert_equivalent(run(model, feeds), run(lifted, feeds), "atol=0,rtol=0")
    # and the stats see the same parameter count as the initializer-based MLP
    r1 = onnxopt.optimize(model, "cleanup")
    r2 = onnxopt.optimize(model_path("digits_mlp"), "cleanup")
    assert r1.report["original"]["params"] == r2.report["original"]["params"] == 17226


def test_metadata_survives_the_roundtrip():
    model = onnx.load(str(model_path("digits_mlp")))
    onnx.helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.doc_string = "doc"
    model.model_version = 7
    out = to_model(to_graph(model), model)
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests", "license": "MIT"}
    assert out.doc_string == "doc" and out.model_version == 7
    assert out.producer_name == "pytorch"


def test_overridable_inputs_keep_their_default_and_signature():
    """IR >= 4: an input that also has an initializer stays an input, default included."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = onnxopt.optimize(model, "cleanup,fold-constants,dedupe-initializers").model
    assert [i.name for i in out.graph.input] == ["x", "bias"]
    assert [t.name for t in out.graph.initializer] == ["bias"]
    feed = {"x": np.zeros(2, np.float32)}
    assert run(out, [feed])[0]["y"].tolist() == [1.0, 2.0]
    assert run(out, [{**feed, "bias": np.ones(2, np.float32)}])[0]["y"].tolist() == [1.0, 1.0]


def test_string_constant_nodes_stay_nodes():
    node = helper.make_node(
        "Constant", [], ["s"], value=helper.make_tensor("v", TensorProto.STRING, [1], [b"a"])
    )
    graph = helper.make_graph(
        [node, helper.make_node("Identity", ["s"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    exported = to_model(to_graph(model), model)
    assert [n.op_type for n in exported.graph.node] == ["Constant", "Identity"]


def test_overridable_inputs_survive_graph_copies():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    exported = to_model(to_graph(model).copy(), model)
    assert [t.name for t in exported.graph.initializer] == ["bias"]


def test_killed_save_leaves_no_output_and_its_temp_folder_is_reclaimed(tmp_path):
    """SIGKILL during a save: the output never appears half-written; the orphaned
    temporary folder is removed by the next save into that folder."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import numpy as np, onnx, sys\n"
        "from onnx import helper, numpy_helper, TensorProto\n"
        "from onnxopt.model import save_model\n"
        "w = np.ones((4096, 4096), np.float32)\n"
        "g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'])], 'g',\n"
        "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 4096])],\n"
        "    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4096])],\n"
        "    [numpy_helper.from_array(w, 'w')])\n"
        "m = helper.make_model(g)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    save_model(m, sys.argv[1], external_data=True)\n"
    )
    target = tmp_path / "out.onnx"
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while not list(tmp_path.glob(".onnxopt-*")) and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if target.exists():  # killed after a completed save: the file is whole
        load_model(target)
    save_model(_matmul_model(np.ones((4, 4), np.float32)), tmp_path / "other.onnx")
    assert not list(tmp_path.glob(".onnxopt-*"))


def _with_wrong_value_info(name: str) -> onnx.ModelProto:
    model = onnx.load(str(model_path("digits_mlp")))
    model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT16, [0]))
    return model


def test_value_info_cannot_change_a_graph_outputs_declared_type():
    # onnxruntime ignores a value_info that contradicts a graph output; graphsurgeon
    # would let it retype the output (fuzz seed 1, case 3918)
    model = _with_wrong_value_info("logits")
    exported = to_model(to_graph(model), model)
    (output,) = exported.graph.output
    assert output.type.tensor_type.elem_type == TensorProto.FLOAT
    dims = output.type.tensor_type.shape.dim
    assert [(d.dim_param, d.dim_value) for d in dims] == [("batch", 0), ("", 10)]
    feeds = seeded_feeds(model, 2)
    assert_equivalent(run(model, feeds), run(exported, feeds))


def test_intermediate_with_a_wrong_value_info_can_be_exposed():
    from onnxopt.runtime import iter_activations

    model = onnx.load(str(model_path("digits_mlp")))
    hidden = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    wrong = _with_wrong_value_info(hidden)
    feeds = seeded_feeds(model, 2)
    (first,) = list(iter_activations(wrong, [hidden], feeds[:1]))
    assert first[hidden].dtype == np.float32 and first[hidden].shape == (1, 128)


def _nested_if_model() -> onnx.ModelProto:
    """main: If(c0) -> then: Constant W, If(c1) whose two branches both read W from
    the outer scope (Silero VAD's layout: LSTM weights as Constant nodes of a branch)."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "W"
    )
    out = helper.make_tensor_value_info

    def branch(name, nodes, result):
        return helper.make_graph(nodes, name, [], [out(result, TensorProto.FLOAT, [1, 4])])

    inner_then = branch("inner_then", [helper.make_node("MatMul", ["x", "W"], ["a"])], "a")
    inner_else = branch(
        "inner_else",
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["b"])],
        "b",
    )
    outer_then = branch(
        "outer_then",
        [
            helper.make_node("Constant", [], ["W"], value=w),
            helper.make_node("If", ["c1"], ["t"], then_branch=inner_then, else_branch=inner_else),
        ],
        "t",
    )
    outer_else = branch("outer_else", [helper.make_node("Neg", ["x"], ["e"])], "e")
    graph = helper.make_graph(
        [helper.make_node("If", ["c0"], ["y"], then_branch=outer_then, else_branch=outer_else)],
        "nested",
        [
            out("x", TensorProto.FLOAT, [1, 4]),
            out("c0", TensorProto.BOOL, []),
            out("c1", TensorProto.BOOL, []),
        ],
        [out("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _initializers_by_graph(graph: onnx.GraphProto, found: dict) -> dict:
    found[graph.name] = [t.name for t in graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _initializers_by_graph(attr.g, found)
    return found


def test_a_weight_nested_bodies_share_is_exported_once():
    """graphsurgeon writes an outer-scope constant into every body that reads it:
    remove-neurons once made silero_vad.onnx 1.38x larger. It is stored once, in the
    closest scope both readers see, and the model computes the same."""
    model = _nested_if_model()
    graph = to_graph(model)
    for sub in graph.subgraphs():  # what a pass does to a Constant-node weight
        for node in [n for n in sub.nodes if n.op == "Constant"]:
            node.outputs[0].to_constant(node.attrs["value"].values)
            node.outputs.clear()
        sub.cleanup()
    out = to_model(graph, model)
    placed = _initializers_by_graph(out.graph, {})
    assert placed == {
        "nested": [], "outer_then": ["W"], "inner_then": [], "inner_else": [], "outer_else": []
    }  # fmt: skip
    onnx.checker.check_model(out, full_check=True)
    x = np.arange(4, dtype=np.float32).reshape(1, 4) - 1.5
    for c0 in (True, False):
        for c1 in (True, False):
            feeds = [{"x": x, "c0": np.array(c0), "c1": np.array(c1)}]
            np.testing.assert_array_equal(run(model, feeds)[0]["y"], run(out, feeds)[0]["y"])
