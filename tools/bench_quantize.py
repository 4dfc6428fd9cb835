"""Side by side: onnxopt ``quantize-int8`` vs onnxruntime's ``quantize_static`` vs NNCF.

For each model, in one run, on the same calibration samples and the same evaluation
samples:

- **onnxopt**: ``quantize-int8`` through ``onnxopt.optimize`` with its defaults and the
  default budget, on the model as shipped (``--onnxopt`` adds other pipelines as
  extra columns, ``label=pipeline``).
- **ort**: ``quant_pre_process`` (when it succeeds) then ``quantize_static``: QDQ,
  per-channel, uint8 activations / int8 weights, MinMax (its defaults otherwise).
- **nncf**, **nncf-mixed**, **nncf-tf**: ``nncf==3.4.0`` (``tools/nncf_quantize.py``,
  run with ``--nncf-python``, its own environment) with its default preset
  (PERFORMANCE), with ``preset=MIXED``, and with ``model_type=TRANSFORMER`` (on the
  transformer models only: minilm, ppocr-rec, transformer).

The peers get the model the way they do best (as the issue that asked for this bench
measured it): opset < 13 converted to 13 (per-channel weights need it; NNCF falls
back to per-tensor otherwise) and ``Constant``-node tensors moved into initializers
(both lossless). onnxopt gets the file as shipped.

Per model and tool: SQNR (dB) of every float output against fp32 on the evaluation
samples, the task metric (``tools/bench_zoo.py``: top-1 agreement, CTC string
agreement, mask IoU, VAD decision agreement, embedding cosine; digits: accuracy),
onnxruntime latency at 1 and 2 threads (``onnxopt.bench.measure_latency``: fp32 and
every tool interleaved, medians, all graph optimizations) as a ratio to fp32, and
each quantization's wall time and peak RSS (fresh process each). A closing table
checks the targets of issue 13: onnxopt's SQNR >= every peer's and its latency <=
every peer's and <= the reference ratio.

Models: the zoo (``tools/fetch_zoo.py``, data from ``tools/zoo_data.py``: the first
32+32 samples of ``<model>.calib.npz`` give onnxopt's validation and calibration
split, the peers get its calibration half; 32 samples of ``<model>.eval.npz`` are
evaluated) and the digits models (64 calibration samples, the 540-image test split).

    python tools/bench_quantize.py                          # zoo + digits (~15 min)
    python tools/bench_quantize.py --models ppocr-cls,vad --tools onnxopt,ort,nncf-mixed
    python tools/bench_quantize.py --onnxopt "fbn=fold-batchnorm,quantize-int8"
    python tools/bench_quantize.py --memory                 # det 640x640, 32 samples
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(HERE))
import bench_zoo  # noqa: E402
import fetch_zoo  # noqa: E402

ZOO = ("ppocr-cls", "ppocr-det", "ppocr-rec", "vad", "minilm")
DIGITS = {
    "mlp": "digits_mlp",
    "cnn": "digits_cnn",
    "transformer": "digits_transformer",
    "mlp-op11": "digits_mlp_op11_constants",
}
TRANSFORMERS = ("minilm", "ppocr-rec", "transformer")
PEERS = ("ort", "nncf", "nncf-mixed", "nncf-tf")
# int8 / fp32 latency at 1 thread before issue 13 (the table): not to be exceeded
TODAY = {"ppocr-cls": 0.72, "ppocr-det": 0.76, "ppocr-rec": 0.69, "vad": 0.62}
ZOO_CALIB, ZOO_VALID, ZOO_EVAL = 32, 32, 32
DIGITS_CALIB, DIGITS_VALID = 64, 32
SEED = 0
NNCF_PYTHON = os.environ.get("ONNXOPT_NNCF_PYTHON", "/work/venvs/nncf/bin/python")
JOB_TIMEOUT = 1800.0


# ---------------------------------------------------------------------------- problems


class Problem:
    """One model: the file, onnxopt's data, the peers' calibration feeds, eval feeds."""

    def __init__(self, name: str, folder: Path) -> None:
        import onnx

        from onnxopt.data import load_samples, prepare_samples

        self.name = name
        if name in DIGITS:
            self.path = MODELS / f"{DIGITS[name]}.onnx"
            with np.load(MODELS / "digits_train.npz") as train:
                data = {"input": train["input"][: DIGITS_CALIB + DIGITS_VALID]}
            self.data_file = folder / f"{name}.calib.npz"
            np.savez(self.data_file, **data)
            calib, valid = DIGITS_CALIB, DIGITS_VALID
            with np.load(MODELS / "digits_test.npz") as test:
                self.eval_feeds = [{"input": x[None]} for x in test["input"]]
                self.labels = test["label"]
        else:
            self.path = fetch_zoo.model_path(name)
            data_dir = fetch_zoo.zoo_dir() / "data"
            self.data_file = data_dir / f"{name}.calib.npz"
            calib, valid = ZOO_CALIB, ZOO_VALID
            proto = onnx.load(str(self.path))
            self.eval_feeds = load_samples(str(data_dir / f"{name}.eval.npz"),
                                           _specs(proto))[:ZOO_EVAL]  # fmt: skip
            self.labels = None
        self.calib, self.valid = calib, valid
        proto = onnx.load(str(self.path))
        sets = prepare_samples(proto, str(self.data_file), seed=SEED,
                               calibration_samples=calib, validation_samples=valid)  # fmt: skip
        self.calibration = sets.calibration
        self.peer_path = folder / f"{name}.peer.onnx"
        onnx.save(peer_model(proto), self.peer_path)
        self.feeds_file = folder / f"{name}.feeds.npz"
        np.savez(self.feeds_file, **{f"{i}/{k}": v for i, feed in enumerate(self.calibration)
                                     for k, v in feed.items()})  # fmt: skip


def _specs(proto):
    from onnxopt.data import input_specs

    return input_specs(proto)


def peer_model(proto):
    """Opset >= 13 and Constant nodes as initializers (lossless), for the peers.

    Constants read by a Cast stay nodes: NNCF 3.4's ``eliminate_nop_cast`` reads the
    ``type`` of a Cast's input, which an initializer does not have.
    """
    import onnx

    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        proto = onnx.version_converter.convert_version(proto, 13)
    readers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    kept = []
    for node in proto.graph.node:
        lift = (node.op_type == "Constant" and len(node.attribute) == 1
                and node.attribute[0].name == "value"
                and "Cast" not in readers.get(node.output[0], ()))  # fmt: skip
        if lift:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return onnx.shape_inference.infer_shapes(proto)


# ---------------------------------------------------------------------------- quantizers


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def onnxopt_job(model: str, pipeline: str, data: str, out: str, calib: int, valid: int) -> dict:
    """Fresh process: ``onnxopt.optimize`` with defaults, wall time and peak RSS."""
    import onnxopt

    start = time.perf_counter()
    result = onnxopt.optimize(model, pipeline, data=data, calibration_samples=calib,
                              validation_samples=valid, seed=SEED)  # fmt: skip
    seconds = time.perf_counter() - start
    result.save(out)
    notes = [n for s in result.steps for n in s.get("notes", [])]
    status = "; ".join(
        s["status"] + (f" ({s['reason'][:100]})" if s.get("reason") else "") for s in result.steps
    )
    peak = bench_zoo.peak_rss_mb()
    return {"seconds": seconds, "peak_mb": peak, "status": status, "notes": notes}


def ort_job(model: str, feeds_file: str, out: str) -> dict:
    """Fresh process: quant_pre_process (if it works) + quantize_static (QDQ, MinMax)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = _load_feeds(feeds_file)
    # quant_pre_process leaves sym_shape_infer_temp.onnx and <uuid>.data files in the
    # working folder: give this process a folder of its own, beside the output
    os.chdir(os.path.dirname(os.path.abspath(out)))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    start = time.perf_counter()
    source, status = out + ".pre.onnx", "ok"
    try:
        quant_pre_process(model, source, skip_symbolic_shape=False)
    except Exception as exc:  # the tool's own preprocessing fails on some exports
        source, status = model, f"quant_pre_process failed ({str(exc)[:60]}); without it"
    quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    seconds = time.perf_counter() - start
    if source != model:
        os.remove(source)
    return {"seconds": seconds, "peak_mb": bench_zoo.peak_rss_mb(), "status": status}


