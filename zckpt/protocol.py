"""Every message between trainer and workers: kinds, small dataclasses, encode/decode.

Wire format (ZeroMQ multipart, REQ envelope so the trainer's ROUTER sees what a REQ
peer would send)::

    worker -> trainer   [b"", kind:1 byte + body:pickle]       (ROUTER prepends identity)
    trainer -> worker   [identity, b"", kind:1 byte + body:pickle]

Kind and body share one frame: every frame is a send or receive that releases the GIL,
and with a busy training loop each release costs up to a switch interval to undo.

Bodies are small: handles to shared memory, never tensor bytes. Each worker
incarnation has two deterministic routing ids, ``w-<slot>-<generation>`` for commands
and ``h-<slot>-<generation>`` for heartbeats, so a respawned worker is never mistaken
for its predecessor and heartbeats flow while the command socket's owner is busy.
"""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = [
    "Kind", "ProtocolError", "Hello", "InitRequest", "ErrorReport", "Heartbeat",
    "SegmentRef", "FileTask", "WriteFiles", "StorageSpec", "TensorSpec", "WriteState", "MapSegments", "CommitJob",
    "FileResult",
    "JobResult", "Empty", "encode", "decode", "command_id", "heartbeat_id", "parse_id",
]


class Kind(enum.IntEnum):
    HELLO = 1        # w->t  worker process is up and connected
    INIT = 2         # t->w  run init_fn and build the writer
    INIT_OK = 3      # w->t
    INIT_FAILED = 4  # w->t  ErrorReport
    WRITE = 5        # t->w  WriteFiles or WriteState
    DONE = 6         # w->t  JobResult
    FAILED = 7       # w->t  ErrorReport
    HEARTBEAT = 8    # both ways, heartbeat sockets only
    TERMINATE = 9    # t->w  finish and exit
    BYE = 10         # w->t  exiting cleanly


class ProtocolError(ValueError):
    """A frame that does not decode to a known message; logged and dropped."""


@dataclass(frozen=True)
class Empty:
    """Body of messages that carry nothing (TERMINATE, BYE, INIT_OK)."""


@dataclass(frozen=True)
class Hello:
    pid: int
    slot: int
    generation: int


@dataclass(frozen=True)
class InitRequest:
    sys_path: list[str]
    payload: bytes            # cloudpickle of (init_fn, init_args, writer_factory, writer_kwargs)
    mode: str                 # "files" (native shard files) or "state" (compat writers)
    heartbeat_interval_s: float
    orphan_timeout_s: float
    write_chunk_bytes: int
    checksum: str
    fsync: bool
    direct_io: bool
    log_level: int


@dataclass(frozen=True)
class ErrorReport:
    job_id: Optional[int]
    exc_blob: Optional[bytes]
    text: str
    phase: str


@dataclass(frozen=True)
class Heartbeat:
    progress: int             # bytes written so far by this incarnation: busy is not hung
    pid: int


@dataclass(frozen=True)
class SegmentRef:
    """Where a worker maps shared memory from: a path it can open and the size.

    ``key`` is unique for the life of the pool (segment id and generation), so a
    worker may cache the mapping under it; keys the trainer no longer lists in
    ``live_keys`` are unmapped.
    """

    key: str
    path: str                 # /proc/<trainer pid>/fd/<fd> of a memfd, or a /dev/shm path
    nbytes: int


@dataclass(frozen=True)
class FileTask:
    """One shard file: bytes [offset, offset+nbytes) of a segment, its file image."""

    name: str
    segment: SegmentRef
    offset: int
    nbytes: int
    chunks: list[tuple[int, int]]   # (offset in file, nbytes) ranges to checksum


@dataclass(frozen=True)
class WriteFiles:
    job_id: int
    dirs: list[str]                  # temp dirs to write into (primary first, then mirrors)
    files: list[FileTask]
    live_keys: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageSpec:
    """One storage of a compat write, mapped in the worker as a storage of exactly ``nbytes``."""

    segment: Optional[SegmentRef]    # None for an empty storage
    nbytes: int
    cacheable: bool                  # arena memory (cache the mapping) vs user shm (this job only)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a compat write: a view of ``storages[storage]``, as ``torch.save`` records it."""

    storage: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int              # in elements of ``dtype``
    requires_grad: bool
    is_param: bool
    conj: bool
    neg: bool


