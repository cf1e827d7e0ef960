"""Commit is a protocol: write, fsync, manifest, rename, fsync the parent, then advertise.

Workers write shard files into ``<path>.tmp-<id>/`` and fsync them. The committer
writes the manifest there, fsyncs it and the directory, renames the directory to
``<path>`` and fsyncs the parent. Only a directory holding a manifest is a checkpoint:
:func:`latest` and retention never see temp directories, and a crash at any moment
leaves every committed checkpoint intact.

Order is what the commit recorded, never a file time (a copy, a restore or ``rsync``
without ``-t`` rewrites those): the committer stamps the manifest with
``{"sequence": N, "unix_time_ns": T}``, N being 1 + the largest sequence already
committed under the same root. See :func:`committed` for the full rule.

Why a power loss cannot lose or corrupt a committed checkpoint (the model: only
``fsync`` orders anything; ``fsync`` of a file makes its data durable, of a directory its
entries; nothing else is promised; ``tests/test_crash.py`` checks every prefix of a
save's operations against it):

1. Shard files and the manifest are fsynced before the rename, and the temp directory
   is fsynced before it (its entries are durable). So if the rename survives, the
   directory it names holds every file, whole.
2. The rename is atomic, and until it is durable the checkpoint's name either does not
   exist or (reordered by the file system) already names the complete directory of 1.
   A temp directory is never a checkpoint, whatever it holds (:func:`is_temp_dir`).
3. ``result()`` returns only after the parent is fsynced, and the parents of every
   directory the save created were fsynced before the rename (:func:`fsync_created`),
   so a checkpoint whose save returned survives along with the path to it. If that last
   fsync fails, the rename is taken back and the save fails: the caller and ``latest()``
   agree now. After a power loss the rename may still have reached the disk (the undo is
   no more durable than the failed fsync): then a complete, verifiable checkpoint the
   caller was told failed appears. It is never a damaged one.
4. Retention renames a condemned checkpoint to ``*.del-*`` and fsyncs the parent before
   deleting anything, so a checkpoint is whole or gone; :func:`sweep_temp_dirs` removes
   condemned and abandoned temp directories (judged by pid, start time, machine and boot
   id; another machine's are never judged from here). A retention failure is logged and
   retried by the next commit: it never fails a save that committed.
5. A mirror is committed after the primary by the same steps; one the primary has but a
   mirror lacks is copied by the next commit (:func:`repair_mirror`).
6. Every fsync is tried once (:mod:`zckpt._sync`): after a failure the page cache may
   have dropped the data, and a second fsync could succeed over the loss.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Union

from ._proc import identity_alive, pid_alive, process_identity
from ._sync import fsync_fd
from .errors import CorruptCheckpointError
from .manifest import (
    MANIFEST_NAME,
    DcpManifest,
    Manifest,
    checksum_hex,
    peek_commit_record,
    read_any_manifest,
    read_manifest_body,
    with_commit_record,
    write_manifest,
)
from .s3 import is_url

__all__ = ["temp_dir_for", "is_temp_dir", "make_dirs", "fsync_created", "fsync_dir", "commit_dir", "latest",
           "committed", "next_sequence", "repair_mirror", "apply_retention", "sweep_temp_dirs", "discard"]

logger = logging.getLogger(__name__)

# <path>.tmp-<pid>-<start time>-<machine id><boot id>-<random>: the trainer that owns a
# save in progress, named so that a reused pid or a reboot never makes a crashed trainer's
# leftover look alive, and another host's save in progress is never swept from here (the
# older <path>.tmp-<pid>-<random> is still recognised, by pid alone).
_TMP_RE = re.compile(r"\.tmp-(\d+)-(?:(\d+)-([0-9a-f]{16}|[0-9a-f]{8})-)?[0-9a-f]{8}$")
# <path>.del-<random>: a checkpoint retention has condemned (renamed, then deleted).
_DEL_RE = re.compile(r"\.del-[0-9a-f]{8}$")
# <path>.dtmp-<run nonce>-<save sequence>: a multi-rank save in progress (zckpt.distributed).
# Its manifest is written before the rename, as in any commit: until then it is not a
# checkpoint, whatever it holds (a power-loss test found latest() naming one).
_DTMP_RE = re.compile(r"\.dtmp-[0-9a-f]{16}-\d+$")
PathLike = Union[str, "os.PathLike[str]"]


def temp_dir_for(final: str) -> str:
    pid, start, boot = process_identity()
    return f"{final}.tmp-{pid}-{start}-{boot}-{uuid.uuid4().hex[:8]}"


def is_temp_dir(name: str) -> bool:
    """A save in progress or a condemned checkpoint: never a checkpoint of its root."""
    return bool(_TMP_RE.search(name) or _DEL_RE.search(name) or _DTMP_RE.search(name))


def make_dirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)`` that returns the directories it created, top
    down: their entries are not durable until each one's parent is fsynced (see
    :func:`fsync_created`)."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
            created.append(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
    return created


def fsync_created(created: list[str]) -> None:
    """Make directories :func:`make_dirs` created durable: fsync each one's parent, top
    down (a directory whose entry is lost takes everything under it along)."""
    for d in created:
        fsync_dir(os.path.dirname(d) or ".")


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries become durable), once; see :mod:`zckpt._sync`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_fd(fd, path)
    finally:
        os.close(fd)


def commit_dir(tmp: str, final: str, manifest: dict[str, Any], *, fsync: bool) -> None:
    """Write the manifest into ``tmp`` and atomically make it ``final``.

    The manifest written is a copy of ``manifest`` (which is left unchanged, so one body
    can be committed under several roots) stamped with this commit's record: the next
    sequence of ``final``'s root and the time now.

    Raises:
        FileExistsError: ``final`` appeared meanwhile; ``tmp`` is left for the caller.
    """
    if is_url(final):   # an s3:// mirror: the conditional create of its manifest object
        from . import s3
        return s3.commit(final, manifest)
    final = os.path.normpath(final)
    sequence, unix_time_ns = next_sequence(os.path.dirname(os.path.abspath(final))), time.time_ns()
    body = with_commit_record(manifest, sequence, unix_time_ns)
    write_manifest(tmp, body, fsync=fsync)
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
        try:
            fsync_dir(os.path.dirname(final) or ".")
        except OSError:
            # The rename may not be durable, and may be lost or kept at the next power
            # loss: take it back, so the caller's failure and latest() agree now and after.
            os.rename(final, tmp)
            raise
    # This process just wrote that file: remember its key so retention does not re-read it.
    st = _stat_manifest(final)
    if st is not None:
        _remember(_manifest_path(final), st, (1, sequence, unix_time_ns, os.path.basename(final)))


def repair_mirror(primary_root: str, mirror_root: str, *, fsync: bool, skip: str | None = None) -> list[str]:
    """Copy into ``mirror_root`` the newest committed checkpoint of ``primary_root`` (other
    than ``skip``) that the mirror lacks, and commit it there; return what was copied.

    What completes a mirror after its commit failed or a power loss fell between the
    primary's commit and the mirror's. The copy is committed like any save (temp dir,
    fsync, manifest, rename, fsync) with the primary's manifest, so it verifies alike.
    """
    if is_url(mirror_root):
        from . import s3
        return s3.repair_mirror(primary_root, mirror_root, skip=skip)
    candidates = [p for p in committed(primary_root) if os.path.basename(p) != skip][-1:]
    copied = []
    for src in candidates:
        dst = os.path.join(mirror_root, os.path.basename(src))
        if os.path.lexists(dst):
            continue
        body = read_manifest_body(src)
        os.makedirs(mirror_root, exist_ok=True)
        tmp = temp_dir_for(dst)
        os.mkdir(tmp)
        try:
            checks = body.get("checksum") != "none"
            for f in body.get("files", []):
                name = f["name"]
                os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
                if checks:   # copy nothing that does not verify: a damaged source stays unmirrored
                    _verify_copy(os.path.join(tmp, name), f, src)
                if fsync:
                    fd = os.open(os.path.join(tmp, name), os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        fsync_fd(fd, os.path.join(tmp, name))
                    finally:
                        os.close(fd)
            commit_dir(tmp, dst, body, fsync=fsync)
        except BaseException:
            discard(tmp)
            raise
        logger.warning("mirror %s lacked %s: copied it from %s", mirror_root, os.path.basename(src), primary_root)
        copied.append(dst)
    return copied


def _verify_copy(path: str, record: dict[str, Any], src: str) -> None:
    """Check a copied shard file against its manifest record's chunk checksums."""
    with open(path, "rb") as fh:
        for (off, n), want in zip(record.get("chunks", []), record.get("checksums", []), strict=False):
            fh.seek(off)
            if checksum_hex(fh.read(n)) != want:
                raise CorruptCheckpointError(f"{os.path.join(src, record['name'])}: bytes [{off}, {off + n}) do not "
                                             "match the manifest's checksum; not copied to the mirror")


