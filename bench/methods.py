"""Every save method the bench compares, in one registry: raw limits, torch peers, zckpt.

A method is a :class:`Method` subclass with four steps:

- set-up: ``start(sd)`` builds whatever it keeps between saves (timed as start-up);
- save: ``save(sd, path)`` starts one save and returns a :class:`Pending`;
- wait: ``Pending.wait()`` tells when the caller may mutate its tensors again
  (``staged``) and when the method's own work is finished (``done``); ``bench_fsync``
  then makes the output durable for methods that do not fsync themselves;
- teardown: ``close()`` (graceful, bounded by the runner) and ``kill()`` (forceful).

``load(path, expected)`` reads a checkpoint back for the correctness check. The
:data:`REGISTRY` lists every method with its name and group (``raw``, ``peers``,
``zckpt``); scripts pick them with :func:`select` and build them with
:func:`make_method`. Nothing here prints: the scripts report through ``report.py``.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    StateDict,
    clone_state_dict,
    compare,
    fsync_path,
    fsync_tree,
    iter_tensors,
    make_state_dict,
    map_tensors,
    mutate_in_place,
)

# ----------------------------------------------------------------------------------
# Completion handles
# ----------------------------------------------------------------------------------


class Stamp:
    """Wraps a future-like object and remembers when it completed.

    The done-callback runs in the completing thread, so its timestamp is when the
    work finished, not when the runner's thread got round to noticing.
    """

    def __init__(self, fut: Any) -> None:
        self._fut = fut
        self._t: float | None = None
        add = getattr(fut, "add_done_callback", None)
        if add is not None:
            add(self._on_done)
        try:
            self._takes_timeout = "timeout" in inspect.signature(fut.result).parameters
        except (TypeError, ValueError):
            self._takes_timeout = True

    def done(self) -> bool:
        """Whether the wrapped future has completed (without waiting)."""
        return bool(self._fut.done())

    def _on_done(self, _fut: Any) -> None:
        if self._t is None:
            self._t = time.perf_counter()

    def wait(self, timeout: float) -> float:
        """Block until done (raising its error, or TimeoutError); return the completion time."""
        if self._takes_timeout:
            self._fut.result(timeout=timeout)
        else:  # a future without a timeout argument: still honour the contract
            self._fut.result()
        now = time.perf_counter()
        # The callback may not have run yet (callbacks run after waiters wake).
        return self._t if self._t is not None else now


@dataclass
class Pending:
    """What ``Method.save`` hands back.

    ``staged``: completes when the caller may mutate its tensors; None means as soon as
    ``save()`` returned. ``done``: completes when the method's own work is finished
    (for methods that fsync themselves, when the data is durable); None means when
    ``save()`` returned.
    """

    staged: Stamp | None = None
    done: Stamp | None = None

    def stamps(self) -> list[Stamp]:
        """The handles there are to wait for."""
        return [s for s in (self.staged, self.done) if s is not None]

    def wait(self, t_returned: float, timeout: float) -> tuple[float, float]:
        """Wait for both; return (when the caller may mutate, when the method is done).

        The caller cannot mutate before the call returned, nor be done before it may
        mutate: clamped so a callback that fired early cannot undercut that.
        """
        t_staged = t_returned if self.staged is None else max(t_returned, self.staged.wait(timeout))
        t_done = t_staged if self.done is None else max(t_staged, self.done.wait(timeout))
        return t_staged, t_done


# ----------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------


class Method:
    """One way to save a state dict. Subclasses override what they need."""

    name: str = "?"
    #: Registry group ("raw", "peers", "zckpt"); set by :func:`make_method`.
    group: str = ""
    #: Who makes the output durable: "self" (the method fsyncs), "bench" (the bench
    #: fsyncs files and directories after the method finished), "dirs" (the method
    #: fsyncs its files, the bench the directories), "none" (nothing on disk).
    fsync: str = "bench"
    #: Default note shown in the table's note column.
    note: str = ""
    #: Whether the method needs a 1-rank gloo process group.
    needs_process_group: bool = False
    #: Whether mutating the caller's tensors during a save can crash the caller; the
    #: runner then does the tearing run in a separate process (see isolated_tearing_run).
    tearing_may_crash: bool = False

    def state_dict_for_save(self, base: StateDict) -> StateDict:
        """The state dict the next save will be given (untimed). Default: the shared one."""
        return base

    def start(self, sd: StateDict) -> None:
        """Build what the method keeps between saves (pool, process, buffer)."""

    def save(self, sd: StateDict, path: Path) -> Pending:
        """Start one save of ``sd`` to the fresh, not-yet-existing ``path``."""
        raise NotImplementedError

    def load(self, path: Path, expected: StateDict) -> Any:
        """Read the checkpoint at ``path`` back as a nested dict (``expected`` gives
        the structure, for formats that load into a template)."""
        raise NotImplementedError

    def child_pids(self) -> list[int]:
        """Pids of processes this method started (for the last-resort kill)."""
        return []

    def close(self) -> None:
        """Graceful shutdown. The runner bounds it with a deadline, then calls kill()."""

    def kill(self) -> None:
        """Forceful shutdown: must not block for long."""

    def last_timings(self) -> dict[str, float]:
        """Where the last save's time went, as the method reports it (zckpt: plan_s, ...)."""
        return {}


