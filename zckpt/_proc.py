"""OS mechanics for worker processes: parent-death signal, pidfds, killing. Linux-first."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent *thread* exits."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def open_pidfd(pid: int) -> int | None:
    """A pollable fd that becomes readable when ``pid`` exits, or None if unsupported."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # pid reused by another user's process: not ours to kill
        logger.debug("not allowed to signal pid %d", pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def boot_id() -> str:
    """This boot's id (8 hex digits of /proc/sys/kernel/random/boot_id; "0" * 8 without it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "0" * 8


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_identity(pid: int | None = None) -> tuple[int, int, str]:
    """``(pid, start time, boot id)``: names one process for good, unlike a pid, which the
    kernel reuses, and which means nothing after a reboot."""
    pid = os.getpid() if pid is None else pid
    return pid, start_time(pid) or 0, boot_id()


def identity_alive(pid: int, start: int, boot: str) -> bool:
    """Whether the process named by :func:`process_identity` still runs."""
    if boot != boot_id():
        return False        # rebooted since: nothing from before runs
    if not pid_alive(pid):
        return False
    now = start_time(pid)
    return now is None or now == start   # another start time: the pid was reused


def sweep_stale_ipc_dirs(tmpdir: str) -> list[str]:
    """Remove ``zckpt-<pid>-*`` socket directories of trainers that no longer run.

    A trainer killed together with its workers (OOM killer, cgroup kill) leaves its
    directory behind; the next pool on the machine removes it.
    """
    import shutil
    removed: list[str] = []
    try:
        names = os.listdir(tmpdir)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == "zckpt" and parts[1].isdigit():
            pid = int(parts[1])
            path = os.path.join(tmpdir, name)
            if pid != os.getpid() and not pid_alive(pid) and os.path.isdir(path) \
                    and os.stat(path).st_uid == os.getuid() and set(os.listdir(path)) <= {"ctl"}:
                # Only what a pool makes (empty, or its socket file): never a user's data.
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                logger.info("removed stale socket directory %s", path)
    return removed
