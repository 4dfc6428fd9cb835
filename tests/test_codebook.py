"""share-weights: k-means, graph form, pooled constants, zeros, opset upgrade, names,
acceptance figures on the samples."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx.version_converter
import pytest
from conftest import MODELS, accuracy, apply_pass, model_path, run, seeded_feeds
from onnx import numpy_helper

import onnxopt
import onnxopt.passes.codebook
import onnxopt.passes.compact  # registers compact
from onnxopt.check import assert_equivalent, structural_checks
from onnxopt.errors import PassCannotRun, UsageError
from onnxopt.graph import to_graph, to_model, weight_refs
from onnxopt.model import opset_version
from onnxopt.passes.codebook.kmeans import _PrefixSums, encode, kmeans_1d, pack_uint4
from onnxopt.pipeline import PassResult, get_pass, make_options
from onnxopt.runtime import make_session, run_samples
from onnxopt.wire import compressed_size

TRAIN = str(MODELS / "digits_train.npz")
SAMPLES = ("digits_mlp", "digits_cnn", "digits_transformer")


# ---------------------------------------------------------------------------- helpers


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(model_path(name)))


def apply(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, PassResult]:
    """Run share-weights directly on ``model`` (no checks), as the PassManager would;
    4 bits unless told (bits=auto, the default, needs the manager's checks)."""
    options.setdefault("bits", 4)
    return apply_pass("share-weights", model, **options)


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def records(result: PassResult) -> dict[str, dict]:
    return {r["tensor"]: r for r in result.details["tensors"]}


def folded_weights(model: onnx.ModelProto, tmp_path) -> dict[str, np.ndarray]:
    """Initializers of the model onnxruntime builds at load (optimizations on)."""
    path = tmp_path / "optimized.onnx"
    make_session(model, optimize=True, optimized_model_path=str(path))
    optimized = onnx.load(str(path))
    assert not {"Cast", "Gather"} & set(ops(optimized)), ops(optimized)
    return {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}


def assert_same_outputs(snapped: onnx.ModelProto, coded: onnx.ModelProto, feeds) -> None:
    """Materialized and Gather forms: bit-identical once onnxruntime has folded the
    Gather (what deployment runs). Without optimizations onnxruntime pre-packs constant
    weights for some kernels (not computed ones), so only round-off may differ."""
    optimized = [run_samples(make_session(m, optimize=True), feeds) for m in (snapped, coded)]
    assert_equivalent(*optimized, "atol=0, rtol=0")
    assert_equivalent(run(snapped, feeds), run(coded, feeds))


def assert_valid(model: onnx.ModelProto) -> None:
    report, _ = structural_checks(model)
    assert not report.failures, report.failures


def prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """Zero the smallest ``sparsity`` fraction of all weights together (global magnitude
    pruning; biases untouched). One-shot 80 % per-layer pruning breaks these small
    models (MLP 68 %); global keeps the MLP at 88.9 %."""
    graph = to_graph(model)
    tensors = {id(r.tensor): r.tensor for r in weight_refs(graph) if r.role != "bias"}
    magnitudes = np.sort(np.concatenate([np.abs(t.values).ravel() for t in tensors.values()]))
    cut = magnitudes[int(sparsity * magnitudes.size) - 1]
    for tensor in tensors.values():
        values = tensor.values
        tensor.values = np.where(np.abs(values) <= cut, 0, values).astype(values.dtype)
    return to_model(graph, model)


def lloyd_reference(values: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Textbook Lloyd: assign every value to its nearest centroid, move to the means."""
    centroids = centroids.astype(np.float64).copy()
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centroids[None, :]), axis=1)
        for j in range(len(centroids)):
            if np.any(nearest == j):
                centroids[j] = values[nearest == j].mean()
    return centroids


MATMUL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 32] y) {
  h = MatMul(x, w)
  y = MatMul(h, w2)
}
"""


def matmul_model(w: np.ndarray, w2: np.ndarray | None = None, text: str = MATMUL_TEXT):
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    if w2 is not None:
        model.graph.initializer.append(numpy_helper.from_array(w2, "w2"))
    onnx.checker.check_model(model)
    return model


def with_initializers(text: str, **arrays: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model)
    return model


def random_weights(shape, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(dtype)


# ---------------------------------------------------------------------------- k-means


def test_kmeans_matches_textbook_lloyd_from_the_same_start():
    values = np.random.default_rng(1).standard_normal(3000).astype(np.float32)
    book = kmeans_1d(values[None, :], 8, init="linear", max_iter=7)
    start = np.linspace(values.min(), values.max(), 8)
    expected = lloyd_reference(values.astype(np.float64), start, book.iterations)
    np.testing.assert_allclose(book.centroids[0], expected.astype(np.float32), rtol=1e-6)
    nearest = np.argmin(np.abs(values[:, None] - book.centroids[0][None, :]), axis=1)
    assert np.array_equal(book.indices[0], nearest)


def test_kmeans_finds_separated_clusters_and_stops_when_stable():
    rng = np.random.default_rng(2)
    centers = np.array([-3.0, -1.0, 0.5, 2.0])
    values = (np.repeat(centers, 500) + rng.normal(0, 0.05, 2000)).astype(np.float32)
    for init in ("linear", "density", "best"):
        book = kmeans_1d(values[None, :], 4, init=init, max_iter=100)
        assert book.iterations < 100
        np.testing.assert_allclose(book.centroids[0], centers, atol=0.01)
        assert np.array_equal(book.indices[0], np.repeat(np.arange(4), 500))


def squared_error(values: np.ndarray, book) -> np.ndarray:
    rebuilt = np.take_along_axis(book.centroids, book.indices.astype(np.int64), axis=1)
    return np.sum((rebuilt.astype(np.float64) - values) ** 2, axis=1)


def test_best_init_keeps_the_smaller_error_per_row():
    rng = np.random.default_rng(11)
    heavy = rng.standard_t(2, 4000)  # long tails: the linear grid wastes centroids on them
    uniform = rng.uniform(-1, 1, 4000)  # linear start is already near optimal
    rows = np.stack([heavy, uniform]).astype(np.float32)
    inits = ("linear", "density", "cuberoot", "best")
    books = {init: kmeans_1d(rows, 16, init=init) for init in inits}
    errors = {init: squared_error(rows, book) for init, book in books.items()}
    assert errors["linear"][0] != errors["density"][0]
    starts = np.stack([errors["linear"], errors["density"], errors["cuberoot"]])
    np.testing.assert_allclose(errors["best"], starts.min(axis=0), rtol=1e-9)
    # the cube-root start (the high-rate optimum's point density) wins on long tails
    assert errors["cuberoot"][0] < min(errors["linear"][0], errors["density"][0])
    # the error from prefix sums (how best chooses) is the direct one
    sums = _PrefixSums.of(rows)
    for book in books.values():
        computed = sums.squared_error(book.centroids)
        np.testing.assert_allclose(computed, squared_error(rows, book), rtol=1e-6)


def test_kmeans_keeps_exact_zeros_with_a_reserved_centroid():
    values = random_weights(5000, seed=3)
    values[np.random.default_rng(4).random(5000) < 0.8] = 0
    for init in ("linear", "density", "best"):
        book = kmeans_1d(values[None, :], 16, init=init)
        rebuilt = book.centroids[0][book.indices[0]]
        assert np.all(rebuilt[values == 0] == 0)
        assert np.count_nonzero(book.centroids[0] == 0) == 1
        assert np.count_nonzero(rebuilt == 0) >= np.count_nonzero(values == 0)


def test_kmeans_with_few_distinct_values_is_exact_and_trims_the_codebook():
    values = np.array([0.5, -0.25, 0.0, 0.5, 1.75, 0.5] * 50, dtype=np.float32)
    book = kmeans_1d(values[None, :], 16)
    assert book.exact_rows == 1
    assert np.array_equal(book.centroids[0][book.indices[0]], values)
    encoded = encode(values.reshape(20, 15), 16, None)
    # unused padding dropped; the most used value first (150x 0.5, then 50x each)
    assert encoded.codebook.tolist() == [0.5, -0.25, 0.0, 1.75]
    assert np.array_equal(encoded.reconstruct(), values.reshape(20, 15))


def test_codebook_entries_are_numbered_by_use_in_every_channel():
    values = random_weights((8, 300), seed=13)
    values[:, :200] = 0  # pruned: zero is the most used value of every row
    tensor = encode(values, 16, None)
    assert tensor.codebook[0] == 0
    assert np.all(np.diff(np.bincount(tensor.indices.ravel())) <= 0)
    channel = encode(values, 16, 0)
    assert np.all(channel.codebook.reshape(8, 16)[:, 0] == 0)
    for row in channel.indices.astype(np.int64):
        assert np.all(row[:200] == 0)
        assert np.all(np.diff(np.bincount(row, minlength=16)) <= 0)
    for encoded in (tensor, channel):
        assert np.all(encoded.reconstruct()[:, :200] == 0)
        assert np.mean((encoded.reconstruct() - values) ** 2) < 1e-4


def test_kmeans_is_deterministic_and_checks_arguments():
    values = random_weights((4, 500), seed=5)
    a, b = kmeans_1d(values, 16), kmeans_1d(values, 16)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="k must be"):
        kmeans_1d(values, 512)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans_1d(values[:, :0], 4)
    with pytest.raises(ValueError, match="linear, density, cuberoot or best"):
        kmeans_1d(values, 4, init="random")


def test_density_init_starts_at_quantiles_of_nonzero_values():
    values = np.concatenate([np.arange(1, 101), np.zeros(50)]).astype(np.float32)
    book = kmeans_1d(values[None, :], 4, init="density", max_iter=1)
    # Quantiles of 1..100 are 13, 38, 63, 88; 13 is nearest zero and becomes the fixed
    # 0 centroid. One update: [0]+1..19 -> 0 (fixed), 20..50 -> 35, 51..75 -> 63, 76.. -> 88.
    np.testing.assert_array_equal(book.centroids[0], [0, 35, 63, 88])


def test_channel_codebooks_are_independent():
    values = random_weights((6, 5, 3), seed=6)
    values[2] *= 50  # one channel with a much wider range
    encoded = encode(values, 4, axis=0)
    assert encoded.codebook.shape == (24,) and encoded.offsets.shape == (6, 1, 1)
    for channel in range(6):
        alone = encode(values[channel : channel + 1], 4, axis=None)
        np.testing.assert_array_equal(encoded.reconstruct()[channel], alone.reconstruct()[0])


def test_pack_uint4_round_trips_odd_sizes():
    indices = np.random.default_rng(7).integers(0, 16, (3, 5)).astype(np.uint8)
    proto = pack_uint4(indices, "idx")
    assert len(proto.raw_data) == 8  # 15 values, two per byte
    assert np.array_equal(numpy_helper.to_array(proto).astype(np.uint8), indices)
    with pytest.raises(ValueError, match="does not fit"):
        pack_uint4(np.array([16], np.uint8), "idx")


# ---------------------------------------------------------------------------- graph form


CLASSIC = {"granularity": "tensor", "pool_bits": 8}  # one codebook per tensor, 8-bit pool


def test_mlp_bits4_uint8_form_structure_numbers_and_idempotence(tmp_path):
    model = load("digits_mlp")
    out, result = apply(model, bits=4, upgrade_opset=False, **CLASSIC)
    assert result.changed and result.counts["tensors_shared"] == 3
    assert ops(out).count("Cast") == 3 and ops(out).count("Gather") == 3
    assert opset_version(out) == 17
    record = records(result)["fc1.weight"]
    inits = initializers(out)
    indices, codebook = inits[record["indices"]], inits[record["codebook"]]
    assert indices.data_type == onnx.TensorProto.UINT8 and list(indices.dims) == [128, 64]
    assert list(codebook.dims) == [record["codebook_size"]] and record["codebook_size"] <= 16
    assert "fc1.weight" not in inits  # now the Gather output, same name for the Gemm
    assert any("uint8" in note and "upgrade_opset=false" in note for note in result.notes)
    assert_valid(out)
    assert record["bits"] == 4 and record["mse"] > 0 and record["index_bits"] == 8
    assert record["bytes_after"] == 128 * 64 + 4 * record["codebook_size"]
    # the biases would cost more pooled at 8 bits than as floats: left alone, with why
    skipped = {s.subject: s.reason for s in result.skipped}
    assert "would not be smaller" in skipped["fc1.bias"]
    # Gather form and materialized form compute the very same numbers.
    snapped, _ = apply(model, bits=4, materialize=True, **CLASSIC)
    assert ops(snapped) == ops(model)
    feeds = seeded_feeds(model, 8)
    assert_same_outputs(snapped, out, feeds)
    # onnxruntime folds the reconstruction back to the materialized float weights.
    folded = folded_weights(out, tmp_path)
    snapped_weight = numpy_helper.to_array(initializers(snapped)["fc1.weight"])
    assert np.array_equal(folded["fc1.weight"], snapped_weight)
    again, second = apply(out, upgrade_opset=False, **CLASSIC)
    assert not second.changed and ops(again) == ops(out)
    _, third = apply(out, min_size=1, scope="weights")
    assert not third.changed
    assert any("constant indices" in s.reason for s in third.skipped)


def test_generated_names_are_short():
    model = load("digits_transformer")
    out, _ = apply(model, upgrade_opset=False)  # the converter adds a constant of its own
    graph = model.graph
    known = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    new = {t.name for t in out.graph.initializer} - known
    new |= {n.name for n in out.graph.node} - {n.name for n in graph.node}
    assert new and all(name.startswith("sw") and len(name) <= 12 for name in new), new
    # the exporter's weight names stay: consumers read the rebuilt tensor under it
    rebuilt = {o for n in out.graph.node for o in n.output}
    assert {"onnx::MatMul_144", "pos"} <= rebuilt


def test_default_upgrades_to_opset21_for_uint4():
    model = load("digits_mlp")
    out, result = apply(model)
    assert opset_version(out) == 21 and out.ir_version >= 10  # upgrade-opset ran first
    record = records(result)["fc1.weight"]
    indices = initializers(out)[record["indices"]]
    assert indices.data_type == onnx.TensorProto.UINT4
    assert len(indices.raw_data) == 128 * 64 // 2
    assert_valid(out)
    assert out.ByteSize() <= 0.2 * model.ByteSize()
    with pytest.raises(UsageError, match="upgrade_opset=false"):
        apply(model, index_dtype="uint4", upgrade_opset=False)
    kept, _ = apply(model, upgrade_opset="false")
    assert opset_version(kept) == 17


@pytest.mark.parametrize("name", ["digits_mlp", "digits_transformer"])
def test_uint4_and_uint8_forms_give_identical_outputs(name):
    # Convert first, so both forms run the same opset-21 graph around the weights.
    model = onnx.version_converter.convert_version(load(name), 21)
    four, result4 = apply(model)
    eight, result8 = apply(model, index_dtype="uint8")
    assert result4.details["index_bits"] == 4 and result8.details["index_bits"] == 8
    assert four.ByteSize() < eight.ByteSize()
    for form in (four, eight):
        assert_valid(form)
    feeds = seeded_feeds(model, 8)
    assert_equivalent(run(eight, feeds), run(four, feeds), "atol=0, rtol=0")


def test_channel_granularity_uses_offsets_and_matches_materialized():
    model = load("digits_cnn")
    out, result = apply(model, granularity="channel", bits=3, scope="weights")
    assert ops(out).count("Add") == 1 + 4  # the model's residual Add + one per tensor
    by_name = records(result)
    mix = by_name["mix.0.weight"]
    inits = initializers(out)
    assert list(inits[mix["codebook"]].dims) == [32 * 8]
    offsets = [t for n, t in inits.items() if n.endswith(".off")]
    assert sorted(list(t.dims) for t in offsets)[-1] == [32, 1, 1, 1]
    assert mix["codebooks"] == 32 and mix["axis"] == 0 and mix["granularity"] == "channel"
    assert by_name["fc.weight"]["axis"] == 0  # Gemm transB=1: rows are output features
    snapped, _ = apply(model, granularity="channel", bits=3, scope="weights", materialize=True)
    feeds = seeded_feeds(model, 8)
    assert_same_outputs(snapped, out, feeds)
    assert_valid(out)


def test_matmul_channel_axis_is_the_output_feature_axis():
    model = matmul_model(random_weights((64, 48), 1), random_weights((48, 32), 2))
    _, result = apply(model, granularity="channel")
    assert [r["axis"] for r in result.details["tensors"]] == [1, 1]
    assert [r["codebooks"] for r in result.details["tensors"]] == [48, 32]


def test_weight_shared_by_two_consumers_is_encoded_once():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 32] x) => (float[N, 32] y) {
      h = MatMul(x, w)
      y = MatMul(h, w)
    }
    """
    model = with_initializers(text, w=random_weights((32, 32), 3))
    out, result = apply(model, granularity="tensor")  # materialize has no scaled form
    assert ops(out).count("Gather") == 1 and result.counts["tensors_shared"] == 1
    readers = [n for n in out.graph.node if "w" in n.input]  # the rebuilt w, read twice
    assert len(readers) == 2 and {n.op_type for n in readers} == {"MatMul"}
    snapped, _ = apply(model, granularity="tensor", materialize=True)
    feeds = seeded_feeds(model, 4)
    assert_same_outputs(snapped, out, feeds)


def test_float16_weights_keep_a_float16_codebook():
    text = MATMUL_TEXT.replace("float[N, 64] x", "float16[N, 64] x").replace(
        "float[N, 32] y", "float16[N, 32] y"
    )
    model = matmul_model(
        random_weights((64, 48), 4, np.float16), random_weights((48, 32), 5, np.float16), text
    )
    out, result = apply(model)
    codebook = initializers(out)[records(result)["w"]["codebook"]]
    assert codebook.data_type == onnx.TensorProto.FLOAT16
    snapped, _ = apply(model, materialize=True)
    feeds = seeded_feeds(model, 4)
    assert_same_outputs(snapped, out, feeds)


def test_gather_embedding_is_shared_and_its_codebook_never_reclustered():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[N, 5] ids) => (float[N, 5, 16] y) {
      y = Gather(table, ids)
    }
    """
    model = with_initializers(text, table=random_weights((1000, 64), 6))
    out, result = apply(model, granularity="channel", bits=2)
    (record,) = result.details["tensors"]
    assert record["axis"] == 0 and record["codebooks"] == 1000  # one codebook per row
    assert ops(out).count("Gather") == 2
    _, second = apply(out, granularity="channel", bits=2)
    assert not second.changed
    feeds = seeded_feeds(model, 4)
    snapped, _ = apply(model, granularity="channel", bits=2, materialize=True)
    assert_same_outputs(snapped, out, feeds)


