"""Reading checkpoints back: :func:`load` and :func:`verify`.

Every stored storage is read straight into its own freshly allocated buffer with
``preadv`` (no intermediate copy), several reads in parallel threads (``preadv`` and the
checksum release the GIL), and checked against the manifest's checksum of its entry.
Tensors are rebuilt as views of those storages, so tied weights and views come back
sharing storage, as with ``torch.load``.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import functools
import io
import json
import os
import pickle
import struct
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

import torch
import xxhash

from .errors import CorruptCheckpointError
from .format import dtype_from_name, dtype_name
from .manifest import (
    MULTI_RANK_VERSION,
    DcpManifest,
    FileRecord,
    Manifest,
    PartRecord,
    TensorRecord,
    checksum_hex,
    decode_skeleton,
    path_json,
    read_any_manifest,
    read_manifest,
)
from .s3 import is_url
from .tree import display_path, encode_path, iter_tensors, load_skeleton, path_key, rebuild_tensor

__all__ = ["load", "load_metadata", "verify"]

PathLike = Union[str, "os.PathLike[str]"]
MapLocation = None | str | torch.device | Mapping[str, Any] | Callable[..., Any]


def _writable_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a CPU uint8 tensor's bytes (no numpy needed)."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _read_exact(fd: Any, view: memoryview, offset: int, fname: str) -> None:
    if not isinstance(fd, int):   # an s3:// object (zckpt.s3.S3Object): ranged GETs
        fd.read_exact(view, offset)
        return
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CorruptCheckpointError(f"{fname}: truncated (wanted bytes up to {offset + len(view)}, "
                                         f"file ends at {offset + done})")
        done += got


def _restore_plan(m: Manifest, map_location: MapLocation, where: str) -> list[torch.device | None]:
    """The device each stored storage loads onto (None: ask the ``map_location`` callable).

    Checked before any data is read: a checkpoint saved from ``cuda:0`` loaded on a
    machine without CUDA fails at once, telling the user to pass ``map_location``.
    Accepts what ``torch.load`` accepts: None, a string, a ``torch.device``, a dict
    mapping saved location strings to locations, or a callable ``(storage, location)``.
    """
    if map_location is not None and not isinstance(map_location, (str, torch.device, Mapping)) \
            and not callable(map_location):
        raise TypeError(f"map_location must be None, a str, a torch.device, a dict or a callable, "
                        f"got {type(map_location).__name__}")
    out: list[torch.device | None] = []
    for st in m.storages:
        saved = st.device
        if map_location is None:
            target: Any = saved
        elif isinstance(map_location, Mapping):
            target = map_location.get(saved, saved)
        elif callable(map_location):
            out.append(None)
            continue
        else:
            target = map_location
        try:
            dev = torch.device(target)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"map_location gives {target!r} for storages saved on {saved!r}: {exc}") from None
        _check_available(dev, saved, where)
        out.append(dev)
    return out


def _check_available(dev: torch.device, saved: str, where: str) -> None:
    if dev.type in ("cpu", "meta"):
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    hint = ("pass map_location='cpu' (or a dict or callable, as torch.load accepts) to load it "
            "onto this machine's devices")
    if available is None or not available():
        raise RuntimeError(f"{where} holds tensors saved on {saved!r} that would load onto {str(dev)!r}, "
                           f"but torch.{dev.type}.is_available() is False: {hint}")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise RuntimeError(f"{where} holds tensors saved on {saved!r} that would load onto {str(dev)!r}, "
                           f"but this machine has {count()} {dev.type} device(s): {hint}")


def _place(buf: torch.Tensor, dev: torch.device | None, saved: str,
           map_location: MapLocation) -> torch.UntypedStorage:
    """Move a loaded CPU storage where it belongs."""
    st = buf.untyped_storage()
    if dev is None:  # a callable, called as torch.load calls it
        assert callable(map_location)
        moved = map_location(st, saved)
        if moved is None:
            dev = torch.device(saved)
        else:
            return moved.untyped() if isinstance(moved, torch.storage.TypedStorage) else moved
    if dev.type == "meta":  # shapes without data, as torch.load(map_location="meta") gives
        return torch.UntypedStorage(st.nbytes(), device="meta")
    return st if dev.type == "cpu" else buf.to(dev).untyped_storage()


def _chunk_owner(m: Manifest) -> dict[tuple[int, int], str]:
    """(file index, offset) -> the tensors whose bytes sit there, for error messages."""
    users: dict[int, list[str]] = {}
    for t in m.tensors:
        users.setdefault(t.storage, []).append(t.name)
    owner = {}
    for sid, st in enumerate(m.storages):
        for part in st.parts:
            owner[(part.file, part.offset)] = f"entry {part.entry!r} (tensors {', '.join(users.get(sid, []))})"
    return owner


def _manifest_of(directory: str) -> Manifest:
    """The checked manifest of a checkpoint directory, or of an ``s3://`` checkpoint."""
    if is_url(directory):
        from . import s3
        return s3.read_manifest(directory)
    return read_manifest(directory)


