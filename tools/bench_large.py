"""Peak memory and time of `onnxopt optimize` on a model over 2 GB (issue 8's target:
peak RSS under 2.5x the model's size).

Builds the synthetic model with tools/make_large_model.py if it is missing (8 MatMul
layers of 8192 x 8192 float32: 2.0 GiB of external data), then runs each pipeline in
its own process and reads that process's peak RSS from ``wait4``'s rusage.

    python tools/bench_large.py                        # all four pipelines, /tmp/large
    python tools/bench_large.py --only cleanup --folder /data/large
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PIPELINES = {
    "cleanup": "cleanup",
    "prune": "cleanup,prune-initializers(sparsity=0.5,reconstruct=false)",
    "share": "share-weights(bits=4)",
    "int8": "quantize-int8(rounding=nearest)",
}
COMMON = ["--shape", "input=1x8192", "--val-samples", "2", "--calib-samples", "4"]


def run_one(model: Path, pipeline: str, output: Path) -> dict:
    argv = [
        sys.executable, "-m", "onnxopt", "optimize", str(model), "-o", str(output),
        "--passes", pipeline, *COMMON, "--budget", "none", "-q",
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    size = sum(p.stat().st_size for p in output.parent.glob(output.name + "*"))
    return {
        "command": shlex.join(["onnxopt", *argv[3:]]),
        "exit": process.returncode,
        "seconds": seconds,
        "peak": usage.ru_maxrss * 1024,
        "output": size,
        "error": err.strip().splitlines()[-1] if process.returncode and err.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/large"))
    parser.add_argument("--only", nargs="*", choices=sorted(PIPELINES), default=None)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    model = args.folder / "big.onnx"
    if not model.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "make_large_model.py"), str(model)], check=True
        )
    size = sum(p.stat().st_size for p in args.folder.glob("big.onnx*"))
    print(f"model: {model} ({size / 2**30:.2f} GiB with its data file)")
    print(f"{'pipeline':<60} {'time':>8} {'peak RSS':>10} {'ratio':>6} {'output':>10}")
    for key in args.only or PIPELINES:
        output = args.folder / f"out_{key}.onnx"
        row = run_one(model, PIPELINES[key], output)
        print(
            f"{PIPELINES[key]:<60} {row['seconds']:>7.0f}s {row['peak'] / 2**30:>6.2f} GiB "
            f"{row['peak'] / size:>5.2f}x {row['output'] / 2**20:>7.0f} MiB"
            + (f"  FAILED exit {row['exit']}: {row['error']}" if row["exit"] else "")
        )
        for stale in args.folder.glob(output.name + "*"):
            stale.unlink()


if __name__ == "__main__":
    main()