# ---------------------------------------------------------------------------- scope=all


def test_cnn_small_constants_are_pooled_in_one_codebook():
    model = load("digits_cnn")
    out, result = apply(model, **CLASSIC, fold_batchnorm=False)  # BN parameters pooled
    (pool,) = [r for r in result.details["tensors"] if r["granularity"] == "pool"]
    members = set(pool["pool"])
    # BatchNorm scale, shift and mean, the classifier bias and the two 144-weight convs
    assert {"stem.1.weight", "mix.1.bias", "res.1.running_mean", "fc.bias"} <= members
    assert {"stem.0.weight", "depthwise.0.weight"} <= members  # weights under min_size
    assert not any("running_var" in name for name in members)  # 1/sqrt(var) amplifies errors
    assert len(members) == 18 and pool["shape"] == [3 * (4 * 16 + 32) + 10 + 2 * 144]
    assert pool["bits"] == 8 and pool["index_bits"] == 8 and pool["codebook_size"] <= 256
    assert min(pool["member_sqnr_db"].values()) > 28  # measured 30.1 dB
    assert ops(out).count("Split") == 1
    assert ops(out).count("Reshape") == 2  # the two rank-4 conv weights; 1-D ones are direct
    assert result.counts["pooled"] == 18 and result.counts["tensors_shared"] == 18 + 4
    assert pool["bytes_after"] < pool["bytes_before"]
    skipped = {s.subject: s.reason for s in result.skipped}
    assert "not float" not in skipped.get("mix.1.running_var", "")
    assert "input 4 of BatchNormalization" in skipped["mix.1.running_var"]
    assert_valid(out)
    snapped, _ = apply(model, materialize=True, fold_batchnorm=False, **CLASSIC)
    assert ops(snapped) == ops(model)
    assert_same_outputs(snapped, out, seeded_feeds(model, 8))
    _, second = apply(out, **CLASSIC, fold_batchnorm=False)
    assert not second.changed  # codebooks are not re-clustered, indices are not float


