"""quantize-int4 on the zoo and the digits models, and against onnxruntime's own 4-bit tool.

Two tables, every figure measured in this run:

1. **Whole model** — ``fold-batchnorm,quantize-int4`` with defaults (``budget=none``, so
   the figures show what the pass does; the ``default budget`` column says whether the
   step would have been accepted under the default lossy budget, from its own report)
   on each zoo model (``tools/fetch_zoo.py``, data from ``tools/zoo_data.py``) and each
   digits model: file size ÷ fp32, SQNR (dB) of every output on the evaluation inputs,
   the model's task metric (as ``tools/bench_zoo.py`` defines it; digits: accuracy on
   the test split), quantization wall time, and latency ÷ fp32 (onnxruntime, all graph
   optimizations, 1 thread, models timed interleaved, medians).
2. **MatMul weights vs onnxruntime's MatMulNBitsQuantizer** — on every model with
   constant MatMul weights (MiniLM, PP-OCRv4 rec, the digits transformer), the same
   weights (MatMul only, both tools given the same model, ``Constant`` nodes lifted
   into initializers) at the same block size (128: onnxruntime's default; 32: onnxopt's):
   onnxruntime RTN (``DefaultWeightOnlyQuantConfig``, asymmetric, its default) and HQQ
   (``HQQWeightOnlyQuantConfig``), against ``quantize-int4(op_types=[MatMul],
   block_size=B)``. SQNR of every output, task metric, size, latency ÷ fp32.

onnxruntime's quantizer imports ``onnx_ir`` and HQQ needs torch: the peers run in the
interpreter given by ``--peer-python`` (default ``$ONNXOPT_INT4_PEER_PYTHON``, else this
one); make it once with

    python -m venv /work/venvs/int4-peer
    /work/venvs/int4-peer/bin/pip install onnxruntime==1.32.0 onnx==1.23.2 onnx_ir torch==2.13.0

Every quantization runs in a fresh process with one BLAS thread (``OMP_NUM_THREADS=1``).

    python tools/bench_int4.py                                   # everything
    python tools/bench_int4.py --budget default --no-matmul      # as a user gets it
    python tools/bench_int4.py --models minilm,digits_transformer --no-whole
    python tools/bench_int4.py --keep /tmp/int4 --json int4.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_zoo  # noqa: E402
import fetch_zoo  # noqa: E402
import zoo_data  # noqa: E402

DIGITS = ("digits_cnn", "digits_mlp", "digits_transformer")
WHOLE = "fold-batchnorm,quantize-int4"
BLOCKS = (128, 32)
PEERS = ("ort-rtn", "ort-hqq")
TIMEOUT = 3600.0

PEER_SCRIPT = r"""
import json, sys, time
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)
src, dst, algo, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = onnx.load(src)
config = (HQQWeightOnlyQuantConfig(block_size=block) if algo == "ort-hqq"
          else DefaultWeightOnlyQuantConfig(block_size=block))
start = time.perf_counter()
quantizer = MatMulNBitsQuantizer(model, block_size=block, algo_config=config)
quantizer.process()
quantizer.model.save_model_to_file(dst, use_external_data_format=False)
print("RESULT " + json.dumps({"wall": time.perf_counter() - start}))
"""


# ----------------------------------------------------------------------------- data


def sources(names: list[str]) -> dict[str, dict]:
    """name -> model path, calibration file, evaluation file."""
    zoo = [n for n in names if n in fetch_zoo.ZOO]
    paths = fetch_zoo.ensure(zoo) if zoo else {}
    data = zoo_data.ensure(zoo) if zoo else {}
    out = {}
    for name in names:
        if name in DIGITS:
            models = ROOT / "models"
            out[name] = {
                "model": str(models / f"{name}.onnx"),
                "calib": str(models / "digits_train.npz"),
                "eval": str(models / "digits_test.npz"),
            }
        else:
            calib, evaluation = data[name]
            out[name] = {"model": str(paths[name]), "calib": str(calib), "eval": str(evaluation)}
    return out


def eval_feeds(spec: dict, limit: int) -> list[dict]:
    import onnx

    from onnxopt.data import input_specs, load_samples

    model = onnx.load(spec["model"], load_external_data=False)
    return load_samples(spec["eval"], input_specs(model))[:limit]


# ----------------------------------------------------------------------------- children


def child_onnxopt(spec: dict) -> dict:
    import onnxopt

    budget = {} if spec.get("budget", "none") == "default" else {"budget": spec["budget"]}
    start = time.perf_counter()
    result = onnxopt.optimize(spec["model"], spec["pipeline"], data=spec["calib"], **budget)
    result.save(spec["out"])
    wall = time.perf_counter() - start
    step = result.steps[-1]
    details = step.get("details") or {}
    return {
        "wall": wall,
        "budget": spec.get("budget", "none"),
        "status": step["status"],
        "reason": step.get("reason") or "; ".join(step.get("notes") or []),
        "metrics": step.get("metrics_vs_original") or {},
        "by_bits": details.get("by_bits"),
        "fallback_int8": len((details.get("fallback") or {}).get("int8") or []),
    }


def run_child(argv: list[str], timeout: float = TIMEOUT) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def onnxopt_cell(spec: dict, pipeline: str, out: Path, budget: str = "none") -> dict:
    job = dict(spec, pipeline=pipeline, out=str(out), budget=budget)
    return run_child([sys.executable, __file__, "--child", json.dumps(job)])


def peer_cell(python: str, source: str, algo: str, block: int, out: Path) -> dict:
    return run_child([python, "-c", PEER_SCRIPT, source, str(out), algo, str(block)])


def prepare(spec: dict, out: Path) -> str:
    """The model with ``Constant``-node tensors moved into initializers (lossless), so that
    both tools see the same MatMul weights (onnxruntime's tool reads initializers only)."""
    import onnx

    model = onnx.load(spec["model"])
    kept = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.dims:
            value.name = node.output[0]
            model.graph.initializer.append(value)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(out))
    return str(out)


