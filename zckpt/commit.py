"""Commit is a protocol: write, fsync, manifest, rename, fsync the parent, then advertise.

Workers write shard files into ``<path>.tmp-<id>/`` and fsync them. The committer
writes the manifest there, fsyncs it and the directory, renames the directory to
``<path>`` and fsyncs the parent. Only a directory holding a manifest is a checkpoint:
:func:`latest` and retention never see temp directories, and a crash at any moment
leaves every committed checkpoint intact.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from typing import Any, Optional, Union

from ._proc import pid_alive
from .manifest import MANIFEST_NAME, write_manifest

__all__ = ["temp_dir_for", "is_temp_dir", "fsync_dir", "commit_dir", "latest", "committed",
           "apply_retention", "sweep_temp_dirs", "discard"]

logger = logging.getLogger(__name__)

# <path>.tmp-<trainer pid>-<random>: the pid tells a live trainer's save in progress
# from a crashed trainer's leftovers.
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")
PathLike = Union[str, "os.PathLike[str]"]


def temp_dir_for(final: str) -> str:
    return f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temp_dir(name: str) -> bool:
    return bool(_TMP_RE.search(name))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dir(tmp: str, final: str, manifest: dict[str, Any], *, fsync: bool) -> None:
    """Write the manifest into ``tmp`` and atomically make it ``final``.

    Raises:
        FileExistsError: ``final`` appeared meanwhile; ``tmp`` is left for the caller.
    """
    write_manifest(tmp, manifest, fsync=fsync)
    if fsync:
        fsync_dir(tmp)
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "a checkpoint already exists here", final)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "a checkpoint already exists here", final) from exc
        raise
    if fsync:
        fsync_dir(os.path.dirname(final) or ".")


def discard(path: str) -> None:
    """Remove a temp directory of a failed save (never a committed checkpoint)."""
    if not is_temp_dir(os.path.basename(path)):
        raise ValueError(f"refusing to delete {path!r}: not a zckpt temp directory")
    shutil.rmtree(path, ignore_errors=True)


def committed(root: PathLike) -> list[str]:
    """Committed checkpoints directly under ``root``, oldest first (by commit time)."""
    root = os.fspath(root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if is_temp_dir(name):
            continue
        path = os.path.join(root, name)
        try:
            st = os.stat(os.path.join(path, MANIFEST_NAME))
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.append((st.st_mtime_ns, name, path))
    found.sort()
    return [p for _, _, p in found]


def latest(root: PathLike) -> Optional[str]:
    """The newest committed checkpoint directly under ``root``, or None.

    Temp directories (``*.tmp-*``) and directories without a manifest are ignored.
    """
    done = committed(root)
    return done[-1] if done else None


def apply_retention(root: str, keep_last: int, protect: Optional[str] = None) -> list[str]:
    """Delete all but the newest ``keep_last`` committed checkpoints under ``root``.

    Never deletes the newest one, ``protect``, or anything uncommitted.
    """
    done = committed(root)
    keep = set(done[-max(1, keep_last):])
    if protect:
        keep.add(os.path.abspath(protect))
    removed = []
    for path in done:
        if path in keep or os.path.abspath(path) in keep:
            continue
        # Unlink the manifest first: a crash mid-delete leaves an uncommitted directory,
        # never a committed one with missing shards.
        try:
            os.unlink(os.path.join(path, MANIFEST_NAME))
        except FileNotFoundError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.info("retention: removed %s", path)
    return removed


def sweep_temp_dirs(root: str) -> list[str]:
    """Remove temp directories under ``root`` left by trainers that no longer run."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        m = _TMP_RE.search(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.info("swept leftover temp directory %s", path)
    return removed