def _open_file(path: str) -> Any:
    """A shard file for :func:`_read_exact`: a descriptor, or an ``s3://`` object."""
    if is_url(path):
        from . import s3
        return s3.S3Object(path)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _open_stream(path: str) -> Any:
    """A shard file to ``seek`` and ``read`` (verify), local or ``s3://``."""
    if is_url(path):
        from . import s3
        return s3.S3Object(path)
    return open(path, "rb")


def _close_file(fd: Any) -> None:
    if isinstance(fd, int):
        os.close(fd)
    else:
        fd.close()


def _check_files(directory: str, m: Manifest) -> list[str]:
    if is_url(directory):   # one listing: every shard object there, of its size
        from . import s3
        return s3.check_objects(directory, m)
    return _check_sizes(directory, [(f.name, f.nbytes) for f in m.files])


def _check_sizes(directory: str, files: list[tuple[str, int]]) -> list[str]:
    """The paths of a checkpoint's files, each checked to exist with the size its manifest gives."""
    paths = []
    for name, nbytes in files:
        path = os.path.join(directory, name)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: shard file is missing") from None
        if size != nbytes:
            raise CorruptCheckpointError(f"{path}: size {size} bytes, manifest says {nbytes} "
                                         f"({'truncated' if size < nbytes else 'extended'})")
        paths.append(path)
    return paths


def load_metadata(path: PathLike) -> Any:
    """The ``metadata`` a checkpoint was saved with (JSON data, or None); reads only the manifest.

    Raises:
        FileNotFoundError, CorruptCheckpointError: as :func:`load`.
    """
    return _manifest_of(os.fspath(path)).metadata


