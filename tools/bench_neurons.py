"""Benchmark remove-neurons: how much it removes on real architectures, how much faster
the result runs, and whether remove-dead-neurons stays lossless.

Sections (``--sections``, default all):

- ``params``: ``remove-neurons(mode=l1,ratio=0.3)`` with ``budget=none`` on every zoo
  model (``tools/fetch_zoo.py``, its calibration data from ``tools/zoo_data.py``),
  every onnx backend ``light`` model (seeded random weights, as
  ``tests/test_neurons_light.py``) and every test architecture
  (``tools/make_arch_models.py``: torchvision ShuffleNet v2 / MobileNet v3 small /
  EfficientNet-B0, ultralytics YOLOv8n, a CRNN with LSTM + GRU, a BERT-style encoder
  exported at opset 14). Per model: parameters before / after, the fraction removed,
  groups pruned / blocked, the step status (the manager's checks: full checker,
  strict shape inference, onnxruntime session + run), a fresh onnxruntime run of the
  saved result, and ``remove-dead-neurons`` with its strict lossless budget (status,
  channels removed, max abs error vs the original).
- ``latency``: ``ratio=0.5`` on YOLOv8n (1x3x320x320) and PP-OCRv4 det
  (1x3x320x320), MiniLM at ratio 0.5 (half its head dimensions and half its FFN
  width) at sequence length 128: onnxruntime, all graph optimizations, 1 thread, batch
  1, interleaved rounds, median ms (``onnxopt.bench.measure_latency``).
- ``digits``: the trained digits models and light SqueezeNet at ratio 0.5 and
  ``mode=dead``, with test accuracy (no fine-tuning) and latency at batch 1 / 256.

    python tools/bench_neurons.py                         # ~35 min on 2 busy shared cores
    python tools/bench_neurons.py --sections latency --rounds 30
    python tools/bench_neurons.py --models yolov8n,ppocr-det --sections params
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

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


def digits_section(rounds: int) -> None:
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
            measured = measure_latency([(label, m) for label, m, _ in rows], feed, rounds=rounds)
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


# ---------------------------------------------------------------------------- real architectures

ARCH_SHAPES = {"bert_tiny_op14": ["input_ids=1x32", "attention_mask=1x32"]}


def _cases(selected: set[str] | None):
    """(name, kind, model or path, data, shapes) for every model of the params section."""
    import fetch_zoo
    import make_arch_models
    import zoo_data
    from test_neurons_light import FAST, LIGHT, SLOW, randomized

    cases = []
    for name in fetch_zoo.ZOO:
        if selected is None or name in selected:
            calib, _ = zoo_data.data_paths(name)
            cases.append((name, "zoo", str(fetch_zoo.model_path(name)), str(calib), None))
    for name in FAST + SLOW:
        if selected is None or name in selected:
            model = randomized(onnx.load(str(LIGHT / f"{name}.onnx")))
            cases.append((name, "light", model, None, None))
    for name in make_arch_models.NAMES:
        path = make_arch_models.arch_path(name)
        if (selected is None or name in selected) and path.exists():
            cases.append((name, "arch", str(path), None, ARCH_SHAPES.get(name)))
        elif selected is None or name in selected:
            print(f"  ({name}: not built; run tools/make_arch_models.py in the tools venv)")
    return cases


def _runs_in_onnxruntime(model: onnx.ModelProto, feed: dict) -> str:
    from onnxopt.runtime import make_session

    try:
        make_session(model).run(None, feed)
    except Exception as exc:  # reported in the table, not raised: this is a bench
        return f"FAILED ({type(exc).__name__})"
    return "ok"


def params_section(selected: set[str] | None) -> None:
    from onnxopt.data import prepare_samples

    header = (
        f"{'model':<20} {'kind':<5} {'params':>11} {'after':>11} {'removed':>8} "
        f"{'pruned/blocked':>14} {'status':>9} {'ort':>4} | {'dead-neurons':<26}"
    )
    print(header)
    print("-" * len(header))
    for name, kind, model, data, shapes in _cases(selected):
        result = onnxopt.optimize(
            model, "remove-neurons(mode=l1,ratio=0.3)", data=data, budget="none", shapes=shapes
        )
        (step,) = result.steps
        counts = step["counts"]
        before, after = counts.get("params_before", 0), counts.get("params_after", 0)
        source = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
        samples = prepare_samples(source, data, shapes=shapes, calibration_samples=0,
                                  validation_samples=1, seed=0)  # fmt: skip
        ort = _runs_in_onnxruntime(result.model, samples.validation[0])
        dead = onnxopt.optimize(model, "remove-dead-neurons", data=data, shapes=shapes)
        (dead_step,) = dead.steps
        error = dead_step["worst_vs_original"].get("max_abs")
        dead_cell = (
            f"{dead_step['status']} ({dead_step['counts'].get('channels_removed', 0)} ch"
            + (f", {error:.1e}" if error is not None else "")
            + ")"
        )
        removed = 1 - after / before if before else 0.0
        groups = f"{counts.get('groups_pruned', 0)}/{counts.get('groups_blocked', 0)}"
        print(
            f"{name:<20} {kind:<5} {before:>11,} {after:>11,} {removed:>7.1%} {groups:>14} "
            f"{step['status']:>9} {ort:>4} | {dead_cell:<26}"
        )
        sys.stdout.flush()
        for reason, count in list(step["details"].get("blocked_reasons", {}).items())[:3]:
            print(f"{'':<27}blocked x{count}: {reason[:110]}")


LATENCY = [
    ("yolov8n", "arch", "remove-neurons(mode=l1,ratio=0.5)", {"images": (1, 3, 320, 320)}),
    ("ppocr-det", "zoo", "remove-neurons(mode=l1,ratio=0.5)", {"x": (1, 3, 320, 320)}),
    ("minilm", "zoo", "remove-neurons(mode=l1,ratio=0.5)",
     {"input_ids": (1, 128), "attention_mask": (1, 128)}),
]  # fmt: skip


def _latency_feed(shapes: dict) -> dict:
    rng = np.random.default_rng(0)
    feed = {}
    for key, shape in shapes.items():
        if key == "input_ids":
            feed[key] = rng.integers(1000, 20000, shape, dtype=np.int64)
        elif key == "attention_mask":
            feed[key] = np.ones(shape, dtype=np.int64)
        else:
            feed[key] = rng.random(shape, dtype=np.float32)
    return feed


def latency_section(selected: set[str] | None, rounds: int) -> None:
    import fetch_zoo
    import make_arch_models

    header = (
        f"{'model':<10} {'pipeline':<36} {'input':<16} {'params':>17} {'MACs kept':>9} "
        f"{'ms':>15} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, kind, pipeline, shapes in LATENCY:
        if selected is not None and name not in selected:
            continue
        path = fetch_zoo.model_path(name) if kind == "zoo" else make_arch_models.arch_path(name)
        if not path.exists():
            print(f"{name}: {path} missing")
            continue
        model = onnx.load(str(path))
        feed = _latency_feed(shapes)
        spec = [f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()]
        result = onnxopt.optimize(model, pipeline, budget="none", shapes=spec, data=[feed])
        (step,) = result.steps
        counts = step["counts"]
        timings = measure_latency([("original", model), ("pruned", result.model)], feed,
                                  rounds=rounds)  # fmt: skip
        original, pruned = timings
        macs = counts["macs_after"] / max(counts["macs_before"], 1)
        shape = "x".join(map(str, next(iter(shapes.values()))))
        params = f"{counts['params_before'] / 1e6:.2f}M->{counts['params_after'] / 1e6:.2f}M"
        print(
            f"{name:<10} {pipeline:<36} {shape:<16} {params:>17} {macs:>9.2f} "
            f"{original.median_ms:6.1f}->{pruned.median_ms:6.1f} {pruned.ratio:>6.2f}"
        )
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sections", default="params,latency,digits")
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    selected = set(args.models.split(",")) if args.models else None
    sections = args.sections.split(",")
    import platform

    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, {platform.machine()}, {os.cpu_count()} cores")
    if "params" in sections:
        print("\n== remove-neurons(mode=l1,ratio=0.3), budget none; remove-dead-neurons lossless")
        params_section(selected)
    if "latency" in sections:
        print("\n== latency: batch 1, 1 thread, interleaved medians")
        latency_section(selected, args.rounds)
    if "digits" in sections:
        print("\n== digits models and light SqueezeNet")
        digits_section(args.rounds)


def onnxopt_params(model: onnx.ModelProto) -> int:
    from onnxopt.graph import param_count, to_graph

    return param_count(to_graph(model))


def onnxopt_macs(model: onnx.ModelProto) -> int:
    from onnxopt.graph import to_graph
    from onnxopt.passes.neurons.macs import count_macs

    return count_macs(to_graph(model))


if __name__ == "__main__":
    main()
