"""Distillation adjunct: training copies, trainable selection, the environment, the worker.

Tests using the ``adjunct`` fixture run the real onnxruntime-training worker (no
mocks); they find it like the CLI does (``$ONNXOPT_TRAIN_PYTHON`` or the ``onnxopt
train-env`` venv) and skip with a message when there is none — or fail, when
``$ONNXOPT_REQUIRE_TRAIN_ENV=1`` (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import accuracy, digits, model_path, run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.distill  # registers the pass
from onnxopt.cli import main as cli_main
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import to_graph
from onnxopt.pipeline import Pass, PassResult, Pipeline, option, register_pass, unregister_pass
from onnxopt.train import TrainEnvError, TrainingError, api, convert, distill, env, student
from onnxopt.train.cli import format_history
from onnxopt.train.coverage import GRADIENT_OPS, NO_GRADIENT_OPS, NoGradientError
from onnxopt.train.rewrites import REWRITES
from onnxopt.train.worker import FAULT_VAR

TRAIN = model_path("digits_mlp").parent / "digits_train.npz"
REQUIRE_VAR = "ONNXOPT_REQUIRE_TRAIN_ENV"


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _samples(count: int = 4) -> list[dict[str, np.ndarray]]:
    images, _ = digits("train")
    return [{"input": images[i : i + 1]} for i in range(count)]


def _damaged(name: str = "digits_mlp", scale: float = 0.5, seed: int = 0) -> onnx.ModelProto:
    """The model with seeded noise on every float initializer (a student to repair)."""
    model = onnx.load(str(model_path(name)))
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            noisy = array + scale * array.std() * rng.standard_normal(array.shape)
            tensor.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), tensor.name))
    return model


def _codebook_mlp(bits: int = 3) -> onnx.ModelProto:
    """digits_mlp with fc2's weight stored as Gather(codebook, Cast(uint8 indices))."""
    model = onnx.load(str(model_path("digits_mlp")))
    weights = _weights(model)
    weight = weights["fc2.weight"]
    codebook = np.quantile(weight, np.linspace(0, 1, 2**bits)).astype(np.float32)
    indices = np.abs(weight[..., None] - codebook).argmin(-1).astype(np.uint8)
    graph = model.graph
    kept = [t for t in graph.initializer if t.name != "fc2.weight"]
    del graph.initializer[:]
    graph.initializer.extend(
        [
            *kept,
            numpy_helper.from_array(codebook, "fc2.weight.codebook"),
            numpy_helper.from_array(indices, "fc2.weight.indices"),
        ]
    )
    graph.node.insert(
        0, helper.make_node("Cast", ["fc2.weight.indices"], ["fc2.idx32"], to=TensorProto.INT32)
    )
    graph.node.insert(
        1, helper.make_node("Gather", ["fc2.weight.codebook", "fc2.idx32"], ["fc2.weight"])
    )
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------- selection


def test_cnn_trains_conv_gemm_and_batchnorm_affine_but_not_running_stats():
    names, notes = student.trainable_parameters(to_graph(onnx.load(str(model_path("digits_cnn")))))
    assert len(names) == 17 and notes == []
    assert {"stem.0.weight", "fc.weight", "fc.bias", "mix.1.weight", "mix.1.bias"} <= set(names)
    assert not [n for n in names if "running" in n]


def test_transformer_freezes_scalars_and_shapes_and_trains_biases_and_embeddings():
    graph = to_graph(onnx.load(str(model_path("digits_transformer"))))
    names, _ = student.trainable_parameters(graph)
    tensors = graph.tensors()
    assert "pos" in names and "layers.0.ff.0.bias" in names and "norm.weight" in names
    assert sum(1 for n in names if n.startswith("onnx::MatMul")) == 13
    for name, tensor in tensors.items():
        if isinstance(tensor, gs.Constant) and name not in names:
            # frozen: integer shape tensors and scalar constants only
            assert tensor.values.dtype == np.int64 or tensor.values.size == 1, name


def test_codebook_trains_codebook_values_and_freezes_indices():
    graph = to_graph(_codebook_mlp())
    names, _ = student.trainable_parameters(graph)
    assert "fc2.weight.codebook" in names and "fc2.weight.indices" not in names
    assert student.edit_for_training(graph) == {"integer_casts_folded": 1}
    assert "Cast" not in [n.op for n in graph.nodes]


def test_quantized_student_is_refused():
    model = onnx.load(str(model_path("digits_mlp")))
    node = helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"])
    model.graph.node.insert(0, node)
    with pytest.raises(UsageError, match="distill before quantizing"):
        student.refuse_quantized(to_graph(model))


# ---------------------------------------------------------------------------- conversion