def discard(path: str) -> None:
    """Remove a temp directory of a failed save (never a committed checkpoint)."""
    if is_url(path):   # an s3:// mirror's objects (zckpt.s3.discard: never a committed one)
        from . import s3
        return s3.discard(path)
    if not is_temp_dir(os.path.basename(path)):
        raise ValueError(f"refusing to delete {path!r}: not a zckpt temp directory")
    shutil.rmtree(path, ignore_errors=True)


# Order keys: (1, sequence, unix_time_ns, name) for a recorded commit; (0, 0, created_unix
# in ns, else the manifest's mtime in ns, name) for a manifest without a record.
_Key = tuple[int, int, int, str]
# Verified keys by absolute manifest path, valid while the file's (dev, inode, size,
# mtime, ctime) are unchanged: a worker's commits and retention then read each manifest
# once, not on every commit. A manifest that failed verification is remembered as None
# (not committed) the same way. Bounded; least recently stored dropped first.
_CACHE_MAX = 4096
_cache: OrderedDict[str, tuple[tuple[int, ...], _Key | None]] = OrderedDict()
_MISS = object()
_cache_lock = threading.Lock()


def _sig(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _manifest_path(path: str) -> str:
    return os.path.abspath(os.path.join(path, MANIFEST_NAME))


def _stat_manifest(path: str) -> os.stat_result | None:
    try:
        st = os.stat(os.path.join(path, MANIFEST_NAME))
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _cached(mpath: str, st: os.stat_result) -> Any:
    """The cached key (None: known not to verify), or ``_MISS``."""
    with _cache_lock:
        hit = _cache.get(mpath)
    return hit[1] if hit is not None and hit[0] == _sig(st) else _MISS


def _remember(mpath: str, st: os.stat_result, key: _Key | None) -> None:
    with _cache_lock:
        _cache[mpath] = (_sig(st), key)
        _cache.move_to_end(mpath)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)


