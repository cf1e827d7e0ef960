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
    if not 0 < pid < 1 << 22:   # PID_MAX_LIMIT is 2**22: larger is no process (os.kill would overflow)
        return False
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


def machine_id() -> str:
    """This host's id (8 hex digits of /etc/machine-id, else of a hash of the host name)."""
    try:
        with open("/etc/machine-id") as f:
            text = f.read().strip()
        if len(text) >= 8 and all(c in "0123456789abcdef" for c in text[:8]):
            return text[:8]
    except OSError:
        pass
    import hashlib
    import socket
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_identity(pid: int | None = None) -> tuple[int, int, str]:
    """``(pid, start time, host)``, host being machine id + boot id (16 hex digits): names
    one process for good, unlike a pid, which the kernel reuses, which means nothing after
    a reboot, and nothing on another host sharing the file system."""
    pid = os.getpid() if pid is None else pid
    return pid, start_time(pid) or 0, machine_id() + boot_id()


def identity_alive(pid: int, start: int, host: str) -> bool:
    """Whether the process named by :func:`process_identity` may still run.

    Another machine's process (a shared file system) cannot be judged from here: it
    counts as alive. This machine after a reboot: dead. Same boot: by pid and start time.
    (A process in another PID namespace of this host is misjudged: its pid means nothing
    here. Give containers sharing a checkpoint root their own /etc/machine-id.)
    """
    if len(host) == 16:
        if host[:8] != machine_id():
            return True
        host = host[8:]
    if host != boot_id():
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