def test_training_copy_decomposes_batchnorm_and_keeps_outputs():
    copy = convert.prepare(onnx.load(str(model_path("digits_cnn"))), _samples())
    assert copy.edits == {"batchnorm_decomposed": 5}
    assert "BatchNormalization" not in _ops(copy.model)
    assert _ops(copy.base)["BatchNormalization"] == 5
    feeds = seeded_feeds(copy.base, 3)
    reference, got = run(copy.base, feeds), run(copy.model, feeds)
    for ref, out in zip(reference, got):
        np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5, rtol=1e-4)


def test_training_copy_exposes_layernorm_statistics():
    copy = convert.prepare(onnx.load(str(model_path("digits_transformer"))), _samples())
    norms = [n for n in copy.model.graph.node if n.op_type == "LayerNormalization"]
    assert copy.edits == {"layernorm_stats_exposed": 5}
    assert len(norms) == 5 and all(len(n.output) == 3 for n in norms)


def test_new_opsets_are_lowered_to_21_and_old_ones_raised_to_13():
    mlp = onnx.load(str(model_path("digits_mlp")))
    new = onnx.version_converter.convert_version(mlp, 23)
    new.ir_version = 11
    copy = convert.prepare(new, _samples())
    assert copy.opset == (23, 21) and copy.model.ir_version == 10
    assert copy.base.opset_import[0].version == 23 and copy.base.ir_version == 11
    old = convert.prepare(onnx.load(str(model_path("digits_mlp_op11_constants"))), _samples())
    assert old.opset == (11, 13)
    assert "Constant" not in _ops(old.base)  # weights lifted: they can train
    assert old.trainable == [f"fc{i}.{kind}" for i in (1, 2, 3) for kind in ("bias", "weight")]


def test_restore_replaces_values_by_name_and_refuses_mismatches():
    base = onnx.load(str(model_path("digits_mlp")))
    new = np.zeros((10,), np.float32)
    restored = convert.restore(base, {"fc3.bias": new})
    assert np.array_equal(_weights(restored)["fc3.bias"], new)
    assert np.array_equal(_weights(restored)["fc1.weight"], _weights(base)["fc1.weight"])
    assert not np.array_equal(_weights(base)["fc3.bias"], new)  # the base is untouched
    with pytest.raises(ModelError, match=r"fc3\.bias"):
        convert.restore(base, {"fc3.bias": np.zeros((9,), np.float32)})
    with pytest.raises(ModelError, match="not in the student"):
        convert.restore(base, {"nope": new})
    with pytest.raises(ModelError, match="non-finite"):
        convert.restore(base, {"fc3.bias": np.full((10,), np.nan, np.float32)})


# ---------------------------------------------------------------------------- op coverage


