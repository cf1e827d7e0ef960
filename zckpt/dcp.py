"""A storage back end for ``torch.distributed.checkpoint`` (DCP): zckpt's pool under DCP's API.

::

    import torch.distributed.checkpoint as dcp
    from zckpt.dcp import ZckptWriter, ZckptReader

    writer = ZckptWriter(pool=pool)          # or ZckptWriter(config=zckpt.PoolConfig(...))
    resp = dcp.async_save(sd, checkpoint_id=f"/ckpt/step-{step}", storage_writer=writer)
    ...                                      # train on: the tensors were copied once
    resp.result()                            # committed (or raises)
    dcp.load(sd, storage_reader=ZckptReader(f"/ckpt/step-{step}"))

How a save runs, and who is blocked:

1. ``dcp.async_save`` calls :meth:`ZckptWriter.stage` on the trainer's thread: every
   tensor (a DTensor's local shard) is copied once into the pool's staging arena
   (shared memory; page-locked for CUDA tensors) and a state dict of views of that
   memory is returned. This copy is all the trainer waits for. (``dcp.save``, the
   blocking call, skips ``stage``: :meth:`ZckptWriter.write_data` copies then.)
2. DCP plans on its thread, as with any storage writer: its planner decides which rank
   writes which item (replicated tensors once).
3. :meth:`ZckptWriter.write_data` hands each rank's items to the pool's worker
   processes as ranges of the arena: each worker writes one file of them, with an xxh3
   checksum per item, and fsyncs it. Nothing is copied again. Non-tensor items (DCP
   pickles them with ``torch.save``) are a few bytes, written by DCP's thread.
4. :meth:`ZckptWriter.finish` (the coordinator rank) writes DCP's ``.metadata`` and
   zckpt's ``manifest.json`` (item locations and checksums, DCP's metadata as JSON) into
   the temporary directory every rank wrote into, fsyncs it, renames it to the
   checkpoint's path and fsyncs the parent: the checkpoint appears whole or not at all.
   A failed save leaves nothing at the path.

Layout of a checkpoint (one directory)::

    __<rank>_<k>.distcp     the items rank <rank>'s k-th worker wrote (raw bytes)
    __<rank>_<n>.distcp     that rank's non-tensor items, if any (DCP's torch.save bytes)
    .metadata               DCP's Metadata, pickled, as DCP's FileSystemWriter writes it
    manifest.json           zckpt's manifest (format "zckpt-dcp", see zckpt.manifest)

DCP's own ``FileSystemReader`` reads the ``.metadata`` (``read_metadata()`` shows every
key, shape and dtype) but refuses the data: tensors are stored as raw bytes, not as
``torch.save`` records, and every item names the storage extension
``zckpt.raw-bytes``, which DCP does not know, so ``dcp.load(..., storage_reader=
FileSystemReader(path))`` raises ``ValueError: Unknown extension`` rather than misread
them. Load with :class:`ZckptReader`, which also reads checkpoints written by
:class:`zckpt.CheckpointPool` and :mod:`zckpt.distributed`: DCP reshards all of them
(any world size, any placement).

Trust: :class:`ZckptReader` reads ``manifest.json`` (JSON, sealed with a checksum: that
proves the bytes are the ones written, not that their writer was honest) and never
unpickles ``.metadata``. A non-tensor item goes to DCP's load planner, which unpickles it
with ``torch.load(weights_only=False)``; so the reader first checks that torch's
restricted unpickler accepts it (``ZckptReader(path, weights_only=False)`` skips that,
for checkpoints you trust). Checkpoints written by the pool load their non-tensor values
with ``weights_only=True``.

Several ranks with two saves in flight (``staging_buffers=2``): DCP runs each save's
collectives on its own thread, so two saves at once on one process group can deadlock
(DCP's rule, not zckpt's): give ``dcp.async_save`` a separate ``process_group`` per save in
flight, or call ``result()`` before the next one. Saves commit in the order they were
called either way.

Limits: DCP's process executor (``AsyncCheckpointerType.PROCESS``) would pickle the
writer into another process: refused with ``TypeError`` (use the default thread
executor: the writing happens in zckpt's workers anyway). ``ShardedTensor`` is not
staged (use DTensor). ``planner_data`` must be JSON data (the default planner's is).
DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) and
``use_collectives=False`` across ranks are refused. The pool's ``mirrors`` do not apply.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import logging
import math
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future as PyFuture
from dataclasses import dataclass
from typing import Any, Union, cast

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import protocol as P
from .arena import Arena, BufferSet
from .commit import (
    apply_retention,
    commit_dir,
    discard,
    fsync_created,
    make_dirs,
    sweep_temp_dirs,
    temp_dir_for,
)
from .config import PoolConfig
from .errors import CorruptCheckpointError, ZckptError
from .format import dtype_from_name, dtype_name
from .manifest import (
    MULTI_RANK_VERSION,
    DcpFileRecord,
    DcpItemRecord,
    DcpManifest,
    DcpTensorEntry,
    Manifest,
    build_dcp_manifest,
    path_json,
    read_any_manifest,
)
from .pool import CheckpointPool
from .supervisor import ShardJob

__all__ = ["ZckptWriter", "ZckptReader", "RAW_BYTES_EXTENSION"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: The storage extension every item of a zckpt DCP checkpoint names in ``.metadata``
#: (DCP's ``_StorageInfo.transform_descriptors``): DCP's FileSystemReader does not know
#: it and refuses the data instead of reading raw bytes as a torch.save record.
RAW_BYTES_EXTENSION = "zckpt.raw-bytes/1"
_ALIGN = 64          # each staged tensor starts at a multiple of this (any dtype's alignment)
_GAP = _ALIGN - 1    # padding between two staged tensors: written along, so they stay one run


# --- records that travel through DCP (its plans and results are pickled between ranks) ---------
@dataclass(frozen=True)
class _PlanData:
    """The coordinator's word to every rank (``SavePlan.storage_data``): where to write."""

    tmp_dir: str


