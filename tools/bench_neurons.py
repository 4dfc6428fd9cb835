"""Benchmark remove-neurons: parameters, MACs, accuracy and onnxruntime latency.

For each sample model, the original is compared with ``remove-neurons(mode=l1,
ratio=0.5)`` (no fine-tuning, budget ``none``: this measures the structure, not the
accuracy you would keep after retraining) and, where it finds something, with
``remove-neurons(mode=dead)`` on the digits training data. The onnx backend
``light_squeezenet`` (random weights) shows a real topology. Latency: onnxruntime
with full graph optimizations, one thread, interleaved rounds, median ms per run
(``onnxopt.bench.measure_latency``) at batch 1 and batch 256 (squeezenet: batch 1
only, its input is fixed); ratio = pruned / original.

    python tools/bench_neurons.py            # well under a minute
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import onnxopt  # noqa: E402
import onnxopt.passes.neurons  # noqa: E402  (registers the passes)
from onnxopt.bench import measure_latency  # noqa: E402

MODELS = ROOT / "models"
DIGITS = ["digits_mlp", "digits_cnn", "digits_transformer"]
VARIANTS = {
    "l1 ratio=0.5": "remove-neurons(mode=l1,ratio=0.5)",
    "dead (data)": "remove-neurons(mode=dead)",
}


def _accuracy(model: onnx.ModelProto) -> float:
    from onnxopt.runtime import make_session

    with np.load(MODELS / "digits_test.npz") as data:
        images, labels = data["input"], data["label"]
    logits = make_session(model).run(None, {"input": images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _variants(name: str, model: onnx.ModelProto, data) -> list[tuple[str, onnx.ModelProto, dict]]:
    rows = [("original", model, {})]
    for label, pipeline in VARIANTS.items():
        if data is None and "dead" in label:
            continue
        result = onnxopt.optimize(model, pipeline, data=data, budget="none")
        (step,) = result.steps
        if step["status"] != "accepted":
            continue
        rows.append((label, result.model, step["counts"]))
    return rows


def _light_squeezenet() -> onnx.ModelProto:
    from test_neurons_light import LIGHT, randomized

    return randomized(onnx.load(str(LIGHT / "light_squeezenet.onnx")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    data = str(MODELS / "digits_train.npz")
    cases = [(n, onnx.load(str(MODELS / f"{n}.onnx")), data) for n in DIGITS]
    cases.append(("light_squeezenet", _light_squeezenet(), None))
    header = (
        f"{'model':<20} {'variant':<14} {'params':>9} {'MACs':>13} {'acc':>7} "
        f"{'b1 ms':>8} {'ratio':>6} {'b256 ms':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, model, samples in cases:
        rows = _variants(name, model, samples)
        digits = name.startswith("digits")
        batches = (1, 256) if digits else (1,)  # squeezenet's batch is fixed at 1
        timings = {}
        for batch in batches:
            spec = model.graph.input[0].type.tensor_type.shape.dim
            shape = [batch] + [d.dim_value for d in spec[1:]]
            feed = {model.graph.input[0].name: np.random.default_rng(0).random(shape, np.float32)}
            measured = measure_latency(
                [(label, m) for label, m, _ in rows], feed, rounds=args.rounds
            )
            timings[batch] = {t.label: t for t in measured}
        for label, pruned, counts in rows:
            params = counts.get("params_after") or onnxopt_params(pruned)
            macs = counts.get("macs_after") or onnxopt_macs(pruned)
            acc = f"{_accuracy(pruned):.3f}" if digits else "n/a"
            cells = []
            for batch in (1, 256):
                t = timings.get(batch, {}).get(label)
                cells += [f"{t.median_ms:8.3f}", f"{t.ratio:6.2f}"] if t else ["-", "-"]
            print(
                f"{name:<20} {label:<14} {params:>9} {macs:>13} {acc:>7} "
                f"{cells[0]:>8} {cells[1]:>6} {cells[2]:>9} {cells[3]:>6}"
            )
    print("\nsqueezenet: 1x3x224x224 (fixed batch), random weights: accuracy not meaningful.")


def onnxopt_params(model: onnx.ModelProto) -> int:
    from onnxopt.graph import param_count, to_graph

    return param_count(to_graph(model))


def onnxopt_macs(model: onnx.ModelProto) -> int:
    from onnxopt.graph import to_graph
    from onnxopt.passes.neurons.macs import count_macs

    return count_macs(to_graph(model))


if __name__ == "__main__":
    main()
