#!/usr/bin/env python
"""Checkpoint throughput: zckpt against the raw limits and the torch peers, same run.

For a synthetic, deterministic, transformer-shaped state dict of ``--size-mb`` MiB,
each method gets one start-up, then at once one warm-up save (reported as
first_save_s), and later ``--rounds`` timed saves, interleaved across methods (round
k runs every method, starting at a rotating offset, so slow drift hits all of them
alike). Reported per method, medians over the rounds:

- blocked_s: how long the save call blocks the caller;
- snapshot_s: until the caller may mutate its tensors without changing the
  checkpoint (for methods that read the caller's memory until they finish, that is
  their completion time; for zckpt_2_async, when ``fut.staged`` resolves);
- durable_s: until the data is fsynced. Methods that do not fsync get it done for
  them right after they finish, included in durable_s ("fsync by bench");
- GB/s (state-dict bytes / durable_s; for memcpy_warm, of the copy), start-up and
  first-save times, correctness (load back, ``torch.equal`` on every tensor), and a
  tearing run: every tensor gets ``add_(1)`` in place as soon as the save call
  returns, then the checkpoint is loaded and compared with the pre-save values;
- rss_overhead_mib: the bench process's VmRSS after the method's start-up and
  warm-up save minus its VmRSS just before the start-up (after gc and malloc_trim
  both times): the memory the method keeps in the trainer, e.g. its staging buffers;
- worker_rss_mib: the sum of VmHWM (peak RSS) over the method's child processes,
  read after the timed rounds ("-" for methods without children).

Shared-memory pages count in the RSS of every process that has touched them: a
staging arena mapped by the trainer and by N workers shows up in rss_overhead_mib
and again in each worker's VmHWM, so worker_rss_mib counts it once per worker and
the columns must not be added up as if they were disjoint.

Run from the repository root, e.g.::

    python bench/throughput.py --quick
    python bench/throughput.py --size-mb 256 --json out.json --markdown out.md
    python bench/throughput.py --methods torch_save,dcp_process,zckpt --rounds 5
    python bench/throughput.py --size-mb 64 --methods raw,zckpt --png out.png

or as ``zckpt bench ARGS`` from a source checkout. ``--png`` needs matplotlib (it is
skipped with a warning when that is not installed).

Everything created (processes, files, shared memory) is removed at the end, also on
Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

# Make the working tree importable (``bench._peers`` and, once it lands, ``zckpt``)
# whether this runs as ``python bench/throughput.py`` or ``python -m bench.throughput``.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402

from bench import _peers  # noqa: E402
from bench._peers import (  # noqa: E402
    METHOD_GROUPS,
    METHOD_NAMES,
    Method,
    StateDict,
    Unavailable,
)

QUICK_SIZE_MB = 4
CLOSE_DEADLINE_S = 20.0


# ----------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------


@dataclass
class Sample:
    """Timings of one save, in seconds from the save call."""

    blocked_s: float
    snapshot_s: float
    durable_s: float | None
    ok: bool
    tensors_differing: int
    tensors_total: int
    problem: str = ""


@dataclass
class Row:
    """Everything measured for one method."""

    method: str
    note: str = ""
    startup_s: float | None = None
    first_save_s: float | None = None
    samples: list[Sample] = field(default_factory=list)
    correct: str | None = None  # "ok" / "MISMATCH"
    mismatch: str = ""
    torn: str | None = None  # "torn N/M"
    error: str | None = None
    #: Trainer VmRSS after start-up + warm-up save minus VmRSS just before start-up.
    rss_overhead_mib: float | None = None
    #: Sum of the children's VmHWM after the timed rounds (None: no child processes).
    worker_rss_mib: float | None = None

    def median(self, attr: str) -> float | None:
        """Median of one timing over the measured rounds (None if none measured)."""
        vals = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return statistics.median(vals) if vals else None


# ----------------------------------------------------------------------------------
# Progress and signals
# ----------------------------------------------------------------------------------


class Progress:
    """One progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._dirty = False

    def update(self, msg: str) -> None:
        """Show ``msg`` as the current step."""
        if self._tty:
            self._stream.write("\r\x1b[K[bench] " + msg)
            self._dirty = True
        else:
            self._stream.write("[bench] " + msg + "\n")
        self._stream.flush()

    def warn(self, msg: str) -> None:
        """A line that stays, even on a terminal."""
        self.end()
        self._stream.write("[bench] " + msg + "\n")
        self._stream.flush()

    def end(self) -> None:
        """Finish the in-place line."""
        if self._dirty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._dirty = False