def has_matmul_weights(path: str) -> bool:
    import onnx

    model = onnx.load(path)
    inits = {t.name: len(t.dims) for t in model.graph.initializer}
    return any(n.op_type == "MatMul" and inits.get(n.input[1]) == 2 for n in model.graph.node)


# ----------------------------------------------------------------------------- figures


def fidelity(name: str, original: str, optimized: str, feeds: list[dict]) -> dict:
    """SQNR of every float output and the task metric, original vs optimized."""
    ref = bench_zoo._run_all(original, feeds)
    got = bench_zoo._run_all(optimized, feeds)
    sqnrs = []
    for k in range(len(ref[0])):
        r = np.concatenate([np.asarray(o[k]).ravel() for o in ref])
        g = np.concatenate([np.asarray(o[k]).ravel() for o in got])
        if np.issubdtype(r.dtype, np.floating):
            sqnrs.append(bench_zoo._sqnr(r, g))
    if name in DIGITS:
        return {"sqnr": sqnrs, "task": "accuracy", "task_value": digits_accuracy(optimized)}
    label, value = bench_zoo.task_metric(name, ref, got)
    return {"sqnr": sqnrs, "task": label, "task_value": value}


def digits_accuracy(path: str) -> float:
    import onnxruntime as ort

    with np.load(ROOT / "models" / "digits_test.npz") as data:
        images, labels = data["input"], data["label"]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def latencies(paths: dict[str, str], feed: dict, budget_s: float) -> dict[str, float]:
    """label -> median ms at 1 thread, all models interleaved (first label = reference)."""
    import onnx

    from onnxopt.bench import measure_latency

    models = [(label, onnx.load(path)) for label, path in paths.items()]
    probe = measure_latency(models[:1], feed, rounds=3, runs_per_round=1, warmup=2)
    per_run = max(probe[0].median_ms / 1000, 1e-5)
    runs = max(1, min(20, int(0.05 / per_run)))
    rounds = max(5, min(40, int(budget_s / (len(models) * per_run * runs))))
    timings = measure_latency(models, feed, threads=(1,), rounds=rounds, runs_per_round=runs)
    return {t.label: t.median_ms for t in timings}


def verdict(rec: dict) -> str:
    """Would the default lossy budget (cosine>=0.99, top1>=0.99) have accepted the step?
    (With ``--budget default`` the manager's own verdict, and how many weights
    ``fallback=auto`` moved to int8.)"""
    if rec.get("status") != "accepted":
        return f"{rec.get('status')}: {rec.get('reason', '')[:90]}"
    if rec.get("budget") == "default":
        moved = rec.get("fallback_int8") or 0
        return f"accepted (fallback: {moved} int8)" if moved else "accepted"
    metrics = rec.get("metrics") or {}
    worst_cos = min((m.get("cosine", 1.0) for m in metrics.values()), default=1.0)
    top1 = [m.get("top1") for m in metrics.values() if m.get("top1") is not None]
    ok = worst_cos >= 0.99 and all(t >= 0.99 for t in top1)
    return "accepted" if ok else f"rolled back (cosine {worst_cos:.4f})"


def _f(v, spec="{:.1f}") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return spec.format(v)


def _sqnrs(values) -> str:
    return " / ".join(_f(v) for v in values)


# ----------------------------------------------------------------------------- parent


def whole_rows(name: str, spec: dict, folder: Path, latency_s: float, budget: str) -> list[dict]:
    out = folder / f"{name}.int4.onnx"
    rec = onnxopt_cell(spec, WHOLE, out, budget)
    row = {"model": name, "kind": "whole", "tool": "onnxopt", **rec}
    if "error" not in rec:
        feeds = eval_feeds(spec, 32)
        row.update(fidelity(name, spec["model"], str(out), feeds))
        row["size_ratio"] = out.stat().st_size / Path(spec["model"]).stat().st_size
        ms = latencies({"fp32": spec["model"], "int4": str(out)}, feeds[0], latency_s)
        row["latency_ratio"] = ms["int4"] / ms["fp32"]
    return [row]


