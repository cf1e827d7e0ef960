"""The checkpoint process: torch's ``CheckpointProcess`` API on a one-worker zckpt pool."""

from __future__ import annotations

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
from typing import Any

from .. import protocol as P
from .._proc import kill_quietly
from ..config import PoolConfig
from ..errors import WorkerInitError
from ..pool import CheckpointPool
from ..stager import layout_state, stage_state, tensor_specs
from ..supervisor import ShardJob
from ..tree import Collector, dump_skeleton, gc_paused
from .errors import CheckpointWriteError, compat_error
from .types import CheckpointProcessConfig, RankInfo

__all__ = ["CheckpointProcess"]

logger = logging.getLogger(__name__)


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
        bufset = self._arena.acquire(sizes, self.config.buffer_wait_timeout_s, pin=pin)
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
            raise compat_error(exc) from exc.__cause__

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
