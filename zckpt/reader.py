"""Reading checkpoints back: :func:`load` and :func:`verify`.

Every stored storage is read straight into its own freshly allocated buffer with
``preadv`` (no intermediate copy), several reads in parallel threads (``preadv`` and the
checksum release the GIL), and checked against the manifest's checksum of its entry.
Tensors are rebuilt as views of those storages, so tied weights and views come back
sharing storage, as with ``torch.load``.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional, Union

import torch
import xxhash

from .errors import CorruptCheckpointError
from .format import dtype_from_name, dtype_name
from .manifest import checksum_hex, read_manifest
from .tree import flatten, from_json, unflatten

__all__ = ["load", "verify"]

PathLike = Union[str, "os.PathLike[str]"]
MapLocation = Union[None, str, torch.device, Mapping[str, str]]


def _writable_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a CPU uint8 tensor's bytes (no numpy needed)."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _read_exact(fd: int, view: memoryview, offset: int, fname: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CorruptCheckpointError(f"{fname}: truncated (wanted bytes up to {offset + len(view)}, "
                                         f"file ends at {offset + done})")
        done += got


def _target_device(saved: str, map_location: MapLocation) -> torch.device:
    if map_location is None:
        return torch.device(saved)
    if isinstance(map_location, Mapping):
        return torch.device(map_location.get(saved, saved))
    return torch.device(map_location)


def _chunk_owner(body: dict[str, Any]) -> dict[tuple[int, int], str]:
    """(file index, offset) -> the tensors whose bytes sit there, for error messages."""
    users: dict[int, list[str]] = {}
    for t in body["tensors"]:
        users.setdefault(t["storage"], []).append(t["key"])
    owner = {}
    for sid, st in enumerate(body["storages"]):
        for part in st["parts"]:
            owner[(part["file"], part["offset"])] = f"entry {part['entry']!r} (tensors {', '.join(users.get(sid, []))})"
    return owner


def _check_files(directory: str, body: dict[str, Any]) -> list[str]:
    paths = []
    for f in body["files"]:
        path = os.path.join(directory, f["name"])
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: shard file is missing") from None
        if size != f["nbytes"]:
            raise CorruptCheckpointError(f"{path}: size {size} bytes, manifest says {f['nbytes']} "
                                         f"({'truncated' if size < f['nbytes'] else 'extended'})")
        paths.append(path)
    return paths


def load(path: PathLike, map_location: MapLocation = None, *, verify: bool = True,
         into: Any = None, strict: bool = True, num_threads: Optional[int] = None) -> Any:
    """Load a committed checkpoint and return the nested structure that was saved.

    Args:
        path: The checkpoint directory.
        map_location: ``None`` (the device each tensor was saved from), a device
            (``"cpu"``, ``torch.device("cuda:0")``), or a dict mapping saved device
            strings to devices. Ignored with ``into``.
        verify: Check every byte against the manifest's checksums (default). Costs one
            extra pass over memory, no extra reads.
        into: An existing state dict of the same structure: its tensors are filled in
            place (read straight into their memory where they are contiguous CPU
            tensors: no new tensor allocations) and the returned structure holds them.
        strict: With ``into``: keys present on only one side raise ``KeyError``.
        num_threads: Parallel reads (default: min(8, CPUs + 2)).

    Raises:
        CorruptCheckpointError: a missing, truncated or modified file, or a bad manifest.
        FileNotFoundError: ``path`` is not a directory.
        KeyError, ValueError: with ``into``, keys, shapes or dtypes that do not match.
    """
    directory = os.fspath(path)
    body = read_manifest(directory)
    paths = _check_files(directory, body)
    checks = verify and body.get("checksum") != "none"
    skeleton = from_json(body["tree"])
    if into is not None:
        return _load_into(directory, body, paths, skeleton, into, checks, strict, num_threads)
    buffers: list[Optional[torch.Tensor]] = [torch.empty(st["nbytes"], dtype=torch.uint8)
                                             for st in body["storages"]]
    _read_storages(body, paths, buffers, checks, num_threads)
    storages = []
    for st, buf in zip(body["storages"], buffers):
        assert buf is not None
        dev = _target_device(st.get("device", "cpu"), map_location)
        storages.append(buf if dev.type == "cpu" else buf.to(dev))
    tensors = []
    for rec in body["tensors"]:
        base = storages[rec["storage"]]
        t = torch.empty(0, dtype=dtype_from_name(rec["dtype"]), device=base.device)
        t.set_(base.untyped_storage(), rec["offset"], rec["shape"], rec["stride"])
        if rec.get("param"):
            t = torch.nn.Parameter(t, requires_grad=rec.get("requires_grad", True))
        elif rec.get("requires_grad"):
            t.requires_grad_(True)
        tensors.append(t)
    return unflatten(skeleton, tensors)


def _read_storages(body: dict[str, Any], paths: list[str], buffers: list[Optional[torch.Tensor]],
                   checks: bool, num_threads: Optional[int]) -> None:
    """Read every stored storage into ``buffers[sid]`` (CPU uint8), checking checksums."""
    owner = _chunk_owner(body)
    sums: dict[tuple[int, int], str] = {}
    for fi, f in enumerate(body["files"]):
        for (off, _n), digest in zip(f["chunks"], f.get("checksums") or []):
            sums[(fi, off)] = digest
    jobs = [(sid, part) for sid, st in enumerate(body["storages"]) for part in st["parts"]
            if buffers[sid] is not None]
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]

    def read_part(job: tuple[int, dict[str, Any]]) -> None:
        sid, part = job
        fi, off, n = part["file"], part["offset"], part["nbytes"]
        buf = buffers[sid]
        assert buf is not None
        with _writable_view(buf) as whole, whole[part["start"]: part["start"] + n] as view:
            _read_exact(fds[fi], view, off, paths[fi])
            if checks:
                want = sums.get((fi, off))
                if want is None or checksum_hex(view) != want:
                    raise CorruptCheckpointError(
                        f"{paths[fi]}: checksum mismatch in bytes [{off}, {off + n}) — "
                        f"{owner.get((fi, off), 'unknown entry')}")

    try:
        workers = num_threads or min(8, (os.cpu_count() or 1) + 2)
        jobs.sort(key=lambda j: -j[1]["nbytes"])  # large parts first: threads end together
        if workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="zckpt-load") as ex:
                for fut in [ex.submit(read_part, j) for j in jobs]:
                    fut.result()
        else:
            for j in jobs:
                read_part(j)
        if checks:
            for fi, f in enumerate(body["files"]):
                _verify_header(fds[fi], paths[fi], f)
    finally:
        for fd in fds:
            os.close(fd)


def _load_into(directory: str, body: dict[str, Any], paths: list[str], skeleton: Any, into: Any,
               checks: bool, strict: bool, num_threads: Optional[int]) -> Any:
    _, named = flatten(into, resolve_lazy=False)
    targets: dict[str, torch.Tensor] = dict(named)
    lazy = [k for k, t in named if t.is_conj() or t.is_neg()]
    if lazy:
        raise ValueError(f"load(into=...): {lazy} are lazy conjugate/negative views; "
                         "loading into them would not write the tensors they view")
    recs = body["tensors"]
    stored = {r["key"] for r in recs}
    missing = sorted(stored - targets.keys())
    unexpected = sorted(targets.keys() - stored)
    if missing or (strict and unexpected):
        raise KeyError(f"load(into=...) of {directory}: keys missing from `into`: {missing}; "
                       f"keys not in the checkpoint: {unexpected}")
    users: dict[int, list[dict[str, Any]]] = {}
    for rec in recs:
        t = targets[rec["key"]]
        if list(t.shape) != rec["shape"] or dtype_name(t.dtype) != rec["dtype"]:
            raise ValueError(f"load(into=...): {rec['key']!r} is {dtype_name(t.dtype)}{list(t.shape)} in `into` "
                             f"but {rec['dtype']}{rec['shape']} in {directory}")
        users.setdefault(rec["storage"], []).append(rec)
    # Read straight into the target when it alone is the whole stored storage.
    buffers: list[Optional[torch.Tensor]] = []
    direct: dict[int, torch.Tensor] = {}
    for sid, st in enumerate(body["storages"]):
        recs_here = users.get(sid, [])
        only = targets[recs_here[0]["key"]] if len(recs_here) == 1 else None
        if (only is not None and only.device.type == "cpu" and only.is_contiguous()
                and recs_here[0]["offset"] == 0 and only.numel() * only.element_size() == st["nbytes"]):
            buffers.append(only.detach().reshape(-1).view(torch.uint8) if st["nbytes"] else None)
            direct[sid] = only
        else:
            buffers.append(torch.empty(st["nbytes"], dtype=torch.uint8) if recs_here else None)
    _read_storages(body, paths, buffers, checks, num_threads)
    with torch.no_grad():
        for sid, recs_here in users.items():
            if sid in direct:
                continue
            base = buffers[sid]
            for rec in recs_here:
                src = torch.empty(0, dtype=dtype_from_name(rec["dtype"]))
                if base is not None:
                    src.set_(base.untyped_storage(), rec["offset"], rec["shape"], rec["stride"])
                targets[rec["key"]].copy_(src)
    return unflatten(skeleton, [targets[r["key"]] for r in recs])


def _verify_header(fd: int, path: str, frec: dict[str, Any]) -> None:
    off, n = frec["chunks"][0]
    buf = bytearray(n)
    with memoryview(buf) as view:
        _read_exact(fd, view, off, path)
    want = (frec.get("checksums") or [None])[0]
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
    body = read_manifest(directory)
    paths = _check_files(directory, body)
    owner = _chunk_owner(body)
    total = 0
    for fi, (fpath, frec) in enumerate(zip(paths, body["files"])):
        with open(fpath, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{fpath}: too short for a safetensors header")
            (hlen,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(hlen))
            except ValueError:
                raise CorruptCheckpointError(f"{fpath}: safetensors header is not valid JSON") from None
            _check_header(fpath, header, fi, body, 8 + hlen)
            sums = frec.get("checksums") or []
            if body.get("checksum") != "none":
                if len(sums) != len(frec["chunks"]):
                    raise CorruptCheckpointError(f"{fpath}: manifest lists {len(sums)} checksums for "
                                                 f"{len(frec['chunks'])} chunks")
                for (off, n), want in zip(frec["chunks"], sums):
                    if _stream_digest(f, off, n) != want:
                        what = "the safetensors header" if off == 0 else owner.get((fi, off), "unknown entry")
                        raise CorruptCheckpointError(
                            f"{fpath}: checksum mismatch in bytes [{off}, {off + n}) — {what}")
                    total += n
    return {"files": len(paths), "tensors": len(body["tensors"]), "storages": len(body["storages"]),
            "bytes_checked": total}


def _stream_digest(f: Any, offset: int, nbytes: int, block: int = 16 << 20) -> Optional[str]:
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


def _check_header(fpath: str, header: dict[str, Any], fi: int, body: dict[str, Any], data_start: int) -> None:
    for st in body["storages"]:
        for part in st["parts"]:
            if part["file"] != fi:
                continue
            entry = header.get(part["entry"])
            if not isinstance(entry, dict):
                raise CorruptCheckpointError(f"{fpath}: safetensors header lacks entry {part['entry']!r}")
            start, end = entry.get("data_offsets", [None, None])
            if start is None or data_start + start != part["offset"] or end - start != part["nbytes"]:
                raise CorruptCheckpointError(f"{fpath}: entry {part['entry']!r} is at {entry.get('data_offsets')} "
                                             f"in the header but the manifest places it at offset {part['offset']}")
