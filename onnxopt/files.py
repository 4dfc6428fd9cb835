"""Small files written atomically: a reader sees the old file or the new one, never
half of one (reports, HTML pages, tune's cache records). Models have their own, larger
protocol (``model.save_model``: data files first, the .onnx rename commits)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, payload: bytes | str) -> Path:
    """Write ``payload`` (text is UTF-8) to ``path`` through a temporary file in the
    same folder and ``os.replace``, with the mode a plain ``open`` would give it (0666
    less the umask: the temporary file would otherwise keep 0600)."""
    target = Path(path)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", delete=False
    ) as handle:
        handle.write(data)
        temporary = Path(handle.name)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
