"""Every pass family on every zoo model, with its defaults: cost and quality in one table.

For each model of the zoo (``tools/fetch_zoo.py``) and its realistic calibration and
evaluation inputs (``tools/zoo_data.py``), each *cell* runs one pass family through
``onnxopt.optimize`` with its defaults (lossy families also with ``budget=none``, to
show what the pass does when nothing holds it back) in a fresh process, and reports:

- wall time of the whole ``optimize`` call (load, reference outputs, pass, every
  check) and its ratio to the **cost anchor**: onnxruntime's ``quantize_static``
  (QDQ, per-channel, MinMax) on the same model and calibration data, timed in the
  same run, in its own fresh process;
- peak RSS of that process (before evaluation), and the target
  ``<= 4 x model file + 300 MB``;
- each step's status and, when it was rolled back or skipped, the reason;
- file size and deflated size (zlib level 6) of the saved model;
- fidelity against the original on the evaluation file (never seen by the pass):
  worst-output SQNR (dB) and cosine, plus the task metric: CTC-decoded string
  agreement (rec), top-1 agreement (cls), text-mask IoU at 0.3 (det), speech /
  no-speech decision agreement at 0.5 (VAD), embedding cosine (MiniLM).

Time target: ``<= 3 x quantize_static + 15 s``. The machine is small and noisy: each
cell is one measurement, and the anchor is timed between every two cells; a cell is
divided by the mean of the anchors just before and after it (``--anchor once``: one
anchor per model). ``--vs PYTHON`` also runs every cell with another interpreter's
onnxopt (a venv of an older checkout), right before the current one, and shows its
ratio as "before".

    python tools/bench_zoo.py                                  # the full table
    python tools/bench_zoo.py --models ppocr-cls,vad --families lossless,int8
    python tools/bench_zoo.py --json zoo.json                  # also the raw records
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fetch_zoo  # noqa: E402
import zoo_data  # noqa: E402

LOSSLESS = "fold-constants,fold-batchnorm,dedupe-initializers,remove-dead-neurons,cleanup,compact"
# family -> (pipeline, is lossy). remove-neurons has no default amount: 10 % of the
# channels is the smallest step a user would try.
FAMILIES: dict[str, tuple[str, bool]] = {
    "lossless": (LOSSLESS, False),
    "upgrade": ("upgrade-opset", False),
    "prune": ("prune-initializers", True),
    "clip": ("clip-weights", True),
    "neurons": ("remove-neurons(ratio=0.1)", True),
    "int8": ("quantize-int8", True),
    "int4": ("quantize-int4", True),
    "codebook": ("share-weights", True),
    "distill": ("distill", True),
}
CELL_TIMEOUT = 1800.0


# ----------------------------------------------------------------------------- child


def peak_rss_mb() -> float:
    """This process's peak RSS in MB. ``VmHWM`` of /proc/self/status, not ``ru_maxrss``:
    a child's ``ru_maxrss`` starts at its parent's RSS when it was forked (exec does not
    reset it), so every cell started by a 1.2 GB parent read 1228 MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _feeds(path: Path, model) -> list[dict]:
    from onnxopt.data import input_specs, load_samples

    return load_samples(str(path), input_specs(model))


def _run_all(model_path: str, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64).ravel()
    err = ref - got.astype(np.float64).ravel()
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(float(np.sum(ref * ref)), 1e-300) / noise)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def _ctc(probs: np.ndarray) -> tuple[int, ...]:
    idx = probs.argmax(-1)
    keep = [int(i) for j, i in enumerate(idx) if i != 0 and (j == 0 or i != idx[j - 1])]
    return tuple(keep)


def task_metric(name: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]]):
    """(label, value) of the model's task metric, original vs optimized."""
    if name == "ppocr-rec":
        same = [_ctc(r[0][0]) == _ctc(g[0][0]) for r, g in zip(ref, got)]
        return "string agreement", float(np.mean(same))
    if name == "ppocr-cls":
        same = [int(r[0].argmax()) == int(g[0].argmax()) for r, g in zip(ref, got)]
        return "top-1 agreement", float(np.mean(same))
    if name == "ppocr-det":
        ious = []
        for r, g in zip(ref, got):
            a, b = r[0] > 0.3, g[0] > 0.3
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
        return "mask IoU", float(np.mean(ious))
    if name in ("vad", "vad-if"):
        same = [
            bool(r[0].ravel()[0] > 0.5) == bool(g[0].ravel()[0] > 0.5) for r, g in zip(ref, got)
        ]
        return "decision agreement", float(np.mean(same))
    if name == "minilm":
        # the sentence embedding: mean of the token states under the mask
        return "embedding cosine", float(np.mean([_cos(r[2], g[2]) for r, g in zip(ref, got)]))
    return "", float("nan")