def test_scope_weights_leaves_biases_and_normalization_alone():
    model = load("digits_transformer")
    out, result = apply(model, scope="weights")
    shared = set(records(result))
    assert "pos" not in shared and not any(
        r["granularity"] == "pool" for r in records(result).values()
    )
    assert ops(out).count("Gather") == 14 and "Split" not in ops(out)
    assert "layers.0.norm1.weight" in initializers(out) and "pos" in initializers(out)
    _, everything = apply(model, **CLASSIC)
    assert records(everything)["pos"]["bits"] == 4  # 256 elements: its own codebook
    (pool,) = [r for r in everything.details["tensors"] if r["granularity"] == "pool"]
    assert "layers.0.norm1.weight" in pool["pool"] and "embed.bias" in pool["pool"]
    too_small = [s for s in everything.skipped if "too small" in s.reason]
    assert too_small  # the scalars of GELU and attention scaling stay
    _, default = apply(model)  # default: those constants in float16, pos included
    (half,) = [r for r in default.details["tensors"] if r["granularity"] == "float16"]
    assert {"pos", "layers.0.norm1.weight", "embed.bias"} <= set(half["pool"])


def test_no_pool_when_pool_bits_is_not_finer_than_bits():
    model = load("digits_cnn")
    _, result = apply(model, bits=8, pool_bits=8, fold_batchnorm=False)
    assert not any(r["granularity"] == "pool" for r in result.details["tensors"])
    skipped = {s.subject: s.reason for s in result.skipped}
    assert "pool_bits=8 is not finer than bits=8" in skipped["stem.1.weight"]


