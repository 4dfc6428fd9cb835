"""``onnxopt tune`` benchmarks: the digits target, worker scaling, and the zoo fronts.

Three parts (all by default; pick with ``--parts``):

- ``digits``: ``tune models/digits_cnn.onnx --data digits_train.npz --budget
  "top1>=0.99" --trials 12`` with the default (model-derived) space and 2 workers.
  Every Pareto point is then checked on the **held-back** digits
  (``digits_test.npz``, 540 images the search never saw): top-1 agreement with the
  original (the budget) and accuracy against the labels.
- ``scaling``: the same search with 1 and with 2 local workers, each in a fresh
  output folder (no cache), **interleaved** (1, 2, 2, 1, ... ``--repeats`` pairs):
  wall times, medians and the ratio 2 workers / 1 worker. The machine is small
  (2 cores) and shared, so the figure is a ratio measured in one run.
- ``zoo``: the Pareto front of real exports (``tools/fetch_zoo.py``; inputs from
  ``tools/zoo_data.py``), PP-OCR cls and MiniLM by default: search on the calibration
  file with the default budget, then every point measured on the evaluation file
  (held back): worst-output SQNR, cosine and the task metric of ``bench_zoo.py``.
  ``--png DIR`` also saves a headless-Chromium screenshot of each ``pareto.html``.

    python tools/bench_tune.py                                   # everything
    python tools/bench_tune.py --parts digits,scaling --repeats 2
    python tools/bench_tune.py --parts zoo --models ppocr-cls,minilm --trials 12 --png docs/img \
        --space minilm=tools/tune_spaces/quick.toml
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TRAIN = ROOT / "models" / "digits_train.npz"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_BUDGET = "top1>=0.99"
# zoo budgets: the default lossy budget, except for MiniLM, an embedding model whose
# [N, C] outputs are not class scores (top-1 of an embedding means nothing)
ZOO_BUDGETS = {"minilm": "cosine>=0.99,nonfinite<=0"}


def _tune(model, outdir, **kwargs):
    from onnxopt.tune import tune

    start = time.perf_counter()
    result = tune(model, outdir, **kwargs)
    return result.outcomes[0].pareto, time.perf_counter() - start


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnx

    from onnxopt.runtime import make_session

    session = make_session(onnx.load(str(path)))
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def part_digits(args, work: Path) -> dict:
    pareto, seconds = _tune(
        DIGITS,
        work / "digits",
        data=DIGITS_TRAIN,
        budget=DIGITS_BUDGET,
        trials=12,
        seed=args.seed,
        workers=2,
    )
    with np.load(DIGITS_TEST) as data:
        images, labels = data["input"], data["label"]
    reference = _logits(DIGITS, images).argmax(1)
    original = pareto["original"]["size_bytes"]
    rows = []
    for point in pareto["points"]:
        predicted = _logits(work / "digits" / point["model"], images).argmax(1)
        rows.append(
            {
                "trial": point["trial"],
                "pipeline": point["pipeline"],
                "size_bytes": point["size_bytes"],
                "x_fp32": round(point["size_bytes"] / original, 3),
                "sqnr_val": point["fidelity"],
                "top1_agreement_heldback": round(float(np.mean(predicted == reference)), 4),
                "accuracy_heldback": round(float(np.mean(predicted == labels)), 4),
            }
        )
    print(
        f"\n### digits CNN: {len(rows)} Pareto points, {len(pareto['trials'])} trials, "
        f"{seconds:.0f} s (2 workers)\n"
    )
    print(
        f"fp32: {original:,} bytes, held-back accuracy {float(np.mean(reference == labels)):.4f}\n"
    )
    print(
        "| trial | pipeline | bytes | × fp32 | SQNR dB (val) | top-1 agreement (held back) "
        "| accuracy (held back) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trial']} | `{r['pipeline']}` | {r['size_bytes']:,} | {r['x_fp32']} | "
            f"{_f(r['sqnr_val'])} | {r['top1_agreement_heldback']} | {r['accuracy_heldback']} |"
        )
    smallest = min(rows, key=lambda r: r["size_bytes"]) if rows else None
    verdict = {
        "points>=3": len(rows) >= 3,
        "smallest<=0.5x": bool(smallest and smallest["x_fp32"] <= 0.5),
        "smallest holds budget held back": bool(
            smallest and smallest["top1_agreement_heldback"] >= 0.99
        ),
    }
    print(f"\ntargets: {verdict}")
    return {"points": rows, "trials": len(pareto["trials"]), "seconds": seconds, **verdict}


def part_scaling(args, work: Path) -> dict:
    order = []
    for _ in range(args.repeats):
        order += [1, 2] if len(order) % 4 == 0 else [2, 1]
    times: dict[int, list[float]] = {1: [], 2: []}
    fronts: dict[int, list] = {1: [], 2: []}
    for i, workers in enumerate(order):
        outdir = work / f"scaling-{i}-w{workers}"
        pareto, seconds = _tune(
            DIGITS,
            outdir,
            data=DIGITS_TRAIN,
            budget=DIGITS_BUDGET,
            trials=args.scaling_trials,
            seed=args.seed,
            workers=workers,
        )
        times[workers].append(seconds)
        fronts[workers].append([(p["pipeline"], p["size_bytes"]) for p in pareto["points"]])
        print(f"run {i + 1}/{len(order)}: {workers} worker(s) {seconds:6.1f} s", flush=True)
        shutil.rmtree(outdir, ignore_errors=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    same = all(f == fronts[1][0] for f in fronts[1] + fronts[2])
    print(f"\n### scaling: digits CNN, {args.scaling_trials} trials, default space\n")
    print("| workers | wall s (runs) | median s |")
    print("|---|---|---|")
    for w in (1, 2):
        runs = ", ".join(f"{t:.1f}" for t in times[w])
        print(f"| {w} | {runs} | {statistics.median(times[w]):.1f} |")
    print(
        f"\n2 workers / 1 worker = {two / one:.3f} (target <= 0.65); "
        f"same Pareto points in every run: {same}"
    )
    return {"times": times, "ratio": two / one, "same_front": same}


def part_zoo(args, work: Path) -> dict:
    import bench_zoo
    import onnx
    import zoo_data

    out = {}
    for name in args.models.split(","):
        calib, evaluation = zoo_data.ensure([name])[name]
        model = bench_zoo.fetch_zoo.model_path(name)
        budget = ZOO_BUDGETS.get(name)
        space = dict(item.split("=", 1) for item in args.space).get(name)
        pareto, seconds = _tune(
            model,
            work / name,
            data=calib,
            budget=budget,
            space=space,
            trials=args.trials,
            seed=args.seed,
            workers=2,
        )
        feeds = bench_zoo._feeds(evaluation, onnx.load(str(model)))  # the same eval inputs
        rows = []
        for point in pareto["points"]:
            fid = bench_zoo.fidelity(name, str(model), str(work / name / point["model"]), feeds)
            rows.append({**point, "eval": fid})
        original = pareto["original"]
        counts = {}
        for t in pareto["trials"]:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        print(
            f"\n### {name}: {len(rows)} Pareto points of {len(pareto['trials'])} trials "
            f"({counts}), {seconds:.0f} s, 2 workers\n"
        )
        print(
            f"budget: {pareto['budget']}; original: {original['size_bytes']:,} bytes, "
            f"{original['latency_ms']} ms\n"
        )
        print(
            "| trial | pipeline | MB | × orig | latency × orig | SQNR dB (eval) | cosine (eval) "
            "| task metric (eval) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            e = r["eval"]
            print(
                f"| {r['trial']} | `{r['pipeline']}` | {r['size_bytes'] / 2**20:.2f} | "
                f"{r['size_bytes'] / original['size_bytes']:.3f} | {_f(r['latency_ratio'])} | "
                f"{_f(e['sqnr'])} | {e['cosine']:.4f} | {e['task']} {e['task_value']:.3f} |"
            )
        if args.png:
            png = Path(args.png) / f"tune-{name}.png"
            _screenshot(work / name / "pareto.html", png)
            print(f"\nplot: {png}")
        for t in pareto["trials"]:
            if t["status"] != "ok":
                print(f"- trial {t['trial']} {t['status']}: {t['reason'][:150]}")
        out[name] = {"points": rows, "seconds": seconds, "counts": counts, "pareto": pareto}
    return out


def _screenshot(page: Path, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("no chromium: screenshot skipped (tools/install_chromium.sh)", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--window-size=1100,1180",
             f"--screenshot={png}", page.resolve().as_uri()],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip


def _f(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.1f}" if abs(number) >= 10 else f"{number:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="digits,scaling,zoo")
    parser.add_argument("--models", default="ppocr-cls,minilm")
    parser.add_argument("--trials", type=int, default=12, help="zoo trials per model")
    parser.add_argument("--scaling-trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="scaling: pairs of runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", help="folder for the zoo plots' screenshots")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--space", action="append", default=[], metavar="MODEL=FILE", help="zoo: a space file"
    )
    parser.add_argument("--workdir", help="keep outputs (and the trial cache) here")
    args = parser.parse_args(argv)
    import onnxruntime

    print(
        f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    )
    parts = {"digits": part_digits, "scaling": part_scaling, "zoo": part_zoo}
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-tune-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for part in args.parts.split(","):
            results[part] = parts[part](args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
