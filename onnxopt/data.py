"""Model inputs: the user's data or seeded generated samples, split for calibration
and validation.

A *sample* is one complete feed: ``{input_name: array}`` with exactly the shape the
model takes. Sources:

- ``.npz``: keys are input names (extra keys such as ``label`` are ignored). An array
  of rank ``model_rank + 1`` holds one sample per leading index; an array of the
  model's own rank whose first dimension is dynamic (or 1) holds one batch-1 sample
  per row.
- a folder of ``.npy`` files named after inputs (one sample), of TensorProto ``.pb``
  files (``input_0.pb``..., the ONNX backend-test layout), or of ``test_data_set_*``
  sub-folders (one sample each).
- generation from the input specs with a seed: floats ~ N(0, 1), integers uniform in
  a range (inferred from a Gather table when the input indexes one, else [0, 8)),
  bools fair coins. Dynamic dimensions: the first one defaults to 1 (batch); any other
  needs ``--shape name=1x3x224x224``.

Calibration and validation samples never overlap.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import sample_files
from onnxopt.errors import DataError, UsageError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
DEFAULT_INT_RANGE = (0, 8)
MAX_GENERATED_BYTES = 1 << 30  # per input and sample: beyond that, ask for real data


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = "x".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, with dtype and (possibly symbolic) shape."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DataError(
                f"input {value.name!r} is not a tensor; only tensor inputs are supported"
            )
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except (KeyError, ValueError, TypeError):
            raise DataError(
                f"input {value.name!r} has an undefined or unsupported element type "
                f"({tensor_type.elem_type})"
            ) from None
        dims: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        specs.append(InputSpec(value.name, np.dtype(dtype), tuple(dims)))
    return specs


_SHAPE_ARG = re.compile(r"^([^=]+)=(\d+(?:[x,]\d+)*)$")


def parse_shape_args(args: Sequence[str] | Mapping[str, Sequence[int] | str]) -> dict[str, tuple]:
    """``["x=1x3x224x224"]`` or ``{"x": "1x3x224x224"}`` -> ``{"x": (1, 3, 224, 224)}``."""
    items = args.items() if isinstance(args, Mapping) else [_split_shape_arg(a) for a in args]
    shapes = {}
    for name, dims in items:
        if isinstance(dims, str):
            if not re.fullmatch(r"\d+(?:[x,]\d+)*", dims):
                raise UsageError(f"--shape {name}={dims}: expected dims like 1x3x224x224")
            dims = [int(d) for d in re.split(r"[x,]", dims)]
        shapes[name] = tuple(int(d) for d in dims)
    return shapes


def _split_shape_arg(arg: str) -> tuple[str, str]:
    match = _SHAPE_ARG.match(arg.strip())
    if not match:
        raise UsageError(f"--shape {arg!r}: expected NAME=DIMS, e.g. input=1x3x224x224")
    return match.group(1), match.group(2)


def concrete_shapes(specs: Sequence[InputSpec], overrides: Mapping[str, tuple]) -> dict[str, tuple]:
    names = {s.name for s in specs}
    for name in overrides:
        if name not in names:
            raise UsageError(
                f"--shape names unknown input {name!r}; inputs: {', '.join(sorted(names))}"
            )
    shapes = {}
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if len(shape) != len(spec.shape):
                raise UsageError(
                    f"--shape {spec.name}: {len(shape)} dims given, model input has "
                    f"{len(spec.shape)} ({spec.describe()})"
                )
            for given, declared in zip(shape, spec.shape):
                if isinstance(declared, int) and given != declared:
                    raise UsageError(
                        f"--shape {spec.name}: {shape} conflicts with the fixed shape "
                        + spec.describe()
                    )
            shapes[spec.name] = tuple(shape)
            continue
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
            else:
                raise UsageError(
                    f"input {spec.describe()} has a dynamic dimension {axis} ({dim or '?'}); "
                    f"give a concrete shape with --shape {spec.name}="
                    + "x".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
                )
        shapes[spec.name] = tuple(dims)
    return shapes


# ---------------------------------------------------------------------------- loading


def load_samples(
    source: str | os.PathLike | Mapping | Sequence,
    specs: Sequence[InputSpec],
    casts: set[tuple[str, str, str]] | None = None,
) -> Sequence[Feed]:
    """Read user data into feeds matching ``specs`` (see module docstring): a list, or
    for an ``.npz``/``.npy`` file samples read from it when used.
    ``casts`` collects ``(input, from dtype, to dtype)`` for every dtype converted."""
    if isinstance(source, Mapping):
        return _samples_from_arrays(dict(source), specs, "<arrays>", casts)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [
            _coerce_feed(dict(feed), specs, f"sample {i}", casts) for i, feed in enumerate(source)
        ]
    path = Path(source)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        return _samples_from_folder(path, specs, casts)
    if path.suffix == ".npz":
        stored = sample_files.open_npz(path)  # keys that are not inputs may be anything
        if stored is not None and all(stored.get(spec.name) is not None for spec in specs):
            return _samples_from_arrays(stored, specs, str(path), casts)
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
        return _samples_from_arrays(arrays, specs, str(path), casts)
    if path.suffix == ".npy" and len(specs) == 1:
        stored = sample_files.open_npy(path)
        if stored is not None:
            return _samples_from_arrays({specs[0].name: stored}, specs, str(path), casts)
        return _samples_from_arrays({specs[0].name: _load_npy(path)}, specs, str(path), casts)
    raise DataError(f"{path}: expected an .npz file or a folder of .npy / .pb files")


def _samples_from_arrays(
    arrays: dict[str, np.ndarray | sample_files.StoredArray], specs, where: str, casts=None
) -> Sequence[Feed]:
    """One feed per leading index. Arrays in memory give a list; arrays in a file
    (:class:`~onnxopt.sample_files.StoredArray`) give samples read on use, the first
    one checked (and its casts noted) now: every row of an array has its shape and
    dtype."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(
            f"{where}: no array for input(s) {', '.join(missing)}; it has keys "
            f"{', '.join(sorted(arrays)) or '(none)'}; expected one key per model input"
        )
    extra = sorted(set(arrays) - {s.name for s in specs})
    if extra:
        log.info("%s: ignoring keys that are not model inputs: %s", where, ", ".join(extra))
    rows = _Rows({}, {}, tuple(specs), where)
    for spec in specs:
        array = arrays[spec.name]
        if not isinstance(array, sample_files.StoredArray):
            array = np.asarray(array)
        rows.arrays[spec.name] = array
        if array.ndim == len(spec.shape) + 1:
            rows.batched[spec.name] = False
        elif (
            array.ndim == len(spec.shape)
            and array.ndim > 0
            and (not isinstance(spec.shape[0], int) or spec.shape[0] == 1)
        ):
            # dynamic (or 1) batch dimension: each row is one batch-1 sample
            rows.batched[spec.name] = True
        else:
            raise DataError(
                f"{where}: array {spec.name!r} has shape {array.shape}; model input is "
                f"{spec.describe()}: expected (num_samples, *input_shape)"
            )
    counts = {name: array.shape[0] for name, array in rows.arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs have different sample counts: {counts}")
    n = next(iter(counts.values()), 0)
    if n == 0:
        raise DataError(f"{where}: contains zero samples")
    if not any(isinstance(a, sample_files.StoredArray) for a in rows.arrays.values()):
        return [rows.feed(i, casts) for i in range(n)]
    rows.feed(0, casts)
    return sample_files.Samples(rows.feed, range(n))


@dataclass
class _Rows:
    """Sample ``i`` of arrays in memory or in a file (picklable: names and offsets)."""

    arrays: dict[str, np.ndarray | sample_files.StoredArray]
    batched: dict[str, bool]  # True: each row is a batch-1 sample (keeps its axis)
    specs: tuple[InputSpec, ...]
    where: str

    def feed(self, index: int, casts=None) -> Feed:
        feed = {}
        for name, array in self.arrays.items():
            if isinstance(array, sample_files.StoredArray):
                row = array.row(index)
                feed[name] = row[None] if self.batched[name] else row
            else:
                feed[name] = array[index : index + 1] if self.batched[name] else array[index]
        return _coerce_feed(feed, self.specs, f"{self.where} sample {index}", casts)


def _samples_from_folder(folder: Path, specs, casts=None) -> list[Feed]:
    sets = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("test_data_set"))
    if sets:
        return [_sample_from_files(s, specs, casts) for s in sets]
    return [_sample_from_files(folder, specs, casts)]