def _forget(mpath: str) -> None:
    with _cache_lock:
        _cache.pop(mpath, None)


def _key_of(name: str, manifest: Manifest | DcpManifest, st: os.stat_result) -> _Key:
    if manifest.commit is not None:
        return (1, manifest.commit.sequence, manifest.commit.unix_time_ns, name)
    created = manifest.created_unix
    if created is not None and math.isfinite(created) and 0 <= created < 1e11:
        return (0, 0, int(created * 1e9), name)
    return (0, 0, st.st_mtime_ns, name)


def _entries(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    # A symlink is never a checkpoint of this root (a "pretrained -> /archive/step-1"
    # link would otherwise be ranked here and decommitted by retention, in its real home).
    return [os.path.join(root, n) for n in names
            if not is_temp_dir(n) and not os.path.islink(os.path.join(root, n))]


def _verified_key(path: str) -> _Key | None:
    """The order key of the committed checkpoint at ``path``, from its manifest read in
    full and verified (or from the cache while that file is unchanged); None if ``path``
    is not a committed checkpoint."""
    st = _stat_manifest(path)
    if st is None:
        return None
    mpath = _manifest_path(path)
    key = _cached(mpath, st)
    if key is not _MISS:
        return key
    try:
        manifest = read_any_manifest(path)   # a DCP checkpoint (zckpt.dcp) is one too
    except (OSError, ValueError, CorruptCheckpointError) as exc:
        logger.debug("skipping %s: its manifest does not verify (%s)", path, exc)
        key = None
    else:
        key = _key_of(os.path.basename(path), manifest, st)
    # st predates the read: had the file changed in between, its next stat will not
    # match this signature, and it is read again.
    _remember(mpath, st, key)
    return key


def _hint(path: str) -> _Key | None:
    """A cheap, unverified order key: cached, else from the manifest's first bytes; a
    manifest without a record there (old or damaged) is read and verified in full."""
    st = _stat_manifest(path)
    if st is None:
        return None
    key = _cached(_manifest_path(path), st)
    if key is not _MISS:
        return key
    rec = peek_commit_record(path)
    if rec is not None:
        return (1, rec[0], rec[1], os.path.basename(path))
    return _verified_key(path)


def next_sequence(root: PathLike) -> int:
    """1 + the largest commit sequence among the manifests directly under ``root``.

    Reads only the first bytes of manifests not yet cached, in full only those without
    a record there (old-style or damaged ones; the result is cached). An unverified
    record can only make the result larger, which is harmless: it must exceed every
    real one.
    """
    top = 0
    for path in _entries(os.fspath(root)):
        key = _hint(path)
        if key is not None:
            top = max(top, key[1])
    return top + 1


def committed(root: PathLike) -> list[str]:
    """Committed checkpoints directly under ``root``, oldest first, by what each commit
    recorded in its manifest, never by file times.

    The order is by commit sequence, then the recorded commit time, then name. A
    manifest without a record (written by a zckpt that did not record one) sorts before
    every recorded one, so an old checkpoint never outranks a new one; among themselves
    such manifests go by their ``created_unix``, else their file's mtime, then name.
    A directory whose manifest is missing, unreadable or fails verification is not
    committed: it is left out (logged at debug level), and so is a symbolic link.
    """
    if is_url(root):
        from . import s3
        return s3.committed(root)
    keyed = []
    for path in _entries(os.fspath(root)):
        key = _verified_key(path)
        if key is not None:
            keyed.append((key, path))
    keyed.sort()
    return [p for _, p in keyed]


def latest(root: PathLike) -> str | None:
    """The newest committed checkpoint directly under ``root``, or None.

    Ordered as :func:`committed` orders them. Temp directories (``*.tmp-*``) and
    directories without a verifying manifest are ignored. Candidates are ranked from
    the first bytes of their manifests, then verified in full from the newest down
    until one passes, so only the winner's manifest (plus any damaged or old-style
    ones) is read in full. ``root`` may be an ``s3://bucket/prefix`` URL (zckpt.s3).
    """
    if is_url(root):
        from . import s3
        return s3.latest(root)
    hints = []
    for path in _entries(os.fspath(root)):
        hint = _hint(path)
        if hint is not None:
            hints.append((hint, path))
    hints.sort(reverse=True)
    for hint, path in hints:
        key = _verified_key(path)
        if key is None:
            continue
        if key == hint:
            return path
        # The verified body disagrees with the file's first bytes (not something
        # write_manifest produces): rank every checkpoint by its verified manifest.
        done = committed(root)
        return done[-1] if done else None
    return None


def apply_retention(root: str, keep_last: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` committed checkpoints under ``root``.

    Newest as :func:`committed` orders them. Only checkpoints whose manifests verify are
    candidates; never deletes the newest one, ``protect``, or anything uncommitted.
    """
    if is_url(root):
        from . import s3
        return s3.apply_retention(root, keep_last, protect)
    done = committed(root)
    keep = set(done[-max(1, keep_last):])
    if protect:
        keep.add(os.path.abspath(protect))
    removed = []
    for path in done:
        if path in keep or os.path.abspath(path) in keep:
            continue
        # Rename first, make that durable, then delete: after a power loss the checkpoint
        # is either whole under its name or a condemned .del- directory that the next
        # save's sweep removes; never a half-deleted directory under a checkpoint's name.
        condemned = f"{path}.del-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, condemned)
        except FileNotFoundError:
            continue
        finally:
            _forget(_manifest_path(path))
        fsync_dir(root)
        shutil.rmtree(condemned, ignore_errors=True)
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
        if m:
            pid = int(m.group(1))
            if m.group(2) is not None:
                alive = identity_alive(pid, int(m.group(2)), m.group(3))
            else:   # written by an older zckpt: the pid is all there is
                alive = pid == os.getpid() or pid_alive(pid)
            if pid == os.getpid() and (m.group(2) is None or int(m.group(2)) == process_identity()[1]):
                alive = True   # this process's own saves in progress
            if alive:
                continue
        elif not _DEL_RE.search(name):
            continue
        path = os.path.join(root, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.info("swept leftover temp directory %s", path)
    return removed
