"""A FUSE file system that records what a power loss would keep, and the states it could leave.

    python tests/crashfs.py MOUNTPOINT LOGFILE      # serve until unmounted; then write the log

The file system keeps everything in memory and serves it normally. After a *mark* (any
process creating ``MOUNTPOINT/.crashfs-mark``) it treats what exists as durable and records
every later change as an operation on inodes: create, mkdir, write, truncate, rename,
unlink, rmdir, and the two barriers, ``fsync`` of a file (its data become durable) and
``fsync`` of a directory (its entries become durable). When it is unmounted it writes the
durable state at the mark and the operation log to LOGFILE (JSON).

:func:`crash_states` then replays that log offline: for every prefix of it (a power loss
after each operation) it yields the states the Linux page cache could leave behind:

- *pessimistic*: only what a barrier made durable survives (a file's data as of its last
  ``fsync``; a directory's entries as of its last ``fsync``; a new directory or file exists
  only once the entry in its parent is durable);
- *optimistic*: everything in the prefix survived;
- *reordered*: the durable state plus a random subset of the prefix's operations not yet
  made durable, applied in order (what the file system may write back on its own between
  barriers).

The model follows the ALICE study's reading of POSIX (Pillai et al., OSDI 2014): only
``fsync`` orders anything, and ``fsync`` of a file does not persist its directory entry.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MARK = ".crashfs-mark"
#: Write a JSON list to this file to inject faults: {"op": "fsync" | "fsyncdir" | "write" |
#: "create" | "rename", "match": "<substring of the path>", "errno": 5, "times": 1}; each
#: matching call fails with that errno (the target of a rename is what is matched; with
#: "exact": true the path must equal "match", e.g. "/ckpt" for that directory only).
FAULTS = ".crashfs-faults"


# --- the model (torch-free, FUSE-free: the tests use it offline) ----------------------------------
@dataclass
class Node:
    ino: int
    is_dir: bool
    data: bytearray = field(default_factory=bytearray)           # files
    entries: dict[str, int] = field(default_factory=dict)        # directories: name -> ino
    mode: int = 0o644


class Tree:
    """Inodes and directory entries; ``apply`` replays one logged operation."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {1: Node(1, True, mode=0o755)}
        self.next_ino = 2

    def copy(self) -> Tree:
        t = Tree()
        t.nodes = {i: Node(n.ino, n.is_dir, bytearray(n.data), dict(n.entries), n.mode) for i, n in self.nodes.items()}
        t.next_ino = self.next_ino
        return t

    def _node(self, ino: int, is_dir: bool) -> Node:
        """Inode ``ino``, made (unlinked, empty) if absent: an inode's contents and the entry
        that links it are separate. A file created in a directory whose own mkdir was not
        yet durable still has its data in that directory's inode; only the link is lost."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, is_dir, mode=0o755 if is_dir else 0o644)
        return node

    def apply(self, op: list[Any]) -> None:
        """Replay ``op``; an entry operation whose entry is absent (lost) is skipped."""
        kind = op[0]
        n = self.nodes
        if kind in ("create", "mkdir"):
            _, parent, name, ino = op
            self._node(ino, kind == "mkdir")
            self._node(parent, True).entries[name] = ino
        elif kind == "write":
            _, ino, off, b64 = op
            data = base64.b64decode(b64)
            buf = self._node(ino, False).data
            if len(buf) < off:
                buf.extend(b"\0" * (off - len(buf)))
            buf[off:off + len(data)] = data
        elif kind == "truncate":
            _, ino, size = op
            buf = self._node(ino, False).data
            del buf[size:]
            buf.extend(b"\0" * (size - len(buf)))
        elif kind == "rename":
            _, pa, a, pb, b, ino = op
            if pa in n and n[pa].entries.get(a) == ino:
                del n[pa].entries[a]
                self._node(pb, True).entries[b] = ino
        elif kind in ("unlink", "rmdir"):
            _, parent, name, ino = op
            if parent in n and n[parent].entries.get(name) == ino:
                del n[parent].entries[name]
        # fsync / fsyncdir change nothing in the tree: they are barriers (see crash_states)

    def materialize(self, root: str) -> None:
        """Write the tree reachable from inode 1 under ``root`` (a real directory)."""
        def walk(ino: int, path: str, seen: set[int]) -> None:
            for name, child in sorted(self.nodes[ino].entries.items()):
                if child not in self.nodes or child in seen:
                    continue
                node = self.nodes[child]
                p = os.path.join(path, name)
                if node.is_dir:
                    os.mkdir(p)
                    walk(child, p, seen | {child})
                else:
                    with open(p, "wb") as f:
                        f.write(bytes(node.data))
        walk(1, root, {1})


def crash_states(log: dict[str, Any], seed: int = 0, reorderings: int = 2) -> Iterator[tuple[str, Tree]]:
    """``(label, tree)`` for every state a power loss during the logged operations may leave."""
    ops: list[list[Any]] = log["ops"]
    durable0 = _tree_from_json(log["durable"])
    rng = random.Random(seed)
    live = durable0.copy()
    # Per inode: the last op index whose effect a barrier made durable.
    for k in range(len(ops) + 1):
        prefix = ops[:k]
        if k:
            live.apply(ops[k - 1])
        yield f"after {k} ops, optimistic", live.copy()
        durable, pending = _split(durable0, prefix)
        yield f"after {k} ops, pessimistic", durable
        for r in range(reorderings if pending else 0):
            t = durable.copy()
            for op in pending:
                if rng.random() < 0.5:
                    t.apply(op)
            yield f"after {k} ops, reordered #{r}", t


def _split(durable0: Tree, prefix: list[list[Any]]) -> tuple[Tree, list[list[Any]]]:
    """The pessimistic state after ``prefix``, and the operations a barrier did not cover.

    An operation is durable when a later barrier in the prefix covers it: data ops (write,
    truncate) by an ``fsync`` of that file; entry ops (create, mkdir, rename, unlink, rmdir)
    by an ``fsync`` of the directory they changed (both directories, for a rename).
    Durable operations are replayed in order; the rest are returned.
    """
    covered = [False] * len(prefix)
    last_fsync: dict[int, int] = {}
    last_fsyncdir: dict[int, int] = {}
    for i, op in enumerate(prefix):
        if op[0] == "fsync":
            last_fsync[op[1]] = i
        elif op[0] == "fsyncdir":
            last_fsyncdir[op[1]] = i
    for i, op in enumerate(prefix):
        kind = op[0]
        if kind in ("write", "truncate"):
            covered[i] = last_fsync.get(op[1], -1) > i
        elif kind in ("create", "mkdir", "unlink", "rmdir"):
            covered[i] = last_fsyncdir.get(op[1], -1) > i
        elif kind == "rename":
            covered[i] = last_fsyncdir.get(op[1], -1) > i and last_fsyncdir.get(op[3], -1) > i
    t = durable0.copy()
    pending = []
    for i, op in enumerate(prefix):
        if covered[i]:
            t.apply(op)
        elif op[0] not in ("fsync", "fsyncdir"):
            pending.append(op)
    return t, pending


def _tree_to_json(t: Tree) -> dict[str, Any]:
    return {"next": t.next_ino, "nodes": [[n.ino, n.is_dir, base64.b64encode(bytes(n.data)).decode(), dict(n.entries),
                                           n.mode] for n in t.nodes.values()]}


def _tree_from_json(d: dict[str, Any]) -> Tree:
    t = Tree()
    t.nodes = {ino: Node(ino, is_dir, bytearray(base64.b64decode(data)), dict(entries), mode)
               for ino, is_dir, data, entries, mode in d["nodes"]}
    t.next_ino = d["next"]
    return t


# --- the FUSE server -------------------------------------------------------------------------------
def serve(mountpoint: str, logfile: str) -> None:  # pragma: no cover - runs in its own process
    import mfusepy as fuse

    class CrashFS(fuse.Operations):
        use_ns = True

        def __init__(self) -> None:
            self.tree = Tree()
            self._mutex = threading.RLock()
            self.recording = False
            self.durable: dict[str, Any] | None = None
            self.ops: list[list[Any]] = []
            self.fds: dict[int, int] = {}
            self.paths: dict[int, str] = {}
            self.faults: list[dict[str, Any]] = []
            self.next_fh = 1
            self.t0 = time.time_ns()

        # -- helpers
        def _lookup(self, path: str) -> Node:
            node = self.tree.nodes[1]
            for part in [p for p in path.split("/") if p]:
                if not node.is_dir or part not in node.entries:
                    raise fuse.FuseOSError(errno.ENOENT)
                node = self.tree.nodes[node.entries[part]]
            return node

        def _parent(self, path: str) -> tuple[Node, str]:
            head, name = os.path.split(path.rstrip("/"))
            parent = self._lookup(head or "/")
            if not parent.is_dir:
                raise fuse.FuseOSError(errno.ENOTDIR)
            return parent, name

        def _fault(self, op: str, path: str) -> None:
            for f in self.faults:
                hit = path == f["match"] if f.get("exact") else f["match"] in path
                if f["op"] == op and hit and f.get("times", 1) > 0:
                    f["times"] = f.get("times", 1) - 1
                    raise fuse.FuseOSError(int(f["errno"]))

        def _log(self, op: list[Any]) -> None:
            if self.recording:
                self.ops.append(op)

        def _new(self, path: str, is_dir: bool, mode: int) -> Node:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise fuse.FuseOSError(errno.EEXIST)
            ino = self.tree.next_ino
            self.tree.next_ino += 1
            op = ["mkdir" if is_dir else "create", parent.ino, name, ino]
            self.tree.apply(op)
            self.tree.nodes[ino].mode = mode & 0o7777
            self._log(op)
            if not is_dir and name == MARK and parent.ino == 1:
                self.recording = True
                self.durable = _tree_to_json(self.tree)
                self.ops = []
            return self.tree.nodes[ino]

        # -- FUSE operations
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self._mutex:
                n = self._lookup(path)
                kind = stat.S_IFDIR if n.is_dir else stat.S_IFREG
                return {"st_mode": kind | n.mode, "st_nlink": 2 if n.is_dir else 1, "st_size": len(n.data),
                        "st_ino": n.ino, "st_uid": os.getuid(), "st_gid": os.getgid(),
                        "st_mtime": self.t0, "st_atime": self.t0, "st_ctime": self.t0}

        def readdir(self, path: str, fh: int) -> list[str]:
            with self._mutex:
                return [".", "..", *self._lookup(path).entries]

        def mkdir(self, path: str, mode: int) -> int:
            with self._mutex:
                self._new(path, True, mode)
                return 0

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            with self._mutex:
                self._fault("create", path)
                n = self._new(path, False, mode)
                fh = self.next_fh
                self.next_fh += 1
                self.fds[fh] = n.ino
                self.paths[fh] = path
                return fh

        def open(self, path: str, flags: int) -> int:
            with self._mutex:
                n = self._lookup(path)
                fh = self.next_fh
                self.next_fh += 1
                self.fds[fh] = n.ino
                self.paths[fh] = path
                if flags & os.O_TRUNC and n.data:
                    op = ["truncate", n.ino, 0]
                    self.tree.apply(op)
                    self._log(op)
                return fh

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self._mutex:
                return bytes(self.tree.nodes[self.fds[fh]].data[offset:offset + size])

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self._mutex:
                if path == "/" + FAULTS:
                    self.faults = json.loads(bytes(data).decode())
                    return len(data)
                self._fault("write", path)
                op = ["write", self.fds[fh], offset, base64.b64encode(bytes(data)).decode()]
                self.tree.apply(op)
                self._log(op)
                return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self._mutex:
                ino = self.fds[fh] if fh in self.fds else self._lookup(path).ino
                op = ["truncate", ino, length]
                self.tree.apply(op)
                self._log(op)
                return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            with self._mutex:
                self._fault("fsync", self.paths.get(fh, path))
                ino = self.fds.get(fh) or self._lookup(path).ino
                self._log(["fsync", ino])
                return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            with self._mutex:
                self._fault("fsyncdir", path)
                self._log(["fsyncdir", self._lookup(path).ino])
                return 0

        def rename(self, old: str, new: str) -> int:
            with self._mutex:
                self._fault("rename", new)
                pa, a = self._parent(old)
                pb, b = self._parent(new)
                if a not in pa.entries:
                    raise fuse.FuseOSError(errno.ENOENT)
                ino = pa.entries[a]
                if b in pb.entries:
                    target = self.tree.nodes[pb.entries[b]]
                    if target.is_dir and target.entries:
                        raise fuse.FuseOSError(errno.ENOTEMPTY)
                op = ["rename", pa.ino, a, pb.ino, b, ino]
                self.tree.apply(op)
                self._log(op)
                return 0

        def unlink(self, path: str) -> int:
            with self._mutex:
                parent, name = self._parent(path)
                if name not in parent.entries:
                    raise fuse.FuseOSError(errno.ENOENT)
                op = ["unlink", parent.ino, name, parent.entries[name]]
                self.tree.apply(op)
                self._log(op)
                return 0

        def rmdir(self, path: str) -> int:
            with self._mutex:
                parent, name = self._parent(path)
                node = self._lookup(path)
                if node.entries:
                    raise fuse.FuseOSError(errno.ENOTEMPTY)
                op = ["rmdir", parent.ino, name, node.ino]
                self.tree.apply(op)
                self._log(op)
                return 0

        def release(self, path: str, fh: int) -> int:
            with self._mutex:
                self.fds.pop(fh, None)
                self.paths.pop(fh, None)
                return 0

        def opendir(self, path: str) -> int:
            with self._mutex:
                self._lookup(path)
                return 0

        def releasedir(self, path: str, fh: int) -> int:
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def chmod(self, path: str, mode: int) -> int:
            with self._mutex:
                self._lookup(path).mode = mode & 0o7777
                return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            return 0

        def access(self, path: str, amode: int) -> int:
            with self._mutex:
                self._lookup(path)
                return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 22, "f_bfree": 1 << 21,
                    "f_bavail": 1 << 21, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

        def destroy(self, path: str) -> None:
            with self._mutex, open(logfile + ".part", "w") as f:
                json.dump({"durable": self.durable or _tree_to_json(self.tree), "ops": self.ops}, f)
            os.replace(logfile + ".part", logfile)

    fuse.FUSE(CrashFS(), mountpoint, foreground=True, nothreads=False, default_permissions=False)


if __name__ == "__main__":  # pragma: no cover
    serve(sys.argv[1], sys.argv[2])
