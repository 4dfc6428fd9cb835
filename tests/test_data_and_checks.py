"""Input data sources, sample splits, metrics and budgets."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import MODELS, model_path
from onnx import TensorProto, helper, numpy_helper

from onnxopt.check import Budget, assert_equivalent, compare_outputs
from onnxopt.data import input_specs, load_samples, prepare_samples
from onnxopt.errors import DataError, UsageError

CNN = onnx.load(str(model_path("digits_cnn")))


def test_npz_rows_are_batch1_samples_and_labels_ignored():
    samples = load_samples(MODELS / "digits_test.npz", input_specs(CNN))
    assert len(samples) == 540
    assert samples[0]["input"].shape == (1, 1, 8, 8)
    assert set(samples[0]) == {"input"}


def test_npz_with_leading_sample_axis(tmp_path):
    arrays = np.random.default_rng(0).random((5, 3, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=arrays)
    samples = load_samples(tmp_path / "d.npz", input_specs(CNN))
    assert len(samples) == 5 and samples[2]["input"].shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(samples[2]["input"], arrays[2])


def test_float64_data_is_cast_and_ints_are_refused(tmp_path):
    np.savez(tmp_path / "f64.npz", input=np.zeros((2, 1, 8, 8)))
    assert load_samples(tmp_path / "f64.npz", input_specs(CNN))[0]["input"].dtype == np.float32
    np.savez(tmp_path / "str.npz", input=np.array([["a"] * 8] * 8).reshape(1, 1, 8, 8))
    with pytest.raises(DataError, match="dtype"):
        load_samples(tmp_path / "str.npz", input_specs(CNN))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 1, 8, 8), np.float32)}, "no array for input(s) input"),
        ({"input": np.zeros((2, 8, 8), np.float32)}, "expected (num_samples, *input_shape)"),
        ({"input": np.zeros((2, 1, 7, 8), np.float32)}, "model expects input: float32"),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as info:
        load_samples(tmp_path / "d.npz", input_specs(CNN))
    assert message in str(info.value)


def test_folder_of_npy_and_backend_pb_sets(tmp_path):
    x = np.ones((1, 1, 8, 8), np.float32)
    np.save(tmp_path / "input.npy", x)
    assert load_samples(tmp_path, input_specs(CNN))[0]["input"].shape == (1, 1, 8, 8)
    sets = tmp_path / "pb"
    for i in range(3):
        folder = sets / f"test_data_set_{i}"
        folder.mkdir(parents=True)
        tensor = numpy_helper.from_array(x * i, "input")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    samples = load_samples(sets, input_specs(CNN))
    assert [float(s["input"].max()) for s in samples] == [0.0, 1.0, 2.0]


def test_split_is_disjoint_and_seeded():
    sets = prepare_samples(
        CNN, MODELS / "digits_test.npz", calibration_samples=100, validation_samples=50, seed=1
    )
    assert len(sets.validation) == 50 and len(sets.calibration) == 100
    val = {s["input"].tobytes() for s in sets.validation}
    cal = {s["input"].tobytes() for s in sets.calibration}
    assert not val & cal
    again = prepare_samples(
        CNN, MODELS / "digits_test.npz", calibration_samples=100, validation_samples=50, seed=1
    )
    assert [s["input"].tobytes() for s in again.validation] == [
        s["input"].tobytes() for s in sets.validation
    ]


def _dynamic_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"]),
        ],
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(np.ones((5, 4), np.float32), "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_generated_data_needs_shapes_for_non_batch_dynamic_dims():
    model = _dynamic_model()
    with pytest.raises(UsageError, match="--shape ids="):
        prepare_samples(model)
    sets = prepare_samples(model, shapes=["ids=2x7", "x=2x3x4x4"], validation_samples=4)
    sample = sets.validation[0]
    assert sample["ids"].shape == (2, 7) and sample["ids"].dtype == np.int64
    assert sample["ids"].min() >= 0 and sample["ids"].max() < 5  # inferred from the Gather table
    assert sample["x"].shape == (2, 3, 4, 4)
    with pytest.raises(UsageError, match="unknown input 'z'"):
        prepare_samples(model, shapes=["z=1"])
    with pytest.raises(UsageError, match="expected NAME=DIMS"):
        prepare_samples(model, shapes=["ids:2x7"])


def test_metrics_values():
    ref = [
        {"y": np.array([[1.0, 2.0, 3.0]], np.float32)},
        {"y": np.array([[3.0, 2.0, 1.0]], np.float32)},
    ]
    got = [
        {"y": np.array([[1.0, 2.0, 3.5]], np.float32)},
        {"y": np.array([[3.0, 2.0, 1.0]], np.float32)},
    ]
    m = compare_outputs(ref, got)["y"]
    assert m.max_abs == pytest.approx(0.5)
    assert m.mean_abs == pytest.approx(0.5 / 6)
    assert m.max_rel == pytest.approx(0.5 / 3, rel=1e-4)
    assert m.sqnr == pytest.approx(10 * math.log10(28 / 0.25))
    assert m.top1 == 1.0
    flipped = [{"y": np.array([[3.0, 2.0, 1.0]], np.float32)}, ref[1]]
    assert compare_outputs(ref, flipped)["y"].top1 == 0.5
    nan = [{"y": np.array([[np.nan, 2.0, 3.0]], np.float32)}, ref[1]]
    assert compare_outputs(ref, nan)["y"].nonfinite == 1


def test_budget_parse_print_and_violations():
    budget = Budget.parse("cosine>=0.99, top1>=0.95,atol=1e-5,rtol=1e-4")
    assert str(budget) == "cosine>=0.99,top1>=0.95,atol=1e-05,rtol=0.0001"
    assert str(Budget.parse(str(budget))) == str(budget)
    ref = [{"y": np.ones((1, 4), np.float32)}]
    assert_equivalent(ref, [{"y": np.ones((1, 4), np.float32) + 1e-6}], budget)
    with pytest.raises(AssertionError, match="exceeds atol"):
        assert_equivalent(ref, [{"y": np.ones((1, 4), np.float32) + 1e-3}], budget)
    ints = [{"k": np.array([1, 2, 3])}]
    with pytest.raises(AssertionError, match="integer elements differ"):
        assert_equivalent(ints, [{"k": np.array([1, 2, 4])}], budget)
    for bad, message in [
        ("cos>=1", "unknown budget metric"),
        ("max_abs>=1", "needs '<='"),
        ("x", "is not"),
    ]:
        with pytest.raises(UsageError, match=message):
            Budget.parse(bad)
    assert not Budget.parse("none").gates
