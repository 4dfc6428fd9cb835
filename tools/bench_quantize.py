"""Side by side: onnxopt ``quantize-int8`` vs onnxruntime's ``quantize_static``.

For each model, in one run, on the same calibration samples and the same evaluation
data:

- **ort-tool**: ``onnxruntime.quantization.quant_pre_process`` (the tool's
  recommended preprocessing; it folds BatchNormalization) then ``quantize_static``
  with ``QuantFormat.QDQ``, ``per_channel=True``, uint8 activations / int8 weights
  (the tool's advice for x86 with VNNI) and its calibration method (``--tool-method``,
  default MinMax, the tool's default; it has no MSE method).
- **onnxopt**: ``fold-batchnorm,quantize-int8(method=...)`` through
  ``onnxopt.optimize`` (so the time includes onnxopt's own checks), default budget.

Reported per model: output SQNR (dB) and cosine vs fp32, top-1 agreement with fp32,
test accuracy (digits models), file size, onnxruntime latency at 1 and 2 threads
(``onnxopt.bench.measure_latency``: fp32, tool and onnxopt interleaved, medians,
all graph optimizations), quantization wall time and peak memory (each quantization
runs in a fresh process; peak RSS above the process's RSS after loading model and
data). Then calibration memory of onnxopt on the ResNet at 32 vs 256 samples.

Models: the committed digits MLP / CNN / transformer / MLP-with-Constant-nodes
(opset 11), and a ResNet-18-shaped network (torch, random weights with BatchNorm
statistics computed on the synthetic images, exported at 224x224 into a temporary
folder; inputs are seeded smooth random images, so it has no accuracy — top-1
agreement with fp32 is the classification figure).

    python tools/bench_quantize.py                      # everything (~3 min)
    python tools/bench_quantize.py --models mlp,cnn --no-memory
    python tools/bench_quantize.py --method percentile --tool-method percentile
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DIGITS = {
    "mlp": "digits_mlp",
    "cnn": "digits_cnn",
    "transformer": "digits_transformer",
    "mlp-op11": "digits_mlp_op11_constants",
}
CALIBRATION, VALIDATION, SEED = 64, 32, 0
# The ResNet has random weights and no classes: its 1000 logits are close to tied, so
# top-1 agreement flips on noise far below what changes a trained model's answer.
# onnxopt gets a cosine budget there; the digits models keep the default budget.
BUDGETS = {"resnet18": "cosine>=0.99,nonfinite<=0"}
TOOL_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# ---------------------------------------------------------------------------- models and data


def build_resnet18(folder: Path, samples: int) -> tuple[Path, np.ndarray]:
    """ResNet-18-shaped torch model exported at 224x224, plus synthetic images."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))  # fmt: skip

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    channels = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(channels, cout, stride), Block(cout, cout, 1)]
        channels = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    model = nn.Sequential(*layers)
    images = synthetic_images(samples, seed=1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: statistics of the images
    model.train()
    with torch.no_grad():
        for start in range(0, 64, 16):
            model(torch.from_numpy(images[start : start + 16]))
    model.eval()
    path = folder / "resnet18.onnx"
    torch.onnx.export(
        model, torch.from_numpy(images[:1]), str(path), input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    return path, images


def synthetic_images(count: int, seed: int) -> np.ndarray:
    """Smooth random images (low-frequency noise, normalised like ImageNet inputs)."""
    rng = np.random.default_rng(seed)
    small = rng.standard_normal((count, 3, 14, 14)).astype(np.float32)
    images = np.repeat(np.repeat(small, 16, axis=2), 16, axis=3)
    kernel = np.ones(9, np.float32) / 9
    for axis in (2, 3):
        images = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, images)
    return images.astype(np.float32)


# ---------------------------------------------------------------------------- child jobs


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def quantize_job(
    kind: str, model: str, data: str, out: str, method: str, calib: int, budget: str | None = None
) -> dict:
    """Runs in a fresh process: quantize, save, report wall time and peak memory."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )  # fmt: skip
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnxopt
    import onnxopt.passes.quantize
    from onnxopt.data import prepare_samples

    with np.load(data) as arrays:
        inputs = arrays["input"]
    proto = onnx.load(model)
    baseline = _current_rss_mb()  # modules, model and data loaded: measure the work only
    start = time.perf_counter()
    info: dict = {}
    if kind == "onnxopt":
        result = onnxopt.optimize(
            model, f"fold-batchnorm,quantize-int8(method={method})", data={"input": inputs},
            calibration_samples=calib, validation_samples=VALIDATION, seed=SEED, budget=budget,
        )  # fmt: skip
        step = result.steps[-1]
        info = {"status": step["status"], "reason": step.get("reason", ""),
                "notes": step.get("notes", [])}  # fmt: skip
        onnx.save(result.model, out)
    else:
        samples = prepare_samples(
            proto, {"input": inputs}, seed=SEED, calibration_samples=calib,
            validation_samples=VALIDATION,
        ).calibration  # fmt: skip

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(samples)

            def get_next(self):
                return next(self.items, None)

        pre = out + ".pre.onnx"
        quant_pre_process(model, pre, skip_symbolic_shape=False)
        quantize_static(
            pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, TOOL_METHODS[method]),
        )  # fmt: skip
        os.remove(pre)
        info = {"status": "ok"}
    info["seconds"] = time.perf_counter() - start
    info["peak_mb"] = max(_rss_mb() - baseline, 0.0)
    return info


def run_isolated(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(quantize_job, *args).result()


# ---------------------------------------------------------------------------- metrics


def evaluate(model_path: str, inputs: np.ndarray) -> np.ndarray:
    import onnx

    from onnxopt.runtime import make_session

    session = make_session(onnx.load(model_path), optimize=True)
    outputs = [
        session.run(None, {"input": inputs[i : i + 32]})[0] for i in range(0, len(inputs), 32)
    ]
    return np.concatenate(outputs)


def load_problem(model_path: str) -> str | None:
    import onnx

    from onnxopt.runtime import make_session

    try:
        make_session(onnx.load(model_path), optimize=True)
    except Exception as exc:
        return str(exc).split(" : ")[-1][:80]
    return None


def compare(reference: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    r, g = reference.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    noise = float(np.sum((g - r) ** 2))
    return {
        "sqnr": 10 * np.log10(float(np.sum(r * r)) / noise) if noise else float("inf"),
        "cosine": float(np.dot(r, g) / (np.linalg.norm(r) * np.linalg.norm(g))),
        "top1": float(np.mean(reference.argmax(1) == got.argmax(1))),
        "accuracy": float(np.mean(got.argmax(1) == labels)) if labels is not None else None,
    }


def latencies(paths: dict[str, str], feed: np.ndarray, heavy: bool) -> dict:
    import onnx

    from onnxopt.bench import measure_latency

    models = [(label, onnx.load(path)) for label, path in paths.items()]
    # 2-thread int8 latency on a 2-core machine is noisy (p10-p90 spans ~40 %): the
    # heavy model needs many rounds for a stable median (12 rounds gave 1.14-1.19,
    # 100 rounds 0.99 for the same two files)
    rounds, runs = (50, 2) if heavy else (30, 20)
    timings = measure_latency(models, {"input": feed}, threads=(1, 2), rounds=rounds,
                              runs_per_round=runs, warmup=3)  # fmt: skip
    return {(t.label, t.threads): t.median_ms for t in timings}


# ---------------------------------------------------------------------------- driver


def prepare(name: str, folder: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]:
    """(model path, calibration+validation inputs, evaluation inputs, labels)."""
    if name == "resnet18":
        path, images = build_resnet18(folder, CALIBRATION + VALIDATION + 64)
        return path, images[: CALIBRATION + VALIDATION], images[-64:], None
    with np.load(MODELS / "digits_train.npz") as train, np.load(MODELS / "digits_test.npz") as test:
        return MODELS / f"{DIGITS[name]}.onnx", train["input"], test["input"], test["label"]


def bench_model(name: str, folder: Path, args) -> dict:
    path, data, evaluation, labels = prepare(name, folder)
    data_file = folder / f"{name}_data.npz"
    np.savez(data_file, input=data)
    outputs = {"fp32": str(path)}
    jobs = {}
    for kind, method in (("ort-tool", args.tool_method), ("onnxopt", args.method)):
        out = str(folder / f"{name}_{kind}.onnx")
        jobs[kind] = run_isolated(
            kind, str(path), str(data_file), out, method, CALIBRATION, BUDGETS.get(name)
        )
        outputs[kind] = out
    problem = load_problem(outputs["ort-tool"])
    if problem:
        # e.g. opset 11: the tool writes per-channel DequantizeLinear (axis) that
        # opset 11 does not have. Give it the model converted to opset 13 instead.
        upgraded = folder / f"{name}_opset13.onnx"
        import onnx

        onnx.save(onnx.version_converter.convert_version(onnx.load(str(path)), 13), upgraded)
        jobs["ort-tool"] = run_isolated(
            "ort-tool", str(upgraded), str(data_file), outputs["ort-tool"], args.tool_method,
            CALIBRATION,
        )  # fmt: skip
        jobs["ort-tool"]["status"] = f"own output invalid ({problem}); rerun on opset 13"
    reference = evaluate(outputs["fp32"], evaluation)
    row = {"model": name, "jobs": jobs}
    for kind in ("ort-tool", "onnxopt"):
        row[kind] = compare(reference, evaluate(outputs[kind], evaluation), labels)
        row[kind]["size"] = os.path.getsize(outputs[kind])
    row["fp32"] = compare(reference, reference, labels)
    row["fp32"]["size"] = os.path.getsize(outputs["fp32"])
    row["latency"] = latencies(outputs, evaluation[:1], heavy=name == "resnet18")
    from onnxopt.passes.quantize.speed import runtime_ops

    row["runtime"] = {
        kind: runtime_ops(onnx_load(outputs[kind])) for kind in ("ort-tool", "onnxopt")
    }
    return row


def onnx_load(path: str):
    import onnx

    return onnx.load(path)


def memory_check(folder: Path) -> list[tuple[int, dict]]:
    path, _ = build_resnet18(folder, 8) if not (folder / "resnet18.onnx").exists() else (
        folder / "resnet18.onnx", None)  # fmt: skip
    results = []
    for count in (32, 256):
        data = synthetic_images(count + VALIDATION, seed=7)
        data_file = folder / f"memory_{count}.npz"
        np.savez(data_file, input=data)
        out = str(folder / f"memory_{count}.onnx")
        info = run_isolated(
            "onnxopt", str(path), str(data_file), out, "mse", count, BUDGETS["resnet18"]
        )
        info["data_mb"] = data.nbytes / 2**20
        results.append((count, info))
    return results


def int4_rows(folder: Path) -> list[dict]:
    """quantize-int4 on the transformer: both forms, size of the MatMul weights, latency."""
    import onnx

    import onnxopt
    import onnxopt.passes.quantize

    path = MODELS / "digits_transformer.onnx"
    with np.load(MODELS / "digits_test.npz") as test:
        evaluation, labels = test["input"], test["label"]
    reference = evaluate(str(path), evaluation)
    paths = {"fp32": str(path)}
    rows = []
    for form in ("dq", "matmulnbits"):
        start = time.perf_counter()
        result = onnxopt.optimize(path, f"quantize-int4(format={form})",
                                  data=str(MODELS / "digits_train.npz"))  # fmt: skip
        seconds = time.perf_counter() - start
        out = folder / f"transformer_int4_{form}.onnx"
        onnx.save(result.model, out)
        paths[f"int4-{form}"] = str(out)
        row = compare(reference, evaluate(str(out), evaluation), labels)
        row.update(form=form, seconds=seconds, size=os.path.getsize(out),
                   matmul_ratio=matmul_weight_ratio(onnx.load(path), result.model))  # fmt: skip
        rows.append(row)
    latency = latencies(paths, evaluation[:1], heavy=False)
    for row in rows:
        row["ms"] = [latency[(f"int4-{row['form']}", t)] for t in (1, 2)]
        row["fp32_ms"] = [latency[("fp32", t)] for t in (1, 2)]
    return rows


def matmul_weight_ratio(original, quantized) -> float:
    """Bytes stored for the MatMul weights after quantize-int4 / their float32 bytes."""
    from onnx import numpy_helper

    inits = {t.name: t for t in original.graph.initializer}
    before = sum(numpy_helper.to_array(inits[n.input[1]]).nbytes for n in original.graph.node
                 if n.op_type == "MatMul" and n.input[1] in inits)  # fmt: skip
    stored = {t.name: t for t in quantized.graph.initializer}
    readers: dict[str, list] = {}
    for node in quantized.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    after = 0
    for node in quantized.graph.node:
        if node.op_type == "MatMulNBits":
            names = node.input[1:4]
        elif node.op_type == "DequantizeLinear" and "MatMul" in readers.get(node.output[0], []):
            names = node.input
        else:
            continue
        after += sum(len(stored[n].raw_data) for n in names if n in stored)
    return after / before


def print_int4(rows: list[dict]) -> None:
    print("\nquantize-int4 on the transformer (symmetric, block_size=32, GPTQ rounding; "
          "latency = median ms, interleaved with fp32)\n")  # fmt: skip
    print("| form | MatMul weights vs fp32 | cosine | SQNR dB | accuracy | size KB | "
          "ms 1 thr (fp32) | ms 2 thr (fp32) | quantize s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['form']} | {r['matmul_ratio']:.3f}x | {r['cosine']:.5f} | {r['sqnr']:.1f} | "
              f"{100 * r['accuracy']:.2f} % | {r['size'] / 1024:.0f} | {r['ms'][0]:.4f} "
              f"({r['fp32_ms'][0]:.4f}) | {r['ms'][1]:.4f} ({r['fp32_ms'][1]:.4f}) | "
              f"{r['seconds']:.1f} |")  # fmt: skip


def print_table(rows: list[dict], args) -> None:
    print(f"\nonnxopt quantize-int8(method={args.method}) vs onnxruntime quantize_static "
          f"(QDQ, per-channel, {TOOL_METHODS[args.tool_method]}); {CALIBRATION} calibration "
          "samples; latency = median ms, interleaved\n")  # fmt: skip
    header = ("| model | tool | SQNR dB | cosine | top-1 vs fp32 | accuracy | size KB | "
              "ms 1 thr | ms 2 thr | quantize s | peak MB |")  # fmt: skip
    print(header)
    print("|---" * 11 + "|")
    for row in rows:
        lat = row["latency"]
        for kind in ("fp32", "ort-tool", "onnxopt"):
            m = row[kind]
            job = row["jobs"].get(kind, {})
            acc = f"{100 * m['accuracy']:.2f} %" if m["accuracy"] is not None else "—"
            sqnr = "∞" if not np.isfinite(m["sqnr"]) else f"{m['sqnr']:.1f}"
            print(
                f"| {row['model']} | {kind} | {sqnr} | {m['cosine']:.5f} | {m['top1']:.4f} | "
                f"{acc} | {m['size'] / 1024:.0f} | {lat[(kind, 1)]:.4f} | {lat[(kind, 2)]:.4f} | "
                f"{job.get('seconds', 0):.1f} | {job.get('peak_mb', 0):.0f} |"
            )
    print("\nonnxopt vs ort-tool: ΔSQNR (dB), latency ratio (onnxopt / tool) at 1 and 2 threads\n")
    print("| model | ΔSQNR dB | latency ratio 1 thr | latency ratio 2 thr | onnxopt step | "
          "ort-tool |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        lat = row["latency"]
        delta = row["onnxopt"]["sqnr"] - row["ort-tool"]["sqnr"]
        ratios = [lat[("onnxopt", t)] / lat[("ort-tool", t)] for t in (1, 2)]
        job = row["jobs"]["onnxopt"]
        status = job["status"] + ("; " + "; ".join(job["notes"]) if job.get("notes") else "")
        tool = row["jobs"]["ort-tool"]["status"]
        print(f"| {row['model']} | {delta:+.1f} | {ratios[0]:.3f} | {ratios[1]:.3f} | {status} "
              f"| {tool} |")  # fmt: skip


def print_runtime(rows: list[dict]) -> None:
    print("\nWhat onnxruntime runs (ops of its optimized graph, all optimizations)\n")
    for row in rows:
        for kind, histogram in row["runtime"].items():
            ops = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in histogram.items())
            print(f"- {row['model']}, {kind}: {ops}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn,transformer,mlp-op11,resnet18")
    parser.add_argument(
        "--method", default="mse", choices=["mse", "minmax", "percentile", "entropy"]
    )
    parser.add_argument("--tool-method", default="minmax", choices=sorted(TOOL_METHODS))
    parser.add_argument("--no-memory", action="store_true", help="skip the 32 vs 256 samples check")
    parser.add_argument("--no-int4", action="store_true", help="skip the quantize-int4 rows")
    parser.add_argument("--keep", type=Path, help="keep the models in this folder")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in DIGITS and n != "resnet18"]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: {', '.join([*DIGITS, 'resnet18'])}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if args.keep is None else args.keep
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"[{name}] quantizing and measuring...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, folder, args))
        print_table(rows, args)
        print_runtime(rows)
        if not args.no_int4:
            print_int4(int4_rows(folder))
        if not args.no_memory:
            print(f"\nonnxopt calibration memory, resnet18 (method=mse; {VALIDATION} validation "
                  "samples on top)\n")  # fmt: skip
            print("| calibration samples | input data MB | peak MB above start | quantize s |")
            print("|---|---|---|---|")
            for count, info in memory_check(folder):
                print(f"| {count} | {info['data_mb']:.0f} | {info['peak_mb']:.0f} | "
                      f"{info['seconds']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