def _load_feeds(path: str) -> list[dict]:
    samples: dict[int, dict] = {}
    with np.load(path) as arrays:
        for key in arrays.files:
            index, name = key.split("/", 1)
            samples.setdefault(int(index), {})[name] = arrays[key]
    return [samples[i] for i in sorted(samples)]


def run_isolated(function, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result(timeout=JOB_TIMEOUT)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}


def nncf_job(model: str, feeds_file: str, out: str, variant: str) -> dict:
    if not Path(NNCF_PYTHON).exists():
        return {"error": f"no NNCF environment at {NNCF_PYTHON} (ONNXOPT_NNCF_PYTHON)"}
    extra = {"nncf": [], "nncf-mixed": ["--preset", "mixed"],
             "nncf-tf": ["--model-type", "transformer"]}[variant]  # fmt: skip
    cmd = [NNCF_PYTHON, str(HERE / "nncf_quantize.py"), model, feeds_file, out, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {JOB_TIMEOUT:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:160]}"}
    record = json.loads(lines[-1][len("RESULT ") :])
    record["status"] = "ok"
    return record


# ---------------------------------------------------------------------------- measurement


def run_outputs(path: str, feeds: list[dict]) -> tuple[list[str], list[list[np.ndarray]]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    outputs = [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]
    return [o.name for o in session.get_outputs()], outputs


def fidelity(problem: Problem, reference, path: str) -> dict:
    names, ref = reference
    _, got = run_outputs(path, problem.eval_feeds)
    per_output = {}
    for k, name in enumerate(names):
        r = np.concatenate([np.asarray(o[k]).ravel() for o in ref])
        g = np.concatenate([np.asarray(o[k]).ravel() for o in got])
        if np.issubdtype(r.dtype, np.floating):
            per_output[name] = bench_zoo._sqnr(r, g)
        else:
            per_output[name] = float("inf") if np.array_equal(r, g) else float("-inf")
    # a softmax output's SQNR is decided by its few ambiguous samples (on ppocr-cls one
    # sample of 32 carries ~all the error): the median per-sample SQNR is the robust view
    per_sample = [bench_zoo._sqnr(np.asarray(r[0]), np.asarray(g[0])) for r, g in zip(ref, got)
                  if np.issubdtype(np.asarray(r[0]).dtype, np.floating)]  # fmt: skip
    median = float(np.median(per_sample)) if per_sample else float("nan")
    if problem.labels is not None:
        predicted = np.array([o[0].argmax() for o in got])
        task = ("accuracy", float(np.mean(predicted == problem.labels)))
        agreement = np.mean([int(a[0].argmax()) == int(b[0].argmax()) for a, b in zip(ref, got)])
        task_extra = float(agreement)
    else:
        task = bench_zoo.task_metric(problem.name, ref, got)
        task_extra = None
    return {"sqnr": per_output, "sqnr0": per_output[names[0]], "median0": median,
            "task": task[0], "task_value": task[1], "top1": task_extra}  # fmt: skip


def latencies(paths: dict[str, str], feed: dict) -> dict:
    import onnx

    from onnxopt.bench import measure_latency

    models = [(label, onnx.load(path)) for label, path in paths.items()]
    one = measure_latency(models[:1], feed, threads=(1,), rounds=3, runs_per_round=1, warmup=1)
    per_run = max(one[0].median_ms, 1e-3) / 1000
    runs = int(min(max(0.04 / per_run, 1), 50))  # ~40 ms per timed block
    rounds = 25 if per_run < 0.02 else 15
    timings = measure_latency(models, feed, threads=(1, 2), rounds=rounds,
                              runs_per_round=runs, warmup=2)  # fmt: skip
    return {f"{t.label}@{t.threads}": {"ms": t.median_ms, "ratio": t.ratio} for t in timings}


def bench_model(name: str, folder: Path, tools: list[str], pipelines: dict[str, str]) -> dict:
    problem = Problem(name, folder)
    outputs, jobs = {"fp32": str(problem.path)}, {}
    for label, pipeline in pipelines.items():
        out = str(folder / f"{name}.{label}.onnx")
        args = (str(problem.path), pipeline, str(problem.data_file), out)
        jobs[label] = run_isolated(onnxopt_job, *args, problem.calib, problem.valid)
        outputs[label] = out
    for tool in tools:
        if tool == "nncf-tf" and name not in TRANSFORMERS:
            continue
        out = str(folder / f"{name}.{tool}.onnx")
        if tool == "ort":
            jobs[tool] = run_isolated(ort_job, str(problem.peer_path), str(problem.feeds_file), out)
        else:
            jobs[tool] = nncf_job(str(problem.peer_path), str(problem.feeds_file), out, tool)
        outputs[tool] = out
    reference = run_outputs(str(problem.path), problem.eval_feeds)
    row = {"model": name, "jobs": jobs, "fidelity": {}, "size": {}}
    usable = {"fp32": outputs["fp32"]}
    for label, path in outputs.items():
        if label != "fp32" and "error" in jobs[label]:
            continue
        try:
            row["fidelity"][label] = fidelity(problem, reference, path)
        except Exception as exc:
            jobs[label] = {**jobs[label], "error": f"does not run: {str(exc)[:120]}"}
            continue
        row["size"][label] = os.path.getsize(path)
        usable[label] = path
    print(f"[{name}] timing {len(usable)} models interleaved...", file=sys.stderr, flush=True)
    row["latency"] = latencies(usable, problem.eval_feeds[0])
    from onnxopt.passes.quantize.speed import runtime_ops

    row["runtime"] = {label: runtime_ops(_load(path)) for label, path in usable.items()
                      if label != "fp32"}  # fmt: skip
    return row


def _load(path: str):
    import onnx

    return onnx.load(path)


# ---------------------------------------------------------------------------- memory


def memory_check(folder: Path) -> dict:
    """onnxopt's quantize-int8 on PP-OCRv4 det at 640x640 with 32 calibration samples."""
    data = np.load(fetch_zoo.zoo_dir() / "data" / "ppocr-det.calib.npz")["x"]
    big = np.repeat(np.repeat(data[:64], 2, axis=-1), 2, axis=-2)  # 320 -> 640
    data_file = folder / "det640.npz"
    np.savez(data_file, x=big)
    results = {}
    out = str(folder / "det640.onnx")
    results["onnxopt"] = run_isolated(memory_job, "onnxopt", str(fetch_zoo.model_path("ppocr-det")),
                                      str(data_file), out)  # fmt: skip
    results["ort"] = run_isolated(memory_job, "ort", str(fetch_zoo.model_path("ppocr-det")),
                                  str(data_file), out)  # fmt: skip
    results["input_mb"] = big[:64].nbytes / 2**20
    return results


def memory_job(kind: str, model: str, data_file: str, out: str) -> dict:
    import onnx

    import onnxopt
    from onnxopt.data import prepare_samples

    proto = onnx.load(model)
    baseline = _current_rss_mb()
    start = time.perf_counter()
    if kind == "onnxopt":  # it loads the data itself (no second copy held here)
        result = onnxopt.optimize(
            proto, "quantize-int8", data=data_file, calibration_samples=32,
            validation_samples=32, seed=SEED,
        )  # fmt: skip
        result.save(out)
    else:
        sets = prepare_samples(proto, data_file, seed=SEED, calibration_samples=32,
                               validation_samples=32)  # fmt: skip
        feeds_file = out + ".feeds.npz"
        np.savez(feeds_file, **{f"{i}/{k}": v for i, f in enumerate(sets.calibration)
                                for k, v in f.items()})  # fmt: skip
        del sets
        onnx.save(peer_model(proto), out + ".peer.onnx")
        baseline = _current_rss_mb()
        ort_job(out + ".peer.onnx", feeds_file, out)
    return {"seconds": time.perf_counter() - start, "peak_mb": bench_zoo.peak_rss_mb(),
            "baseline_mb": baseline}  # fmt: skip


# ---------------------------------------------------------------------------- printing


def _db(value: float) -> str:
    if value is None or np.isnan(value):
        return "—"
    if np.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.1f}"