def _f32(rng, *shape, scale=0.5):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _op_model(nodes, inits=(), shape=(1, 4, 6, 6), outputs=("z",), opset=17):
    """``x -> Conv(W) -> y -> nodes -> outputs``: W is trainable, so y's consumers are
    on the trainable path."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(_f32(rng, 4, shape[1], 1, 1), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), *nodes],
        "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [weight, *(numpy_helper.from_array(np.asarray(v), k) for k, v in inits)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _feeds(model, count=3, seed=1):
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{"x": (2 * rng.standard_normal(shape)).astype(np.float32)} for _ in range(count)]


_R = np.random.default_rng(7)
REWRITE_CASES = {  # name -> (op, nodes after y, initializers, extra model arguments)
    "HardSigmoid": ("HardSigmoid", [helper.make_node("HardSigmoid", ["y"], ["z"], alpha=0.3)], []),
    "HardSwish": ("HardSwish", [helper.make_node("HardSwish", ["y"], ["z"])], []),
    "PRelu": (
        "PRelu",
        [helper.make_node("PRelu", ["y", "slope"], ["z"])],
        [("slope", _f32(_R, 4, 1, 1))],
    ),
    "Softplus": ("Softplus", [helper.make_node("Softplus", ["y"], ["z"])], []),
    "Elu": ("Elu", [helper.make_node("Elu", ["y"], ["z"], alpha=0.7)], []),
    "Sum": ("Sum", [helper.make_node("Sum", ["y", "y", "b"], ["z"])], [("b", _f32(_R, 6))]),
    "Mean": ("Mean", [helper.make_node("Mean", ["y", "b"], ["z"])], [("b", _f32(_R, 6))]),
    **{
        f"Resize-{coords}-{nearest}": (
            "Resize",
            [
                helper.make_node(
                    "Resize",
                    ["y", "", "scales"],
                    ["z"],
                    mode="nearest",
                    coordinate_transformation_mode=coords,
                    nearest_mode=nearest,
                )
            ],
            [("scales", np.array([1, 1, 2, 3], np.float32))],
        )
        for coords, nearest in (
            ("asymmetric", "floor"),
            ("half_pixel", "round_prefer_floor"),
            ("pytorch_half_pixel", "round_prefer_floor"),
        )
    },
    "AveragePool": (
        "AveragePool",
        [
            helper.make_node(
                "AveragePool", ["y"], ["z"], kernel_shape=[3, 2], strides=[3, 2], pads=[0, 0, 0, 0]
            )
        ],
        [],
        {"shape": ("N", 4, 6, 6)},
    ),
    "ConvTranspose": (
        "ConvTranspose",
        [helper.make_node("ConvTranspose", ["y", "WT", "BT"], ["z"], strides=[2, 2])],
        [("WT", _f32(_R, 4, 3, 2, 2)), ("BT", _f32(_R, 3))],
    ),
    "ConvTranspose-nobias-3x3": (
        "ConvTranspose",
        [helper.make_node("ConvTranspose", ["y", "WT"], ["z"], strides=[3, 3])],
        [("WT", _f32(_R, 4, 5, 3, 3))],
    ),
    "LSTM-3-steps": (
        "LSTM",
        [
            helper.make_node("Reshape", ["y", "seq"], ["ys"]),
            helper.make_node(
                "LSTM", ["ys", "LW", "LR", "LB", "", "h0", "c0"], ["z", "zh", "zc"], hidden_size=5
            ),
        ],
        [
            ("seq", np.array([3, 2, 24], np.int64)),
            ("LW", _f32(_R, 1, 20, 24)),
            ("LR", _f32(_R, 1, 20, 5)),
            ("LB", _f32(_R, 1, 40)),
            ("h0", _f32(_R, 1, 2, 5)),
            ("c0", _f32(_R, 1, 2, 5)),
        ],
        {"outputs": ("z", "zh", "zc")},
    ),
    "LSTM-1-step-no-state": (
        "LSTM",
        [
            helper.make_node("Reshape", ["y", "seq"], ["ys"]),
            helper.make_node("LSTM", ["ys", "LW", "LR"], ["", "z"], hidden_size=4),
        ],
        [
            ("seq", np.array([1, 2, 72], np.int64)),
            ("LW", _f32(_R, 1, 16, 72)),
            ("LR", _f32(_R, 1, 16, 4)),
        ],
    ),
}


@pytest.mark.parametrize("case", list(REWRITE_CASES))
def test_training_rewrite_computes_what_the_op_computes(case):
    op, nodes, inits, *extra = REWRITE_CASES[case]
    model = _op_model(nodes, inits, **(extra[0] if extra else {}))
    feeds = _feeds(model)
    copy = convert.prepare(model, feeds)
    assert op not in _ops(copy.model) and _ops(copy.base)[op] == 1
    assert copy.coverage.rewritten == {op: 1}
    assert any(f"training rewrite: {op} x1" in note for note in copy.notes)
    reference, got = run(copy.base, feeds), run(copy.model, feeds)
    for ref, out in zip(reference, got):
        assert ref.keys() == out.keys()
        for name in ref:
            np.testing.assert_allclose(out[name], ref[name], atol=1e-5, rtol=1e-5)


def test_every_rewrite_is_for_an_op_without_gradient():
    conditional = {"AveragePool"}  # a gradient, which crashes with a symbolic batch
    assert set(REWRITES) <= NO_GRADIENT_OPS | conditional
    assert not GRADIENT_OPS & NO_GRADIENT_OPS


PROBE = Path(__file__).resolve().parent.parent / "tools" / "probe_gradients.py"


def _probe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_gradients", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_op_of_the_gradient_tables_has_a_probe_case():
    probed = {case["op"] for case in _probe_module().CASES.values()}
    assert probed == GRADIENT_OPS | NO_GRADIENT_OPS


def test_probe_agrees_with_the_gradient_tables(adjunct):
    cases = ["Relu", "Erf", "HardSigmoid", "ConvTranspose"]  # ok, ok, no builder, no kernel
    child = subprocess.run(
        [str(adjunct), str(PROBE), "--json", *cases],
        capture_output=True,
        text=True,
        env={**os.environ, "ONNXOPT_PROBE_CHILD": "1"},  # these four never crash: one process
        timeout=600,
    )
    results = json.loads(child.stdout.splitlines()[-1])
    assert {k: v[0] for k, v in results.items()} == {
        "Relu": "ok", "Erf": "ok", "HardSigmoid": "no-builder", "ConvTranspose": "no-kernel"
    }  # fmt: skip
    assert {"Relu", "Erf"} <= GRADIENT_OPS and {"HardSigmoid", "ConvTranspose"} <= NO_GRADIENT_OPS


def _einsum_model(first: bool = False):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node(
            "Einsum", ["x" if first else "y"], ["e"], equation="bchw->bhwc", name="mix"
        ),
        helper.make_node("Transpose", ["e"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "W2"], ["z"], name="conv2"),
    ]
    model = _op_model(nodes, [("W2", _f32(rng, 4, 4, 1, 1))], opset=17)
    if first:  # x -> Einsum -> ... -> Conv(W2); the first Conv's output is unused
        del model.graph.node[0]
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W"))
    return model


def test_op_without_gradient_or_rewrite_is_named_with_its_position_and_the_way_out():
    model = _einsum_model()
    with pytest.raises(NoGradientError) as error:
        convert.prepare(model, _feeds(model))
    message = str(error.value)
    assert "Einsum node 'mix' (node 2 of 4 in topological order, 1 trained tensor(s)" in message
    assert "no CPU gradient" in message and "freeze=['W']" in message
    copy = convert.prepare(model, _feeds(model), freeze=["W"])
    assert copy.trainable == ["W2"] and copy.coverage.frozen == ["W"]
    assert [n.op for n in copy.coverage.nodes] == ["Conv"]
    assert copy.coverage.summary() == {  # the report's op list: Einsum is off the path now
        "path_nodes": 1,
        "gradient_ops": {"Conv": 1},
        "rewritten_ops": {},
        "unknown_ops": {},
        "frozen_tensors": 1,
    }
    assert "frozen by freeze=: 1 tensor(s)" in copy.notes
    with pytest.raises(UsageError, match=r"freeze pattern 'nope\*' matches no trainable"):
        convert.prepare(model, _feeds(model), freeze=["nope*"])


def test_ops_before_the_first_trained_tensor_need_no_gradient():
    model = _einsum_model(first=True)
    copy = convert.prepare(model, _feeds(model))
    assert copy.trainable == ["W2"] and [n.op for n in copy.coverage.nodes] == ["Conv"]
    assert copy.coverage.summary()["gradient_ops"] == {"Conv": 1}


def test_a_rewrite_that_does_not_apply_says_why():
    nodes = [helper.make_node("Resize", ["y", "", "scales"], ["z"], mode="linear")]
    model = _op_model(nodes, [("scales", np.array([1, 1, 2, 2], np.float32))])
    with pytest.raises(NoGradientError, match=r"Resize node .*rewrite does not apply: mode=linear"):
        convert.prepare(model, _feeds(model))


def test_integer_edges_and_unused_branches_are_off_the_path():
    nodes = [
        helper.make_node("Shape", ["y"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        helper.make_node("Round", ["y"], ["unused"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    copy = convert.prepare(_op_model(nodes), _feeds(_op_model(nodes)), targets=["z"])
    assert sorted(n.op for n in copy.coverage.nodes) == ["Conv", "Relu"]


# ---------------------------------------------------------------------------- environment


def test_missing_environment_says_how_to_create_it(tmp_path, monkeypatch):
    monkeypatch.delenv(env.ENV_PYTHON_VAR, raising=False)
    monkeypatch.setenv(env.ENV_DIR_VAR, str(tmp_path / "none"))
    with pytest.raises(TrainEnvError, match="onnxopt train-env"):
        env.find_python()


def test_bad_interpreters_are_clear_errors(tmp_path):
    with pytest.raises(TrainEnvError, match="not found"):
        env.find_python(tmp_path / "python-nope")
    with pytest.raises(TrainEnvError, match="directory"):
        env.find_python(tmp_path)
    fake = tmp_path / "python3.13"
    fake.write_text("#!/bin/sh\necho 3.13.1\n")
    fake.chmod(0o755)
    with pytest.raises(TrainEnvError, match=r"Python 3\.13\.1.*3\.8-3\.12"):
        env.find_python(fake)
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(TrainEnvError, match="boom"):
        env.find_python(broken)


def test_probe_names_the_missing_training_api():
    # this interpreter has current onnxruntime, not onnxruntime-training
    with pytest.raises(TrainEnvError, match=r"cannot import onnxruntime\.training"):
        env.probe(Path(sys.executable))


def test_create_env_is_idempotent_and_refuses_foreign_folders(tmp_path):
    target = tmp_path / "venv"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "python").symlink_to(sys.executable)
    (target / env.MARKER).write_text(json.dumps({"requirements": list(env.REQUIREMENTS)}))
    python, created = env.create_env(target)
    assert (python, created) == (target / "bin" / "python", False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TrainEnvError, match="not a virtual environment"):
        env.create_env(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_failed_install_is_explained_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "venv"
    lines = []
    with pytest.raises(TrainEnvError, match=r"(?s)pip install failed.*onnxruntime-training"):
        env.create_env(target, pip_args=["--no-index"], say=lines.append)  # offline: must fail
    assert not target.exists()
    assert lines[0].startswith(f"creating a venv at {target}")


def test_train_env_check_reports_absence(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(env.ENV_PYTHON_VAR, raising=False)
    assert cli_main(["train-env", "--check", "--path", str(tmp_path / "none")]) == 1
    assert "run `onnxopt train-env`" in capsys.readouterr().out


# ---------------------------------------------------------------------------- options


def test_bad_options_fail_before_any_training(tmp_path):
    mlp = str(model_path("digits_mlp"))
    with pytest.raises(UsageError, match="epochs must be >= 1"):
        distill(mlp, mlp, str(TRAIN), epochs=0)
    with pytest.raises(UsageError, match="no labels"):
        distill(mlp, mlp, str(TRAIN), alpha=0.5)
    with pytest.raises(UsageError, match="unknown option"):
        distill(mlp, mlp, str(TRAIN), epoch=3)
    with pytest.raises(UsageError, match=r"distill: option alpha=-0\.5 is out of range"):
        Pipeline.parse("distill(alpha=-0.5)")
    assert Pipeline.parse("distill(alpha=none)").steps[0].options.alpha is None
    with pytest.raises(UsageError, match="labels= needs data="):
        Pipeline.parse("distill(labels=label)")
    text = "distill(epochs=3,lr=0.01,data=models/digits_train.npz,labels=label)"
    step = Pipeline.parse(text).steps[0]
    assert str(step) == text
    assert str(step.pass_cls.budget()) == "top1>=0.97,nonfinite<=0"


def test_history_table_marks_the_best_epoch():
    history = [
        {"epoch": 0, "train_loss": None, "heldout_loss": 1.0, "agreement": 0.5, "accuracy": None},
        {"epoch": 1, "train_loss": 0.5, "heldout_loss": 0.25, "agreement": 1.0, "accuracy": None},
    ]
    table = format_history(history, 1)
    assert "1 *" in table and "100.00%" in table and table.count("\n") == 3


# ---------------------------------------------------------------------------- real adjunct


@pytest.fixture(scope="module")
def adjunct() -> Path:
    try:
        return env.find_python()
    except TrainEnvError as exc:
        if os.environ.get(REQUIRE_VAR) == "1":  # CI: a missing adjunct must not pass silently
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def test_distill_repairs_a_damaged_mlp_and_keeps_its_graph(adjunct, tmp_path):
    damaged = _damaged()
    events = []
    result = distill(
        str(model_path("digits_mlp")),
        damaged,
        str(TRAIN),
        labels="label",
        epochs=3,
        lr=3e-3,
        on_event=events.append,
        workdir=tmp_path,
    )
    assert [e["event"] for e in events] == ["start"] + ["epoch"] * 4 + ["done"]
    assert result.best_epoch > 0
    assert result.best["heldout_loss"] < 0.5 * result.before["heldout_loss"]
    assert result.train_samples + result.heldout_samples == 1257
    assert accuracy(result.model) > accuracy(damaged) + 0.05
    assert _ops(result.model) == _ops(damaged)
    assert result.model.opset_import[0].version == 17
    before, after = _weights(damaged), _weights(result.model)
    assert set(after) == set(before) and set(result.params) == set(before)
    assert all(not np.array_equal(before[n], after[n]) for n in result.params)
    assert result.check_max_abs < 1e-4
    assert list(tmp_path.iterdir()) == []


def test_codebook_training_changes_codebook_only(adjunct, tmp_path):
    model = _codebook_mlp()
    result = distill(
        str(model_path("digits_mlp")),
        model,
        str(TRAIN),
        loss="mse",
        epochs=2,
        lr=1e-3,
        workdir=tmp_path,
    )
    before, after = _weights(model), _weights(result.model)
    assert np.array_equal(before["fc2.weight.indices"], after["fc2.weight.indices"])
    assert after["fc2.weight.indices"].dtype == np.uint8
    assert after["fc2.weight.codebook"].shape == (8,)
    assert not np.array_equal(before["fc2.weight.codebook"], after["fc2.weight.codebook"])
    assert _ops(result.model) == _ops(model)  # Cast + Gather reconstruction kept
    assert result.best["heldout_loss"] < result.before["heldout_loss"]


def test_old_opset_student_comes_back_at_its_own_opset(adjunct, tmp_path):
    teacher = str(model_path("digits_mlp"))
    result = distill(teacher, str(model_path("digits_mlp_op11_constants")), str(TRAIN), epochs=1)
    assert result.model.opset_import[0].version == 11
    assert any("opset 13" in note for note in result.notes)
    assert result.check_max_abs < 1e-4


@register_pass
class _NoisePass(Pass):
    """Test-only lossy pass: seeded noise on every Gemm weight."""

    name = "test-distill-noise"
    summary = "damage Gemm weights"

    @dataclass
    class Options:
        scale: float = option(0.5, "relative noise")

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "Gemm":
                weight = node.inputs[1]
                noise = ctx.rng.standard_normal(weight.values.shape).astype(np.float32)
                weight.values = weight.values + self.options.scale * weight.values.std() * noise
        return PassResult(changed=True)


@pytest.fixture(scope="module", autouse=True)
def _unregister_noise():
    yield
    unregister_pass(_NoisePass.name)


def test_pipeline_step_distills_from_the_original_model(adjunct):
    pipeline = (
        'test-distill-noise(budget="none"),'
        f'distill(epochs=3,lr=0.003,data="{TRAIN}",labels=label,budget="top1>=0.9")'
    )
    result = onnxopt.optimize(str(model_path("digits_mlp")), pipeline, data=str(TRAIN))
    noise, step = result.steps
    assert noise["status"] == "accepted" and step["status"] == "accepted", step["reason"]
    assert step["counts"]["best_epoch"] > 0 and step["counts"]["trained_tensors"] == 6
    top1_noise = noise["metrics_vs_original"]["logits"]["top1"]
    assert step["metrics_vs_original"]["logits"]["top1"] > top1_noise
    assert _ops(result.model) == _ops(onnx.load(str(model_path("digits_mlp"))))


def _rewritten_ops_model():
    """One student with every training rewrite on its trainable path."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("HardSigmoid", ["y"], ["a1"]),
        helper.make_node("Conv", ["a1", "W2"], ["a2"]),
        helper.make_node("HardSwish", ["a2"], ["a3"]),
        helper.make_node("PRelu", ["a3", "slope"], ["a4"]),
        helper.make_node("Softplus", ["a4"], ["a5"]),
        helper.make_node("Elu", ["a5"], ["a6"]),
        helper.make_node("Sum", ["a6", "a2"], ["a7"]),
        helper.make_node("Mean", ["a7", "a1"], ["a8"]),
        helper.make_node("ConvTranspose", ["a8", "WT", "BT"], ["a9"], strides=[2, 2]),
        helper.make_node("Resize", ["a9", "", "scales"], ["a10"], mode="nearest"),
        helper.make_node("Reshape", ["a10", "seq"], ["a11"]),
        helper.make_node("LSTM", ["a11", "LW", "LR", "LB"], ["", "z"], hidden_size=3),
    ]
    inits = [
        ("W2", _f32(rng, 4, 4, 1, 1)),
        ("slope", _f32(rng, 4, 1, 1)),
        ("WT", _f32(rng, 4, 2, 2, 2)),
        ("BT", _f32(rng, 2)),
        ("scales", np.array([1, 1, 2, 2], np.float32)),
        ("seq", np.array([4, 1, 288], np.int64)),
        ("LW", _f32(rng, 1, 12, 288, scale=0.05)),
        ("LR", _f32(rng, 1, 12, 3)),
        ("LB", _f32(rng, 1, 24)),
    ]
    return _op_model(nodes, inits)


