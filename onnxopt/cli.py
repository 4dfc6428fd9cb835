"""The ``onnxopt`` command: a thin layer that parses arguments, calls the library and
prints. Exit codes: 0 ok, 1 a check failed (``--on-fail abort``, ``compare`` over
budget), 2 bad input or usage, 130 interrupted. No traceback unless ``-v``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxopt import __version__
from onnxopt.errors import CheckFailed, DataError, OnnxoptError, UsageError, first_line
from onnxopt.train.cli import add_subcommands as add_train_subcommands
from onnxopt.tune.cli import add_subcommand as add_tune_subcommand

log = logging.getLogger("onnxopt")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.handler(args)
    except CheckFailed as exc:
        if exc.outcome is not None and not args.quiet:
            from onnxopt.report import build_report, format_table

            report = build_report(exc.outcome)
            print(format_table(report, width=_terminal_width(), wide=getattr(args, "wide", False)))
            if getattr(args, "report", None):
                from onnxopt.report import write_report

                write_report(report, args.report)
        print(f"onnxopt: check failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except OnnxoptError as exc:
        if args.verbose:
            raise
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxopt passes | head -1`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except Exception as exc:  # an internal bug: one line unless -v
        if args.verbose:
            raise
        first = first_line(exc, 400)
        print(
            f"onnxopt: internal error: {type(exc).__name__}: {first} "
            "(run with -v for the traceback)",
            file=sys.stderr,
        )
        return 3


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(
        level=level, format="onnxopt: %(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("onnxopt").setLevel(level)
    # graphsurgeon is chatty at WARNING about things we handle ourselves
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    try:
        import onnx_graphsurgeon as gs

        gs.logger.G_LOGGER.severity = (
            gs.logger.G_LOGGER.ERROR if not verbose else gs.logger.G_LOGGER.WARNING
        )
    except Exception:  # pragma: no cover - logger API differences across versions
        pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with one line, as argparse does, plus a hint
        self.print_usage(sys.stderr)
        print(f"onnxopt: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    # -v / -q work before or after the subcommand: the subcommands' copies default to
    # SUPPRESS, so they never overwrite what the top-level parser already set
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logs and tracebacks",
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="errors only, no tables or bars",
    )

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", help=".npz (keys = input names) or a folder of .npy/.pb files")
    data.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="concrete shape for an input with dynamic dims, e.g. input=1x3x224x224",
    )
    data.add_argument(
        "--seed", type=int, default=None, help="seed for data generation/splits (default 0)"
    )

    parser = _Parser(
        prog="onnxopt",
        description="Optimize ONNX models and prove they still compute the same thing.",
    )
    # its own copies (parents share action objects: a default set here would be theirs)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only, no tables or bars")
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "optimize", parents=[common, data], help="run a pipeline of passes on a model"
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--passes", help='pipeline text, e.g. "fold-batchnorm,cleanup"')
    source.add_argument("--pipeline", help="TOML pipeline file")
    p.add_argument(
        "--budget", help='budget for lossy steps, e.g. "cosine>=0.99,top1>=0.99", or "none"'
    )
    p.add_argument(
        "--on-fail",
        choices=["rollback", "abort"],
        default=None,
        help="when a step breaks its budget: roll it back and go on (default) or stop",
    )
    p.add_argument("--report", help="write the report here: .html (a page with plots) or .json")
    p.add_argument(
        "--calib-samples", type=_count(0), default=None, help="calibration samples (default 64)"
    )
    p.add_argument(
        "--val-samples", type=_count(1), default=None, help="validation samples (default 32)"
    )
    p.add_argument(
        "--allow-suspect-data",
        action="store_true",
        help="go on when the original's outputs on the data are NaN, all Inf, or the "
        "same for every sample (the checks then prove little)",
    )
    p.add_argument(
        "--wide", action="store_true", help="the full summary table, whatever the terminal width"
    )
    p.add_argument(
        "--external-data", action="store_true", help="store weights in OUTPUT.<hash>.data"
    )
    p.set_defaults(handler=cmd_optimize)

    p = sub.add_parser("passes", parents=[common], help="list passes, or show one pass's options")
    p.add_argument("name", nargs="?")
    p.set_defaults(handler=cmd_passes)

    p = sub.add_parser(
        "inspect", parents=[common], help="opset, ops, parameters, weights of a model"
    )
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--prunable", action="store_true", help="list remove-neurons' channel groups instead"
    )
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("compare", parents=[common, data], help="numeric comparison of two models")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--budget", help="exit 1 when the candidate breaks this budget")
    p.add_argument(
        "--samples", type=_count(1), default=32, help="samples to compare on (default 32)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--allow-suspect-data",
        action="store_true",
        help="compare even when the reference's outputs are NaN, all Inf, or the same for "
        "every sample",
    )
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "bench", parents=[common, data], help="onnxruntime latency, interleaved medians"
    )
    p.add_argument("models", nargs="+")
    p.add_argument("--threads", default="1", help="thread counts, comma-separated (default 1)")
    p.add_argument(
        "--rounds",
        type=_count(1),
        default=30,
        help="rounds; each runs every model in turn, and the medians are over rounds (default 30)",
    )
    p.add_argument("--runs", type=_count(1), default=5, help="runs per round (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_bench)
    add_train_subcommands(sub, [common])  # train-env, distill (onnxopt/train/cli.py)
    add_tune_subcommand(sub, [common])  # tune (onnxopt/tune/cli.py)
    return parser


def _terminal_width() -> int:
    """Columns of the terminal (80 when output goes to a pipe or file)."""
    return shutil.get_terminal_size((80, 24)).columns


def _count(minimum: int):
    """argparse type: an integer >= minimum, with an error naming the flag's rule."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value

    return parse


