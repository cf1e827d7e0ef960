"""Fixtures that own cleanup: every pool is killed in ``finally`` and leaks fail the test.

``no_leaks`` (autouse) snapshots child processes, ``/dev/shm``, zckpt's ipc
directories, and this process's staging memfds (open fds and mappings) before a test
and, after it, kills whatever worker children remain and fails the test if any
process, segment, socket directory or arena memfd was left behind.
"""

from __future__ import annotations

import gc
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator

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


def _memfd_fds() -> set[str]:
    """This process's open fds on an arena memfd, as ``fd -> target`` (the arena has no /dev/shm name)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, closed by now
            continue
        if target.startswith("/memfd:zckpt-"):
            out.add(f"{fd} -> {target}")
    return out


def _memfd_maps() -> set[str]:
    """This process's mappings of arena memfds (they outlive the fd while a tensor holds them)."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[-1].strip() + " @ " + line.split()[0] for line in f
                if "memfd:zckpt-" in line}


def _memfd_leaks(before_fds: set[str], before_maps: set[str]) -> tuple[set[str], set[str]]:
    fds, maps = _memfd_fds() - before_fds, _memfd_maps() - before_maps
    if fds or maps:  # a mapping held only by garbage (a cycle) is not a leak: collect, then look again
        gc.collect()
        fds, maps = _memfd_fds() - before_fds, _memfd_maps() - before_maps
    return fds, maps


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before_shm, before_ipc = _shm(), _ipc_dirs()
    before_fds, before_maps = _memfd_fds(), _memfd_maps()
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
    new_fds, new_maps = _memfd_leaks(before_fds, before_maps)
    assert not leaked, f"worker processes outlived their pool: {sorted(leaked)}"
    assert not new_shm, f"/dev/shm entries leaked: {sorted(new_shm)}"
    assert not new_ipc, f"ipc socket directories leaked: {sorted(new_ipc)}"
    assert not new_fds, f"staging arena memfds left open: {sorted(new_fds)}"
    assert not new_maps, f"staging arena memfds left mapped: {sorted(new_maps)}"


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


# --- hypothesis profiles (tests/test_differential.py) ------------------------------------
# ZCKPT_HYPOTHESIS_PROFILE=ci (default: reproducible, fast) or thorough (5000 examples).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only test_differential.py needs it (the "test" extra installs it)
    pass
else:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, database=None,
                              print_blob=True, suppress_health_check=_slow_ok)
    settings.register_profile("thorough", max_examples=5000, deadline=None, print_blob=True,
                              suppress_health_check=_slow_ok)
    settings.load_profile(os.environ.get("ZCKPT_HYPOTHESIS_PROFILE", "ci"))
