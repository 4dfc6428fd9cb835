"""Benchmark share-weights: file size, deflate size, accuracy and k-means time.

Usage: ``python tools/bench_codebook.py`` (digits + 10 M MatMul, 70-90 s on 2 cores);
``--zoo`` adds the real models (``tools/fetch_zoo.py``; several minutes);
``--only zoo`` runs that table alone, ``--pipelines 'A;B'`` only those of its pipelines;
``--big 0`` leaves out the 10 M MatMul. Prints markdown:

0. (``--zoo``) the zoo models through ``share-weights`` pipelines, with the zoo's
   calibration file as ``--data`` and the evaluation file (never seen by the pass) for
   the figures: file and deflated size vs fp32, worst-output cosine and the task metric
   (``tools/bench_zoo.py``'s), each step's status, wall time of the ``optimize`` call;

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
import sys
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
from onnxopt.runtime import make_session
from onnxopt.wire import compressed_size

ROOT = Path(__file__).resolve().parent.parent
ZOO_MODELS = ("ppocr-cls", "ppocr-det", "ppocr-rec", "vad", "vad-if", "minilm")
ZOO_PIPELINES = [
    ("share-weights(bits=4)", "none"),
    ("share-weights(bits=4,feedback=false)", "none"),
    ("share-weights(bits=4,calibrate=false)", "none"),
    ("share-weights(bits=4,granularity=tensor,pool_bits=8,calibrate=false)", "none"),
    ("share-weights(bits=8)", "none"),
    ("share-weights(bits=auto)", None),
]
CLS_PRUNED = [
    ("prune-initializers(sparsity=0.8),share-weights(bits=4)", "none"),
    ("fold-batchnorm,prune-initializers(sparsity=0.8),share-weights(bits=4)", "none"),
    ("prune-initializers(sparsity=0.8),share-weights(bits=4),distill", "none"),
]
MODELS = ROOT / "models"
TRAIN = str(MODELS / "digits_train.npz")
PIPELINES = [
    "share-weights(bits=4)",
    "share-weights(bits=4),compact",
    "share-weights(bits=4,feedback=false)",
    "share-weights(bits=4,calibrate=false)",
    "share-weights(bits=4,granularity=tensor,pool_bits=8,calibrate=false)",
    "share-weights(bits=4,upgrade_opset=false)",
    "share-weights(bits=8)",
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


def zoo_row(name: str, source: Path, data, pipeline: str, budget: str | None, tmp) -> str:
    import bench_zoo

    calib, evaluation = data
    started = time.perf_counter()
    try:
        result = onnxopt.optimize(str(source), pipeline, data=str(calib), budget=budget)
    except Exception as exc:  # a pipeline that cannot run here is a row, not a crash
        return f"| {name} | `{pipeline}` | {budget or 'default'} | error: {exc} | | | | | |"
    wall = time.perf_counter() - started
    out = Path(tmp) / f"{name}.onnx"
    result.save(out)
    fp32 = onnx.load(str(source), load_external_data=False)
    feeds = bench_zoo._feeds(Path(evaluation), fp32)
    quality = bench_zoo.fidelity(name, str(source), str(out), feeds)
    size = out.stat().st_size / source.stat().st_size
    deflate = bench_zoo._deflated(source) / bench_zoo._deflated(out)
    steps = "; ".join(
        s["status"] + (f" ({s['reason'][:60]})" if s["status"] != "accepted" else "")
        for s in result.steps
    )
    return (
        f"| {name} | `{pipeline}` | {budget or 'default'} | {size:.3f} | {deflate:.2f}x "
        f"| {quality['cosine']:.4f} | {quality['task']} {quality['task_value']:.3f} "
        f"| {wall:.1f} | {steps} |"
    )


def zoo_table(models: list[str], chosen: list[str] | None = None) -> None:
    import tempfile

    sys.path.insert(0, str(ROOT / "tools"))
    import fetch_zoo
    import zoo_data

    paths, data = fetch_zoo.ensure(models), zoo_data.ensure(models)
    print(
        "| model | pipeline | budget | file (x fp32) | deflate ratio | worst cosine (eval) "
        "| task metric (eval) | wall s | steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-codebook-") as tmp:
        for name in models:
            pipelines = ZOO_PIPELINES + (CLS_PRUNED if name == "ppocr-cls" else [])
            if chosen is not None:
                pipelines = [(p, b) for p, b in pipelines if p in chosen]
            for pipeline, budget in pipelines:
                print(zoo_row(name, paths[name], data[name], pipeline, budget, tmp), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--big", default="2500x4000", help="rows x cols of the big MatMul (0: no such table)"
    )
    parser.add_argument("--skip-samples", action="store_true")
    parser.add_argument("--zoo", action="store_true", help="also the real models")
    parser.add_argument("--only", choices=("zoo",), help="run one table alone")
    parser.add_argument("--models", default=",".join(ZOO_MODELS), help="zoo models")
    parser.add_argument(
        "--pipelines", help="zoo pipelines to run, ';'-separated (default: all of them)"
    )
    args = parser.parse_args()
    if args.zoo or args.only == "zoo":
        chosen = args.pipelines.split(";") if args.pipelines else None
        zoo_table(args.models.split(","), chosen)
    if args.only:
        return
    if not args.skip_samples:
        sample_table()
    if args.big != "0":
        rows, cols = (int(v) for v in args.big.lower().split("x"))
        big_table(rows, cols)


if __name__ == "__main__":
    main()