# ---------------------------------------------------------------------------- commands


def cmd_optimize(args) -> int:
    from onnxopt.api import optimize
    from onnxopt.report import format_table, write_report

    output = Path(args.output)
    if not output.parent.resolve().is_dir():
        raise UsageError(f"output folder {output.parent} does not exist")
    if Path(args.model).exists() and output.resolve() == Path(args.model).resolve():
        raise UsageError(f"refusing to overwrite the input file {args.model}; choose another -o")
    if args.data and args.shape:
        log.warning("--shape is ignored with --data: shapes come from the data")
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise UsageError(f"report folder {Path(args.report).parent} does not exist")
    result = optimize(
        args.model,
        args.passes if args.passes is not None else Path(args.pipeline),
        data=args.data,
        budget=args.budget,
        seed=args.seed,
        on_fail=args.on_fail,
        shapes=args.shape or None,
        calibration_samples=args.calib_samples,
        validation_samples=args.val_samples,
        progress=not args.quiet and sys.stderr.isatty(),
        allow_suspect_data=args.allow_suspect_data,
    )
    saved = result.save(output, external_data=True if args.external_data else None)
    result.report["output"] = str(saved)
    if args.report:
        write_report(result.report, args.report)
    if not args.quiet:
        print(format_table(result.report, width=_terminal_width(), wide=args.wide))
        print(f"wrote {saved}")
    return 0


def cmd_passes(args) -> int:
    from onnxopt.pipeline import get_pass, registry

    if args.name is None:
        passes = registry()
        width = max(len(n) for n in passes)
        for name in sorted(passes):
            cls = passes[name]
            kind = "lossless" if cls.lossless else "lossy"
            print(f"{name.ljust(width)}  {kind:<8}  {cls.summary}")
        return 0
    from onnxopt.passhelp import describe_pass

    print(describe_pass(get_pass(args.name), width=min(_terminal_width(), 100)))
    return 0


