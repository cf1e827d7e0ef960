"""The on-disk format: dtype names, safetensors shard headers, and the manifest.

A committed checkpoint is a directory::

    step-100/
      shard-00000-of-00002.safetensors   # written by worker 0, a valid safetensors file
      shard-00001-of-00002.safetensors   # written by worker 1
      manifest.json                      # written last, by the committer

Each shard is a safetensors file (8-byte little-endian header length, JSON header,
raw bytes), so ``safetensors.safe_open`` reads it. An entry holds one stored storage
(or a byte range of one that was split across workers); entries are ordered by element
size, largest first, so every entry starts aligned to its own element size and can be
viewed in place. The manifest holds what safetensors cannot: the nested structure,
every tensor's view (storage, dtype, shape, stride, offset), aliasing, and a checksum
of every chunk (header and entries) of every file, itself covered by a checksum.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Optional

import torch
import xxhash

from .errors import CorruptCheckpointError

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "dtype_name", "dtype_from_name",
    "safetensors_code", "build_header", "shard_name", "write_manifest", "read_manifest",
    "checksum_hex",
]

FORMAT_NAME = "zckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HEADER_ALIGN = 64

# safetensors codes for the dtypes it knows; any other dtype is stored as raw bytes
# ("U8") and the manifest carries the real dtype.
_ST_CODES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "complex64": "C64", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CorruptCheckpointError(f"unknown dtype {name!r} in manifest (written by a newer torch?)")
    return dt


def safetensors_code(dtype: torch.dtype) -> Optional[str]:
    return _ST_CODES.get(dtype_name(dtype))


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def build_header(entries: list[tuple[str, str, list[int], int, int]], metadata: dict[str, str]) -> bytes:
    """The first bytes of a safetensors file: length prefix and space-padded JSON.

    Args:
        entries: (name, safetensors dtype code, shape, start, end) with offsets
            relative to the end of the header, contiguous from 0.
        metadata: the ``__metadata__`` string map.
    """
    obj: dict[str, Any] = {"__metadata__": metadata}
    for name, code, shape, start, end in entries:
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, end]}
    body = json.dumps(obj, separators=(",", ":")).encode()
    pad = (-(8 + len(body))) % _HEADER_ALIGN  # safetensors allows trailing spaces
    body += b" " * pad
    return struct.pack("<Q", len(body)) + body


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
