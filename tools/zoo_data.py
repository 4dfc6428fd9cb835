"""Realistic inputs for the zoo models: disjoint calibration and evaluation ``.npz`` files.

Uniform noise tells little about a real model: its activations, and so its
quantization ranges, pruning saliency and codebooks, look nothing like those of the
inputs it was trained for. Each zoo model gets inputs with the structure of its task:

- **OCR** (``ppocr-det``, ``ppocr-rec``, ``ppocr-cls``): text rendered with Pillow in
  the system's TrueType fonts (Pillow's own default font where there are none):
  words, numbers and dates on light, slightly noisy backgrounds. Lines for rec
  (3x48x320) and cls (3x48x192, half of them upside down: the class the model tells),
  pages of several lines for det (3x320x320). Normalised as PaddleOCR does: rec/cls
  ``(x/255 - 0.5)/0.5``, padded right with zeros; det ImageNet mean/std. Without
  Pillow (it is the ``zoo`` extra) a seeded 5x7 bitmap font draws the same texts.
- **VAD** (``vad``, ``vad-if``): speech-like audio at 16 kHz: espeak-ng speech when
  Debian's ``espeak-ng`` is installed, else a synthetic voice (harmonics of a gliding
  pitch shaped by moving formants, in syllables, with fricative bursts, pauses and
  background noise). The model is run over the stream chunk by chunk (512 samples plus
  64 of context), so every sample carries the recurrent state the real stream
  produces there.
- **MiniLM** (``minilm``): WordPiece-like id sequences ``101 ... 102`` with a Zipf
  distribution of word ids and some ``##`` continuation ids, real lengths 6-64, padded
  with 0 and mask 0 to 64.

Calibration and evaluation files come from different seeds (different texts, voices,
sequences) and never share a sample. Files go next to the models:
``<zoo>/data/<model>.calib.npz`` and ``<model>.eval.npz``.

    python tools/zoo_data.py                       # all models, 64 calib + 32 eval
    python tools/zoo_data.py --models vad --calib 96 --eval 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_zoo

CALIB_SEED, EVAL_SEED = 1000, 2000
DET_SIZE = 320
REC_SHAPE = (48, 320)
CLS_SHAPE = (48, 192)
SEQ_LEN = 64
VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "invoice",
    "total",
    "date",
    "amount",
    "paid",
    "order",
    "number",
    "customer",
    "account",
    "balance",
    "due",
    "tax",
    "price",
    "quantity",
    "item",
    "description",
    "street",
    "road",
    "city",
    "phone",
    "email",
    "www",
    "page",
    "report",
    "summary",
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "monday",
    "friday",
    "open",
    "closed",
    "hours",
    "station",
    "platform",
    "exit",
    "entrance",
    "warning",
    "caution",
    "please",
    "thank",
    "you",
    "welcome",
    "receipt",
    "cash",
    "card",
    "change",
    "discount",
    "coffee",
    "tea",
    "bread",
    "milk",
    "water",
    "train",
    "bus",
    "ticket",
    "gate",
    "seat",
    "class",
    "adult",
    "child",
    "return",
    "single",
    "office",
    "hotel",
    "room",
]


# ----------------------------------------------------------------------------- text


def _phrase(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.random()
        if kind < 0.6:
            w = WORDS[int(rng.integers(len(WORDS)))]
            parts.append(
                w.capitalize() if rng.random() < 0.3 else w.upper() if rng.random() < 0.1 else w
            )
        elif kind < 0.8:
            parts.append(f"{rng.integers(0, 10000)}")
        elif kind < 0.9:
            parts.append(f"{rng.integers(1, 999)}.{rng.integers(0, 100):02d}")
        else:
            parts.append(
                f"{rng.integers(2000, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
            )
    return " ".join(parts)


def _fonts() -> list[str]:
    found = []
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts")):
        for dirpath, _, files in os.walk(root):
            found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(".ttf")]
    return sorted(found)


class _Renderer:
    """Draws a text string as a dark-on-light grayscale-ish RGB uint8 image."""

    def __init__(self):
        try:
            from PIL import Image, ImageDraw, ImageFont
        except ImportError:
            self.pil = None
        else:
            self.pil = (Image, ImageDraw, ImageFont)
        self.font_files = _fonts()
        self._cache: dict = {}
        self._glyphs: dict[str, np.ndarray] = {}

    @property
    def kind(self) -> str:
        if self.pil is None:
            return "bitmap font (Pillow not installed)"
        return (
            f"Pillow, {len(self.font_files)} system fonts"
            if self.font_files
            else "Pillow default font"
        )

    def _font(self, index: int, size: int):
        key = (index, size)
        if key not in self._cache:
            _, _, ImageFont = self.pil
            if self.font_files:
                self._cache[key] = ImageFont.truetype(
                    self.font_files[index % len(self.font_files)], size
                )
            else:
                self._cache[key] = ImageFont.load_default(size=size)
        return self._cache[key]

    def draw(self, canvas: np.ndarray, text: str, x: int, y: int, size: int, ink, rng) -> tuple:
        """Draw ``text`` onto ``canvas`` (HxWx3 uint8) at (x, y); returns its box."""
        if self.pil is not None:
            Image, ImageDraw, _ = self.pil
            font = self._font(int(rng.integers(1 << 16)), size)
            img = Image.fromarray(canvas)
            d = ImageDraw.Draw(img)
            d.text((x, y), text, fill=tuple(int(c) for c in ink), font=font)
            box = d.textbbox((x, y), text, font=font)
            canvas[...] = np.asarray(img)
            return box
        return self._draw_bitmap(canvas, text, x, y, size, ink)

    def _draw_bitmap(self, canvas, text, x, y, size, ink):
        scale = max(1, size // 8)
        cx = x
        for ch in text:
            if ch not in self._glyphs:
                g = np.random.default_rng(ord(ch)).random((7, 5)) < 0.45
                g[:, 0] |= ch.isalnum()  # a stem, like most glyphs
                self._glyphs[ch] = g if ch != " " else np.zeros((7, 5), bool)
            g = np.kron(self._glyphs[ch], np.ones((scale, scale), bool))
            h, w = g.shape
            region = canvas[y : y + h, cx : cx + w]
            mask = g[: region.shape[0], : region.shape[1]]
            region[mask] = ink
            cx += w + scale
        return (x, y, cx, y + 7 * scale)


def _background(rng, h, w) -> np.ndarray:
    base = rng.integers(190, 256, size=3)
    img = np.empty((h, w, 3), np.float32)
    img[...] = base
    gy = np.linspace(0, rng.normal(0, 12), h)[:, None, None]
    img += gy + rng.normal(0, 4, size=(h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _ink(rng):
    return rng.integers(0, 90, size=3)


def _line_image(renderer: _Renderer, rng) -> np.ndarray:
    """One text line, cropped to its text with a margin: HxWx3 uint8."""
    text = _phrase(rng)
    size = int(rng.integers(26, 40))
    canvas = _background(rng, size * 2, size * (len(text) + 2))
    box = renderer.draw(canvas, text, size // 2, size // 3, size, _ink(rng), rng)
    x0, y0, x1, y1 = (int(v) for v in box)
    m = int(rng.integers(2, 8))
    crop = canvas[max(0, y0 - m) : y1 + m, max(0, x0 - m) : x1 + m]
    return crop if crop.size else canvas


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of an HxWxC uint8 image (numpy only)."""
    src_h, src_w = img.shape[:2]
    ys = np.clip((np.arange(h) + 0.5) * src_h / h - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(w) + 0.5) * src_w / w - 0.5, 0, src_w - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, src_h - 1)
    x1 = np.minimum(x0 + 1, src_w - 1)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    f = img.astype(np.float32)
    top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1] * fx
    bot = f[y1][:, x0] * (1 - fx) + f[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def _paddle_line(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: keep aspect, height H, pad right to W with 0."""
    h, w_max = shape
    w = min(w_max, max(1, int(np.ceil(h * img.shape[1] / img.shape[0]))))
    x = _resize(img, h, w) / 255.0
    x = (x - 0.5) / 0.5
    out = np.zeros((3, h, w_max), np.float32)
    out[:, :, :w] = x.transpose(2, 0, 1)
    return out


def ocr_lines(n: int, seed: int, shape, rotate_half: bool = False):
    renderer = _Renderer()
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for i in range(n):
        img = _line_image(renderer, rng)
        flip = rotate_half and i % 2 == 1
        if flip:
            img = img[::-1, ::-1]
        xs.append(_paddle_line(img, shape))
        labels.append(int(flip))
    return np.stack(xs)[:, None], np.array(labels), renderer.kind


def ocr_pages(n: int, seed: int, size: int = DET_SIZE):
    renderer = _Renderer()
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs, masks = [], []
    for _ in range(n):
        page = _background(rng, size, size)
        mask = np.zeros((size, size), bool)
        if rng.random() < 0.5:  # a coloured block, as on forms and signs
            y, x = rng.integers(0, size // 2, 2)
            page[y : y + rng.integers(20, size // 2), x : x + rng.integers(20, size // 2)] = (
                rng.integers(120, 230, 3)
            )
        y = int(rng.integers(4, 30))
        while y < size - 30:
            fs = int(rng.integers(14, 30))
            x = int(rng.integers(4, size // 3))
            box = renderer.draw(page, _phrase(rng), x, y, fs, _ink(rng), rng)
            x0, y0, x1, y1 = (int(np.clip(v, 0, size)) for v in box)
            mask[y0:y1, x0:x1] = True
            y = y1 + int(rng.integers(6, 40))
        xs.append(((page / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32))
        masks.append(mask)
    return np.stack(xs)[:, None], np.stack(masks), renderer.kind


# ----------------------------------------------------------------------------- audio


def _espeak(rng, seconds: float) -> np.ndarray | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    pieces = []
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        while total < seconds * VAD_RATE:
            text = " ".join(_phrase(rng) for _ in range(3))
            path = Path(tmp) / "s.wav"
            voice = ["en", "en-us", "en-gb", "de", "fr"][int(rng.integers(5))]
            cmd = [
                exe,
                "-v",
                voice,
                "-s",
                str(int(rng.integers(130, 190))),
                "-p",
                str(int(rng.integers(20, 80))),
                "-w",
                str(path),
                text,
            ]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                return None
            with wave.open(str(path)) as w:
                rate = w.getframerate()
                a = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
            t = np.arange(int(len(a) * VAD_RATE / rate)) * rate / VAD_RATE
            a = np.interp(t, np.arange(len(a)), a).astype(np.float32)
            pause = np.zeros(int(rng.uniform(0.2, 1.2) * VAD_RATE), np.float32)
            pieces += [a, pause]
            total += len(a) + len(pause)
    return np.concatenate(pieces)


def _synthetic_voice(rng, seconds: float) -> np.ndarray:
    """Voiced syllables (harmonics of a gliding f0 under moving formants), bursts, pauses."""
    out = []
    total = int(seconds * VAD_RATE)
    n = 0
    f0_base = rng.uniform(90, 220)
    while n < total:
        if rng.random() < 0.3:  # pause
            seg = np.zeros(int(rng.uniform(0.15, 0.8) * VAD_RATE), np.float32)
        else:
            length = int(rng.uniform(0.12, 0.35) * VAD_RATE)
            t = np.arange(length) / VAD_RATE
            f0 = f0_base * (
                1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6))
            )
            phase = 2 * np.pi * np.cumsum(f0) / VAD_RATE
            formants = rng.uniform([300, 900, 2300], [850, 2300, 3200])
            glide = rng.uniform(-0.2, 0.2, 3)
            seg = np.zeros(length, np.float64)
            for k in range(1, int(4000 / f0_base)):
                fk = k * f0
                amp = (
                    sum(
                        np.exp(-0.5 * ((fk - fm * (1 + g * t / t[-1])) / (80 + 0.1 * fm)) ** 2)
                        for fm, g in zip(formants, glide)
                    )
                    / k**0.5
                )
                seg += amp * np.sin(k * phase)
            env = np.sin(np.pi * np.arange(length) / length) ** 0.6
            seg = seg * env
            if rng.random() < 0.4:  # a fricative onset
                burst = int(rng.uniform(0.03, 0.08) * VAD_RATE)
                noise = np.diff(rng.normal(0, 1, burst + 1))  # high-passed noise
                seg = np.concatenate([noise * 0.3, seg])
            seg = (seg / (np.abs(seg).max() + 1e-9) * rng.uniform(0.2, 0.7)).astype(np.float32)
        out.append(seg)
        n += len(seg)
    audio = np.concatenate(out)[:total]
    return audio + rng.normal(0, rng.uniform(0.002, 0.01), len(audio)).astype(np.float32)


def vad_stream(model_path: Path, n: int, seed: int, with_sr: bool = False):
    """``n`` (chunk, state) samples taken along audio streams the model is run over."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    chunks, states, kind = [], [], None
    while len(chunks) < n:
        audio = _espeak(rng, 8.0)
        kind = "espeak-ng speech" if audio is not None else "synthetic formant voice"
        if audio is None:
            audio = _synthetic_voice(rng, 8.0)
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(VAD_CONTEXT, np.float32)
        keep_every = int(rng.integers(3, 6))
        for i in range(len(audio) // VAD_CHUNK):
            x = np.concatenate([context, audio[i * VAD_CHUNK : (i + 1) * VAD_CHUNK]])[None]
            feed = {"input": x.astype(np.float32), "state": state}
            if with_sr:
                feed["sr"] = np.array(VAD_RATE, np.int64)
            if i % keep_every == keep_every - 1 and len(chunks) < n:
                chunks.append(feed["input"])
                states.append(state.copy())
            _, state = sess.run(None, feed)
            context = x[0, -VAD_CONTEXT:]
    arrays = {"input": np.stack(chunks), "state": np.stack(states)}
    if with_sr:
        arrays["sr"] = np.full((n,), VAD_RATE, np.int64)
    return arrays, kind


# ----------------------------------------------------------------------------- tokens


def token_sequences(n: int, seed: int, length: int = SEQ_LEN):
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, 1, length), np.int64)
    mask = np.zeros((n, 1, length), np.int64)
    for i in range(n):
        real = int(rng.integers(6, length + 1))
        words = 1996 + (rng.zipf(1.3, real - 2) - 1) % 27000  # frequent words first
        cont = rng.random(real - 2) < 0.12  # "##" pieces live high in BERT's vocab
        words[cont] = rng.integers(29000, 30500, int(cont.sum()))
        ids[i, 0, :real] = np.concatenate([[101], words, [102]])
        mask[i, 0, :real] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- files


def make(name: str, n: int, seed: int, model_path: Path) -> tuple[dict, str]:
    if name == "ppocr-rec":
        x, _, kind = ocr_lines(n, seed, REC_SHAPE)
        return {"x": x}, kind
    if name == "ppocr-cls":
        x, label, kind = ocr_lines(n, seed, CLS_SHAPE, rotate_half=True)
        return {"x": x, "label": label}, kind
    if name == "ppocr-det":
        x, mask, kind = ocr_pages(n, seed)
        return {"x": x, "text_mask": mask}, kind
    if name in ("vad", "vad-if"):
        return vad_stream(model_path, n, seed, with_sr=name == "vad-if")
    if name == "minilm":
        return token_sequences(n, seed), "WordPiece-like ids"
    raise KeyError(name)


def data_paths(name: str, directory=None) -> tuple[Path, Path]:
    d = fetch_zoo.zoo_dir(directory) / "data"
    return d / f"{name}.calib.npz", d / f"{name}.eval.npz"


def _save(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure(
    names=None,
    calib: int = 64,
    evaluation: int = 32,
    directory=None,
    force: bool = False,
    quiet: bool = True,
) -> dict[str, tuple[Path, Path]]:
    """Models fetched and both data files written (kept when present with enough samples)."""
    names = list(fetch_zoo.ZOO) if names is None else list(names)
    models = fetch_zoo.ensure(names, directory)
    out = {}
    for name in names:
        calib_path, eval_path = data_paths(name, directory)
        for path, n, seed in ((calib_path, calib, CALIB_SEED), (eval_path, evaluation, EVAL_SEED)):
            if not force and path.is_file():
                with np.load(path) as z:
                    if len(z[z.files[0]]) == n:
                        continue
            arrays, kind = make(name, n, seed, models[name])
            _save(path, arrays)
            if not quiet:
                print(f"{name:10s} {n:3d} samples ({kind}) -> {path}", file=sys.stderr)
        out[name] = (calib_path, eval_path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(fetch_zoo.ZOO)}")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples (default 64)")
    ap.add_argument("--eval", type=int, default=32, help="evaluation samples (default 32)")
    ap.add_argument(
        "--dir", help="zoo cache directory (default: $ONNXOPT_ZOO or ~/.cache/onnxopt/zoo)"
    )
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else None
    try:
        paths = ensure(names, args.calib, args.eval, args.dir, args.force, quiet=False)
    except fetch_zoo.FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, (c, e) in paths.items():
        print(f"{name:10s} {c}  {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
