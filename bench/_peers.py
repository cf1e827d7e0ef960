"""Save methods compared by ``bench/throughput.py``: raw limits, the torch peers and zckpt.

Every method implements :class:`Method`: ``start()`` builds whatever it keeps between
saves (timed as start-up), ``save()`` starts one save and returns a :class:`Pending`
that tells the runner when the caller may mutate its tensors again and when the
method's own work is finished, ``load()`` reads a checkpoint back for the
correctness check, and ``close()`` / ``kill()`` release everything it started.

The helpers at the top build the synthetic state dict and compare state dicts; they
are shared by the runner and the methods. Nothing here prints: the runner reports.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# ----------------------------------------------------------------------------------
# Synthetic state dict and tree helpers
# ----------------------------------------------------------------------------------

StateDict = dict[str, Any]


def make_state_dict(size_bytes: int, seed: int = 0, n_layers: int = 8) -> StateDict:
    """Build a deterministic, transformer-shaped nested state dict of about ``size_bytes``.

    Per layer: four d x d fp32 attention matrices and two 4d x d bf16 MLP matrices
    (32 d^2 bytes together), eleven small fp32/bf16 vectors and one 0-dim tensor; an
    fp32 embedding takes up the rest of the byte budget, plus a final norm. A few
    Python scalars sit beside the tensors, as a trainer's step counters would.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # Generate in fp32 and convert, so the values do not depend on whether this
        # torch build has a native bf16 randn kernel.
        t = torch.randn(*shape, generator=gen, dtype=torch.float32)
        return t if dtype == torch.float32 else t.to(dtype)

    # Hidden size from the budget: the large matrices dominate, so size them first
    # and give whatever is left to the embedding (keeps the total close to the ask).
    d = max(16, int(math.sqrt(size_bytes / (32 * n_layers))) // 16 * 16)
    model: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            model[p + f"attn.{name}.weight"] = randn(d, d)
            model[p + f"attn.{name}.bias"] = randn(d)
        model[p + "attn.temperature"] = randn(())  # 0-dim tensor: an edge case for writers
        model[p + "ln1.weight"] = randn(d)
        model[p + "ln1.bias"] = randn(d)
        model[p + "mlp.w1.weight"] = randn(4 * d, d, dtype=torch.bfloat16)
        model[p + "mlp.w1.bias"] = randn(4 * d, dtype=torch.bfloat16)
        model[p + "mlp.w2.weight"] = randn(d, 4 * d, dtype=torch.bfloat16)
        model[p + "mlp.w2.bias"] = randn(d, dtype=torch.bfloat16)
        model[p + "ln2.weight"] = randn(d)
        model[p + "ln2.bias"] = randn(d)
    model["norm.weight"] = randn(d)
    model["norm.bias"] = randn(d)
    used = sum(t.numel() * t.element_size() for t in model.values())
    rows = max(1, (size_bytes - used) // (d * 4))
    model = {"embed.weight": randn(rows, d), **model}
    meta = {"step": 1000 + seed, "epoch": 3, "lr": 3.0e-4, "loss_scale": 65536.0}
    return {"model": model, "meta": meta}


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted key, tensor)`` for every tensor in a nested dict/list/tuple."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Rebuild a nested dict/list/tuple with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    return obj


def clone_state_dict(sd: StateDict) -> StateDict:
    """Deep copy: fresh (non-shared) memory for every tensor, same values."""
    return map_tensors(sd, lambda t: t.clone())


def copy_into(dst: StateDict, src: StateDict) -> None:
    """Copy ``src``'s tensor values into ``dst``'s tensors in place (same structure)."""
    for (_, d), (_, s) in zip(iter_tensors(dst), iter_tensors(src), strict=True):
        d.copy_(s)


def mutate_in_place(sd: StateDict, reverse: bool = True) -> None:
    """Add 1 to every tensor in place: what a training step does to the weights.

    Reverse order by default: a stager that copies in dict order and is still busy
    when ``save()`` returns is then caught on the tensors it has not reached yet,
    instead of being overtaken by a mutation loop that trails right behind it.
    """
    tensors = [t for _, t in iter_tensors(sd)]
    with torch.no_grad():
        for t in reversed(tensors) if reverse else tensors:
            t.add_(1)


def state_dict_nbytes(sd: StateDict) -> int:
    """Bytes of tensor data in ``sd`` (what a checkpoint has to move)."""
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(sd))


