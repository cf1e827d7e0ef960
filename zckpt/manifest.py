"""The manifest: the last file of a checkpoint, and the proof that it was committed.

``manifest.json`` holds the nested structure, every tensor's view of its storage, every
storage's byte ranges in the shard files, and an xxh3 checksum of every file chunk; the
document carries a checksum of its own canonical JSON, so an edited or damaged manifest
is detected. This module must not import torch: workers write the manifest when they
commit, and they start without torch.

The schema is written down here, once: :class:`Manifest` and the records it holds
(:class:`FileRecord`, :class:`StorageRecord`, :class:`PartRecord`,
:class:`TensorRecord`, :class:`CommitRecord`). :func:`build_manifest` assembles a body
(the JSON object, a dict) from records; :func:`parse_manifest` reads a body back into
records, checking every field, its type and its range; :func:`read_manifest` reads a
committed directory's manifest. The writer, the reader, the CLI and the commit ordering
all go through these, so they cannot drift apart.

On disk (version 2), key order as written (``commit`` first; see
:func:`with_commit_record`)::

    {"zckpt_manifest": {"commit": {"sequence": N, "unix_time_ns": T},
                        "format": "zckpt", "version": 2, "checksum": "xxh3_64" | "none",
                        "tree": {"encoding": ..., "b64": ...}, "metadata": ..., "torch_version": "...",
                        "files": [FileRecord], "storages": [StorageRecord], "tensors": [TensorRecord],
                        "created_unix": 1.7e9},
     "xxh3_64": "<checksum of the body's canonical JSON>"}

Room to grow without a version break: optional fields (a tensor's global box, a file's
or a storage's rank) default to None and are left out of the JSON when None, so a
single-rank manifest is byte for byte what an older zckpt wrote, and readers ignore keys
they do not know.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import xxhash

from ._sync import write_new_file
from .errors import CorruptCheckpointError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MULTI_RANK_VERSION", "READABLE_VERSIONS", "MANIFEST_NAME", "COMMIT_KEY",
           "CHECKSUM_ALGORITHMS", "TREE_ENCODING", "Manifest", "FileRecord", "StorageRecord", "PartRecord",
           "TensorRecord", "CommitRecord", "build_manifest", "parse_manifest", "frozen_path", "path_json",
           "checksum_hex",
           "write_manifest", "json_metadata", "read_manifest", "read_manifest_body", "with_commit_record",
           "commit_record", "peek_commit_record", "encode_skeleton", "decode_skeleton", "validate_body",
           "DCP_FORMAT_NAME", "DCP_VERSION", "DcpFileRecord", "DcpItemRecord", "DcpTensorEntry", "DcpManifest",
           "build_dcp_manifest", "parse_dcp_manifest", "read_any_manifest", "seal", "unseal"]

FORMAT_NAME = "zckpt"
# 3: a multi-rank checkpoint (zckpt.distributed): files live in rank-<r>/ sub-directories
# and a tensor may be several records, one per box (global_offset/global_shape) of it.
# Written only by multi-rank saves, so that an older zckpt refuses them instead of
# loading one rank's shard as the whole tensor; a single-rank save still writes 2.
# 2: the structure is a pickle with persistent ids (zckpt.tree), tensor records carry
# typed key paths. 1: the structure was tagged JSON, tensor records a joined "key"; still
# read (reader.py).
FORMAT_VERSION = 2
MULTI_RANK_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_RANK_FILE_RE = re.compile(r"rank-(0|[1-9][0-9]{0,8})/([^/\\\0]+)")
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHMS = ("xxh3_64", "none")
# The body's commit record, {"sequence": N, "unix_time_ns": T}: what orders checkpoints
# (see zckpt.commit). Written as the body's first key so a short prefix read finds it.
COMMIT_KEY = "commit"
_PEEK_BYTES = 256
_PEEK_RE = re.compile(rb'\A\{"zckpt_manifest":\{"commit":\{"sequence":(0|[1-9][0-9]{0,18}),'
                      rb'"unix_time_ns":(0|[1-9][0-9]{0,19})\}[,}]')
TREE_ENCODING = "pickle-2+zckpt-persistent-ids"


# --- the records ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CommitRecord:
    """What orders checkpoints under a root (see zckpt.commit)."""

    sequence: int
    unix_time_ns: int

    def to_json(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "unix_time_ns": self.unix_time_ns}


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One shard file: its size, which worker wrote it, and the checksum of each chunk.

    ``chunks`` are ``(offset, nbytes)`` ranges of the file (the safetensors header first,
    then every entry); ``checksums[i]`` is the hex digest of ``chunks[i]`` (empty with
    checksum "none"). ``write_s``/``hash_s`` are the worker's timings, informational.
    """

    name: str
    nbytes: int
    worker: int
    chunks: tuple[tuple[int, int], ...]
    checksums: tuple[str, ...] | None = None
    write_s: float | None = None
    hash_s: float | None = None
    rank: int | None = None               # multi-rank: the rank that wrote the file

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "nbytes": self.nbytes, "worker": self.worker,
                               "chunks": [[off, n] for off, n in self.chunks]}
        if self.checksums is not None:
            out["checksums"] = list(self.checksums)
        if self.write_s is not None:
            out["write_s"] = self.write_s
        if self.hash_s is not None:
            out["hash_s"] = self.hash_s
        if self.rank is not None:
            out["rank"] = self.rank
        return out


