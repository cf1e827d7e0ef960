"""Drop-in replacement for ``torch.distributed.checkpoint._experimental``'s CheckpointProcess.

Switch with one import::

    # from torch.distributed.checkpoint._experimental.checkpoint_process import ...
    from zckpt.compat import CheckpointProcess, CheckpointProcessConfig, RankInfo, ...

Same constructor arguments, defaults and behaviour as torch 2.13: the constructor
returns at once and ``process_creation_future`` resolves when the worker has run its
init (``TimeoutError`` past ``subprocess_init_timeout_secs``, ``RuntimeError`` if init
or the writer factory raised); ``write()`` returns a ``Future``; the writer in the worker
receives tensors in shared memory (``is_shared()``), and tensors the caller already put
in shared memory are the very same memory (no copy: the caller must not mutate them
until the future resolves); ``close()`` terminates gracefully, then kills;
``process.processes[0]`` has ``pid``, ``is_alive()`` and ``kill()``; a dead worker makes
``write()`` fail with ``RuntimeError("Child process terminated unexpectedly ...")``.

Deliberate differences from torch:

- It runs on zckpt's pool: a ZeroMQ control plane with heartbeats, a memfd staging
  arena, a worker that starts without importing torch until its writer needs it.
- A tensor that is not yet in shared memory is copied into the reusable arena, instead
  of being moved into freshly allocated shared memory in place (which costs page
  faults on every save and changes the caller's tensor). Each storage gets a segment of
  its own (page-rounded, reused from write to write), mapped in the worker as a shared
  storage of exactly the caller's size: the writer sees what the original's sees, and
  ``torch.save`` writes the same file. The trainer holds one fd per staged storage.
- ``close()`` is bounded by ``subprocess_shutdown_timeout_secs`` even when a write hangs
  (the original waits for the write forever).
- ``CheckpointWriter`` fsyncs the file it writes (the original does not).
- Errors are zckpt errors too (``ChildProcessTerminatedError`` is a ``RuntimeError`` and a
  :class:`zckpt.WorkerDiedError`), and carry the worker's traceback as ``__cause__``.
"""

from __future__ import annotations

import abc
import functools
import logging
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from . import protocol as P
from ._proc import kill_quietly
from .config import PoolConfig
from .errors import PoolClosedError, WorkerDiedError, WorkerInitError, ZckptError
from .pool import CheckpointPool
from .stager import layout_state, stage_state, tensor_specs
from .supervisor import ShardJob
from .tree import Collector, dump_skeleton, gc_paused

__all__ = [
    "CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse",
    "CheckpointWriter", "CheckpointWriterConfig", "WriterHook", "RankInfo", "STATE_DICT",
    "ChildProcessTerminatedError", "CheckpointWriteError",
]

logger = logging.getLogger(__name__)

STATE_DICT = dict[str, Any]


