"""The manifest: the last file of a checkpoint, and the proof that it was committed.

``manifest.json`` holds the nested structure, every tensor's view of its storage, every
storage's byte ranges in the shard files, and an xxh3 checksum of every file chunk; the
document carries a checksum of its own canonical JSON, so an edited or damaged manifest
is detected. This module must not import torch: workers write the manifest when they
commit, and they start without torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import xxhash

from .errors import CorruptCheckpointError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "checksum_hex", "write_manifest", "read_manifest"]

FORMAT_NAME = "zckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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
    if body.get("version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{path}: format version {body.get('version')!r} is not supported "
                                     f"(this zckpt reads version {FORMAT_VERSION})")
    return body
