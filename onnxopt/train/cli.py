"""The ``train-env`` and ``distill`` subcommands (hooked into ``onnxopt.cli``).

``onnxopt.cli.build_parser`` calls :func:`add_subcommands` with its subparsers and the
common ``-v/-q`` parent parser; the handlers print, the library does the work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxopt.errors import UsageError

MAX_ROWS = 20  # epochs shown in the history table


def add_subcommands(subparsers, common_parents: list[argparse.ArgumentParser]) -> None:
    """Register ``train-env`` and ``distill`` on the ``onnxopt`` command."""
    p = subparsers.add_parser(
        "train-env",
        parents=common_parents,
        help="create (once) the onnxruntime-training environment used by distill",
        description="Create the distillation adjunct: a venv with onnxruntime-training "
        "1.19.2, onnx 1.17 and torch 2.13 (CPU). Idempotent; prints where it is.",
    )
    p.add_argument("--path", help="where to create it (default $ONNXOPT_TRAIN_ENV or ~/.cache)")
    p.add_argument("--base-python", help="interpreter (3.8-3.12) to build the venv with")
    p.add_argument(
        "--python",
        help="check an existing interpreter that has onnxruntime-training instead of creating one",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    p.add_argument("--check", action="store_true", help="only report; exit 1 when absent")
    p.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for pip install (repeatable), e.g. --pip-arg=--index-url=URL",
    )
    p.set_defaults(handler=cmd_train_env)

    p = subparsers.add_parser(
        "distill",
        parents=common_parents,
        help="train a student model to match a teacher (knowledge distillation)",
        description="Train STUDENT to reproduce TEACHER's outputs on --data with "
        "onnxruntime-training (run `onnxopt train-env` once first).",
    )
    p.add_argument("--teacher", required=True, help="teacher .onnx (never modified)")
    p.add_argument("--student", required=True, help="student .onnx (never modified)")
    p.add_argument("--data", required=True, help=".npz (keys = input names) or a folder")
    p.add_argument("--labels", help="key of integer class labels in the --data .npz")
    p.add_argument("-o", "--output", required=True, help="trained student .onnx")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument(
        "--loss",
        choices=["auto", "kl", "bce", "mse", "cosine"],
        default="auto",
        help="kl: softened class scores (per timestep for [N, T, C]); bce: binary KL on the "
        "logits of a Sigmoid output; mse: relative to the teacher's power; cosine: along the "
        "last axis; auto: kl for classifier scores and CTC probabilities, bce for Sigmoid "
        "maps, else mse",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;...]",
        help="loss, weight, temperature of one distilled output (repeatable), e.g. "
        "--target stateN:weight=0.5 --target emb:loss=cosine; weight=0 leaves it out",
    )
    p.add_argument("--temperature", type=float, default=2.0, help="KL softening (loss=kl)")
    p.add_argument(
        "--alpha", type=float, default=None, help="hard-label loss weight (default 0.5 with labels)"
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument(
        "--schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="learning-rate schedule after warm-up (default cosine)",
    )
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out fraction (best epoch)")
    p.add_argument("--seed", type=int, default=0, help="shuffling and split seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds (0: none)")
    p.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep the tensors whose names match frozen (repeatable), e.g. to train only "
        "past an op onnxruntime-training cannot differentiate",
    )
    p.add_argument("--python", help="adjunct interpreter (default: the train-env venv)")
    p.add_argument("--report", help="write the training history as JSON here")
    p.set_defaults(handler=cmd_distill)


def cmd_train_env(args) -> int:
    from onnxopt.train import env

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    explicit = args.python or (None if args.path or args.force else _env_python())
    if explicit:
        python = env.find_python(explicit)
        versions = env.probe(python)
        print(f"training interpreter: {python}")
        print("  " + _versions(versions))
        return 0
    target = Path(args.path).expanduser() if args.path else env.default_env_dir()
    if args.check:
        marker = env.read_marker(target)
        if not env.is_ready(target) or marker is None:
            print(f"no training environment at {target}; run `onnxopt train-env`")
            return 1
        print(f"training environment: {target}")
        print(f"  python: {env.env_python(target)}")
        print("  " + _versions(marker.get("versions", {})))
        return 0
    python, created = env.create_env(
        target, base_python=args.base_python, force=args.force, pip_args=args.pip_arg, say=say
    )
    state = "created" if created else "already set up"
    print(f"training environment ({state}): {target}")
    print(f"  python: {python}")
    marker = env.read_marker(target) or {}
    if marker.get("versions"):
        print("  " + _versions(marker["versions"]))
    return 0


def _env_python() -> str | None:
    import os

    from onnxopt.train.env import ENV_PYTHON_VAR

    return os.environ.get(ENV_PYTHON_VAR) or None


def _versions(versions: dict) -> str:
    return (
        f"Python {versions.get('python', '?')}, onnxruntime-training "
        f"{versions.get('onnxruntime', '?')}, onnx {versions.get('onnx', '?')}, "
        f"numpy {versions.get('numpy', '?')}"
    )


def cmd_distill(args) -> int:
    from onnxopt.train.api import DistillOptions, distill

    output = Path(args.output)
    for source in (args.teacher, args.student):
        if Path(source).exists() and output.resolve() == Path(source).resolve():
            raise UsageError(f"refusing to overwrite the input file {source}; choose another -o")
    if not output.resolve().parent.is_dir():
        raise UsageError(f"output folder {output.parent} does not exist")
    options = DistillOptions.pick(args, outputs=args.target)
    result = distill(
        args.teacher,
        args.student,
        args.data,
        labels=args.labels,
        options=options,
        python=args.python,
        timeout=args.timeout or None,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    saved = result.save(output)
    if args.report:
        Path(args.report).write_text(json.dumps(result.summary(), indent=2) + "\n")
    if not args.quiet:
        print(format_history(result.history, result.best_epoch))
        for note in result.notes:
            print(f"note: {note}")
        print(
            f"best epoch {result.best_epoch} of {len(result.history) - 1} "
            f"({result.train_samples} training / {result.heldout_samples} held-out rows, "
            f"{result.seconds:.1f} s)"
        )
        print(f"wrote {saved}")
    return 0


def format_history(history: list[dict], best_epoch: int) -> str:
    """Per-epoch table: train loss, held-out loss, agreement with the teacher, accuracy,
    the worst held-out SQNR over the distilled outputs."""
    columns = ("epoch", "train_loss", "heldout_loss", "agreement", "accuracy", "worst_sqnr_db")
    rows = [list(columns)]
    step = -(-len(history) // MAX_ROWS)  # ceil: at most about MAX_ROWS rows
    last = history[-1]["epoch"] if history else 0
    shown = [h for h in history if h["epoch"] % step == 0 or h["epoch"] in (best_epoch, last)]
    for record in shown:
        row = []
        for key in columns:
            value = record.get(key)
            if key == "epoch":
                row.append(f"{value}{' *' if value == best_epoch else ''}")
            elif value is None:
                row.append("-")
            elif key in ("agreement", "accuracy"):
                row.append(f"{100 * value:.2f}%")
            elif key == "worst_sqnr_db":
                row.append(f"{value:.1f} dB")
            else:
                row.append(f"{value:.4g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    every = f"1 epoch in {step} shown; " if step > 1 else ""
    legend = f"({every}* = best epoch on the held-out split; epoch 0 = before training)"
    return "\n".join([*lines, legend])