ODD_CONSTANTS = """
<ir_version: 7, opset_import: ["" : 11]>
g (float[N, 16] x) => (float[N, 16] y) {
  a = Add(x, shift)
  b = Mul(a, scale)
  c = Pow(b, exponent)
  y = Add(c, shift2)
}
"""


def test_pool_at_opset11_uses_the_split_attribute_and_leaves_other_inputs_alone():
    rng = np.random.default_rng(12)
    model = with_initializers(
        ODD_CONSTANTS,
        shift=rng.standard_normal(16).astype(np.float32),
        scale=rng.uniform(0.5, 1.5, 16).astype(np.float32),
        exponent=np.full(16, 2.0, np.float32),
        shift2=rng.standard_normal(16).astype(np.float32),
    )
    out, result = apply(model, pool_bits=4, bits=2)
    (pool,) = result.details["tensors"]
    assert pool["pool"] == ["shift", "scale", "shift2"]
    assert opset_version(out) == 21  # pool_bits=4: uint4 indices are worth the upgrade
    skipped = {s.subject: s.reason for s in result.skipped}
    assert "input 1 of Pow" in skipped["exponent"]
    old, old_result = apply(model, pool_bits=4, bits=2, upgrade_opset=False)
    (split,) = [n for n in old.graph.node if n.op_type == "Split"]
    assert [a.name for a in split.attribute] == ["axis", "split"] and len(split.input) == 1
    assert old_result.details["tensors"][0]["index_bits"] == 8
    assert_valid(old)
    snapped, _ = apply(model, pool_bits=4, bits=2, materialize=True)
    feeds = seeded_feeds(model, 4)
    assert_same_outputs(snapped, old, feeds)
    assert_same_outputs(snapped, out, feeds)