def load(path: PathLike, map_location: MapLocation = None, *, weights_only: bool = True, verify: bool = True,
         into: Any = None, strict: bool = True, num_threads: int | None = None) -> Any:
    """Load a committed checkpoint and return the object that was saved.

    Returns what ``torch.load`` would return for the same object saved with
    ``torch.save``: containers keep their types (dict subclasses, namedtuples, user
    objects), tensors their dtype, shape, stride, storage offset, lazy conjugate bit,
    ``requires_grad`` and ``Parameter``-ness, and tensors that shared a storage share
    one again.

    Args:
        path: The checkpoint directory.
        map_location: As ``torch.load``'s: ``None`` (where each storage was saved
            from), a device (``"cpu"``, ``torch.device("cuda:0")``), a dict mapping
            saved location strings to locations, or a callable ``(storage, location)``
            returning a storage (or None for the default). Checked before any data is
            read. Ignored with ``into``.
        weights_only: Unpickle the non-tensor structure with torch's restricted
            unpickler, accepting exactly what ``torch.load(weights_only=True)`` accepts
            (containers, primitives, tensors, and the types registered with
            ``torch.serialization.add_safe_globals``). ``False`` runs any pickle: only
            for checkpoints you trust. Verification and ``zckpt inspect`` never unpickle.
        verify: Check every byte against the manifest's checksums (default). Costs one
            extra pass over memory, no extra reads.
        into: An existing state dict of the same structure: its tensors (matched by
            typed key path) are filled in place (read straight into their memory where
            they are contiguous CPU tensors: no new tensor allocations) and the returned
            object holds them.
        strict: With ``into``: key paths present on only one side raise ``KeyError``.
        num_threads: Parallel reads (default: min(8, CPUs + 2)).

    Blocks until every byte is read (and checked).

    Raises:
        CorruptCheckpointError: a missing, truncated or modified file, or a bad manifest.
        FileNotFoundError: ``path`` is not a directory.
        pickle.UnpicklingError: with ``weights_only``, the structure holds a type that is
            not allowed (the message names it).
        RuntimeError: a storage would load onto a device this machine lacks.
        KeyError, ValueError: with ``into``, key paths, shapes or dtypes that do not match.
    """
    if path is None:
        raise TypeError("zckpt.load(path=None): no checkpoint to load (zckpt.latest() returns None "
                        "when a root holds no committed checkpoint yet)")
    directory = os.fspath(path)
    m = _manifest_of(directory)
    paths = _check_files(directory, m)
    _check_views(m, directory)
    checks = verify and m.checks
    records = m.tensors
    if into is not None:
        if m.version >= MULTI_RANK_VERSION:
            raise ValueError(f"{directory} is a multi-rank checkpoint: load it into a state dict with "
                             "zckpt.distributed.load(path, state_dict), or whole with zckpt.load(path)")
        return _load_into(directory, m, paths, into, checks, strict, num_threads, weights_only)
    devices = _restore_plan(m, map_location, directory)
    buffers: list[torch.Tensor | None] = [torch.empty(st.nbytes, dtype=torch.uint8) for st in m.storages]
    _read_storages(m, paths, buffers, checks, num_threads)
    storages = [_place(buf, dev, st.device, map_location)
                for st, buf, dev in zip(m.storages, buffers, devices, strict=False) if buf is not None]
    del buffers
    if m.version >= MULTI_RANK_VERSION:
        return _rebuild(directory, m, functools.partial(_assemble, m, _boxes_by_path(m), storages), storages,
                        weights_only)
    return _rebuild(directory, m, lambda i: _tensor_from(records[i], storages), storages, weights_only)


def _boxes_by_path(m: Manifest) -> dict[str, list[TensorRecord]]:
    """A multi-rank manifest's boxed records, grouped by the tensor (key path) they are pieces of."""
    groups: dict[str, list[TensorRecord]] = {}
    for rec in m.tensors:
        if rec.global_shape is not None and rec.path is not None:
            groups.setdefault(path_json(rec.path), []).append(rec)
    return groups


def _assemble(m: Manifest, groups: dict[str, list[TensorRecord]], storages: list[torch.UntypedStorage],
              i: int) -> torch.Tensor:
    """Tensor ``i`` of a multi-rank checkpoint: whole, from every box saved of it.

    A tensor saved whole (a replicated one, written by one rank) is a view of its storage,
    as in a single-rank checkpoint (sharing between such tensors is kept); one saved in
    pieces (a DTensor's shards) is a new contiguous tensor of its global shape.
    """
    rec = m.tensors[i]
    pieces = groups.get(path_json(rec.path), []) if rec.global_shape is not None and rec.path is not None else []
    if len(pieces) <= 1 and (rec.global_shape is None or tuple(rec.shape) == tuple(rec.global_shape)):
        return _tensor_from(rec, storages)
    assert rec.global_shape is not None
    out = torch.empty(tuple(rec.global_shape), dtype=dtype_from_name(rec.dtype))
    covered = 0
    for piece in pieces:
        if piece.dtype != rec.dtype or tuple(piece.global_shape or ()) != tuple(rec.global_shape):
            raise CorruptCheckpointError(f"tensor {rec.name}: its pieces disagree on dtype or global shape")
        src = _tensor_from(piece, storages).detach()
        assert piece.global_offset is not None
        out[tuple(slice(o, o + n) for o, n in zip(piece.global_offset, piece.shape, strict=True))].copy_(src)
        covered += src.numel()
    if covered != out.numel():
        raise CorruptCheckpointError(f"tensor {rec.name}: its saved pieces cover {covered} of its {out.numel()} "
                                     "elements")
    if rec.param:
        return torch.nn.Parameter(out, requires_grad=rec.requires_grad)
    return out.requires_grad_(rec.requires_grad) if rec.requires_grad else out