# --- raw limits ---------------------------------------------------------------------


def _layout(sd: StateDict, align: int) -> tuple[list[tuple[str, torch.Tensor, int, int]], int]:
    """(key, tensor, offset, nbytes) for every tensor, packed with ``align``-byte alignment."""
    out = []
    off = 0
    for key, t in iter_tensors(sd):
        nbytes = t.numel() * t.element_size()
        out.append((key, t, off, nbytes))
        off += (nbytes + align - 1) // align * align
    return out, max(off, align)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (0-dim tensors included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class MemcpyWarm(Method):
    """Copy every tensor into a pre-allocated, pre-faulted shared-memory buffer.

    The buffer is a memfd mapped through ``/proc/self/fd/N`` with
    ``UntypedStorage.from_file(shared=True)``: no name ever appears in /dev/shm, and the
    memory goes away with the mapping. Start-up allocates and pre-faults it; the warm-up
    save is the first copy, so every measured round is a copy into warm pages.
    """

    name = "memcpy_warm"
    fsync = "none"
    note = "floor for the stall; GB/s of the copy"

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._template: StateDict | None = None

    def start(self, sd: StateDict) -> None:
        layout, total = _layout(sd, 64)
        fd = os.memfd_create("zckpt-bench-memcpy", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, total)
            storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=True, nbytes=total)
        finally:
            os.close(fd)  # the mapping keeps the memory alive
        buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (total,), (1,))
        buf.fill_(0)  # pre-fault every page: the point of a warm arena
        self._buf = buf
        views: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _key, t, off, nbytes in layout:
            dst = buf[off : off + nbytes].view(t.dtype).view(t.shape)
            views.append((dst, t))
        self._views = views
        self._template = sd

    def save(self, sd: StateDict, path: Path) -> Pending:
        if sd is not self._template:
            raise RuntimeError("memcpy_warm expects the state dict it was started with")
        for dst, src in self._views:
            dst.copy_(src)
        return Pending()

    def load(self, path: Path, expected: StateDict) -> Any:
        it = iter(dst.clone() for dst, _ in self._views)
        return map_tensors(self._template, lambda _t: next(it))

    def close(self) -> None:
        self._views = []
        self._buf = None