# ---------------------------------------------------------------------------- zeros, materialize


def test_pruned_zeros_stay_exactly_zero(tmp_path):
    model = prune(load("digits_mlp"), 0.8)
    before = {n: numpy_helper.to_array(t) for n, t in initializers(model).items()}
    out, result = apply(model, bits=4)
    assert all(r["zeros_kept"] for r in result.details["tensors"])
    folded = folded_weights(out, tmp_path)
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        zeros = before[name] == 0
        assert zeros.mean() >= 0.5
        assert np.all(folded[name][zeros] == 0), name


def test_materialize_snaps_in_place_and_is_idempotent():
    model = load("digits_mlp")
    out, result = apply(model, materialize=True)
    assert ops(out) == ops(model) and result.details["index_bits"] is None
    weight = numpy_helper.to_array(initializers(out)["fc1.weight"])
    assert np.unique(weight).size <= 16 and weight.dtype == np.float32
    _, second = apply(out, materialize=True)
    assert not second.changed
    reasons = [s.reason for s in second.skipped]
    assert all("distinct values" in r or "already holds float16" in r for r in reasons)
    # Encoding a materialized model into the Gather form loses nothing.
    coded, third = apply(out)
    books = [r for r in third.details["tensors"] if r["granularity"] != "float16"]
    assert books and all(r["mse"] == 0 and r["exact_codebooks"] == 1 for r in books)
    feeds = seeded_feeds(model, 4)
    assert_same_outputs(out, coded, feeds)


