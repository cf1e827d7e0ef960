"""The manifest: the last file of a checkpoint, and the proof that it was committed.

``manifest.json`` holds the nested structure, every tensor's view of its storage, every
storage's byte ranges in the shard files, and an xxh3 checksum of every file chunk; the
document carries a checksum of its own canonical JSON, so an edited or damaged manifest
is detected. This module must not import torch: workers write the manifest when they
commit, and they start without torch.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any, Optional

import xxhash

from .errors import CorruptCheckpointError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST_NAME", "COMMIT_KEY", "checksum_hex",
           "write_manifest", "read_manifest", "with_commit_record", "commit_record", "peek_commit_record",
           "encode_skeleton", "decode_skeleton", "validate_body"]

FORMAT_NAME = "zckpt"
# 2: the structure is a pickle with persistent ids (zckpt.tree), tensor records carry
# typed key paths. 1: the structure was tagged JSON; still read (reader.py).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
# The body's commit record, {"sequence": N, "unix_time_ns": T}: what orders checkpoints
# (see zckpt.commit). Written as the body's first key so a short prefix read finds it.
COMMIT_KEY = "commit"
_PEEK_BYTES = 256
_PEEK_RE = re.compile(rb'\A\{"zckpt_manifest":\{"commit":\{"sequence":(0|[1-9][0-9]{0,18}),'
                      rb'"unix_time_ns":(0|[1-9][0-9]{0,19})\}[,}]')


def checksum_hex(data: Any) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(directory: str, body: dict[str, Any], *, fsync: bool) -> None:
    """Write ``manifest.json`` (body plus a checksum of it) and make it durable."""
    doc = {"zckpt_manifest": body, "xxh3_64": checksum_hex(_canonical(body))}
    data = json.dumps(doc, separators=(",", ":")).encode()
    path = os.path.join(directory, MANIFEST_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: str) -> dict[str, Any]:
    """Read and check ``manifest.json``; raise :class:`CorruptCheckpointError` if bad."""
    path = os.path.join(os.fspath(directory), MANIFEST_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory!r} has no {MANIFEST_NAME}: not a committed zckpt checkpoint") from None
    try:
        doc = json.loads(raw)
        body = doc["zckpt_manifest"]
        expected = doc["xxh3_64"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{path}: manifest is not valid JSON of the zckpt layout ({exc})") from None
    if checksum_hex(_canonical(body)) != expected:
        raise CorruptCheckpointError(f"{path}: manifest checksum mismatch (the manifest was edited or damaged)")
    if body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{path}: not a zckpt manifest (format={body.get('format')!r})")
    if body.get("version") not in READABLE_VERSIONS:
        raise CorruptCheckpointError(f"{path}: format version {body.get('version')!r} is not supported "
                                     f"(this zckpt reads versions {READABLE_VERSIONS}: "
                                     "upgrade zckpt to read newer checkpoints)")
    validate_body(body, path)
    return body


def validate_body(body: dict[str, Any], where: str) -> None:
    """Check the manifest's layout: every field the readers use, its type and its range.

    The manifest's checksum proves it is the one that was written, not that whoever
    wrote it was honest: a re-sealed manifest must not make a reader index out of
    range, read outside the checkpoint directory, or view memory a storage lacks.

    Raises:
        CorruptCheckpointError: naming the first field that is wrong.
    """
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: malformed manifest: {what}")

    def nat(v: Any) -> bool:
        return type(v) is int and v >= 0

    files, storages, tensors = body.get("files"), body.get("storages"), body.get("tensors")
    if not (isinstance(files, list) and isinstance(storages, list) and isinstance(tensors, list)):
        raise bad("files, storages and tensors must be lists")
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not nat(f.get("nbytes")):
            raise bad(f"files[{i}] needs a name and a size")
        name = f["name"]
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise bad(f"files[{i}] name {name!r} is not a plain file name")
        chunks = f.get("chunks")
        if not isinstance(chunks, list) or not chunks or any(
                not (isinstance(c, list) and len(c) == 2 and nat(c[0]) and nat(c[1]) and c[0] + c[1] <= f["nbytes"])
                for c in chunks):
            raise bad(f"files[{i}] chunks must be [offset, nbytes] pairs inside the file")
        sums = f.get("checksums")
        if sums is not None and not (isinstance(sums, list) and all(isinstance(x, str) for x in sums)):
            raise bad(f"files[{i}] checksums must be strings")
    for i, st in enumerate(storages):
        if not isinstance(st, dict) or not nat(st.get("nbytes")) or not isinstance(st.get("parts"), list) \
                or not isinstance(st.get("device", "cpu"), str):
            raise bad(f"storages[{i}] needs nbytes, a device string and parts")
        for j, part in enumerate(st["parts"]):
            if not isinstance(part, dict) or not all(nat(part.get(k)) for k in ("file", "offset", "start", "nbytes")):
                raise bad(f"storages[{i}].parts[{j}] needs file, offset, start, nbytes")
            if part["file"] >= len(files) or part["offset"] + part["nbytes"] > files[part["file"]]["nbytes"] \
                    or part["start"] + part["nbytes"] > st["nbytes"] or not isinstance(part.get("entry"), str):
                raise bad(f"storages[{i}].parts[{j}] lies outside its file or storage")
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not nat(t.get("storage")) or t["storage"] >= len(storages) \
                or not isinstance(t.get("dtype"), str) or not nat(t.get("offset")):
            raise bad(f"tensors[{i}] needs a storage in range, a dtype and an offset")
        shape, stride = t.get("shape"), t.get("stride")
        if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride)
                and all(nat(x) for x in shape) and all(nat(x) for x in stride)):
            raise bad(f"tensors[{i}] shape and stride must be lists of equal length of non-negative ints")


def with_commit_record(body: dict[str, Any], sequence: int, unix_time_ns: int) -> dict[str, Any]:
    """A copy of ``body`` (top level only; ``body`` is left as it was) whose first key is
    the commit record, so :func:`peek_commit_record` finds it in the file's first bytes."""
    rest = {k: v for k, v in body.items() if k != COMMIT_KEY}
    return {COMMIT_KEY: {"sequence": int(sequence), "unix_time_ns": int(unix_time_ns)}, **rest}


