"""Fixtures that own cleanup: every pool is killed in ``finally`` and leaks fail the test.

``no_leaks`` (autouse) snapshots child processes, ``/dev/shm`` and zckpt's ipc
directories before a test and, after it, kills whatever worker children remain and
fails the test if any process, segment or socket directory was left behind.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Callable, Iterator

import pytest

import zckpt


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (read from /proc: no psutil needed)."""
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # the command name may hold spaces and parens: fields start after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(name))
    return out


def worker_children() -> set[int]:
    pids = set()
    for pid in children_of(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"zckpt.worker" in f.read():
                    pids.add(pid)
        except OSError:
            pass
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.01) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)  # polling cadence, not synchronisation: the predicate decides


def _ipc_dirs() -> set[str]:
    # Only this process's: other programs on the machine may run pools meanwhile.
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith(f"zckpt-{os.getpid()}-")}


def _shm() -> set[str]:
    pid = str(os.getpid())
    return {n for n in os.listdir("/dev/shm") if "zckpt" in n or pid in n}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before_shm, before_ipc = _shm(), _ipc_dirs()
    before_children = worker_children()
    yield
    leaked = worker_children() - before_children
    for pid in leaked:  # clean up first, then fail: the next test starts clean either way
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    new_shm = _shm() - before_shm
    new_ipc = _ipc_dirs() - before_ipc
    assert not leaked, f"worker processes outlived their pool: {sorted(leaked)}"
    assert not new_shm, f"/dev/shm entries leaked: {sorted(new_shm)}"
    assert not new_ipc, f"ipc socket directories leaked: {sorted(new_ipc)}"


@pytest.fixture
def make_pool() -> Iterator[Callable[..., zckpt.CheckpointPool]]:
    """Build pools that are killed at the end of the test whatever happens."""
    pools: list[zckpt.CheckpointPool] = []

    def make(*args, **kwargs) -> zckpt.CheckpointPool:
        kwargs.setdefault("config", zckpt.PoolConfig(fsync=False, heartbeat_interval_s=0.2,
                                                     init_timeout_s=30.0))
        pool = zckpt.CheckpointPool(*args, **kwargs)
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            pool.kill()
