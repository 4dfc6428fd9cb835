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


def test_npz_and_npy_samples_are_read_from_disk_on_use(tmp_path):
    # a data file is not loaded whole: each sample is read when a pass uses it, and
    # gives exactly what the eager loader gave (values, dtype cast, batch-1 rows)
    import pickle

    from onnxopt.sample_files import Samples

    rng = np.random.default_rng(0)
    rows = rng.random((9, 1, 8, 8))  # float64: cast to the model's float32
    labels = np.arange(9)
    np.savez(tmp_path / "d.npz", input=rows, label=labels)
    np.save(tmp_path / "d.npy", rows)
    eager = load_samples({"input": rows}, input_specs(CNN))
    assert isinstance(eager, list)
    for source in (tmp_path / "d.npz", tmp_path / "d.npy"):
        casts: set = set()
        lazy = load_samples(source, input_specs(CNN), casts)
        assert isinstance(lazy, Samples) and len(lazy) == 9
        assert casts == {("input", "float64", "float32")}
        for mine, theirs in zip(lazy, eager):
            assert mine["input"].dtype == np.float32 and mine["input"].shape == (1, 1, 8, 8)
            np.testing.assert_array_equal(mine["input"], theirs["input"])
        # slices and picks stay lazy; pickling carries offsets, not arrays
        assert isinstance(lazy[2:5], Samples) and len(lazy[2:5]) == 3
        np.testing.assert_array_equal(lazy[2:5][1]["input"], eager[3]["input"])
        assert len(pickle.dumps(lazy)) < rows.nbytes / 4
        again = pickle.loads(pickle.dumps(lazy))
        np.testing.assert_array_equal(again[8]["input"], eager[8]["input"])
    lazy_sets = prepare_samples(CNN, tmp_path / "d.npz", seed=3, calibration_samples=4,
                                validation_samples=3)  # fmt: skip
    eager_sets = prepare_samples(CNN, {"input": rows}, seed=3, calibration_samples=4,
                                 validation_samples=3)  # fmt: skip
    assert isinstance(lazy_sets.calibration, Samples)
    for mine, theirs in [*zip(lazy_sets.calibration, eager_sets.calibration),
                         *zip(lazy_sets.validation, eager_sets.validation)]:  # fmt: skip
        np.testing.assert_array_equal(mine["input"], theirs["input"])
    assert (len(lazy_sets.calibration), len(lazy_sets.validation)) == (4, 3)


def test_samples_of_a_relative_path_are_read_from_any_working_directory(tmp_path, monkeypatch):
    # a tune worker (or the caller) may change directory before the samples are used
    rows = np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 1, 8, 8)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "d.npz", input=rows)
    monkeypatch.chdir(tmp_path / "data")
    samples = load_samples("d.npz", input_specs(CNN))
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(samples[2]["input"], rows[2])


def test_files_that_cannot_be_read_by_row_are_loaded_whole(tmp_path):
    from onnxopt.sample_files import Samples, open_npy, open_npz

    rows = np.random.default_rng(1).random((4, 1, 8, 8)).astype(np.float32)
    np.savez_compressed(tmp_path / "z.npz", input=rows)  # deflated member
    np.save(tmp_path / "f.npy", np.asfortranarray(rows))  # Fortran order
    assert open_npz(tmp_path / "z.npz") == {"input": None} and open_npy(tmp_path / "f.npy") is None
    for name in ("z.npz", "f.npy"):
        samples = load_samples(tmp_path / name, input_specs(CNN))
        assert not isinstance(samples, Samples)
        np.testing.assert_array_equal(samples[3]["input"], rows[3:4])


def test_a_data_file_changed_or_removed_while_in_use_is_a_data_error(tmp_path):
    rows = np.zeros((4, 1, 8, 8), np.float32)
    np.save(tmp_path / "d.npy", rows)
    samples = load_samples(tmp_path / "d.npy", input_specs(CNN))
    assert samples[3]["input"].shape == (1, 1, 8, 8)
    np.save(tmp_path / "d.npy", rows + 1)  # same size, new contents
    with pytest.raises(DataError, match="changed after it was opened"):
        samples[0]
    (tmp_path / "d.npy").unlink()
    with pytest.raises(DataError, match="cannot read sample 1"):
        samples[1]


