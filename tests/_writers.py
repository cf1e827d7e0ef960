"""Writers and init functions that tests substitute into workers to inject behaviour.

Faults are injected by substitution (a writer that blocks, fails or records), never by
hooks inside zckpt's worker. Cross-process waits poll a file with a deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from zckpt.writers import LocalFileWriter


def wait_for_file(path: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s}s")
        time.sleep(0.005)


def wait_for_started(gate_dir, timeout_s: float = 30.0) -> str:
    """The marker a :class:`GateWriter` leaves once a write has begun (any worker)."""
    import glob
    deadline = time.monotonic() + timeout_s
    while True:
        found = glob.glob(os.path.join(str(gate_dir), "started-*"))
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no gated write started within {timeout_s}s")
        time.sleep(0.005)  # polling cadence; the marker decides


class GateWriter:
    """Announces each write (``started-<pid>``), then waits for ``<gate_dir>/open``."""

    def __init__(self, gate_dir: str) -> None:
        self.gate_dir = gate_dir
        self.inner = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        open(os.path.join(self.gate_dir, f"started-{os.getpid()}"), "w").close()
        wait_for_file(os.path.join(self.gate_dir, "open"))
        self.inner.write_file(path, data, progress=progress)


class FailingWriter:
    """Raises a distinctive error on every write."""

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        raise OSError(28, f"simulated disk full writing {os.path.basename(path)}")


class RecordingWriter:
    """Writes normally and records the kwargs of each call next to the file."""

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir
        self.inner = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        with open(os.path.join(self.record_dir, f"call-{os.getpid()}-{os.path.basename(path)}"), "w") as f:
            f.write(repr(sorted(kwargs.items())))
        self.inner.write_file(path, data, progress=progress)


class TorchProbeWriter:
    """Writes normally; records whether torch is imported in this worker at each write."""

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir
        self.inner = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        import sys
        with open(os.path.join(self.record_dir, "torch-imported"), "a") as f:
            f.write(f"{'torch' in sys.modules}\n")
        self.inner.write_file(path, data, progress=progress)


def marker_init(marker_dir: str, tag: str) -> None:
    """Init function: leaves ``<tag>-<pid>`` so the test can see it ran in the worker."""
    with open(os.path.join(marker_dir, f"{tag}-{os.getpid()}"), "w") as f:
        f.write(str(os.getppid()))


def failing_init(message: str) -> None:
    raise ValueError(message)


def slow_init(gate: str) -> None:
    wait_for_file(gate, timeout_s=120.0)


def kill_compat(cp: Any) -> None:
    """Test cleanup for a compat CheckpointProcess: kill its worker, then close (no drain)."""
    if cp.process is not None:
        cp.process.processes[0].kill()
    cp.close()


class FlakyWriter:
    """Raises TransientWriteError on its first ``fail`` calls, then writes normally."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls = 0
        self.inner = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, *, progress: Callable[[int], None], **kwargs: Any) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            with open(path, "wb") as f:     # leave a partial file, as a real failure would
                f.write(bytes(data[:10]))
            from zckpt import TransientWriteError
            raise TransientWriteError(11, f"throttled (call {self.calls})", path)
        self.inner.write_file(path, data, progress=progress)
