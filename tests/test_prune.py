"""prune-initializers and clip-weights: exact sparsity, N:M structure, auto search,
sparse storage, eligibility, idempotence, clipping statistics, option errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import MODELS, accuracy, digits, model_path, run, run_pass_on_graph
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

import onnxopt
import onnxopt.passes.prune  # registers prune-initializers and clip-weights
from onnxopt.check import structural_checks
from onnxopt.errors import UsageError
from onnxopt.graph import to_graph
from onnxopt.passes.prune import sparse_to_dense
from onnxopt.pipeline import get_pass, make_options

DATA = str(MODELS / "digits_train.npz")


def optimize(name_or_model, pipeline: str, budget: str | None = "none", **kwargs):
    source = (
        name_or_model if isinstance(name_or_model, onnx.ModelProto) else model_path(name_or_model)
    )
    if isinstance(source, onnx.ModelProto):
        kwargs.setdefault("validation_samples", 4)
        kwargs.setdefault("calibration_samples", 16)
    else:
        kwargs.setdefault("data", DATA)
    return onnxopt.optimize(source, pipeline, budget=budget, **kwargs)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer, dense or sparse, as a dense array."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        found[sparse.values.name] = sparse_to_dense(sparse)
    return found


def _test_images() -> list[dict[str, np.ndarray]]:
    images, _ = digits("test")
    return [{"input": images[i : i + 1]} for i in range(0, 540, 9)]


def eligible(step: dict) -> dict[str, dict]:
    return {t["tensor"]: t for t in step["details"]["tensors"]}


# ---------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("digits_mlp", {"fc1.weight", "fc2.weight", "fc3.weight"}),
        ("digits_cnn", {"res.0.weight", "pointwise.0.weight", "mix.0.weight", "fc.weight"}),
    ],
)
def test_half_sparsity_is_exact_per_tensor_and_keeps_accuracy(name, expected):
    result = optimize(name, "prune-initializers(sparsity=0.5)", budget=None)
    step = result.steps[0]
    assert step["status"] == "accepted", step["reason"]
    assert set(eligible(step)) == expected
    pruned = weights(result.model)
    for tensor, stats in eligible(step).items():
        values = pruned[tensor]
        assert np.count_nonzero(values == 0) == round(0.5 * values.size), tensor
        assert stats["sparsity_after"] == pytest.approx(0.5, abs=1 / values.size)
        assert stats["zeroed"] == np.count_nonzero(values == 0)
    assert step["counts"]["eligible_sparsity"] == 0.5
    before, after = accuracy(model_path(name)), accuracy(result.model)
    assert after >= before - 0.01, (before, after)
    assert step["after"]["compressed"] < 0.75 * step["before"]["compressed"]


def test_small_tensors_are_skipped_with_a_reason():
    step = optimize("digits_cnn", "prune-initializers(sparsity=0.5)").steps[0]
    skipped = {s["subject"]: s["reason"] for s in step["skipped"]}
    assert set(skipped) == {"stem.0.weight", "depthwise.0.weight"}
    assert all("min_size=256" in reason for reason in skipped.values())


def test_constant_node_weights_are_pruned_like_initializers():
    result = optimize("digits_mlp_op11_constants", "prune-initializers(sparsity=0.5)")
    pruned = weights(result.model)
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= set(pruned)
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert np.mean(pruned[name] == 0) == 0.5
    biases = weights(onnxopt.optimize(model_path("digits_mlp"), "cleanup").model)
    np.testing.assert_array_equal(pruned["fc1.bias"], biases["fc1.bias"])


def _groups_along_reduction(op: str, values: np.ndarray) -> np.ndarray:
    """Rows of weights that are summed together, cut into complete groups of 4."""
    rows = {"Gemm": values, "MatMul": values.T}.get(op, values.reshape(len(values), -1))
    usable = rows.shape[1] // 4 * 4
    return rows[:, :usable].reshape(rows.shape[0], -1, 4)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_transformer", "digits_cnn"])
def test_two_four_pattern_leaves_two_zeros_in_every_group(name):
    result = optimize(name, "prune-initializers(pattern=2:4)")
    step = result.steps[0]
    assert step["status"] == "accepted"
    pruned = weights(result.model)
    checked = 0
    for tensor, stats in eligible(step).items():
        groups = _groups_along_reduction(stats["op"], pruned[tensor])
        assert np.all(np.sum(groups == 0, axis=-1) >= 2), tensor
        checked += groups.shape[0] * groups.shape[1]
    assert checked > 1000
    again = optimize(result.model, "prune-initializers(pattern=2:4)").steps[0]
    assert again["status"] == "no-op"


def test_auto_sparsity_is_within_budget_and_five_points_more_is_not():
    budget = "cosine>=0.99"
    step = optimize("digits_mlp", "prune-initializers(sparsity=auto)", budget=budget).steps[0]
    assert step["status"] == "accepted"
    chosen = step["details"]["auto_sparsity"]
    curve = step["details"]["auto_curve"]
    assert 0.3 < chosen <= 0.94
    assert 1 < len(curve) <= 12
    assert step["worst_vs_original"]["cosine"] >= 0.99
    assert step["counts"]["eligible_sparsity"] == pytest.approx(chosen, abs=1e-3)
    point = next(p for p in curve if p["sparsity"] == chosen)
    assert point["ok"] and point["cosine"] == pytest.approx(step["worst_vs_original"]["cosine"])
    harder = optimize(
        "digits_mlp", f"prune-initializers(sparsity={chosen + 0.05:.2f})", budget=budget
    ).steps[0]
    assert harder["status"] == "rolled back"
    assert "cosine" in harder["reason"]


def test_sparsity_zero_is_a_no_op_and_a_second_run_changes_nothing():
    assert optimize("digits_mlp", "prune-initializers(sparsity=0)").steps[0]["status"] == "no-op"
    twice = optimize(
        "digits_mlp", "prune-initializers(sparsity=0.6),prune-initializers(sparsity=0.6)"
    )
    first, second = twice.steps
    assert first["status"] == "accepted" and second["status"] == "no-op"
    assert second["counts"]["weights_zeroed"] == 0
    lower = optimize(twice.model, "prune-initializers(sparsity=0.4)").steps[0]
    assert lower["status"] == "no-op"


def test_sparse_storage_round_trips_with_identical_outputs_and_a_smaller_file(tmp_path):
    dense = optimize("digits_mlp", "prune-initializers(sparsity=0.8)")
    sparse = optimize("digits_mlp", "prune-initializers(sparsity=0.8,store=sparse)")
    step = sparse.steps[0]
    assert step["status"] == "accepted", step["reason"]
    assert len(sparse.model.graph.sparse_initializer) == 3
    assert {t["stored"] for t in step["details"]["tensors"]} == {"sparse"}
    assert not structural_checks(sparse.model)[0].failures
    feeds = _test_images()
    for a, b in zip(run(dense.model, feeds), run(sparse.model, feeds)):
        np.testing.assert_array_equal(a["logits"], b["logits"])
    dense_file = dense.save(tmp_path / "dense.onnx").stat().st_size
    sparse_file = sparse.save(tmp_path / "sparse.onnx").stat().st_size
    assert sparse_file < 0.5 * dense_file
    reloaded = onnx.load(str(tmp_path / "sparse.onnx"))
    np.testing.assert_array_equal(
        run(reloaded, feeds[:3])[0]["logits"], run(dense.model, feeds[:3])[0]["logits"]
    )
    # a later step imports the sparse initializers and keeps them
    again = optimize(reloaded, "prune-initializers(sparsity=0.8,store=sparse)").steps[0]
    assert again["status"] == "no-op"


def test_sparse_storage_keeps_dense_when_that_is_smaller():
    step = optimize("digits_mlp", "prune-initializers(sparsity=0.2,store=sparse)").steps[0]
    assert {t["stored"] for t in step["details"]["tensors"]} == {"dense"}
    assert step["counts"]["sparse_bytes_saved"] == 0


# ---------------------------------------------------------------------------- masks


def test_magnitude_only_zeroes_exactly_the_smallest_and_keeps_the_rest():
    original = weights(onnxopt.optimize(model_path("digits_mlp"), "cleanup").model)
    result = optimize("digits_mlp", "prune-initializers(sparsity=0.3,method=magnitude)")
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        before, after = original[name], weights(result.model)[name]
        k = round(0.3 * before.size)
        smallest = np.argsort(np.abs(before).ravel(), kind="stable")[:k]
        expected = before.ravel().copy()
        expected[smallest] = 0
        np.testing.assert_array_equal(after.ravel(), expected)


def test_refit_keeps_the_magnitude_mask_and_tracks_the_original_better():
    plain = optimize("digits_mlp", "prune-initializers(sparsity=0.8,method=magnitude)")
    refit = optimize(
        "digits_mlp", "prune-initializers(sparsity=0.8,method=magnitude,reconstruct=true)"
    )
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        np.testing.assert_array_equal(
            weights(plain.model)[name] == 0, weights(refit.model)[name] == 0
        )
    cosine = [r.steps[0]["worst_vs_original"]["cosine"] for r in (plain, refit)]
    assert cosine[1] > cosine[0] + 0.01, cosine
    assert accuracy(refit.model) > accuracy(plain.model) + 0.1


def test_global_scope_hits_the_overall_target_without_emptying_one_layer():
    step = optimize("digits_mlp", "prune-initializers(sparsity=0.6,scope=global)").steps[0]
    stats = eligible(step)
    total = sum(s["size"] for s in stats.values())
    zeros = sum(s["sparsity_after"] * s["size"] for s in stats.values())
    assert zeros == pytest.approx(round(0.6 * total), abs=1)
    for s in stats.values():
        assert 0.2 < s["sparsity_after"] < 0.95


def _two_layer_model(scale_big: float, scale_small: float, shared: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 64)) * scale_big).astype(np.float32)
    w2 = (rng.standard_normal((64, 64 if shared else 8)) * scale_small).astype(np.float32)
    second = "W1" if shared else "W2"
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", second], ["y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(w1, "W1")]
    if not shared:
        inits.append(numpy_helper.from_array(w2, "W2"))
    out_dim = 64 if shared else 8
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_global_scope_normalises_per_tensor():
    model = _two_layer_model(scale_big=0.01, scale_small=1.0)
    step = optimize(model, "prune-initializers(sparsity=0.5,scope=global,min_size=0)").steps[0]
    for s in eligible(step).values():
        assert 0.3 < s["sparsity_after"] < 0.7, s


def test_shared_weight_is_pruned_once():
    model = _two_layer_model(1.0, 1.0, shared=True)
    result = optimize(model, "prune-initializers(sparsity=0.5,min_size=0)")
    step = result.steps[0]
    assert list(eligible(step)) == ["W1"]
    assert step["counts"]["weights_zeroed"] == 64 * 64 // 2
    assert [n.input[1] for n in result.model.graph.node if n.op_type == "MatMul"] == ["W1", "W1"]
    # both uses' inputs are summed into one Hessian: the shared weight is refitted too
    assert step["counts"]["tensors_refitted"] == 1
    assert 0 < eligible(step)["W1"]["output_error"] < 0.5


def test_weight_that_also_feeds_another_input_is_skipped():
    model = _two_layer_model(1.0, 1.0)
    model.graph.node.append(helper.make_node("Add", ["y", "W2"], ["z"], name="add"))
    model.graph.output[0].name = "z"
    step = optimize(model, "prune-initializers(sparsity=0.5,min_size=0)").steps[0]
    assert list(eligible(step)) == ["W1"]
    (skipped,) = step["skipped"]
    assert skipped["subject"] == "W2" and "Add 'add' input 1" in skipped["reason"]


def test_ties_are_broken_by_position_deterministically():
    model = _two_layer_model(1.0, 1.0)
    signs = np.sign(numpy_helper.to_array(model.graph.initializer[0]))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(signs.astype(np.float32), "W1"))
    text = "prune-initializers(sparsity=0.25,method=magnitude,min_size=0)"
    first, second = (weights(optimize(model, text).model)["W1"] for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert np.all(first.ravel()[: 64 * 16] == 0) and np.all(first.ravel()[64 * 16 :] != 0)


def test_threshold_zeroes_every_smaller_magnitude():
    original = weights(onnxopt.optimize(model_path("digits_mlp"), "cleanup").model)
    result = optimize("digits_mlp", "prune-initializers(threshold=0.05,method=magnitude)")
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        after = weights(result.model)[name]
        np.testing.assert_array_equal(after == 0, np.abs(original[name]) < 0.05)


def test_ops_exclude_and_min_size_limit_what_is_touched():
    original = weights(onnxopt.optimize(model_path("digits_cnn"), "cleanup").model)
    only_gemm = weights(optimize("digits_cnn", "prune-initializers(ops=[Gemm])").model)
    assert np.mean(only_gemm["fc.weight"] == 0) == 0.5
    for name in ("res.0.weight", "mix.0.weight", "pointwise.0.weight"):
        np.testing.assert_array_equal(only_gemm[name], original[name])
    step = optimize("digits_mlp", 'prune-initializers(exclude="/fc2/*")').steps[0]
    assert set(eligible(step)) == {"fc1.weight", "fc3.weight"}
    step = optimize("digits_mlp", "prune-initializers(exclude=[fc2.weight],min_size=1000)").steps[0]
    assert set(eligible(step)) == {"fc1.weight"}


@pytest.mark.parametrize(
    "text",
    [
        "prune-initializers(sparsity=1.5)",
        "prune-initializers(sparsity=0.5,threshold=0.1)",
        "prune-initializers(sparsity=auto,pattern=2:4)",
        "prune-initializers(pattern=4:4)",
        "prune-initializers(pattern=half)",
        "prune-initializers(ops=[Relu])",
        "prune-initializers(scope=row)",
        "prune-initializers(store=coo)",
        "prune-initializers(threshold=-1)",
        "clip-weights(percentile=99,sigma=3)",
        "clip-weights(percentile=10)",
        "clip-weights(granularity=block)",
    ],
)
def test_bad_options_are_usage_errors_naming_the_pass(text):
    with pytest.raises(UsageError, match=text.split("(")[0]):
        optimize("digits_mlp", text)


def test_structural_checks_accept_sparse_initializers():
    values = helper.make_tensor("W", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = helper.make_tensor("", TensorProto.INT64, [2], [0, 3])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report, inferred = structural_checks(model)
    assert not report.failures
    assert inferred.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2
    out = run(model, [{"x": np.array([[1.0, 1.0]], np.float32)}])[0]["y"]
    np.testing.assert_array_equal(out, [[1.0, 2.0]])


# ---------------------------------------------------------------------------- clipping


def test_clip_percentile_per_tensor_is_reported_and_idempotent():
    original = weights(onnxopt.optimize(model_path("digits_mlp"), "cleanup").model)
    result = optimize("digits_mlp", "clip-weights(percentile=99)")
    step = result.steps[0]
    assert step["status"] == "accepted"
    for stats in step["details"]["tensors"]:
        before, after = original[stats["tensor"]], weights(result.model)[stats["tensor"]]
        c = np.percentile(np.abs(before), 99, method="higher")
        assert stats["c_max"] == pytest.approx(c)
        assert np.abs(after).max() == pytest.approx(c)
        assert stats["clipped"] == np.count_nonzero(np.abs(before) > c)
        assert 0 < stats["fraction"] <= 0.01 + 1 / before.size
        assert stats["range_after"] == pytest.approx([after.min(), after.max()])
        inside = np.abs(before) <= c
        np.testing.assert_array_equal(after[inside], before[inside])
    assert optimize(result.model, "clip-weights(percentile=99)").steps[0]["status"] == "no-op"


def test_clip_sigma_per_channel_bounds_every_output_channel():
    original = weights(onnxopt.optimize(model_path("digits_mlp"), "cleanup").model)
    result = optimize("digits_mlp", "clip-weights(sigma=2,granularity=channel)")
    assert result.steps[0]["counts"]["values_clipped"] > 0
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        before, after = original[name], weights(result.model)[name]  # Gemm transB=1: rows
        limits = 2 * before.astype(np.float64).std(axis=1, keepdims=True)
        np.testing.assert_allclose(after, np.clip(before, -limits, limits), rtol=1e-6)
    assert weights(result.model)["fc1.bias"].tolist() == original["fc1.bias"].tolist()


# ---------------------------------------------------------------------------- streaming selection
#
# The pass ranks weights without sorting them (radix select over slices); these tests
# compare it with the full stable sort it replaces, with slices and buckets made tiny so
# that every chunked and multi-level path runs on small tensors.

from onnxopt.passes.prune import clip as clip_module  # noqa: E402
from onnxopt.passes.prune import selection as selection_module  # noqa: E402
from onnxopt.passes.prune import storage as storage_module  # noqa: E402
from onnxopt.passes.prune import weights as weights_module  # noqa: E402


@pytest.fixture(params=["default", "tiny"])
def slices(request, monkeypatch):
    """Run with the real slice/bucket sizes and with tiny ones (odd, so that slices cut
    through rows and N:M groups, and the radix select goes down every level)."""
    if request.param == "tiny":
        monkeypatch.setattr(selection_module, "CHUNK_ELEMENTS", 37)
        monkeypatch.setattr(selection_module, "COLLECT_LIMIT", 3)
    return request.param


def _tied(rng, shape, dtype=np.float32) -> np.ndarray:
    """Few distinct magnitudes, both signs, zeros: every threshold falls in a tie."""
    return (rng.integers(-4, 5, size=shape) * 0.25).astype(dtype)


def _sorted_zeros(values: np.ndarray, count: int) -> np.ndarray:
    """What the pass did before: zero the first ``count`` of a stable argsort of |w|."""
    out = values.ravel().copy()
    out[np.argsort(np.abs(values).ravel(), kind="stable")[:count]] = 0
    return out.reshape(values.shape)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sparsity", [0.01, 0.3, 0.5, 0.77, 0.99])
def test_layer_selection_equals_a_stable_sort_even_on_ties(slices, dtype, sparsity):
    rng = np.random.default_rng(1)
    for values in (_tied(rng, (33, 17), dtype), rng.standard_normal((40, 25)).astype(dtype)):
        count = round(sparsity * values.size)
        pruned = values.copy()
        selection_module.zero_smallest(pruned, count)
        np.testing.assert_array_equal(pruned, _sorted_zeros(values, count))
        assert np.count_nonzero(pruned == 0) == max(count, np.count_nonzero(values == 0))


def test_layer_selection_handles_nan_inf_and_negative_zero(slices):
    values = np.array([np.nan, -0.0, 3.0, -np.inf, 1.0, np.nan, -1.0, 0.5, np.inf, 2.0])
    for count in range(values.size + 1):
        pruned = values.copy()
        selection_module.zero_smallest(pruned, count)
        np.testing.assert_array_equal(pruned, _sorted_zeros(values, count))


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_radix_select_finds_every_rank(slices, bits):
    rng = np.random.default_rng(bits)
    keys = rng.integers(0, 2**bits if bits < 64 else 2**63, size=500, dtype=f"u{bits // 8}")
    keys[::7] = keys[3]  # a large tie

    def stream():
        return iter(np.array_split(keys, 6))

    ordered = np.sort(keys)
    for rank in (0, 1, 57, 249, 250, 498, 499):
        key, below = selection_module.select_key(stream, rank, bits)
        assert key == ordered[rank]
        assert below == np.count_nonzero(keys < ordered[rank])


def _sorted_global(arrays: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """The former implementation: float64 |w| / rms, concatenated, stable argsort."""
    scores = []
    for values in arrays:
        magnitude = np.abs(values.astype(np.float64)).ravel()
        rms = np.sqrt(np.mean(magnitude**2)) if magnitude.size else 0.0
        scores.append(magnitude / rms if rms > 0 else magnitude)
    joined = np.concatenate(scores)
    chosen = np.zeros(joined.size, dtype=bool)
    chosen[np.argsort(joined, kind="stable")[: round(sparsity * joined.size)]] = True
    out, start = [], 0
    for values in arrays:
        mask = chosen[start : start + values.size].reshape(values.shape)
        out.append(np.where(mask, 0, values).astype(values.dtype))
        start += values.size
    return out


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.95])
def test_global_selection_equals_a_full_sort(slices, sparsity):
    rng = np.random.default_rng(2)
    arrays = [
        rng.standard_normal((30, 20)).astype(np.float32) * 0.01,
        rng.standard_normal((7, 5, 3)).astype(np.float32) * 3,
        _tied(rng, (50,)),  # ties inside the tensor
        _tied(rng, (50,)) * 2,  # same scores as the previous one: ties across tensors
        np.zeros((9,), np.float32),  # rms 0: raw magnitudes
        rng.standard_normal((11, 11)).astype(np.float16),
    ]
    expected = _sorted_global(arrays, sparsity)
    pruned = [a.copy() for a in arrays]
    selection_module.zero_global(pruned, sparsity)
    for got, want in zip(pruned, expected):
        np.testing.assert_array_equal(got, want)
    total = sum(a.size for a in arrays)
    assert sum(np.count_nonzero(p == 0) for p in pruned) == round(sparsity * total)


def _node(op: str, **attrs) -> gs.Node:
    return gs.Node(op=op, attrs=attrs)


def _sorted_pattern(values, layout, keep, group) -> np.ndarray:
    """The former implementation: float64 rows, -1 padding, stable argsort per group."""
    rows = np.abs(layout.to_rows(values)).astype(np.float64)
    fan_in = rows.shape[1]
    padded = np.full((rows.shape[0], -(-fan_in // group) * group), -1.0)
    padded[:, :fan_in] = rows
    grouped = padded.reshape(rows.shape[0], -1, group)
    order = np.argsort(grouped, axis=-1, kind="stable")[..., : group - keep]
    mask = np.zeros_like(grouped, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    mask = layout.from_rows(mask.reshape(rows.shape[0], -1)[:, :fan_in])
    return np.where(mask, 0, values).astype(values.dtype)


@pytest.mark.parametrize(
    ("node", "index", "shape"),
    [
        (_node("Conv"), 1, (6, 3, 3, 3)),  # fan-in 27: a partial last group
        (_node("ConvTranspose", group=2), 1, (4, 3, 2, 2)),
        (_node("Gemm", transB=0), 1, (10, 6)),  # rows are columns
        (_node("Gemm", transB=1), 1, (6, 10)),
        (_node("MatMul"), 1, (12, 5)),
        (_node("MatMul"), 1, (2, 12, 5)),
        (_node("Gather"), 0, (9, 4)),
    ],
)
@pytest.mark.parametrize(("keep", "group"), [(2, 4), (1, 3), (3, 8), (5, 16)])
def test_n_m_pattern_equals_the_per_group_sort(slices, node, index, shape, keep, group):
    rng = np.random.default_rng(3)
    layout = weights_module.row_layout(node, index, shape)
    for values in (_tied(rng, shape), rng.standard_normal(shape).astype(np.float32)):
        pruned = values.copy()
        selection_module.zero_pattern(pruned, layout, keep, group)
        np.testing.assert_array_equal(pruned, _sorted_pattern(values, layout, keep, group))
        rows = layout.to_rows(pruned)
        full = rows[:, : rows.shape[1] // group * group].reshape(rows.shape[0], -1, group)
        assert np.all(np.sum(full == 0, axis=-1) >= group - keep)
        again = pruned.copy()
        selection_module.zero_pattern(again, layout, keep, group)
        np.testing.assert_array_equal(again, pruned)


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 4099])
@pytest.mark.parametrize("percentile", [50, 90, 99.9, 100])
def test_clip_percentile_limit_equals_numpy_higher(slices, size, percentile):
    rng = np.random.default_rng(size)
    clip = get_pass("clip-weights")(make_options(get_pass("clip-weights"), {}))
    clip.options.percentile = percentile
    for values in (rng.standard_normal(size).astype(np.float32), _tied(rng, (size,))):
        want = np.percentile(np.abs(values.astype(np.float64)), percentile, method="higher")
        assert clip._tensor_limit(values) == want


def test_clip_sigma_limit_over_slices_matches_numpy(monkeypatch):
    monkeypatch.setattr(selection_module, "CHUNK_ELEMENTS", 1000)
    values = (np.random.default_rng(5).standard_normal(12345) * 3 + 1).astype(np.float32)
    assert clip_module._std(values) == pytest.approx(values.astype(np.float64).std(), rel=1e-12)


@pytest.mark.parametrize("shape", [(0,), (), (3, 4), (700, 300)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dense_size_is_computed_without_building_the_proto(shape, dtype):
    values = np.ones(shape, dtype)
    for name in ("", "W", "x" * 200):
        expected = numpy_helper.from_array(values, name).ByteSize()
        assert storage_module.dense_proto_bytes(name, values) == expected


# ---------------------------------------------------------------------------- memory behaviour


def _matmul_chain(*weights: np.ndarray) -> onnx.ModelProto:
    nodes, inits, current = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights[0].shape[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run_pass(graph: gs.Graph, model: onnx.ModelProto, name: str, **options):
    return run_pass_on_graph(name, graph, model, **options)


def test_weights_the_pass_does_not_change_stay_lazily_loaded():
    rng = np.random.default_rng(6)
    sparse_enough = rng.standard_normal((64, 64)).astype(np.float32)
    sparse_enough[:, :40] = 0
    model = _matmul_chain(rng.standard_normal((64, 64)).astype(np.float32), sparse_enough)
    graph = to_graph(model)
    result = _run_pass(graph, model, "prune-initializers", sparsity=0.5, method="magnitude")
    tensors = graph.tensors()
    assert isinstance(tensors["W0"]._values, np.ndarray)  # pruned: a new array
    assert type(tensors["W1"]._values) is LazyValues  # already 62.5 % zeros: untouched
    assert [t["zeroed"] for t in result.details["tensors"]] == [2048, 0]
    graph = to_graph(model)
    assert not _run_pass(graph, model, "clip-weights", percentile=100).changed
    assert all(type(graph.tensors()[n]._values) is LazyValues for n in ("W0", "W1"))


@pytest.mark.parametrize(
    "options",
    [
        {"sparsity": 0.5},
        {"sparsity": 0.5, "scope": "global"},
        {"pattern": "2:4"},
        {"threshold": 0.5},
    ],
)
def test_prune_never_writes_into_arrays_a_graph_copy_shares(options):
    rng = np.random.default_rng(7)
    model = _matmul_chain(*(rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2)))
    original = to_graph(model)
    for tensor in original.tensors().values():
        if isinstance(tensor, gs.Constant):
            tensor.values = tensor.values  # materialize: the copy shares these arrays
    kept = {name: t.values.copy() for name, t in original.tensors().items() if name[0] == "W"}
    candidate = original.copy()
    result = _run_pass(candidate, model, "prune-initializers", method="magnitude", **options)
    assert result.changed
    for name, values in kept.items():
        np.testing.assert_array_equal(original.tensors()[name].values, values)
        assert not np.array_equal(candidate.tensors()[name].values, values)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_clip_never_writes_into_arrays_a_graph_copy_shares(granularity):
    model = _matmul_chain(np.random.default_rng(8).standard_normal((32, 32)).astype(np.float32))
    original = to_graph(model)
    tensor = original.tensors()["W0"]
    tensor.values = tensor.values
    kept = tensor.values.copy()
    candidate = original.copy()
    options = {"percentile": 90, "granularity": granularity}
    assert _run_pass(candidate, model, "clip-weights", **options).changed
    np.testing.assert_array_equal(tensor.values, kept)


@pytest.mark.parametrize(
    "pipeline",
    [
        {"name": "prune-initializers", "sparsity": 0.5, "method": "magnitude"},
        {"name": "prune-initializers", "sparsity": 0.5, "scope": "global", "method": "magnitude"},
        {"name": "prune-initializers", "pattern": "2:4", "method": "magnitude"},
        {"name": "clip-weights", "percentile": 99},
        {"name": "clip-weights", "sigma": 2, "granularity": "channel"},
    ],
)
def test_pass_needs_at_most_one_extra_tensor_beyond_its_output(monkeypatch, pipeline):
    """Peak Python/numpy allocations while the pass runs (tracemalloc) stay within the
    new arrays it assigns plus one tensor (decoding a lazily loaded weight copies the
    proto's bytes once) plus slice-sized temporaries."""
    import tracemalloc

    monkeypatch.setattr(selection_module, "CHUNK_ELEMENTS", 1 << 14)
    rng = np.random.default_rng(9)
    shape = (512, 1024)  # 2 MiB of float32 per tensor
    model = _matmul_chain(*(rng.standard_normal(shape).astype(np.float32) for _ in range(3)))
    options = dict(pipeline)
    name = options.pop("name")
    graph = to_graph(model)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert _run_pass(graph, model, name, **options).changed
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    tensor_bytes = 4 * shape[0] * shape[1]
    assert peak <= 3 * tensor_bytes + tensor_bytes + (1 << 20), peak / tensor_bytes


def test_auto_search_frees_each_candidate_before_the_next():
    """Candidates are graphsurgeon graphs (reference cycles): the search must not keep
    one model's worth of new arrays per evaluation until the cyclic GC runs. (The
    remaining peak is the candidate, its export and the final pruning.)"""
    import gc
    import tracemalloc

    rng = np.random.default_rng(11)
    weights = [rng.standard_normal((512, 512)).astype(np.float32) for _ in range(3)]
    model = _matmul_chain(*weights)
    model_bytes = sum(w.nbytes for w in weights)
    text = "prune-initializers(sparsity=auto,method=magnitude,min_size=0)"
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        step = optimize(model, text, validation_samples=2, calibration_samples=2).steps[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert len(step["details"]["auto_curve"]) >= 5
    assert peak < 6 * model_bytes, peak / model_bytes  # 10x when each candidate stays


def _embedding_model(tmp_path) -> tuple[onnx.ModelProto, str]:
    """ids -> Gather(table [50, 32]) -> MatMul(W [32, 8]), with rows of the table at
    very different norms (rare tokens small), and a data file of token ids."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 32)).astype(np.float32)
    table *= np.geomspace(0.01, 1.0, 50, dtype=np.float32)[:, None]
    w = rng.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["T", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "W"], ["y"], name="mm"),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
        [numpy_helper.from_array(table, "T"), numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = tmp_path / "ids.npz"
    np.savez(data, ids=rng.integers(0, 50, size=(24, 4)).astype(np.int64))
    return model, str(data)


def test_embedding_table_loses_the_same_share_of_every_row(tmp_path):
    """Calibrated methods prune a Gather table per gathered row: every token keeps half
    its features, its largest |w|. Magnitude stays per tensor: the small rows go."""
    model, data = _embedding_model(tmp_path)
    table = numpy_helper.to_array(model.graph.initializer[0])
    for method in ("sparsegpt", "wanda"):
        result = optimize(model, f"prune-initializers(method={method},min_size=0)", data=data)
        pruned = weights(result.model)["T"]
        assert [int(n) for n in (pruned == 0).sum(axis=1)] == [16] * 50, method
        kept = np.abs(table) >= np.sort(np.abs(table), axis=1)[:, 16:17]
        np.testing.assert_array_equal(pruned != 0, kept)
        np.testing.assert_array_equal(pruned[kept], table[kept])  # no refit of a table
    result = optimize(model, "prune-initializers(method=magnitude,min_size=0)", data=data)
    zeros = (weights(result.model)["T"] == 0).sum(axis=1)
    assert zeros.sum() == 50 * 16 and zeros[0] == 32 and zeros[-1] < 16
