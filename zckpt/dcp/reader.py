"""ZckptReader: DCP's StorageReader for every zckpt checkpoint (see zckpt.dcp)."""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CorruptCheckpointError
from ..format import dtype_from_name
from ..manifest import (
    MULTI_RANK_VERSION,
    DcpItemRecord,
    DcpManifest,
    DcpTensorEntry,
    Manifest,
    path_json,
    read_any_manifest,
)

__all__ = ["ZckptReader"]


PathLike = Union[str, "os.PathLike[str]"]


# --- the reader ----------------------------------------------------------------------------------
class ZckptReader(StorageReader):
    """A DCP ``StorageReader`` for zckpt checkpoints: those written by :class:`ZckptWriter`,
    by :class:`zckpt.CheckpointPool` and by :mod:`zckpt.distributed`.

    ``dcp.load(state_dict, storage_reader=ZckptReader(path))`` fills ``state_dict`` in place,
    resharding as DCP does (DTensors of any placement, any world size). Every item read is
    checked against the manifest's checksums first. For a pool or zckpt.distributed
    checkpoint, DCP's keys are the dotted key paths (``"model.layer.0.weight"``, as DCP
    flattens a nested state dict); only the storages holding requested items are read.

    Blocks until every requested byte is read and checked.

    Raises:
        CorruptCheckpointError: a missing, truncated or modified file, or a bad manifest.
        FileNotFoundError: no checkpoint directory at the path.
        pickle.UnpicklingError: a pool checkpoint's structure holds a type that
            ``weights_only=True`` refuses.
    """

    def __init__(self, path: PathLike | None = None, *, weights_only: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path) if path is not None else None
        self.weights_only = weights_only
        self._source: _DcpSource | _PoolSource | None = None
        self.storage_data: dict[MetadataIndex, Any] = {}

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._source = None
        self.storage_data = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        try:
            return os.path.isfile(os.path.join(os.fspath(checkpoint_id), "manifest.json"))
        except TypeError:
            return False

    def _get_source(self) -> _DcpSource | _PoolSource:
        if self._source is None:
            if self.path is None:
                raise ValueError("ZckptReader has no path: pass ZckptReader(path) or checkpoint_id=path")
            m = read_any_manifest(self.path)
            self._source = _DcpSource(self.path, m, self.weights_only) if isinstance(m, DcpManifest) \
                else _PoolSource(self.path, m)
        return self._source

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._get_source().metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self._get_source().read(plan.items, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _copy_into(req: ReadItem, planner: LoadPlanner, src: torch.Tensor) -> None:
    from torch.distributed._shard._utils import narrow_tensor_by_index
    piece = narrow_tensor_by_index(src, req.storage_offsets, req.lengths)
    target = planner.resolve_tensor(req).detach()
    if target.size() != piece.size():
        raise CorruptCheckpointError(f"{req.storage_index.fqn}: the saved chunk gives {tuple(piece.size())}, "
                                     f"DCP asked for {tuple(target.size())}")
    target.copy_(piece)
    planner.commit_tensor(req, target)


def _load_bytes(req: ReadItem, planner: LoadPlanner, data: bytes) -> None:
    buf = io.BytesIO(data)
    buf.seek(0)
    planner.load_bytes(req, buf)


class _DcpSource:
    """A checkpoint written through ZckptWriter: items at byte ranges of its files."""

    def __init__(self, directory: str, m: DcpManifest, weights_only: bool) -> None:
        self.directory, self.m, self.weights_only = directory, m, weights_only
        storage: dict[MetadataIndex, Any] = {}
        for i, it in enumerate(m.items):
            storage[MetadataIndex(it.fqn, it.offset)] = i
        sd_md: dict[str, Any] = {}
        self.sizes: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
        for fqn, e in m.entries.items():
            if e is None:
                sd_md[fqn] = BytesStorageMetadata()
                continue
            props = TensorProperties(dtype=dtype_from_name(e.dtype), requires_grad=e.requires_grad)
            sd_md[fqn] = TensorStorageMetadata(props, torch.Size(e.size), [
                ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in e.chunks])
            for o, s in e.chunks:
                self.sizes[(fqn, o)] = s
        self.metadata = Metadata(state_dict_metadata=sd_md, planner_data=_planner_data(m.planner_data),
                                 storage_data=storage)

    def read(self, reqs: list[ReadItem], planner: LoadPlanner) -> None:
        from ..reader import _read_exact, _writable_view
        by_item: dict[int, list[ReadItem]] = {}
        index = {MetadataIndex(it.fqn, it.offset): i for i, it in enumerate(self.m.items)}
        for req in reqs:
            key = MetadataIndex(req.storage_index.fqn, req.storage_index.offset)
            if key not in index:
                raise CorruptCheckpointError(f"{self.directory}: no saved item {key.fqn!r} at {key.offset}")
            by_item.setdefault(index[key], []).append(req)
        fds: dict[int, int] = {}
        try:
            for i in sorted(by_item, key=lambda i: (self.m.items[i].file, self.m.items[i].at)):
                it = self.m.items[i]
                fname = os.path.join(self.directory, self.m.files[it.file].name)
                if it.file not in fds:
                    fds[it.file] = _open_checked(fname, self.m.files[it.file].nbytes)
                buf = torch.empty(it.nbytes, dtype=torch.uint8)
                with _writable_view(buf) as view:
                    _read_exact(fds[it.file], view, it.at, fname)
                    if self.m.checks and it.digest is not None:
                        import xxhash
                        if xxhash.xxh3_64_hexdigest(view) != it.digest:
                            raise CorruptCheckpointError(f"{fname}: checksum mismatch in bytes "
                                                         f"[{it.at}, {it.at + it.nbytes}) — item {it.fqn!r}")
                entry = self.m.entries[it.fqn]
                for req in by_item[i]:
                    if req.type == LoadItemType.BYTE_IO or entry is None:
                        with _writable_view(buf) as raw:
                            data = raw.tobytes()
                        if self.weights_only:
                            _check_weights_only(data, it.fqn, fname)
                        _load_bytes(req, planner, data)
                        continue
                    _copy_into(req, planner, self._tensor(it, entry, buf, fname))
        finally:
            for fd in fds.values():
                os.close(fd)

    def _tensor(self, it: DcpItemRecord, entry: DcpTensorEntry, buf: torch.Tensor, fname: str) -> torch.Tensor:
        dtype = dtype_from_name(entry.dtype)
        sizes = self.sizes.get((it.fqn, it.offset or ()), entry.size if it.offset is None else None)
        if sizes is None:
            raise CorruptCheckpointError(f"{fname}: item {it.fqn!r} at {it.offset} is no chunk of its entry")
        if math.prod(sizes) * dtype.itemsize != it.nbytes:
            raise CorruptCheckpointError(f"{fname}: item {it.fqn!r} holds {it.nbytes} bytes, its chunk "
                                         f"{list(sizes)} of {entry.dtype} needs {math.prod(sizes) * dtype.itemsize}")
        return buf.view(dtype).view(sizes) if it.nbytes else torch.empty(sizes, dtype=dtype)


def _check_weights_only(data: bytes, fqn: str, fname: str) -> None:
    """DCP's load planner unpickles a non-tensor item with ``torch.load(weights_only=False)``:
    first make sure torch's restricted unpickler accepts it (a checksum proves the bytes
    are the ones written, not that whoever wrote them was honest)."""
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(
            f"{fname}: item {fqn!r} holds a type weights_only=True refuses ({exc}); load with "
            "ZckptReader(path, weights_only=False) only if you trust where this checkpoint came from") from exc


def _planner_data(data: Any) -> Any:
    """DCP's default planner data back as it was: key paths are tuples."""
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {k: tuple(v) for k, v in data.items()}
    return data


def _open_checked(path: str, nbytes: int) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: file is missing") from None
    size = os.fstat(fd).st_size
    if size != nbytes:
        os.close(fd)
        raise CorruptCheckpointError(f"{path}: size {size} bytes, manifest says {nbytes}")
    return fd


class _PoolSource:
    """A checkpoint written by CheckpointPool or zckpt.distributed, seen as DCP items.

    The structure is rebuilt with placeholder tensors (no data read; ``weights_only``
    unpickling), flattened as DCP flattens a state dict, and every tensor becomes a DCP
    tensor whose chunks are its saved records (a multi-rank checkpoint's boxes).
    """

    def __init__(self, directory: str, m: Manifest) -> None:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        from ..reader import _check_files, _check_views, _rebuild
        self.directory, self.m = directory, m
        self.paths = _check_files(directory, m)
        _check_views(m, directory)
        groups: dict[str, list[int]] = {}
        if m.version >= MULTI_RANK_VERSION:
            for i, rec in enumerate(m.tensors):
                if rec.global_shape is not None and rec.path is not None:
                    groups.setdefault(path_json(rec.path), []).append(i)
        self.placeholders: dict[int, tuple[torch.Tensor, list[int]]] = {}

        def make(i: int) -> torch.Tensor:
            rec = m.tensors[i]
            shape = rec.global_shape if rec.global_shape is not None else rec.shape
            t = torch.empty(tuple(shape), dtype=dtype_from_name(rec.dtype), device="meta")
            boxes = groups.get(path_json(rec.path), [i]) if rec.global_shape is not None and rec.path else [i]
            self.placeholders[id(t)] = (t, boxes)
            return t

        structure = _rebuild(directory, m, make, [], weights_only=True)
        if not isinstance(structure, dict):
            raise ValueError(f"{directory} holds a {type(structure).__name__}, not a state dict: DCP loads dicts")
        flat, mappings = flatten_state_dict(structure)
        sd_md: dict[str, Any] = {}
        storage: dict[MetadataIndex, Any] = {}
        self.objects: dict[str, Any] = {}
        for fqn, value in flat.items():
            ph = self.placeholders.get(id(value)) if isinstance(value, torch.Tensor) else None
            if ph is None:
                sd_md[fqn] = BytesStorageMetadata()
                storage[MetadataIndex(fqn)] = ("obj", fqn)
                self.objects[fqn] = value
                continue
            t, boxes = ph
            chunks = []
            for i in boxes:
                rec = m.tensors[i]
                offsets = rec.global_offset if rec.global_offset is not None else (0,) * len(rec.shape)
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(rec.shape)))
                storage[MetadataIndex(fqn, offsets)] = ("rec", i)
            props = TensorProperties(dtype=t.dtype, requires_grad=m.tensors[boxes[0]].requires_grad)
            sd_md[fqn] = TensorStorageMetadata(props, t.size(), chunks)
        self.storage = storage
        self.metadata = Metadata(state_dict_metadata=sd_md, planner_data=mappings, storage_data=storage)

    def read(self, reqs: list[ReadItem], planner: LoadPlanner) -> None:
        from ..reader import _read_storages, _tensor_from
        need: set[int] = set()
        wanted: list[tuple[ReadItem, Any]] = []
        for req in reqs:
            key = self.storage.get(MetadataIndex(req.storage_index.fqn, req.storage_index.offset))
            if key is None:
                raise CorruptCheckpointError(f"{self.directory}: no saved item {req.storage_index.fqn!r} "
                                             f"at {req.storage_index.offset}")
            wanted.append((req, key))
            if key[0] == "rec":
                need.add(key[1])
            else:
                need.update(i for _t, boxes in self._inner(self.objects[key[1]]) for i in boxes)
        buffers: list[torch.Tensor | None] = [None] * len(self.m.storages)
        for i in need:
            sid = self.m.tensors[i].storage
            if buffers[sid] is None:
                buffers[sid] = torch.empty(self.m.storages[sid].nbytes, dtype=torch.uint8)
        _read_storages(self.m, self.paths, buffers, self.m.checks, None)
        storages = [b.untyped_storage() if b is not None else None for b in buffers]

        def whole(i: int) -> torch.Tensor:
            t, boxes = self.placeholders_by_index[i]
            if len(boxes) == 1 and tuple(self.m.tensors[boxes[0]].shape) == tuple(t.shape):
                return _tensor_from(self.m.tensors[boxes[0]], storages)  # type: ignore[arg-type]
            out = torch.empty(t.shape, dtype=t.dtype)
            for b in boxes:
                rec = self.m.tensors[b]
                assert rec.global_offset is not None
                out[tuple(slice(o, o + n) for o, n in zip(rec.global_offset, rec.shape, strict=True))].copy_(
                    _tensor_from(rec, storages).detach())  # type: ignore[arg-type]
            return out

        for req, key in wanted:
            if key[0] == "rec":
                _copy_into(req, planner, _tensor_from(self.m.tensors[key[1]], storages).detach())  # type: ignore[arg-type]
            else:
                value = self._materialize(self.objects[key[1]], whole)
                buf = io.BytesIO()
                torch.save(value, buf)
                _load_bytes(req, planner, buf.getvalue())

    @property
    def placeholders_by_index(self) -> dict[int, tuple[torch.Tensor, list[int]]]:
        return {boxes[0]: (t, boxes) for t, boxes in self.placeholders.values()}

    def _inner(self, value: Any) -> list[tuple[torch.Tensor, list[int]]]:
        """The placeholders inside a non-tensor value (a tuple of tensors, say)."""
        out: list[tuple[torch.Tensor, list[int]]] = []
        if isinstance(value, torch.Tensor):
            ph = self.placeholders.get(id(value))
            if ph is not None:
                out.append(ph)
        elif isinstance(value, Mapping):
            for v in value.values():
                out += self._inner(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += self._inner(v)
        return out

    def _materialize(self, value: Any, whole: Callable[[int], torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            ph = self.placeholders.get(id(value))
            return whole(ph[1][0]) if ph is not None else value
        if isinstance(value, Mapping):
            out = copy.copy(value)
            for k, v in value.items():
                out[k] = self._materialize(v, whole)  # type: ignore[index]
            return out
        if isinstance(value, list):
            return [self._materialize(v, whole) for v in value]
        if isinstance(value, tuple):
            values = [self._materialize(v, whole) for v in value]
            return type(value)._make(values) if hasattr(type(value), "_fields") else type(value)(values)  # type: ignore[attr-defined]
        return value