def matmul_rows(name: str, spec: dict, folder: Path, peer_python: str, latency_s: float):
    source = prepare(spec, folder / f"{name}.fp32.onnx")
    if not has_matmul_weights(source):
        return []
    feeds = eval_feeds(spec, 32)
    rows, files = [], {"fp32": source}
    for block in BLOCKS:
        cells = [("onnxopt", None)] + [(peer, peer) for peer in PEERS]
        for tool, algo in cells:
            out = folder / f"{name}.{tool}.{block}.onnx"
            if algo is None:
                pipeline = f"quantize-int4(op_types=[MatMul],block_size={block})"
                rec = onnxopt_cell(dict(spec, model=source), pipeline, out)
            else:
                rec = peer_cell(peer_python, source, algo, block, out)
            row = {"model": name, "kind": "matmul", "tool": tool, "block": block, **rec}
            if "error" not in rec:
                row.update(fidelity(name, source, str(out), feeds))
                row["size_ratio"] = out.stat().st_size / Path(source).stat().st_size
                files[f"{tool}.{block}"] = str(out)
            rows.append(row)
    ms = latencies(files, feeds[0], latency_s)
    for row in rows:
        key = f"{row['tool']}.{row['block']}"
        if key in ms:
            row["latency_ratio"] = ms[key] / ms["fp32"]
    return rows


def print_whole(rows: list[dict]) -> None:
    print("\n| model | SQNR dB (every output) | task metric | size ÷ fp32 | latency ÷ fp32 "
          "| default budget | narrow int8 / int4 weights | quantize s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | CRASH: {r['error']} | | | | | | |")
            continue
        bits = r.get("by_bits") or {}
        print(
            f"| {r['model']} | {_sqnrs(r['sqnr'])} | {r['task']} {r['task_value']:.3f} | "
            f"{r['size_ratio']:.3f} | {_f(r.get('latency_ratio'), '{:.2f}')} | {verdict(r)} | "
            f"{bits.get('int8', 0)} / {bits.get('int4', 0)} | {r['wall']:.1f} |",
            flush=True,
        )


def print_matmul(rows: list[dict]) -> None:
    print("\n| model | block | tool | SQNR dB (every output) | task metric | size ÷ fp32 "
          "| latency ÷ fp32 | quantize s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['block']} | {r['tool']} | CRASH: {r['error']} | | | | |")
            continue
        print(
            f"| {r['model']} | {r['block']} | {r['tool']} | {_sqnrs(r['sqnr'])} | "
            f"{r['task']} {r['task_value']:.4f} | {r['size_ratio']:.3f} | "
            f"{_f(r.get('latency_ratio'), '{:.2f}')} | {r['wall']:.1f} |",
            flush=True,
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join([*fetch_zoo.ZOO, *DIGITS]))
    ap.add_argument("--peer-python", default=os.environ.get("ONNXOPT_INT4_PEER_PYTHON"))
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-model table")
    ap.add_argument("--no-matmul", action="store_true", help="skip the MatMul comparison")
    ap.add_argument(
        "--budget",
        choices=("none", "default"),
        default="none",
        help="whole-model table: budget=none (what the pass does) or the default budget "
        "(what a user gets, fallback=auto included)",
    )
    ap.add_argument("--latency-seconds", type=float, default=20.0, help="per model group")
    ap.add_argument("--keep", help="keep the quantized models in this folder")
    ap.add_argument("--json", help="write the raw records here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child_onnxopt(json.loads(args.child))), flush=True)
        return 0
    names = args.models.split(",")
    unknown = [n for n in names if n not in fetch_zoo.ZOO and n not in DIGITS]
    if unknown:
        known = ", ".join([*fetch_zoo.ZOO, *DIGITS])
        print(f"error: unknown models {unknown}; known: {known}", file=sys.stderr)
        return 2
    try:
        specs = sources(names)
    except (fetch_zoo.FetchError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import onnxruntime

    import onnxopt

    peer_python = args.peer_python or sys.executable
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
          f"onnxopt {onnxopt.__version__}; peers: {peer_python}")  # fmt: skip
    folder = Path(args.keep or tempfile.mkdtemp(prefix="onnxopt-int4-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    whole, matmul = [], []
    try:
        for name in names:
            if not args.no_whole:
                whole += whole_rows(name, specs[name], folder, args.latency_seconds, args.budget)
                print_whole(whole[-1:])
            if not args.no_matmul:
                rows = matmul_rows(name, specs[name], folder, peer_python, args.latency_seconds)
                matmul += rows
                if rows:
                    print_matmul(rows)
        print(f"\nWhole model: `{WHOLE}` (budget={args.budget}), 1 thread latency, interleaved.")
        print_whole(whole)
        print("\nMatMul weights only, same model, same block size:")
        print_matmul(matmul)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(whole + matmul, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
