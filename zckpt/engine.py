"""The engine: worker processes, their supervisor, the staging arena, job ids, lifecycle.

Both front ends compose one: :class:`zckpt.CheckpointPool` (sharded saves with a commit)
and :class:`zckpt.compat.CheckpointProcess` (torch's one-writer API). Neither reaches
into the other; what they share lives here:

- start-up (spawn the workers, run their init, bounded by ``init_timeout_s``);
- the lifecycle, one enum with its transitions in :meth:`Engine._to`::

      STARTING ──▶ READY ──▶ CLOSING ──▶ CLOSED
          │          │          │          ▲
          └──────────┴──────────┴─▶ BROKEN ┘

- job ids, unique per engine (a save, a mapping job, a compat write);
- the guards every public call runs: owner process (a fork's copy refuses), re-entry
  from a signal handler or the engine's own threads (refused instead of deadlocking);
- teardown (graceful or forceful), a cleanup thread, and the last-resort finalizer.

The front end keeps its own record of work in flight; the engine asks for it through
callables it is handed (never stored as bound methods of the front end, so the
finalizer does not keep the front end alive).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from typing import Any

from .arena import Arena
from .config import PoolConfig
from .errors import PoolClosedError, ReentrantSaveError
from .supervisor import ShardJob, Supervisor

__all__ = ["Engine", "PoolState"]

logger = logging.getLogger(__name__)

# Timing margins, each with its reason. The supervisor enforces the configured deadlines
# itself; these bound the waits of the threads that wait *for* the supervisor.
#: Past init_timeout_s the supervisor kills a worker that did not start; this covers
#: killing and reaping it (SIGKILL, then a bounded wait) before start-up reports.
START_REAP_MARGIN_S = 10.0
#: kill() and a failed start: SIGKILL is immediate; reaping and closing sockets take ms.
KILL_TEARDOWN_S = 10.0
#: After close()'s deadline: the supervisor kills what is left and reaps it (<= 5 s each).
SUPERVISOR_JOIN_MARGIN_S = 10.0
#: A supervisor thread that did not stop in time: kill workers from here and wait this long.
SUPERVISOR_LAST_JOIN_S = 5.0


class PoolState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    CLOSING = "closing"
    BROKEN = "broken"
    CLOSED = "closed"


_ALLOWED: dict[PoolState, frozenset[PoolState]] = {
    PoolState.STARTING: frozenset({PoolState.READY, PoolState.CLOSING, PoolState.BROKEN, PoolState.CLOSED}),
    PoolState.READY: frozenset({PoolState.CLOSING, PoolState.BROKEN, PoolState.CLOSED}),
    PoolState.CLOSING: frozenset({PoolState.BROKEN, PoolState.CLOSED}),
    PoolState.BROKEN: frozenset({PoolState.CLOSED}),
    PoolState.CLOSED: frozenset(),
}


class Engine:
    """Workers, supervisor and arena, started and torn down as one.

    Args:
        config: the pool's configuration.
        payload: cloudpickled ``(init_fn, init_args, writer_factory, writer_kwargs)``.
        writer_method: what the workers' writer must provide (``"write_file"`` for the
            pool's shards, ``"write"`` for compat's whole state dicts).
        round_bytes: arena segment rounding (2 MiB for shards, a page for compat's
            one-segment-per-storage layout).
        api: the front end's name in messages (``"checkpoint pool"``, ``"checkpoint process"``).

    Blocks until every worker has started (at most ``init_timeout_s`` plus
    ``START_REAP_MARGIN_S``); raises what start-up raised, after tearing down.
    """

    def __init__(self, config: PoolConfig, payload: bytes, *, writer_method: str, round_bytes: int,
                 api: str = "checkpoint pool") -> None:
        self.owner_pid = os.getpid()
        self.config = config
        self.api = api
        self._obj = api.split()[-1]   # how calls are named in messages: pool.save(), process.write()
        # Re-entrant: a signal handler may read stats/state or close() while the code it
        # interrupted holds the lock (a plain Lock would deadlock that thread).
        self.lock = threading.RLock()
        # Per thread: how deep in save()/reserve() it is (a signal handler re-enters the
        # interrupted thread), and whether it is one of the engine's own threads.
        self.local = threading.local()
        self._state = PoolState.STARTING
        self.cause: BaseException | None = None
        self._next_job = 0
        self._finalizer: weakref.finalize | None = None
        self.arena = Arena(config.staging_buffers, name=f"{os.getpid()}-{id(self):x}", round_bytes=round_bytes,
                           budget=config.staging_budget_bytes)
        self.cleanup = self.internal_executor("zckpt-cleanup")
        self.supervisor = Supervisor(config, payload, writer_method, self._on_broken)
        t0 = time.perf_counter()
        self.supervisor.start()
        sup = self.supervisor
        try:
            started = sup.started_ok.wait(config.init_timeout_s + START_REAP_MARGIN_S)
        except BaseException:  # Ctrl-C during start-up: nothing else could ever stop these workers
            self.teardown(kill=True, deadline=time.monotonic() + KILL_TEARDOWN_S)
            raise
        if not started or sup.start_error:
            err = sup.start_error or TimeoutError(
                f"timed out after {config.init_timeout_s:.1f}s waiting for checkpoint workers to start")
            self.teardown(kill=True, deadline=time.monotonic() + KILL_TEARDOWN_S)
            raise err
        with self.lock:
            if self._state is PoolState.STARTING:
                self._to(PoolState.READY)
        self.startup_s = time.perf_counter() - t0
        _LIVE_ENGINES.add(self)

    # --- state -------------------------------------------------------------------------
    @property
    def state(self) -> PoolState:
        with self.lock:
            return self._state

    def _to(self, new: PoolState, cause: BaseException | None = None) -> bool:
        """The one place the state changes (call with ``lock`` held); False if not allowed."""
        old = self._state
        if new is old:
            return True
        if new not in _ALLOWED[old]:
            return False
        self._state = new
        if cause is not None and self.cause is None:
            self.cause = cause
        logger.debug("%s %s -> %s", self.api, old.value, new.value)
        return True

    def begin_close(self) -> bool:
        """READY/STARTING -> CLOSING; False if already closed (nothing to do)."""
        with self.lock:
            if self._state is PoolState.CLOSED:
                return False
            if self._state in (PoolState.READY, PoolState.STARTING):
                self._to(PoolState.CLOSING)
            return True

    def begin_kill(self) -> bool:
        """Mark the engine killed (BROKEN) and SIGKILL the workers; False if already closed."""
        with self.lock:
            if self._state is PoolState.CLOSED:
                return False
            self._to(PoolState.BROKEN, PoolClosedError(f"the {self.api} was killed"))
        self.supervisor.kill_now()
        return True

    def _on_broken(self, cause: BaseException) -> None:
        """Supervisor callback: the workers cannot serve any more."""
        with self.lock:
            if self._state in (PoolState.READY, PoolState.STARTING, PoolState.CLOSING):
                self._to(PoolState.BROKEN, cause)
        logger.error("%s broken: %s", self.api, cause)

    def closed_error(self) -> PoolClosedError:
        """The error a refused call raises, naming why (call with ``lock`` held)."""
        if self._state is PoolState.BROKEN and self.cause is not None:
            err = PoolClosedError(f"the {self.api} is broken: {self.cause}")
            err.__cause__ = self.cause
            return err
        return PoolClosedError(f"the {self.api} is {self._state.value}")

    def new_job_id(self) -> int:
        with self.lock:
            job_id = self._next_job
            self._next_job += 1
            return job_id

    def submit(self, job: ShardJob) -> None:
        self.supervisor.submit(job)

    # --- guards ------------------------------------------------------------------------
    def check_owner(self) -> None:
        if os.getpid() != self.owner_pid:
            raise PoolClosedError(
                f"this {self.api} belongs to process {self.owner_pid}; process {os.getpid()} is a "
                "fork of it and cannot use it (its workers, sockets and staging memory are the parent's): "
                f"create a new {self.api} in the child")

    def check_open(self) -> None:
        self.check_owner()
        with self.lock:
            if self._state is not PoolState.READY:
                raise self.closed_error()

    def forked_child(self, call: str) -> bool:
        """True (and logs) in a forked child, where close/kill/finalization must do nothing."""
        if os.getpid() == self.owner_pid:
            return False
        logger.debug("%s.%s() ignored in process %d: it belongs to process %d", self._obj, call, os.getpid(),
                     self.owner_pid)
        return True

    def refuse_internal_thread(self, call: str) -> None:
        if getattr(self.local, "internal", False) or threading.current_thread() is self.supervisor:
            raise ReentrantSaveError(
                f"{self._obj}.{call}() was called on the {self.api}'s own thread "
                f"{threading.current_thread().name!r} (future callbacks run there), which it would wait for: "
                "call it from your own thread, e.g. after fut.result() returns")

    @contextlib.contextmanager
    def entered(self, call: str) -> Iterator[None]:
        """Around a call that may wait for a staging buffer: refuse at once what would wait on itself.

        A signal handler runs on the thread it interrupted, so a save() from a handler
        that interrupted save() would wait (up to ``save_timeout_s``) for the buffer its
        own thread holds.
        """
        self.check_owner()
        self.refuse_internal_thread(call)
        local = self.local
        if getattr(local, "depth", 0):
            raise ReentrantSaveError(
                f"{self._obj}.{call}() was called on thread {threading.current_thread().name!r} while that "
                f"thread is inside {self._obj}.{local.inside}() of the same {self.api} (a signal handler or "
                "callback interrupted it): it would wait for the staging buffer its own thread holds. Set a "
                f"flag in the handler and call {call}() after the interrupted call returns")
        local.depth, local.inside = 1, call
        try:
            yield
        finally:
            local.depth, local.inside, local.staging = 0, None, None

    # --- threads and teardown ----------------------------------------------------------
    def internal_executor(self, name: str) -> ThreadPoolExecutor:
        """A one-thread executor whose thread the guards know as the engine's own."""
        return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_mark_internal, initargs=(self.local,))

    def submit_cleanup(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn`` on the cleanup thread, or here once that takes no more work.

        It stops at teardown and at interpreter exit (before the finalizer drains the
        work in flight); ``fn`` runs either way.
        """
        try:
            self.cleanup.submit(fn, *args)
        except RuntimeError:  # cannot schedule new futures after (interpreter) shutdown
            fn(*args)

    def arm_finalizer(self, owner: object, in_flight: Callable[[], Sequence[Future]]) -> None:
        """At interpreter exit or when ``owner`` is collected unclosed, drain and tear down.

        ``in_flight`` returns the futures of work still running; it must not reference
        ``owner`` (or the finalizer would keep it alive).
        """
        self._finalizer = weakref.finalize(owner, _finalize, self.owner_pid, self.supervisor, self.arena,
                                           self.cleanup, in_flight, self.config.shutdown_timeout_s)

    @property
    def finalizer_alive(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def teardown(self, kill: bool, deadline: float, before_close: Callable[[], None] | None = None) -> None:
        """Stop the supervisor and workers (gracefully until ``deadline``, or now), then
        run ``before_close`` (fail what the workers never answered, stop the front end's
        threads), drain the cleanup thread, close the arena: CLOSED."""
        sup = self.supervisor
        if kill:
            sup.kill_now()
        else:
            sup.shutdown(deadline)
        if sup.is_alive() or not sup.finished.is_set():
            sup.join(timeout=max(0.0, deadline - time.monotonic()) + SUPERVISOR_JOIN_MARGIN_S)
        if sup.is_alive():
            logger.error("supervisor thread did not stop; killing workers directly")
            sup.kill_now()
            sup.join(timeout=SUPERVISOR_LAST_JOIN_S)
        if before_close is not None:
            before_close()
        self.cleanup.shutdown(wait=True)
        self.arena.close()
        with self.lock:
            self._to(PoolState.CLOSED)
        if self._finalizer is not None:
            self._finalizer.detach()

    def reset_locks_after_fork(self) -> None:
        # fork() copies each lock in the state another thread held it, without the thread
        # that would release it: fresh locks let a child read stats/state without hanging
        # (every call that would act refuses at once there).
        self.lock = threading.RLock()
        self.arena.reset_locks_after_fork()
        self.supervisor.reset_locks_after_fork()


def wait_all(futures: Sequence[Future], deadline: float) -> None:
    """Wait for each future to finish (its outcome ignored) until ``deadline``."""
    for fut in futures:
        try:
            fut.exception(timeout=max(0.0, deadline - time.monotonic()))
        except (FutureTimeout, CancelledError):  # what is still running is killed after
            pass


def _finalize(owner_pid: int, supervisor: Supervisor, arena: Arena, cleanup: ThreadPoolExecutor,
              in_flight: Callable[[], Sequence[Future]], drain_s: float) -> None:
    """Last resort when the interpreter exits (or a front end is garbage-collected) unclosed.

    Work still in flight gets up to ``drain_s`` (``shutdown_timeout_s``) to finish, as
    ``close()`` would give it: a save holds a consistent snapshot, and a trainer's last
    ``save()`` before exiting should not be lost silently. Then the workers are killed
    and the socket directory and arena removed. In a forked child it does nothing.
    """
    if os.getpid() != owner_pid:
        return
    # The last reference may die on the supervisor thread itself (a save's callback held
    # it): that thread can neither wait for saves it would have to finish nor join itself.
    on_supervisor = threading.current_thread() is supervisor
    try:
        pending = in_flight()
        if pending and supervisor.is_alive() and not on_supervisor:
            logger.warning("exiting with %d checkpoint save(s) in flight and the pool not closed: waiting up to "
                           "%.0fs for them to commit (close the pool to decide yourself)", len(pending), drain_s)
            wait_all(pending, time.monotonic() + drain_s)
        if supervisor.is_alive():
            supervisor.kill_now()
            if not on_supervisor:
                supervisor.join(timeout=SUPERVISOR_LAST_JOIN_S)
    finally:
        cleanup.shutdown(wait=False)
        arena.close()


def _mark_internal(local: threading.local) -> None:
    """Initializer of the engine's executor threads: calls made there are refused."""
    local.internal = True


# Engines of this process, for the fork handler below.
_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _reset_locks_in_child() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.reset_locks_after_fork()


os.register_at_fork(after_in_child=_reset_locks_in_child)
