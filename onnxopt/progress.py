"""Progress bars for long work, silent unless the caller asks for them.

Library code calls ``ctx.progress(iterable, desc=..., total=...)``; the CLI turns bars
on when stderr is a terminal and ``-q`` was not given.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, enabled: bool = False, min_seconds: float = 1.0) -> None:
        self.enabled = enabled
        self.min_seconds = min_seconds

    def __call__(
        self, iterable: Iterable[T], desc: str = "", total: int | None = None
    ) -> Iterator[T]:
        if not self.enabled:
            return iter(iterable)
        from tqdm import tqdm

        return iter(
            tqdm(
                iterable,
                desc=desc,
                total=total,
                leave=False,
                delay=self.min_seconds,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        )


SILENT = Progress(enabled=False)
