"""Durable time while the trainer is busy in pure Python, against the idle case.

    python bench/gil.py                         # 256 MiB, zckpt and the torch peers
    python bench/gil.py --size-mb 1024 --methods zckpt_2,checkpoint_process_shm

A real training loop holds the GIL most of the time. A checkpointer that still needs
the trainer's interpreter after the save call returns (a hand-off thread, a staging
thread that pickles) slows down when the loop is busy; one whose work happens in other
processes does not. Per method: the median durable time over ``--rounds`` saves with
the caller idle (waiting on the future) and with the caller spinning in pure Python
until the save is done, and their ratio. DESIGN's goal for zckpt: busy within 1.2x of
idle. Methods that do not fsync get it done by the bench after they finish, as in
``throughput.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, report  # noqa: E402
from bench.methods import Method, bench_fsync, make_method, select  # noqa: E402

DEFAULT_METHODS = "zckpt_2,checkpoint_process_shm,async_checkpointer,dcp_process,dcp_thread"


def spin_until(done: Any) -> int:
    """Pure-Python work (holds the GIL between switch intervals) until ``done()``."""
    n = 0
    while not done():
        for i in range(2000):
            n += i * i % 7
    return n


def one_save(method: Method, sd: dict, path: Path, busy: bool, timeout_s: float) -> float:
    """Durable time of one save; with ``busy`` the caller spins in Python until done."""
    t0 = time.perf_counter()
    pending = method.save(sd, path)
    t_ret = time.perf_counter()
    if busy:
        stamps = pending.stamps()
        deadline = time.monotonic() + timeout_s

        def done() -> bool:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method.name} did not finish within {timeout_s}s")
            return all(s.done() for s in stamps)

        spin_until(done)
    pending.wait(t_ret, timeout_s)
    bench_fsync(method, path)
    return time.perf_counter() - t0


def measure(method: Method, sd: dict, root: Path, rounds: int, timeout_s: float,
            progress: harness.Progress) -> dict[str, Any]:
    """Start ``method``, warm it up, then ``rounds`` x (idle save, busy save)."""
    name = method.name
    method.start(method.state_dict_for_save(sd))
    one_save(method, method.state_dict_for_save(sd), root / f"{name}-warm", False, timeout_s)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for busy in (False, True):
            progress.update(f"{name}: round {r + 1}/{rounds} {'busy' if busy else 'idle'}")
            path = root / f"{name}-{r}-{busy}"
            times[busy].append(one_save(method, method.state_dict_for_save(sd), path, busy, timeout_s))
            shutil.rmtree(path, ignore_errors=True)
    idle, busy_s = harness.median(times[False]), harness.median(times[True])
    return {"method": name, "idle_durable_s": idle, "busy_durable_s": busy_s,
            "busy_over_idle": report.ratio(busy_s, idle)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of methods or groups (see throughput.py)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: the system temp dir)")
    report.add_output_args(ap)
    args = ap.parse_args(argv)
    try:
        names = select(args.methods)
    except ValueError as e:
        ap.error(str(e))
    progress = harness.Progress("gil")
    sd = harness.make_state_dict(int(args.size_mb * 2**20))
    rows = []
    pg = False
    with harness.work_dir("zckpt-gil-", args.dir) as root:
        try:
            for name in names:
                method = make_method(name, log_dir=root)
                progress.update(f"{name}: starting")
                try:
                    if method.needs_process_group and not pg:
                        pg = harness.init_process_group(root / "pg")
                    rows.append(measure(method, sd, root, args.rounds, args.timeout, progress))
                except Exception as exc:  # noqa: BLE001 - one method's failure is its row
                    rows.append({"method": name, "error": harness.first_line(exc)})
                finally:
                    if harness.call_bounded(method.close, 20.0) is not None:
                        harness.call_bounded(method.kill, 10.0)
        finally:
            if pg:
                harness.destroy_process_group()
            progress.end()
    t = report.Table(f"{args.size_mb:g} MiB state dict, median of {args.rounds}; "
                     "busy = caller spinning in pure Python until durable",
                     ["method", "idle durable_s", "busy durable_s", "busy/idle", "note"], free_last=True)
    for r in rows:
        if "error" in r:
            t.add([r["method"], "-", "-", "-", "error: " + r["error"]])
        else:
            t.add([r["method"], report.fmt_s(r["idle_durable_s"]), report.fmt_s(r["busy_durable_s"]),
                   report.fmt_ratio(r["busy_over_idle"]), ""])
    report.emit(args, [t], rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