def cmd_inspect(args) -> int:
    from onnxopt.inspection import describe, format_description

    if args.prunable:
        from onnxopt.model import load_model
        from onnxopt.passes.neurons.listing import format_prunable, prunable_groups

        info = prunable_groups(load_model(args.model).proto)
        print(json.dumps(info, indent=2) if args.json else format_prunable(info))
        return 0
    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_compare(args) -> int:
    from onnxopt.check import (
        Budget,
        class_score_outputs,
        compare_outputs,
        suspect_reference,
        worst,
    )
    from onnxopt.data import input_specs, prepare_samples
    from onnxopt.model import load_model
    from onnxopt.pipeline import original_outputs

    budget = Budget.parse(args.budget) if args.budget else None
    reference, candidate = load_model(args.reference), load_model(args.candidate)
    samples = prepare_samples(
        reference.proto,
        args.data,
        shapes=args.shape or None,
        seed=args.seed or 0,
        calibration_samples=0,
        validation_samples=args.samples,
    ).validation
    ref_inputs = {s.name for s in input_specs(reference.proto)}
    extra = {s.name for s in input_specs(candidate.proto)} - ref_inputs
    if extra:
        raise UsageError(
            f"{args.candidate} needs input(s) {', '.join(sorted(extra))} that "
            f"{args.reference} does not have; the models must take the same inputs"
        )
    outs = []
    for loaded in (reference, candidate):
        where = loaded.path or "model"
        try:
            outs.append(original_outputs(loaded.proto, samples))
        except OnnxoptError as exc:
            raise type(exc)(f"{where}: {exc}") from None
    suspect, notes = suspect_reference(outs[0])
    if suspect and not args.allow_suspect_data:
        raise DataError(
            f"{reference.path or 'the reference'}: its outputs on this data cannot be "
            f"trusted: {'; '.join(suspect)}; give other data (or --allow-suspect-data)"
        )
    for note in [*notes, *suspect]:
        log.warning("%s", note)
    ref_names, cand_names = set(outs[0][0]), set(outs[1][0])
    if ref_names != cand_names:
        raise UsageError(
            f"the models have different outputs: {sorted(ref_names)} vs {sorted(cand_names)}"
        )
    try:
        metrics = compare_outputs(
            outs[0],
            outs[1],
            budget.tolerance if budget else None,
            class_score_outputs(reference.proto),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    problems = budget.violations(metrics) if budget else []
    if args.json:
        print(
            json.dumps(
                {
                    "metrics": {k: m.as_dict() for k, m in metrics.items()},
                    "worst": {
                        k: v for k, v in worst(metrics).items() if v is not None and np.isfinite(v)
                    },
                    "budget": str(budget) if budget else None,
                    "violations": problems,
                },
                indent=2,
            )
        )
    else:
        print(_metrics_table(metrics, len(samples)))
        for problem in problems:
            print(f"over budget: {problem}")
        if budget:
            verdict = "within" if not problems else "FAILED"
            print(f"{verdict} budget {budget} on {len(samples)} samples")
    return 1 if problems else 0


def _metrics_table(metrics, samples: int) -> str:
    header = ["output", "max_abs", "max_rel", "mean_abs", "cosine", "sqnr_db", "top1", "nonfinite"]
    rows = [header]
    for name, m in metrics.items():
        if not m.is_float:
            rows.append([name, f"{m.mismatch} mismatched elements", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{m.max_abs:.3g}",
                f"{m.max_rel:.3g}",
                f"{m.mean_abs:.3g}",
                f"{m.cosine:.6f}",
                f"{m.sqnr:.1f}",
                "-" if m.top1 is None else f"{m.top1:.4f}",
                str(m.nonfinite),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"({samples} samples)")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from onnxopt.bench import measure_latency
    from onnxopt.data import timing_feed
    from onnxopt.model import load_model

    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise UsageError(f"--threads {args.threads!r}: expected integers like 1,2") from None
    if any(t < 1 for t in threads) or args.rounds < 1 or args.runs < 1:
        raise UsageError("--threads, --rounds and --runs must be >= 1")
    loaded = [load_model(path) for path in args.models]
    feed = timing_feed(loaded[0].proto, args.data, shapes=args.shape or None, seed=args.seed or 0)
    timings = measure_latency(
        [(str(m.path.name), m.proto) for m in loaded],
        feed,
        threads=threads,
        rounds=args.rounds,
        runs_per_round=args.runs,
    )
    if args.json:
        print(json.dumps([dataclasses.asdict(t) for t in timings], indent=2))
        return 0
    width = max(len(t.label) for t in timings)
    print(f"{'model'.ljust(width)}  threads  median_ms  p10_ms  p90_ms  ratio")
    for t in timings:
        print(
            f"{t.label.ljust(width)}  {t.threads:>7}  {t.median_ms:9.3f}  "
            f"{t.p10_ms:6.3f}  {t.p90_ms:6.3f}  {t.ratio:5.2f}"
        )
    print(
        f"({args.rounds} interleaved rounds x {args.runs} runs, medians; "
        f"ratio vs {timings[0].label})"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