def _tensor_from(rec: TensorRecord, storages: list[torch.UntypedStorage]) -> torch.Tensor:
    return rebuild_tensor(storages[rec.storage], dtype_from_name(rec.dtype), rec.offset, rec.shape, rec.stride,
                          requires_grad=rec.requires_grad, is_param=rec.param, conj=rec.conj, neg=rec.neg)


def _rebuild(directory: str, m: Manifest, make: Callable[[int], torch.Tensor],
             storages: list[torch.UntypedStorage], weights_only: bool) -> Any:
    """The saved object, with tensor ``i`` made by ``make(i)`` (once: identity is kept)."""
    built: dict[int, torch.Tensor] = {}

    def tensor(i: int) -> torch.Tensor:
        if not 0 <= i < len(m.tensors):
            raise CorruptCheckpointError(f"{directory}: the structure names tensor {i}, which the manifest lacks")
        t = built.get(i)
        if t is None:
            t = built[i] = make(i)
        return t

    def storage(sid: int, dtype: torch.dtype | None) -> Any:
        if not 0 <= sid < len(storages):
            raise CorruptCheckpointError(f"{directory}: the structure names storage {sid}, which the manifest lacks")
        if dtype is None:
            return storages[sid]
        return torch.storage.TypedStorage(wrap_storage=storages[sid], dtype=dtype, _internal=True)

    try:
        if m.version == 1:
            return _decode_v1_tree(m.tree, tensor, weights_only)
        return load_skeleton(decode_skeleton(m.tree, directory), tensor, storage, weights_only=weights_only)
    except (EOFError, IndexError, struct.error) as exc:  # a truncated or mangled pickle (re-sealed manifest)
        raise CorruptCheckpointError(f"{directory}: the checkpoint's structure does not unpickle: {exc!r}") from exc
    except pickle.UnpicklingError as exc:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"{directory}: weights_only=True refused the checkpoint's structure: {exc} "
            "(or, only if you trust where this checkpoint came from, load it with weights_only=False)") from exc


def _decode_v1_tree(data: Any, tensor: Callable[[int], torch.Tensor], weights_only: bool) -> Any:
    """The tagged-JSON structure of version-1 manifests (pickled leaves honour ``weights_only``)."""
    if not isinstance(data, dict):
        return data
    tag = data.get("@")
    if tag == "tensor":
        return tensor(int(data["i"]))
    if tag in ("dict", "odict"):
        items = [(_decode_v1_tree(k, tensor, weights_only), _decode_v1_tree(v, tensor, weights_only))
                 for k, v in data["items"]]
        out: Any = collections.OrderedDict(items) if tag == "odict" else dict(items)
        if "meta" in data:
            out._metadata = _decode_v1_tree(data["meta"], tensor, weights_only)
        return out
    if tag in ("list", "tuple"):
        seq = [_decode_v1_tree(v, tensor, weights_only) for v in data["items"]]
        return seq if tag == "list" else tuple(seq)
    if tag == "float":
        return float(data["v"])
    if tag == "pickle":
        blob = base64.b64decode(data["b64"])
        if weights_only:
            from torch import _weights_only_unpickler
            return _weights_only_unpickler.load(io.BytesIO(blob), encoding="utf-8")
        return pickle.loads(blob)
    raise CorruptCheckpointError(f"unknown tree node tag {tag!r}")


