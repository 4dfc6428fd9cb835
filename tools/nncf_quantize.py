"""Quantize one ONNX model with NNCF (the peer in ``tools/bench_quantize.py``).

Runs in NNCF's own environment (``nncf==3.4.0`` with onnx and onnxruntime; it is
not a dependency of onnxopt), started by the bench as a subprocess:

    /work/venvs/nncf/bin/python tools/nncf_quantize.py MODEL FEEDS.npz OUT.onnx \
        [--preset performance|mixed] [--model-type transformer]

``FEEDS.npz`` holds the calibration samples, one key per sample and input:
``"<index>/<input name>"``. Every sample is used (``subset_size`` = their count).
``--preset`` unset is NNCF's own default (PERFORMANCE, or MIXED for
``model_type=transformer``). Prints one ``RESULT {json}`` line: wall time of
``nncf.quantize`` and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def load_feeds(path: str) -> list[dict]:
    import numpy as np

    samples: dict[int, dict] = {}
    with np.load(path) as arrays:
        for key in arrays.files:
            index, name = key.split("/", 1)
            samples.setdefault(int(index), {})[name] = arrays[key]
    return [samples[i] for i in sorted(samples)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("feeds")
    parser.add_argument("out")
    parser.add_argument("--preset", choices=["performance", "mixed"])
    parser.add_argument("--model-type", choices=["transformer"])
    args = parser.parse_args(argv)

    import nncf
    import onnx

    model = onnx.load(args.model)
    feeds = load_feeds(args.feeds)
    kwargs: dict = {"subset_size": len(feeds)}
    if args.preset:
        kwargs["preset"] = nncf.QuantizationPreset(args.preset)
    if args.model_type:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **kwargs)
    seconds = time.perf_counter() - start
    onnx.save(quantized, args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:  # VmHWM: ru_maxrss starts at the parent's RSS at fork (bench_zoo.peak_rss_mb)
        with open("/proc/self/status") as handle:
            status = handle.read()
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024.0
    except (OSError, IndexError, ValueError):
        pass
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": peak, "nncf": nncf.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