def fidelity(name: str, original: str, optimized: str, feeds: list[dict]) -> dict:
    ref = _run_all(original, feeds)
    got = _run_all(optimized, feeds)
    sqnr, cos = float("inf"), 1.0
    for k in range(len(ref[0])):
        r = np.concatenate([np.asarray(o[k]).ravel() for o in ref])
        g = np.concatenate([np.asarray(o[k]).ravel() for o in got])
        if not np.issubdtype(r.dtype, np.floating):
            exact = r.shape == g.shape and bool(np.array_equal(r, g))
            sqnr, cos = (sqnr, cos) if exact else (float("-inf"), min(cos, 0.0))
            continue
        sqnr = min(sqnr, _sqnr(r, g))
        cos = min(cos, _cos(r, g))
    label, value = task_metric(name, ref, got)
    return {"sqnr": sqnr, "cosine": cos, "task": label, "task_value": value}


def _deflated(path: Path) -> int:
    c = zlib.compressobj(6)
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += len(c.compress(chunk))
    return n + len(c.flush())


def child_onnxopt(spec: dict) -> dict:
    import onnxopt

    out = Path(spec["out"])
    start = time.perf_counter()
    result = onnxopt.optimize(
        spec["model"], spec["pipeline"], data=spec["calib"], budget=spec.get("budget")
    )
    result.save(out)
    wall = time.perf_counter() - start
    rss = peak_rss_mb()
    steps = [
        {"step": s["step"], "status": s["status"], "reason": s.get("reason") or ""}
        for s in result.steps
    ]
    import onnx

    feeds = _feeds(Path(spec["eval"]), onnx.load(spec["model"], load_external_data=False))
    record = {
        "wall": wall,
        "rss_mb": rss,
        "steps": steps,
        "size": out.stat().st_size,
        "deflated": _deflated(out),
    }
    record.update(fidelity(spec["name"], spec["model"], str(out), feeds))
    return record