def test_rewritten_student_trains_and_keeps_its_ops(adjunct, tmp_path):
    teacher = _rewritten_ops_model()
    student_model = onnx.ModelProto()
    student_model.CopyFrom(teacher)
    rng = np.random.default_rng(5)
    for tensor in student_model.graph.initializer:  # damage every float tensor
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 4:
            noisy = array * (1 + 0.3 * rng.standard_normal(array.shape)).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    data = {"x": np.stack([f["x"] for f in _feeds(teacher, 40, seed=4)])}
    result = distill(teacher, student_model, data, epochs=3, batch_size=4, workdir=tmp_path)
    assert result.coverage["rewritten_ops"] == {
        op: 1
        for op in (
            "ConvTranspose", "Elu", "HardSigmoid", "HardSwish", "LSTM", "Mean", "PRelu",
            "Resize", "Softplus", "Sum",
        )
    }  # fmt: skip
    assert _ops(result.model) == _ops(student_model)  # the round trip keeps the op histogram
    assert result.best_epoch == 3
    assert result.best["heldout_loss"] < 0.5 * result.before["heldout_loss"]
    before, after = _weights(student_model), _weights(result.model)
    for name in ("W", "W2", "slope", "WT", "BT", "LW", "LR", "LB"):  # gradients reach them all
        assert not np.array_equal(before[name], after[name]), name
    assert result.check_max_abs < 1e-4
    assert "op_coverage" in result.summary()