def _read_storages(m: Manifest, paths: list[str], buffers: list[torch.Tensor | None],
                   checks: bool, num_threads: int | None) -> None:
    """Read every stored storage into ``buffers[sid]`` (CPU uint8), checking checksums."""
    owner = _chunk_owner(m)
    sums: dict[tuple[int, int], str] = {}
    for fi, f in enumerate(m.files):
        for (off, _n), digest in zip(f.chunks, f.checksums or (), strict=False):
            sums[(fi, off)] = digest
    jobs = [(sid, part) for sid, st in enumerate(m.storages) for part in st.parts if buffers[sid] is not None]
    fds = [_open_file(p) for p in paths]

    def read_part(job: tuple[int, PartRecord]) -> None:
        sid, part = job
        fi, off, n = part.file, part.offset, part.nbytes
        buf = buffers[sid]
        assert buf is not None
        with _writable_view(buf) as whole, whole[part.start: part.start + n] as view:
            _read_exact(fds[fi], view, off, paths[fi])
            if checks:
                want = sums.get((fi, off))
                if want is None or checksum_hex(view) != want:
                    raise CorruptCheckpointError(
                        f"{paths[fi]}: checksum mismatch in bytes [{off}, {off + n}) — "
                        f"{owner.get((fi, off), 'unknown entry')}")

    try:
        workers = num_threads or min(8, (os.cpu_count() or 1) + 2)
        jobs.sort(key=lambda j: -j[1].nbytes)  # large parts first: threads end together
        if workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="zckpt-load") as ex:
                for fut in [ex.submit(read_part, j) for j in jobs]:
                    fut.result()
        else:
            for j in jobs:
                read_part(j)
        if checks:
            for fi, f in enumerate(m.files):
                _verify_header(fds[fi], paths[fi], f)
    finally:
        for fd in fds:
            _close_file(fd)


def _load_into(directory: str, m: Manifest, paths: list[str], into: Any, checks: bool, strict: bool,
               num_threads: int | None, weights_only: bool) -> Any:
    walked = list(iter_tensors(into))
    lazy = [display_path(p) for p, t in walked if t.is_conj() or t.is_neg()]
    if lazy:
        raise ValueError(f"load(into=...): {lazy} are lazy conjugate/negative views; "
                         "loading into them would not write the tensors they view")
    v1 = m.version == 1
    # Key paths compare as the manifest records them: typed (version 1 joined them with ".").
    # Paths match by their canonical JSON encoding: typed, and nan keys equal to themselves.
    targets: dict[Any, torch.Tensor] = {}
    shown: dict[Any, str] = {}
    for p, t in walked:
        key = ".".join(str(k) for k in p) if v1 else path_key(encode_path(p))
        targets.setdefault(key, t)
        shown.setdefault(key, display_path(p))
    recs = m.tensors
    rec_paths: list[Any] = []
    for rec in recs:
        if v1:
            rec_paths.append(rec.name)
        elif rec.path is None:
            rec_paths.append(None)
        else:
            rec_paths.append(path_key(list(rec.path)))
            shown.setdefault(rec_paths[-1], rec.name)
    stored = {p for p in rec_paths if p is not None}
    missing = [p for p in stored if p not in targets]
    unexpected = [p for p in targets if p not in stored]
    if strict and (missing or unexpected):
        def show(ps: list[Any]) -> list[str]:
            return sorted(str(p) if v1 else shown[p] for p in ps)
        raise KeyError(f"load(into=...) of {directory}: keys missing from `into`: {show(missing)}; "
                       f"keys not in the checkpoint: {show(unexpected)}")
    users: dict[int, list[int]] = {}
    for i, (rec, p) in enumerate(zip(recs, rec_paths, strict=False)):
        if p is None or p not in targets:  # loaded as new tensors (strict=False)
            continue
        t = targets[p]
        if tuple(t.shape) != rec.shape or dtype_name(t.dtype) != rec.dtype:
            raise ValueError(f"load(into=...): {rec.name!r} is {dtype_name(t.dtype)}{list(t.shape)} in `into` "
                             f"but {rec.dtype}{list(rec.shape)} in {directory}")
        users.setdefault(rec.storage, []).append(i)
    # Read straight into the target when it alone is the whole stored storage.
    buffers: list[torch.Tensor | None] = []
    direct: set[int] = set()
    for sid, st in enumerate(m.storages):
        here = users.get(sid, [])
        only = targets[rec_paths[here[0]]] if len(here) == 1 else None
        saved = recs[here[0]] if len(here) == 1 else None
        # Only when the saved view is the plain layout of the whole storage and the target
        # is exactly its own whole storage: a transposed or channels-last record would
        # otherwise land scrambled, and a target inside a larger storage would shift
        # every other view of that storage.
        if (only is not None and saved is not None and only.device.type == "cpu" and only.is_contiguous()
                and saved.offset == 0 and not saved.conj and not saved.neg and _is_contiguous(saved.shape, saved.stride)
                and only.storage_offset() == 0 and only.untyped_storage().nbytes() == st.nbytes
                and only.numel() * only.element_size() == st.nbytes):
            buffers.append(only.detach().reshape(-1).view(torch.uint8) if st.nbytes else None)
            direct.add(sid)
        else:
            buffers.append(torch.empty(st.nbytes, dtype=torch.uint8))
    _read_storages(m, paths, buffers, checks, num_threads)
    storages = [b.untyped_storage() if b is not None else torch.UntypedStorage(0) for b in buffers]
    with torch.no_grad():
        for sid, here in users.items():
            if sid in direct:
                continue
            for i in here:
                targets[rec_paths[i]].copy_(_tensor_from(recs[i], storages))

    def make(i: int) -> torch.Tensor:
        p = rec_paths[i]
        return targets[p] if p is not None and p in targets else _tensor_from(recs[i], storages)

    return _rebuild(directory, m, make, storages, weights_only)


