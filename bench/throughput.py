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

Small tensors (``--small-tensors``, default 2,000 tensors of 256 B; 0 skips): after
the main rounds, every selected zckpt method saves that state dict once (its first
save of that structure: planned from scratch) and then ``--small-rounds`` times
(median; the structure repeats, so zckpt reuses the last plan), with the blocked time,
zckpt's own ``plan_s`` and the ratio to a warm memcpy of the same bytes beside them.

Shared-memory pages count in the RSS of every process that has touched them: a
staging arena mapped by the trainer and by N workers shows up in rss_overhead_mib
and again in each worker's VmHWM, so worker_rss_mib counts it once per worker and
the columns must not be added up as if they were disjoint.

Run from the repository root, e.g.::

    python bench/throughput.py --quick
    python bench/throughput.py --size-mb 256 --json out.json --markdown out.md
    python bench/throughput.py --methods torch_save,dcp_process,zckpt --rounds 5
    python bench/throughput.py --size-mb 64 --methods raw,zckpt --png out.png

or as ``python -m bench.throughput ARGS`` or ``zckpt bench ARGS`` from a source
checkout. ``--png`` needs matplotlib (it is skipped with a warning when that is not
installed).

Everything created (processes, files, shared memory) is removed at the end, also on
Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import harness, report  # noqa: E402
from bench.harness import StateDict  # noqa: E402
from bench.methods import (  # noqa: E402
    METHOD_GROUPS,
    METHOD_NAMES,
    MemcpyWarm,
    Method,
    Unavailable,
    bench_fsync,
    fsync_note,
    isolated_tearing_run,
    make_method,
    select,
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
    #: The method's own account of the save (zckpt: plan_s, wait_buffer_s, ...).
    timings: dict[str, float] = field(default_factory=dict)


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
    #: Small-tensors run: the first save of that structure, then the timed ones.
    first: Sample | None = None

    def median(self, attr: str) -> float | None:
        """Median of one timing over the measured rounds (None if none measured)."""
        vals = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return harness.median(vals) if vals else None

    def median_timing(self, key: str) -> float | None:
        """Median of one of the method's own timings (None if it reports none)."""
        vals = [s.timings[key] for s in self.samples if key in s.timings]
        return harness.median(vals) if vals else None

    def record(self, s: Sample) -> None:
        """Fold one sample's correctness into the row."""
        if not s.ok:
            self.correct = "MISMATCH"
            self.mismatch = self.mismatch or (
                f"{s.tensors_differing}/{s.tensors_total} tensors differ"
                + (f"; {s.problem}" if s.problem else "")
            )
        elif self.correct is None:
            self.correct = "ok"


# ----------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------


class Runner:
    """Owns the methods, the output directory and the clean-up."""

    def __init__(self, args: argparse.Namespace, progress: harness.Progress) -> None:
        self.args = args
        self.progress = progress
        self.root = Path(tempfile.mkdtemp(prefix="zckpt-bench-", dir=args.dir))
        self.methods: dict[str, Method] = {}
        self.rows: dict[str, Row] = {}
        self.small_rows: dict[str, Row] = {}
        self.small_info: dict[str, Any] = {}
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
        self.ref = harness.make_state_dict(size, seed=self.args.seed)
        self.base = harness.clone_state_dict(self.ref)
        self.nbytes = harness.state_dict_nbytes(self.ref)
        # Every wait has a deadline: generous for a slow disk (20 MB/s), never infinite.
        self.timeout_s = self.args.timeout or (120.0 + self.nbytes / 20e6)

    def init_process_group(self) -> None:
        """A 1-rank gloo group for the DCP methods (file:// store inside our temp dir)."""
        self.progress.update("initialising a 1-rank gloo process group")
        t0 = time.perf_counter()
        if harness.init_process_group(self.root / "pg_store"):
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
            method = make_method(name, log_dir=self.root)
            row = Row(method=name, note=fsync_note(method))
            self.rows[name] = row
            if method.needs_process_group:
                try:
                    self.init_process_group()
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row.error = "process group: " + harness.first_line(e)
                    continue
            self.progress.update(f"starting {name}")
            harness.release_free_memory()
            rss_before = harness.proc_status_kib("self", "VmRSS")
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
                row.error = "start failed: " + harness.first_line(e)
                self._shutdown(method, row)
                continue
            if not self._one_round(name, 0):
                continue
            harness.release_free_memory()
            rss_after = harness.proc_status_kib("self", "VmRSS")
            if rss_before is not None and rss_after is not None:
                row.rss_overhead_mib = (rss_after - rss_before) / 1024

    # -- one save ------------------------------------------------------------------

    def save_once(self, method: Method, tag: str, mutate: bool = False,
                  ref: StateDict | None = None, base: StateDict | None = None) -> Sample:
        """Time one save of the working state dict; verify it; remove its output.

        ``ref``/``base``: the reference and working state dicts (default: the run's
        transformer-shaped ones). With ``mutate``, every tensor gets ``add_(1)`` as
        soon as the save call returns (the tearing run); the working copy is restored
        from the reference afterwards.
        """
        ref = self.ref if ref is None else ref
        sd = method.state_dict_for_save(self.base if base is None else base)
        round_dir = self.root / f"{method.name}-{tag}"
        round_dir.mkdir()
        path = round_dir / "ckpt"  # does not exist yet: each method creates it
        harness.settle(self.args.settle)
        try:
            t0 = time.perf_counter()
            pending = method.save(sd, path)
            t_ret = time.perf_counter()
            if mutate:
                harness.mutate_in_place(sd)
            t_staged, t_done = pending.wait(t_ret, self.timeout_s)
            fsync_s = bench_fsync(method, path)
            durable = None if method.fsync == "none" else t_done - t0 + fsync_s
            self.pids.update(method.child_pids())
            timings = method.last_timings()

            loaded = method.load(path, ref)
            cmp = harness.compare(loaded, ref)
            del loaded
            return Sample(
                blocked_s=t_ret - t0,
                snapshot_s=t_staged - t0,
                durable_s=durable,
                ok=cmp.ok,
                tensors_differing=cmp.tensors_differing,
                tensors_total=cmp.tensors_total,
                problem=cmp.problems[0] if cmp.problems else "",
                timings=timings,
            )
        finally:
            if mutate:
                harness.copy_into(sd, ref)
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
            self._fail(name, row, f"{label} failed", e)
            return False
        if r == 0:
            row.first_save_s = s.durable_s if s.durable_s is not None else s.snapshot_s
        else:
            row.samples.append(s)
        row.record(s)
        return True

    def _fail(self, name: str, row: Row, what: str, e: BaseException) -> None:
        row.error = f"{what}: " + harness.first_line(e)
        if self.args.verbose:
            self.progress.warn(traceback.format_exc())
        self._shutdown(self.methods.pop(name), row)

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
                hwm = [harness.proc_status_kib(pid, "VmHWM") for pid in pids]
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
                self._fail(name, row, "tearing run failed", e)

    def isolated_tearing(self, name: str) -> tuple[str, str]:
        """The tearing run in a throw-away process, for methods where mutating during a
        save can crash the caller. Returns the torn cell and a note for the row."""
        work = self.root / f"{name}-tear-isolated"
        work.mkdir()
        try:
            out = harness.run_isolated(
                isolated_tearing_run, (name, self.size_bytes, self.args.seed, str(work)),
                deadline_s=2 * self.timeout_s + 120, keep=self.pids, name=f"bench-tear-{name}",
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        msg = out.message
        if msg is not None and msg[0] == "result":
            return f"torn {msg[1]}/{msg[2]}", "tearing run in a child process"
        sig = out.crash_signal()
        if sig is not None:
            return "crashed", f"tearing run: the caller died of {sig} while mutating"
        if msg is not None:
            return "error", "tearing run: " + str(msg[1]).splitlines()[0][:120]
        return "error", f"tearing run: no result (exit code {out.exitcode})"

    # -- many small tensors ----------------------------------------------------------

    def run_small_tensors(self) -> None:
        """Blocked time for ``--small-tensors`` tiny tensors: every running zckpt method
        (its pool is warm, its last plan is the big state dict's) saves the small state
        dict once (a new structure: planned from scratch), then ``--small-rounds`` more
        times (the same structure: the last plan is reused); a warm memcpy of the same
        tensors is the baseline."""
        count, size = self.args.small_tensors, self.args.small_bytes
        zckpt_names = [n for n, m in self.methods.items() if m.group == "zckpt"]
        if count <= 0 or not zckpt_names:
            return
        ref = harness.make_small_tensors_state_dict(count, size, seed=self.args.seed)
        base = harness.clone_state_dict(ref)
        self.small_info = {"tensors": count, "tensor_bytes": size, "rounds": self.args.small_rounds,
                           "state_dict_bytes": harness.state_dict_nbytes(ref)}
        memcpy = MemcpyWarm()
        memcpy.group = "raw"
        runs: list[tuple[str, Method]] = [(memcpy.name, memcpy)] + [(n, self.methods[n]) for n in zckpt_names]
        try:
            memcpy.start(base)
        except Exception as e:  # noqa: BLE001 - reported in the row
            self.small_rows[memcpy.name] = Row(memcpy.name, error="start failed: " + harness.first_line(e))
            runs = runs[1:]
        for name, method in runs:
            row = self.small_rows[name] = Row(method=name, note=fsync_note(method))
            try:
                for r in range(self.args.small_rounds + 1):
                    self.progress.update(f"small tensors: {name} {'first save' if r == 0 else f'round {r}'}")
                    s = self.save_once(method, f"small-r{r}", ref=ref, base=base)
                    if r == 0:
                        row.first = s
                    else:
                        row.samples.append(s)
                    row.record(s)
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.error = "small tensors failed: " + harness.first_line(e)
                if name in self.methods:
                    self._shutdown(self.methods.pop(name), self.rows[name])
        memcpy.close()

    # -- clean-up -----------------------------------------------------------------

    def _shutdown(self, method: Method, row: Row | None) -> None:
        """close() within a deadline, else kill(); then SIGKILL any child it left."""
        err = harness.call_bounded(method.close, CLOSE_DEADLINE_S)
        if err is not None:
            kerr = harness.call_bounded(method.kill, 10.0)
            if row is not None and row.error is None and kerr is not None:
                row.error = "close failed: " + harness.first_line(err)
        for pid in method.child_pids():
            self.pids.add(pid)

    def close(self) -> None:
        """Shut every method down, then remove everything this run created."""
        for name in list(self.methods):
            self.progress.update(f"closing {name}")
            self._shutdown(self.methods.pop(name), self.rows.get(name))
        # Last resort: anything we started that is still our live child gets SIGKILL.
        stray = [pid for pid in sorted(self.pids) if harness.kill_pid_if_our_child(pid)]
        if stray:
            self.progress.warn(f"killed stray child processes: {stray}")
        if self.pg_initialised:
            try:
                harness.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - clean-up must go on
                self.progress.warn(f"destroy_process_group: {harness.first_line(e)}")
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            # Reap the multiprocessing resource tracker now: left to exit after us it
            # would be re-parented, and an init that does not reap keeps it a zombie.
            from multiprocessing import resource_tracker

            resource_tracker._resource_tracker._stop()
        except Exception:  # noqa: BLE001 - private API; best effort only
            pass


# ----------------------------------------------------------------------------------
# Summary and tables
# ----------------------------------------------------------------------------------

COLUMNS = (
    "method", "blocked_s", "snapshot_s", "durable_s", "GB/s", "startup_s",
    "first_save_s", "rss_overhead_mib", "worker_rss_mib", "correct", "torn",
    "blocked/memcpy", "snapshot/memcpy", "durable/write", "note",
)

SMALL_COLUMNS = (
    "method", "first blocked_s", "blocked_s", "first plan_s", "plan_s", "snapshot_s", "durable_s",
    "blocked/memcpy", "snapshot/memcpy", "correct", "note",
)


def _note_of(r: Row) -> str:
    note = r.note
    if r.mismatch:
        note = f"{note}; MISMATCH: {r.mismatch}"
    if r.error:
        note = r.error if not r.samples else f"{note}; {r.error}"
    return note


def summarise(rows: Sequence[Row], nbytes: int) -> list[dict[str, Any]]:
    """One dict per method: medians, ratios against the in-run baselines (memcpy_warm,
    write_fsync), and the raw samples."""
    by = {r.method: r for r in rows}
    memcpy = by["memcpy_warm"].median("blocked_s") if "memcpy_warm" in by else None
    write = by["write_fsync"].median("durable_s") if "write_fsync" in by else None
    out = []
    for r in rows:
        blocked, snap, durable = r.median("blocked_s"), r.median("snapshot_s"), r.median("durable_s")
        rate_of = durable if durable is not None else snap
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
            "blocked_vs_memcpy": report.ratio(blocked, memcpy),
            "snapshot_vs_memcpy": report.ratio(snap, memcpy),
            "durable_vs_write_fsync": report.ratio(durable, write),
            "note": _note_of(r),
            "error": r.error,
            "samples": [asdict(s) for s in r.samples],
        })
    return out