def test_average_pool_rewrite_trains_with_a_symbolic_batch(adjunct, tmp_path):
    """The one conditional rewrite (PP-OCR rec's AveragePool, batched rows): onnxruntime-
    training accepts its gradient and the distilled model keeps the AveragePool."""
    _, nodes, inits, extra = REWRITE_CASES["AveragePool"]
    teacher = _op_model(nodes, inits, **extra)
    student_model = onnx.ModelProto()
    student_model.CopyFrom(teacher)
    weight = numpy_helper.to_array(student_model.graph.initializer[0])
    student_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight * 0.5, "W"))
    data = {"x": np.random.default_rng(6).standard_normal((40, 4, 6, 6)).astype(np.float32)}
    result = distill(
        teacher, student_model, data, epochs=2, batch_size=4, lr=1e-2, workdir=tmp_path
    )
    assert result.coverage["rewritten_ops"] == {"AveragePool": 1}
    assert _ops(result.model) == _ops(student_model) == Counter(Conv=1, AveragePool=1)
    assert result.best["heldout_loss"] < 0.7 * result.before["heldout_loss"]
    assert not np.array_equal(_weights(result.model)["W"], weight * 0.5)


def _two_output_model():
    """Probabilities [N, 144] (a softmax head) and an embedding [N, 4] (pooled)."""
    nodes = [
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Flatten", ["r"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["probs"], axis=-1),
        helper.make_node("GlobalAveragePool", ["y"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["emb"]),
    ]
    return _op_model(nodes, shape=("N", 4, 6, 6), outputs=("probs", "emb"))


def test_auto_loss_per_output():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5, 7))
    ctc = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert api.is_probabilities(ctc) and not api.is_probabilities(logits)
    assert api.resolve_loss("auto", ctc, 3, class_head=True) == "kl"  # per timestep
    assert api.resolve_loss("auto", logits, 3, class_head=True) == "mse"
    assert api.resolve_loss("auto", logits[:, 0], 2, class_head=True) == "kl"
    assert api.resolve_loss("auto", logits[:, 0], 2, class_head=False) == "mse"  # embedding
    assert api.resolve_loss("auto", logits[:, :, :1], 3, class_head=True) == "mse"
    assert api.resolve_loss("cosine", logits, 3, class_head=True) == "cosine"
    probability_map = 1 / (1 + np.exp(-logits))  # [N, 5, 7]: a Sigmoid's map
    assert api.resolve_loss("auto", probability_map, 3, False, logits="z") == "bce"
    assert api.resolve_loss("auto", probability_map, 3, False) == "mse"  # no Sigmoid
    assert api.resolve_loss("auto", probability_map[:, 0, :1], 1, False, logits="z") == "mse"


