"""The ``onnxopt tune`` subcommand: parse, call :func:`onnxopt.tune.tune`, print.

Progress goes to stderr, one line per finished trial (trials done/total, the trial,
the smallest budget-meeting point so far, the front's size, ETA); the points table
(one model) or the summary table (several) to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from onnxopt.errors import UsageError


def add_subcommand(subparsers, common_parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "tune",
        parents=common_parents,
        help="search pipelines for the Pareto front of size/latency vs fidelity",
        description="Search pipelines for each model; every trial is a checked optimize "
        "run. Writes pareto.json, pareto.html and the Pareto models to OUTDIR.",
    )
    p.add_argument("models", nargs="+", help="models (.onnx) and/or folders of models")
    p.add_argument("-o", "--output", required=True, help="output folder (created; resumable)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DATA|NAME=DATA",
        help="data for every model, or NAME=DATA per model name (repeat); default: generated",
    )
    p.add_argument(
        "--budget", help='budget every trial must meet, e.g. "top1>=0.99" (default: lossy defaults)'
    )
    p.add_argument(
        "--objective",
        choices=["size", "latency", "both"],
        default="size",
        help="what to minimize against fidelity (default size: deterministic; latency is noisy)",
    )
    p.add_argument("--trials", type=int, default=20, help="trials per model (default 20)")
    p.add_argument("--seed", type=int, default=0, help="search and data seed (default 0)")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where trials run: a local process pool (default) or Ray tasks",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="parallel trials (default: the core count)"
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--space", help="search space TOML (replaces the model-derived default)")
    p.add_argument(
        "--shape", action="append", default=[], metavar="NAME=DIMS", help="dynamic input shape"
    )
    p.add_argument("--threads", type=int, default=1, help="latency threads (default 1)")
    p.add_argument(
        "--calib-samples", type=int, default=None, help="calibration samples (default 64)"
    )
    p.add_argument("--val-samples", type=int, default=None, help="validation samples (default 32)")
    p.set_defaults(handler=cmd_tune)


def _data_argument(values: list[str]):
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    mapping = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(
                f"--data {value!r}: give one DATA for every model, or NAME=DATA per model"
            )
        mapping[name] = path
    return mapping


def cmd_tune(args) -> int:
    from onnxopt.tune.api import tune

    show = not args.quiet
    try:
        result = tune(
            args.models,
            args.output,
            data=_data_argument(args.data),
            budget=args.budget,
            objective=args.objective,
            trials=args.trials,
            seed=args.seed,
            engine=args.engine,
            workers=args.workers,
            ray_address=args.ray_address,
            space=Path(args.space) if args.space else None,
            shapes=args.shape or None,
            calibration_samples=args.calib_samples,
            validation_samples=args.val_samples,
            threads=args.threads,
            on_progress=_print_progress if show else None,
        )
    except KeyboardInterrupt:
        print(
            f"onnxopt: tune interrupted; finished trials are cached in "
            f"{os.path.join(args.output, 'cache')}: rerun the same command to resume",
            file=sys.stderr,
        )
        raise
    if show:
        for outcome in result.outcomes:
            print(format_points(outcome.pareto, outcome.name))
            print(f"wrote {outcome.folder / 'pareto.json'} and {outcome.folder / 'pareto.html'}")
        if len(result.outcomes) > 1:
            print(format_summary(result.summary))
            print(f"wrote {result.outdir / 'summary.json'}")
    return 0


def _size(n: float | None) -> str:
    from onnxopt.html import format_bytes

    return "-" if n is None else format_bytes(n)


def _print_progress(event) -> None:
    record = event.record
    status = "cached" if event.cached else record["status"]
    fid = record.get("metrics", {}) or {}
    figures = f"{_size(record.get('size_bytes')):>9}"
    if "sqnr" in fid:
        figures += f"  sqnr {float(fid['sqnr']):6.1f} dB"
    line = (
        f"[{event.done:>3}/{event.total}] {event.model} trial {record['trial']:<3} "
        f"{status:<11} {figures}  {record.get('seconds', 0):5.1f}s"
    )
    if event.best is not None:
        line += f" | front {event.front}, smallest {_size(event.best.get('size_bytes'))}"
    if event.eta_seconds is not None:
        minutes, seconds = divmod(int(event.eta_seconds), 60)
        line += f" | ETA {minutes}:{seconds:02d}"
    if record["status"] != "ok" and record.get("reason"):
        line += f"\n          {record['reason'].splitlines()[0][:160]}"
    print(line, file=sys.stderr, flush=True)


def format_points(pareto: dict, name: str) -> str:
    original = pareto["original"]["size_bytes"]
    rows = [["trial", "size", "x orig", pareto["fidelity"], "latency ms", "pipeline"]]
    for point in pareto["points"]:
        fid = point.get("fidelity")
        rows.append(
            [
                str(point["trial"]),
                _size(point["size_bytes"]),
                f"{point['size_bytes'] / original:.3f}",
                f"{fid:.4g}" if isinstance(fid, float) else str(fid),
                "-" if point.get("latency_ms") is None else f"{point['latency_ms']:.3f}",
                point["pipeline"],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"{name}: {len(pareto['points'])} Pareto points of {len(pareto['trials'])} trials"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def format_summary(summary: list[dict]) -> str:
    rows = [["model", "trials", "ok", "over", "errors", "points", "original", "smallest", "x"]]
    for row in summary:
        rows.append(
            [
                row["model"],
                str(row["trials"]),
                str(row["ok"]),
                str(row["over_budget"]),
                str(row["errors"]),
                str(row["points"]),
                _size(row["original_bytes"]),
                _size(row["smallest_bytes"]),
                "-" if row["smallest_ratio"] is None else f"{row['smallest_ratio']:.3f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
