"""Every message between trainer and workers: kinds, small dataclasses, encode/decode.

Wire format (ZeroMQ multipart, REQ envelope so the trainer's ROUTER sees what a REQ
peer would send)::

    worker -> trainer   [b"", header + body]       (ROUTER prepends the routing id)
    trainer -> worker   [routing id, b"", header + body]

    header  = struct "!BH32s": kind (u8), protocol VERSION (u16), proof (32 bytes)
    proof   = HMAC-SHA256(pool secret, b"zckpt-peer\0" + version (u16) + routing id)
              worker -> trainer; trainer -> worker the same over b"trainer>" + routing id
              (``trainer_identity``), so neither side's proof can be replayed as the other's
    body    = msgpack of [body type index, field, field, ...] (nested dataclasses as
              lists of their fields), validated field by field against the annotations

Kind, header and body share one frame: every frame is a send or receive that releases the
GIL, and with a busy training loop each release costs up to a switch interval to undo.

Trust: a peer's frames are checked in the fixed-format header (length, kind, proof, version)
before a byte of the body is decoded, and bodies from workers are data only (msgpack, no
ext types): nothing a peer sends can run code in the trainer. Only the trainer -> worker
direction may carry pickle (``kwargs`` fields and objects msgpack cannot encode, as a
msgpack ext): a worker unpickles only what its parent sent (``decode(trusted=True)``).

Each worker incarnation has two routing ids, ``w-<slot>-<generation>-<token>`` for
commands and ``h-<slot>-<generation>-<token>`` for heartbeats. Slot and generation keep
them readable in logs and tell a respawn from its predecessor; the token (16 random hex
digits made by the trainer and passed out of band with the secret) makes them
unguessable, so no other process can take a future worker's id first (a ROUTER refuses a
second peer with a routing id already connected).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import pickle
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

__all__ = [
    "VERSION", "Kind", "ProtocolError", "Header", "Hello", "InitRequest", "ErrorReport", "Heartbeat",
    "SegmentRef", "FileTask", "WriteFiles", "StorageSpec", "TensorSpec", "WriteState", "MapSegments", "CommitJob",
    "FileResult", "JobResult", "Empty", "encode", "decode", "split", "decode_body", "proof", "check_proof",
    "trainer_identity", "command_id", "heartbeat_id", "parse_id", "new_token", "job_name", "EMPTY",
]

#: Bumped on any change to the header or to a message's fields; checked on every message
#: from a worker, so a worker of another zckpt version fails at HELLO with a clear error.
VERSION = 5   # 5: FileTask.runs (a file gathered from several ranges: zckpt.dcp)
#              4: CommitJob.created (directories whose parents to fsync), JobResult.mirror_errors

_HEADER = struct.Struct("!BH32s")
HEADER_BYTES = _HEADER.size
_NO_PROOF = bytes(32)
_PROOF_CONTEXT = b"zckpt-peer\0"   # domain separation: the secret signs nothing else
SECRET_BYTES = 32
TOKEN_BYTES = 8                     # 64 random bits per incarnation: not guessable
_EXT_PICKLE = 1                     # msgpack ext code of a pickled object (trainer -> worker only)

class Kind(enum.IntEnum):
    HELLO = 1        # w->t  worker process is up and connected
    INIT = 2         # t->w  run init_fn and build the writer
    INIT_OK = 3      # w->t
    INIT_FAILED = 4  # w->t  ErrorReport
    JOB = 5          # t->w  a job: WriteFiles, WriteState, MapSegments or CommitJob
    DONE = 6         # w->t  JobResult
    FAILED = 7       # w->t  ErrorReport
    HEARTBEAT = 8    # both ways, heartbeat sockets only
    TERMINATE = 9    # t->w  finish and exit
    BYE = 10         # w->t  exiting cleanly
    WRITE = 5        # the old name of JOB (an alias: callers outside this module may still use it)


class ProtocolError(ValueError):
    """A frame that does not decode to a known message; logged and dropped."""


@dataclass(frozen=True)
class Empty:
    """Body of messages that carry nothing (TERMINATE, BYE, INIT_OK)."""


#: The body of messages that carry nothing (a shared instance: it is frozen).
EMPTY = Empty()


@dataclass(frozen=True)
class Hello:
    pid: int
    slot: int
    generation: int


@dataclass(frozen=True)
class InitRequest:
    sys_path: list[str]
    payload: bytes            # cloudpickle of (init_fn, init_args, writer_factory, writer_kwargs)
    writer_method: str        # what the writer must provide: "write_file" (shard files) or "write" (compat)
    heartbeat_interval_s: float
    orphan_timeout_s: float
    write_chunk_bytes: int
    checksum: str
    fsync: bool
    direct_io: bool
    log_level: int
    transient_retries: int


@dataclass(frozen=True)
class ErrorReport:
    """A worker's exception as data: the trainer rebuilds only allow-listed types from it."""

    job_id: int | None
    exc_type: str                    # "module.QualName" of the remote exception
    exc_args: list[None | bool | int | float | str]  # its args when all are plain data, else [str(exc)]
    text: str                        # the formatted remote traceback
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
    """One shard file: bytes [offset, offset+nbytes) of a segment, its file image; or,
    with ``runs``, the concatenation of those ``(segment offset, nbytes)`` ranges (a DCP
    file gathers the items its rank writes from wherever they were staged; ``offset`` is
    then 0 and ``nbytes`` their total)."""

    name: str
    segment: SegmentRef
    offset: int
    nbytes: int
    chunks: list[tuple[int, int]]   # (offset in file, nbytes) ranges to checksum
    runs: list[tuple[int, int]] | None = None


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

    segment: SegmentRef | None    # None for an empty storage
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
    keep_last: int | None
    created: list[str]          # directories the save created, top down: made durable first