def _raise_interrupt(signum: int, _frame: Any) -> None:
    # SIGTERM takes the same clean-up path as Ctrl-C.
    raise KeyboardInterrupt(f"signal {signum}")


# ----------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------


def _first_line(e: BaseException, limit: int = 160) -> str:
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


def _call_bounded(fn: Callable[[], None], deadline_s: float) -> BaseException | None:
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


class Runner:
    """Owns the methods, the output directory and the clean-up."""

    def __init__(self, args: argparse.Namespace, progress: Progress) -> None:
        self.args = args
        self.progress = progress
        self.root = Path(tempfile.mkdtemp(prefix="zckpt-bench-", dir=args.dir))
        self.methods: dict[str, Method] = {}
        self.rows: dict[str, Row] = {}
        self.pids: set[int] = set()
        self.pg_initialised = False
        self.pg_init_s: float | None = None
        self.ref: StateDict = {}
        self.base: StateDict = {}
        self.size_bytes = 0
        self.nbytes = 0
        self.timeout_s = 0.0

    # -- set-up ----------------------------------------------------------------------

    def build_state_dict(self) -> None:
        """The reference (never handed to a method) and the working copy methods save."""
        size = self.size_bytes = int(self.args.size_mb * 2**20)
        self.progress.update(f"building a {self.args.size_mb:g} MiB state dict (seed {self.args.seed})")
        self.ref = _peers.make_state_dict(size, seed=self.args.seed)
        self.base = _peers.clone_state_dict(self.ref)
        self.nbytes = _peers.state_dict_nbytes(self.ref)
        # Every wait has a deadline: generous for a slow disk (20 MB/s), never infinite.
        self.timeout_s = self.args.timeout or (120.0 + self.nbytes / 20e6)

    def init_process_group(self) -> None:
        """A 1-rank gloo group for the DCP methods (file:// store inside our temp dir)."""
        import torch.distributed as dist

        if dist.is_initialized():
            return
        self.progress.update("initialising a 1-rank gloo process group")
        t0 = time.perf_counter()
        dist.init_process_group(
            "gloo", init_method=f"file://{self.root / 'pg_store'}", rank=0, world_size=1
        )
        self.pg_init_s = time.perf_counter() - t0
        self.pg_initialised = True

    def start_methods(self, names: Sequence[str]) -> None:
        """Create, start and warm up every selected method, one after the other; a
        failure only costs its own row.

        Each method's warm-up save follows its start-up at once, so the trainer's RSS
        read before the start and after the warm-up tells what the method keeps
        (its staging memory) before the next method starts.
        """
        for name in names:
            method = _peers.make_method(name, log_dir=self.root)
            row = Row(method=name, note=_note(method))
            self.rows[name] = row
            if method.needs_process_group:
                try:
                    self.init_process_group()
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row.error = "process group: " + _first_line(e)
                    continue
            self.progress.update(f"starting {name}")
            _peers.release_free_memory()
            rss_before = _peers.proc_status_kib("self", "VmRSS")
            try:
                t0 = time.perf_counter()
                method.start(method.state_dict_for_save(self.base))
                row.startup_s = time.perf_counter() - t0
                self.methods[name] = method
                self.pids.update(method.child_pids())
            except Unavailable as e:
                row.error = f"not available: {e}"
                self._shutdown(method, row)
                continue
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.error = "start failed: " + _first_line(e)
                self._shutdown(method, row)
                continue
            if not self._one_round(name, 0):
                continue
            _peers.release_free_memory()
            rss_after = _peers.proc_status_kib("self", "VmRSS")
            if rss_before is not None and rss_after is not None:
                row.rss_overhead_mib = (rss_after - rss_before) / 1024

    # -- one save ------------------------------------------------------------------

    def save_once(self, method: Method, tag: str, mutate: bool = False) -> Sample:
        """Time one save of the working state dict; verify it; remove its output.

        With ``mutate``, every tensor gets ``add_(1)`` as soon as the save call returns
        (the tearing run); the working copy is restored from the reference afterwards.
        """
        sd = method.state_dict_for_save(self.base)
        round_dir = self.root / f"{method.name}-{tag}"
        round_dir.mkdir()
        path = round_dir / "ckpt"  # does not exist yet: each method creates it
        # Let the previous save's trailing work (a worker freeing memory, a daemon's
        # gc, writeback) finish, and collect garbage now rather than inside the timing:
        # on 2 cores it would otherwise land on whichever method runs next.
        gc.collect()
        if self.args.settle > 0:
            time.sleep(self.args.settle)
        try:
            t0 = time.perf_counter()
            pending = method.save(sd, path)
            t_ret = time.perf_counter()
            if mutate:
                _peers.mutate_in_place(sd)
            # The caller cannot mutate before the call returned, nor be durable before
            # it may mutate: clamp so a callback that fired early cannot undercut that.
            t_staged = t_ret if pending.staged is None else max(t_ret, pending.staged.wait(self.timeout_s))
            t_done = t_staged if pending.done is None else max(t_staged, pending.done.wait(self.timeout_s))
            fsync_s = 0.0
            if method.fsync in ("bench", "dirs"):
                f0 = time.perf_counter()
                _peers.fsync_tree(path, files=method.fsync == "bench")
                fsync_s = time.perf_counter() - f0
            durable = None if method.fsync == "none" else t_done - t0 + fsync_s
            self.pids.update(method.child_pids())

            loaded = method.load(path, self.ref)
            cmp = _peers.compare(loaded, self.ref)
            del loaded
            return Sample(
                blocked_s=t_ret - t0,
                snapshot_s=t_staged - t0,
                durable_s=durable,
                ok=cmp.ok,
                tensors_differing=cmp.tensors_differing,
                tensors_total=cmp.tensors_total,
                problem=cmp.problems[0] if cmp.problems else "",
            )
        finally:
            if mutate:
                _peers.copy_into(sd, self.ref)
            shutil.rmtree(round_dir, ignore_errors=True)

    # -- the rounds ---------------------------------------------------------------

    def _one_round(self, name: str, r: int) -> bool:
        """Save once with method ``name`` (round 0: the warm-up) and record the result;
        a failure is recorded in the row and shuts the method down. Returns success."""
        label = "warm-up" if r == 0 else f"round {r}/{self.args.rounds}"
        self.progress.update(f"{label}: {name}")
        row = self.rows[name]
        try:
            s = self.save_once(self.methods[name], f"r{r}")
        except Exception as e:  # noqa: BLE001 - reported in the row
            row.error = f"{label} failed: " + _first_line(e)
            if self.args.verbose:
                self.progress.warn(traceback.format_exc())
            self._shutdown(self.methods.pop(name), row)
            return False
        if r == 0:
            row.first_save_s = s.durable_s if s.durable_s is not None else s.snapshot_s
        else:
            row.samples.append(s)
        if not s.ok:
            row.correct = "MISMATCH"
            row.mismatch = row.mismatch or (
                f"{s.tensors_differing}/{s.tensors_total} tensors differ"
                + (f"; {s.problem}" if s.problem else "")
            )
        elif row.correct is None:
            row.correct = "ok"
        return True

    def run_rounds(self) -> None:
        """``--rounds`` interleaved rounds (the warm-up ran in start_methods), the
        workers' peak memory, then the tearing run."""
        for r in range(1, self.args.rounds + 1):
            names = list(self.methods)
            if not names:
                return
            # Rotate the order so no method always runs right after the same neighbour.
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name in self.methods:
                    self._one_round(name, r)

        for name, method in self.methods.items():
            pids = method.child_pids()
            if pids:
                hwm = [_peers.proc_status_kib(pid, "VmHWM") for pid in pids]
                self.rows[name].worker_rss_mib = sum(h for h in hwm if h is not None) / 1024

        for name in list(self.methods):
            self.progress.update(f"tearing run: {name}")
            row = self.rows[name]
            try:
                if self.methods[name].tearing_may_crash:
                    row.torn, extra = self.isolated_tearing(name)
                    row.note = f"{row.note}; {extra}"
                    continue
                s = self.save_once(self.methods[name], "tear", mutate=True)
                row.torn = f"torn {s.tensors_differing}/{s.tensors_total}"
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.torn = "error"
                row.error = "tearing run failed: " + _first_line(e)
                self._shutdown(self.methods.pop(name), row)

    def isolated_tearing(self, name: str) -> tuple[str, str]:
        """The tearing run in a throw-away process, for methods where mutating during a
        save can crash the caller. Returns the torn cell and a note for the row."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        recv_end, send_end = ctx.Pipe(duplex=False)
        work = self.root / f"{name}-tear-isolated"
        work.mkdir()
        before = {pid for pid, _ in _peers.our_children()}
        proc = ctx.Process(
            target=_peers.isolated_tearing_run,
            args=(name, self.size_bytes, self.args.seed, str(work), send_end),
            # Not a daemon: daemonic processes may not start the method's own workers.
            # The finally below kills it if it outlives its deadline.
            daemon=False,
            name=f"bench-tear-{name}",
        )
        proc.start()
        send_end.close()  # so recv() sees EOF when the child dies
        grandchildren: list[int] = []
        msg: tuple[Any, ...] | None = None
        deadline = time.monotonic() + 2 * self.timeout_s + 120
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
                if _peers.kill_pid_if_our_child(pid):
                    _peers.reap(pid)
            self._reap_adopted(before | {proc.pid or -1})
            shutil.rmtree(work, ignore_errors=True)
        if msg is not None and msg[0] == "result":
            return f"torn {msg[1]}/{msg[2]}", "tearing run in a child process"
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            return "crashed", f"tearing run: the caller died of {sig} while mutating"
        if msg is not None:
            return "error", "tearing run: " + str(msg[1]).splitlines()[0][:120]
        return "error", f"tearing run: no result (exit code {code})"

    def _reap_adopted(self, exclude: set[int], wait_s: float = 3.0) -> None:
        """Reap zombie children we adopted as subreaper (not ones a method manages)."""
        end = time.monotonic() + wait_s
        while True:
            left = False
            for pid, state in _peers.our_children():
                if pid in exclude or pid in self.pids:
                    continue
                if state == "Z":
                    _peers.reap(pid, 0.1)
                else:
                    left = True  # e.g. a resource tracker about to see EOF
            if not left or time.monotonic() > end:
                return
            time.sleep(0.05)

    # -- clean-up -----------------------------------------------------------------

    def _shutdown(self, method: Method, row: Row | None) -> None:
        """close() within a deadline, else kill(); then SIGKILL any child it left."""
        err = _call_bounded(method.close, CLOSE_DEADLINE_S)
        if err is not None:
            kerr = _call_bounded(method.kill, 10.0)
            if row is not None and row.error is None and kerr is not None:
                row.error = "close failed: " + _first_line(err)
        for pid in method.child_pids():
            self.pids.add(pid)

    def close(self) -> None:
        """Shut every method down, then remove everything this run created."""
        for name in list(self.methods):
            self.progress.update(f"closing {name}")
            self._shutdown(self.methods.pop(name), self.rows.get(name))
        # Last resort: anything we started that is still our live child gets SIGKILL.
        stray = [pid for pid in sorted(self.pids) if _peers.kill_pid_if_our_child(pid)]
        if stray:
            self.progress.warn(f"killed stray child processes: {stray}")
        if self.pg_initialised:
            try:
                import torch.distributed as dist

                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - clean-up must go on
                self.progress.warn(f"destroy_process_group: {_first_line(e)}")
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            # Reap the multiprocessing resource tracker now: left to exit after us it
            # would be re-parented, and an init that does not reap keeps it a zombie.
            from multiprocessing import resource_tracker

            resource_tracker._resource_tracker._stop()
        except Exception:  # noqa: BLE001 - private API; best effort only
            pass


def _note(method: Method) -> str:
    who = {
        "bench": "fsync by bench",
        "dirs": "dir fsync by bench",
        "self": "fsyncs itself",
        "none": "no disk",
    }[method.fsync]
    return "; ".join(p for p in (method.note, who) if p)


# ----------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------

COLUMNS = (
    "method", "blocked_s", "snapshot_s", "durable_s", "GB/s", "startup_s",
    "first_save_s", "rss_overhead_mib", "worker_rss_mib", "correct", "torn",
    "blocked/memcpy", "snapshot/memcpy", "durable/write", "note",
)


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}"


def _fmt_mib(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def _ratio(x: float | None, ref: float | None) -> str:
    if x is None or ref is None or ref <= 0:
        return "-"
    return f"{x / ref:.2f}x"


def summarise(rows: Sequence[Row], nbytes: int) -> list[dict[str, Any]]:
    """One dict per method: medians, derived numbers, and the raw samples."""
    by = {r.method: r for r in rows}
    memcpy = by["memcpy_warm"].median("blocked_s") if "memcpy_warm" in by else None
    write = by["write_fsync"].median("durable_s") if "write_fsync" in by else None
    out = []
    for r in rows:
        blocked, snap, durable = r.median("blocked_s"), r.median("snapshot_s"), r.median("durable_s")
        rate_of = durable if durable is not None else snap
        note = r.note
        if r.mismatch:
            note = f"{note}; MISMATCH: {r.mismatch}"
        if r.error:
            note = r.error if not r.samples else f"{note}; {r.error}"
        out.append({
            "method": r.method,
            "blocked_s": blocked,
            "snapshot_s": snap,
            "durable_s": durable,
            "gb_per_s": (nbytes / rate_of / 1e9) if rate_of else None,
            "startup_s": r.startup_s,
            "first_save_s": r.first_save_s,
            "rss_overhead_mib": r.rss_overhead_mib,
            "worker_rss_mib": r.worker_rss_mib,
            "correct": r.correct,
            "torn": r.torn,
            "blocked_vs_memcpy": (blocked / memcpy) if blocked is not None and memcpy else None,
            "snapshot_vs_memcpy": (snap / memcpy) if snap is not None and memcpy else None,
            "durable_vs_write_fsync": (durable / write) if durable is not None and write else None,
            "note": note,
            "error": r.error,
            "samples": [asdict(s) for s in r.samples],
        })
    return out


def table_cells(s: dict[str, Any]) -> list[str]:
    """The printed cells of one summary row, in COLUMNS order."""
    return [
        s["method"],
        _fmt_s(s["blocked_s"]),
        _fmt_s(s["snapshot_s"]),
        _fmt_s(s["durable_s"]),
        "-" if s["gb_per_s"] is None else f"{s['gb_per_s']:.2f}",
        _fmt_s(s["startup_s"]),
        _fmt_s(s["first_save_s"]),
        _fmt_mib(s["rss_overhead_mib"]),
        _fmt_mib(s["worker_rss_mib"]),
        s["correct"] or "-",
        s["torn"] or "-",
        "-" if s["blocked_vs_memcpy"] is None else f"{s['blocked_vs_memcpy']:.2f}x",
        "-" if s["snapshot_vs_memcpy"] is None else f"{s['snapshot_vs_memcpy']:.2f}x",
        "-" if s["durable_vs_write_fsync"] is None else f"{s['durable_vs_write_fsync']:.2f}x",
        s["note"],
    ]


def render_text(summary: Sequence[dict[str, Any]], header: str) -> str:
    """Aligned plain-text table."""
    cells = [list(COLUMNS)] + [table_cells(s) for s in summary]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]
    lines = [header]
    for j, row in enumerate(cells):
        left = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join(left + [row[-1]]).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines)


def render_markdown(summary: Sequence[dict[str, Any]], header: str) -> str:
    """GitHub-flavoured Markdown table."""
    out = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summary:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in table_cells(s)) + " |")
    return "\n".join(out) + "\n"


def render_png(summary: Sequence[dict[str, Any]], info: dict[str, Any], path: str) -> bool:
    """Bar chart: per method, time until the trainer may mutate and time until durable.

    matplotlib is imported here, so the bench runs without it; if it is missing a
    one-line warning goes to stderr and no file is written. Returns whether it wrote.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; before pyplot is imported
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"[bench] --png skipped: matplotlib is not installed ({e})", file=sys.stderr)
        return False
    import datetime

    rows = [s for s in summary if s["snapshot_s"] is not None or s["durable_s"] is not None]
    if not rows:
        print("[bench] --png skipped: no method has a measured time", file=sys.stderr)
        return False
    names = [s["method"] for s in rows]
    series = (
        ("snapshot_s", "until the trainer may mutate (snapshot_s)", "#4c72b0"),
        ("durable_s", "until durable (durable_s)", "#dd8452"),
    )
    values = [v for s in rows for key, _, _ in series if (v := s[key]) is not None and v > 0]
    log = bool(values) and max(values) / min(values) > 100

    width = 0.38
    fig, ax = plt.subplots(figsize=(max(7.0, 1.05 * len(rows) + 2.5), 5.2))
    floor = min(values) if log else 0.0  # where a missing bar's "n/a" sits
    for j, (key, label, color) in enumerate(series):
        have = [(i + (j - 0.5) * width, s[key]) for i, s in enumerate(rows)
                if s[key] is not None and s[key] > 0]
        ax.bar([x for x, _ in have], [v for _, v in have], width, label=label, color=color)
        for x, v in have:
            ax.annotate(_fmt_s(v), (x, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
        for i, s in enumerate(rows):  # no value (e.g. memcpy_warm never touches disk)
            if s[key] is None:
                ax.annotate("n/a", (i + (j - 0.5) * width, floor), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom",
                            fontsize=7, color="gray")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("seconds (median)" + (", log scale" if log else ""))
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    ax.set_title(
        f"checkpoint save: {info['state_dict_bytes'] / 2**20:.0f} MiB state dict, "
        f"{info['tensors']} tensors, median of {info['rounds']} round(s), {date}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def describe_run(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """Run configuration, for the header and the JSON file."""
    n_tensors = sum(1 for _ in _peers.iter_tensors(runner.ref))
    return {
        "size_mb": args.size_mb,
        "state_dict_bytes": runner.nbytes,
        "tensors": n_tensors,
        "rounds": args.rounds,
        "seed": args.seed,
        "methods": list(runner.rows),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "dir": str(runner.root),
        "pg_init_s": runner.pg_init_s,
        "timeout_s": runner.timeout_s,
        "settle_s": args.settle,
    }


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def parse_methods(text: str | None) -> list[str]:
    """Expand a comma list of method and group names, keeping the table's order."""
    if not text:
        return list(METHOD_NAMES)
    wanted: set[str] = set()
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item in METHOD_GROUPS:
            wanted.update(METHOD_GROUPS[item])
        elif item in METHOD_NAMES:
            wanted.add(item)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown method {item!r}; choose from {', '.join(METHOD_NAMES)} "
                f"or groups {', '.join(METHOD_GROUPS)}"
            )
    return [m for m in METHOD_NAMES if m in wanted]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mb", type=float, default=None,
                   help=f"state dict size in MiB (default 256; {QUICK_SIZE_MB} with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds after the warm-up; medians are reported (default 3; 1 with --quick)")
    p.add_argument("--methods", type=str, default=None,
                   help="comma list of methods or groups ({}; groups: {})".format(
                       ", ".join(METHOD_NAMES), ", ".join(METHOD_GROUPS)))
    p.add_argument("--dir", type=str, default=None,
                   help="where checkpoints go (a fresh sub-directory, removed at the end; default: /tmp)")
    p.add_argument("--json", type=str, default=None, metavar="PATH", help="also write results as JSON")
    p.add_argument("--markdown", type=str, default=None, metavar="PATH", help="also write a Markdown table")
    p.add_argument("--png", type=str, default=None, metavar="PATH",
                   help="also write a bar chart of snapshot and durable times (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="tiny smoke test: a few MiB, 1 round")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic state dict")
    p.add_argument("--settle", type=float, default=None, metavar="S",
                   help="idle seconds before each save, so one method's trailing work "
                   "does not land in the next one's timing (default 0.25; 0.05 with --quick)")
    p.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds for any one wait (default: 120 + bytes / 20 MB/s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing methods")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = parse_methods(args.methods)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.size_mb is None:
        args.size_mb = QUICK_SIZE_MB if args.quick else 256.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.settle is None:
        args.settle = 0.05 if args.quick else 0.25
    if args.rounds < 1 or args.size_mb <= 0:
        parser.error("--rounds must be >= 1 and --size-mb > 0")
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)

    progress = Progress()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # A peer that crashes a process we started must not leave its workers running.
    _peers.set_child_subreaper()
    runner = Runner(args, progress)
    interrupted = False
    status = 0
    try:
        runner.build_state_dict()
        runner.start_methods(names)
        runner.run_rounds()
    except KeyboardInterrupt:
        interrupted = True
        status = 130
    finally:
        # Clean-up is bounded by deadlines; do not let a second signal cut it short.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            runner.close()
        finally:
            progress.end()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)

    if not runner.rows:
        return status
    info = describe_run(runner, args)
    summary = summarise(list(runner.rows.values()), runner.nbytes)
    header = (
        f"state dict: {info['state_dict_bytes'] / 2**20:.1f} MiB, {info['tensors']} tensors + "
        f"Python scalars; median of {args.rounds} round(s) after 1 warm-up; "
        f"torch {info['torch']}, {info['torch_threads']} intra-op threads, {info['cpus']} CPUs"
        + ("; INTERRUPTED, partial results" if interrupted else "")
    )
    print(render_text(summary, header))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": info, "results": summary,
                                               "interrupted": interrupted}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(summary, header))
    if args.png:
        render_png(summary, info, args.png)
    return status


if __name__ == "__main__":
    sys.exit(main())
