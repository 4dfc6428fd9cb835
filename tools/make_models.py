"""Build the small, deterministic ONNX test models that live under ``models/``.

onnxopt needs real (trained, non-random) ONNX graphs to exercise its optimization
passes and to check that an optimized model still computes the same thing.  This
script builds them from scratch on the UCI handwritten digits data set
(``sklearn.datasets.load_digits``: 1797 grey-scale 8x8 images, classes 0-9):

* ``digits_train.npz`` / ``digits_test.npz`` -- a fixed, stratified 70/30 split,
  keys ``input`` (float32, ``(N, 1, 8, 8)``, scaled to [0, 1]) and ``label``
  (int64, ``(N,)``).
* ``digits_mlp.onnx`` -- a 3-layer perceptron (Flatten + Gemm/Relu).
* ``digits_cnn.onnx`` -- a small CNN whose exported graph deliberately keeps the
  patterns an optimizer cares about: Conv -> BatchNormalization -> Relu blocks
  (BatchNormalization is *not* folded by the exporter), a residual Add, a
  depthwise Conv, a channel Concat of two branches, GlobalAveragePool, Flatten
  and a Gemm classifier.
* ``digits_transformer.onnx`` -- a tiny transformer encoder over the 8 image rows
  (hand-written multi-head attention, LayerNormalization, an Erf-based GELU
  feed-forward, mean pooling).
* ``digits_mlp_op11_constants.onnx`` -- the same MLP exported at opset 11 with
  every weight stored as a ``Constant`` node instead of an initializer, the style
  produced by Paddle2ONNX and older exporters.

Every model has one input ``input`` (``[batch, 1, 8, 8]`` float32, dynamic batch)
and one output ``logits`` (``[batch, 10]``).  After export the script validates
each file with the full ONNX checker and onnxruntime, measures test accuracy
*in onnxruntime*, asserts accuracy thresholds and the op-type requirements
above, and writes ``models/README.md`` from the measured numbers.

Everything is seeded and torch runs in deterministic mode on the CPU, so running
the script twice produces byte-identical ``.onnx`` and ``.npz`` files.

torch (==2.13.0, CPU) and scikit-learn are only needed to *rebuild* these files;
they are not runtime dependencies of onnxopt.

Usage::

    python tools/make_models.py [--out-dir models/]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 20240601
NUM_THREADS = 2
TEST_FRACTION = 0.3
OPSET = 17
LEGACY_OPSET = 11
NUM_CLASSES = 10
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "models"
GELU_OPS = frozenset({"Erf", "Gelu", "Div", "Mul", "Add", "Sqrt", "Pow", "Tanh"})


# --------------------------------------------------------------------------- #
# Determinism and data
# --------------------------------------------------------------------------- #


def seed_everything(seed: int) -> None:
    """Seed every RNG and force deterministic single-process CPU execution."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class Split:
    """One split of the digits data set, in the layout the models consume."""

    inputs: np.ndarray  # float32, (N, 1, 8, 8), values in [0, 1]
    labels: np.ndarray  # int64, (N,)