def test_a_data_file_damaged_during_a_run_aborts_it_as_a_data_error(tmp_path):
    # not a rolled-back step ("the candidate cannot run"): the data failed, exit 2
    import shutil
    from dataclasses import dataclass

    import onnxopt
    from onnxopt.pipeline import Pass, PassResult, register_pass, unregister_pass

    data = tmp_path / "d.npz"
    shutil.copy(MODELS / "digits_test.npz", data)

    @register_pass
    class Damage(Pass):
        """Truncates the data file, changes nothing."""

        name = "test-damage-data"
        summary = "truncate the data file"
        lossless = True

        @dataclass
        class Options:
            pass

        def run(self, graph, ctx):
            with open(data, "r+b") as f:
                f.truncate(2000)
            return PassResult(changed=False)

    try:
        with pytest.raises(DataError, match="changed after it was opened"):
            onnxopt.optimize(CNN, "test-damage-data,fold-batchnorm", data=data, seed=0)
    finally:
        unregister_pass("test-damage-data")


def test_a_member_shorter_than_its_header_is_refused_like_numpy_does(tmp_path):
    import io
    import zipfile

    rows = np.arange(10 * 64, dtype=np.float32).reshape(10, 1, 8, 8)
    buffer = io.BytesIO()
    np.save(buffer, rows)
    raw = buffer.getvalue()
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("input.npy", raw[: len(raw) - 2 * rows[0].nbytes])  # 8 of 10 rows
        buffer = io.BytesIO()
        np.save(buffer, np.full(2000, 7.0, np.float32))
        archive.writestr("zz_label.npy", buffer.getvalue())  # must not be read as rows
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_samples(tmp_path / "short.npz", input_specs(CNN))