def test_output_settings_parse_and_are_checked():
    assert api.parse_output_spec("stateN:weight=0.5;loss=mse") == (
        "stateN",
        {"weight": 0.5, "loss": "mse"},
    )
    assert api.parse_output_spec("a:b:temperature=4,weight=2") == (
        "a:b",
        {"temperature": 4.0, "weight": 2.0},
    )
    for bad in ("nokeys", "x:weight", "x:weight=heavy"):
        with pytest.raises(UsageError, match="distill"):
            api.parse_output_spec(bad)
    options = api.DistillOptions(outputs={"x": {"loss": "huber"}})
    with pytest.raises(UsageError, match="loss must be one of"):
        options.validate(has_labels=False)


def test_per_output_losses_weights_and_sqnr_history(adjunct, tmp_path):
    teacher = _two_output_model()
    student_model = onnx.ModelProto()
    student_model.CopyFrom(teacher)
    weight = numpy_helper.to_array(student_model.graph.initializer[0])
    noisy = (weight * 1.5 + 0.1).astype(np.float32)
    student_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(noisy, "W"))
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((64, 4, 6, 6)).astype(np.float32)}
    outputs = {"emb": {"loss": "cosine", "weight": 0.5}, "probs": {"temperature": 1.0}}
    result = distill(
        teacher, student_model, data, epochs=4, lr=3e-2, outputs=outputs, workdir=tmp_path
    )
    targets = {t["name"]: t for t in result.settings["targets"]}
    assert targets["probs"]["loss"] == "kl" and targets["probs"]["probabilities"]
    assert targets["probs"]["temperature"] == 1.0 and targets["emb"]["weight"] == 0.5
    assert targets["emb"]["loss"] == "cosine"
    first, best = result.before, result.best
    assert set(first["sqnr_db"]) == {"probs", "emb"}
    assert first["worst_sqnr_db"] == min(first["sqnr_db"].values())
    assert best["worst_sqnr_db"] > first["worst_sqnr_db"] + 3
    assert best["agreement"] >= first["agreement"]
    with pytest.raises(UsageError, match="not distilled"):
        distill(teacher, student_model, data, outputs={"nope": {"weight": 1.0}})
    only = distill(teacher, student_model, data, epochs=1, outputs={"probs": {"weight": 0}})
    assert [t["name"] for t in only.settings["targets"]] == ["emb"]


