"""Plan a save: find the storages behind the tensors, cut them into shards, lay out files.

Pure functions of the flattened state dict; nothing here touches shared memory or disk.

- Storages are stored once, whole, like ``torch.save`` does: tied weights and views
  of one storage come back sharing storage. A storage is identified by its StorageImpl
  (see :mod:`zckpt.tree`), never by its address.
- Safetensors entry names come from display paths and are made unique per save.
- Shards are size-balanced across workers: largest piece first onto the least-loaded
  worker (LPT bin packing, within 4/3 of optimal). A storage larger than a fair share
  is cut into page-aligned byte ranges first, so one huge matrix still fans out.
- Within a shard file, entries are ordered by element size, largest first, so each
  entry starts aligned to its element size without padding entries.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, field

import torch

from .format import build_header, dtype_name, safetensors_code, shard_name
from .manifest import PartRecord, StorageRecord, TensorRecord, frozen_path
from .tree import Collector, KeyPath, display_path, encode_path

__all__ = ["StorageInfo", "TensorInfo", "Piece", "ShardPlan", "SavePlan", "plan_save", "plan_records"]

_SPLIT_ALIGN = 4096  # byte ranges of split storages start on page boundaries
# Below this a storage is never split: the parallelism gained is smaller than the cost
# of a less readable file (safetensors readers see "name#partN" entries).
_MIN_SPLIT_BYTES = 16 << 20


@dataclass
class StorageInfo:
    sid: int
    nbytes: int
    dtype: torch.dtype           # element type the entry is labelled with
    name: str                    # display path of the first tensor that uses it
    entry_shape: list[int]       # the tensor's shape when it covers the storage exactly
    device: str                  # where the storage lives ("cpu", "cuda:0")
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class TensorInfo:
    path: KeyPath | None      # typed key path; None for a tensor held inside an object
    sid: int
    dtype: torch.dtype
    shape: list[int]
    stride: list[int]
    storage_offset: int
    is_param: bool
    requires_grad: bool
    conj: bool                   # lazy conjugate / negative bits, kept as torch.save keeps them
    neg: bool

    @property
    def name(self) -> str:
        return display_path(self.path)


@dataclass
class Piece:
    """A byte range of one storage, stored as one safetensors entry."""

    sid: int
    start: int                   # byte offset in the storage
    nbytes: int
    name: str
    code: str                    # safetensors dtype code
    shape: list[int]
    itemsize: int
    shard: int = -1
    file_offset: int = -1        # absolute offset of the bytes in the shard file


@dataclass
class ShardPlan:
    index: int
    name: str
    pieces: list[Piece]
    header: bytes
    nbytes: int                  # whole file

    # Cached: a plan is immutable once made and is reused save after save, and these
    # cost ~1 us per piece to rebuild (2 ms of a 2,000-tensor save's blocked time).
    @functools.cached_property
    def chunks(self) -> list[tuple[int, int]]:
        """Checksum ranges: the header, then every entry."""
        return [(0, len(self.header))] + [(p.file_offset, p.nbytes) for p in self.pieces]

    @functools.cached_property
    def copies(self) -> list[tuple[int, int, int, int]]:
        """The staging program: ``(file_offset, sid, start, nbytes)`` per piece."""
        return [(p.file_offset, p.sid, p.start, p.nbytes) for p in self.pieces]


@dataclass
class SavePlan:
    storages: list[StorageInfo]
    tensors: list[TensorInfo]
    shards: list[ShardPlan]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.storages)

    @functools.cached_property
    def on_device(self) -> bool:
        """Whether any storage is off the CPU (staging then goes through _cuda)."""
        return any(not s.device.startswith("cpu") for s in self.storages)

    @functools.cached_property
    def on_cpu(self) -> list[bool]:
        """Per storage: whether it is in CPU memory (copied with memmove when small)."""
        return [s.device.startswith("cpu") for s in self.storages]

    @functools.cached_property
    def needs_pinning(self) -> bool:
        """Whether any storage is on a CUDA device (the arena is then page-locked)."""
        return any(s.device.startswith("cuda") for s in self.storages)



def collect_storages(collector: Collector) -> tuple[list[StorageInfo], list[TensorInfo]]:
    """Describe the collector's storages and tensors; storages in first-seen order."""
    infos: list[TensorInfo] = []
    for (path, t), sid in zip(collector.tensors, collector.storage_of, strict=False):
        infos.append(TensorInfo(
            path=path, sid=sid, dtype=t.dtype, shape=list(t.shape), stride=list(t.stride()),
            # type() over isinstance(): Parameter's metaclass makes isinstance slow, and
            # check_storable() already refused other tensor subclasses.
            storage_offset=int(t.storage_offset()), is_param=type(t) is torch.nn.Parameter,
            requires_grad=t.requires_grad, conj=t.is_conj(), neg=t.is_neg(),
        ))
    first_name: dict[int, str] = {}
    for info in infos:
        first_name.setdefault(info.sid, info.name)
    storages: list[StorageInfo] = []
    for sid, (st, user) in enumerate(collector.storages):
        nbytes = st.nbytes()
        if user is not None and nbytes % user.dtype.itemsize == 0:
            dtype = user.dtype
            covers = user.storage_offset() == 0 and user.numel() * dtype.itemsize == nbytes and user.is_contiguous()
        else:
            dtype, covers = torch.uint8, False
        shape = list(user.shape) if covers and user is not None else [nbytes // dtype.itemsize]
        storages.append(StorageInfo(sid, nbytes, dtype, first_name.get(sid, f"storage{sid}"), shape,
                                    str(st.device)))
    return storages, infos


def _cut(st: StorageInfo, max_piece: int, min_split: int = _MIN_SPLIT_BYTES) -> list[Piece]:
    itemsize = st.dtype.itemsize
    code = safetensors_code(st.dtype)
    if code is None:  # dtype unknown to safetensors: raw bytes, real dtype in manifest
        code, unit = "U8", 1
    else:
        unit = itemsize
    if st.nbytes <= max(max_piece, min_split):
        shape = st.entry_shape if unit == itemsize else [st.nbytes]
        return [Piece(st.sid, 0, st.nbytes, st.name, code, shape, itemsize)]
    count = math.ceil(st.nbytes / max_piece)
    step = -(-math.ceil(st.nbytes / count) // _SPLIT_ALIGN) * _SPLIT_ALIGN
    pieces = []
    for i, start in enumerate(range(0, st.nbytes, step)):
        n = min(step, st.nbytes - start)
        pieces.append(Piece(st.sid, start, n, f"{st.name}#part{i}", code, [n // unit], itemsize))
    return pieces


def _unique(name: str, sid: int, used: set[str]) -> str:
    """Safetensors entry names must be unique per file; make them unique per save."""
    candidate = name
    while candidate in used:
        candidate = f"{name}~{sid}" if candidate == name else candidate + "~"
    used.add(candidate)
    return candidate


def plan_save(storages: list[StorageInfo], tensors: list[TensorInfo], num_workers: int,
              strategy: str = "balanced", split_large: bool = True, min_split: int = _MIN_SPLIT_BYTES) -> SavePlan:
    """Assign storages (or byte ranges of them) to at most ``num_workers`` shard files.

    A storage over a fair share is cut into byte ranges when it is also over ``min_split``
    (16 MiB: fewer entries; a save in rounds passes a page, to fit a staging budget)."""
    nonempty = [s for s in storages if s.nbytes > 0]
    used: set[str] = {"__metadata__"}  # safetensors' own key: a tensor named so would replace it
    total = sum(s.nbytes for s in nonempty)
    fair = max(1, math.ceil(total / num_workers))
    max_piece = max(fair, _SPLIT_ALIGN) if split_large and num_workers > 1 else max(total, 1)
    pieces: list[Piece] = []
    for st in nonempty:
        st.pieces = _cut(st, max_piece, min_split)
        for p in st.pieces:
            p.name = _unique(p.name, st.sid, used)
        pieces.extend(st.pieces)

    nshards = min(num_workers, len(pieces))
    bins: list[list[Piece]] = [[] for _ in range(nshards)]
    if strategy == "round_robin":
        for i, p in enumerate(pieces):
            bins[i % nshards].append(p)
    else:
        heap = [(0, i) for i in range(nshards)]
        for p in sorted(pieces, key=lambda p: -p.nbytes):
            load, i = heapq.heappop(heap)
            bins[i].append(p)
            heapq.heappush(heap, (load + p.nbytes, i))

    shards = []
    for index, members in enumerate(bins):
        # Stable sort: element size descending keeps every entry self-aligned.
        members.sort(key=lambda p: -p.itemsize)
        entries, offset = [], 0
        for p in members:
            entries.append((p.name, p.code, p.shape, offset, offset + p.nbytes))
            offset += p.nbytes
        meta = {"format": "pt", "producer": "zckpt", "shard": f"{index}/{nshards}"}
        header = build_header(entries, meta)
        for p, (_, _, _, start, _) in zip(members, entries, strict=False):
            p.shard = index
            p.file_offset = len(header) + start
        shards.append(ShardPlan(index, shard_name(index, nshards), members, header, len(header) + offset))
    return SavePlan(storages, tensors, shards)


def plan_records(plan: SavePlan) -> tuple[list[StorageRecord], list[TensorRecord]]:
    """The manifest's storage and tensor records for a plan (no tensor needed), for
    :func:`zckpt.manifest.build_manifest`."""
    storages = [StorageRecord(
        nbytes=s.nbytes, device=s.device,
        parts=tuple(PartRecord(file=p.shard, offset=p.file_offset, start=p.start, nbytes=p.nbytes, entry=p.name)
                    for p in s.pieces),
    ) for s in plan.storages]
    tensors = [TensorRecord(
        path=frozen_path(encode_path(t.path)) if t.path is not None else None, name=t.name,
        storage=t.sid, dtype=dtype_name(t.dtype), shape=tuple(t.shape), stride=tuple(t.stride),
        offset=t.storage_offset, param=t.is_param, requires_grad=t.requires_grad, conj=t.conj, neg=t.neg,
    ) for t in plan.tensors]
    return storages, tensors