def commit_record(body: dict[str, Any]) -> Optional[tuple[int, int]]:
    """``(sequence, unix_time_ns)`` from a manifest body, or None where it has no
    well-formed record (manifests written before zckpt recorded one)."""
    rec = body.get(COMMIT_KEY)
    if not isinstance(rec, dict):
        return None
    seq, ns = rec.get("sequence"), rec.get("unix_time_ns")
    if type(seq) is not int or type(ns) is not int or seq < 0 or ns < 0:
        return None
    return seq, ns


def peek_commit_record(directory: str) -> Optional[tuple[int, int]]:
    """The commit record from the first bytes of ``manifest.json``, NOT verified.

    Good for a hint (ranking candidates, or a lower bound for the next sequence), never
    as proof of a commit: the rest of the file may be missing or damaged. None if the
    file cannot be read or does not start the way :func:`write_manifest` writes a
    recorded manifest.
    """
    try:
        with open(os.path.join(os.fspath(directory), MANIFEST_NAME), "rb") as f:
            head = f.read(_PEEK_BYTES)
    except OSError:
        return None
    m = _PEEK_RE.match(head)
    return (int(m.group(1)), int(m.group(2))) if m else None


# --- the structure ("tree") -----------------------------------------------------------------
TREE_ENCODING = "pickle-2+zckpt-persistent-ids"


def encode_skeleton(blob: bytes) -> dict[str, Any]:
    """The manifest's "tree": the pickled skeleton (see zckpt.tree), base64 in JSON."""
    return {"encoding": TREE_ENCODING, "b64": base64.b64encode(blob).decode("ascii")}


def decode_skeleton(tree: Any, where: str) -> bytes:
    """The pickled skeleton of a version-2 manifest's "tree".

    Raises:
        CorruptCheckpointError: the tree is not in the encoding this zckpt writes.
    """
    if not isinstance(tree, dict) or tree.get("encoding") != TREE_ENCODING or not isinstance(tree.get("b64"), str):
        raise CorruptCheckpointError(f"{where}: the manifest's tree is not a {TREE_ENCODING} record")
    try:
        return base64.b64decode(tree["b64"], validate=True)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: the manifest's tree is not valid base64 ({exc})") from None