def _sigmoid_map_model(bias: float):
    """``Sigmoid(Conv(x) + b)``: a probability map [N, 4, 6, 6] (PP-OCR det's head)."""
    nodes = [
        helper.make_node("Add", ["y", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["map"]),
    ]
    bias_values = np.full((1, 4, 1, 1), bias, np.float32)
    return _op_model(nodes, [("b", bias_values)], shape=("N", 4, 6, 6), outputs=("map",))


def test_bce_on_the_logits_of_a_sigmoid_map(adjunct, tmp_path):
    """auto picks bce on the Sigmoid's input for a probability map (PP-OCR det's head):
    gradient sigmoid(z) - t, which stays 1 where a pruned student's map sits at 0; the
    loss is the binary KL, so it is 0 at the teacher."""
    teacher, student = _sigmoid_map_model(0.0), _sigmoid_map_model(-4.0)
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((64, 4, 6, 6)).astype(np.float32)}
    result = distill(teacher, student, data, epochs=3, lr=0.1, batch_size=8, workdir=tmp_path)
    (target,) = result.settings["targets"]
    assert target["loss"] == "bce" and target["logits"] == "logit"
    assert result.best["worst_sqnr_db"] > result.before["worst_sqnr_db"] + 2
    assert result.best["heldout_loss"] < 0.6 * result.before["heldout_loss"]
    assert _ops(result.model) == _ops(student) and result.check_max_abs < 1e-4
    same = distill(teacher, teacher, data, epochs=1, workdir=tmp_path)
    assert abs(same.before["heldout_loss"]) < 1e-6  # KL of the teacher with itself
    with pytest.raises(
        UsageError, match="loss=bce on output 'probs' needs a student output made by a Sigmoid"
    ):
        distill(_two_output_model(), _two_output_model(), data, loss="bce", workdir=tmp_path)


