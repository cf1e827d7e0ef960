"""DistributedCheckpointer: one commit for all ranks, on torch.distributed's Store.

How a save flows, on every rank (same path, same order)::

    save(sd, path)                                    commit thread (one per rank)
      plan_rank: leaves, boxes, owners, digest        ─────────────────────────────
      (coordinator) pickle the structure once
      pool.save(owned chunks,                  ──▶    wait for the local save (durable)
                <path>.dtmp-<nonce>-<seq>/rank-<r>)   Store: p/<rank> = ok | why not
      return (fut.staged done)                        coordinator: collect every report
                                                        (commit_timeout_s), claim, write
                                                        the index, rename, fsync,
                                                        retention; publish the verdict
                                                      others: await the verdict
                                                      fut: the path, or CheckpointAborted

No collective runs during a save: the training loop's own collectives never meet ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .. import commit as C
from ..config import PoolConfig
from ..errors import PoolClosedError, ZckptError
from ..manifest import encode_skeleton, json_metadata
from ..pool import CheckpointPool
from ..tree import Collector, dump_skeleton, gc_paused
from . import two_phase as T
from .index import build_index, rank_dir, rank_metadata
from .plan import RankPlan, plan_rank

__all__ = ["DistributedCheckpointer", "CheckpointAborted", "DistributedSaveFuture"]

logger = logging.getLogger(__name__)

#: Past commit_timeout_s a rank waits this much longer (or commit_timeout_s again, if less)
#: for the coordinator's verdict before it claims an abort itself: the coordinator's own
#: deadline comes first, and the claim keeps a late coordinator from committing anyway.
VERDICT_MARGIN_S = 30.0
#: Construction: how long ranks wait for the coordinator to publish the run's nonce.
NONCE_TIMEOUT_S = 300.0
_NONCE_RE = re.compile(r"[0-9a-f]{16}")


class CheckpointAborted(ZckptError):
    """A multi-rank save did not commit; raised on every rank alike.

    Attributes:
        path: the checkpoint that was not written (nothing is there).
        reasons: ``{rank: "what failed there"}``.
    """

    def __init__(self, path: str, reasons: Mapping[int, str]) -> None:
        self.path = path
        self.reasons = dict(reasons)
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.reasons.items()))
        super().__init__(f"checkpoint {path} aborted on every rank ({lines})")

    def __reduce__(self) -> Any:
        return (type(self), (self.path, self.reasons))


class DistributedSaveFuture(Future):
    """``result()`` is the committed path (the same on every rank) or raises
    :class:`CheckpointAborted`; ``staged`` is done once this rank's tensors are copied.

    ``timings`` (seconds, filled as the save goes): ``blocked_s`` (the ``save()`` call),
    ``local_durable_unix`` (this rank's files durable, wall clock), ``verdict_unix`` (the
    verdict read here, wall clock), ``durable_s`` (from the call to the verdict).
    """

    def __init__(self, path: str, staged: Future) -> None:
        super().__init__()
        self.path = path
        self.staged = staged
        self.timings: dict[str, float] = {}


class DistributedCheckpointer:
    """Asynchronous multi-rank checkpoints: sharded (DTensor) and replicated state, one commit.

    Args:
        config: this rank's pool (workers, staging buffers, checksums, fsync, timeouts).
            ``keep_last`` applies to the committed checkpoints (the coordinator prunes);
            ``mirrors`` are not supported here.
        process_group: the ranks that save together (default: the default group). Its
            ranks and this rank's place in it are all that is used: no collective runs.
        store: the Store of the commit (default: the default group's, as ``torchrun``
            set it up). Each commit thread uses a client of its own (``Store.clone()``).
        coordinator_rank: the group rank that writes the global index and decides.
        commit_timeout_s: how long the coordinator waits, once its own part is durable,
            for every rank's report before it aborts the save.
        init_fn, init_args, writer_factory, writer_kwargs: as :class:`zckpt.CheckpointPool`.

    Every rank must construct it (in the same order as other checkpointers): the ranks
    agree on a fresh run nonce through the Store, so Store keys are never reused.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: ``config.mirrors`` is set, or ``coordinator_rank`` is not in the group.
        TimeoutError: the coordinator did not publish the run nonce in time.
    """

    def __init__(self, config: PoolConfig | None = None, *, process_group: Any = None, store: Any = None,
                 coordinator_rank: int = 0, commit_timeout_s: float = 600.0,
                 init_fn: Callable[..., Any] | None = None, init_args: tuple = (),
                 writer_factory: Callable[..., Any] | None = None,
                 writer_kwargs: Mapping[str, Any] | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("zckpt.distributed needs torch.distributed initialised (torchrun, or "
                               "dist.init_process_group) before a DistributedCheckpointer is made")
        cfg = config if config is not None else PoolConfig()
        if not isinstance(cfg, PoolConfig):
            raise TypeError(f"config must be a zckpt.PoolConfig, got {type(cfg).__name__}")
        if cfg.mirrors:
            raise ValueError("DistributedCheckpointer does not support mirrors")
        if not commit_timeout_s > 0:
            raise ValueError(f"commit_timeout_s must be > 0, got {commit_timeout_s!r}")
        group = process_group if process_group is not None else dist.group.WORLD
        self.ranks: list[int] = sorted(dist.get_process_group_ranks(group))
        self.rank: int = dist.get_rank()
        if self.rank not in self.ranks:
            raise ValueError(f"rank {self.rank} is not in the process group {self.ranks}: only its members may "
                             "construct its DistributedCheckpointer")
        if not 0 <= coordinator_rank < len(self.ranks):
            raise ValueError(f"coordinator_rank {coordinator_rank} is not a rank of the group "
                             f"({len(self.ranks)} ranks)")
        self.coordinator: int = self.ranks[coordinator_rank]
        self.is_coordinator = self.rank == self.coordinator
        self.commit_timeout_s = float(commit_timeout_s)
        self._store = store if store is not None else dist.distributed_c10d._get_default_store()
        self._keep_last = cfg.keep_last
        self._checksum, self._fsync = cfg.checksum, cfg.fsync
        self._nonce = self._agree_on_nonce()
        self._seq = 0
        self._in_flight: set[int] = set()   # save sequences not yet decided here
        self._digest: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pool = CheckpointPool(config=cfg.replace(keep_last=None), init_fn=init_fn, init_args=init_args,
                                    writer_factory=writer_factory, writer_kwargs=writer_kwargs)
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="zckpt-commit")
        self._client: Any = None     # the commit thread's Store client, made on that thread

    # --- construction ------------------------------------------------------------------
    def _agree_on_nonce(self) -> str:
        store = self._store
        # Per group, each rank counts its own checkpointers: the n-th checkpointer of a
        # group meets its peers under key n (a subgroup's never meets the world's).
        group = ",".join(map(str, self.ranks))
        n = store.add(f"zckpt/instances/{group}/{self.rank}", 1)
        key = f"zckpt/nonce/{group}/{n}"
        if self.is_coordinator:
            got = store.compare_set(key, "", secrets.token_hex(8))
        else:
            try:
                store.wait([key], timedelta(seconds=NONCE_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001 - DistStoreError / RuntimeError on timeout
                raise TimeoutError(f"rank {self.rank}: the coordinator (rank {self.coordinator}) did not publish the "
                                   f"checkpointer's run id within {NONCE_TIMEOUT_S:.0f}s: construct the "
                                   "DistributedCheckpointer on every rank of the group") from exc
            got = store.get(key)
        nonce = got.decode(errors="replace") if isinstance(got, bytes) else str(got)
        # It names directories: nothing but what a coordinator writes is accepted.
        if not _NONCE_RE.fullmatch(nonce):
            raise RuntimeError(f"the Store holds {nonce[:40]!r} under {key}, not a run id zckpt wrote")
        return nonce

    # --- saving ------------------------------------------------------------------------
    def save(self, state_dict: Mapping[str, Any], path: str | os.PathLike[str], *,
             metadata: Mapping[str, Any] | None = None) -> DistributedSaveFuture:
        """Stage this rank's part of ``state_dict`` and commit it with every rank's, in the background.

        Call on every rank with the same ``path``, in the same order. Blocks while this
        rank's tensors are copied into shared memory (``fut.staged`` is done on return).
        ``fut.result()`` is ``path`` once every rank's part is durable and the global
        index committed, or raises :class:`CheckpointAborted` on every rank.

        Raises:
            FileExistsError: ``path`` exists already.
            TypeError, ValueError: a value or placement zckpt cannot save (the other ranks'
                saves then abort, naming this rank).
            PoolClosedError: the checkpointer is closed.
        """
        t0 = time.perf_counter()
        final = os.path.abspath(os.fspath(path))
        with self._lock:
            if self._closed:
                raise PoolClosedError("the DistributedCheckpointer is closed")
            seq = self._seq
            self._seq += 1
            self._in_flight.add(seq)
            settled = min(self._in_flight)
        keys = T.SaveKeys(self._nonce, seq)
        root = f"{final}.dtmp-{self._nonce}-{seq}"
        if self.is_coordinator:
            self._sweep_leftovers(os.path.dirname(final), settled)
        try:
            if os.path.lexists(final):
                raise FileExistsError(f"something already exists at {final!r}; zckpt never overwrites anything")
            plan = plan_rank(state_dict, self.ranks)
            tree = self._skeleton(plan) if self.is_coordinator else None
            local = self._pool.save(plan.owned(self.rank), rank_dir(root, self.rank),
                                    metadata=rank_metadata(self.rank, plan.leaves, plan.owners))
        except BaseException as exc:
            # The other ranks must not wait commit_timeout_s for a report that never comes.
            failed: Future = Future()
            failed.set_exception(exc)
            self._committer.submit(self._commit, keys, seq, final, root, None, None, failed, metadata,
                                   DistributedSaveFuture(final, failed))
            raise
        fut = DistributedSaveFuture(final, local.staged)
        fut.timings["t0"] = t0
        self._committer.submit(self._commit, keys, seq, final, root, plan, tree, local, metadata, fut)
        fut.timings["blocked_s"] = time.perf_counter() - t0
        return fut

    def _sweep_leftovers(self, parent: str, settled: int) -> None:
        """Remove this run's temp roots of saves already decided (a late rank may recreate
        its rank directory after an abort removed the root)."""
        pattern = re.compile(rf"\.dtmp-{self._nonce}-(\d+)$")
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            m = pattern.search(name)
            if m and int(m.group(1)) < settled:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                logger.info("removed %s, left by an aborted save", os.path.join(parent, name))

    def _skeleton(self, plan: RankPlan) -> Any:
        """The coordinator pickles the structure (non-tensor values written once, from here)."""
        with gc_paused():
            collector = Collector()
            for leaf in plan.leaves:
                collector.add(leaf.path, leaf.placeholder)
            skeleton = dump_skeleton(plan.proxy, collector)
            if len(collector.tensors) != len(plan.leaves):
                raise TypeError("zckpt.distributed saves tensors reachable through dicts, lists and tuples; "
                                f"{len(collector.tensors) - len(plan.leaves)} tensor(s) are held inside other "
                                "objects")
        return encode_skeleton(skeleton)

    # --- the commit thread -------------------------------------------------------------
    def _commit(self, keys: T.SaveKeys, seq: int, final: str, root: str, plan: RankPlan | None, tree: Any,
                local: Future, metadata: Any, fut: DistributedSaveFuture) -> None:
        try:
            verdict = self._commit_steps(keys, final, root, plan, tree, local, metadata, fut.timings)
        except BaseException as exc:  # noqa: BLE001 - a bug here must still resolve the future
            logger.exception("commit of %s failed on rank %d", final, self.rank)
            verdict = T.Verdict(False, final, {self.rank: f"{type(exc).__name__}: {exc}"})
        with self._lock:
            self._in_flight.discard(seq)
        fut.timings["verdict_unix"] = time.time()
        if "t0" in fut.timings:
            fut.timings["durable_s"] = time.perf_counter() - fut.timings.pop("t0")
        if verdict.committed:
            fut.set_result(verdict.path)
        else:
            fut.set_exception(CheckpointAborted(final, verdict.reasons))

    def _commit_steps(self, keys: T.SaveKeys, final: str, root: str, plan: RankPlan | None, tree: Any,
                      local: Future, metadata: Any, timings: dict[str, float]) -> T.Verdict:
        if self._client is None:
            self._client = T.client_of(self._store)
        store = self._client
        try:
            local.result()
            timings["local_durable_unix"] = time.time()
            rep = T.Report(True, "", plan.digest if plan is not None else "")
        except BaseException as exc:  # noqa: BLE001 - reported to every rank
            rep = T.Report(False, f"{type(exc).__name__}: {exc}", plan.digest if plan is not None else "")
        if plan is not None and plan.digest != self._digest:
            T.publish_structure(store, self._nonce, plan.digest, plan.describe)
            self._digest = plan.digest
        T.report(store, keys, self.rank, rep)
        if self.is_coordinator:
            verdict = self._decide(store, keys, final, root, plan, tree, metadata)
        else:
            verdict = T.await_verdict(store, keys, self.rank, self.coordinator, final,
                                      self.commit_timeout_s + min(VERDICT_MARGIN_S, self.commit_timeout_s))
            if verdict.path != final:   # not this save's: a garbled or foreign value in the Store
                verdict = T.Verdict(False, final, {self.coordinator: f"the verdict read names {verdict.path!r}, "
                                                                     f"not {final!r}"})
            if not verdict.committed:
                shutil.rmtree(rank_dir(root, self.rank), ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.rmdir(root)      # gone already, or the coordinator's to remove
        T.acknowledge(store, keys, self.ranks)
        return verdict

    def _decide(self, store: Any, keys: T.SaveKeys, final: str, root: str, plan: RankPlan | None, tree: Any,
                metadata: Any) -> T.Verdict:
        """The coordinator: collect, then commit or abort, and say so to every rank; an
        unexpected failure here still publishes an abort and removes the temp root."""
        try:
            return self._decide_steps(store, keys, final, root, plan, tree, metadata)
        except Exception as exc:  # noqa: BLE001 - every rank must hear a verdict
            logger.exception("the coordinator failed deciding %s", final)
            verdict = T.Verdict(False, final, {self.rank: f"the coordinator failed: {type(exc).__name__}: {exc}"})
            with contextlib.suppress(Exception):
                T.claim(store, keys, verdict.to_json())
                T.publish(store, keys, verdict)
            if not os.path.isdir(final) or os.path.isdir(root):
                shutil.rmtree(root, ignore_errors=True)
            return verdict

    def _decide_steps(self, store: Any, keys: T.SaveKeys, final: str, root: str, plan: RankPlan | None, tree: Any,
                      metadata: Any) -> T.Verdict:
        reports = T.collect(store, keys, self.ranks, time.monotonic() + self.commit_timeout_s)
        reasons = {r: (f"did not report within commit_timeout_s={self.commit_timeout_s:g}s (dead, hung, or "
                       "still writing)" if rep is None else rep.reason)
                   for r, rep in reports.items() if rep is None or not rep.ok}
        if not reasons and plan is not None:
            reasons.update(self._structure_differences(store, reports, plan))
        if not reasons and plan is not None:
            held = T.claim(store, keys, T.CLAIM_COMMITTING)
            if held != T.CLAIM_COMMITTING:
                try:
                    return T.Verdict.parse(held.encode())   # a rank gave up on us first: follow it
                except ValueError:
                    reasons[self.rank] = "the commit claim holds an unreadable value"
            else:
                try:
                    self._write_index(final, root, plan, tree, metadata)
                    verdict = T.Verdict(True, final)
                    T.publish(store, keys, verdict)
                    return verdict
                except Exception as exc:  # noqa: BLE001 - the verdict carries it to every rank
                    logger.error("commit of %s failed: %s", final, exc)
                    reasons[self.rank] = f"the coordinator could not commit: {type(exc).__name__}: {exc}"
        else:
            T.claim(store, keys, T.Verdict(False, final, reasons).to_json())
        verdict = T.Verdict(False, final, reasons)
        T.publish(store, keys, verdict)
        shutil.rmtree(root, ignore_errors=True)
        return verdict

    def _structure_differences(self, store: Any, reports: Mapping[int, T.Report | None],
                               plan: RankPlan) -> dict[int, str]:
        digests = {r: rep.digest for r, rep in reports.items() if rep is not None}
        if all(d == plan.digest for d in digests.values()):
            return {}
        mine = set(plan.describe)
        out = {}
        for r, d in digests.items():
            if d == plan.digest:
                continue
            theirs = T.read_structure(store, self._nonce, d)
            if theirs is None:
                out[r] = "its state dict's structure differs from the coordinator's"
                continue
            only_there = sorted(set(theirs) - mine)[:5]
            only_here = sorted(mine - set(theirs))[:5]
            out[r] = (f"its state dict differs from the coordinator's (rank {self.coordinator}): has "
                      f"{only_there or 'nothing more'}, lacks {only_here or 'nothing'}")
        return out

    def _write_index(self, final: str, root: str, plan: RankPlan, tree: Any, metadata: Any) -> None:
        body = build_index(root, self.ranks, plan.leaves, tree=tree, metadata=json_metadata(metadata),
                           checksum=self._checksum, created_unix=time.time())
        C.commit_dir(root, final, body, fsync=self._fsync)
        if self._keep_last is not None:
            try:
                C.apply_retention(os.path.dirname(final), self._keep_last, protect=final)
            except OSError as exc:
                logger.warning("retention under %s failed: %s", os.path.dirname(final), exc)

    # --- lifecycle ---------------------------------------------------------------------
    def close(self, timeout_s: float | None = None) -> None:
        """Let saves in flight commit (or abort), then stop the workers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._committer.shutdown(wait=True)
        self._pool.close(timeout_s)

    def kill(self) -> None:
        """Kill this rank's workers now and return; its saves in flight abort on every rank
        (their futures resolve once the verdict is read, within ``commit_timeout_s``)."""
        with self._lock:
            self._closed = True
        self._pool.kill()
        self._committer.shutdown(wait=False)   # queued commits still run: each resolves its future

    def __enter__(self) -> DistributedCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()
