"""Writers for the stall-detection tests (importable in workers: module level, no torch)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from zckpt.writers import LocalFileWriter

from _writers import wait_for_file


class HalfThenGateWriter:
    """Reports half the bytes as written, leaves ``started-<pid>``, then waits for ``<gate>/open``."""

    def __init__(self, gate_dir: str) -> None:
        self.gate_dir = gate_dir
        self.inner = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        progress(len(data) // 2)
        open(os.path.join(self.gate_dir, f"started-{os.getpid()}"), "w").close()
        wait_for_file(os.path.join(self.gate_dir, "open"))
        self.inner.write_file(path, data, progress=lambda n: None)


class TricklingWriter:
    """Slow but alive: reports one byte every ``tick_s`` for ``total_s``, then writes."""

    def __init__(self, total_s: float, tick_s: float) -> None:
        self.total_s, self.tick_s = total_s, tick_s
        self.inner = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        end = time.monotonic() + self.total_s
        while time.monotonic() < end:  # the duration is what is under test
            progress(1)
            time.sleep(self.tick_s)
        self.inner.write_file(path, data, progress=lambda n: None)