@dataclass(frozen=True)
class WriteState:
    """Compat job: rebuild the state dict over shared memory and call writer.write."""

    job_id: int
    path: str
    tree: bytes                      # the state dict pickled with persistent ids (see zckpt.tree)
    storages: list[StorageSpec]
    tensors: list[TensorSpec]
    kwargs: dict[str, Any]
    live_keys: list[str]


@dataclass(frozen=True)
class MapSegments:
    """Map (and populate) these segments now, so the first real save pays nothing."""

    job_id: int
    segments: list[SegmentRef]
    live_keys: list[str]


@dataclass(frozen=True)
class CommitJob:
    """Write the manifest and rename each temp dir into place (then apply retention).

    Done by a worker so that committing needs nothing from the trainer's interpreter,
    which a busy training loop keeps to itself.
    """

    job_id: int
    tmp_dirs: list[str]
    finals: list[str]
    manifest: dict[str, Any]
    fsync: bool
    keep_last: Optional[int]


@dataclass(frozen=True)
class FileResult:
    name: str
    nbytes: int
    checksums: list[str]
    write_s: float
    hash_s: float


@dataclass(frozen=True)
class JobResult:
    job_id: int
    files: list[FileResult]


Body = Union[Empty, Hello, InitRequest, ErrorReport, Heartbeat, WriteFiles, WriteState, MapSegments, CommitJob,
             JobResult]

_BODY_TYPES: dict[Kind, tuple[type, ...]] = {
    Kind.HELLO: (Hello,),
    Kind.INIT: (InitRequest,),
    Kind.INIT_OK: (Empty,),
    Kind.INIT_FAILED: (ErrorReport,),
    Kind.WRITE: (WriteFiles, WriteState, MapSegments, CommitJob),
    Kind.DONE: (JobResult,),
    Kind.FAILED: (ErrorReport,),
    Kind.HEARTBEAT: (Heartbeat,),
    Kind.TERMINATE: (Empty,),
    Kind.BYE: (Empty,),
}


def encode(kind: Kind, body: Body = Empty()) -> list[bytes]:
    """Frames for a message, starting with the REQ envelope's empty delimiter."""
    if not isinstance(body, _BODY_TYPES[kind]):
        raise TypeError(f"{kind.name} cannot carry {type(body).__name__}")
    return [b"", bytes([kind]) + pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)]


def decode(frames: list[bytes]) -> tuple[Kind, Any]:
    """Parse ``[b"", kind + body]``; raise :class:`ProtocolError` naming what is wrong."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (delimiter, message), got {len(frames)}")
    delim, payload = frames
    if delim != b"":
        raise ProtocolError("missing empty delimiter frame")
    if len(payload) < 2:
        raise ProtocolError(f"message of {len(payload)} bytes is too short")
    try:
        kind = Kind(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown message kind {payload[0]}") from None
    try:
        body = pickle.loads(memoryview(payload)[1:])
    except Exception as exc:
        raise ProtocolError(f"{kind.name} body does not unpickle: {exc!r}") from None
    if not isinstance(body, _BODY_TYPES[kind]):
        raise ProtocolError(f"{kind.name} body is a {type(body).__name__}")
    return kind, body


def command_id(slot: int, generation: int) -> bytes:
    return f"w-{slot}-{generation}".encode()


def heartbeat_id(slot: int, generation: int) -> bytes:
    return f"h-{slot}-{generation}".encode()


def parse_id(identity: bytes) -> Optional[tuple[str, int, int]]:
    """``b"w-3-1"`` -> ``("w", 3, 1)``; None for anything else."""
    try:
        role, slot, gen = identity.decode("ascii").split("-")
        if role not in ("w", "h"):
            return None
        return role, int(slot), int(gen)
    except (UnicodeDecodeError, ValueError):
        return None