@dataclass
class Comparison:
    """Outcome of comparing a loaded state dict with the expected one."""

    tensors_total: int
    tensors_differing: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every tensor and scalar matches and nothing is missing."""
        return self.tensors_differing == 0 and not self.problems


def compare(loaded: Any, expected: Any, prefix: str = "") -> Comparison:
    """Compare every leaf: tensors with dtype, shape and ``torch.equal``; scalars with ==."""
    out = Comparison(0, 0)
    _compare(loaded, expected, prefix, out)
    return out


def _compare(loaded: Any, expected: Any, key: str, out: Comparison) -> None:
    if isinstance(expected, torch.Tensor):
        out.tensors_total += 1
        if not isinstance(loaded, torch.Tensor):
            out.tensors_differing += 1
            out.problems.append(f"{key}: not a tensor ({type(loaded).__name__})")
        elif loaded.dtype != expected.dtype or loaded.shape != expected.shape:
            out.tensors_differing += 1
            out.problems.append(
                f"{key}: {loaded.dtype}{list(loaded.shape)} != "
                f"{expected.dtype}{list(expected.shape)}"
            )
        elif not torch.equal(loaded.cpu(), expected):
            out.tensors_differing += 1
    elif isinstance(expected, dict):
        if not isinstance(loaded, dict):
            out.problems.append(f"{key or '<root>'}: not a dict")
            out.tensors_total += sum(1 for _ in iter_tensors(expected))
            out.tensors_differing += sum(1 for _ in iter_tensors(expected))
            return
        for k, v in expected.items():
            sub = f"{key}.{k}" if key else str(k)
            if k not in loaded:
                out.problems.append(f"{sub}: missing")
                n = sum(1 for _ in iter_tensors(v))
                out.tensors_total += n
                out.tensors_differing += n
            else:
                _compare(loaded[k], v, sub, out)
        extra = set(loaded) - set(expected)
        if extra:
            out.problems.append(f"{key or '<root>'}: unexpected keys {sorted(map(str, extra))[:3]}")
    elif isinstance(expected, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(expected):
            out.problems.append(f"{key}: sequence differs")
            return
        for i, (a, b) in enumerate(zip(loaded, expected, strict=False)):
            _compare(a, b, f"{key}.{i}", out)
    elif loaded != expected:
        out.problems.append(f"{key}: {loaded!r} != {expected!r}")


# ----------------------------------------------------------------------------------
# Durability helpers
# ----------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync one file or directory by path."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, files: bool = True) -> None:
    """fsync everything under ``root`` (files unless ``files=False``), its directories
    bottom-up, ``root`` itself and its parent, so every name and byte is on disk."""
    if root.is_dir():
        for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
            if files:
                for name in filenames:
                    fsync_path(Path(dirpath, name))
            fsync_path(Path(dirpath))
    elif root.exists():
        fsync_path(root)
    fsync_path(root.parent)


# ----------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------


def proc_status_kib(pid: int | str, key: str) -> int | None:
    """One ``kB`` field of ``/proc/<pid>/status`` (e.g. VmRSS, VmHWM), in KiB.

    ``pid`` may be ``"self"``. None when the process is gone or the field is absent.
    Shared-memory pages a process has touched count in its VmRSS/VmHWM (as RssShmem),
    so a buffer mapped by several processes counts once in each of them.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back (glibc ``malloc_trim``),
    so an RSS reading shows what is held rather than what the allocator cached."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc: the reading is only a little noisier
        pass


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


# ----------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------


