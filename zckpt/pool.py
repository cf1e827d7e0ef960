"""CheckpointPool: the trainer-facing API. Stage, hand off, commit; never wait unbounded.

Who talks to whom::

    trainer thread             supervisor thread (one)           worker processes (N)
    ──────────────             ───────────────────────           ────────────────────
    pool.save(sd, path)
      walk + pickle + plan (or reuse)
      copy into arena  ──shm─────────────────────────────────▶  mapped once, reused
      fut.staged done
      submit(jobs) ──queue+wake──▶ ROUTER ──JOB(handles)──▶   write shard (O_DIRECT),
                                        ◀──DONE(checksums)──    checksum, fdatasync
                                   last shard done:
                                   ──COMMIT(manifest)──▶ one worker: manifest, fsync,
                                        ◀──DONE──────────   rename, fsync parent
                                   fut done
                                   heartbeats both ways, pidfds: a dead or silent
                                   worker fails its save and is replaced

- The trainer thread is blocked only while it copies tensors into the arena (the one
  copy); ``fut.staged`` is done when ``save()`` returns. With ``async_staging`` a
  stager thread plans and copies, and ``save()`` returns at once.
- The supervisor thread owns every socket (see :mod:`zckpt.supervisor`); it only
  relays small messages, so a busy training loop holding the GIL barely delays a save.
- A cleanup thread removes the temp directories of failed saves.
- Workers, supervisor, arena, job ids, the pool's state and teardown belong to the
  :class:`~zckpt.engine.Engine` the pool composes (as ``zckpt.compat`` does); this
  module keeps what is a *save*: planning, staging, the shard jobs and the commit order.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Union

import cloudpickle
import torch

from . import commit as C
from . import protocol as P
from .arena import BufferSet, _round_up
from .config import PoolConfig
from .engine import KILL_TEARDOWN_S, Engine, PoolState, wait_all
from .errors import PoolBusyError, PoolClosedError, SaveSkippedError, StagingBudgetError, ZckptError
from .manifest import FileRecord, StorageRecord, TensorRecord, build_manifest, encode_skeleton, json_metadata
from .plan import SavePlan, collect_storages, plan_records, plan_save
from .s3 import is_url
from .save import FINAL, Save, SaveFuture, SaveState
from .stager import stage_files
from .supervisor import ShardJob
from .tree import Collector, dump_skeleton, gc_paused, structure_key

__all__ = ["CheckpointPool", "SaveFuture", "PoolState", "PoolStats"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Arena segments, one per shard, come in multiples of this: huge-page friendly.
SEGMENT_BYTES = 2 << 20
#: reserve(): the workers' mapping jobs have their deadline; this covers the reply.
RESERVE_REPLY_MARGIN_S = 5.0


@dataclass(frozen=True)
class PoolStats:
    """Counters for benchmarks and tests."""

    arena_nbytes: int
    arena_allocations: int
    saves_started: int
    saves_committed: int
    saves_failed: int
    worker_restarts: int
    dropped_frames: int = 0   # frames from peers that did not prove the pool's secret
    saves_skipped: int = 0    # dropped by on_busy="skip" (not counted as started)
    saves_refused: int = 0    # refused by on_busy="raise" (not counted as started)


class CheckpointPool:
    """A pool of checkpoint worker processes fed through shared memory.

    Args:
        num_workers: Worker processes; overrides ``config.num_workers`` when given.
        config: Every other knob (see :class:`PoolConfig`).
        init_fn: Called as ``init_fn(*init_args)`` in each worker before it serves
            work (set up logging, pin CPUs, import plugins). Travels cloudpickled:
            lambdas and closures work.
        init_args: Positional arguments for ``init_fn``.
        writer_factory: Called as ``writer_factory(**writer_kwargs)`` in each worker;
            returns a :class:`zckpt.writers.ShardWriter`. Default: a local-file writer
            with large sequential writes and ``fdatasync``.
        writer_kwargs: Keyword arguments for ``writer_factory``.

    Blocks until every worker has started and run its init (at most
    ``config.init_timeout_s``).

    Raises:
        WorkerInitError: ``init_fn`` or the writer factory raised in a worker (the
            remote traceback is attached).
        TimeoutError: a worker did not finish start-up in time (it is killed).
    """

    def __init__(self, num_workers: int | None = None, config: PoolConfig | None = None, *,
                 init_fn: Callable[..., Any] | None = None, init_args: tuple = (),
                 writer_factory: Callable[..., Any] | None = None,
                 writer_kwargs: Mapping[str, Any] | None = None) -> None:
        cfg = config if config is not None else PoolConfig()
        if not isinstance(cfg, PoolConfig):
            raise TypeError(f"config must be a zckpt.PoolConfig, got {type(cfg).__name__}")
        if num_workers is not None:
            cfg = cfg.replace(num_workers=num_workers)
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}")
        if writer_factory is not None and not callable(writer_factory):
            raise TypeError(f"writer_factory must be callable, got {type(writer_factory).__name__}")
        if not isinstance(init_args, tuple):
            raise TypeError(f"init_args must be a tuple, got {type(init_args).__name__}")
        self.config = cfg
        self._saves: dict[int, Save] = {}   # every save not yet final, from birth
        # Commits happen one at a time, in the order save() was called: a later save whose
        # shards finish first waits, so the commit record's sequence follows the saves
        # (else latest() named the older one and keep_last deleted the newer). Values are
        # None while a save is still writing, then its commit job and slot.
        self._commit_queue: collections.OrderedDict[int, tuple[P.CommitJob, int, Save] | None] = \
            collections.OrderedDict()
        self._committing: int | None = None
        # The last plan: (structure key, plan, encoded skeleton); see _plan.
        self._plan_cache: tuple[tuple[Any, ...], SavePlan, dict[str, Any]] | None = None
        self._records_cache: tuple[SavePlan, list[StorageRecord], list[TensorRecord]] | None = None
        self._counts = {"started": 0, "committed": 0, "failed": 0, "skipped": 0, "refused": 0}
        self._swept: set[str] = set()
        try:
            payload = cloudpickle.dumps((init_fn, tuple(init_args), writer_factory, dict(writer_kwargs or {})))
        except Exception as exc:
            raise TypeError(f"init_fn, init_args, writer_factory or writer_kwargs cannot be pickled: {exc}") from exc
        self._engine = engine = Engine(cfg, payload, writer_method="write_file", round_bytes=SEGMENT_BYTES)
        self._arena, self._supervisor, self._local = engine.arena, engine.supervisor, engine.local
        self._stager = engine.internal_executor("zckpt-stage")
        self.startup_s = engine.startup_s
        logger.info("checkpoint pool ready: %d workers in %.3fs", cfg.num_workers, self.startup_s)
        engine.arm_finalizer(self, functools.partial(_futures_of, self._saves, engine))

    @property
    def _lock(self) -> threading.RLock:
        return self._engine.lock  # read each time: a fork replaces it (see Engine.reset_locks_after_fork)

    # --- public surface ----------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """Pids of the live workers (replacements appear here)."""
        return self._supervisor.worker_pids

    @property
    def state(self) -> PoolState:
        return self._engine.state

    @property
    def stats(self) -> PoolStats:
        with self._lock:
            c = dict(self._counts)
        return PoolStats(self._arena.nbytes, self._arena.allocations, c["started"], c["committed"],
                         c["failed"], self._supervisor.restarts, self._supervisor.dropped_frames, c["skipped"],
                         c["refused"])

    def save(self, state_dict: Mapping[str, Any], path: PathLike, *,
             metadata: Mapping[str, Any] | None = None, **writer_kwargs: Any) -> SaveFuture:
        """Snapshot ``state_dict`` into shared memory and write it to ``path`` in the background.

        Blocks only while tensors are copied into the arena (and, if every staging
        buffer is still being written by earlier saves, until one comes free). When it
        returns, ``fut.staged`` is done: the caller may mutate its tensors, and the
        checkpoint will still hold the values they had at the call.

        With ``config.async_staging`` it returns at once (well under a millisecond):
        planning and the copy run on a stager thread, ``fut.staged`` resolves when
        they are done, and the caller must not mutate the state dict (tensors or
        containers) before that. Bad input then fails both futures instead of raising.

        Args:
            state_dict: A mapping (nested dicts, lists, tuples, tensors, Python values).
            path: The checkpoint directory to create; parent directories are created.
            metadata: JSON-serialisable data stored in the manifest.
            **writer_kwargs: Passed to the writer's ``write_file`` in every worker.

        Returns:
            A :class:`SaveFuture`; ``result()`` returns the committed path once the
            files and manifest are durable, or raises the worker's error
            (:class:`WorkerDiedError`, the writer's exception, ``TimeoutError``).

        Raises:
            TypeError: ``state_dict`` is not a mapping, or holds an unstorable value.
            FileExistsError: a checkpoint already exists at ``path`` (it is untouched).
            PoolClosedError: the pool is closed, killed or broken, or this is a forked
                child of the process that made it.
            ReentrantSaveError: called (at once, instead of deadlocking) from a signal
                handler or callback that interrupted this thread inside ``save()`` or
                ``reserve()`` (it would wait for the staging buffer its own thread holds),
                or from one of the pool's threads (a ``SaveFuture`` callback). Set a flag
                there and save after the interrupted call returns. Other threads may call
                ``save()`` concurrently: they wait their turn for a staging buffer.
        """
        t0 = time.perf_counter()
        with self._engine.entered("save"):
            return self._save(state_dict, path, metadata, writer_kwargs, t0)

    def _save(self, state_dict: Mapping[str, Any], path: PathLike, metadata: Mapping[str, Any] | None,
              writer_kwargs: dict[str, Any], t0: float) -> SaveFuture:
        self._engine.check_open()
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping (dict), got {type(state_dict).__name__}")
        if is_url(os.fspath(path)):
            raise ValueError(f"cannot save to {os.fspath(path)!r}: an s3:// path is supported as a mirror root, not "
                             "as the primary; save to a local path with PoolConfig(mirrors=('s3://bucket/prefix',))")
        final = os.path.abspath(os.fspath(path))
        finals = [final] + [os.path.join(m, os.path.basename(final)) for m in self.config.mirrors]
        if os.path.lexists(final):   # a mirror in the way only leaves that mirror out (see _make_temp_dirs)
            raise FileExistsError(f"{_what_is_at(final)} already exists at {final!r}; zckpt never overwrites "
                                  "anything")
        busy = self._wait_until_not_busy()
        if busy is not None:   # on_busy is "skip" (raise raised already)
            return self._skipped(finals[0], busy)
        save = self._register(finals, t0)
        save.writer_kwargs = writer_kwargs
        fut = save.future
        if self.config.async_staging:
            # The copies are issued from the stager thread: they must wait for the
            # kernels this thread queued, on whatever stream (see record_current_streams).
            save.cuda_events = _cuda_events()
            fut.timings["blocked_s"] = time.perf_counter() - t0
            try:
                # In a box the stager empties: its work item must not keep the state dict
                # alive after staging (the executor drops the item only after it returns).
                self._stager.submit(self._stage_async, [state_dict], save, metadata, writer_kwargs)
            except RuntimeError as exc:  # close() on another thread shut the stager down meanwhile
                with self._lock:
                    err = self._engine.closed_error()
                err.__cause__ = exc
                self._engine.submit_cleanup(save.transition, SaveState.FAILED, err)
                raise err from None
            return fut
        self._local.staging = fut  # a close() from a handler interrupting us must not wait for it
        try:
            tasks = self._stage(state_dict, save, metadata)
        except SaveSkippedError as exc:    # another thread took the last buffer meanwhile
            save.transition(SaveState.FAILED, exc)
            return fut
        except BaseException as exc:
            save.transition(SaveState.FAILED, exc)
            raise
        if tasks is None:   # an earlier round failed while being written: the future says so
            assert save.error is not None
            save.transition(SaveState.FAILED, save.error)
            return fut
        save.transition(SaveState.WRITING)  # staged: the caller may mutate its tensors
        self._dispatch(save, tasks, writer_kwargs)
        return fut

    def _stage(self, state_dict: Mapping[str, Any], save: Save, metadata: Mapping[str, Any] | None
               ) -> list[P.FileTask] | None:
        """Plan, take a buffer set, make the temp dirs, copy; return the workers' tasks.

        The caller moves the save to WRITING (resolving ``staged``) once this frame,
        which holds the state dict, is gone; or to FAILED if this raises.
        """
        fut, t0 = save.future, save.t0
        save.metadata = json_metadata(metadata)
        plan, save.tree, sources = self._plan(state_dict)
        rounds = self._rounds(plan)
        if rounds is not None:
            sources.clear()
            return self._stage_in_rounds(state_dict, save, rounds)
        t_plan = time.perf_counter()
        bufset = self._acquire(plan)
        t_acquired = time.perf_counter()
        try:
            save.tmp_dirs, save.finals = self._make_temp_dirs(save.finals, save.created_dirs,
                                                              save.future.mirror_errors)
        except BaseException:
            self._arena.release(bufset)
            raise
        fut.timings.update(plan_s=t_plan - t0, wait_buffer_s=t_acquired - t_plan)
        try:
            tasks = stage_files(plan, bufset, sources, after=save.cuda_events)
        except BaseException as exc:
            self._arena.release(bufset)
            with self._lock:
                if self._engine.state is not PoolState.READY and isinstance(exc, Exception):
                    # Closed meanwhile (by another thread, or a signal handler on this
                    # one): the arena went away under the copy. Say so, not IndexError.
                    raise self._engine.closed_error() from exc
            raise
        finally:
            sources.clear()  # nothing of the caller's is referenced once staged
        save.plan, save.bufset = plan, bufset
        save.pending = set(range(len(plan.shards)))
        save.task_indices = list(range(len(plan.shards)))
        return tasks

    # --- saving in rounds (over_budget="rounds") --------------------------------------------
    def _rounds(self, plan: SavePlan) -> int | None:
        """How many rounds a save of ``plan`` needs under the budget, or None for one."""
        budget = self.config.staging_budget_bytes
        if budget is None or self.config.over_budget != "rounds":
            return None
        per_set = budget // self.config.staging_buffers
        need = sum(_seg(s.nbytes) for s in plan.shards)
        return None if need <= per_set else -(-need // per_set)

    def _plan_rounds(self, state_dict: Mapping[str, Any], rounds: int
                     ) -> tuple[SavePlan, list[torch.UntypedStorage], list[list[int]], list[int]]:
        """A plan cut into rounds that all stage into one buffer set within its share of
        the budget: returns the plan, the caller's storages, the shard indices of each
        round, and the segment sizes (per position, the largest shard of any round)."""
        assert self.config.staging_budget_bytes is not None
        per_set = self.config.staging_budget_bytes // self.config.staging_buffers
        # Every shard takes at least one 2 MiB segment: fewer shards per round than
        # workers when the share is that small (found by review: refused, though it fit).
        width = max(1, min(self.config.num_workers, per_set // _seg(1)))
        with gc_paused():
            collector = Collector()
            collector.walk(state_dict)
            dump_skeleton(state_dict, collector)   # registers tensors held inside objects too
            storages, infos = collect_storages(collector)
            sources = [st for st, _ in collector.storages]
            collector.release()
        r = max(1, rounds)
        for _ in range(40):   # more rounds (x1.25 each try) until they fit: a few plans, not hundreds
            plan = plan_save(storages, infos, r * width, self.config.split, True, min_split=4096)
            groups = [list(range(i, min(i + width, len(plan.shards)))) for i in range(0, len(plan.shards), width)]
            sizes = [max(plan.shards[g[k]].nbytes for g in groups if k < len(g)) for k in range(width)]
            if sum(_seg(n) for n in sizes) <= per_set:
                return plan, sources, groups, sizes
            r = max(r + 1, int(r * 1.25))
        raise StagingBudgetError(f"cannot save in rounds under staging_budget_bytes: {width} segment(s) of at "
                                 f"least {_seg(1) >> 20} MiB each, sized to the largest piece "
                                 f"({max(s.nbytes for s in plan.shards) / 2**20:.1f} MiB), do not fit the "
                                 f"{per_set / 2**20:.1f} MiB one buffer set may hold: raise the budget")

    def _stage_in_rounds(self, state_dict: Mapping[str, Any], save: Save, rounds: int) -> list[P.FileTask] | None:
        """Stage and write every round but the last here (the caller stays blocked), then
        stage the last one and return its tasks: the save goes on as a one-round save.

        One buffer set, sized for the largest round, serves every round (no growing
        between rounds). A failure while an earlier round is written is the save's, not
        ``save()``'s: it is kept in ``save.error`` and None is returned (the caller fails
        the save through its future, as it would for the last round).
        """
        plan, sources, groups, sizes = self._plan_rounds(state_dict, rounds)
        save.plan = plan
        save.per_round = len(sizes)
        save.tmp_dirs, save.finals = self._make_temp_dirs(save.finals, save.created_dirs, save.future.mirror_errors)
        deadline = time.monotonic() + self.config.save_timeout_s
        bufset: BufferSet | None = self._arena.acquire(sizes, self.config.buffer_wait_timeout_s,
                                                       pin=plan.needs_pinning)
        try:
            for n, group in enumerate(groups):
                shards = [plan.shards[i] for i in group]
                assert bufset is not None
                tasks = stage_files(plan, bufset, sources, shards=shards, after=save.cuda_events)
                if n == len(groups) - 1:   # the last round: written and committed as a one-round save
                    save.bufset, save.pending, save.task_indices = bufset, set(group), list(group)
                    save.future.timings["rounds"] = float(len(groups))
                    bufset = None   # released when its shards are written (_shard_done)
                    return tasks
                try:
                    self._write_round(save, group, tasks, deadline)
                except Exception as exc:  # noqa: BLE001 - the save fails through its future
                    save.error = exc
                    return None
        finally:
            sources.clear()
            if bufset is not None:
                self._arena.release(bufset)
        raise AssertionError("unreachable")

    def _write_round(self, save: Save, group: list[int], tasks: list[P.FileTask], deadline: float) -> None:
        """Have the workers write one round's shards and wait for them (bounded)."""
        done: list[Future] = []
        live = self._arena.live_keys()
        for k, task in enumerate(tasks):
            f: Future = Future()
            msg = P.WriteFiles(job_id=save.id, dirs=save.tmp_dirs, files=[task], live_keys=live,
                               kwargs=save.writer_kwargs)
            job = ShardJob(slot=k, message=msg, deadline=deadline, describe=f"{task.name} of {save.finals[0]} (round)",
                           on_done=functools.partial(_settle, f), retries=self.config.shard_retries)
            save.round_retries.append(job)
            self._supervisor.submit(job)
            done.append(f)
        try:
            for index, f in zip(group, done, strict=True):
                save.results[index] = f.result(timeout=max(0.0, deadline - time.monotonic()) + RESERVE_REPLY_MARGIN_S)
        finally:
            wait_all(done, deadline)   # the next round overwrites the buffer: nobody may still read it

    def _stage_async(self, box: list[Mapping[str, Any]], save: Save, metadata: Mapping[str, Any] | None,
                     writer_kwargs: dict[str, Any]) -> None:
        """On the stager thread: all of :meth:`_stage`; errors go to both futures."""
        try:
            tasks = self._stage(box.pop(), save, metadata)
        except BaseException as exc:  # noqa: BLE001 - the caller sees it through the futures
            save.transition(SaveState.FAILED, exc)
        else:
            if tasks is None:   # an earlier round failed while being written
                assert save.error is not None
                save.transition(SaveState.FAILED, save.error)
                return
            save.transition(SaveState.WRITING)
            self._dispatch(save, tasks, writer_kwargs)

    def reserve(self, state_dict: Mapping[str, Any], timeout_s: float = 60.0) -> None:
        """Allocate and pre-fault staging memory for saves like ``state_dict`` now.

        Without it the first save pays for allocating and touching the arena (0.3-2
        GB/s into fresh pages here, against 10 GB/s into warm ones) and each worker
        for mapping it. Call once after construction with the state dict you will
        save (or one of the same shapes): every staging buffer set is sized and
        pre-faulted, and every worker maps it. Blocks until done (at most
        ``timeout_s`` for the workers).

        Raises:
            PoolClosedError: as :meth:`save`.
            ReentrantSaveError: as :meth:`save` (it would wait for the buffers its own
                thread holds).
            TimeoutError: a staging buffer did not come free, or a worker did not map
                the arena, within ``timeout_s``.
        """
        with self._engine.entered("reserve"):
            self._reserve(state_dict, timeout_s)

    def _reserve(self, state_dict: Mapping[str, Any], timeout_s: float) -> None:
        self._engine.check_open()
        plan, _, sources = self._plan(state_dict)
        sources.clear()
        sizes = [s.nbytes for s in plan.shards]
        pin = plan.needs_pinning
        held = []
        try:
            for _ in range(self.config.staging_buffers):
                held.append(self._arena.acquire(sizes, timeout_s, pin=pin))
        finally:
            for b in held:
                self._arena.release(b)
        live = self._arena.live_keys()
        done: list[Future] = []
        deadline = time.monotonic() + timeout_s
        # Worker i writes shard i, which always stages into segment i of a buffer set:
        # it maps only those, so no worker holds page tables for the whole arena.
        per_slot = self._arena.segments_by_index()
        for slot, segments in enumerate(per_slot[: self.config.num_workers]):
            f: Future = Future()
            self._supervisor.submit(ShardJob(
                slot, P.MapSegments(self._engine.new_job_id(), [s.ref() for s in segments], live), deadline=deadline,
                describe="mapping the arena", on_done=functools.partial(_settle, f)))
            done.append(f)
        for f in done:
            f.result(timeout=max(0.0, deadline - time.monotonic()) + RESERVE_REPLY_MARGIN_S)

    def _plan(self, state_dict: Mapping[str, Any]) -> tuple[SavePlan, dict[str, Any], list[torch.UntypedStorage]]:
        """Find the tensors and storages, pickle the rest, plan the shards.

        Returns the plan, the manifest's encoded structure ("tree") and the caller's
        storages to copy from (drop them once staged). A state dict of the same structure
        as the last one (:func:`zckpt.tree.structure_key`: keys, shapes, dtypes, strides,
        sharing, simple values) reuses its plan and pickled skeleton.
        """
        with gc_paused():
            key = structure_key(state_dict)
            cached = self._plan_cache
            if key is not None and cached is not None and cached[0] == key.key:
                plan, tree = cached[1], cached[2]
                sources = key.storages
            else:
                collector = Collector()
                collector.walk(state_dict)
                skeleton = dump_skeleton(state_dict, collector)
                storages, infos = collect_storages(collector)
                sources = [st for st, _ in collector.storages]
                collector.release()
                plan = plan_save(storages, infos, self.config.num_workers, self.config.split,
                                 self.config.split_large_tensors)
                tree = encode_skeleton(skeleton)
                self._plan_cache = (key.key, plan, tree) if key is not None else None
            del key
        return plan, tree, sources

    def _acquire(self, plan: SavePlan) -> BufferSet:
        waits = self.config.on_busy == "wait"
        try:
            return self._arena.acquire([s.nbytes for s in plan.shards],
                                       self.config.buffer_wait_timeout_s if waits else 0.0, pin=plan.needs_pinning)
        except TimeoutError:
            if waits:
                raise
            why = ("every staging buffer is held by earlier saves still being written (more staging_buffers, "
                   "on_busy='wait', or fewer saves would let it through)")
            if self.config.on_busy == "raise":
                raise PoolBusyError(f"save refused (on_busy='raise'): {why}") from None
            raise SaveSkippedError(f"save skipped (on_busy='skip'): {why}") from None

    def _busy_reason(self) -> str | None:
        """Why a save now would have to wait, or None."""
        limit = self.config.max_pending
        with self._lock:
            pending = len(self._saves)
        if limit is not None and pending >= limit:
            return f"{pending} saves are in flight (max_pending={limit})"
        if not self._arena.has_free():
            return ("every staging buffer is held by earlier saves still being written (more staging_buffers, "
                    "on_busy='wait', or fewer saves would let it through)")
        return None

    def _wait_until_not_busy(self) -> str | None:
        """Apply ``on_busy`` before a save: wait (bounded), raise, or return why to skip."""
        why = self._busy_reason()
        if why is None:
            return None
        policy = self.config.on_busy
        if policy == "raise":
            with self._lock:
                self._counts["refused"] += 1
            raise PoolBusyError(f"save refused (on_busy='raise'): {why}")
        if policy == "skip":
            return why
        limit = self.config.max_pending
        deadline = time.monotonic() + self.config.buffer_wait_timeout_s
        while limit is not None:   # the buffers are waited for in acquire(); the count here
            with self._lock:
                pending = sorted(self._saves.values(), key=lambda s: s.id)
            if len(pending) < limit:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} saves still in flight after buffer_wait_timeout_s="
                                   f"{self.config.buffer_wait_timeout_s:g}s (max_pending={limit})")
            wait_all([pending[0].future], deadline)
        return None

    def _skipped(self, path: str, why: str) -> SaveFuture:
        """A save dropped by ``on_busy="skip"``: logged, counted, its future failed at once."""
        fut = SaveFuture(path)
        fut.staged.set_result(None)
        fut.set_exception(SaveSkippedError(f"save of {path} skipped (on_busy='skip'): {why}"))
        with self._lock:
            self._counts["skipped"] += 1
        logger.warning("save of %s skipped (on_busy='skip'): %s", path, why)
        return fut

    def _make_temp_dirs(self, finals: list[str], created: list[str], mirror_errors: list[str]
                        ) -> tuple[list[str], list[str]]:
        """Make each final's parent (appending what was created to ``created``) and a temp dir.

        Returns the temp dirs and the finals they are for. The primary (``finals[0]``) must
        succeed (else this raises); a mirror that cannot be prepared is left out of this
        save and named in ``mirror_errors`` (the primary decides; see PoolConfig.mirrors).
        """
        tmp_dirs: list[str] = []
        kept: list[str] = []
        try:
            for i, f in enumerate(finals):
                if i and is_url(f):   # an s3:// mirror: the workers check and upload under it (zckpt.s3)
                    tmp_dirs.append(f)
                    kept.append(f)
                    continue
                try:
                    if i and os.path.lexists(f):
                        raise FileExistsError(f"{_what_is_at(f)} already exists at {f!r}")
                    parent = os.path.dirname(f)
                    made = C.make_dirs(parent)
                    created += made
                    if parent not in self._swept:
                        self._swept.add(parent)
                        C.sweep_temp_dirs(parent)
                    tmp = C.temp_dir_for(f)
                    os.mkdir(tmp, 0o755)
                except OSError as exc:
                    if i == 0:
                        raise
                    mirror_errors.append(f"{f}: {type(exc).__name__}: {exc}")
                    logger.error("mirror %s left out of this save: %s", f, exc)
                    continue
                tmp_dirs.append(tmp)
                kept.append(f)
        except BaseException:
            for tmp in tmp_dirs:
                C.discard(tmp)
            raise
        return tmp_dirs, kept

    def _register(self, finals: list[str], t0: float) -> Save:
        """A new save, registered from birth (so close() and the commit order know it)."""
        with self._lock:
            if self._engine.state is not PoolState.READY:
                raise self._engine.closed_error()
            save = Save(self._engine.new_job_id(), finals, t0, self._save_final)
            self._saves[save.id] = save
            self._commit_queue[save.id] = None
            self._counts["started"] += 1
        return save

    def _save_final(self, save: Save) -> None:
        """Runs inside a save's final transition, before its futures resolve."""
        save.jobs.clear()
        with self._lock:
            self._saves.pop(save.id, None)
            if isinstance(save.error, (SaveSkippedError, PoolBusyError)):
                # Lost the race for the last buffer to another thread after the early check.
                self._counts["started"] -= 1
                self._counts["skipped" if isinstance(save.error, SaveSkippedError) else "refused"] += 1
            else:
                self._counts["committed" if save.state is SaveState.COMMITTED else "failed"] += 1
        self._leave_commit_order(save)

    def _dispatch(self, save: Save, tasks: list[P.FileTask], writer_kwargs: dict[str, Any]) -> None:
        if not tasks:  # nothing but Python values: commit straight away
            save.pending.clear()
            assert save.bufset is not None
            self._arena.release(save.bufset)  # no shard will release it (was: the next save waited forever)
            self._request_commit(save, slot=0)
            return
        deadline = time.monotonic() + self.config.save_timeout_s
        live = self._arena.live_keys()
        for k, (i, task) in enumerate(zip(save.task_indices, tasks, strict=True)):
            msg = P.WriteFiles(job_id=save.id, dirs=save.tmp_dirs, files=[task], live_keys=live,
                               kwargs=writer_kwargs)
            job = ShardJob(slot=k, message=msg, deadline=deadline, describe=f"{task.name} of {save.finals[0]}",
                           on_done=functools.partial(self._shard_done, save, i), retries=self.config.shard_retries)
            save.jobs.append(job)
            self._supervisor.submit(job)

    def close(self, timeout_s: float | None = None) -> None:
        """Graceful shutdown: refuse new saves, let in-flight saves finish, stop workers.

        Waits at most ``timeout_s`` (default ``config.shutdown_timeout_s``) for saves
        and workers; what is still running then is killed and its saves fail. The true
        bound on the call is ``timeout_s + SUPERVISOR_JOIN_MARGIN_S`` (10 s: killing and
        reaping what is left), plus ``SUPERVISOR_LAST_JOIN_S`` (5 s) only if the
        supervisor thread itself is stuck.
        Idempotent; safe after :meth:`kill`. Called from a signal handler that
        interrupted a ``save()`` on this thread, it does not wait for that save (it
        cannot progress until the handler returns; it then fails with PoolClosedError).
        In a forked child of the process that made the pool it does nothing: the
        workers, sockets, arena and saves are the parent's.

        Raises:
            ReentrantSaveError: called from one of the pool's own threads (a
                ``SaveFuture`` callback): it would wait for that thread itself.
        """
        engine = self._engine
        if engine.forked_child("close"):
            return
        engine.refuse_internal_thread("close")
        limit = self.config.shutdown_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + limit
        own = getattr(self._local, "staging", None)  # the save this thread is inside, if any
        if not engine.begin_close():
            return
        with self._lock:
            pending = [s.future for s in self._saves.values() if s.future is not own]
        wait_all(pending, deadline)
        engine.teardown(kill=False, deadline=deadline, before_close=self._fail_leftovers)

    def kill(self) -> None:
        """Forceful shutdown: SIGKILL every worker now. In-flight saves fail.

        The pool is unusable afterwards; committed checkpoints are untouched and
        temp directories of failed saves are removed. Idempotent. Does nothing in a
        forked child (see :meth:`close`).

        Raises:
            ReentrantSaveError: called from one of the pool's own threads.
        """
        engine = self._engine
        if engine.forked_child("kill"):
            return
        engine.refuse_internal_thread("kill")
        if engine.begin_kill():
            engine.teardown(kill=True, deadline=time.monotonic() + KILL_TEARDOWN_S, before_close=self._fail_leftovers)

    def __enter__(self) -> CheckpointPool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()  # an exception in the with-block: do not wait on workers

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)  # absent if the constructor raised
        if engine is None or engine.owner_pid != os.getpid():
            return  # a forked child's copy: not ours to close
        if engine.finalizer_alive:
            warnings.warn("CheckpointPool was not closed; call close() or use it as a context manager",
                          ResourceWarning, stacklevel=2)

    # --- internals ---------------------------------------------------------------------
    def _shard_done(self, save: Save, index: int, result: P.JobResult | None,
                    exc: BaseException | None) -> None:
        """Runs on the supervisor thread: record one shard; the first error fails the save
        at once (a dead worker's save should not wait for the others' shards); once none is
        pending, release the buffer (workers read it until then) and commit if all is well."""
        if exc is not None and save.error is None:
            save.error = exc
            # The other workers may still write into the temp dir being removed: their
            # writes then fail (ENOENT) or land in unlinked files, and are ignored.
            self._engine.submit_cleanup(save.transition, SaveState.FAILED, exc)
        if result is not None:
            save.results[index] = result
        save.pending.discard(index)
        if save.pending:
            return
        save.future.timings["shard_retries"] = float(sum(j.attempts - 1 for j in save.jobs + save.round_retries))
        save.round_retries.clear()
        save.jobs.clear()   # they reference the pool (their callbacks): no cycle outlives the save
        save.future.timings["write_retries"] = float(sum(f.retries for r in save.results.values() for f in r.files))
        assert save.bufset is not None
        self._arena.release(save.bufset)
        if save.error is None:   # committed by the worker that just finished (its slot, not the shard's index)
            self._request_commit(save, slot=save.task_indices.index(index) if index in save.task_indices else 0)

    def _request_commit(self, save: Save, slot: int) -> None:
        """Fill in the checksums and have a worker (the one that just finished) commit.

        Committing in a worker means a busy training loop, which keeps the GIL to
        itself, does not hold up the manifest's writes, fsyncs and renames.
        """
        try:
            assert save.plan is not None
            storages, tensors = self._records(save.plan)
            files = []
            for i, sh in enumerate(save.plan.shards):
                fr = save.results[i].files[0]
                if fr.name != sh.name or fr.nbytes != sh.nbytes:
                    raise ZckptError(f"worker {i} reported {fr.name} ({fr.nbytes} bytes), "
                                     f"expected {sh.name} ({sh.nbytes} bytes)")
                files.append(FileRecord(name=sh.name, nbytes=sh.nbytes, worker=sh.index % save.per_round,
                                        chunks=tuple(sh.chunks),
                                        checksums=tuple(fr.checksums), write_s=round(fr.write_s, 6),
                                        hash_s=round(fr.hash_s, 6)))
        except (ZckptError, KeyError, IndexError) as exc:
            self._engine.submit_cleanup(save.transition, SaveState.FAILED, exc)
            return
        self._drop_failed_mirrors(save)
        body = build_manifest(checksum=self.config.checksum, tree=save.tree, metadata=save.metadata,
                              torch_version=str(torch.__version__), files=files, storages=storages,
                              tensors=tensors, created_unix=time.time())
        job = P.CommitJob(save.id, save.tmp_dirs, save.finals, body, self.config.fsync, self.config.keep_last,
                          save.created_dirs)
        if not save.transition(SaveState.COMMITTING):
            return  # failed meanwhile (the pool shut down)
        with self._lock:
            if save.id in self._commit_queue:
                self._commit_queue[save.id] = (job, slot, save)
        self._pump_commits()

    def _drop_failed_mirrors(self, save: Save) -> None:
        """Leave out of the commit the s3:// mirrors a worker could not upload a shard to
        (named in the write results as ``"<mirror>: <error>"``): named in
        ``fut.mirror_errors``, their uploads removed, the primary still committed."""
        errors = list(dict.fromkeys(e for r in save.results.values() for e in r.mirror_errors))
        if not errors:
            return
        failed = [i for i, t in enumerate(save.tmp_dirs) if i and any(e.startswith(f"{t}: ") for e in errors)]
        for i in failed:
            self._engine.submit_cleanup(C.discard, save.tmp_dirs[i])
        save.future.mirror_errors += errors
        logger.error("save %d: mirror upload failed, left out of the commit: %s", save.id, "; ".join(errors))
        save.tmp_dirs = [t for i, t in enumerate(save.tmp_dirs) if i not in failed]
        save.finals = [f for i, f in enumerate(save.finals) if i not in failed]

    def _records(self, plan: SavePlan) -> tuple[list[StorageRecord], list[TensorRecord]]:
        """The plan's storage and tensor records (immutable: kept while the plan is reused)."""
        cached = self._records_cache
        if cached is not None and cached[0] is plan:
            return cached[1], cached[2]
        storages, tensors = plan_records(plan)
        self._records_cache = (plan, storages, tensors)
        return storages, tensors

    def _pump_commits(self) -> None:
        """Send the oldest save's commit once it is written and no other commit runs."""
        with self._lock:
            if self._committing is not None or not self._commit_queue:
                return
            sid, ready = next(iter(self._commit_queue.items()))
            if ready is None:
                return  # the oldest save is still being written: later ones wait for it
            del self._commit_queue[sid]
            self._committing = sid
        job, slot, save = ready
        self._supervisor.submit(ShardJob(slot, job, functools.partial(self._committed, save),
                                         deadline=time.monotonic() + self.config.save_timeout_s,
                                         describe=f"the commit of {save.finals[0]}"))

    def _leave_commit_order(self, save: Save) -> None:
        """A save is done (committed or failed): let the next one commit."""
        with self._lock:
            self._commit_queue.pop(save.id, None)
            if self._committing == save.id:
                self._committing = None
        self._pump_commits()

    def _committed(self, save: Save, result: P.JobResult | None, exc: BaseException | None) -> None:
        """Runs on the supervisor thread when the commit job answers."""
        if exc is not None:
            logger.error("commit of %s failed: %s", save.path, exc)
            self._engine.submit_cleanup(save.transition, SaveState.FAILED, exc)
            return
        if result is not None and result.mirror_errors:
            # The primary is committed: the save is. The next commit completes the mirror.
            save.future.mirror_errors += list(result.mirror_errors)
            logger.error("save %d committed at %s, but not under every mirror: %s", save.id, save.path,
                         "; ".join(result.mirror_errors))
        save.transition(SaveState.COMMITTED)

    def _fail_leftovers(self) -> None:
        """At teardown, once the workers are gone: fail the saves they never answered."""
        with self._lock:
            leftovers = list(self._saves.values())
        for save in leftovers:
            if save.pending:
                save.pending.clear()
                if save.bufset is not None:
                    self._arena.release(save.bufset)
            if save.state not in FINAL and save.state is not SaveState.STAGING:
                # Still writing, or written and waiting its turn to commit. (One still
                # staging fails in its own thread: the arena closes under its copy.)
                self._engine.submit_cleanup(save.transition, SaveState.FAILED,
                                            PoolClosedError("the pool shut down before the save finished"))
        self._stager.shutdown(wait=True)  # a copy in progress ends at memory speed


def _futures_of(saves: dict[int, Save], engine: Engine) -> list[Future]:
    """The futures of the saves in flight (for the finalizer: no reference to the pool)."""
    with engine.lock:
        return [s.future for s in saves.values()]


def _settle(fut: Future, result: Any, exc: BaseException | None) -> None:
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _what_is_at(path: str) -> str:
    """How to name what is in the way of a save: a checkpoint, a directory, or a file."""
    if os.path.isdir(path):
        return "a checkpoint" if os.path.exists(os.path.join(path, C.MANIFEST_NAME)) else "a directory"
    return "a file"


def _cuda_events() -> Any:
    if "torch.cuda" not in sys.modules or not torch.cuda.is_initialized():
        return None
    from ._cuda import record_current_streams
    return record_current_streams()


def _seg(nbytes: int) -> int:
    """Staging bytes a shard of ``nbytes`` takes in the arena (see SEGMENT_BYTES)."""
    return _round_up(nbytes, SEGMENT_BYTES)