class WriteFsync(Method):
    """os.write of every tensor's bytes into one file, then fsync (file, dir, parent)."""

    name = "write_fsync"
    fsync = "self"
    note = "floor for durability"

    def __init__(self) -> None:
        self._layout: list[tuple[str, torch.Tensor, int, int]] = []
        self._template: StateDict | None = None

    def save(self, sd: StateDict, path: Path) -> Pending:
        path.mkdir(parents=True)
        self._layout, _ = _layout(sd, 1)
        self._template = sd
        fd = os.open(path / "data.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _key, t, _off, nbytes in self._layout:
                src = _byte_view(t)  # keeps the bytes alive while the view is written
                mv = memoryview((ctypes.c_char * nbytes).from_address(src.data_ptr())).cast("B")
                done = 0
                while done < nbytes:  # os.write may write less than asked
                    done += os.write(fd, mv[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(path)
        fsync_path(path.parent)
        return Pending()

    def load(self, path: Path, expected: StateDict) -> Any:
        raw = bytearray((path / "data.bin").read_bytes())
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        it = iter(
            flat[off : off + n].view(t.dtype).reshape(t.shape).clone()
            for _k, t, off, n in self._layout
        )
        return map_tensors(self._template, lambda _t: next(it))


# --- torch.save ---------------------------------------------------------------------


class TorchSave(Method):
    """Synchronous ``torch.save`` of the whole state dict into one file."""

    name = "torch_save"
    fsync = "bench"

    def save(self, sd: StateDict, path: Path) -> Pending:
        path.mkdir(parents=True)
        torch.save(sd, path / "model.pt")
        return Pending()

    def load(self, path: Path, expected: StateDict) -> Any:
        return torch.load(path / "model.pt", weights_only=True)


# --- experimental CheckpointProcess / AsyncCheckpointer --------------------------------


def _experimental_process_config() -> Any:
    from torch.distributed.checkpoint._experimental.checkpoint_process import (
        CheckpointProcessConfig,
    )

    # Generous init (a spawn that imports torch takes seconds on 2 busy cores) and a
    # short shutdown: the bench kills what does not leave in time.
    return CheckpointProcessConfig(subprocess_init_timeout_secs=120, subprocess_shutdown_timeout_secs=10)


def _kill_mp_context(ctx: Any) -> None:
    """SIGKILL the processes of a torch ``ProcessContext`` and reap them briefly."""
    if ctx is None:
        return
    for p in getattr(ctx, "processes", []):
        if p.is_alive():
            p.kill()
        p.join(timeout=5)


def _load_experimental(path: Path) -> Any:
    # The stock CheckpointWriter's layout: <path>/checkpoint_<rank>.pt via torch.save.
    return torch.load(path / "checkpoint_0.pt", weights_only=True)


class ExperimentalCheckpointProcess(Method):
    """``torch.distributed.checkpoint._experimental`` ``CheckpointProcess`` + stock writer.

    ``write()`` returns a Future at once; the tensors travel to the worker through
    torch's multiprocessing reductions, which move a plain tensor's storage into shared
    memory *in place* and then let the worker read the caller's memory until it is
    done, so the caller may mutate only when the Future resolves.

    ``shared=False`` hands over a fresh plain clone each save (so each save pays the
    move into shared memory, as a trainer's first save does); ``shared=True`` hands over
    tensors already ``share_memory_()``'d once at set-up (zero copy each save).
    """

    fsync = "bench"

    def __init__(self, shared: bool) -> None:
        self.name = "checkpoint_process_shm" if shared else "checkpoint_process"
        self.note = (
            "tensors pre-shared (zero copy)" if shared else "fresh plain tensors each save"
        )
        self._shared = shared
        # Plain tensors: the hand-off thread swaps each storage for a shared-memory copy
        # while the caller may be writing to it; add_() racing that swap segfaulted the
        # caller here (SIGSEGV in add_ while _share_fd_cpu_ ran), so its tearing run is
        # done in a child process.
        self.tearing_may_crash = not shared
        self._shm_sd: StateDict | None = None
        self._cp: Any = None

    def state_dict_for_save(self, base: StateDict) -> StateDict:
        if self._shared:
            if self._shm_sd is None:
                self._shm_sd = map_tensors(base, lambda t: t.clone().share_memory_())
            return self._shm_sd
        return clone_state_dict(base)

    def start(self, sd: StateDict) -> None:
        from torch.distributed.checkpoint._experimental.builder import (
            default_subprocess_init_fn,
            default_writer_init_fn,
        )
        from torch.distributed.checkpoint._experimental.checkpoint_process import (
            CheckpointProcess,
        )
        from torch.distributed.checkpoint._experimental.types import RankInfo

        # The worker is spawned: it must get module-level (importable) functions; the
        # builder's defaults are exactly the stock no-op init and stock CheckpointWriter.
        self._cp = CheckpointProcess(
            rank_info=RankInfo(global_rank=0, global_world_size=1),
            config=_experimental_process_config(),
            subprocess_init_fn=default_subprocess_init_fn,
            subprocess_init_args=(),
            checkpoint_writer_init_fn=default_writer_init_fn,
            checkpoint_writer_init_args={},
        )
        self._cp.process_creation_future.result(timeout=180)

    def save(self, sd: StateDict, path: Path) -> Pending:
        fut: Future = self._cp.write(sd, str(path))
        # The worker reads the caller's (now shared) memory until it has written it all.
        stamp = Stamp(fut)
        return Pending(staged=stamp, done=stamp)

    def load(self, path: Path, expected: StateDict) -> Any:
        return _load_experimental(path)

    def child_pids(self) -> list[int]:
        ctx = getattr(self._cp, "process", None)
        return [p.pid for p in getattr(ctx, "processes", []) if p.pid is not None]

    def close(self) -> None:
        if self._cp is not None:
            self._cp.close()
            self._cp = None
        self._shm_sd = None

    def kill(self) -> None:
        if self._cp is not None:
            _kill_mp_context(getattr(self._cp, "process", None))
            self._cp._executor.shutdown(wait=False, cancel_futures=True)
            self._cp = None
        self._shm_sd = None


class ExperimentalAsyncCheckpointer(Method):
    """``make_async_checkpointer`` with the shared-memory ``DefaultStager``.

    CPU-only settings: pinned memory and non-blocking copies need an accelerator, so
    they are off; shared memory and async staging (a staging thread in the trainer)
    are on. The stager keeps its shared-memory copies between saves (keyed by the
    source storages), so only the first save allocates. ``save`` returns
    (stage_future, write_future); the stock writer is ``torch.save``, no fsync.
    """

    name = "async_checkpointer"
    fsync = "bench"
    note = "shm stager, async staging"

    def __init__(self) -> None:
        self._ckpt: Any = None

    def start(self, sd: StateDict) -> None:
        from torch.distributed.checkpoint._experimental import (
            CheckpointerConfig,
            CheckpointStagerConfig,
            RankInfo,
            make_async_checkpointer,
        )

        config = CheckpointerConfig(
            staging_config=CheckpointStagerConfig(
                use_pinned_memory=False,
                use_shared_memory=True,
                use_async_staging=True,
                use_non_blocking_copy=False,
            ),
            process_config=_experimental_process_config(),
        )
        self._ckpt = make_async_checkpointer(
            config=config, rank_info=RankInfo(global_rank=0, global_world_size=1)
        )
        self._ckpt._checkpoint_process.process_creation_future.result(timeout=180)

    def save(self, sd: StateDict, path: Path) -> Pending:
        stage_fut, write_fut = self._ckpt.save(str(path), sd)
        return Pending(staged=Stamp(stage_fut), done=Stamp(write_fut))

    def load(self, path: Path, expected: StateDict) -> Any:
        return _load_experimental(path)

    def child_pids(self) -> list[int]:
        proc = getattr(self._ckpt, "_checkpoint_process", None)
        ctx = getattr(proc, "process", None)
        return [p.pid for p in getattr(ctx, "processes", []) if p.pid is not None]

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None

    def kill(self) -> None:
        if self._ckpt is not None:
            proc = self._ckpt._checkpoint_process
            _kill_mp_context(getattr(proc, "process", None))
            proc._executor.shutdown(wait=False, cancel_futures=True)
            self._ckpt._checkpoint_stager.close()
            self._ckpt = None


# --- DCP async_save -----------------------------------------------------------------


class _FdToFile:
    """Point fd 2 at a file for a while, so a child spawned meanwhile inherits it.

    The DCP daemon configures the root logger at INFO on its stderr and logs every
    request; that would bury the bench's own output.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._saved: int | None = None

    def __enter__(self) -> _FdToFile:
        sys.stderr.flush()
        self._saved = os.dup(2)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None


def _blank(obj: Any) -> Any:
    """Same structure as ``obj``: zeroed tensors, scalars reset to their type's default."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: _blank(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_blank(v) for v in obj)
    if isinstance(obj, (bool, int, float, complex, str, bytes)):
        return type(obj)()
    return obj


class DcpAsyncSave(Method):
    """``torch.distributed.checkpoint.async_save`` with the THREAD or PROCESS executor.

    The stager is DCP's ``DefaultStager`` with shared memory and async staging on
    (pinned memory and non-blocking copies need an accelerator), kept across saves so
    its shared-memory copies are reused. ``FileSystemWriter(sync_files=True)`` fsyncs
    the files itself; the bench adds the directory fsyncs. PROCESS: the daemon is
    normally spawned inside the first ``async_save``; the bench pre-starts it the same
    way torch does (``_AsyncCheckpointProcess``) so start-up is measured on its own.
    """

    fsync = "dirs"
    needs_process_group = True

    def __init__(self, process: bool, log_dir: Path) -> None:
        self.name = "dcp_process" if process else "dcp_thread"
        self.note = "shm stager, async staging; DCP fsyncs files"
        self._process = process
        self._log_dir = log_dir
        self._stager: Any = None

    def start(self, sd: StateDict) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self._stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=True,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )
        if self._process:
            from torch.distributed.checkpoint import _async_process_executor as ape

            if ape._CHECKPOINT_PROCESS is None:
                # The daemon's TCPStore address; without MASTER_ADDR torch resolves the
                # host's FQDN, which need not resolve inside a sandbox.
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                log = self._log_dir / "dcp_process.log"
                try:
                    with _FdToFile(log):
                        ape._CHECKPOINT_PROCESS = ape._AsyncCheckpointProcess(
                            pg_init_info=ape._ProcessGroupInitInfo(None)
                        )
                except Exception as e:
                    # The daemon's own reason is in its log, not in the exception.
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                    raise RuntimeError(f"{e} (daemon log: {tail[0] if tail else 'empty'})") from e

    def save(self, sd: StateDict, path: Path) -> Pending:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if self._process else AsyncCheckpointerType.THREAD
        resp = dcp.async_save(
            sd,
            storage_writer=dcp.FileSystemWriter(str(path), sync_files=True),
            async_checkpointer_type=kind,
            async_stager=self._stager,
        )
        if isinstance(resp, Future):  # synchronous staging returns the upload future only
            return Pending(staged=None, done=Stamp(resp))
        return Pending(staged=Stamp(resp.staging_completion), done=Stamp(resp.upload_completion))

    def load(self, path: Path, expected: StateDict) -> Any:
        import torch.distributed.checkpoint as dcp

        # DCP loads in place into a template of the right shapes and dtypes; the
        # scalars are replaced from the checkpoint (zeroed here so a stale value shows).
        template = _blank(expected)
        dcp.load(template, checkpoint_id=str(path))
        return template

    def child_pids(self) -> list[int]:
        if not self._process:
            return []
        from torch.distributed.checkpoint import _async_process_executor as ape

        p = ape._CHECKPOINT_PROCESS
        return [p._save_process.pid] if p is not None and p._save_process.pid else []

    def close(self) -> None:
        if self._process:
            from torch.distributed.checkpoint import _async_process_executor as ape

            p = ape._CHECKPOINT_PROCESS
            if p is not None:
                ape._CHECKPOINT_PROCESS = None
                if p._save_process.is_alive():
                    p._send(ape._CheckpointSaveProcessControlOpts.TERMINATE)
                    p._save_process.join(timeout=10)
                if p._save_process.is_alive():
                    p._save_process.kill()
                    p._save_process.join(timeout=5)
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def kill(self) -> None:
        if self._process:
            from torch.distributed.checkpoint import _async_process_executor as ape

            p = ape._CHECKPOINT_PROCESS
            ape._CHECKPOINT_PROCESS = None
            if p is not None and p._save_process.is_alive():
                p._save_process.kill()
                p._save_process.join(timeout=5)
        self._stager = None


# --- zckpt --------------------------------------------------------------------------


class Zckpt(Method):
    """zckpt's ``CheckpointPool`` with N workers (API contract: DESIGN.md section 3).

    ``pool.save`` returns once staged; ``fut.staged`` resolves when the caller may
    mutate; ``fut.result()`` when the checkpoint is fsynced and committed. Start-up
    includes ``pool.reserve(sd)``, which allocates and pre-faults the staging arena
    and has every worker map it, so the first save costs what later ones do.

    ``async_staging=True`` (``PoolConfig(async_staging=True)``): ``save()`` returns
    after planning and the copy into shared memory runs on a background thread;
    ``fut.staged`` resolves when it is done. The tearing run mutates right after
    ``save()`` returns, as for every method, which this mode does not promise to
    survive (the contract is to wait for ``fut.staged``): its torn cell shows what
    happens to a caller that does not wait.
    """

    fsync = "self"

    def __init__(self, num_workers: int, async_staging: bool = False) -> None:
        self.name = f"zckpt_{num_workers}" + ("_async" if async_staging else "")
        self.note = f"{num_workers} worker{'s' if num_workers > 1 else ''}"
        if async_staging:
            self.note += "; async staging: mutate only after fut.staged"
        self._n = num_workers
        self._async = async_staging
        self._pool: Any = None
        self._zckpt: Any = None
        self._last: Any = None

    def start(self, sd: StateDict) -> None:
        try:
            import zckpt  # noqa: PLC0415 - imported late so the peers run without it
        except Exception as e:  # ImportError, or an error while the library is half-written
            raise Unavailable(f"{type(e).__name__}: {e}") from e
        pool_cls = getattr(zckpt, "CheckpointPool", None)
        if pool_cls is None:  # the package exists but does not export the API yet
            raise Unavailable(f"zckpt ({getattr(zckpt, '__file__', None) or 'namespace package'}) "
                              "has no CheckpointPool yet")
        self._zckpt = zckpt
        if self._async:
            config = zckpt.PoolConfig(num_workers=self._n, async_staging=True)
            self._pool = pool_cls(num_workers=self._n, config=config)
        else:
            self._pool = pool_cls(num_workers=self._n)
        # Allocate and pre-fault the arena and have every worker map it now, so it is
        # part of start-up rather than of the first save. Blocks until done.
        self._pool.reserve(sd)

    def save(self, sd: StateDict, path: Path) -> Pending:
        fut = self._pool.save(sd, str(path))
        self._last = fut
        # With async staging, fut.staged resolves after save() returned: snapshot_s
        # is measured from it, never from the return of save().
        return Pending(staged=Stamp(fut.staged), done=Stamp(fut))

    def load(self, path: Path, expected: StateDict) -> Any:
        return self._zckpt.load(str(path))

    def last_timings(self) -> dict[str, float]:
        return dict(getattr(self._last, "timings", None) or {})

    def child_pids(self) -> list[int]:
        try:
            return list(self._pool.worker_pids) if self._pool is not None else []
        except Exception:  # noqa: BLE001 - a peer torn down mid-call has no pids
            return []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def kill(self) -> None:
        if self._pool is not None:
            self._pool.kill()
            self._pool = None


class DcpZckpt(Method):
    """``dcp.async_save`` (thread executor) with :class:`zckpt.dcp.ZckptWriter` as storage
    writer and stager: the one copy into zckpt's arena blocks, the pool's workers write
    and fsync, the coordinator commits by rename (zckpt.dcp's module docstring)."""

    fsync = "self"
    needs_process_group = True

    def __init__(self, workers: int) -> None:
        self.name = f"dcp_zckpt_{workers}"
        self.note = f"dcp.async_save + ZckptWriter, {workers} workers"
        self._workers = workers
        self._writer: Any = None

    def start(self, sd: StateDict) -> None:
        import zckpt
        from zckpt.dcp import ZckptWriter

        self._writer = ZckptWriter(config=zckpt.PoolConfig(num_workers=self._workers))
        _ = self._writer.pool   # workers started here, not in the first save

    def save(self, sd: StateDict, path: Path) -> Pending:
        import torch.distributed.checkpoint as dcp

        resp = dcp.async_save(sd, checkpoint_id=str(path), storage_writer=self._writer)
        if isinstance(resp, Future):
            return Pending(staged=None, done=Stamp(resp))
        return Pending(staged=Stamp(resp.staging_completion), done=Stamp(resp.upload_completion))

    def load(self, path: Path, expected: StateDict) -> Any:
        import torch.distributed.checkpoint as dcp

        from zckpt.dcp import ZckptReader

        template = _blank(expected)
        dcp.load(template, storage_reader=ZckptReader(str(path)))
        return template

    def child_pids(self) -> list[int]:
        return list(self._writer.pool.worker_pids) if self._writer is not None else []

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def kill(self) -> None:
        if self._writer is not None:
            self._writer.pool.kill()
            self._writer = None


class Unavailable(RuntimeError):
    """A method that cannot run here at all (e.g. zckpt not importable yet)."""



# ----------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One registered method: its name, its group, and how to build it (given the
    run's log directory)."""

    name: str
    group: str
    build: Callable[[Path], Method]


#: Every method, in the order the tables list them.
REGISTRY: tuple[Entry, ...] = (
    Entry("memcpy_warm", "raw", lambda _log: MemcpyWarm()),
    Entry("write_fsync", "raw", lambda _log: WriteFsync()),
    Entry("torch_save", "peers", lambda _log: TorchSave()),
    Entry("checkpoint_process", "peers", lambda _log: ExperimentalCheckpointProcess(shared=False)),
    Entry("checkpoint_process_shm", "peers", lambda _log: ExperimentalCheckpointProcess(shared=True)),
    Entry("async_checkpointer", "peers", lambda _log: ExperimentalAsyncCheckpointer()),
    Entry("dcp_thread", "peers", lambda log: DcpAsyncSave(process=False, log_dir=log)),
    Entry("dcp_process", "peers", lambda log: DcpAsyncSave(process=True, log_dir=log)),
    Entry("dcp_zckpt_2", "zckpt", lambda _log: DcpZckpt(2)),
    Entry("zckpt_1", "zckpt", lambda _log: Zckpt(1)),
    Entry("zckpt_2", "zckpt", lambda _log: Zckpt(2)),
    Entry("zckpt_4", "zckpt", lambda _log: Zckpt(4)),
    Entry("zckpt_2_async", "zckpt", lambda _log: Zckpt(2, async_staging=True)),
)

_BY_NAME = {e.name: e for e in REGISTRY}

#: Every registered method name, in table order.
METHOD_NAMES: tuple[str, ...] = tuple(e.name for e in REGISTRY)

#: Group names accepted by ``--methods``; "all" is every registered method.
METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    **{g: tuple(e.name for e in REGISTRY if e.group == g) for g in dict.fromkeys(e.group for e in REGISTRY)},
    "all": METHOD_NAMES,
}

#: zckpt with any worker count: ``zckpt_<N>`` or ``zckpt_<N>_async``.
_ZCKPT_NAME = re.compile(r"zckpt_([1-9][0-9]*)(_async)?")


def _entry(name: str) -> Entry | None:
    if name in _BY_NAME:
        return _BY_NAME[name]
    m = _ZCKPT_NAME.fullmatch(name)
    if m:
        n, is_async = int(m.group(1)), m.group(2) is not None
        return Entry(name, "zckpt", lambda _log: Zckpt(n, async_staging=is_async))
    return None


def make_method(name: str, log_dir: Path) -> Method:
    """Instantiate the method called ``name`` (a :data:`REGISTRY` name, or
    ``zckpt_<N>[_async]`` for any worker count)."""
    entry = _entry(name)
    if entry is None:
        raise ValueError(f"unknown method {name!r}")
    method = entry.build(log_dir)
    method.group = entry.group
    return method


def select(text: str | None, default: str | None = None) -> list[str]:
    """Expand a comma list of method and group names (``default`` when empty).

    Registered names come in table order; extra ``zckpt_<N>`` names follow in the
    order given. Raises ValueError naming the choices for an unknown name.
    """
    text = text or default
    if not text:
        return list(METHOD_NAMES)
    wanted: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item in METHOD_GROUPS:
            wanted.extend(METHOD_GROUPS[item])
        elif _entry(item) is not None:
            wanted.append(item)
        else:
            raise ValueError(
                f"unknown method {item!r}; choose from {', '.join(METHOD_NAMES)} "
                f"(or zckpt_<N>[_async]) or groups {', '.join(METHOD_GROUPS)}"
            )
    wanted = list(dict.fromkeys(wanted))
    return [m for m in METHOD_NAMES if m in wanted] + [m for m in wanted if m not in _BY_NAME]


def bench_fsync(method: Method, path: Path) -> float:
    """Make ``path`` durable for a method that does not fsync (all of it) or fsyncs
    only its files (the directories); return the seconds it took (0 otherwise)."""
    if method.fsync not in ("bench", "dirs"):
        return 0.0
    t0 = time.perf_counter()
    fsync_tree(path, files=method.fsync == "bench")
    return time.perf_counter() - t0


def fsync_note(method: Method) -> str:
    """The method's note plus who makes its output durable (the table's note column)."""
    who = {
        "bench": "fsync by bench",
        "dirs": "dir fsync by bench",
        "self": "fsyncs itself",
        "none": "no disk",
    }[method.fsync]
    return "; ".join(p for p in (method.note, who) if p)


def isolated_tearing_run(name: str, size_bytes: int, seed: int, work_dir: str, conn: Any) -> None:
    """Tearing run of one method inside a throw-away process (target of
    :func:`bench.harness.run_isolated`).

    Sends ``("pids", [...])`` once the method has started (so the parent can kill the
    method's own workers if this process dies), then ``("result", differing, total)``
    or ``("error", text)``. A crash shows up to the parent as this process's exit code.
    """
    # This process is thrown away: point its stderr (and its workers', which inherit
    # it) at a log in its work directory, so a crash's debris does not clutter the
    # bench's output. The exit code tells the parent what happened.
    log_fd = os.open(Path(work_dir) / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    method: Method | None = None
    try:
        ref = make_state_dict(size_bytes, seed=seed)
        base = clone_state_dict(ref)
        method = make_method(name, Path(work_dir))
        method.start(method.state_dict_for_save(base))
        conn.send(("pids", method.child_pids()))
        sd = method.state_dict_for_save(base)
        path = Path(work_dir) / "ckpt"
        pending = method.save(sd, path)
        t_ret = time.perf_counter()
        mutate_in_place(sd)
        pending.wait(t_ret, 120.0 + size_bytes / 20e6)
        cmp = compare(method.load(path, ref), ref)
        conn.send(("result", cmp.tensors_differing, cmp.tensors_total))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if method is not None:
            try:
                method.close()
            except Exception:  # noqa: BLE001 - the parent kills what is left
                method.kill()
        conn.close()
