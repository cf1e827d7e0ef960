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
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import _peers  # noqa: E402

DEFAULT_METHODS = "zckpt_2,checkpoint_process_shm,async_checkpointer,dcp_process,dcp_thread"


def spin_until(done: Any) -> int:
    """Pure-Python work (holds the GIL between switch intervals) until ``done()``."""
    n = 0
    while not done():
        for i in range(2000):
            n += i * i % 7
    return n


def one_save(method: _peers.Method, sd: dict, path: Path, busy: bool, timeout_s: float) -> float:
    t0 = time.perf_counter()
    pending = method.save(sd, path)
    if busy:
        stamps = [s for s in (pending.staged, pending.done) if s is not None]
        deadline = time.monotonic() + timeout_s

        def done() -> bool:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method.name} did not finish within {timeout_s}s")
            return all(s._fut.done() for s in stamps)

        spin_until(done)
    for s in (pending.staged, pending.done):
        if s is not None:
            s.wait(timeout_s)
    if method.fsync in ("bench", "dirs"):
        _peers.fsync_tree(path, files=method.fsync == "bench")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="zckpt-gil-"))
    sd = _peers.make_state_dict(int(args.size_mb * 2**20))
    rows = []
    pg = False
    try:
        for name in args.methods.split(","):
            method = _peers.make_method(name, log_dir=root)
            if method.needs_process_group and not pg:
                import torch.distributed as dist
                dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1)
                pg = True
            print(f"[gil] {name}: starting", file=sys.stderr, flush=True)
            try:
                work = method.state_dict_for_save(sd)
                method.start(work)
                one_save(method, method.state_dict_for_save(sd), root / f"{name}-warm", False, args.timeout)
                times: dict[bool, list[float]] = {False: [], True: []}
                for r in range(args.rounds):
                    for busy in (False, True):
                        print(f"[gil] {name}: round {r + 1}/{args.rounds} {'busy' if busy else 'idle'}",
                              file=sys.stderr, flush=True)
                        path = root / f"{name}-{r}-{busy}"
                        times[busy].append(one_save(method, method.state_dict_for_save(sd), path, busy,
                                                    args.timeout))
                        shutil.rmtree(path, ignore_errors=True)
                idle, busy_s = statistics.median(times[False]), statistics.median(times[True])
                rows.append({"method": name, "idle_durable_s": idle, "busy_durable_s": busy_s,
                             "busy_over_idle": busy_s / idle})
            except Exception as exc:  # noqa: BLE001 - one method's failure is its row
                rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                try:
                    method.close()
                except Exception:  # noqa: BLE001
                    method.kill()
    finally:
        if pg:
            import torch.distributed as dist
            dist.destroy_process_group()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.size_mb:g} MiB state dict, median of {args.rounds}; busy = caller spinning in pure Python")
    print(f"{'method':<24}{'idle durable':>14}{'busy durable':>14}{'busy/idle':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<24}  error: {r['error']}")
        else:
            print(f"{r['method']:<24}{r['idle_durable_s']:>13.3f}s{r['busy_durable_s']:>13.3f}s"
                  f"{r['busy_over_idle']:>10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