def _is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a record's stride is the row-major one for its shape (size-1 dims excepted)."""
    expected = 1
    for n, st in zip(reversed(shape), reversed(stride), strict=False):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _verify_header(fd: int, path: str, frec: FileRecord) -> None:
    off, n = frec.chunks[0]
    buf = bytearray(n)
    with memoryview(buf) as view:
        _read_exact(fd, view, off, path)
    want = frec.checksums[0] if frec.checksums else None
    if want is not None and checksum_hex(buf) != want:
        raise CorruptCheckpointError(f"{path}: checksum mismatch in the safetensors header (bytes [0, {n}))")


def verify(path: PathLike) -> dict[str, Any]:
    """Re-read every byte of a checkpoint and check it against the manifest.

    Checks the manifest's own checksum, that every file exists with the right size,
    that each shard's safetensors header agrees with the manifest, and every chunk's
    checksum. Returns a summary (files, tensors, bytes) when all is well.

    Raises:
        CorruptCheckpointError: naming the file and the tensors affected.
    """
    directory = os.fspath(path)
    if not is_url(directory):
        any_m = read_any_manifest(directory)
        if isinstance(any_m, DcpManifest):
            return _verify_dcp(directory, any_m)
    m = _manifest_of(directory)
    paths = _check_files(directory, m)
    owner = _chunk_owner(m)
    total = 0
    _check_views(m, directory)
    checks = m.checks
    for fi, (fpath, frec) in enumerate(zip(paths, m.files, strict=False)):
        sums = frec.checksums or ()
        if checks and len(sums) != len(frec.chunks):
            raise CorruptCheckpointError(f"{fpath}: manifest lists {len(sums)} checksums for "
                                         f"{len(frec.chunks)} chunks")
        with _open_stream(fpath) as f:
            # The header chunk's checksum first: a damaged length prefix or header is
            # reported as such, never parsed (a 2**62-byte length, a JSON list).
            hoff, hlen_total = frec.chunks[0]
            if checks and _stream_digest(f, hoff, hlen_total) != sums[0]:
                raise CorruptCheckpointError(f"{fpath}: checksum mismatch in bytes [{hoff}, {hoff + hlen_total}) — "
                                             "the safetensors header")
            header = _parse_header(f, fpath, frec.nbytes)
            _check_header(fpath, header, fi, m, 8 + struct.unpack("<Q", _pread(f, 0, 8))[0])
            if checks:
                total += hlen_total
                for (off, n), want in zip(frec.chunks[1:], sums[1:], strict=False):
                    if _stream_digest(f, off, n) != want:
                        raise CorruptCheckpointError(
                            f"{fpath}: checksum mismatch in bytes [{off}, {off + n}) — "
                            f"{owner.get((fi, off), 'unknown entry')}")
                    total += n
    return {"files": len(paths), "tensors": len(m.tensors), "storages": len(m.storages), "bytes_checked": total}