# ---------------------------------------------------------------------------- failure modes


def _quick_job(tmp_path, **kwargs):
    mlp = str(model_path("digits_mlp"))
    return distill(mlp, _damaged(), str(TRAIN), epochs=2, workdir=tmp_path, **kwargs)


def test_interpreter_without_training_api_reports_the_workers_error(tmp_path):
    with pytest.raises(TrainingError, match=r"cannot import onnxruntime\.training"):
        _quick_job(tmp_path, python=sys.executable)
    assert list(tmp_path.iterdir()) == []


def test_missing_interpreter_is_a_clear_error(tmp_path):
    with pytest.raises(TrainEnvError, match="not found"):
        _quick_job(tmp_path, python=str(tmp_path / "bin" / "python"))
    assert list(tmp_path.iterdir()) == []


def test_worker_crash_is_reported_and_cleaned_up(adjunct, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_VAR, "kill-after-epoch")
    with pytest.raises(TrainingError, match=r"killed by signal SIGKILL.*fault injection"):
        _quick_job(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_timeout_stops_the_worker_and_cleans_up(adjunct, tmp_path):
    with pytest.raises(TrainingError, match=r"timed out after 0\.5 s"):
        _quick_job(tmp_path, timeout=0.5)
    assert list(tmp_path.iterdir()) == []


def test_training_failure_in_the_worker_is_surfaced(adjunct, tmp_path):
    with pytest.raises(TrainingError, match=r"worker failed: FloatingPointError: .*lower the"):
        _quick_job(tmp_path, lr=1e12, loss="mse")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_kills_the_worker_and_cleans_up(adjunct, tmp_path):
    seen = []

    def interrupt(event):
        seen.append(event)
        if event["event"] == "epoch":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _quick_job(tmp_path, on_event=interrupt)
    assert list(tmp_path.iterdir()) == []
    assert seen[-1]["event"] == "epoch"


def test_cli_distill_writes_the_model_and_report(adjunct, tmp_path, capsys):
    out, report = tmp_path / "student.onnx", tmp_path / "report.json"
    damaged = tmp_path / "damaged.onnx"
    onnx.save(_damaged(), str(damaged))
    code = cli_main(
        [
            *("distill", "--teacher", str(model_path("digits_mlp")), "--student", str(damaged)),
            *("--data", str(TRAIN), "--labels", "label", "-o", str(out), "--epochs", "2"),
            *("--report", str(report)),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "(* = best epoch" in printed
    assert accuracy(out) > accuracy(damaged)
    assert json.loads(report.read_text())["best_epoch"] >= 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    mlp = str(model_path("digits_mlp"))
    args = ["distill", "--teacher", mlp, "--student", mlp, "--data", str(TRAIN)]
    assert cli_main([*args, "-o", mlp]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli_main([*args, "-o", str(tmp_path / "o.onnx"), "--python", "/nope/python"]) == 2
    assert capsys.readouterr().err.strip() == (
        "onnxopt: error: --python: Python interpreter '/nope/python' not found"
    )


def test_distill_alone_is_a_no_op_before_any_training(monkeypatch):
    """Nothing lost before it and no labels: the student is the original, so the step
    says so without starting the adjunct (which would cost 50 s on PP-OCRv4 det)."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started although nothing can change")

    monkeypatch.setattr(api, "distill", no_training)
    step = onnxopt.optimize(
        model_path("digits_mlp"), "distill", data=str(TRAIN), calibration_samples=8
    ).steps[-1]
    assert step["status"] == "no-op"
    assert any("already computes exactly what the original does" in n for n in step["notes"])


def test_distill_without_float_parameters_is_a_no_op_naming_the_branches(monkeypatch):
    """Weights inside If branches only (Silero VAD's layout): a no-op with the reason,
    not a usage error that stops the pipeline."""
    monkeypatch.setattr(api, "distill", lambda *a, **k: pytest.fail("training started"))
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["b"])], "branch", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])], [w],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["c"])], "other", [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
        ],
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    step = onnxopt.optimize(model, "distill", budget="none", calibration_samples=4).steps[-1]
    assert step["status"] == "no-op"
    assert any("no float32 parameters to train in its main graph" in n for n in step["notes"])
