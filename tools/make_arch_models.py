"""Export real architectures (random weights) for the remove-neurons benchmarks.

Builds, with no weights downloaded, and exports with ``torch.onnx.export``:

- ``shufflenet_v2``: torchvision ``shufflenet_v2_x1_0`` (channel shuffle, chunk/concat);
- ``mobilenet_v3``: torchvision ``mobilenet_v3_small`` (SE gates, HardSwish,
  HardSigmoid, depthwise Conv);
- ``efficientnet_b0``: torchvision ``efficientnet_b0`` (SiLU, SE gates with SiLU,
  depthwise Conv);
- ``yolov8n``: ultralytics ``yolov8n.yaml`` without weights (C2f split/concat blocks,
  SPPF, Upsample + Concat neck, DFL head; ``ultralytics`` must be installed);
- ``crnn_lstm``: a CRNN-style OCR recognizer (Conv stack, bidirectional LSTM, GRU,
  Linear), plain torch;
- ``bert_tiny_op14``: a 2-layer BERT-style encoder (hand-written attention,
  ``nn.LayerNorm``) exported at opset 14, so LayerNorm is decomposed into
  ReduceMean / Sub / Pow / Sqrt / Div.

torchvision does not import beside the project's torch (2.13.0), so this script runs
in a tools venv::

    python -m venv /work/venvs/tv
    /work/venvs/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript \
        onnxruntime ultralytics
    /work/venvs/tv/bin/python tools/make_arch_models.py   # -> ~/.cache/onnxopt/arch

(ultralytics builds YOLOv8n from the yaml it ships, offline; without it the yolov8n
entry fails with the import error and the others are still built.)

Every export is checked with the onnx checker and run in onnxruntime (when it is
installed in that venv) against the torch output. Models are cached, not committed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx

ARCH_DIR = Path(os.environ.get("ONNXOPT_ARCH_DIR", Path.home() / ".cache/onnxopt/arch"))
NAMES = (
    "shufflenet_v2",
    "mobilenet_v3",
    "efficientnet_b0",
    "yolov8n",
    "crnn_lstm",
    "bert_tiny_op14",
)


def arch_path(name: str, directory: Path | None = None) -> Path:
    return (directory or ARCH_DIR) / f"{name}.onnx"


# ---------------------------------------------------------------------------- builders


def _torchvision(name: str):
    import torchvision

    factory = {
        "shufflenet_v2": torchvision.models.shufflenet_v2_x1_0,
        "mobilenet_v3": torchvision.models.mobilenet_v3_small,
        "efficientnet_b0": torchvision.models.efficientnet_b0,
    }[name]
    return factory(weights=None), {"input": (1, 3, 224, 224)}


def _yolo():
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml").model
    model.eval()
    for module in model.modules():  # what ultralytics' own export sets
        if type(module).__name__ == "Detect":
            module.export = True
            module.format = "onnx"
    return model, {"images": (1, 3, 320, 320)}


def _crnn_lstm():
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, width = [], 1
            for out in (32, 64, 96):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                layers += [nn.MaxPool2d((2, 1) if out == 96 else 2)]
                width = out
            self.cnn = nn.Sequential(*layers)
            self.lstm = nn.LSTM(96 * 4, 96, bidirectional=True, batch_first=False)
            self.gru = nn.GRU(192, 64)
            self.head = nn.Linear(64, 40)

        def forward(self, x):
            f = self.cnn(x)  # [B, 96, 4, W/4]
            b, c, h, w = f.shape
            seq = f.permute(3, 0, 1, 2).reshape(w, b, c * h)
            seq, _ = self.lstm(seq)
            seq, _ = self.gru(seq)
            return self.head(seq).log_softmax(-1)

    torch.manual_seed(0)
    return CRNN(), {"image": (1, 1, 32, 128)}


def _bert_tiny():
    import torch
    from torch import nn

    hidden, heads, ffn, vocab, seq = 128, 4, 512, 1000, 32

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

        def forward(self, x, mask):
            b, s, _ = x.shape

            def split(t):
                return t.view(b, s, heads, hidden // heads).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + mask
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words, self.positions = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
            self.ln = nn.LayerNorm(hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(2))

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.ln(self.words(input_ids) + self.positions(positions))
            mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
            for layer in self.layers:
                x = layer(x, mask)
            pooled = (x * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
            return pooled

    torch.manual_seed(0)
    return Bert(), {"input_ids": (1, seq), "attention_mask": (1, seq)}


# ---------------------------------------------------------------------------- export


def _inputs(name: str, shapes: dict[str, tuple[int, ...]]):
    import torch

    generator = torch.Generator().manual_seed(0)
    feeds = {}
    for key, shape in shapes.items():
        if key == "input_ids":
            feeds[key] = torch.randint(0, 1000, shape, generator=generator)
        elif key == "attention_mask":
            feeds[key] = torch.ones(shape, dtype=torch.int64)
        else:
            feeds[key] = torch.rand(shape, generator=generator)
    return feeds


def build(name: str, directory: Path) -> Path:
    import torch

    torch.manual_seed(0)
    if name in ("shufflenet_v2", "mobilenet_v3", "efficientnet_b0"):
        model, shapes = _torchvision(name)
    elif name == "yolov8n":
        model, shapes = _yolo()
    elif name == "crnn_lstm":
        model, shapes = _crnn_lstm()
    else:
        model, shapes = _bert_tiny()
    model.eval()
    _randomize_batchnorm(model)
    feeds = _inputs(name, shapes)
    path = arch_path(name, directory)
    opset = 14 if name == "bert_tiny_op14" else 17
    dynamic = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}} if "bert" in name else None
    with torch.no_grad():
        expected = model(*feeds.values())
        torch.onnx.export(
            model,
            tuple(feeds.values()),
            str(path),
            input_names=list(feeds),
            output_names=["output"],
            opset_version=opset,
            dynamic_axes=dynamic,
            dynamo=False,
        )
    _check(path, feeds, expected)
    return path


def _randomize_batchnorm(model) -> None:
    """Fresh BatchNorm layers are identities; give them seeded statistics so the
    exported graph is not degenerate."""
    import torch

    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def _check(path: Path, feeds, expected) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    try:
        import onnxruntime as ort
    except ImportError:
        print(f"  {path.name}: checker ok (onnxruntime not installed here)")
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    want = expected[0] if isinstance(expected, (tuple, list)) else expected
    error = float(np.max(np.abs(got - want.numpy())))
    print(f"  {path.name}: checker ok, onnxruntime max abs error vs torch {error:.2e}")
    if error > 1e-3 * max(1.0, float(np.max(np.abs(want.numpy())))):
        raise SystemExit(f"{path.name}: onnxruntime disagrees with torch ({error:.2e})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ARCH_DIR)
    parser.add_argument("--models", default=",".join(NAMES))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"unknown model {unknown[0]!r}; known: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        print(f"{name}:")
        try:
            build(name, args.out_dir)
        except ImportError as exc:  # e.g. ultralytics not installed: build the others
            print(f"  {name}: not built ({exc})", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
