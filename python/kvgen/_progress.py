"""A load progress bar: drawn on a terminal for large files, silent otherwise."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

LARGE_BYTES = 50 * 1024 * 1024


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if f.endswith((".safetensors", ".gguf")) and os.path.isfile(os.path.join(path, f))
        )
    return 0


def load_progress(path: str, stream=None) -> Callable[[int, int], None] | None:
    """A `(done, total)` callback drawing a bar on `stream` (stderr), or None when it is not a
    terminal or the model is small."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()) or _size(path) < LARGE_BYTES:
        return None
    name = os.path.basename(os.path.normpath(path))
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        stream.write(f"\rLoading {name} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            stream.write(f" {time.perf_counter() - start:.1f}s\n")
        stream.flush()

    return report
