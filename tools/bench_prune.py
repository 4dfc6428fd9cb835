"""Sparsity vs test accuracy vs size for the sample models (prune-initializers).

Each row runs ``onnxopt.optimize`` on a sample model with one ``prune-initializers``
step (calibration/validation samples from ``models/digits_train.npz``), then measures
top-1 accuracy on the held-out ``models/digits_test.npz`` in onnxruntime. Sizes: the
serialized model with dense weights, its deflate-compressed size (``compressed`` in
the run report: what zeros shrink), and the file written with ``store=sparse``.
Fixed-sparsity rows use ``budget=none`` so that every row is kept and its accuracy
shown; the ``auto`` row searches under the default lossy budget
(``cosine>=0.99,top1>=0.99``).

    python tools/bench_prune.py                 # all three models, ~1-2 minutes
    python tools/bench_prune.py --models mlp    # one model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import onnxopt
import onnxopt.passes.prune  # registers prune-initializers
from onnxopt.model import compressed_size, densify_sparse_initializers
from onnxopt.runtime import make_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"mlp": "digits_mlp", "cnn": "digits_cnn", "transformer": "digits_transformer"}
SETTINGS = [
    # (label, options, budget)
    ("dense", None, None),
    ("0.5, magnitude only", "sparsity=0.5,reconstruct=false", "none"),
    ("0.5", "sparsity=0.5", "none"),
    ("0.7", "sparsity=0.7", "none"),
    ("0.8", "sparsity=0.8", "none"),
    ("0.9", "sparsity=0.9", "none"),
    ("2:4", "pattern=2:4", "none"),
    ("0.7 global", "sparsity=0.7,scope=global", "none"),
    ("auto", "sparsity=auto", None),
]


def accuracy(model: onnx.ModelProto) -> float:
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        images, labels = data["input"], data["label"]
    logits = make_session(model).run(None, {"input": images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def measure(name: str, options: str | None, budget: str | None) -> dict:
    path = ROOT / "models" / f"{name}.onnx"
    start = time.perf_counter()
    if options is None:
        model, sparsity, status = onnx.load(str(path)), 0.0, "-"
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
        if "auto_sparsity" in step["details"]:
            status += f" (s={step['details']['auto_sparsity']:.2f})"
    dense = densify_sparse_initializers(model)
    return {
        "sparsity": sparsity,
        "status": status,
        "accuracy": accuracy(model),
        "size": dense.ByteSize(),
        "deflate": compressed_size(dense),
        "sparse": model.ByteSize(),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    print(
        "| model | prune-initializers | step | eligible sparsity | test accuracy | Δ points "
        "| size (B) | deflate (B) | store=sparse (B) | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in args.models:
        baseline = None
        for label, options, budget in SETTINGS:
            row = measure(MODELS[key], options, budget)
            baseline = row if baseline is None else baseline
            delta = 100 * (row["accuracy"] - baseline["accuracy"])
            print(
                f"| {key} | {label} | {row['status']} | {row['sparsity']:.2f} "
                f"| {100 * row['accuracy']:.2f} % | {delta:+.2f} | {row['size']:,} "
                f"| {row['deflate']:,} | {row['sparse']:,} | {row['seconds']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