@dataclass(frozen=True, slots=True)
class PartRecord:
    """A byte range of a storage: ``nbytes`` bytes at ``start`` in the storage lie at
    ``offset`` in ``files[file]``, as the safetensors entry named ``entry``."""

    file: int
    offset: int
    start: int
    nbytes: int
    entry: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "start": self.start, "nbytes": self.nbytes,
                "entry": self.entry}


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """One storage, stored once, whole, in one or more parts; ``device`` is where it was
    saved from ("cpu", "cuda:0"), as ``torch.load``'s ``map_location`` sees it."""

    nbytes: int
    device: str
    parts: tuple[PartRecord, ...]
    rank: int | None = None               # multi-rank: the rank that holds this storage

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nbytes": self.nbytes, "device": self.device,
                               "parts": [p.to_json() for p in self.parts]}
        if self.rank is not None:
            out["rank"] = self.rank
        return out


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor: a view (dtype, shape, stride, offset in elements) of ``storages[storage]``.

    ``path`` is the typed key path as encoded by :func:`zckpt.tree.encode_path` (None for a
    tensor held inside an object); ``name`` its display form. Version-1 records had only a
    joined "key": it is read as ``name``, with ``path`` None. ``global_offset`` and
    ``global_shape`` (multi-rank) place a shard of a larger tensor in it; both or neither.
    """

    path: tuple[Any, ...] | None
    name: str
    storage: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    param: bool = False
    requires_grad: bool = False
    conj: bool = False
    neg: bool = False
    global_offset: tuple[int, ...] | None = None
    global_shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": _to_json(self.path) if self.path is not None else None, "name": self.name,
            "storage": self.storage, "dtype": self.dtype, "shape": list(self.shape), "stride": list(self.stride),
            "offset": self.offset, "param": self.param, "requires_grad": self.requires_grad,
        }
        if self.conj:
            out["conj"] = True
        if self.neg:
            out["neg"] = True
        if self.global_offset is not None:
            out["global_offset"] = list(self.global_offset)
        if self.global_shape is not None:
            out["global_shape"] = list(self.global_shape)
        return out

    def to_json_v1(self) -> dict[str, Any]:
        out = self.to_json()
        del out["path"], out["name"]
        return {"key": self.name, **out}


@dataclass(frozen=True, slots=True)
class Manifest:
    """A whole manifest body, parsed and checked (see :func:`parse_manifest`)."""

    version: int
    checksum: str                            # the chunk checksum algorithm: "xxh3_64" or "none"
    tree: Any                                # the structure: encode_skeleton's record (v1: tagged JSON)
    metadata: Any
    torch_version: str | None
    files: tuple[FileRecord, ...]
    storages: tuple[StorageRecord, ...]
    tensors: tuple[TensorRecord, ...]
    created_unix: float | None = None
    commit: CommitRecord | None = None
    format: str = FORMAT_NAME

    @property
    def checks(self) -> bool:
        """Whether the files carry chunk checksums to verify."""
        return self.checksum != "none"

    @property
    def nbytes(self) -> int:
        """Bytes of all stored storages."""
        return sum(st.nbytes for st in self.storages)

    def to_json(self) -> dict[str, Any]:
        """The body as written to disk (the commit record first, when there is one)."""
        body = build_manifest(checksum=self.checksum, tree=self.tree, metadata=self.metadata,
                              torch_version=self.torch_version, files=self.files, storages=self.storages,
                              tensors=self.tensors, created_unix=self.created_unix, version=self.version)
        if self.commit is not None:
            body = with_commit_record(body, self.commit.sequence, self.commit.unix_time_ns)
        return body


def _to_json(v: Any) -> Any:
    """Tuples back to JSON lists (an encoded key path nests lists)."""
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    return v


def path_json(path: Any) -> str:
    """A record's key path as canonical JSON: hashable, and equal exactly when the paths are
    (the same string :func:`zckpt.tree.path_key` gives for the encoded path)."""
    return json.dumps(_to_json(path), sort_keys=True, separators=(",", ":"))


def frozen_path(v: Any) -> Any:
    """An encoded key path (JSON lists) as tuples, as :class:`TensorRecord` holds it."""
    if type(v) is str:
        return v
    if isinstance(v, list):
        return tuple(frozen_path(x) for x in v)
    if isinstance(v, dict):
        return {k: frozen_path(x) for k, x in v.items()}
    return v


# --- writing ------------------------------------------------------------------------------------
def json_metadata(metadata: Any) -> Any:
    """``metadata`` checked to be a mapping of JSON data that reads back equal, or None.

    Stricter than ``json.dumps``: keys must be ``str`` (JSON would turn ``1`` into
    ``"1"``), tuples are refused (they would come back as lists), and so are NaN and
    infinities (not JSON: strict parsers reject the file).

    Raises:
        TypeError: naming what is not JSON data.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        from collections.abc import Mapping
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping (dict) of JSON data, got {type(metadata).__name__}")
    plain = dict(metadata)
    _check_json(plain, "metadata")
    return json.loads(json.dumps(plain, allow_nan=False))


