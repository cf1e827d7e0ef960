"""What every bench script shares: state dicts, timing, temp dirs, fsync, memory, processes.

Written once here, used by ``throughput.py``, ``fanout.py``, ``gil.py`` and
``overhead.py`` and by the methods in ``methods.py``. Nothing here prints except
:class:`Progress` (stderr); the tables are ``report.py``'s job.

Sections: state-dict factories and tree helpers (the transformer-shaped state dict and
the "many small tensors" one), comparison, durability (fsync, page-cache eviction),
memory (RSS), timing (medians, a bounded call), temp dirs and the 1-rank process group,
progress lines, and child-process isolation (subreaper, reaping, a throw-away child for
methods whose tearing run can crash the caller).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

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




def make_small_tensors_state_dict(count: int = 2000, nbytes: int = 256, seed: int = 0) -> StateDict:
    """``count`` fp32 tensors of ``nbytes`` bytes each (default 2,000 x 256 B), flat under
    ``"model"``, plus the same Python scalars as :func:`make_state_dict`: the case where
    a save's per-tensor overhead (planning, Python) dominates the bytes."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, nbytes // 4)
    model = {f"params.{i}": torch.randn(n, generator=gen) for i in range(count)}
    meta = {"step": 1000 + seed, "epoch": 3, "lr": 3.0e-4, "loss_scale": 65536.0}
    return {"model": model, "meta": meta}
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



def evict(path: Path) -> None:
    """Drop a file tree's clean pages from the page cache so the next read hits the device."""
    for p in [path] if path.is_file() else path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    """Median of the measured rounds (NaN when nothing was measured)."""
    return statistics.median(xs) if xs else float("nan")


def settle(seconds: float) -> None:
    """Collect garbage now and idle a moment, so the previous save's trailing work (a
    worker freeing memory, a daemon's gc, writeback) does not land in the next timing:
    on 2 cores it would otherwise land on whichever method runs next."""
    gc.collect()
    if seconds > 0:
        time.sleep(seconds)


def call_bounded(fn: Callable[[], None], deadline_s: float) -> BaseException | None:
    """Run ``fn`` in a daemon thread; return its error, or TimeoutError if it outlives
    ``deadline_s`` (the thread is then abandoned: the caller kills what it waits on)."""
    box: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box.append(e)

    t = threading.Thread(target=target, daemon=True, name="bench-close")
    t.start()
    t.join(deadline_s)
    if t.is_alive():
        return TimeoutError(f"did not finish within {deadline_s:.0f}s")
    return box[0] if box else None


def first_line(e: BaseException, limit: int = 160) -> str:
    """One line for a table cell: the error's type and first line of message."""
    msg = str(e).strip()
    if (not msg or msg.endswith(":")) and e.__cause__ is not None:
        # e.g. "Child process terminated unexpectedly:" wrapping a bare EOFError
        msg = f"{msg} {type(e.__cause__).__name__} {e.__cause__}".strip()
    text = f"{type(e).__name__}: {msg}".strip().splitlines()
    line = text[0] if text else type(e).__name__
    # Remote tracebacks (e.g. "Unexpected response from worker process: Traceback ...")
    # end with the actual error: show that instead of the word "Traceback".
    if len(text) > 1 and ("Traceback" in line or line.endswith(":")):
        line = line + " ... " + text[-1].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------
# Temp dirs, process group, progress, signals
# ----------------------------------------------------------------------------------