@dataclass(frozen=True)
class FileResult:
    name: str
    nbytes: int
    checksums: list[str]
    write_s: float
    hash_s: float
    retries: int = 0          # writer calls repeated after a TransientWriteError


@dataclass(frozen=True)
class JobResult:
    job_id: int
    files: list[FileResult]
    mirror_errors: list[str] = dataclasses.field(default_factory=list)   # a commit: mirrors not committed


#: What each job type is called in logs and errors ("the commit job of ...").
JOB_NAMES: dict[type, str] = {WriteFiles: "write", WriteState: "state write", MapSegments: "arena mapping",
                              CommitJob: "commit"}


def job_name(message: Any) -> str:
    """The kind of a job message, as errors name it."""
    return JOB_NAMES.get(type(message), type(message).__name__)


Body = (Empty | Hello | InitRequest | ErrorReport | Heartbeat | WriteFiles | WriteState | MapSegments | CommitJob
        | JobResult)

_BODY_TYPES: dict[Kind, tuple[type, ...]] = {
    Kind.HELLO: (Hello,),
    Kind.INIT: (InitRequest,),
    Kind.INIT_OK: (Empty,),
    Kind.INIT_FAILED: (ErrorReport,),
    Kind.JOB: (WriteFiles, WriteState, MapSegments, CommitJob),
    Kind.DONE: (JobResult,),
    Kind.FAILED: (ErrorReport,),
    Kind.HEARTBEAT: (Heartbeat,),
    Kind.TERMINATE: (Empty,),
    Kind.BYE: (Empty,),
}


class Header(typing.NamedTuple):
    """The fixed-format part of a message: read without decoding anything a peer chose."""

    kind: Kind
    version: int
    proof: bytes
    body: memoryview


def proof(secret: bytes, identity: bytes, version: int = VERSION) -> bytes:
    """HMAC-SHA256 that a peer holding ``secret`` may use ``identity`` at ``version``."""
    return hmac.new(secret, _PROOF_CONTEXT + version.to_bytes(2, "big") + identity, hashlib.sha256).digest()


def trainer_identity(routing_id: bytes) -> bytes:
    """What the trainer's proof to a worker is computed over (never a worker's own id)."""
    return b"trainer>" + routing_id


def check_proof(secret: bytes, identity: bytes, header: Header) -> bool:
    """Whether ``header`` carries a valid proof for ``identity`` (constant-time compare)."""
    return hmac.compare_digest(proof(secret, identity, header.version), header.proof)


def encode(kind: Kind, body: Body = Empty(), proof: bytes = _NO_PROOF) -> list[bytes]:
    """Frames for a message, starting with the REQ envelope's empty delimiter.

    Raises TypeError if ``kind`` cannot carry ``body`` or a field is not encodable.
    """
    types = _BODY_TYPES[kind]
    if not isinstance(body, types):
        raise TypeError(f"{kind.name} cannot carry {type(body).__name__}")
    plain = [types.index(type(body))] + _fields_to_plain(body)
    packed = msgpack.packb(plain, use_bin_type=True, default=_pickle_ext)
    return [b"", _HEADER.pack(kind, VERSION, proof) + packed]