# ---------------------------------------------------------------------------- no-op and errors


def test_small_excluded_and_unmatched_tensors_are_left_alone():
    model = load("digits_cnn")
    out, result = apply(model, min_size=10**6, scope="weights", fold_batchnorm=False)
    assert not result.changed and ops(out) == ops(model)
    assert any("min_size" in s.reason for s in result.skipped)
    _, result = apply(model, exclude=["mix.*", "/fc/*"], scope="weights")
    shared = {r["tensor"] for r in result.details["tensors"]}
    assert shared == {"res.0.weight", "pointwise.0.weight"}
    _, result = apply(model, ops=["Gemm"], scope="weights")
    assert {r["tensor"] for r in result.details["tensors"]} == {"fc.weight"}
    _, result = apply(load("digits_mlp"), ops=["Conv"])
    assert not result.changed


def test_nonfinite_weights_are_skipped():
    w = random_weights((64, 48), 7)
    w[0, 0] = np.nan
    _, result = apply(matmul_model(w, random_weights((48, 32), 8)))
    assert [s.subject for s in result.skipped] == ["w"]
    assert "NaN" in result.skipped[0].reason


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 9}, "out of range"),
        ({"bits": 1}, "out of range"),
        ({"pool_bits": 9}, "out of range"),
        ({"bits": 5, "index_dtype": "uint4"}, "bits<=4"),
        ({"granularity": "row"}, "tensor, channel"),
        ({"init": "kmeans++"}, "best, linear, density"),
        ({"scope": "biases"}, "weights, all"),
        ({"upgrade_opset": "maybe"}, "true or false; or expected one of auto"),
    ],
)
def test_bad_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        make_options(get_pass("share-weights"), options)