def load_digit_splits(seed: int) -> tuple[Split, Split]:
    """Return a deterministic stratified (train, test) split of UCI digits."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    return (
        Split(np.ascontiguousarray(x_train), np.ascontiguousarray(y_train)),
        Split(np.ascontiguousarray(x_test), np.ascontiguousarray(y_test)),
    )


def save_split(split: Split, path: Path) -> None:
    """Write a split as an uncompressed (byte-deterministic) ``.npz`` file."""
    np.savez(path, input=split.inputs, label=split.labels)


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


class DigitsMLP(nn.Module):
    """Flatten -> Linear(64,128) -> ReLU -> Linear(128,64) -> ReLU -> Linear(64,10)."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, NUM_CLASSES)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU; ``groups`` allows depthwise convs."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class DigitsCNN(nn.Module):
    """Small CNN with residual, depthwise and two-branch (Concat) structure.

    stem (Conv-BN-ReLU, 16ch) -> residual block (Conv-BN-ReLU, Add) ->
    [depthwise 3x3 branch | pointwise 1x1 branch] -> Concat (32ch) ->
    Conv-BN-ReLU -> GlobalAveragePool -> Flatten -> Gemm.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, channels, 3)
        self.res = ConvBNReLU(channels, channels, 3)
        self.depthwise = ConvBNReLU(channels, channels, 3, groups=channels)
        self.pointwise = ConvBNReLU(channels, channels, 1)
        self.mix = ConvBNReLU(2 * channels, 2 * channels, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.res(x)
        x = torch.cat([self.depthwise(x), self.pointwise(x)], dim=1)
        x = self.pool(self.mix(x))
        return self.fc(torch.flatten(x, 1))


class SelfAttention(nn.Module):
    """Hand-written multi-head self-attention (exports to plain MatMul/Softmax)."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.tokens = tokens
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # A constant token count keeps the exported Reshape free of Shape ops.
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(x))
        v = self._split_heads(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2)
        return self.out(ctx.reshape(-1, self.tokens, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer encoder layer with a GELU feed-forward."""

    def __init__(self, dim: int, heads: int, hidden: int, tokens: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class DigitsTransformer(nn.Module):
    """Transformer encoder over the 8 image rows (8 tokens of 8 features)."""

    def __init__(
        self, dim: int = 32, heads: int = 2, hidden: int = 64, layers: int = 2, tokens: int = 8
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.ModuleList(
            [EncoderLayer(dim, heads, hidden, tokens) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(-1, self.tokens, 8)) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(dim=1))


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer settings for one model."""

    epochs: int
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 32


def train_model(model: nn.Module, train: Split, config: TrainConfig, seed: int) -> nn.Module:
    """Train ``model`` with AdamW + cosine schedule; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(train.inputs)
    labels = torch.from_numpy(train.labels)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


# --------------------------------------------------------------------------- #
# Export and post-processing
# --------------------------------------------------------------------------- #


def export_onnx(model: nn.Module, opset: int, keep_batchnorm: bool = False) -> onnx.ModelProto:
    """Export ``model`` with the legacy TorchScript exporter and return the proto.

    In eval mode the legacy exporter fuses Conv+BatchNormalization as part of
    its constant-folding peephole; ``keep_batchnorm`` disables constant folding
    so the BatchNormalization nodes survive (with ``training_mode=0``).
    """
    buffer = io.BytesIO()
    dummy = torch.zeros(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=not keep_batchnorm,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a ``Constant`` node (``value`` attribute).

    The Constant nodes are prepended so the graph stays topologically sorted;
    their outputs keep the initializer names, so consumers are unchanged.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializer_names = {init.name for init in graph.initializer}
    constants = [
        helper.make_node("Constant", [], [init.name], name=f"Constant_{init.name}", value=init)
        for init in graph.initializer
    ]
    kept_inputs = [inp for inp in graph.input if inp.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    return result


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Check a model strictly and write it as a single self-contained file."""
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- #
# Verification
# --------------------------------------------------------------------------- #


def make_session(path: Path) -> ort.InferenceSession:
    """Create a deterministic CPU onnxruntime session for ``path``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = NUM_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run the model at ``path`` in onnxruntime and return its logits."""
    session = make_session(path)
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
    return np.asarray(logits)


def onnx_accuracy(path: Path, test: Split) -> float:
    """Test-set accuracy of the ONNX model, computed by onnxruntime."""
    logits = run_onnx(path, test.inputs)
    assert logits.shape == (len(test.labels), NUM_CLASSES), logits.shape
    return float((logits.argmax(axis=1) == test.labels).mean())


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Count node op types in the main graph."""
    return Counter(node.op_type for node in model.graph.node)


def float_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    """Yield floating-point weight tensors, whether initializers or non-scalar Constants."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    yield from (t for t in model.graph.initializer if t.data_type in float_types)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                # 0-d constants are exporter scalars (attention scale, GELU's sqrt(2)).
                if attr.name == "value" and attr.t.data_type in float_types and attr.t.dims:
                    yield attr.t


def parameter_count(model: onnx.ModelProto) -> int:
    """Number of float weight elements (includes BatchNormalization statistics)."""
    return sum(math.prod(t.dims) for t in float_tensors(model))


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Map each tensor name to the node that produces it."""
    return {out: node for node in model.graph.node for out in node.output}


def weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of initializers, keyed by name."""
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Value of attribute ``name`` of ``node`` (or ``default``)."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def check_io(model: onnx.ModelProto) -> None:
    """Assert the single ``input``/``logits`` signature with a dynamic batch."""
    graph = model.graph
    assert [i.name for i in graph.input] == [INPUT_NAME], list(graph.input)
    assert [o.name for o in graph.output] == [OUTPUT_NAME], list(graph.output)
    in_dims = graph.input[0].type.tensor_type.shape.dim
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch" and [d.dim_value for d in in_dims[1:]] == [1, 8, 8]
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == NUM_CLASSES


def count_conv_bn_relu(model: onnx.ModelProto) -> int:
    """Number of Relu nodes fed by a BatchNormalization that is fed by a Conv."""
    made_by = producers(model)
    count = 0
    for node in model.graph.node:
        if node.op_type != "Relu":
            continue
        bn = made_by.get(node.input[0])
        if bn is None or bn.op_type != "BatchNormalization":
            continue
        conv = made_by.get(bn.input[0])
        count += conv is not None and conv.op_type == "Conv"
    return count


def has_variable_add(model: onnx.ModelProto) -> bool:
    """True if some Add combines two tensors that are both computed at run time."""
    made_by = producers(model)
    return any(
        node.op_type == "Add"
        and len(node.input) == 2
        and all(name in made_by and made_by[name].op_type != "Constant" for name in node.input)
        for node in model.graph.node
    )


def has_depthwise_conv(model: onnx.ModelProto) -> bool:
    """True if a Conv has ``group > 1`` equal to its input and output channels."""
    shapes = weight_shapes(model)
    for node in model.graph.node:
        group = attribute(node, "group", 1)
        if node.op_type != "Conv" or not isinstance(group, int) or group <= 1:
            continue
        out_ch, in_per_group = shapes[node.input[1]][:2]
        if group == out_ch and in_per_group == 1:
            return True
    return False


def has_channel_concat(model: onnx.ModelProto) -> bool:
    """True if a Concat joins two computed branches along axis 1."""
    made_by = producers(model)
    return any(
        node.op_type == "Concat"
        and attribute(node, "axis") == 1
        and len(node.input) == 2
        and all(name in made_by for name in node.input)
        for node in model.graph.node
    )


def gelu_region(model: onnx.ModelProto, start: str) -> list[onnx.NodeProto]:
    """Nodes reachable upstream of tensor ``start`` through GELU-like ops only."""
    made_by = producers(model)
    seen: dict[int, onnx.NodeProto] = {}
    stack = [start]
    while stack:
        node = made_by.get(stack.pop())
        if node is None or node.op_type not in GELU_OPS or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.input)
    return list(seen.values())


def has_matmul_gelu_matmul(model: onnx.ModelProto) -> bool:
    """True if some MatMul consumes GELU(MatMul(x) + bias) (Erf-based or Gelu op)."""
    made_by = producers(model)
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        region = gelu_region(model, node.input[0])
        if not any(n.op_type in {"Erf", "Gelu"} for n in region):
            continue
        for add in (n for n in region if n.op_type == "Add"):
            if any(
                made_by.get(i) is not None and made_by[i].op_type == "MatMul" for i in add.input
            ):
                return True
    return False


def require_ops(model: onnx.ModelProto, ops: Iterable[str]) -> None:
    """Assert that each op type in ``ops`` appears at least once."""
    missing = sorted(set(ops) - set(op_histogram(model)))
    assert not missing, f"{model.graph.name}: missing op types {missing}"


def check_mlp(model: onnx.ModelProto) -> None:
    """Op requirements of the MLP."""
    require_ops(model, ["Flatten", "Gemm", "Relu"])
    assert op_histogram(model)["Gemm"] == 3


def check_cnn(model: onnx.ModelProto) -> None:
    """Op requirements of the CNN (unfused BN, residual, depthwise, concat...)."""
    require_ops(
        model,
        [
            "Conv",
            "BatchNormalization",
            "Relu",
            "Add",
            "Concat",
            "GlobalAveragePool",
            "Flatten",
            "Gemm",
        ],
    )
    assert count_conv_bn_relu(model) >= 2, "need >= 2 Conv->BatchNormalization->Relu blocks"
    assert has_variable_add(model), "need a residual Add of two computed tensors"
    assert has_depthwise_conv(model), "need a depthwise Conv (group == channels)"
    assert has_channel_concat(model), "need a channel Concat of two branches"


def check_transformer(model: onnx.ModelProto) -> None:
    """Op requirements of the transformer (attention, LayerNorm, GELU FFN, pooling)."""
    require_ops(
        model, ["MatMul", "Softmax", "Transpose", "LayerNormalization", "ReduceMean", "Gemm"]
    )
    assert has_matmul_gelu_matmul(model), "need MatMul -> Add -> GELU -> MatMul"


def check_constants_variant(model: onnx.ModelProto) -> None:
    """The op11 MLP must store all weights as Constant nodes, no initializers."""
    assert not model.graph.initializer, "initializers left in constants variant"
    assert all(
        op.version == LEGACY_OPSET for op in model.opset_import if op.domain in ("", "ai.onnx")
    )
    constants = [n for n in model.graph.node if n.op_type == "Constant"]
    assert len(constants) == 6, f"expected 6 weight Constants, got {len(constants)}"
    assert all(attr.name == "value" for n in constants for attr in n.attribute)
    check_mlp(model)


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelSpec:
    """What to build for one ONNX file and how to validate it."""

    filename: str
    description: str
    min_accuracy: float
    check: Callable[[onnx.ModelProto], None]


@dataclass(frozen=True)
class ModelReport:
    """Measured facts about one written ONNX file."""

    spec: ModelSpec
    opset: int
    histogram: Counter[str]
    params: int
    size_bytes: int
    accuracy: float
    sha256: str


def sha256_of(path: Path) -> str:
    """Hex SHA-256 digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def format_histogram(histogram: Counter[str]) -> str:
    """``Op xN`` pairs, most frequent first, ties alphabetical."""
    items = sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{op} x{count}" for op, count in items)


def verify_model(spec: ModelSpec, path: Path, test: Split) -> ModelReport:
    """Validate one written model and measure it."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    check_io(model)
    spec.check(model)
    accuracy = onnx_accuracy(path, test)
    assert accuracy >= spec.min_accuracy, (
        f"{spec.filename}: accuracy {accuracy:.4f} < {spec.min_accuracy}"
    )
    opset = next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
    return ModelReport(
        spec=spec,
        opset=opset,
        histogram=op_histogram(model),
        params=parameter_count(model),
        size_bytes=path.stat().st_size,
        accuracy=accuracy,
        sha256=sha256_of(path),
    )


def print_table(reports: list[ModelReport]) -> None:
    """Print a summary table of all models to stdout."""
    header = f"{'model':<32} {'opset':>5} {'nodes':>5} {'params':>7} {'bytes':>8} {'acc':>7}"
    print(header)
    print("-" * len(header))
    for r in reports:
        print(
            f"{r.spec.filename:<32} {r.opset:>5} {sum(r.histogram.values()):>5} "
            f"{r.params:>7} {r.size_bytes:>8} {r.accuracy:>7.2%}"
        )
        print(f"    ops: {format_histogram(r.histogram)}")


def data_row(filename: str, split: Split) -> str:
    """One Markdown table row describing a data split file."""
    n = len(split.labels)
    return f"| `{filename}` | {n} | float32 ({n}, 1, 8, 8) | int64 ({n},) |"


def render_readme(
    reports: list[ModelReport], data_files: list[Path], splits: tuple[Split, Split]
) -> str:
    """Markdown for ``models/README.md`` built from the measured numbers."""
    train, test = splits
    lines = [
        "# Test models",
        "",
        "Small trained ONNX models on the UCI handwritten digits data set, used to test",
        "onnxopt's passes on real graphs. **Generated -- do not edit by hand.** Rebuild with:",
        "",
        "```sh",
        "python tools/make_models.py",
        "```",
        "",
        "The build is deterministic: re-running it produces byte-identical `.onnx` and",
        "`.npz` files (SHA-256 digests below). torch==2.13.0 (CPU) and scikit-learn are",
        "only needed to rebuild these files; they are **not** runtime dependencies of",
        "onnxopt (running the models only needs onnx / onnxruntime).",
        "",
        "## Data",
        "",
        "`sklearn.datasets.load_digits` (1797 grey-scale 8x8 images, classes 0-9), values",
        f"divided by 16 to float32 in [0, 1]; stratified split with a fixed seed ({SEED}):",
        "",
        "| file | samples | `input` | `label` |",
        "|---|---|---|---|",
        data_row(data_files[0].name, train),
        data_row(data_files[1].name, test),
        "",
        "## Models",
        "",
        "Every model has a single input `input` (float32 `[batch, 1, 8, 8]`, dynamic",
        "dimension `batch`) and a single output `logits` (float32 `[batch, 10]`, unnormalised",
        "class scores; prediction = argmax). Exported with the legacy TorchScript exporter",
        "(`torch.onnx.export(..., dynamo=False)`).",
        "",
    ]
    for r in reports:
        lines += [f"### `{r.spec.filename}`", "", r.spec.description, ""]
    lines += [
        "## Measured results",
        "",
        "Accuracy is measured on `digits_test.npz` by running the ONNX file in onnxruntime",
        "(CPUExecutionProvider). `params` counts float weight elements (initializers or",
        "`Constant` tensors), including BatchNormalization running statistics.",
        "",
        "| model | opset | nodes | params | size (bytes) | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| `{r.spec.filename}` | {r.opset} | {sum(r.histogram.values())} | {r.params} "
            f"| {r.size_bytes} | {r.accuracy:.2%} |"
        )
    lines += ["", "### Op histograms", ""]
    for r in reports:
        lines.append(f"- `{r.spec.filename}`: {format_histogram(r.histogram)}")
    lines += ["", "## SHA-256", "", "```"]
    digests = [(p.name, sha256_of(p)) for p in data_files] + [
        (r.spec.filename, r.sha256) for r in reports
    ]
    lines += [f"{digest}  {name}" for name, digest in digests]
    lines += ["```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #

MLP_SPEC = ModelSpec(
    "digits_mlp.onnx",
    "Multi-layer perceptron: Flatten -> Linear(64,128) -> ReLU -> Linear(128,64) -> ReLU\n"
    "-> Linear(64,10). Exports to Flatten + 3 Gemm + 2 Relu (opset 17).",
    0.95,
    check_mlp,
)
CNN_SPEC = ModelSpec(
    "digits_cnn.onnx",
    "Small CNN (16/32 channels, opset 17). Stem Conv3x3-BN-ReLU -> residual block\n"
    "(Conv3x3-BN-ReLU, then `Add` with the block input) -> two branches, a depthwise\n"
    "Conv3x3 (`group` = 16 = channels)-BN-ReLU and a pointwise Conv1x1-BN-ReLU -> `Concat`\n"
    "on the channel axis (32 ch) -> Conv3x3-BN-ReLU -> GlobalAveragePool -> Flatten -> Gemm.\n"
    "Convs have no bias and every BatchNormalization is kept as a separate node\n"
    "(`training_mode=0`, exported with constant folding off), so Conv+BN folding and\n"
    "the other fusions have something to do.",
    0.95,
    check_cnn,
)
TRANSFORMER_SPEC = ModelSpec(
    "digits_transformer.onnx",
    "Tiny transformer encoder (opset 17): the 8 image rows are 8 tokens of 8 features.\n"
    "Linear embedding 8->32 (MatMul+Add) plus a learned positional embedding (Add),\n"
    "2 pre-LayerNorm encoder layers, each with hand-written 2-head self-attention\n"
    "(MatMul/Add projections, Reshape/Transpose head split, scaled MatMul, Softmax) and a\n"
    "GELU feed-forward 32->64->32 (MatMul -> Add -> exact GELU as Div/Erf/Add/Mul/Mul ->\n"
    "MatMul -> Add), residual Adds, final LayerNormalization, mean over tokens (ReduceMean)\n"
    "and a Gemm classifier.",
    0.90,
    check_transformer,
)
CONSTANTS_SPEC = ModelSpec(
    "digits_mlp_op11_constants.onnx",
    "The same trained weights as `digits_mlp.onnx`, exported at opset 11 and\n"
    "post-processed so that every weight and bias is a `Constant` node (attribute\n"
    "`value`) instead of a graph initializer -- the style of Paddle2ONNX and older\n"
    "exporters. Its outputs match `digits_mlp.onnx` in onnxruntime.",
    0.95,
    check_constants_variant,
)


def check_matches_torch(model: nn.Module, path: Path, inputs: np.ndarray) -> None:
    """Assert the exported ONNX file reproduces the torch model's logits."""
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(run_onnx(path, inputs), expected, rtol=1e-4, atol=1e-4)


def build_models(train: Split, test: Split, out_dir: Path) -> None:
    """Train, export and write the four ONNX files (checked against torch)."""
    seed_everything(SEED)
    mlp = train_model(DigitsMLP(), train, TrainConfig(epochs=40, lr=3e-3, weight_decay=1e-4), SEED)
    save_model(export_onnx(mlp, OPSET), out_dir / MLP_SPEC.filename)
    check_matches_torch(mlp, out_dir / MLP_SPEC.filename, test.inputs)
    constants = initializers_to_constants(export_onnx(mlp, LEGACY_OPSET))
    save_model(constants, out_dir / CONSTANTS_SPEC.filename)

    seed_everything(SEED + 1)
    cnn = train_model(
        DigitsCNN(), train, TrainConfig(epochs=30, lr=3e-3, weight_decay=1e-4), SEED + 1
    )
    save_model(export_onnx(cnn, OPSET, keep_batchnorm=True), out_dir / CNN_SPEC.filename)
    check_matches_torch(cnn, out_dir / CNN_SPEC.filename, test.inputs)

    seed_everything(SEED + 2)
    transformer = train_model(
        DigitsTransformer(), train, TrainConfig(epochs=60, lr=2e-3, weight_decay=1e-2), SEED + 2
    )
    save_model(export_onnx(transformer, OPSET), out_dir / TRANSFORMER_SPEC.filename)
    check_matches_torch(transformer, out_dir / TRANSFORMER_SPEC.filename, test.inputs)


def check_same_outputs(reference: Path, candidate: Path, inputs: np.ndarray) -> None:
    """Assert two ONNX files compute the same logits in onnxruntime."""
    np.testing.assert_allclose(
        run_onnx(candidate, inputs), run_onnx(reference, inputs), rtol=1e-5, atol=1e-5
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="directory for the .onnx/.npz files and README.md (default: <repo>/models/)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build, verify and document all model artefacts."""
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    train, test = load_digit_splits(SEED)
    data_files = [out_dir / "digits_train.npz", out_dir / "digits_test.npz"]
    save_split(train, data_files[0])
    save_split(test, data_files[1])

    build_models(train, test, out_dir)
    check_same_outputs(out_dir / MLP_SPEC.filename, out_dir / CONSTANTS_SPEC.filename, test.inputs)

    specs = [MLP_SPEC, CNN_SPEC, TRANSFORMER_SPEC, CONSTANTS_SPEC]
    reports = [verify_model(spec, out_dir / spec.filename, test) for spec in specs]
    print_table(reports)
    readme = render_readme(reports, data_files, (train, test))
    (out_dir / "README.md").write_text(readme, encoding="utf-8")
    print(f"wrote {out_dir / 'README.md'}")


if __name__ == "__main__":
    main()