# --- the original's data types ----------------------------------------------------------
@dataclass
class RankInfo:
    """Rank of this process and the world size (passed to the writer as ``rank_info``)."""

    global_rank: int
    global_world_size: int


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the checkpoint process, in seconds (same defaults as torch)."""

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60


class RequestType(Enum):
    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "exit"


@dataclass
class WorkerRequest:
    """A request to the worker (kept for API compatibility; zckpt's wire format differs)."""

    request_type: RequestType
    payload: dict[str, Any]


@dataclass
class WorkerResponse:
    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: dict[str, Any] | None = None


@dataclass
class CheckpointWriterConfig:
    """Options of :class:`CheckpointWriter` (same default as torch)."""

    write_barrier_timeout_secs: int = 600


class WriterHook(abc.ABC):
    """Callbacks around a checkpoint commit."""

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after the file is written, before the barrier."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after the barrier."""


class CheckpointWriter:
    """Writes ``<path>/checkpoint_<rank>.pt`` with ``torch.save``, then fsyncs it.

    Args:
        config: writer options.
        rank_info: this process's rank (names the file).
        barrier: optional object with ``execute_barrier()``, run between the hooks.
        commit_hook: optional :class:`WriterHook`.
    """

    def __init__(self, config: CheckpointWriterConfig, rank_info: RankInfo, barrier: Any = None,
                 commit_hook: WriterHook | None = None) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> Future | None:
        full_path = Path(path) / f"checkpoint_{self._rank_info.global_rank}.pt"
        os.makedirs(full_path.parent, exist_ok=True)
        # By name, as the original does: torch.save names the zip's root after the file
        # ("checkpoint_0/"), so the file is the original's byte for byte; then fsync it.
        torch.save(state_dict, str(full_path))
        fd = os.open(full_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._commit_hook is not None:
            self._commit_hook.pre_commit(path, **kwargs)
        if self._barrier is not None:
            self._barrier.execute_barrier()
        if self._commit_hook is not None:
            self._commit_hook.post_commit(path, **kwargs)
        logger.info("wrote checkpoint %s", full_path)
        return None

    def close(self) -> None:
        """Release resources (nothing to release here)."""


# --- errors ---------------------------------------------------------------------------------
class ChildProcessTerminatedError(WorkerDiedError, RuntimeError):
    """The checkpoint process died (the original raises a plain ``RuntimeError``)."""


class CheckpointWriteError(ZckptError, RuntimeError):
    """The worker's writer or init raised; ``__cause__`` holds the remote error."""


def _compat_error(exc: BaseException) -> BaseException:
    died = exc if isinstance(exc, WorkerDiedError) else None
    if isinstance(exc, PoolClosedError) and isinstance(exc.__cause__, WorkerDiedError):
        died = exc.__cause__
    if died is not None:
        err: BaseException = ChildProcessTerminatedError(f"Child process terminated unexpectedly: {died}")
    elif isinstance(exc, (TimeoutError, PoolClosedError)):
        return exc
    else:
        remote = getattr(exc.__cause__, "tb", None) or str(exc)
        err = CheckpointWriteError(f"Unexpected response from worker process: {remote}")
    err.__cause__ = exc
    return err


# --- the pool underneath ----------------------------------------------------------------------
class _StatePool(CheckpointPool):
    """A one-worker pool whose worker calls ``writer.write(path, state_dict, **kwargs)``."""

    _WRITER_METHOD = "write"
    # One segment per storage (see stager.layout_state): page-sized rounding, not 2 MiB.
    _ARENA_ROUND_BYTES = mmap.PAGESIZE

    def write_state(self, state_dict: Any, path: str, kwargs: dict[str, Any]) -> Future:
        self._check_open()
        with gc_paused():
            collector = Collector()
            collector.walk(state_dict)
            # cloudpickle, as the original's spawn start method re-imports __main__:
            # classes defined in the training script reach the worker by value.
            tree = dump_skeleton(state_dict, collector, by_value=True)
        slots, sizes, refs = layout_state(collector.storages)
        pin = any(st.device.type == "cuda" for st, _ in collector.storages)
        bufset = self._arena.acquire(sizes, self.config.save_timeout_s, pin=pin)
        try:
            storages = stage_state(collector.storages, slots, refs, bufset)
            tensors = tensor_specs(collector)
        except BaseException:
            self._arena.release(bufset)
            raise
        finally:
            collector.release()  # nothing of the caller's is referenced once staged
        fut: Future = Future()
        with self._lock:
            job_id = self._next_save
            self._next_save += 1
        msg = P.WriteState(job_id, os.fspath(path), tree, storages, tensors, dict(kwargs), self._arena.live_keys())
        self._supervisor.submit(ShardJob(0, msg, functools.partial(_write_done, self._arena, bufset, fut),
                                         time.monotonic() + self.config.save_timeout_s, describe=os.fspath(path)))
        return fut


def _write_done(arena: Any, bufset: Any, fut: Future, result: P.JobResult | None,
                exc: BaseException | None) -> None:
    """Runs on the supervisor thread when the worker answers a write."""
    arena.release(bufset)
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(None)


class _WorkerProcess:
    """What ``process.processes[i]`` is: the worker's pid, liveness, and kill."""

    def __init__(self, pool: _StatePool | None, index: int) -> None:
        self._pool, self._index = pool, index

    def _popen(self) -> Any:
        return self._pool._supervisor.slot_process(self._index) if self._pool is not None else None

    @property
    def pid(self) -> int | None:
        p = self._popen()
        return p.pid if p is not None else None

    def is_alive(self) -> bool:
        p = self._popen()
        return p is not None and p.poll() is None

    @property
    def exitcode(self) -> int | None:
        p = self._popen()
        return p.poll() if p is not None else None

    def kill(self) -> None:
        p = self._popen()
        if p is not None and p.poll() is None:
            kill_quietly(p.pid, signal.SIGKILL)


class _ProcessContext:
    """What ``CheckpointProcess.process`` is: ``processes`` and ``join(timeout)``."""

    def __init__(self, pool: _StatePool) -> None:
        self.processes = [_WorkerProcess(pool, 0)]

    def join(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) for the worker to exit; True if it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self.processes:
            popen = proc._popen()
            if popen is None:
                continue
            try:
                popen.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


class CheckpointProcess:
    """Writes checkpoints from a separate process (torch's experimental API, on zckpt).

    Args:
        rank_info: this process's rank; given to the writer as ``rank_info`` unless
            ``checkpoint_writer_init_args`` has one.
        config: timeouts.
        subprocess_init_fn: called as ``subprocess_init_fn(*subprocess_init_args)`` in
            the worker (cloudpickled: lambdas and closures work).
        subprocess_init_args: its arguments.
        checkpoint_writer_init_fn: called as ``fn(**checkpoint_writer_init_args)`` in the
            worker; returns an object with ``write(path, state_dict, **kwargs)``.
        checkpoint_writer_init_args: its keyword arguments.
    """

    def __init__(self, rank_info: RankInfo, config: CheckpointProcessConfig,
                 subprocess_init_fn: Callable[..., None], subprocess_init_args: tuple[Any, ...],
                 checkpoint_writer_init_fn: Callable[..., Any],
                 checkpoint_writer_init_args: dict[str, Any]) -> None:
        self._rank_info = rank_info
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zckpt-compat")
        self._pool: _StatePool | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.process: _ProcessContext | None = None
        writer_args = dict(checkpoint_writer_init_args)
        writer_args.setdefault("rank_info", rank_info)
        self.process_creation_future: Future = self._executor.submit(
            self._create, subprocess_init_fn, tuple(subprocess_init_args), checkpoint_writer_init_fn, writer_args)

    def _create(self, init_fn: Callable[..., None], init_args: tuple, writer_fn: Callable[..., Any],
                writer_args: dict[str, Any]) -> None:
        timeout = float(self._config.subprocess_init_timeout_secs)
        cfg = PoolConfig(num_workers=1, init_timeout_s=timeout, replace_dead_workers=False,
                         shutdown_timeout_s=float(self._config.subprocess_shutdown_timeout_secs))
        logger.info("creating checkpoint process for rank %d", self._rank_info.global_rank)
        try:
            pool = _StatePool(config=cfg, init_fn=init_fn, init_args=init_args,
                              writer_factory=writer_fn, writer_kwargs=writer_args)
        except TimeoutError as exc:
            raise TimeoutError(f"Timed out after {timeout:g}s waiting for checkpoint subprocess to "
                               f"initialize ({exc})") from exc
        except WorkerInitError as exc:
            err = CheckpointWriteError(f"Unexpected response from worker process: {exc.remote_traceback or exc}")
            raise err from exc
        with self._lock:
            self._pool = pool
            self.process = _ProcessContext(pool)
            if self._closed:  # close() ran while we were starting
                pool.kill()

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Future | None:
        """Write ``state_dict`` (or a ``Future`` of one) to ``path`` in the worker.

        Waits for the worker to be up, then returns a ``Future`` that resolves when the
        writer returns. Tensors are read until then: do not mutate them before.
        """
        self.process_creation_future.result()
        return self._executor.submit(self._write, state_dict, path, kwargs)

    def _write(self, state_dict: Any, path: str, kwargs: dict[str, Any]) -> None:
        sd = state_dict.result() if isinstance(state_dict, Future) else state_dict
        pool = self._pool
        if pool is None:
            raise RuntimeError("Child process terminated unexpectedly: the checkpoint process is not running")
        try:
            fut = pool.write_state(sd, os.fspath(path), kwargs)
            fut.result()
        except BaseException as exc:  # noqa: BLE001
            raise _compat_error(exc) from exc.__cause__

    def close(self) -> None:
        """Terminate the worker gracefully; kill it past ``subprocess_shutdown_timeout_secs``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        limit = float(self._config.subprocess_shutdown_timeout_secs)
        deadline = time.monotonic() + limit
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:
            self.process_creation_future.result(timeout=limit)
        except Exception:  # noqa: BLE001 - a failed or slow start leaves nothing running to stop
            pass
        pool = self._pool
        if pool is None:
            return
        # The supervisor lets the write in flight finish, then sends TERMINATE; past the
        # deadline it kills (the original waits for the write forever).
        proc = self.process.processes[0] if self.process else None
        if self.process is not None and proc is not None and proc.is_alive():
            pool._supervisor.shutdown(deadline)
            if not self.process.join(timeout=max(0.0, deadline - time.monotonic())):
                logger.warning("checkpoint process (pid %s) did not exit within %gs; killing it", proc.pid, limit)
                proc.kill()
        pool._teardown(kill=False, deadline=deadline)