FUNCTION_TEXT = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[N, 64] x) => (float[N, 48] y) {
  h = MatMul(x, w)
  y = local.Twice(h)
}
<domain: "local", opset_import: ["" : 17]>
Twice (a) => (b) {
  b = Add(a, a)
}
"""


def test_failed_opset_upgrade_falls_back_to_uint8_or_raises():
    model = with_initializers(FUNCTION_TEXT, w=random_weights((64, 48), 9))
    out, result = apply(model)  # upgrade_opset=auto
    assert result.changed and result.details["index_bits"] == 8
    assert opset_version(out) == 17
    assert any("opset 17 < 21" in note and "uint8" in note for note in result.notes)
    feeds = seeded_feeds(model, 4)
    assert_equivalent(run(model, feeds), run(out, feeds), "cosine>=0.99")
    for options in ({"upgrade_opset": True}, {"index_dtype": "uint4"}):
        with pytest.raises(PassCannotRun, match=r"local functions"):
            apply(model, **options)
    # through the manager: the upgrade is a step of its own, rolled back with the reason;
    # an optional requirement lets share-weights run (uint8), a hard one skips it
    (step,) = onnxopt.optimize(model, "share-weights", budget="none").steps
    (upgrade,) = step["prerequisites"]
    assert (upgrade["step"], upgrade["status"]) == ("upgrade-opset(target=21)", "rolled back")
    assert "local functions" in upgrade["reason"] and step["status"] == "accepted"
    (step,) = onnxopt.optimize(model, "share-weights(upgrade_opset=true)", budget="none").steps
    assert step["status"] == "skipped" and step["prerequisites"][0]["status"] == "rolled back"
    assert "uint4 indices need opset 21" in step["reason"]
    assert "local functions" in step["reason"]


def test_two_bits_and_conv_transpose_channels():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 5, 5] x) => (float[N, 12, 7, 7] y) {
      y = ConvTranspose(x, w)
    }
    """
    model = with_initializers(text, w=random_weights((8, 12, 3, 3), 10))
    out, result = apply(model, bits=2, granularity="channel")
    (record,) = result.details["tensors"]
    assert record["axis"] == 1 and record["codebooks"] == 12 and record["codebook_size"] == 48
    inits = initializers(out)
    (offsets,) = [t for n, t in inits.items() if n.endswith(".off")]
    assert list(offsets.dims) == [1, 12, 1, 1]
    indices = numpy_helper.to_array(inits[record["indices"]])
    assert indices.max() < 4
    snapped, _ = apply(model, bits=2, granularity="channel", materialize=True)
    assert_same_outputs(snapped, out, seeded_feeds(model, 4))


def test_codebooks_larger_than_the_weights_are_not_written():
    model = load("digits_mlp")
    out, result = apply(model, bits=8, granularity="channel", scope="weights")
    # fc1 [128, 64]: 128 codebooks of 256 floats = 128 KB for a 32 KB tensor.
    assert not result.changed and ops(out) == ops(model)
    skipped = {s.subject: s.reason for s in result.skipped}
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert "would not be smaller" in skipped[name]


# ---------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("name", SAMPLES)
def test_bits8_keeps_cosine_0_9999(name):
    result = onnxopt.optimize(str(model_path(name)), "share-weights(bits=8)", data=TRAIN)
    step = result.steps[0]
    assert step["status"] == "accepted", step["reason"]
    assert step["worst_vs_original"]["cosine"] >= 0.9999


# Measured (tools/bench_codebook.py): file ratio without and with compact. The float16
# biases and normalization parameters (2 bytes a value, against 1 in the former 8-bit
# pool), the CNN's per-channel codebooks and the transformer's per-row scales (0.30 ->
# 0.334 alone, cosine 0.9958 -> 0.9969) cost size on these tiny models; accuracy no
# longer drops (docs/passes/codebook.md).
BITS4 = {"digits_mlp": (0.17, 0.16), "digits_cnn": (0.28, 0.23), "digits_transformer": (0.34, 0.22)}