def print_model(row: dict) -> None:
    lat, fid = row["latency"], row["fidelity"]
    print(f"\n### {row['model']}\n")
    names = list(next(iter(fid.values()))["sqnr"]) if fid else []
    print("| tool | " + " | ".join(f"SQNR {n} dB" for n in names) + " | median per-sample "
          "SQNR out 0 | task metric | "
          "ms 1 thr | × fp32 1 thr | ms 2 thr | × fp32 2 thr | KB | quantize s | peak MB | "
          "status |")  # fmt: skip
    print("|---" * (len(names) + 11) + "|")
    for label in ["fp32", *row["jobs"]]:
        job = row["jobs"].get(label, {})
        if label != "fp32" and label not in fid:
            print(f"| {label} | " + " | " * (len(names) + 9) + f"{job.get('error', '?')} |")
            continue
        f = fid.get(label) or {"sqnr": {}, "task": "", "task_value": float("nan"),
                               "median0": float("nan")}  # fmt: skip
        sqnrs = " | ".join(_db(f["sqnr"].get(n, float("inf"))) for n in names)
        task = f"{f['task']} {f['task_value']:.3f}" if label != "fp32" else "—"
        t1, t2 = lat[f"{label}@1"], lat[f"{label}@2"]
        status = job.get("status", "")
        if job.get("notes"):
            status += "; " + "; ".join(job["notes"])
        size = row["size"].get(label, 0)
        print(
            f"| {label} | {sqnrs} | {_db(f['median0'])} | {task} | {t1['ms']:.3f} | "
            f"{t1['ratio']:.2f} | {t2['ms']:.3f} | {t2['ratio']:.2f} | {size / 1024:.0f} | "
            f"{job.get('seconds', 0):.1f} | {job.get('peak_mb', 0):.0f} | {status[:300]} |"
        )