def test_an_extra_key_that_cannot_be_read_by_row_keeps_the_inputs_on_disk(tmp_path):
    from onnxopt.sample_files import Samples

    rows = np.ones((5, 1, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", input=rows, scale=np.float32(2.0),
             ids=np.asfortranarray(np.ones((3, 4))))  # fmt: skip
    samples = load_samples(tmp_path / "d.npz", input_specs(CNN))
    assert isinstance(samples, Samples) and len(samples) == 5


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


# ------------------------------------------------------------ class-score outputs


def _head_model(tail: list[onnx.NodeProto], out: str, out_shape, extra_inits=()) -> onnx.ModelProto:
    """x [N, 8] -> MatMul W [8, 4] = "mm" -> ``tail`` nodes -> output ``out``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")]
    inits += list(extra_inits)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm"]), *tail],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_class_score_outputs_follows_heads_through_reshapes():
    from onnxopt.check import class_score_outputs

    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    bias = numpy_helper.from_array(np.ones(4, np.float32), "b")
    softmax = _head_model(
        [
            helper.make_node("Softmax", ["mm"], ["p"], axis=-1),
            helper.make_node("Reshape", ["p", "shape"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),
        ],
        "y",
        ["N", 4],
        [shape],
    )
    assert class_score_outputs(softmax) == {"y"}
    logits = _head_model([helper.make_node("Add", ["mm", "b"], ["y"])], "y", ["N", 4], [bias])
    assert class_score_outputs(logits) == {"y"}
    # Mean pooling, a plain activation, or an Add that is not a bias: not class scores.
    pooled = _head_model(
        [helper.make_node("ReduceMean", ["mm"], ["y"], axes=[1], keepdims=1)], "y", ["N", 1]
    )
    assert class_score_outputs(pooled) == frozenset()
    relu = _head_model([helper.make_node("Relu", ["mm"], ["y"])], "y", ["N", 4])
    assert class_score_outputs(relu) == frozenset()
    resid = _head_model(
        [helper.make_node("Relu", ["mm"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "y",
        ["N", 4],
        [bias],
    )
    assert class_score_outputs(resid) == frozenset()
    for name in MODELS_WITH_LOGITS:
        assert class_score_outputs(onnx.load(str(model_path(name)))) == {"logits"}


MODELS_WITH_LOGITS = ("digits_cnn", "digits_mlp", "digits_transformer")


def test_top1_only_on_named_class_score_outputs():
    ref = [{"emb": np.array([[1.0, 1.01]], np.float32)}] * 4
    got = [{"emb": np.array([[1.01, 1.0]], np.float32)}] * 4
    assert compare_outputs(ref, got)["emb"].top1 == 0.0  # no model known: by shape
    assert compare_outputs(ref, got, class_scores=frozenset())["emb"].top1 is None
    assert compare_outputs(ref, got, class_scores={"emb"})["emb"].top1 == 0.0
    assert not Budget.parse("cosine>=0.99,top1>=0.99").violations(
        compare_outputs(ref, got, class_scores=frozenset())
    )


def _embedding_model() -> onnx.ModelProto:
    """A sentence-embedding-like model: tokens [N, T, 32] -> MatMul -> mean over T,
    plus a shared offset. Its 16 dims sit close together, so a small weight change
    flips the argmax of many samples while the cosine stays near 1."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 16)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Add", ["m", "offset"], ["emb"]),
        ],
        "emb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 32])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 16])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.full(16, 5.0, np.float32), "offset"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_embedding_output_is_judged_by_cosine_not_argmax():
    from onnxopt import optimize
    from onnxopt.check import class_score_outputs

    model = _embedding_model()
    assert class_score_outputs(model) == frozenset()
    result = optimize(
        model, "prune-initializers(sparsity=0.3,method=magnitude)", validation_samples=32
    )
    step = result.steps[0]
    assert step["status"] == "accepted", step
    metrics = step["metrics_vs_original"]["emb"]
    assert metrics["cosine"] >= 0.99 and metrics.get("top1") is None
    # The same outputs judged by shape alone (the old rule) flip the argmax of
    # enough samples to fail top1>=0.99: the test would fail without the rule.
    from onnxopt.data import prepare_samples
    from onnxopt.pipeline import original_outputs

    feeds = prepare_samples(model, None, seed=0, validation_samples=32).validation
    ref = original_outputs(model, feeds)
    got = original_outputs(result.model, feeds)
    by_shape = compare_outputs(ref, got)["emb"]
    assert by_shape.top1 is not None and by_shape.top1 < 0.99


def test_only_quantized_candidates_are_also_checked_as_deployed():
    """The as-deployed run (optimizations on) is for integer kernels; a float-only
    lossy result is checked as written only, and the report says which ran."""
    from onnxopt import optimize
    from onnxopt.pipeline import has_quantized_ops

    mlp = str(model_path("digits_mlp"))
    data = str(MODELS / "digits_test.npz")
    pruned = optimize(mlp, "prune-initializers(sparsity=0.3,method=magnitude)", data=data)
    quantized = optimize(mlp, "quantize-int8(weights_only=true)", data=data)
    assert not has_quantized_ops(pruned.model) and has_quantized_ops(quantized.model)
    assert pruned.steps[0]["status"] == quantized.steps[0]["status"] == "accepted"
    assert pruned.steps[0]["metrics_vs_original_deployed"] == {}
    deployed = quantized.steps[0]["metrics_vs_original_deployed"]["logits"]
    assert 0.99 <= deployed["cosine"] < 1.0


def test_a_timing_feed_is_one_sample_without_the_few_samples_warning(caplog):
    # onnxopt bench and tune's latency want one sample, not a validation set
    from onnxopt.data import timing_feed

    with caplog.at_level("WARNING"):
        feed = timing_feed(CNN, MODELS / "digits_test.npz", seed=1)
    assert not caplog.records
    chosen = prepare_samples(CNN, MODELS / "digits_test.npz", seed=1, calibration_samples=0,
                             validation_samples=1)  # fmt: skip
    assert any("only 1 validation sample" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(feed["input"], chosen.validation[0]["input"])