@pytest.mark.parametrize("name", SAMPLES)
def test_bits4_size_and_accuracy_on_the_samples(name):
    original = load(name)
    alone, compacted = BITS4[name]
    result = onnxopt.optimize(
        original, "share-weights(bits=4),compact", data=TRAIN, budget="top1>=0.95"
    )
    shared, compact = result.steps
    assert shared["status"] == compact["status"] == "accepted", result.steps
    assert shared["after"]["size"] <= alone * original.ByteSize()
    assert result.model.ByteSize() <= compacted * original.ByteSize()
    assert accuracy(result.model) >= accuracy(original) - 0.002  # measured: 0 to -0.19 points


def test_same_seed_gives_byte_identical_models():
    pipeline = "share-weights(bits=4,granularity=channel),compact"
    first = onnxopt.optimize(str(model_path("digits_transformer")), pipeline, data=TRAIN)
    second = onnxopt.optimize(str(model_path("digits_transformer")), pipeline, data=TRAIN)
    assert first.steps[0]["status"] == "accepted"
    assert first.model.SerializeToString() == second.model.SerializeToString()


def test_pruned_model_keeps_zeros_and_compresses():
    model = prune(load("digits_mlp"), 0.8)
    result = onnxopt.optimize(model, "share-weights(bits=4)", data=TRAIN, budget="none")
    out = result.model
    assert result.steps[0]["status"] == "accepted"
    assert all(r["zeros_kept"] for r in result.steps[0]["details"]["tensors"])
    ratio = compressed_size(load("digits_mlp")) / compressed_size(out)
    # Measured 11.8x. 15x is beyond deflate here: it spends ~25 % more than the indices'
    # order-0 entropy on them (docs/passes/codebook.md).
    assert ratio >= 11.5
    assert abs(accuracy(out) - accuracy(model)) <= 0.01  # vs the pruned model (88.9 %)


def test_prune_then_share_pipeline():
    try:
        import onnxopt.passes.prune  # registers prune-initializers
    except ImportError:
        pytest.skip("prune-initializers (passes/prune.py) is not available yet")
    original = load("digits_mlp")
    result = onnxopt.optimize(
        original,
        # the magnitude mask + least-squares refit this test was calibrated on (the
        # default method is sparsegpt since issue 14: 95.4 % here, within noise)
        "prune-initializers(sparsity=0.8,scope=global,method=magnitude,reconstruct=true),"
        "share-weights(bits=4,init=linear,pool_bits=5,granularity=tensor),compact",
        data=TRAIN,
        budget="none",
    )
    _, shared_step, _ = result.steps
    assert [s["status"] for s in result.steps] == ["accepted"] * 3
    assert all(r["zeros_kept"] for r in shared_step["details"]["tensors"])
    assert sum(r["zeros"] for r in shared_step["details"]["tensors"]) >= 0.75 * 17024
    ratio = compressed_size(original) / compressed_size(result.model)
    assert ratio >= 14  # measured 14.7x; the issue asks 15x: see the docs for why not
    # measured 94.4 % (pruning alone: 95.7 %; bias correction raises the cosine to the
    # original, 0.986 -> 0.989, but moves 6 of the 540 test images the wrong way)
    assert accuracy(result.model) >= accuracy(original) - 0.03


def test_a_very_long_row_is_fitted_on_a_sample_and_every_value_assigned(monkeypatch):
    """One codebook for a tensor over ROW_SAMPLE values: the centroids come from a
    strided sample (close to the full fit), every value gets its nearest centroid, and a
    row's exact zeros keep a zero centroid even when the sample missed them."""
    from onnxopt.passes.codebook import kmeans

    rng = np.random.default_rng(0)
    row = rng.standard_normal((1, 40_000)).astype(np.float32)
    row[0, 1::4000] = 0.0  # ten zeros, none on the stride-4 sample grid
    assert not np.any(row[0, ::4] == 0)
    full = kmeans_1d(row, 16)
    monkeypatch.setattr(kmeans, "ROW_SAMPLE", 10_000)
    sampled = kmeans_1d(row, 16)
    assert sampled.indices.shape == row.shape
    assert 0.0 in sampled.centroids[0]
    zero = int(np.flatnonzero(sampled.centroids[0] == 0)[0])
    assert np.all(sampled.indices[0, row[0] == 0] == zero)
    nearest = np.abs(row[0][:, None] - sampled.centroids[0][None, :]).argmin(axis=1)
    picked = sampled.centroids[0][sampled.indices[0]]
    assert np.allclose(np.abs(picked - row[0]), np.abs(sampled.centroids[0][nearest] - row[0]))

    def mse(book):
        return float(np.mean((book.centroids[0][book.indices[0]] - row[0]) ** 2))

    assert mse(sampled) <= 1.02 * mse(full)
