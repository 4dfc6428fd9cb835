"""share-weights on pruned weights: the sparse index stream and the BatchNorm fold that
runs first (passes/codebook/sparse.py, ShareWeightsPass.requires)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from test_codebook_calibrated import CONV, CONV_BN, folded, rebuilt, share, with_initializers

import onnxopt
from onnxopt.passes.codebook import sparse
from onnxopt.passes.codebook.kmeans import pack_uint4


def sparse_indices(rng, size: int, zeros: float) -> np.ndarray:
    flat = rng.integers(1, 16, size).astype(np.uint8)
    flat[rng.random(size) < zeros] = 0
    return flat


@pytest.mark.parametrize("zeros", [0.0, 0.8, 0.97, 1.0])
def test_stream_round_trips_runs_of_every_length(zeros):
    rng = np.random.default_rng(0)
    flat = sparse_indices(rng, 5000, zeros)
    flat[:40] = 0  # a leading run longer than 16 (escapes), and a trailing one
    flat[-37:] = 0
    stream = sparse.encode(flat)
    assert stream.size == sparse.stream_bytes(flat)
    assert np.array_equal(sparse.decode(stream, flat.size), flat)


def test_stream_deflates_smaller_than_packed_nibbles_at_80_percent_zeros():
    rng = np.random.default_rng(1)
    flat = sparse_indices(rng, 100_000, 0.8)
    packed = pack_uint4(flat, "w").raw_data
    stream = sparse.encode(flat).tobytes()
    assert len(zlib.compress(stream, 9)) < 0.85 * len(zlib.compress(packed, 9))
    assert sparse.worth_it(flat, 4, 21) and not sparse.worth_it(flat, 4, 10)
    assert not sparse.worth_it(sparse_indices(rng, 1000, 0.5), 4, 21)


def pruned(rng, shape, zeros=0.85) -> np.ndarray:
    weight = rng.standard_normal(shape).astype(np.float32)
    weight[rng.random(shape) < zeros] = 0.0
    return weight


def test_pruned_weights_share_one_stream_that_onnxruntime_folds(tmp_path):
    rng = np.random.default_rng(2)
    text = CONV.replace("y = Relu (c)", "d = Conv <pads = [1, 1, 1, 1]> (c, w2)\n  y = Relu (d)")
    text = text.replace("(float[N, 32, 8, 8] y)", "(float[N, 24, 8, 8] y)")
    model = with_initializers(text, w=pruned(rng, (32, 16, 3, 3)), w2=pruned(rng, (24, 32, 3, 3)))
    out, result = share(model, bits=4, scope="weights", upgrade_opset=False)
    tensors = {r["tensor"]: r for r in result.details["tensors"]}
    assert tensors["w"]["index_stream"] and tensors["w2"]["index_stream"]
    assert tensors["w"]["indices"] == tensors["w2"]["indices"]  # one stream
    ops = [node.op_type for node in out.graph.node]
    assert ops.count("ScatterElements") == 1 and "Split" in ops
    feed = {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)}
    run_weights = rebuilt(out, ["w", "w2"], feed)
    at_load = folded(out, tmp_path)  # nothing of the decoder is left after loading
    for name in ("w", "w2"):
        assert np.array_equal(at_load[name], run_weights[name])
        weight = {t.name: t for t in model.graph.initializer}[name]
        values = np.frombuffer(weight.raw_data, np.float32).reshape(weight.dims)
        assert np.all(run_weights[name][values == 0] == 0)  # zeros stay exact
        error = (run_weights[name].astype(np.float64) - values) ** 2
        assert tensors[name]["mse"] == pytest.approx(float(error.mean()), rel=1e-9)


def test_dense_weights_keep_packed_indices():
    rng = np.random.default_rng(3)
    model = with_initializers(CONV, w=rng.standard_normal((32, 16, 3, 3)).astype(np.float32))
    out, result = share(model, bits=4, scope="weights", upgrade_opset=False)
    (record,) = result.details["tensors"]
    assert not record["index_stream"]
    assert "ScatterElements" not in {node.op_type for node in out.graph.node}


def test_batchnorm_is_folded_first_as_a_checked_lossless_step(tmp_path):
    rng = np.random.default_rng(4)
    model = with_initializers(
        CONV_BN,
        w=rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        scale=rng.uniform(0.5, 2, 32).astype(np.float32),
        shift=rng.standard_normal(32).astype(np.float32),
        mean=rng.standard_normal(32).astype(np.float32) * 0.1,
        var=rng.uniform(0.5, 2, 32).astype(np.float32),
    )
    feeds = {"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)}
    np.savez(tmp_path / "d.npz", **feeds)
    result = onnxopt.optimize(model, "share-weights(bits=4)", data=str(tmp_path / "d.npz"))
    (step,) = result.steps
    done = [(p["step"], p["status"]) for p in step["prerequisites"]]
    assert done[0] == ("fold-batchnorm", "accepted")
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}
    kept = onnxopt.optimize(
        model, "share-weights(bits=4,fold_batchnorm=false)", data=str(tmp_path / "d.npz")
    )
    assert not [p for p in kept.steps[0]["prerequisites"] if p["step"] == "fold-batchnorm"]
    assert "BatchNormalization" in {n.op_type for n in kept.model.graph.node}