@contextlib.contextmanager
def work_dir(prefix: str, parent: str | None = None) -> Iterator[Path]:
    """A fresh directory under ``parent`` (default: the system temp dir), removed on exit."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def clear_dir(root: Path) -> None:
    """Remove everything inside ``root`` (keeps ``root``)."""
    for p in root.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def init_process_group(store: Path) -> bool:
    """A 1-rank gloo group for the DCP methods (``file://`` store at ``store``).

    Returns True if this call created it (the caller then destroys it), False if one
    already existed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return True


def destroy_process_group() -> None:
    """Tear down the group :func:`init_process_group` made."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Progress:
    """One progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, tag: str = "bench", stream: TextIO = sys.stderr) -> None:
        self._tag = f"[{tag}] "
        self._stream = stream
        self._tty = stream.isatty()
        self._dirty = False

    def update(self, msg: str) -> None:
        """Show ``msg`` as the current step."""
        if self._tty:
            self._stream.write("\r\x1b[K" + self._tag + msg)
            self._dirty = True
        else:
            self._stream.write(self._tag + msg + "\n")
        self._stream.flush()

    def warn(self, msg: str) -> None:
        """A line that stays, even on a terminal."""
        self.end()
        self._stream.write(self._tag + msg + "\n")
        self._stream.flush()

    def end(self) -> None:
        """Finish the in-place line."""
        if self._dirty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._dirty = False


def raise_interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM handler: take the same clean-up path as Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


# ----------------------------------------------------------------------------------
# Child processes: isolation and last-resort clean-up
# ----------------------------------------------------------------------------------


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


def reap_adopted(exclude: set[int], wait_s: float = 3.0) -> None:
    """Reap zombie children we adopted as subreaper (not the ones in ``exclude``)."""
    end = time.monotonic() + wait_s
    while True:
        left = False
        for pid, state in our_children():
            if pid in exclude:
                continue
            if state == "Z":
                reap(pid, 0.1)
            else:
                left = True  # e.g. a resource tracker about to see EOF
        if not left or time.monotonic() > end:
            return
        time.sleep(0.05)


@dataclass
class Isolated:
    """Outcome of :func:`run_isolated`: the child's last message (None if it sent none)
    and its exit code (negative: killed by that signal)."""

    message: tuple[Any, ...] | None
    exitcode: int | None

    def crash_signal(self) -> str | None:
        """The signal's name if the child died of one."""
        code = self.exitcode
        if code is None or code >= 0:
            return None
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"


def run_isolated(target: Callable[..., None], args: tuple[Any, ...], deadline_s: float,
                 keep: Iterable[int] = (), name: str = "bench-isolated") -> Isolated:
    """Run ``target(*args, conn)`` in a throw-away spawned process, for work that may
    crash its process (a peer whose tearing run segfaults the caller).

    The child may send ``("pids", [...])`` (the processes it started, killed here if it
    dies) and then one final message. Past ``deadline_s`` it is killed. Whatever it
    leaves behind is killed and reaped (with :func:`set_child_subreaper` on, its
    orphaned workers are our children); pids in ``keep`` are left alone.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    before = {pid for pid, _ in our_children()}
    proc = ctx.Process(
        target=target,
        args=(*args, send_end),
        # Not a daemon: daemonic processes may not start the method's own workers.
        # The finally below kills it if it outlives its deadline.
        daemon=False,
        name=name,
    )
    proc.start()
    send_end.close()  # so recv() sees EOF when the child dies
    grandchildren: list[int] = []
    msg: tuple[Any, ...] | None = None
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            if recv_end.poll(0.2):
                try:
                    got = recv_end.recv()
                except EOFError:
                    break
                if got[0] == "pids":
                    grandchildren = list(got[1])
                    continue
                msg = got
                break
            if not proc.is_alive() and not recv_end.poll(0):
                break
        proc.join(30)
    finally:
        if proc.is_alive():  # past its deadline, or we are being interrupted
            proc.kill()
            proc.join(5)
        recv_end.close()
        # If the child crashed, its workers were re-parented to us (subreaper):
        # kill the ones it reported, then reap whatever it left behind.
        for pid in grandchildren:
            if kill_pid_if_our_child(pid):
                reap(pid)
        reap_adopted(before | set(keep) | {proc.pid or -1})
    return Isolated(msg, proc.exitcode)