def _sample_from_files(folder: Path, specs, casts=None) -> Feed:
    npy = {p.stem: p for p in folder.glob("*.npy")}
    if npy:
        feed = {s.name: _load_npy(npy[s.name]) for s in specs if s.name in npy}
        return _coerce_feed(feed, specs, str(folder), casts)
    pbs = sorted(folder.glob("input_*.pb"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not pbs:
        raise DataError(f"{folder}: no .npy files named after inputs and no input_N.pb files")
    feed = {}
    for index, pb in enumerate(pbs):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(pb.read_bytes())
            array = numpy_helper.to_array(tensor)
        except Exception as exc:
            raise DataError(f"{pb}: not a TensorProto ({exc})") from exc
        name = tensor.name or (specs[index].name if index < len(specs) else f"input_{index}")
        feed[name] = array
    return _coerce_feed(feed, specs, str(folder), casts)


def load_reference_outputs(folder: Path) -> list[np.ndarray]:
    """``output_N.pb`` files of an ONNX backend-test data set, in order."""
    pbs = sorted(folder.glob("output_*.pb"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    arrays = []
    for pb in pbs:
        tensor = onnx.TensorProto()
        tensor.ParseFromString(pb.read_bytes())
        arrays.append(numpy_helper.to_array(tensor))
    return arrays


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from exc


def _coerce_feed(feed: dict, specs, where: str, casts=None) -> Feed:
    out = {}
    for spec in specs:
        if spec.name not in feed:
            raise DataError(f"{where}: missing input {spec.name!r}")
        array = np.asarray(feed[spec.name])
        if array.ndim != len(spec.shape):
            raise DataError(
                f"{where}: input {spec.name!r} has shape {array.shape}, "
                f"model expects {spec.describe()}"
            )
        for given, declared in zip(array.shape, spec.shape):
            if isinstance(declared, int) and given != declared:
                raise DataError(
                    f"{where}: input {spec.name!r} has shape {array.shape}, "
                    f"model expects {spec.describe()}"
                )
        if array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise DataError(
                    f"{where}: input {spec.name!r} has dtype {array.dtype}, "
                    f"model expects {spec.dtype}"
                )
            if casts is not None:
                casts.add((spec.name, str(array.dtype), str(np.dtype(spec.dtype))))
            array = array.astype(spec.dtype)
        # not np.ascontiguousarray: it turns a scalar (rank-0 input) into shape (1,)
        out[spec.name] = np.require(array, requirements="C")
    return out


# ---------------------------------------------------------------------------- generation


def generate_samples(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple],
    count: int,
    rng: np.random.Generator,
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[Feed]:
    int_ranges = int_ranges or {}
    for spec in specs:
        elements = int(np.prod(shapes[spec.name], dtype=np.float64))
        if elements * spec.dtype.itemsize > MAX_GENERATED_BYTES:
            raise DataError(
                f"input {spec.describe()} would need {elements:,} elements per sample "
                f"({shapes[spec.name]}); pass --data, or a smaller --shape"
            )
    samples = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = shapes[spec.name]
            if spec.dtype == np.bool_:
                feed[spec.name] = rng.random(shape) < 0.5
            elif np.issubdtype(spec.dtype, np.integer):
                low, high = int_ranges.get(spec.name, DEFAULT_INT_RANGE)
                feed[spec.name] = rng.integers(low, high, size=shape).astype(spec.dtype)
            elif np.issubdtype(spec.dtype, np.floating):
                dtype = spec.dtype if spec.dtype in (np.float32, np.float64) else np.float32
                feed[spec.name] = rng.standard_normal(shape, dtype=dtype).astype(spec.dtype)
            else:
                raise DataError(f"cannot generate data for input {spec.describe()}; pass --data")
        samples.append(feed)
    return samples


def infer_int_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Integer inputs that index a constant Gather table: values in [0, rows)."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    ranges = {}
    inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in inputs:
            dims = tables.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims:
                rows = dims[axis]
                _, high = ranges.get(node.input[1], (0, rows))
                ranges[node.input[1]] = (0, min(high, rows))
    return ranges


# ---------------------------------------------------------------------------- splitting


@dataclass
class SampleSets:
    calibration: Sequence[Feed]  # a list, or samples read from the data file on use
    validation: Sequence[Feed]
    source: str
    # {"level": "note" | "warning", "text": ...}: dtype casts, too few validation samples
    notes: list[dict[str, str]] = field(default_factory=list)


def prepare_samples(
    model: onnx.ModelProto,
    data=None,
    *,
    shapes: Mapping[str, tuple] | Sequence[str] | None = None,
    seed: int = 0,
    calibration_samples: int = 64,
    validation_samples: int = 32,
) -> SampleSets:
    """Calibration and validation samples (disjoint) from ``data`` or generated; the
    notes (dtype casts, too few validation samples) are logged and kept in ``notes``."""
    sets = _split_samples(model, data, shapes, seed, calibration_samples, validation_samples)
    for note in sets.notes:
        log.log(logging.WARNING if note["level"] == "warning" else logging.INFO, note["text"])
    return sets


def timing_feed(
    model: onnx.ModelProto,
    data=None,
    *,
    shapes: Mapping[str, tuple] | Sequence[str] | None = None,
    seed: int = 0,
) -> Feed:
    """One sample to time ``model`` on (``onnxopt bench``, ``onnxopt tune``'s latency):
    the first validation sample of :func:`prepare_samples`, without its notes (one
    sample is what timing wants, not a validation set too small to prove anything)."""
    return _split_samples(model, data, shapes, seed, 0, 1).validation[0]


def _split_samples(
    model, data, shapes, seed: int, calibration_samples: int, validation_samples: int
) -> SampleSets:
    if calibration_samples < 0 or validation_samples < 1:
        raise UsageError("validation_samples must be >= 1 and calibration_samples >= 0")
    specs = input_specs(model)
    rng = np.random.default_rng(seed)
    if data is None:
        overrides = parse_shape_args(shapes or {})
        concrete = concrete_shapes(specs, overrides)
        ranges = infer_int_ranges(model)
        total = validation_samples + calibration_samples
        samples = generate_samples(specs, concrete, total, rng, ranges)
        source = f"generated (seed {seed}): " + ", ".join(
            f"{n}={'x'.join(map(str, s))}" for n, s in concrete.items()
        )
        return SampleSets(samples[validation_samples:], samples[:validation_samples], source)
    casts: set[tuple[str, str, str]] = set()
    samples = load_samples(data, specs, casts)
    _refuse_nonfinite(samples, specs)
    order = rng.permutation(len(samples))
    n_val = min(validation_samples, max(1, len(samples) // 2)) if len(samples) > 1 else 1
    validation = _pick(samples, order[:n_val])
    calibration = _pick(samples, order[n_val : n_val + calibration_samples])
    where = data if isinstance(data, (str, os.PathLike)) else "arrays"
    notes = [
        {"level": "note", "text": f"input {name!r}: {src} data cast to the model's {dst}"}
        for name, src, dst in sorted(casts)
    ]
    if n_val < MIN_VALIDATION_SAMPLES:
        notes.append(
            {
                "level": "warning",
                "text": f"only {n_val} validation sample{'s' if n_val != 1 else ''} (the data "
                f"has {len(samples)}; validation takes at most half): metrics on so few "
                f"samples prove little; give at least {2 * MIN_VALIDATION_SAMPLES} samples",
            }
        )
    return SampleSets(calibration, validation, f"{where}: {len(samples)} samples", notes)


MIN_VALIDATION_SAMPLES = 8


def _pick(samples: Sequence[Feed], positions: Sequence[int]) -> Sequence[Feed]:
    if isinstance(samples, sample_files.Samples):
        return samples.take(positions)  # still on disk
    return [samples[i] for i in positions]


def _refuse_nonfinite(samples: Sequence[Feed], specs: Sequence[InputSpec]) -> None:
    """NaN/Inf inputs make every comparison meaningless (NaN == NaN is never checked).
    One pass over the samples (they may be read from disk)."""
    floats = [spec.name for spec in specs if np.issubdtype(spec.dtype, np.floating)]
    if not floats:
        return
    bad, size, hit = (dict.fromkeys(floats, 0) for _ in range(3))
    for sample in samples:
        for name in floats:
            count = int(np.count_nonzero(~np.isfinite(sample[name])))
            bad[name] += count
            size[name] += sample[name].size
            hit[name] += bool(count)
    for name in floats:
        if bad[name]:
            raise DataError(
                f"input {name!r}: {bad[name]:,} of {size[name]:,} values are NaN or Inf (in "
                f"{hit[name]} of {len(samples)} samples); the checks compare "
                "outputs on finite inputs only: give data without NaN/Inf"
            )