def print_summary(rows: list[dict], labels: list[str]) -> None:
    print("\n## Summary: SQNR of output 0 (dB) / int8 ÷ fp32 latency at 1 thread\n")
    print("| model | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for row in rows:
        cells = []
        for label in labels:
            f = row["fidelity"].get(label)
            lat = row["latency"].get(f"{label}@1")
            cells.append(f"{_db(f['sqnr0'])} / {lat['ratio']:.2f}" if f and lat else "—")
        print(f"| {row['model']} | " + " | ".join(cells) + " |")


def print_targets(rows: list[dict], ours: str) -> None:
    print(f"\n## Targets ({ours}): SQNR >= best peer, latency <= every peer and today's\n")
    print("| model | SQNR | best peer SQNR | latency 1/2 thr | fastest peer 1/2 thr | today | "
          "holds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        f, lat = row["fidelity"], row["latency"]
        if ours not in f:
            print(f"| {row['model']} | — | | | | | no result |")
            continue
        peers = [p for p in PEERS if p in f]
        best = max(peers, key=lambda p: f[p]["sqnr0"], default=None)
        mine = [lat[f"{ours}@{t}"]["ratio"] for t in (1, 2)]
        fastest = [min((lat[f"{p}@{t}"]["ratio"] for p in peers), default=np.inf) for t in (1, 2)]
        today = TODAY.get(row["model"], 1.0 if row["model"] in ZOO else np.inf)
        sqnr_ok = best is None or f[ours]["sqnr0"] >= f[best]["sqnr0"]
        speed_ok = all(m <= p for m, p in zip(mine, fastest)) and mine[0] <= today
        verdict = "yes" if sqnr_ok and speed_ok else "SQNR" if not sqnr_ok else "latency"
        if not sqnr_ok and not speed_ok:
            verdict = "SQNR, latency"
        best_text = f"{_db(f[best]['sqnr0'])} ({best})" if best else "—"
        print(f"| {row['model']} | {_db(f[ours]['sqnr0'])} | {best_text} | "
              f"{mine[0]:.2f} / {mine[1]:.2f} | {fastest[0]:.2f} / {fastest[1]:.2f} | "
              f"{today if np.isfinite(today) else '—'} | {verdict} |")  # fmt: skip


def print_runtime(rows: list[dict]) -> None:
    print("\n## What onnxruntime runs (ops of its optimized graph)\n")
    for row in rows:
        for label, histogram in row["runtime"].items():
            ops = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in histogram.items())
            print(f"- {row['model']}, {label}: {ops}")


def main(argv: list[str] | None = None) -> int:
    global NNCF_PYTHON
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join([*ZOO, *DIGITS]))
    parser.add_argument("--tools", default=",".join(PEERS), help=f"peers among {PEERS}")
    parser.add_argument("--onnxopt", action="append", default=[],
                        help="extra onnxopt column: label=pipeline")  # fmt: skip
    parser.add_argument("--nncf-python", default=NNCF_PYTHON)
    parser.add_argument("--memory", action="store_true", help="det 640x640 memory check only")
    parser.add_argument("--json", type=Path, help="write the raw records here")
    parser.add_argument("--keep", type=Path, help="keep the models in this folder")
    args = parser.parse_args(argv)
    NNCF_PYTHON = args.nncf_python
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ZOO and n not in DIGITS]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown or any(t not in PEERS for t in tools):
        parser.error(f"valid models: {', '.join([*ZOO, *DIGITS])}; valid tools: {PEERS}")
    pipelines = {"onnxopt": "quantize-int8"}
    for item in args.onnxopt:
        label, _, pipeline = item.partition("=")
        if not pipeline:
            parser.error("--onnxopt takes label=pipeline")
        pipelines[label] = pipeline
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if args.keep is None else args.keep
        folder.mkdir(parents=True, exist_ok=True)
        if args.memory:
            print(json.dumps(memory_check(folder), indent=1))
            return 0
        rows = []
        for name in names:
            print(f"[{name}] quantizing...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            rows.append(bench_model(name, folder, tools, pipelines))
            print(f"[{name}] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1, default=str))
    import platform

    import onnxruntime

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime "
          f"{onnxruntime.__version__}; command: python tools/bench_quantize.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")  # fmt: skip
    for row in rows:
        print_model(row)
    labels = [*pipelines, *[t for t in PEERS if t in tools]]
    print_summary(rows, labels)
    for label in pipelines:
        print_targets(rows, label)
    print_runtime(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
