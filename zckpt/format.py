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
of every chunk (header and entries) of every file, itself covered by a checksum
(see :mod:`zckpt.manifest`).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from .errors import CorruptCheckpointError
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, checksum_hex, read_manifest

# Re-exported: the manifest lives in its own torch-free module (workers commit with it).

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "dtype_name", "dtype_from_name",
    "safetensors_code", "build_header", "shard_name", "read_manifest", "checksum_hex",
]

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
    """``torch.float32`` -> ``"float32"`` (memoised: it runs per tensor on the hot path)."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


_NAMES: dict[torch.dtype, str] = {}


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CorruptCheckpointError(f"unknown dtype {name!r} in manifest (written by a newer torch?)")
    return dt


def safetensors_code(dtype: torch.dtype) -> str | None:
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