def split(frames: list[bytes]) -> Header:
    """Check frame count, delimiter, length and kind; decode nothing else.

    Raises :class:`ProtocolError` naming what is wrong.
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (delimiter, message), got {len(frames)}")
    delim, payload = frames
    if delim != b"":
        raise ProtocolError("missing empty delimiter frame")
    if len(payload) <= HEADER_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes is too short")
    kind_byte, version, mac = _HEADER.unpack_from(payload)
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_byte}") from None
    return Header(kind, version, mac, memoryview(payload)[HEADER_BYTES:])


def decode_body(header: Header, *, trusted: bool = False) -> Any:
    """Decode and validate a message body; raise :class:`ProtocolError` if it is not one.

    ``trusted=False`` (the trainer reading a worker): data only, any msgpack ext is refused.
    ``trusted=True`` (a worker reading its parent): pickled ext fields are unpickled.
    """
    kind = header.kind
    if header.version != VERSION:
        raise ProtocolError(f"{kind.name} speaks protocol version {header.version}, expected {VERSION}")
    hook = _unpickle_ext if trusted else _refuse_ext
    try:
        plain = msgpack.unpackb(header.body, raw=False, strict_map_key=True, ext_hook=hook)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input; all mean "not a body"
        raise ProtocolError(f"{kind.name} body does not decode: {exc!r}") from None
    types = _BODY_TYPES[kind]
    if not isinstance(plain, list) or not plain or type(plain[0]) is not int or not 0 <= plain[0] < len(types):
        raise ProtocolError(f"{kind.name} body is not [type index, fields...]")
    try:
        return _from_plain(types[plain[0]], plain[1:], "")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{kind.name} body is not a valid {types[plain[0]].__name__}: {exc}") from None


def decode(frames: list[bytes], *, trusted: bool = False) -> tuple[Kind, Any]:
    """:func:`split` then :func:`decode_body` (no proof check: see ``check_proof``)."""
    header = split(frames)
    return header.kind, decode_body(header, trusted=trusted)


# --- the codec: dataclasses <-> msgpack lists, checked against the annotations ---------
def _fields_to_plain(obj: Any) -> list[Any]:
    out = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "kwargs":
            # Writer kwargs are the user's own objects: pickled whole (types preserved), and
            # only ever sent to a worker (trainer -> worker is the trusted direction).
            out.append(msgpack.ExtType(_EXT_PICKLE, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
        elif hints[f.name] in _RAW_HINTS:
            # JSON-ready data (a manifest body): msgpack packs it as it is. Walking it in
            # Python cost 34 ms for a 2,000-tensor manifest, against 3 ms for msgpack.
            out.append(value)
        else:
            out.append(_to_plain(value))
    return out


_RAW_HINTS = (Any, dict[str, Any])


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields_to_plain(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _pickle_ext(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(_EXT_PICKLE, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} refused: bodies from workers are data only")


def _unpickle_ext(code: int, data: bytes) -> Any:
    if code != _EXT_PICKLE:
        raise ProtocolError(f"unknown msgpack ext type {code}")
    return pickle.loads(data)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _from_plain(cls: type, values: Any, where: str) -> Any:
    fields = dataclasses.fields(cls)
    if not isinstance(values, list) or len(values) != len(fields):
        raise ValueError(f"{where or cls.__name__}: expected {len(fields)} fields")
    hints = _hints(cls)
    return cls(*[_coerce(v, hints[f.name], f"{where}{f.name}") for f, v in zip(fields, values, strict=True)])


_PLAIN = (int, float, str, bytes, bool)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the annotation ``hint`` says, or ValueError naming the field."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None
        for option in args:
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError):
                pass
        raise ValueError(f"{where}: {type(value).__name__} is none of {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint in _PLAIN:
        if type(value) is hint:
            return value
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, f"{where}.")
    elif origin is list and isinstance(value, list):
        return [_coerce(v, args[0], f"{where}[]") for v in value]
    elif origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[]") for v in value)
        if len(args) == len(value):
            return tuple(_coerce(v, a, f"{where}[]") for v, a in zip(value, args, strict=True))
    elif origin is dict and isinstance(value, dict):
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}[]") for k, v in value.items()}
    raise ValueError(f"{where}: {type(value).__name__} is not {getattr(hint, '__name__', hint)}")


# --- routing ids ----------------------------------------------------------------------
def new_token() -> str:
    """A fresh random token for one worker incarnation's routing ids."""
    import secrets
    return secrets.token_hex(TOKEN_BYTES)


def command_id(slot: int, generation: int, token: str = "") -> bytes:
    return f"w-{slot}-{generation}{'-' + token if token else ''}".encode()


def heartbeat_id(slot: int, generation: int, token: str = "") -> bytes:
    return f"h-{slot}-{generation}{'-' + token if token else ''}".encode()


def parse_id(identity: bytes) -> tuple[str, int, int] | None:
    """``b"w-3-1-<token>"`` -> ``("w", 3, 1)`` (for logs and tests); None for anything else.

    Never used to trust a peer: the supervisor looks routing ids up exactly.
    """
    try:
        role, slot, gen, *rest = identity.decode("ascii").split("-")
        if role not in ("w", "h") or len(rest) > 1:
            return None
        return role, int(slot), int(gen)
    except (UnicodeDecodeError, ValueError):
        return None
