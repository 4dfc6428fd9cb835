"""prune-initializers: fidelity, time and size, on the zoo and on the digits models.

**Zoo** (``tools/fetch_zoo.py`` models, ``tools/zoo_data.py`` calibration/evaluation
inputs). Per model, in one run, one fresh process per cell running ``onnxopt.optimize``
with one ``prune-initializers`` step at ``budget=none`` (so every cell is shown),
interleaved with onnxruntime's ``quantize_static`` (the cost anchor, as in
``tools/bench_zoo.py``): the anchor runs before the first cell and after every cell,
and a cell's ratio is its wall time over the mean of the anchors just before and after
it. A cell reports the wall time of the whole ``optimize`` call + save, that ratio and
the target ``<= 3 x anchor + 15 s``, peak RSS, and fidelity on the evaluation file
(never seen by the pass): worst-output SQNR and cosine against the original, and the
model's task metric (``tools/bench_zoo.py``). The anchor row gives the median anchor
and the 1-minute load average after the model's cells. Cells:

- ``default``: ``prune-initializers(sparsity=0.5)`` (SparseGPT);
- ``magnitude``: ``method=magnitude`` — plain per-tensor magnitude pruning, the
  baseline the default's SQNR gain is measured against;
- ``wanda``: ``method=wanda``;
- ``magnitude + refit``: ``method=magnitude,reconstruct=true`` — the previous
  default's objective (magnitude mask, kept weights refitted by least squares) solved
  by the new code;
- ``old default (--vs)``: with ``--vs PYTHON``, the default run by another
  interpreter's onnxopt (a venv of the checkout before ``passes/prune/``), at most
  ``OLD_TIMEOUT`` seconds;
- ``2:4``, ``2:4 wanda``, ``2:4 magnitude`` (``--patterns``, on by default for minilm).

**Digits** (``models/digits_*.onnx``): test accuracy on the held-out
``models/digits_test.npz`` (540 images) for several settings, sizes (dense, deflate,
``store=sparse``).

    python tools/bench_prune.py                           # zoo + digits
    python tools/bench_prune.py --models ppocr-rec,minilm # some models
    python tools/bench_prune.py --models ppocr-cls --vs /work/venvs/prune-old/bin/python
    python tools/bench_prune.py --models cnn --digits-settings all
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_zoo  # noqa: E402
import fetch_zoo  # noqa: E402
import zoo_data  # noqa: E402

ROOT = HERE.parent
DIGITS = {"mlp": "digits_mlp", "cnn": "digits_cnn", "transformer": "digits_transformer"}
ZOO = ("ppocr-cls", "ppocr-det", "ppocr-rec", "vad", "minilm")
ZOO_CELLS = {
    "default": "prune-initializers(sparsity=0.5)",
    "magnitude": "prune-initializers(sparsity=0.5,method=magnitude)",
    "wanda": "prune-initializers(sparsity=0.5,method=wanda)",
    "magnitude + refit": "prune-initializers(sparsity=0.5,method=magnitude,reconstruct=true)",
}
OLD_CELL = "old default (--vs)"
OLD_TIMEOUT = 900.0  # seconds: the old per-row refit did not finish PP-OCRv4 rec in 15 min
PATTERN_CELLS = {
    "2:4": "prune-initializers(pattern=2:4)",
    "2:4 wanda": "prune-initializers(pattern=2:4,method=wanda)",
    "2:4 magnitude": "prune-initializers(pattern=2:4,method=magnitude)",
}
DIGITS_SETTINGS = [
    # (label, options, budget)
    ("dense", None, None),
    ("0.5 magnitude", "sparsity=0.5,method=magnitude", "none"),
    ("0.5 wanda", "sparsity=0.5,method=wanda", "none"),
    ("0.5 (default: sparsegpt)", "sparsity=0.5", "none"),
    ("0.7", "sparsity=0.7", "none"),
    ("0.8", "sparsity=0.8", "none"),
    ("0.9", "sparsity=0.9", "none"),
    ("2:4", "pattern=2:4", "none"),
    ("0.7 global", "sparsity=0.7,scope=global", "none"),
    ("auto", "sparsity=auto", None),
]


# ----------------------------------------------------------------------------- zoo


def zoo_rows(models: list[str], patterns: set[str], timeout: float, vs: str | None) -> list[str]:
    paths = fetch_zoo.ensure(models)
    data = zoo_data.ensure(models)
    out = []
    header = (
        "| model | cell | time s | × qs | ≤ 3×qs+15 | peak RSS MB | SQNR dB | Δ vs magnitude "
        "| cosine | task metric |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-prune-") as tmp:
        for model in models:
            calib, evaluation = data[model]
            base = {"name": model, "model": str(paths[model]), "calib": str(calib)}
            base["eval"] = str(evaluation)
            anchor_spec = dict(base, out=f"{tmp}/qs.onnx")
            anchors = [bench_zoo.run_child("anchor", anchor_spec, timeout).get("wall", np.nan)]
            cells = [(cell, pipeline, None) for cell, pipeline in ZOO_CELLS.items()]
            if model in patterns:
                cells += [(cell, pipeline, None) for cell, pipeline in PATTERN_CELLS.items()]
            if vs:
                cells.append((OLD_CELL, ZOO_CELLS["default"], vs))
            records = {}
            for cell, pipeline, python in cells:
                spec = dict(base, pipeline=pipeline, budget="none", out=f"{tmp}/{model}.onnx")
                limit = timeout if python is None else min(timeout, OLD_TIMEOUT)
                rec = bench_zoo.run_child("onnxopt", spec, limit, python)
                anchor = bench_zoo.run_child("anchor", anchor_spec, timeout)
                anchors.append(anchor.get("wall", np.nan))  # a failed anchor: its neighbour
                records[cell] = dict(rec, anchor=float(np.nanmean(anchors[-2:])))
            load = os.getloadavg()[0]
            line = f"| {model} | quantize_static (anchor) | median {np.nanmedian(anchors):.1f} "
            line += f"of {len(anchors)} | 1.00 | | | | | | load {load:.1f} |"
            print(line, flush=True)
            out.append(line)
            for cell, rec in records.items():
                line = _zoo_line(model, cell, rec, records.get("magnitude"))
                print(line, flush=True)
                out.append(line)
    return out


def _zoo_line(model: str, cell: str, rec: dict, magnitude: dict | None) -> str:
    if "error" in rec:
        return f"| {model} | {cell} | {rec['error']} | | | | | | | |"
    qs = rec["anchor"]
    limit = 3 * qs + 15
    ok = "yes" if rec["wall"] <= limit else "**no**"
    delta = "-"
    if magnitude and "sqnr" in magnitude and cell != "magnitude":
        delta = f"{rec['sqnr'] - magnitude['sqnr']:+.1f}"
    task = f"{rec['task']} {rec['task_value']:.3f}" if rec.get("task") else "-"
    status = [s["status"] for s in rec["steps"]]
    note = "" if status == ["accepted"] else f" ({', '.join(status)})"
    return (
        f"| {model} | {cell}{note} | {rec['wall']:.1f} | {rec['wall'] / qs:.2f} | {ok} | "
        f"{rec['rss_mb']:.0f} | {rec['sqnr']:.2f} | {delta} | {rec['cosine']:.4f} | {task} |"
    )


# ----------------------------------------------------------------------------- digits


def accuracy(model: onnx.ModelProto) -> float:
    from onnxopt.runtime import make_session

    with np.load(ROOT / "models" / "digits_test.npz") as data:
        images, labels = data["input"], data["label"]
    logits = make_session(model).run(None, {"input": images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def measure_digits(name: str, options: str | None, budget: str | None) -> dict:
    import onnxopt
    from onnxopt.model import densify_sparse_initializers
    from onnxopt.wire import compressed_size

    path = ROOT / "models" / f"{name}.onnx"
    start = time.perf_counter()
    if options is None:
        model, sparsity, status, cosine = onnx.load(str(path)), 0.0, "-", 1.0
    else:
        result = onnxopt.optimize(
            path,
            f"prune-initializers({options},store=sparse)",
            data=ROOT / "models" / "digits_train.npz",
            budget=budget,
        )
        step = result.steps[0]
        model, status = result.model, step["status"]
        sparsity = step["counts"].get("eligible_sparsity", 0.0)
        cosine = (step.get("worst_vs_original") or {}).get("cosine", float("nan"))
        if "auto_sparsity" in step["details"]:
            status += f" (s={step['details']['auto_sparsity']:.2f})"
    dense = densify_sparse_initializers(model)
    return {
        "sparsity": sparsity,
        "status": status,
        "accuracy": accuracy(model),
        "cosine": cosine,
        "size": dense.ByteSize(),
        "deflate": compressed_size(dense),
        "sparse": model.ByteSize(),
        "seconds": time.perf_counter() - start,
    }


def digits_rows(keys: list[str], settings: list[tuple]) -> list[str]:
    header = (
        "| model | prune-initializers | step | eligible sparsity | test accuracy | Δ points "
        "| worst cosine | size (B) | deflate (B) | store=sparse (B) | s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(header, flush=True)
    out = []
    for key in keys:
        baseline = None
        for label, options, budget in settings:
            row = measure_digits(DIGITS[key], options, budget)
            baseline = row if baseline is None else baseline
            delta = 100 * (row["accuracy"] - baseline["accuracy"])
            line = (
                f"| {key} | {label} | {row['status']} | {row['sparsity']:.2f} "
                f"| {100 * row['accuracy']:.2f} % | {delta:+.2f} | {row['cosine']:.4f} "
                f"| {row['size']:,} | {row['deflate']:,} | {row['sparse']:,} "
                f"| {row['seconds']:.1f} |"
            )
            print(line, flush=True)
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join([*ZOO, *DIGITS]))
    parser.add_argument("--patterns", default="minilm", help="zoo models that get 2:4 cells")
    parser.add_argument(
        "--digits-settings", choices=["all", "0.5"], default="all", help="digits rows"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per zoo cell")
    parser.add_argument(
        "--vs", metavar="PYTHON", help="also the default with this interpreter's onnxopt (old)"
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in ZOO and m not in DIGITS]
    if unknown:
        print(f"error: unknown models {unknown}; known: {[*ZOO, *DIGITS]}", file=sys.stderr)
        return 2
    import onnxruntime

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}",
        flush=True,
    )
    zoo = [m for m in models if m in ZOO]
    if zoo:
        zoo_rows(zoo, set(args.patterns.split(",")), args.timeout, args.vs)
    digits = [m for m in models if m in DIGITS]
    if digits:
        settings = DIGITS_SETTINGS if args.digits_settings == "all" else DIGITS_SETTINGS[:4]
        digits_rows(digits, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
