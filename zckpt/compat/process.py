"""The checkpoint process: torch's ``CheckpointProcess`` API on a one-worker zckpt engine."""

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

import cloudpickle

from .. import protocol as P
from .._proc import kill_quietly
from ..config import PoolConfig
from ..engine import KILL_TEARDOWN_S, Engine, wait_all
from ..errors import WorkerInitError
from ..stager import layout_state, stage_state, tensor_specs
from ..supervisor import ShardJob
from ..tree import Collector, dump_skeleton, gc_paused
from .errors import CheckpointWriteError, compat_error
from .types import CheckpointProcessConfig, RankInfo

__all__ = ["CheckpointProcess"]

logger = logging.getLogger(__name__)


# --- the engine underneath -------------------------------------------------------------------
class _StateWriter:
    """One worker that calls ``writer.write(path, state_dict, **kwargs)``, on zckpt's engine.

    Composes an :class:`~zckpt.engine.Engine` (workers, supervisor, arena, job ids,
    teardown) as :class:`zckpt.CheckpointPool` does; what it adds is staging a whole
    state dict, one arena segment per storage, and the ``WriteState`` job.
    """

    def __init__(self, config: PoolConfig, payload: bytes) -> None:
        # One segment per storage (see stager.layout_state): page-sized rounding, not 2 MiB.
        self.engine = Engine(config, payload, writer_method="write", round_bytes=mmap.PAGESIZE,
                             api="checkpoint process")
        self._writes: dict[int, Future] = {}   # in flight, for close() and the finalizer
        self.engine.arm_finalizer(self, functools.partial(_futures_of, self._writes, self.engine))

    def write_state(self, state_dict: Any, path: str, kwargs: dict[str, Any]) -> Future:
        """Stage ``state_dict`` (blocking while it copies), then have the worker write it."""
        engine = self.engine
        engine.check_open()
        with gc_paused():
            collector = Collector()
            collector.walk(state_dict)
            # cloudpickle, as the original's spawn start method re-imports __main__:
            # classes defined in the training script reach the worker by value.
            tree = dump_skeleton(state_dict, collector, by_value=True)
        slots, sizes, refs = layout_state(collector.storages)
        pin = any(st.device.type == "cuda" for st, _ in collector.storages)
        bufset = engine.arena.acquire(sizes, engine.config.buffer_wait_timeout_s, pin=pin)
        try:
            storages = stage_state(collector.storages, slots, refs, bufset)
            tensors = tensor_specs(collector)
        except BaseException:
            engine.arena.release(bufset)
            raise
        finally:
            collector.release()  # nothing of the caller's is referenced once staged
        fut: Future = Future()
        job_id = engine.new_job_id()
        with engine.lock:
            self._writes[job_id] = fut
        msg = P.WriteState(job_id, os.fspath(path), tree, storages, tensors, dict(kwargs), engine.arena.live_keys())
        engine.submit(ShardJob(0, msg, functools.partial(self._written, job_id, bufset, fut),
                               time.monotonic() + engine.config.save_timeout_s, describe=os.fspath(path)))
        return fut

    def _written(self, job_id: int, bufset: Any, fut: Future, result: P.JobResult | None,
                 exc: BaseException | None) -> None:
        """Runs on the supervisor thread when the worker answers a write."""
        self.engine.arena.release(bufset)
        with self.engine.lock:
            self._writes.pop(job_id, None)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    def shutdown(self, deadline: float, kill: bool = False) -> None:
        """Let the write in flight finish until ``deadline`` (or kill now), then tear down."""
        engine = self.engine
        if kill:
            if engine.begin_kill():
                engine.teardown(kill=True, deadline=deadline)
            return
        if engine.begin_close():
            with engine.lock:
                pending = list(self._writes.values())
            wait_all(pending, deadline)
            if any(not f.done() for f in pending):
                logger.warning("checkpoint process (pid %s): a write did not finish within the shutdown timeout; "
                               "killing it", engine.supervisor.worker_pids)
            engine.teardown(kill=False, deadline=deadline)


def _payload(init_fn: Callable[..., None], init_args: tuple, writer_fn: Callable[..., Any],
             writer_args: dict[str, Any]) -> bytes:
    try:
        return cloudpickle.dumps((init_fn, tuple(init_args), writer_fn, dict(writer_args)))
    except Exception as exc:
        raise TypeError(f"subprocess_init_fn, its args, checkpoint_writer_init_fn or its args cannot be pickled: "
                        f"{exc}") from exc


def _futures_of(writes: dict[int, Future], engine: Engine) -> list[Future]:
    with engine.lock:
        return list(writes.values())


class _WorkerProcess:
    """What ``process.processes[i]`` is: the worker's pid, liveness, and kill."""

    def __init__(self, writer: _StateWriter | None, index: int) -> None:
        self._writer, self._index = writer, index

    def _popen(self) -> Any:
        return self._writer.engine.supervisor.slot_process(self._index) if self._writer is not None else None

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

    def __init__(self, writer: _StateWriter) -> None:
        self.processes = [_WorkerProcess(writer, 0)]

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
        self._writer: _StateWriter | None = None
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
            writer = _StateWriter(cfg, _payload(init_fn, init_args, writer_fn, writer_args))
        except TimeoutError as exc:
            raise TimeoutError(f"Timed out after {timeout:g}s waiting for checkpoint subprocess to "
                               f"initialize ({exc})") from exc
        except WorkerInitError as exc:
            err = CheckpointWriteError(f"Unexpected response from worker process: {exc.remote_traceback or exc}")
            raise err from exc
        with self._lock:
            self._writer = writer
            self.process = _ProcessContext(writer)
            if self._closed:  # close() ran while we were starting
                writer.shutdown(time.monotonic() + KILL_TEARDOWN_S, kill=True)

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Future | None:
        """Write ``state_dict`` (or a ``Future`` of one) to ``path`` in the worker.

        Waits for the worker to be up, then returns a ``Future`` that resolves when the
        writer returns. Tensors are read until then: do not mutate them before.
        """
        self.process_creation_future.result()
        return self._executor.submit(self._write, state_dict, path, kwargs)

    def _write(self, state_dict: Any, path: str, kwargs: dict[str, Any]) -> None:
        sd = state_dict.result() if isinstance(state_dict, Future) else state_dict
        writer = self._writer
        if writer is None:
            raise RuntimeError("Child process terminated unexpectedly: the checkpoint process is not running")
        try:
            fut = writer.write_state(sd, os.fspath(path), kwargs)
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
        writer = self._writer
        if writer is not None:
            # The write in flight may finish, then the worker gets TERMINATE; past the
            # deadline it is killed (the original waits for the write forever).
            writer.shutdown(deadline)