def _verify_dcp(directory: str, m: DcpManifest) -> dict[str, Any]:
    """:func:`verify` for a checkpoint written through zckpt.dcp: file sizes, every item's checksum."""
    total = 0
    paths = _check_sizes(directory, [(f.name, f.nbytes) for f in m.files])
    handles = [open(p, "rb") for p in paths]   # noqa: SIM115 - closed below
    try:
        for it in m.items:
            if m.checks and _stream_digest(handles[it.file], it.at, it.nbytes) != it.digest:
                raise CorruptCheckpointError(f"{paths[it.file]}: checksum mismatch in bytes "
                                             f"[{it.at}, {it.at + it.nbytes}) — item {it.fqn!r}")
            total += it.nbytes if m.checks else 0
    finally:
        for h in handles:
            h.close()
    return {"files": len(paths), "items": len(m.items), "tensors": sum(e is not None for e in m.entries.values()),
            "bytes_checked": total}


def _pread(f: Any, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _parse_header(f: Any, fpath: str, file_nbytes: int) -> dict[str, Any]:
    head = _pread(f, 0, 8)
    if len(head) < 8:
        raise CorruptCheckpointError(f"{fpath}: too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", head)
    if 8 + hlen > file_nbytes:
        raise CorruptCheckpointError(f"{fpath}: safetensors header length {hlen} runs past the file's end")
    try:
        header = json.loads(f.read(hlen))
    except ValueError:
        raise CorruptCheckpointError(f"{fpath}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{fpath}: safetensors header is not a JSON object")
    return header


def _check_views(m: Manifest, where: str) -> None:
    """Every tensor record views bytes its storage has (a re-sealed manifest could ask for more).

    The one check of the manifest's layout that needs torch (a dtype's size), so it is
    here and not in zckpt.manifest.parse_manifest.
    """
    for i, rec in enumerate(m.tensors):
        itemsize = dtype_from_name(rec.dtype).itemsize
        if any(n == 0 for n in rec.shape):
            continue
        last = rec.offset + sum((n - 1) * st for n, st in zip(rec.shape, rec.stride, strict=False))
        nbytes = m.storages[rec.storage].nbytes
        if (last + 1) * itemsize > nbytes:
            raise CorruptCheckpointError(f"{where}: malformed manifest: tensors[{i}] ({rec.name}) views bytes "
                                         f"beyond its storage's {nbytes}")


def _stream_digest(f: Any, offset: int, nbytes: int, block: int = 16 << 20) -> str | None:
    """xxh3 of ``nbytes`` at ``offset``, read in blocks (a 4 GiB tensor needs no 4 GiB buffer)."""
    h = xxhash.xxh3_64()
    f.seek(offset)
    left = nbytes
    while left:
        data = f.read(min(block, left))
        if not data:
            return None  # short file: reported as a mismatch
        h.update(data)
        left -= len(data)
    return h.hexdigest()


def _check_header(fpath: str, header: dict[str, Any], fi: int, m: Manifest, data_start: int) -> None:
    for st in m.storages:
        for part in st.parts:
            if part.file != fi:
                continue
            entry = header.get(part.entry)
            if not isinstance(entry, dict):
                raise CorruptCheckpointError(f"{fpath}: safetensors header lacks entry {part.entry!r}")
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)) \
                    or data_start + offsets[0] != part.offset or offsets[1] - offsets[0] != part.nbytes:
                raise CorruptCheckpointError(f"{fpath}: entry {part.entry!r} is at {entry.get('data_offsets')} "
                                             f"in the header but the manifest places it at offset {part.offset}")