@dataclass(frozen=True)
class ItemLocation:
    """Where one item went (``WriteResult.storage_data`` of a zckpt save)."""

    file: str
    rank: int
    at: int
    nbytes: int
    digest: str | None


# --- staging -------------------------------------------------------------------------------------
class _Staged:
    """One arena buffer set holding one save's staged tensors, until its items are written.

    Released (once) when that save's ``write_data`` is done with it; or, when the save
    never gets there (planning failed on some rank, DCP's process executor, an error
    between ``stage`` and ``write_data``), when the thread that claimed it in ``reset``
    has ended, or when the staged tensors are garbage (see ``ZckptWriter._sweep``).
    """

    def __init__(self, arena: Arena, bufset: BufferSet, nbytes: int) -> None:
        self.arena, self.bufset, self.nbytes = arena, bufset, nbytes
        self.segment = bufset.segments[0]
        self.base = self.segment.tensor.data_ptr()
        self._lock = threading.Lock()
        self.released = False
        self.ticket = -1                                  # the save's place in call order
        self.stage_thread: threading.Thread | None = None
        self.claimed_by: threading.Thread | None = None   # the thread running its DCP save

    def locate(self, t: torch.Tensor) -> int | None:
        """The byte offset of ``t``'s data in this set, if ``t`` is contiguous in it."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        ptr = t.data_ptr()
        n = t.numel() * t.element_size()
        if self.base <= ptr and ptr + n <= self.base + self.nbytes:
            return ptr - self.base
        return None

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        self.arena.release(self.bufset)


def _stage_tensors(tensors: list[torch.Tensor], arena: Arena, acquire: Callable[[int, bool], BufferSet]
                   ) -> tuple[_Staged | None, list[torch.Tensor]]:
    """Copy ``tensors`` into one arena buffer set; return it and the contiguous copies.

    Blocks for the copy (device-to-host copies are waited for) and, before it, for a free
    buffer set (``acquire(nbytes, pin)``, which bounds the wait).
    """
    offsets, total = [], 0
    for t in tensors:
        if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type == "meta":
            raise TypeError(f"ZckptWriter cannot stage a {t.layout} {'quantized ' if t.is_quantized else ''}"
                            f"tensor on {t.device} (dense strided tensors only)")
        offsets.append(total)
        n = t.numel() * t.element_size()
        total += -(-n // _ALIGN) * _ALIGN
    if total == 0:
        return None, [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    on_device = any(t.device.type != "cpu" for t in tensors)
    bufset = acquire(total, on_device)
    staged = _Staged(arena, bufset, total)
    try:
        out = []
        device_stager = None
        if on_device:
            from ._cuda import DeviceStager
            device_stager = DeviceStager()
        flat = staged.segment.tensor
        try:
            with torch.no_grad():
                for t, off in zip(tensors, offsets, strict=True):
                    n = t.numel() * t.element_size()
                    if n == 0:
                        out.append(torch.empty(t.shape, dtype=t.dtype))
                        continue
                    dst = flat[off: off + n].view(t.dtype).view(t.shape)
                    src = t.detach()
                    if src.device.type == "cpu":
                        dst.copy_(src)
                    else:
                        assert device_stager is not None
                        device_stager.copy(dst, src)
                    out.append(dst)
        finally:   # no copy may still be landing in a buffer set that is released
            if device_stager is not None:
                device_stager.wait()
    except BaseException:
        staged.release()
        raise
    return staged, out


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t._local_tensor if isinstance(t, DTensor) else t


def _collect(obj: Any, found: dict[int, torch.Tensor]) -> None:
    """Every distinct tensor (a DTensor's local shard) in a state dict, by identity."""
    if isinstance(obj, torch.Tensor):
        if type(obj).__name__ == "ShardedTensor":
            raise TypeError("ZckptWriter does not stage ShardedTensor: use DTensor (FSDP2, tensor parallel)")
        local = _local(obj)
        found.setdefault(id(local), local)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _collect(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, found)


class _StagedStateDict(dict):
    """The state dict :meth:`ZckptWriter.stage` returns: views of shared memory that must
    not travel to another process (DCP's process executor would pickle it)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a state dict staged by ZckptWriter cannot be pickled into another process: use DCP's "
                        "default thread executor (AsyncCheckpointerType.THREAD); zckpt writes in its own "
                        "processes anyway")


def _rebuild_staged(obj: Any, copies: dict[int, torch.Tensor], in_leaf: bool = False) -> Any:
    """``obj`` with every tensor replaced by its staged copy (DTensors keep their spec);
    other values deep-copied, so the trainer may change them once staging returns.

    ``in_leaf``: inside a tuple, which DCP saves whole with ``torch.save``: a view there
    would drag the whole arena segment into the file, so those tensors are cloned.
    """
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        local = copies[id(obj._local_tensor)]
        return DTensor(local.clone() if in_leaf else local, obj._spec, requires_grad=obj.requires_grad)
    if isinstance(obj, torch.Tensor):
        t = copies[id(obj)].clone() if in_leaf else copies[id(obj)]
        return t.requires_grad_(obj.requires_grad) if obj.requires_grad and t.is_floating_point() else t
    if isinstance(obj, Mapping):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _rebuild_staged(v, copies, in_leaf)  # type: ignore[index]
        return out
    if isinstance(obj, list):
        return [_rebuild_staged(v, copies, in_leaf) for v in obj]
    if isinstance(obj, tuple):
        values = [_rebuild_staged(v, copies, True) for v in obj]
        return type(obj)._make(values) if hasattr(type(obj), "_fields") else type(obj)(values)  # type: ignore[attr-defined]
    return copy.deepcopy(obj)


class _Keeper:
    """Referenced by every tensor of one staging: dies with the last of them."""


def _abandoned(writer_ref: Callable[[], ZckptWriter | None], ticket: int, staged: _Staged) -> None:
    """The staged tensors of a save are garbage: that save is over, whatever became of it."""
    writer = writer_ref()
    if writer is not None:
        writer._end(ticket, staged)
    else:
        staged.release()


# --- the writer ----------------------------------------------------------------------------------
class _SaveContext:
    """What one save (one thread of DCP's) needs between reset() and finish()."""

    def __init__(self, path: str, ticket: int, staged: _Staged | None) -> None:
        self.path = path
        self.ticket = ticket                # this save's place in call order (commits keep it)
        self.staged = staged                # the buffer set stage() filled for it, if any
        self.rank = 0
        self.is_coordinator = True
        self.tmp_dir: str | None = None
        self.created: list[str] = []


class ZckptWriter(StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` that is also its ``AsyncStager``: saves through zckpt's pool.

    Args:
        path: The checkpoint directory (DCP's ``checkpoint_id``; the ``checkpoint_id``
            given to ``dcp.save``/``dcp.async_save`` overrides it). Must not exist yet.
        pool: A :class:`zckpt.CheckpointPool` to write with (not closed by this writer).
        config: Or the configuration of a pool this writer starts on first use and
            closes in :meth:`close`. ``num_workers`` files per rank are written in
            parallel; ``fsync``, ``checksum``, ``keep_last``, ``staging_buffers``,
            ``buffer_wait_timeout_s``, ``save_timeout_s`` and ``shard_retries`` apply as
            for the pool; ``mirrors`` do not (a DCP checkpoint is written under its path
            only).

    One writer serves every save of a rank; with ``staging_buffers=2`` the next save
    stages while the previous one is written. Use one writer per rank (each rank's pool
    is its own). Every rank must see the same file system at ``path`` (as for DCP's
    ``FileSystemWriter``).

    Blocking: :meth:`stage` blocks for one copy of the rank's tensors (and, while every
    staging buffer is still being written, at most ``buffer_wait_timeout_s`` for one).
    :meth:`write_data` and :meth:`finish` run on DCP's thread (``async_save``) or the
    caller's (``save``) and block until the files are durable and committed.

    Raises (through DCP, which wraps them in ``CheckpointException``):
        FileExistsError: a checkpoint or other file already exists at the path.
        TimeoutError: no staging buffer came free, or the workers did not finish in time.
        zckpt.WorkerDiedError, zckpt.WorkerHungError: a worker failed the save (its
            shard is retried first, see ``PoolConfig.shard_retries``).
        TypeError: an unsupported tensor (sparse, quantized, ShardedTensor), planner data
            that is not JSON, or DCP's process executor.
    """

    _synchronize_after_execute = False   # stage() returns staged: nothing to wait for later

    def __init__(self, path: PathLike | None = None, pool: CheckpointPool | None = None,
                 config: PoolConfig | None = None) -> None:
        super().__init__()
        if pool is not None and config is not None:
            raise ValueError("ZckptWriter takes a pool or a config, not both")
        if pool is not None and not isinstance(pool, CheckpointPool):
            raise TypeError(f"pool must be a zckpt.CheckpointPool, got {type(pool).__name__}")
        if config is not None and not isinstance(config, PoolConfig):
            raise TypeError(f"config must be a zckpt.PoolConfig, got {type(config).__name__}")
        self.path = os.fspath(path) if path is not None else None
        self._pool = pool
        self._owns_pool = pool is None
        self._config = config
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)   # a save ended (see _wait_for_earlier)
        self._staged: list[_Staged] = []          # staged by stage(), not yet written
        self._local = threading.local()           # this thread's _SaveContext
        self._leftovers: dict[str, threading.Thread] = {}   # temp dirs made, not yet committed
        self._next_ticket = 0
        # Saves in flight: ticket -> the thread running its DCP save (None: staged, its
        # save not started yet). A commit waits for the earlier ones, so that commit
        # records (latest(), keep_last) follow the order of the calls.
        self._inflight: dict[int, threading.Thread | None] = {}
        self._swept: set[str] = set()
        self._closed = False

    def __reduce__(self) -> Any:
        raise TypeError("a ZckptWriter cannot be pickled (it holds a pool of worker processes): use DCP's default "
                        "thread executor (AsyncCheckpointerType.THREAD), not the process one")

    # --- the pool ------------------------------------------------------------------------
    @property
    def pool(self) -> CheckpointPool:
        """The pool this writer writes with (started on first use when it owns it)."""
        with self._lock:
            if self._closed:
                raise ZckptError("this ZckptWriter is closed")
            if self._pool is None:
                self._pool = CheckpointPool(config=self._config)
                if self._pool.config.mirrors:
                    logger.warning("ZckptWriter writes DCP checkpoints under their path only: the pool's "
                                   "mirrors %s apply to its own saves, not to these", self._pool.config.mirrors)
            return self._pool

    def close(self) -> None:
        """Release staging buffers, remove temp dirs of failed saves, and close the pool
        if this writer started it (waiting for nothing: call after the last save's
        ``result()``). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            staged, self._staged = self._staged, []
            leftovers, self._leftovers = dict(self._leftovers), {}
            pool = self._pool if self._owns_pool else None
        for st in staged:
            st.release()
        for tmp in leftovers:
            discard(tmp)
        if pool is not None:
            pool.close()

    def __enter__(self) -> ZckptWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- AsyncStager ------------------------------------------------------------------------
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy ``state_dict``'s tensors into shared memory; return a state dict of those copies.

        The trainer may change its tensors (and other values) as soon as this returns.
        Blocks for the copy; see the class docstring.
        """
        pool = self.pool
        engine = pool._engine
        self._sweep(new_save=True)
        with engine.entered("ZckptWriter.stage"):
            engine.check_open()
            found: dict[int, torch.Tensor] = {}
            _collect(state_dict, found)
            staged, copies = _stage_tensors(list(found.values()), engine.arena, self._acquirer(pool))
        if staged is None:   # no tensor bytes: the save takes its place in reset()
            return _StagedStateDict(_rebuild_staged(state_dict, dict(zip(found, copies, strict=True))))
        with self._lock:
            ticket = self._new_ticket(None)
            staged.ticket, staged.stage_thread = ticket, threading.current_thread()
            self._staged.append(staged)
        try:
            out = _StagedStateDict(_rebuild_staged(state_dict, dict(zip(found, copies, strict=True))))
        except BaseException:
            self._end(ticket, staged)
            raise
        # When every staged tensor is garbage, the save that was to write them is over (or
        # never started: DCP's process executor, an error before its thread ran): the
        # buffer set goes back (see _Staged).
        keeper = _Keeper()
        for c in copies:
            c._zckpt_keeper = keeper  # type: ignore[attr-defined]
        weakref.finalize(keeper, _abandoned, weakref.ref(self), ticket, staged)
        return out

    # --- bookkeeping of saves in flight ----------------------------------------------------
    def _new_ticket(self, thread: threading.Thread | None) -> int:
        """(Lock held.) A place in call order for a new save."""
        ticket = self._next_ticket
        self._next_ticket += 1
        self._inflight[ticket] = thread
        return ticket

    def _end(self, ticket: int, staged: _Staged | None) -> None:
        """A save is over (committed, failed or abandoned): free its buffers, let later commits go."""
        if staged is not None:
            staged.release()
        with self._lock:
            if staged is not None and staged in self._staged:
                self._staged.remove(staged)
            self._inflight.pop(ticket, None)
            self._changed.notify_all()

    def _sweep(self, new_save: bool) -> None:
        """End the saves whose DCP thread has ended without finishing them (a rank failed
        in planning, another rank's write failed, ...): DCP tells a storage writer none of
        this. ``new_save``: the calling thread starts a new save, so any save it ran before
        is over too (``dcp.save`` on the trainer's thread)."""
        me = threading.current_thread()
        with self._lock:
            over = [t for t, th in self._inflight.items()
                    if th is not None and (not th.is_alive() or (new_save and th is me))]
            sets = {s.ticket: s for s in self._staged if s.ticket in over}
        for t in over:
            self._end(t, sets.get(t))

    def _acquirer(self, pool: CheckpointPool) -> Callable[[int, bool], BufferSet]:
        """``acquire(nbytes, pin)`` that, while it waits for a buffer set, ends the saves that
        are over (see _sweep) and collects garbage (a dead save's staged tensors may sit in
        a reference cycle of its exception's traceback). Bounded by buffer_wait_timeout_s."""
        arena, timeout_s = pool._engine.arena, pool.config.buffer_wait_timeout_s

        def acquire(nbytes: int, pin: bool) -> BufferSet:
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                try:
                    return arena.acquire([nbytes], min(left, 0.5) if left > 0 else 0.0, pin=pin)
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise
                self._sweep(new_save=False)
                gc.collect()
        return acquire

    def synchronize_staging(self) -> None:
        """Nothing to wait for: :meth:`stage` returns once the copy is done."""

    # --- StorageWriter ----------------------------------------------------------------------
    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        path = os.fspath(checkpoint_id) if checkpoint_id is not None else self.path
        if path is None:
            raise ValueError("ZckptWriter has no path: pass ZckptWriter(path) or dcp.save(..., checkpoint_id=path)")
        self._sweep(new_save=True)
        me = threading.current_thread()
        with self._lock:
            if self._closed:
                raise ZckptError("this ZckptWriter is closed (close() it after the last save's result())")
            # dcp.async_save stages on the trainer's thread, then runs the save on a thread
            # of its own: that thread takes the oldest staging nobody has taken. dcp.save
            # runs on the trainer's thread and stages in write_data.
            staged = next((st for st in self._staged if st.claimed_by is None and st.stage_thread is not me), None)
            if staged is not None:
                staged.claimed_by = me
                ticket = staged.ticket
                self._inflight[ticket] = me
            else:
                ticket = self._new_ticket(me)
        self._local.ctx = _SaveContext(os.path.abspath(path), ticket, staged)

    def _ctx(self) -> _SaveContext:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            raise RuntimeError("ZckptWriter: reset() was not called on this thread (use it through dcp.save)")
        return ctx

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike)) and "://" not in os.fspath(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._ctx().path)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        ctx = self._ctx()
        ctx.is_coordinator = is_coordinator
        ctx.rank = int(kwargs.get("rank", 0) or 0)
        if kwargs.get("use_collectives") is False and _world_size() > 1:
            # Each rank would plan and commit alone: half a checkpoint at the path.
            raise ValueError("ZckptWriter needs DCP's collectives across ranks (use_collectives=True): one "
                             "commit covers every rank's files")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator makes the temp directory every rank writes into."""
        ctx = self._ctx()
        if self._closed:
            raise ZckptError("this ZckptWriter is closed (close() it after the last save's result())")
        final = ctx.path
        if os.path.lexists(final):
            raise FileExistsError(f"{final}: a checkpoint (or another file) already exists there; "
                                  "zckpt never overwrites one (pick a new checkpoint_id)")
        root = os.path.dirname(final)
        self._drop_leftovers()
        ctx.created = make_dirs(root)
        if root not in self._swept:
            sweep_temp_dirs(root)
            self._swept.add(root)
        ctx.tmp_dir = temp_dir_for(final)
        os.mkdir(ctx.tmp_dir)
        with self._lock:
            self._leftovers[ctx.tmp_dir] = threading.current_thread()
        return [dataclasses.replace(p, storage_data=_PlanData(ctx.tmp_dir)) for p in plans]

    def _drop_leftovers(self) -> None:
        """Remove temp dirs of this writer's saves that ended without a commit (DCP does
        not tell a storage writer that another rank failed): those whose save thread is
        gone, or is this one (a new save on the thread of a finished one)."""
        me = threading.current_thread()
        with self._lock:
            done = [d for d, t in self._leftovers.items() if t is me or not t.is_alive()]
            for d in done:
                del self._leftovers[d]
        for d in done:
            logger.info("removing %s: its save was not committed", d)
            discard(d)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Have the pool's workers write this rank's items; block until they are durable."""
        ctx = self._ctx()
        done = False
        try:
            results = self._write_data(ctx, plan, planner)
            done = True
        finally:
            if ctx.staged is not None:   # the workers are done with it, whatever happened
                ctx.staged.release()
            if not done or not ctx.is_coordinator:   # else the save ends in finish()
                self._end(ctx.ticket, ctx.staged)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_data(self, ctx: _SaveContext, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        if not isinstance(plan.storage_data, _PlanData):
            raise RuntimeError("ZckptWriter.write_data: the plan does not come from ZckptWriter.prepare_global_plan")
        tmp_dir = plan.storage_data.tmp_dir
        if os.path.dirname(tmp_dir) != os.path.dirname(ctx.path) or \
                not os.path.basename(tmp_dir).startswith(os.path.basename(ctx.path) + ".tmp-"):
            raise RuntimeError(f"ZckptWriter: this save of {ctx.path} was handed the plan of another save "
                               f"({tmp_dir}): DCP's plan caching (enable_plan_caching) is not supported")
        pool = self.pool
        tensor_items: list[tuple[WriteItem, torch.Tensor]] = []
        byte_items: list[tuple[WriteItem, bytes]] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                byte_items.append((item, cast(io.BytesIO, data).getvalue()))
            else:
                t = cast(torch.Tensor, data).detach()
                if t.layout != torch.strided or t.is_quantized or t.is_nested:
                    raise TypeError(f"ZckptWriter cannot save {item.index.fqn!r}: a {t.layout} "
                                    f"{'quantized ' if t.is_quantized else ''}tensor (dense strided tensors only)")
                tensor_items.append((item, t))
        located, extra = self._locate(ctx.staged, tensor_items)
        own: _Staged | None = None
        try:
            if extra and ctx.staged is None:
                # dcp.save (no stage() call): stage now, a tensor saved under several names once.
                distinct: dict[tuple[Any, ...], int] = {}
                firsts: list[torch.Tensor] = []
                for _, t in extra:
                    if _memory_key(t) not in distinct:
                        distinct[_memory_key(t)] = len(firsts)
                        firsts.append(t)
                own, copies = _stage_tensors(firsts, pool._engine.arena, self._acquirer(pool))
                for item, t in extra:
                    c = copies[distinct[_memory_key(t)]]
                    if own is not None and c.numel() > 0:
                        located.append((item, own, own.locate(c)))
                    else:
                        byte_items.append((item, b""))
            else:
                # A stage()d save whose planner made new tensors: rare and small; written as bytes here.
                byte_items += [(item, _tensor_bytes(t)) for item, t in extra]
            return self._write(pool, ctx.rank, tmp_dir, located, byte_items)
        finally:
            if own is not None:
                own.release()

    @staticmethod
    def _locate(staged: _Staged | None, items: list[tuple[WriteItem, torch.Tensor]]
                ) -> tuple[list[tuple[WriteItem, _Staged, int | None]], list[tuple[WriteItem, torch.Tensor]]]:
        """Split the tensor items into those staged in this save's buffer set and the rest."""
        located: list[tuple[WriteItem, _Staged, int | None]] = []
        extra: list[tuple[WriteItem, torch.Tensor]] = []
        for item, t in items:
            off = staged.locate(t) if staged is not None and t.numel() > 0 else None
            if staged is not None and off is not None:
                located.append((item, staged, off))
            else:
                extra.append((item, t))
        return located, extra

    def _write(self, pool: CheckpointPool, rank: int, tmp_dir: str,
               located: list[tuple[WriteItem, _Staged, int | None]],
               byte_items: list[tuple[WriteItem, bytes]]) -> list[WriteResult]:
        """Workers write the located items (one file per worker, gathered from the arena);
        this thread writes the byte items. Blocks until all are durable."""
        cfg = pool.config
        engine = pool._engine
        # The same bytes (a tensor saved under two names) are written once.
        pieces: dict[tuple[int, int, int], list[WriteItem]] = {}
        sets: dict[int, _Staged] = {}
        for item, s, off in located:
            assert off is not None
            n = _item_nbytes(item)
            pieces.setdefault((id(s), off, n), []).append(item)
            sets[id(s)] = s
        order = sorted(pieces)
        files = _split_files(order, cfg.num_workers)
        results: list[WriteResult] = []
        futures: list[PyFuture] = []
        deadline = time.monotonic() + cfg.save_timeout_s
        live = engine.arena.live_keys()
        written: list[tuple[str, list[tuple[int, int, int]], list[int]]] = []
        for k, group in enumerate(files):
            name = f"__{rank}_{k}.distcp"
            runs, file_offsets = _runs(group)
            chunks = [(fo, key[2]) for fo, key in zip(file_offsets, group, strict=True)]
            seg = sets[group[0][0]].segment
            task = P.FileTask(name, seg.ref(), 0, sum(n for _, n in runs), chunks, runs=runs)
            msg = P.WriteFiles(job_id=engine.new_job_id(), dirs=[tmp_dir], files=[task], live_keys=live)
            fut: PyFuture = PyFuture()
            futures.append(fut)
            engine.submit(ShardJob(slot=k % cfg.num_workers, message=msg, on_done=_settle_into(fut),
                                   deadline=deadline, describe=f"{name} of {tmp_dir}", retries=cfg.shard_retries))
            written.append((name, group, file_offsets))
        try:
            direct = self._write_direct(rank, tmp_dir, len(files), byte_items, cfg)
        finally:
            errors = _wait_all(futures, deadline)   # the arena is read until every worker is done
        if errors:
            raise errors[0]
        for (name, group, file_offsets), fut in zip(written, futures, strict=True):
            frs = fut.result().files
            digests = frs[0].checksums if frs and cfg.checksum != "none" else [None] * len(group)
            for key, fo, digest in zip(group, file_offsets, digests, strict=True):
                for item in pieces[key]:
                    results.append(WriteResult(index=item.index, size_in_bytes=key[2],
                                               storage_data=ItemLocation(name, rank, fo, key[2], digest)))
        results += direct
        return results

    def _write_direct(self, rank: int, tmp_dir: str, index: int, items: list[tuple[WriteItem, bytes]],
                      cfg: PoolConfig) -> list[WriteResult]:
        """Non-tensor items (and empty tensors): one small file written by this thread."""
        if not items:
            return []
        import xxhash

        from ._sync import fsync_fd
        name = f"__{rank}_{index}.distcp"
        path = os.path.join(tmp_dir, name)
        out = []
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pos = 0
            for item, data in items:
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, pos + len(data) - len(view)):]
                digest = xxhash.xxh3_64_hexdigest(data) if cfg.checksum != "none" else None
                out.append(WriteResult(index=item.index, size_in_bytes=len(data),
                                       storage_data=ItemLocation(name, rank, pos, len(data), digest)))
                pos += len(data)
            if cfg.fsync:
                fsync_fd(fd, path, data_only=True)
        finally:
            os.close(fd)
        return out

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator commits: ``.metadata`` and ``manifest.json``, fsync, rename;
        after the saves called before this one have committed or failed."""
        ctx = self._ctx()
        try:
            self._wait_for_earlier(ctx.ticket)
            self._commit(ctx, metadata, results)
        finally:
            self._end(ctx.ticket, ctx.staged)

    def _wait_for_earlier(self, ticket: int) -> None:
        """Block until no save called before this one is in flight (at most save_timeout_s):
        two saves in flight (staging_buffers=2) commit in the order they were called, so
        latest() and keep_last see them in that order."""
        deadline = time.monotonic() + self.pool.config.save_timeout_s
        while True:
            with self._lock:
                earlier = [t for t in self._inflight if t < ticket]
                if not earlier:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the saves called before this one ({len(earlier)}) did not end within "
                                       "save_timeout_s: this one is not committed behind their back")
                self._changed.wait(min(left, 0.5))
            self._sweep(new_save=False)

    def _commit(self, ctx: _SaveContext, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert ctx.tmp_dir is not None, "finish() on a rank that did not plan the save"
        pool = self.pool
        cfg = pool.config
        files: dict[tuple[int, str], int] = {}
        items: list[DcpItemRecord] = []
        sizes: dict[int, int] = {}
        for wr in (w for rank_results in results for w in rank_results):
            loc = wr.storage_data
            if not isinstance(loc, ItemLocation):
                raise TypeError(f"ZckptWriter.finish: item {wr.index} was not written by a ZckptWriter")
            fi = files.setdefault((loc.rank, loc.file), len(files))
            sizes[fi] = max(sizes.get(fi, 0), loc.at + loc.nbytes)
            offset = tuple(wr.index.offset) if wr.index.offset is not None else None
            items.append(DcpItemRecord(wr.index.fqn, offset, fi, loc.at, loc.nbytes, loc.digest))
        file_records = [DcpFileRecord(name, sizes.get(fi, 0), rank) for (rank, name), fi in files.items()]
        for f in file_records:
            got = os.stat(os.path.join(ctx.tmp_dir, f.name)).st_size
            if got != f.nbytes:
                raise CorruptCheckpointError(f"{f.name} of {ctx.tmp_dir}: {got} bytes, its items end at {f.nbytes}")
        entries = {fqn: _entry_json(md) for fqn, md in metadata.state_dict_metadata.items()}
        body = build_dcp_manifest(checksum=cfg.checksum, torch_version=str(torch.__version__), files=file_records,
                                  items=items, entries=entries, planner_data=metadata.planner_data,
                                  created_unix=time.time())
        _write_dcp_metadata(ctx.tmp_dir, metadata, results, cfg.fsync)
        if cfg.fsync:
            fsync_created(ctx.created)
        commit_dir(ctx.tmp_dir, ctx.path, body, fsync=cfg.fsync)
        with self._lock:
            self._leftovers.pop(ctx.tmp_dir, None)
        logger.info("committed DCP checkpoint %s (%d items, %d files)", ctx.path, len(items), len(file_records))
        if cfg.keep_last is not None:
            try:
                apply_retention(os.path.dirname(ctx.path), cfg.keep_last, protect=ctx.path)
            except OSError as exc:   # housekeeping: the save is committed
                logger.warning("retention under %s failed: %s", os.path.dirname(ctx.path), exc)


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _memory_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that view the same elements the same way."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _item_nbytes(item: WriteItem) -> int:
    assert item.tensor_data is not None
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def _tensor_bytes(t: torch.Tensor) -> bytes:
    from .reader import _writable_view
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    with _writable_view(flat) as view:
        return view.tobytes()


def _split_files(pieces: list[tuple[int, int, int]], workers: int) -> list[list[tuple[int, int, int]]]:
    """Cut the pieces (set id, offset, nbytes; sorted) into at most ``workers`` files of
    about equal bytes, each a contiguous stretch of one buffer set (so that it is few runs)."""
    if not pieces:
        return []
    by_set: dict[int, list[tuple[int, int, int]]] = {}
    for p in pieces:
        by_set.setdefault(p[0], []).append(p)
    total = sum(p[2] for p in pieces)
    target = max(1, -(-total // workers))
    files: list[list[tuple[int, int, int]]] = []
    for group in by_set.values():
        cur: list[tuple[int, int, int]] = []
        acc = 0
        for p in group:
            cur.append(p)
            acc += p[2]
            if acc >= target:
                files.append(cur)
                cur, acc = [], 0
        if cur:
            files.append(cur)
    return files


def _runs(group: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """Merge the pieces of a file into runs of the segment (the padding between neighbours
    goes along, so a stretch of staged tensors is one write); each piece's file offset."""
    runs: list[list[int]] = []
    file_offsets = []
    pos = 0
    for _sid, off, n in group:
        if runs and 0 <= off - (runs[-1][0] + runs[-1][1]) <= _GAP:
            gap = off - (runs[-1][0] + runs[-1][1])
            file_offsets.append(pos + gap)
            runs[-1][1] += gap + n
            pos += gap + n
        else:
            file_offsets.append(pos)
            runs.append([off, n])
            pos += n
    return [(o, n) for o, n in runs], file_offsets


def _settle_into(fut: PyFuture) -> Callable[[P.JobResult | None, BaseException | None], None]:
    def done(result: P.JobResult | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    return done


def _wait_all(futures: list[PyFuture], deadline: float) -> list[BaseException]:
    errors: list[BaseException] = []
    for fut in futures:
        try:
            fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            errors.append(TimeoutError(f"a worker did not finish writing in time (save_timeout_s): {exc}"))
        except Exception as exc:  # noqa: BLE001 - the worker's error, re-raised by the caller
            errors.append(exc)
    return errors


def _entry_json(md: Any) -> DcpTensorEntry | None:
    if isinstance(md, BytesStorageMetadata):
        return None
    if not isinstance(md, TensorStorageMetadata):
        raise TypeError(f"ZckptWriter: unknown DCP storage metadata {type(md).__name__}")
    return DcpTensorEntry(dtype_name(md.properties.dtype), tuple(md.size), bool(md.properties.requires_grad),
                          tuple((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))


def _write_dcp_metadata(tmp_dir: str, metadata: Metadata, results: list[list[WriteResult]], fsync: bool) -> None:
    """DCP's ``.metadata``, as its FileSystemWriter pickles it, with each item's location in
    DCP's own record naming zckpt's raw-bytes extension (see the module docstring)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from ._sync import write_new_file
    storage = {}
    for wr in (w for rank_results in results for w in rank_results):
        loc = wr.storage_data
        storage[wr.index] = _StorageInfo(loc.file, loc.at, loc.nbytes, transform_descriptors=[RAW_BYTES_EXTENSION])
    md = dataclasses.replace(metadata, storage_data=storage)
    write_new_file(os.path.join(tmp_dir, ".metadata"), pickle.dumps(md), fsync=fsync)


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
        from .reader import _read_exact, _writable_view
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

        from .reader import _check_files, _check_views, _rebuild
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
        from .reader import _read_storages, _tensor_from
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