def child_anchor(spec: dict) -> dict:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(spec["model"])
    feeds = _feeds(Path(spec["calib"]), model)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    # quantize_static may write "<model>-inferred.onnx" beside its input: work on a
    # private copy, so that two benches on one cached model cannot race on that file
    # (a MiniLM anchor once failed with FileNotFoundError that way).
    private = Path(tempfile.mkdtemp(prefix="onnxopt-anchor-"))
    source = private / Path(spec["model"]).name
    shutil.copyfile(spec["model"], source)
    start = time.perf_counter()
    quantize_static(
        str(source),
        spec["out"],
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    wall = time.perf_counter() - start
    shutil.rmtree(private, ignore_errors=True)
    return {"wall": wall, "rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- parent


def run_child(kind: str, spec: dict, timeout: float, python: str | None = None) -> dict:
    """One measurement in a fresh process (``python``: another interpreter, whose own
    onnxopt is measured — for before/after runs of two checkouts)."""
    exe = python or sys.executable
    cmd = [exe, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _fmt(v, spec="{:.1f}"):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float) and np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return spec.format(v)


def _status(rec: dict) -> str:
    if "error" in rec:
        return f"CRASH: {rec['error']}"
    parts = []
    for s in rec["steps"]:
        text = s["status"]
        if s["status"] not in ("accepted",) and s["reason"]:
            text += f" ({s['reason'][:110]})"
        parts.append(text)
    return "; ".join(parts)


def row(
    model: str,
    family: str,
    budget: str,
    rec: dict,
    anchor: float,
    file_mb: float,
    before: dict | None = None,
) -> str:
    if "error" in rec:
        return f"| {model} | {family} | {budget} | {_status(rec)} | | | | | | | | |"
    limit_t = 3 * anchor + 15
    limit_m = 4 * file_mb + 300
    t_ok = "" if rec["wall"] <= limit_t else " ✗"
    m_ok = "" if rec["rss_mb"] <= limit_m else " ✗"
    task = f"{rec['task']} {rec['task_value']:.3f}" if rec["task"] else "-"
    ratio = f"{rec['wall'] / anchor:.2f}"
    if before is not None:
        ratio += f" (before {before['wall'] / anchor:.2f})" if "wall" in before else " (before: -)"
    return (
        f"| {model} | {family} | {budget} | {_status(rec)} | {rec['wall']:.1f}{t_ok} | "
        f"{ratio} | {rec['rss_mb']:.0f}{m_ok} | {rec['size'] / 1e6:.2f} | "
        f"{rec['deflated'] / 1e6:.2f} | {_fmt(rec['sqnr'])} | {_fmt(rec['cosine'], '{:.4f}')} | "
        f"{task} |"
    )


HEADER = (
    "| model | family | budget | status | time s | × qs | peak RSS MB | MB | deflated MB | "
    "SQNR dB | cosine | task metric |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# ------------------------------------------------------------------- README table


def _short_status(rec: dict, limit: int = 70) -> str:
    """One cell: the worst step status, with the first reason, ``|`` escaped."""
    if "error" in rec:
        clear = "onnxopt.errors." in rec["error"]  # a clear error, not a crash
        text = f"{'error' if clear else 'CRASH'}: {rec['error']}"
    else:
        # a pipeline that changed something is "accepted" even if a step was a no-op
        order = ("failed", "rolled back", "accepted", "no-op")
        steps = rec.get("steps") or [{"status": "?", "reason": ""}]
        worst = min(steps, key=lambda s: order.index(s["status"]) if s["status"] in order else 0)
        text = worst["status"]
        if worst["status"] != "accepted" and worst["reason"]:
            reason = worst["reason"].splitlines()[0]
            text += ": " + (reason if len(reason) <= limit else reason[: limit - 1] + "…")
    return text.replace("|", "\\|")


def _fidelity(rec: dict) -> str:
    if "error" in rec:
        return "-"
    task = f"; {rec['task']} {rec['task_value']:.3f}" if rec.get("task") else ""
    return f"{_fmt(rec['sqnr'])} / {_fmt(rec['cosine'], '{:.4f}')}{task}"


def table(records: list[dict]) -> str:
    """The README table: one row per model x family, the default cell and the
    ``budget=none`` cell side by side; ✗ marks a cell over a target (time > 3x
    quantize_static + 15 s, peak RSS > 4x the file + 300 MB, a lossless result
    under 60 dB)."""
    cells: dict[tuple[str, str, str | None], dict] = {}
    order: list[tuple[str, str]] = []
    anchors: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("family") == "anchor" and "wall" in rec:
            anchors.setdefault(rec["name"], []).append(rec)
        if rec.get("family") in (None, "anchor"):
            continue
        key = (rec["name"], rec["family"])
        if key not in order:
            order.append(key)
        cells[(*key, rec.get("budget"))] = rec  # a later file replaces the cell
    lines = [
        "| model | family | status (defaults) | time s (× qs) | peak RSS MB | size × fp32 "
        "| SQNR dB / cosine; task | `--budget none`: size × fp32, SQNR / cosine; task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, (name, family) in enumerate(order):
        last = number + 1 == len(order) or order[number + 1][0] != name
        rec = cells.get((name, family, None))
        if rec is None:
            continue
        path = Path(rec["model"])
        file_bytes = rec.get("file_bytes") or (path.stat().st_size if path.exists() else 0)
        file_mb = file_bytes / 1e6
        if "error" in rec:
            timing = rss = size = "-"
        else:
            anchor = rec.get("anchor") or float("nan")
            t_bad = " ✗" if rec["wall"] > 3 * anchor + 15 else ""
            m_bad = " ✗" if rec["rss_mb"] > 4 * file_mb + 300 else ""
            timing = f"{rec['wall']:.1f} ({rec['wall'] / anchor:.2f}){t_bad}"
            rss = f"{rec['rss_mb']:.0f}{m_bad}"
            size = f"{rec['size'] / file_bytes:.3f}" if file_bytes else "-"
        fid = _fidelity(rec)
        lossless = not FAMILIES.get(family, ("", True))[1]
        if lossless and "error" not in rec and not rec["sqnr"] >= 60:
            fid += " ✗"
        loose = cells.get((name, family, "none"))
        if loose is None:
            other = "-" if not lossless else "(lossless)"
        elif "error" in loose:
            other = _short_status(loose)
        else:
            ratio = f"{loose['size'] / file_bytes:.3f}" if file_bytes else "-"
            other = f"{ratio}, {_fidelity(loose)}"
        lines.append(
            f"| {name} | {family} | {_short_status(rec)} | {timing} | {rss} | {size} | "
            f"{fid} | {other} |"
        )
        if last and anchors.get(name):  # the reference tool's own cost, for scale
            walls = [a["wall"] for a in anchors[name]]
            peak = max(a.get("rss_mb", 0.0) for a in anchors[name])
            lines.append(
                f"| {name} | *ORT quantize_static* | anchor, {len(walls)} runs | "
                f"{float(np.median(walls)):.1f} (1.00) | {peak:.0f} | | | |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(fetch_zoo.ZOO))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--no-unbudgeted", action="store_true", help="skip the budget=none cells")
    ap.add_argument("--json", help="write the raw records here")
    ap.add_argument("--timeout", type=float, default=CELL_TIMEOUT, help="seconds per cell")
    ap.add_argument(
        "--vs",
        metavar="PYTHON",
        help="also run every cell with this interpreter's onnxopt (e.g. a venv of an "
        "older checkout), interleaved, and show its time as 'before'",
    )
    ap.add_argument(
        "--anchor",
        choices=("interleaved", "once"),
        default="interleaved",
        help="time quantize_static between every two cells and divide each cell by the "
        "mean of its neighbours (default; robust to a machine whose load changes), or "
        "once per model",
    )
    ap.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print the README table from --json files of earlier runs (a later file's "
        "cell replaces an earlier one's) and exit",
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        records = []
        for path in args.table:
            try:
                records += json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                print(f"error: {path}: cannot read a --json record file ({exc})", file=sys.stderr)
                return 2
        print(table(records))
        return 0
    if args.child:
        kind, spec = args.child
        fn = child_onnxopt if kind == "onnxopt" else child_anchor
        print("RESULT " + json.dumps(fn(json.loads(spec))), flush=True)
        return 0

    models = args.models.split(",")
    families = args.families.split(",")
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        print(f"error: unknown families {bad}; known: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    try:
        paths = fetch_zoo.ensure(models)
        data = zoo_data.ensure(models)
    except (fetch_zoo.FetchError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import onnxruntime

    import onnxopt

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"onnxopt {onnxopt.__version__}"
    )
    print(HEADER)
    records = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-zoo-bench-") as tmp:
        for model in models:
            calib, evaluation = data[model]
            file_mb = paths[model].stat().st_size / 1e6
            base = {
                "name": model,
                "model": str(paths[model]),
                "file_bytes": paths[model].stat().st_size,
                "calib": str(calib),
                "eval": str(evaluation),
            }
            anchor_spec = dict(base, out=f"{tmp}/{model}.qs.onnx")

            def measure_anchor(anchor_spec=anchor_spec) -> float:
                rec = run_child("anchor", anchor_spec, args.timeout)
                records.append(dict(anchor_spec, family="anchor", **rec))
                return rec.get("wall", float("nan"))

            anchors = [measure_anchor()]
            cells = [
                (family, budget)
                for family in families
                for budget in (
                    [None, "none"] if FAMILIES[family][1] and not args.no_unbudgeted else [None]
                )
            ]
            for family, budget in cells:
                spec = dict(
                    base,
                    pipeline=FAMILIES[family][0],
                    budget=budget,
                    out=f"{tmp}/{model}.{family}.onnx",
                )
                before = run_child("onnxopt", spec, args.timeout, args.vs) if args.vs else None
                rec = run_child("onnxopt", spec, args.timeout)
                if args.anchor == "interleaved":
                    anchors.append(measure_anchor())
                    anchor = float(np.nanmean(anchors[-2:]))  # a failed anchor: its neighbour
                else:
                    anchor = anchors[0]
                print(
                    row(model, family, budget or "default", rec, anchor, file_mb, before),
                    flush=True,
                )
                records.append(dict(spec, family=family, anchor=anchor, before=before, **rec))
                Path(spec["out"]).unlink(missing_ok=True)
            print(
                f"| {model} | quantize_static (anchor) | - | ok | "
                f"median {_fmt(float(np.nanmedian(anchors)))} of {len(anchors)} | 1.00 | "
                f"| | | | | |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
