"""fsync that names what failed, and is never retried.

After a failed ``fsync`` Linux may already have dropped the dirty pages and marked them
clean, so a second ``fsync`` on the same file can report success over lost data (the
"fsyncgate" discussion of PostgreSQL, 2018, and the kernel's errseq_t notes). Every fsync
of zckpt goes through here: one attempt; on failure an ``OSError`` with the errno, the
call and the path, and the caller discards what it was making durable.
"""

from __future__ import annotations

import errno
import os

__all__ = ["fsync_fd", "write_new_file"]


def fsync_fd(fd: int, path: str, *, data_only: bool = False) -> None:
    """``fdatasync`` (``data_only``) or ``fsync`` of ``fd``, once.

    Raises:
        OSError: with the original errno, ``filename`` set to ``path``, and a message
            naming the call, the path and the errno's name (``EIO``, ``ENOSPC``, ...).
    """
    call = "fdatasync" if data_only else "fsync"
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    except OSError as exc:
        code = exc.errno if exc.errno is not None else errno.EIO
        name = errno.errorcode.get(code, str(code))
        raise OSError(code, f"{call} of {path} failed with {name} ({os.strerror(code)}); what was written there "
                            "may be lost, so it is discarded, not retried", path) from exc


def write_new_file(path: str, data: bytes, *, fsync: bool) -> None:
    """Create ``path`` (it must not exist), write all of ``data``, and fsync it (``fsync``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            fsync_fd(fd, path)
    finally:
        os.close(fd)