def summarise_small(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The small-tensors rows: first save and median of the later ones, against the
    memcpy of the same tensors."""
    memcpy = rows[0].median("blocked_s") if rows and rows[0].method == "memcpy_warm" else None
    out = []
    for r in rows:
        first = r.first
        blocked, snap = r.median("blocked_s"), r.median("snapshot_s")
        out.append({
            "method": r.method,
            "first_blocked_s": first.blocked_s if first else None,
            "blocked_s": blocked,
            "first_plan_s": first.timings.get("plan_s") if first else None,
            "plan_s": r.median_timing("plan_s"),
            "snapshot_s": snap,
            "durable_s": r.median("durable_s"),
            "blocked_vs_memcpy": report.ratio(blocked, memcpy),
            "snapshot_vs_memcpy": report.ratio(snap, memcpy),
            "correct": r.correct,
            "note": _note_of(r),
            "error": r.error,
            "first": asdict(first) if first else None,
            "samples": [asdict(s) for s in r.samples],
        })
    return out


def main_table(summary: Sequence[dict[str, Any]], header: str) -> report.Table:
    """The main table, one row per method."""
    t = report.Table(header, COLUMNS, free_last=True)
    for s in summary:
        t.add([
            s["method"], report.fmt_s(s["blocked_s"]), report.fmt_s(s["snapshot_s"]),
            report.fmt_s(s["durable_s"]), report.fmt_num(s["gb_per_s"]), report.fmt_s(s["startup_s"]),
            report.fmt_s(s["first_save_s"]), report.fmt_mib(s["rss_overhead_mib"]),
            report.fmt_mib(s["worker_rss_mib"]), s["correct"] or "-", s["torn"] or "-",
            report.fmt_ratio(s["blocked_vs_memcpy"]), report.fmt_ratio(s["snapshot_vs_memcpy"]),
            report.fmt_ratio(s["durable_vs_write_fsync"]), s["note"],
        ])
    return t


def small_table(summary: Sequence[dict[str, Any]], info: dict[str, Any]) -> report.Table:
    """The small-tensors table."""
    header = (f"small tensors: {info['tensors']:,} x {info['tensor_bytes']} B "
              f"({info['state_dict_bytes'] / 2**20:.2f} MiB); first save of the structure, "
              f"then median of {info['rounds']} (zckpt reuses the last plan)")
    t = report.Table(header, SMALL_COLUMNS, free_last=True)
    for s in summary:
        t.add([
            s["method"], report.fmt_s(s["first_blocked_s"]), report.fmt_s(s["blocked_s"]),
            report.fmt_s(s["first_plan_s"]), report.fmt_s(s["plan_s"]), report.fmt_s(s["snapshot_s"]),
            report.fmt_s(s["durable_s"]), report.fmt_ratio(s["blocked_vs_memcpy"]),
            report.fmt_ratio(s["snapshot_vs_memcpy"]), s["correct"] or "-", s["note"],
        ])
    return t


def bar_chart(summary: Sequence[dict[str, Any]], info: dict[str, Any]) -> Any:
    """The ``--png`` drawer: per method, time until the trainer may mutate and until durable."""
    import datetime

    rows = [s for s in summary if s["snapshot_s"] is not None or s["durable_s"] is not None]
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = (f"checkpoint save: {info['state_dict_bytes'] / 2**20:.0f} MiB state dict, "
             f"{info['tensors']} tensors, median of {info['rounds']} round(s), {date}")

    def draw(plt: Any, path: str) -> bool:
        return report.bar_chart(plt, path, [s["method"] for s in rows], [
            ("until the trainer may mutate (snapshot_s)", "#4c72b0", [s["snapshot_s"] for s in rows]),
            ("until durable (durable_s)", "#dd8452", [s["durable_s"] for s in rows]),
        ], title)

    return draw


def describe_run(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """Run configuration, for the header and the JSON file."""
    n_tensors = sum(1 for _ in harness.iter_tensors(runner.ref))
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
        "small_tensors": runner.small_info or None,
    }


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


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
    report.add_output_args(p, png="a bar chart of snapshot and durable times")
    p.add_argument("--quick", action="store_true", help="tiny smoke test: a few MiB, 1 round")
    p.add_argument("--small-tensors", type=int, default=2000, metavar="N",
                   help="also time zckpt on N tiny tensors (default 2000; 0 skips)")
    p.add_argument("--small-bytes", type=int, default=256, metavar="B",
                   help="bytes per tensor of the small-tensors run (default 256)")
    p.add_argument("--small-rounds", type=int, default=7,
                   help="timed saves of the small-tensors run after its first save (default 7)")
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
        names = select(args.methods)
    except ValueError as e:
        parser.error(str(e))
    if args.size_mb is None:
        args.size_mb = QUICK_SIZE_MB if args.quick else 256.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.settle is None:
        args.settle = 0.05 if args.quick else 0.25
    if args.rounds < 1 or args.size_mb <= 0 or args.small_rounds < 1:
        parser.error("--rounds and --small-rounds must be >= 1 and --size-mb > 0")
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)

    progress = harness.Progress()
    signal.signal(signal.SIGTERM, harness.raise_interrupt)
    # A peer that crashes a process we started must not leave its workers running.
    harness.set_child_subreaper()
    runner = Runner(args, progress)
    interrupted = False
    status = 0
    try:
        runner.build_state_dict()
        runner.start_methods(names)
        runner.run_rounds()
        runner.run_small_tensors()
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
    small = summarise_small(list(runner.small_rows.values()))
    header = (
        f"state dict: {info['state_dict_bytes'] / 2**20:.1f} MiB, {info['tensors']} tensors + "
        f"Python scalars; median of {args.rounds} round(s) after 1 warm-up; "
        f"torch {info['torch']}, {info['torch_threads']} intra-op threads, {info['cpus']} CPUs"
        + ("; INTERRUPTED, partial results" if interrupted else "")
    )
    tables = [main_table(summary, header)] + ([small_table(small, runner.small_info)] if small else [])
    payload = {"config": info, "results": summary, "small_tensors": small, "interrupted": interrupted}
    report.emit(args, tables, payload, png=bar_chart(summary, info))
    return status


if __name__ == "__main__":
    sys.exit(main())
