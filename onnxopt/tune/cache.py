"""The trial cache in ``OUTDIR/cache``: a repeated or resumed ``tune`` redoes nothing.

A trial's key is the SHA-256 of (model hash, data hash, pipeline text, onnxopt
version) plus the settings that change a trial's outcome (budget, seed, shapes,
sample counts, latency threads and rounds): change any of them and the trial runs
again. ``<key>.json`` holds the trial record, ``<key>.onnx`` (and its external data,
if any) the model. Both are written to a temporary name and renamed: the record is
written last, so a trial killed in the middle leaves at most an orphan model, which
the next run overwrites, and never a half-written file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from onnxopt import __version__
from onnxopt.files import write_atomic
from onnxopt.tune.trial import Settings, model_files


def trial_key(model_sha: str, data_sha: str, pipeline: str, settings: Settings) -> str:
    payload = {
        "model": model_sha,
        "data": data_sha,
        "pipeline": pipeline,
        "onnxopt": __version__,
        "settings": dataclasses.asdict(settings),
    }
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TrialCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def model_path(self, key: str) -> Path:
        return self.folder / f"{key}.onnx"

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.folder / f"{key}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing, or not ours: the trial runs again
        return record if record.get("key") == key else None

    def has_model(self, key: str) -> bool:
        path = self.model_path(key)
        try:
            return all(p.is_file() for p in model_files(path))
        except Exception:
            return False

    def store(self, record: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """Write the trial's model files (when given as bytes), then its record."""
        for name, payload in (files or {}).items():
            write_atomic(self.folder / name, payload)
        text = json.dumps(record, indent=1, default=str)
        write_atomic(self.folder / f"{record['key']}.json", text.encode())

    def drop_model(self, key: str) -> None:
        path = self.model_path(key)
        try:
            paths = model_files(path)
        except Exception:
            paths = [path]
        for item in paths:
            item.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target`` atomically (a hard link when possible)."""
    temporary = target.parent / f".{target.name}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        import shutil

        shutil.copyfile(source, temporary)
    try:
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
