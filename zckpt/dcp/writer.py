"""ZckptWriter: DCP's StorageWriter and AsyncStager on a zckpt pool (see zckpt.dcp)."""

from __future__ import annotations

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
from collections.abc import Callable
from concurrent.futures import Future as PyFuture
from dataclasses import dataclass
from typing import Any, Union, cast

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .. import protocol as P
from ..arena import BufferSet
from ..commit import (
    apply_retention,
    commit_dir,
    discard,
    fsync_created,
    make_dirs,
    sweep_temp_dirs,
    temp_dir_for,
)
from ..config import PoolConfig
from ..errors import CorruptCheckpointError, ZckptError
from ..format import dtype_name
from ..manifest import (
    DcpFileRecord,
    DcpItemRecord,
    DcpTensorEntry,
    build_dcp_manifest,
)
from ..pool import CheckpointPool
from ..supervisor import ShardJob
from .staging import GAP, Staged, StagedStateDict, collect_tensors, rebuild_staged, stage_tensors

__all__ = ["ZckptWriter", "ItemLocation", "RAW_BYTES_EXTENSION"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: The storage extension every item of a zckpt DCP checkpoint names in ``.metadata``
#: (DCP's ``_StorageInfo.transform_descriptors``): DCP's FileSystemReader does not know
#: it and refuses the data instead of reading raw bytes as a torch.save record.
RAW_BYTES_EXTENSION = "zckpt.raw-bytes/1"


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


class _Keeper:
    """Referenced by every tensor of one staging: dies with the last of them."""


def _abandoned(writer_ref: Callable[[], ZckptWriter | None], ticket: int, staged: Staged) -> None:
    """The staged tensors of a save are garbage: that save is over, whatever became of it."""
    writer = writer_ref()
    if writer is not None:
        writer._end(ticket, staged)
    else:
        staged.release()


# --- the writer ----------------------------------------------------------------------------------
class _SaveContext:
    """What one save (one thread of DCP's) needs between reset() and finish()."""

    def __init__(self, path: str, ticket: int, staged: Staged | None) -> None:
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
        self._staged: list[Staged] = []          # staged by stage(), not yet written
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
            collect_tensors(state_dict, found)
            staged, copies = stage_tensors(list(found.values()), engine.arena, self._acquirer(pool))
        if staged is None:   # no tensor bytes: the save takes its place in reset()
            return StagedStateDict(rebuild_staged(state_dict, dict(zip(found, copies, strict=True))))
        with self._lock:
            ticket = self._new_ticket(None)
            staged.ticket, staged.stage_thread = ticket, threading.current_thread()
            self._staged.append(staged)
        try:
            out = StagedStateDict(rebuild_staged(state_dict, dict(zip(found, copies, strict=True))))
        except BaseException:
            self._end(ticket, staged)
            raise
        # When every staged tensor is garbage, the save that was to write them is over (or
        # never started: DCP's process executor, an error before its thread ran): the
        # buffer set goes back (see Staged).
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

    def _end(self, ticket: int, staged: Staged | None) -> None:
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
        own: Staged | None = None
        try:
            if extra and ctx.staged is None:
                # dcp.save (no stage() call): stage now, a tensor saved under several names once.
                distinct: dict[tuple[Any, ...], int] = {}
                firsts: list[torch.Tensor] = []
                for _, t in extra:
                    if _memory_key(t) not in distinct:
                        distinct[_memory_key(t)] = len(firsts)
                        firsts.append(t)
                own, copies = stage_tensors(firsts, pool._engine.arena, self._acquirer(pool))
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
    def _locate(staged: Staged | None, items: list[tuple[WriteItem, torch.Tensor]]
                ) -> tuple[list[tuple[WriteItem, Staged, int | None]], list[tuple[WriteItem, torch.Tensor]]]:
        """Split the tensor items into those staged in this save's buffer set and the rest."""
        located: list[tuple[WriteItem, Staged, int | None]] = []
        extra: list[tuple[WriteItem, torch.Tensor]] = []
        for item, t in items:
            off = staged.locate(t) if staged is not None and t.numel() > 0 else None
            if staged is not None and off is not None:
                located.append((item, staged, off))
            else:
                extra.append((item, t))
        return located, extra

    def _write(self, pool: CheckpointPool, rank: int, tmp_dir: str,
               located: list[tuple[WriteItem, Staged, int | None]],
               byte_items: list[tuple[WriteItem, bytes]]) -> list[WriteResult]:
        """Workers write the located items (one file per worker, gathered from the arena);
        this thread writes the byte items. Blocks until all are durable."""
        cfg = pool.config
        engine = pool._engine
        # The same bytes (a tensor saved under two names) are written once.
        pieces: dict[tuple[int, int, int], list[WriteItem]] = {}
        sets: dict[int, Staged] = {}
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

        from .._sync import fsync_fd
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
    from ..reader import _writable_view
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
        if runs and 0 <= off - (runs[-1][0] + runs[-1][1]) <= GAP:
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

    from .._sync import write_new_file
    storage = {}
    for wr in (w for rank_results in results for w in rank_results):
        loc = wr.storage_data
        storage[wr.index] = _StorageInfo(loc.file, loc.at, loc.nbytes, transform_descriptors=[RAW_BYTES_EXTENSION])
    md = dataclasses.replace(metadata, storage_data=storage)
    write_new_file(os.path.join(tmp_dir, ".metadata"), pickle.dumps(md), fsync=fsync)
