"""Benchmark share-weights: file size, deflate size, accuracy and k-means time.

Usage: ``python tools/bench_codebook.py`` (70-90 s on 2 cores). Prints markdown:

1. the sample models through several ``share-weights`` pipelines (defaults and the
   alternatives they were chosen over) — file size as a fraction of the fp32 file (the
   issue's acceptance: <= 0.2), deflate-compressed size as a ratio *fp32 / result*
   (higher is smaller), digits test accuracy before -> after, worst cosine vs the
   original on the validation samples, and the k-means time the pass reported;
2. the same after 80 % pruning: ``prune-initializers(sparsity=0.8)`` (per layer and
   ``scope=global``) when that pass exists, else one-shot global magnitude pruning done
   here with numpy; ratios are always against the dense fp32 model;
3. a 10 M-weight MatMul (dense, and with 80 % zeros): k-means time, size ratios vs the
   dense fp32 model, onnxruntime session-build time (the Gather is folded at load) and
   inference latency (interleaved medians, ``onnxopt.bench.measure_latency``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

import onnxopt
import onnxopt.passes.codebook  # registers share-weights
import onnxopt.passes.compact  # registers compact
from onnxopt.bench import measure_latency
from onnxopt.graph import to_graph, to_model, weight_refs
from onnxopt.model import compressed_size
from onnxopt.runtime import make_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TRAIN = str(MODELS / "digits_train.npz")
PIPELINES = [
    "share-weights(bits=4)",
    "share-weights(bits=4),compact",
    "share-weights(bits=4,scope=weights)",
    "share-weights(bits=4,scope=weights),compact",
    "share-weights(bits=4,init=linear)",
    "share-weights(bits=4,init=density)",
    "share-weights(bits=4,upgrade_opset=false)",
    "share-weights(bits=4,granularity=channel)",
    "share-weights(bits=8)",
    "share-weights(bits=8,init=density)",
    "compact",
]
PRUNED_SHARE = [
    "share-weights(bits=4)",
    "share-weights(bits=4,index_dtype=uint8)",
    "share-weights(bits=4),compact",
    "share-weights(bits=4,init=linear,pool_bits=5),compact",
]


def accuracy(model: onnx.ModelProto) -> float:
    with np.load(MODELS / "digits_test.npz") as data:
        images, labels = data["input"], data["label"]
    logits = make_session(model).run(None, {"input": images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def global_prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """Zero the smallest ``sparsity`` fraction of all weights together (not biases)."""
    graph = to_graph(model)
    tensors = {id(r.tensor): r.tensor for r in weight_refs(graph) if r.role != "bias"}
    magnitudes = np.sort(np.concatenate([np.abs(t.values).ravel() for t in tensors.values()]))
    cut = magnitudes[int(sparsity * magnitudes.size) - 1]
    for tensor in tensors.values():
        values = tensor.values
        tensor.values = np.where(np.abs(values) <= cut, 0, values).astype(values.dtype)
    return to_model(graph, model)


def pruned_starts(model: onnx.ModelProto) -> list[tuple[str, onnx.ModelProto, str]]:
    """(label, model to start from, pipeline prefix) for the pruned rows."""
    try:
        import onnxopt.passes.prune  # noqa: F401  (registers prune-initializers)
    except ImportError:
        return [("numpy global prune 80 %", global_prune(model, 0.8), "")]
    global_step = "prune-initializers(sparsity=0.8,scope=global)"
    return [(global_step, model, global_step + ",")]


def row(name, label, original, start, pipeline) -> str:
    result = onnxopt.optimize(start, pipeline, data=TRAIN, budget="none")
    model = result.model
    step = result.steps[-1]
    seconds = sum(s["details"].get("kmeans_seconds", 0) or 0 for s in result.steps)
    cosine = step["worst_vs_original"].get("cosine", 1.0)  # a no-op step is not measured
    return (
        f"| {name} | `{label}` | {model.ByteSize() / original.ByteSize():.3f} "
        f"| {compressed_size(original) / compressed_size(model):.2f}x "
        f"| {accuracy(original):.2%} -> {accuracy(model):.2%} "
        f"| {cosine:.5f} | {seconds:.3f} | {', '.join(s['status'] for s in result.steps)} |"
    )


def sample_table() -> None:
    print(
        "| model | pipeline | file (x fp32) | deflate ratio | accuracy | cosine | k-means s "
        "| steps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("digits_mlp", "digits_cnn", "digits_transformer"):
        original = onnx.load(str(MODELS / f"{name}.onnx"))
        for pipeline in PIPELINES:
            print(row(name, pipeline, original, original, pipeline), flush=True)
        for label, start, prefix in pruned_starts(original):
            for share in PRUNED_SHARE if name == "digits_mlp" else PRUNED_SHARE[:1]:
                pipeline = prefix + share
                print(row(name, f"{label},{share}", original, start, pipeline), flush=True)
            if name == "digits_mlp" and prefix:  # the pipeline: per-layer pruning
                pipeline = f"prune-initializers(sparsity=0.8),{PRUNED_SHARE[0]}"
                print(row(name, pipeline, original, original, pipeline), flush=True)


def big_model(rows: int, cols: int, sparsity: float = 0.0) -> onnx.ModelProto:
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, {rows}] x) => (float[1, {cols}] y) {{ y = MatMul(x, w) }}
    """
    model = onnx.parser.parse_model(text)
    weights = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32) * 0.05
    if sparsity:
        cut = np.quantile(np.abs(weights), sparsity)
        weights[np.abs(weights) <= cut] = 0
    model.graph.initializer.append(numpy_helper.from_array(weights, "w"))
    return model