def _check_json(v: Any, where: str) -> None:
    t = type(v)
    if v is None or t in (bool, int, str):
        return
    if t is float:
        if not math.isfinite(v):
            raise TypeError(f"{where} is {v!r}: NaN and infinities are not JSON")
        return
    if t is list:
        for i, x in enumerate(v):
            _check_json(x, f"{where}[{i}]")
        return
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise TypeError(f"{where} has the key {k!r} ({type(k).__name__}): JSON keys are strings")
            _check_json(x, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {t.__name__}, which JSON cannot hold as it is (use dict, list, str, int, "
                    "float, bool or None)")


def build_manifest(*, checksum: str, tree: Any, metadata: Any, torch_version: str | None,
                   files: list[FileRecord] | tuple[FileRecord, ...],
                   storages: list[StorageRecord] | tuple[StorageRecord, ...],
                   tensors: list[TensorRecord] | tuple[TensorRecord, ...],
                   created_unix: float | None, version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The manifest body (a JSON-ready dict, without its commit record) from its records.

    Pure: nothing is read or written. Keys come in the order zckpt has always written
    them; :func:`zckpt.commit.commit_dir` adds the commit record in front, and
    :func:`write_manifest` seals it. ``tree`` is :func:`encode_skeleton`'s record.
    """
    body: dict[str, Any] = {
        "format": FORMAT_NAME, "version": version, "checksum": checksum, "tree": tree, "metadata": metadata,
    }
    if torch_version is not None:
        body["torch_version"] = torch_version
    body["files"] = [f.to_json() for f in files]
    body["storages"] = [s.to_json() for s in storages]
    body["tensors"] = [t.to_json_v1() if version == 1 else t.to_json() for t in tensors]
    if created_unix is not None:
        body["created_unix"] = created_unix
    return body


def checksum_hex(data: Any) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(body: dict[str, Any]) -> bytes:
    """The bytes of a manifest document: ``body`` plus a checksum of its canonical JSON
    (what ``manifest.json`` holds, on disk or as an object)."""
    return json.dumps({"zckpt_manifest": body, "xxh3_64": checksum_hex(_canonical(body))},
                      separators=(",", ":")).encode()


def unseal(raw: bytes, where: str) -> dict[str, Any]:
    """The body of a manifest document, its own checksum checked (:func:`seal` reversed).

    Raises:
        CorruptCheckpointError: not a manifest document, or an edited or damaged one.
    """
    try:
        doc = json.loads(raw)
        body = doc["zckpt_manifest"]
        expected = doc["xxh3_64"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{where}: manifest is not valid JSON of the zckpt layout ({exc})") from None
    if not isinstance(body, dict) or checksum_hex(_canonical(body)) != expected:
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch (the manifest was edited or damaged)")
    return body


def write_manifest(directory: str, body: dict[str, Any], *, fsync: bool) -> None:
    """Write ``manifest.json`` (body plus a checksum of it) and make it durable."""
    write_new_file(os.path.join(directory, MANIFEST_NAME), seal(body), fsync=fsync)


# --- reading ------------------------------------------------------------------------------------
def _read_sealed(directory: str) -> tuple[dict[str, Any], str]:
    """The body of ``directory``'s manifest, its own checksum checked, and the file's path."""
    path = os.path.join(os.fspath(directory), MANIFEST_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory!r} has no {MANIFEST_NAME}: "
                                     "not a committed zckpt checkpoint") from None
    return unseal(raw, path), path


def read_manifest(directory: str) -> Manifest:
    """Read, check and parse ``directory``'s ``manifest.json``.

    Raises:
        FileNotFoundError: ``directory`` is not a directory.
        CorruptCheckpointError: no manifest, a damaged or edited one, an unknown format
            or version, or a malformed field (named).
    """
    body, path = _read_sealed(directory)
    return parse_manifest(body, path)


def read_manifest_body(directory: str) -> dict[str, Any]:
    """As :func:`read_manifest`, but the body as the JSON dict it is on disk (checked just
    as well): for tools that rewrite a manifest and must keep every key."""
    body, path = _read_sealed(directory)
    parse_manifest(body, path)
    return body


def validate_body(body: dict[str, Any], where: str) -> None:
    """Check a manifest body (see :func:`parse_manifest`), keeping the dict."""
    parse_manifest(body, where)


class _Checker:
    """Field readers that raise :class:`CorruptCheckpointError` naming the field.

    A field is named by ``at`` (the record: "files[0]") and ``key`` ("nbytes"), joined
    only when the check fails: a manifest of 20,000 tensors is checked on every load.
    """

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def bad(self, field: str, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: malformed manifest: {field} {what}")

    def obj(self, v: Any, at: str) -> dict[str, Any]:
        if type(v) is not dict:
            raise self.bad(at, "must be an object")
        return v

    def array(self, v: Any, at: str, key: str = "") -> list[Any]:
        if type(v) is not list:
            raise self.bad(_field(at, key), "must be a list")
        return v

    def nat(self, v: Any, at: str, key: str = "") -> int:
        if type(v) is not int or v < 0:
            raise self.bad(_field(at, key), f"must be a non-negative int, not {v!r}")
        return v

    def opt_nat(self, v: Any, at: str, key: str) -> int | None:
        return None if v is None else self.nat(v, at, key)

    def text(self, v: Any, at: str, key: str = "") -> str:
        if type(v) is not str:
            raise self.bad(_field(at, key), f"must be a string, not {type(v).__name__}")
        return v

    def flag(self, v: Any, at: str, key: str) -> bool:
        if type(v) is not bool:
            raise self.bad(_field(at, key), f"must be true or false, not {v!r}")
        return v

    def seconds(self, v: Any, at: str, key: str) -> float | None:
        if v is None:
            return None
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise self.bad(_field(at, key), f"must be a non-negative number, not {v!r}")
        return v

    def nats(self, v: Any, at: str, key: str) -> tuple[int, ...]:
        out = tuple(self.array(v, at, key))
        for x in out:
            if type(x) is not int or x < 0:
                i, x = next((i, x) for i, x in enumerate(out) if type(x) is not int or x < 0)
                raise self.bad(f"{_field(at, key)}[{i}]", f"must be a non-negative int, not {x!r}")
        return out


def _field(at: str, key: str) -> str:
    return f"{at}.{key}" if key else at


def parse_manifest(body: Any, where: str) -> Manifest:
    """Check a manifest body and return it as records.

    Every field the readers use is checked: its type and its range. The manifest's
    checksum proves it is the one that was written, not that whoever wrote it was
    honest: a re-sealed manifest must not make a reader index out of range, read outside
    the checkpoint directory, or view memory a storage lacks (the view's bytes need the
    dtype's size, which only torch knows: zckpt.reader checks those). Keys this zckpt
    does not know are ignored (a newer writer may add optional ones within a version).

    Raises:
        CorruptCheckpointError: naming the first field that is wrong, or a format version
            this zckpt cannot read (a newer one: upgrade zckpt).
    """
    c = _Checker(where)
    if not isinstance(body, dict):
        raise c.bad("the body", "must be an object")
    if body.get("format") == DCP_FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: a checkpoint written through torch.distributed.checkpoint "
                                     "(zckpt.dcp), not a corrupt one: load it with dcp.load(state_dict, "
                                     "storage_reader=zckpt.dcp.ZckptReader(path)); zckpt.verify and "
                                     "zckpt inspect read it too")
    if body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: not a zckpt manifest (format={body.get('format')!r})")
    version = body.get("version")
    if type(version) is int and version > max(READABLE_VERSIONS):
        raise CorruptCheckpointError(f"{where}: format version {version} was written by a newer zckpt "
                                     f"(this zckpt reads versions {READABLE_VERSIONS}): "
                                     "upgrade zckpt to read newer checkpoints")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CorruptCheckpointError(f"{where}: format version {version!r} is not supported "
                                     f"(this zckpt reads versions {READABLE_VERSIONS})")
    checksum = body.get("checksum", "xxh3_64")
    if checksum not in CHECKSUM_ALGORITHMS:
        raise c.bad("checksum", f"algorithm {checksum!r} is not one of {CHECKSUM_ALGORITHMS} "
                                "(upgrade zckpt to read newer checkpoints)")
    tree = body.get("tree")
    if version >= 2 and not (isinstance(tree, dict) and tree.get("encoding") == TREE_ENCODING
                             and isinstance(tree.get("b64"), str)):
        raise c.bad("tree", f"must be a {TREE_ENCODING} record")
    torch_version = body.get("torch_version")
    if torch_version is not None:
        c.text(torch_version, "torch_version")
    created = body.get("created_unix")
    if created is not None and type(created) not in (int, float):
        raise c.bad("created_unix", f"must be a number, not {created!r}")

    raw_files, raw_storages, raw_tensors = body.get("files"), body.get("storages"), body.get("tensors")
    if not (isinstance(raw_files, list) and isinstance(raw_storages, list) and isinstance(raw_tensors, list)):
        raise c.bad("files, storages and tensors", "must be lists")
    files = tuple(_parse_file(c, f, i, version) for i, f in enumerate(raw_files))
    storages = tuple(_parse_storage(c, s, i, files) for i, s in enumerate(raw_storages))
    tensors = tuple(_parse_tensor(c, t, i, len(storages), version) for i, t in enumerate(raw_tensors))
    return Manifest(version=version, checksum=checksum, tree=tree, metadata=body.get("metadata"),
                    torch_version=torch_version, files=files, storages=storages, tensors=tensors,
                    created_unix=created, commit=_commit(body))


def _parse_file(c: _Checker, raw: Any, i: int, version: int) -> FileRecord:
    at = f"files[{i}]"
    f = c.obj(raw, at)
    name = c.text(f.get("name"), at, "name")
    rank = c.opt_nat(f.get("rank"), at, "rank")
    plain = name
    if version >= MULTI_RANK_VERSION and (m := _RANK_FILE_RE.fullmatch(name)) is not None:
        if rank != int(m.group(1)):
            raise c.bad(f"{at}.name", f"{name!r} lies in the directory of another rank than its rank {rank}")
        plain = m.group(2)
    if not plain or plain in (".", "..") or "/" in plain or "\\" in plain or "\0" in plain:
        raise c.bad(f"{at}.name", f"{name!r} is not a plain file name"
                    + (" or rank-<r>/<plain file name>" if version >= MULTI_RANK_VERSION else ""))
    nbytes = c.nat(f.get("nbytes"), at, "nbytes")
    worker = c.nat(f.get("worker"), at, "worker")
    chunks = []
    raw_chunks = c.array(f.get("chunks"), at, "chunks")
    if not raw_chunks:
        raise c.bad(f"{at}.chunks", "must not be empty (the header is the first chunk)")
    for j, ch in enumerate(raw_chunks):
        if type(ch) is not list or len(ch) != 2:
            raise c.bad(f"{at}.chunks[{j}]", "must be an [offset, nbytes] pair")
        off, n = ch
        if type(off) is not int or off < 0:
            raise c.bad(f"{at}.chunks[{j}] offset", f"must be a non-negative int, not {off!r}")
        if type(n) is not int or n < 0:
            raise c.bad(f"{at}.chunks[{j}] nbytes", f"must be a non-negative int, not {n!r}")
        if off + n > nbytes:
            raise c.bad(f"{at}.chunks[{j}]", f"[{off}, {off + n}) lies outside the file's {nbytes} bytes")
        chunks.append((off, n))
    sums = f.get("checksums")
    if sums is not None:
        c.array(sums, at, "checksums")
        for j, digest in enumerate(sums):
            if type(digest) is not str:
                raise c.bad(f"{at}.checksums[{j}]", f"must be a string, not {type(digest).__name__}")
    return FileRecord(name=name, nbytes=nbytes, worker=worker, chunks=tuple(chunks),
                      checksums=tuple(sums) if sums is not None else None,
                      write_s=c.seconds(f.get("write_s"), at, "write_s"),
                      hash_s=c.seconds(f.get("hash_s"), at, "hash_s"), rank=rank)


def _parse_storage(c: _Checker, raw: Any, i: int, files: tuple[FileRecord, ...]) -> StorageRecord:
    at = f"storages[{i}]"
    st = c.obj(raw, at)
    nbytes = c.nat(st.get("nbytes"), at, "nbytes")
    device = c.text(st.get("device", "cpu"), at, "device")
    parts = []
    for j, p in enumerate(c.array(st.get("parts"), at, "parts")):
        if type(p) is not dict:
            raise c.bad(f"{at}.parts[{j}]", "must be an object")
        fields: tuple[Any, ...] = (p.get("file"), p.get("offset"), p.get("start"), p.get("nbytes"), p.get("entry"))
        fi, off, start, n, entry = fields
        if not (type(fi) is int and type(off) is int and type(start) is int and type(n) is int
                and fi >= 0 and off >= 0 and start >= 0 and n >= 0):
            for key, v in (("file", fi), ("offset", off), ("start", start), ("nbytes", n)):
                c.nat(v, f"{at}.parts[{j}]", key)
        if type(entry) is not str:
            raise c.bad(f"{at}.parts[{j}].entry", f"must be a string, not {type(entry).__name__}")
        if fi >= len(files):
            raise c.bad(f"{at}.parts[{j}].file", f"{fi} is out of range ({len(files)} files)")
        if off + n > files[fi].nbytes:
            raise c.bad(f"{at}.parts[{j}].offset",
                        f"[{off}, {off + n}) lies outside its file's {files[fi].nbytes} bytes")
        if start + n > nbytes:
            raise c.bad(f"{at}.parts[{j}].start", f"[{start}, {start + n}) lies outside its storage's {nbytes} bytes")
        parts.append(PartRecord(file=fi, offset=off, start=start, nbytes=n, entry=entry))
    return StorageRecord(nbytes=nbytes, device=device, parts=tuple(parts), rank=c.opt_nat(st.get("rank"), at, "rank"))


def _parse_tensor(c: _Checker, raw: Any, i: int, nstorages: int, version: int) -> TensorRecord:
    at = f"tensors[{i}]"
    t = c.obj(raw, at)
    if version == 1:
        path, name = None, c.text(t.get("key"), at, "key")
    else:
        raw_path = t.get("path")
        path = frozen_path(c.array(raw_path, at, "path")) if raw_path is not None else None
        name = c.text(t.get("name"), at, "name")
    storage = c.nat(t.get("storage"), at, "storage")
    if storage >= nstorages:
        raise c.bad(f"{at}.storage", f"{storage} is out of range ({nstorages} storages)")
    shape, stride = c.nats(t.get("shape"), at, "shape"), c.nats(t.get("stride"), at, "stride")
    if len(shape) != len(stride):
        raise c.bad(f"{at}.stride", f"has {len(stride)} dims, its shape {len(shape)}")
    box_offset, box_shape = t.get("global_offset"), t.get("global_shape")
    if box_offset is not None or box_shape is not None:
        if box_offset is None or box_shape is None:
            raise c.bad(f"{at}.global_offset", "and global_shape come together")
        box_offset, box_shape = c.nats(box_offset, at, "global_offset"), c.nats(box_shape, at, "global_shape")
        if not len(box_offset) == len(box_shape) == len(shape) \
                or any(o + n > g for o, n, g in zip(box_offset, shape, box_shape, strict=False)):
            raise c.bad(f"{at}.global_offset", f"{list(box_offset)} + shape {list(shape)} does not lie inside "
                                               f"global_shape {list(box_shape)}")
    param, requires_grad, conj, neg = (t.get("param", False), t.get("requires_grad", False), t.get("conj", False),
                                       t.get("neg", False))
    if not (type(param) is bool and type(requires_grad) is bool and type(conj) is bool and type(neg) is bool):
        for key, v in (("param", param), ("requires_grad", requires_grad), ("conj", conj), ("neg", neg)):
            c.flag(v, at, key)
    return TensorRecord(path=path, name=name, storage=storage, dtype=c.text(t.get("dtype"), at, "dtype"),
                        shape=shape, stride=stride, offset=c.nat(t.get("offset"), at, "offset"), param=param,
                        requires_grad=requires_grad, conj=conj, neg=neg, global_offset=box_offset,
                        global_shape=box_shape)


# --- the commit record --------------------------------------------------------------------------
def with_commit_record(body: dict[str, Any], sequence: int, unix_time_ns: int) -> dict[str, Any]:
    """A copy of ``body`` (top level only; ``body`` is left as it was) whose first key is
    the commit record, so :func:`peek_commit_record` finds it in the file's first bytes."""
    rest = {k: v for k, v in body.items() if k != COMMIT_KEY}
    return {COMMIT_KEY: {"sequence": int(sequence), "unix_time_ns": int(unix_time_ns)}, **rest}


def _commit(body: dict[str, Any]) -> CommitRecord | None:
    rec = body.get(COMMIT_KEY)
    if not isinstance(rec, dict):
        return None
    seq, ns = rec.get("sequence"), rec.get("unix_time_ns")
    if type(seq) is not int or type(ns) is not int or seq < 0 or ns < 0:
        return None
    return CommitRecord(seq, ns)


def commit_record(body: dict[str, Any]) -> tuple[int, int] | None:
    """``(sequence, unix_time_ns)`` from a manifest body, or None where it has no
    well-formed record (manifests written before zckpt recorded one)."""
    rec = _commit(body)
    return (rec.sequence, rec.unix_time_ns) if rec is not None else None


def peek_commit_record(directory: str) -> tuple[int, int] | None:
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


# --- checkpoints written through DCP (zckpt.dcp) ----------------------------------------------
# A DCP save names its items by DCP's own keys (fully qualified name and chunk offset) and
# its metadata (every tensor's global size and saved chunks) is DCP's: the manifest of such
# a checkpoint records those, and where each item lies, instead of a structure and
# storages. Version 1:
#
#   {"commit": {...}, "format": "zckpt-dcp", "version": 1, "checksum": "xxh3_64" | "none",
#    "torch_version": "...", "created_unix": 1.7e9,
#    "files": [{"name": "__0_0.distcp", "nbytes": N, "rank": 0}],
#    "items": [{"fqn": "model.w", "offset": [0, 0] | null, "file": 0, "at": 0, "nbytes": n,
#               "digest": "<xxh3_64 hex>" | null}],
#    "entries": {"model.w": {"dtype": "float32", "size": [8, 4], "requires_grad": false,
#                            "chunks": [[[0, 0], [4, 4]], [[4, 0], [4, 4]]]},
#                "step": null},          <- a non-tensor value (DCP's BytesStorageMetadata)
#    "planner_data": {"model.w": ["model", "w"], ...} | null}
DCP_FORMAT_NAME = "zckpt-dcp"
DCP_VERSION = 1


@dataclass(frozen=True, slots=True)
class DcpFileRecord:
    """A data file of a DCP checkpoint, written by one rank."""

    name: str
    nbytes: int
    rank: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "nbytes": self.nbytes, "rank": self.rank}


@dataclass(frozen=True, slots=True)
class DcpItemRecord:
    """One DCP item (DCP's ``MetadataIndex``: ``fqn`` and, for a tensor chunk, its
    ``offset``), stored as ``nbytes`` bytes at byte ``at`` of file ``file``: a tensor chunk
    as its contiguous row-major bytes, a non-tensor value as DCP's ``torch.save`` bytes."""

    fqn: str
    offset: tuple[int, ...] | None
    file: int
    at: int
    nbytes: int
    digest: str | None

    def to_json(self) -> dict[str, Any]:
        return {"fqn": self.fqn, "offset": list(self.offset) if self.offset is not None else None,
                "file": self.file, "at": self.at, "nbytes": self.nbytes, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class DcpTensorEntry:
    """DCP's ``TensorStorageMetadata`` of one tensor: its global size and saved chunks."""

    dtype: str
    size: tuple[int, ...]
    requires_grad: bool
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]   # (offsets, sizes)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "size": list(self.size), "requires_grad": self.requires_grad,
                "chunks": [[list(o), list(s)] for o, s in self.chunks]}


@dataclass(frozen=True, slots=True)
class DcpManifest:
    """The manifest of a checkpoint written through :class:`zckpt.dcp.ZckptWriter`."""

    version: int
    checksum: str
    torch_version: str | None
    files: tuple[DcpFileRecord, ...]
    items: tuple[DcpItemRecord, ...]
    entries: dict[str, DcpTensorEntry | None]    # None: a non-tensor value
    planner_data: Any
    created_unix: float | None = None
    commit: CommitRecord | None = None
    format: str = DCP_FORMAT_NAME

    @property
    def checks(self) -> bool:
        return self.checksum != "none"

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def build_dcp_manifest(*, checksum: str, torch_version: str, files: list[DcpFileRecord],
                       items: list[DcpItemRecord], entries: dict[str, DcpTensorEntry | None], planner_data: Any,
                       created_unix: float) -> dict[str, Any]:
    """The body of a DCP checkpoint's manifest. ``planner_data`` must be JSON data
    (DCP's default planner's: ``{fqn: key path}``, key paths of str and int).

    Raises:
        TypeError: ``planner_data`` is not JSON data (naming where).
    """
    plain = _to_json(planner_data)   # key paths are tuples: stored as lists
    _check_json(plain, "planner_data")
    return {"format": DCP_FORMAT_NAME, "version": DCP_VERSION, "checksum": checksum, "torch_version": torch_version,
            "created_unix": created_unix, "files": [f.to_json() for f in files],
            "items": [i.to_json() for i in items],
            "entries": {k: (e.to_json() if e is not None else None) for k, e in entries.items()},
            "planner_data": plain}


def _plain_name(c: _Checker, name: str, at: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise c.bad(at, f"{name!r} is not a plain file name")
    return name


def parse_dcp_manifest(body: dict[str, Any], where: str) -> DcpManifest:
    """Check a DCP checkpoint's manifest body (see :func:`parse_manifest`: every field's
    type and range, so that a re-sealed manifest cannot make a reader read outside its
    files) and return it as records.

    Raises:
        CorruptCheckpointError: naming the first field that is wrong, or a newer version.
    """
    c = _Checker(where)
    version = body.get("version")
    if type(version) is not int or version != DCP_VERSION:
        raise CorruptCheckpointError(f"{where}: DCP format version {version!r} is not supported (this zckpt "
                                     f"reads version {DCP_VERSION}; a newer one needs a newer zckpt)")
    checksum = body.get("checksum")
    if checksum not in CHECKSUM_ALGORITHMS:
        raise c.bad("checksum", f"algorithm {checksum!r} is not one of {CHECKSUM_ALGORITHMS}")
    files = []
    for i, raw in enumerate(c.array(body.get("files"), "files")):
        at = f"files[{i}]"
        f = c.obj(raw, at)
        files.append(DcpFileRecord(_plain_name(c, c.text(f.get("name"), at, "name"), f"{at}.name"),
                                   c.nat(f.get("nbytes"), at, "nbytes"), c.nat(f.get("rank"), at, "rank")))
    entries: dict[str, DcpTensorEntry | None] = {}
    for fqn, raw in c.obj(body.get("entries"), "entries").items():
        at = f"entries[{fqn!r}]"
        if raw is None:
            entries[fqn] = None
            continue
        e = c.obj(raw, at)
        size = c.nats(e.get("size"), at, "size")
        chunks = []
        for j, ch in enumerate(c.array(e.get("chunks"), at, "chunks")):
            if type(ch) is not list or len(ch) != 2:
                raise c.bad(f"{at}.chunks[{j}]", "must be an [offsets, sizes] pair")
            offs, sizes = c.nats(ch[0], f"{at}.chunks[{j}]", "offsets"), c.nats(ch[1], f"{at}.chunks[{j}]", "sizes")
            if not len(offs) == len(sizes) == len(size) or any(o + n > g for o, n, g in zip(offs, sizes, size,
                                                                                            strict=True)):
                raise c.bad(f"{at}.chunks[{j}]", f"{list(offs)} + {list(sizes)} does not lie inside {list(size)}")
            chunks.append((offs, sizes))
        entries[fqn] = DcpTensorEntry(c.text(e.get("dtype"), at, "dtype"), size,
                                      c.flag(e.get("requires_grad", False), at, "requires_grad"), tuple(chunks))
    items = []
    for i, raw in enumerate(c.array(body.get("items"), "items")):
        at = f"items[{i}]"
        it = c.obj(raw, at)
        fqn = c.text(it.get("fqn"), at, "fqn")
        if fqn not in entries:
            raise c.bad(f"{at}.fqn", f"{fqn!r} has no entry")
        offset = it.get("offset")
        offset = c.nats(offset, at, "offset") if offset is not None else None
        fi, pos, n = c.nat(it.get("file"), at, "file"), c.nat(it.get("at"), at, "at"), c.nat(it.get("nbytes"), at,
                                                                                             "nbytes")
        if fi >= len(files):
            raise c.bad(f"{at}.file", f"{fi} is out of range ({len(files)} files)")
        if pos + n > files[fi].nbytes:
            raise c.bad(f"{at}.at", f"[{pos}, {pos + n}) lies outside its file's {files[fi].nbytes} bytes")
        digest = it.get("digest")
        if digest is not None:
            c.text(digest, at, "digest")
        elif checksum != "none":
            raise c.bad(f"{at}.digest", "is missing")
        items.append(DcpItemRecord(fqn, offset, fi, pos, n, digest))
    torch_version = body.get("torch_version")
    if torch_version is not None:
        c.text(torch_version, "torch_version")
    return DcpManifest(version=version, checksum=checksum, torch_version=torch_version, files=tuple(files),
                       items=tuple(items), entries=entries, planner_data=body.get("planner_data"),
                       created_unix=c.seconds(body.get("created_unix"), "created_unix", ""), commit=_commit(body))


def read_any_manifest(directory: str) -> Manifest | DcpManifest:
    """:func:`read_manifest`, or the DCP manifest of a checkpoint written through zckpt.dcp.

    Raises:
        FileNotFoundError, CorruptCheckpointError: as :func:`read_manifest`.
    """
    body, path = _read_sealed(directory)
    if body.get("format") == DCP_FORMAT_NAME:
        return parse_dcp_manifest(body, path)
    return parse_manifest(body, path)
