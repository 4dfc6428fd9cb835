"""Open a local HTML page in headless Chromium: a screenshot plus the console messages.

Used by the HTML page tests. Chromium comes from Debian's packages, installed by
``tools/install_chromium.sh`` (called by ``.ci/run``). Where it is missing the tests
skip, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CONSOLE = re.compile(r":CONSOLE[^\]]*\]\s*(.*)")


@dataclass
class Rendered:
    png: Path
    console: list[str]  # every console message (our pages run no script: expect none)


def chromium() -> str:
    """The browser executable, or skip (fail under CI) when there is none."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    message = "headless chromium not installed (run tools/install_chromium.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def render(page: Path, png: Path, *, width: int = 1200, height: int = 900) -> Rendered:
    with tempfile.TemporaryDirectory(prefix="onnxopt-chromium-") as profile:
        done = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                "--enable-logging=stderr",
                "--v=0",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert png.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr}"
    console = [m.group(1) for m in map(CONSOLE.search, done.stderr.splitlines()) if m]
    return Rendered(png, console)


def ink(png: Path) -> tuple[int, float]:
    """(distinct colours, fraction of pixels that are not white) of a screenshot."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        colours = len(rgb.getcolors(maxcolors=1 << 20) or [])
        grey = rgb.convert("L")
        histogram = grey.histogram()
        total = sum(histogram)
        return colours, 1.0 - histogram[255] / total