class Method:
    """One way to save a state dict. Subclasses override what they need."""

    name: str = "?"
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
                mv = memoryview(_byte_view(t).numpy())
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
        import sys

        sys.stderr.flush()
        self._saved = os.dup(2)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        import sys

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
        # With async staging, fut.staged resolves after save() returned: snapshot_s
        # is measured from it, never from the return of save().
        return Pending(staged=Stamp(fut.staged), done=Stamp(fut))

    def load(self, path: Path, expected: StateDict) -> Any:
        return self._zckpt.load(str(path))

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


class Unavailable(RuntimeError):
    """A method that cannot run here at all (e.g. zckpt not importable yet)."""


# ----------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------

#: Every method name, in the order the table lists them.
METHOD_NAMES: tuple[str, ...] = (
    "memcpy_warm",
    "write_fsync",
    "torch_save",
    "checkpoint_process",
    "checkpoint_process_shm",
    "async_checkpointer",
    "dcp_thread",
    "dcp_process",
    "zckpt_1",
    "zckpt_2",
    "zckpt_4",
    "zckpt_2_async",
)

#: Group names accepted by ``--methods``.
METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "raw": ("memcpy_warm", "write_fsync"),
    "zckpt": ("zckpt_1", "zckpt_2", "zckpt_4", "zckpt_2_async"),
    "peers": ("torch_save", "checkpoint_process", "checkpoint_process_shm",
              "async_checkpointer", "dcp_thread", "dcp_process"),
    "all": METHOD_NAMES,
}


def make_method(name: str, log_dir: Path) -> Method:
    """Instantiate the method called ``name`` (see :data:`METHOD_NAMES`)."""
    if name == "memcpy_warm":
        return MemcpyWarm()
    if name == "write_fsync":
        return WriteFsync()
    if name == "torch_save":
        return TorchSave()
    if name == "checkpoint_process":
        return ExperimentalCheckpointProcess(shared=False)
    if name == "checkpoint_process_shm":
        return ExperimentalCheckpointProcess(shared=True)
    if name == "async_checkpointer":
        return ExperimentalAsyncCheckpointer()
    if name == "dcp_thread":
        return DcpAsyncSave(process=False, log_dir=log_dir)
    if name == "dcp_process":
        return DcpAsyncSave(process=True, log_dir=log_dir)
    if name.startswith("zckpt_"):
        # zckpt_<N> or zckpt_<N>_async
        parts = name.split("_")
        if len(parts) in (2, 3) and parts[1].isdigit() and parts[2:] in ([], ["async"]):
            return Zckpt(int(parts[1]), async_staging=len(parts) == 3)
    raise ValueError(f"unknown method {name!r}")


def isolated_tearing_run(name: str, size_bytes: int, seed: int, work_dir: str, conn: Any) -> None:
    """Tearing run of one method inside a throw-away process (multiprocessing target).

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
        mutate_in_place(sd)
        deadline = 120.0 + size_bytes / 20e6
        if pending.staged is not None:
            pending.staged.wait(deadline)
        if pending.done is not None:
            pending.done.wait(deadline)
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


def set_child_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER).

    If a process the bench started dies abruptly, its own workers are re-parented to
    the bench instead of init, so the bench can still kill and reap them.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # 36 = PR_SET_CHILD_SUBREAPER
    except Exception:  # noqa: BLE001 - not Linux, or no prctl: fall back to tracking
        return False


def our_children() -> list[tuple[int, str]]:
    """(pid, state) of every direct child of this process, from /proc."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) >= 2 and int(rest[1]) == me:
            out.append((int(entry), rest[0]))
    return out


def reap(pid: int, timeout: float = 5.0) -> bool:
    """waitpid ``pid`` (a child we killed or adopted) for up to ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def kill_pid_if_our_child(pid: int) -> bool:
    """SIGKILL ``pid`` only if it is still alive and still this process's child.

    Checking the parent guards against a recycled pid. Returns True if a signal was sent.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    # Fields after the parenthesised command: state, ppid, ...
    rest = stat.rsplit(")", 1)[-1].split()
    if len(rest) < 2 or rest[0] in ("Z", "X") or int(rest[1]) != os.getpid():
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