def build_seconds(model: onnx.ModelProto, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        make_session(model, optimize=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def big_table(rows: int, cols: int) -> None:
    count = rows * cols
    print(f"\n{count / 1e6:.0f} M-weight MatMul ([{rows}, {cols}], N(0, 0.05^2) weights)\n")
    print(
        "| weights | pipeline | k-means s | size ratio | deflate ratio "
        "| session build s (fp32 -> shared) | latency ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    dense = big_model(rows, cols)
    dense_size, dense_deflated = dense.ByteSize(), compressed_size(dense)
    dense_build = build_seconds(dense)
    feed = {"x": np.random.default_rng(1).standard_normal((1, rows)).astype(np.float32)}
    cases = [
        ("dense", 0.0, "share-weights(bits=4)"),
        ("dense", 0.0, "share-weights(bits=4,init=linear)"),
        ("dense", 0.0, "share-weights(bits=4,granularity=channel)"),
        ("dense", 0.0, "share-weights(bits=8)"),
        ("80 % zeros", 0.8, "share-weights(bits=4)"),
    ]
    for label, sparsity, pipeline in cases:
        start = big_model(rows, cols, sparsity) if sparsity else dense
        result = onnxopt.optimize(
            start, pipeline, budget="none", validation_samples=2, calibration_samples=0
        )
        model = result.model
        details = result.steps[0]["details"]
        timing = measure_latency(
            [("fp32", dense), ("shared", model)], feed, rounds=10, runs_per_round=5
        )
        print(
            f"| {label} | `{pipeline}` | {details['kmeans_seconds']:.2f} "
            f"| {dense_size / model.ByteSize():.2f}x "
            f"| {dense_deflated / compressed_size(model):.2f}x "
            f"| {dense_build:.2f} -> {build_seconds(model):.2f} "
            f"| {timing[1].ratio:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", default="2500x4000", help="rows x cols of the big MatMul")
    parser.add_argument("--skip-samples", action="store_true")
    args = parser.parse_args()
    if not args.skip_samples:
        sample_table()
    rows, cols = (int(v) for v in args.big.lower().split("x"))
    big_table(rows, cols)


if __name__ == "__main__":
    main()
