"""The trainer's stall against a warm memcpy, measured in pairs.

    python bench/stall.py                          # 1 GiB, 1 and 2 workers, 7 pairs each
    python bench/stall.py --size-mb 256 --workers 1,2,4 --pairs 11

``throughput.py`` takes the median of each method over its rounds; on a shared 2-CPU
machine a 1 GiB copy varies by 2x from one second to the next, and those medians can
differ by more than the methods do. Here each round is a *pair*: a warm memcpy of the
state dict (``memcpy_warm``, the floor) immediately followed by a ``pool.save()`` of
the same state dict, each after the same idle settle; the ratio is taken within the pair
and the median ratio is reported, with the spread. The pool is warm (``reserve()`` and a
first save), and every save is durable before the next pair starts.
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

import zckpt  # noqa: E402
from bench import harness, report  # noqa: E402
from bench.harness import median  # noqa: E402
from bench.methods import MemcpyWarm  # noqa: E402


def run(size_mb: int, workers: list[int], pairs: int, settle_s: float, parent: str | None) -> list[dict[str, Any]]:
    sd = harness.make_state_dict(size_mb << 20, seed=0)
    floor = MemcpyWarm()
    floor.start(sd)
    floor.save(sd, Path("unused"))  # the first copy warms the buffer
    results = []
    try:
        with harness.work_dir("zckpt-stall-", parent) as root:
            for n in workers:
                ratios, copies, stalls = [], [], []
                with zckpt.CheckpointPool(num_workers=n) as pool:
                    pool.reserve(sd)
                    pool.save(sd, root / f"warm-{n}").result()
                    for i in range(pairs):
                        harness.settle(settle_s)
                        t0 = time.perf_counter()
                        floor.save(sd, Path("unused"))
                        copy_s = time.perf_counter() - t0
                        harness.settle(settle_s)
                        t0 = time.perf_counter()
                        fut = pool.save(sd, root / f"s{n}-{i}")
                        stall_s = time.perf_counter() - t0
                        fut.result()
                        shutil.rmtree(root / f"s{n}-{i}")
                        copies.append(copy_s)
                        stalls.append(stall_s)
                        ratios.append(stall_s / copy_s)
                results.append({"workers": n, "memcpy_s": median(copies), "stall_s": median(stalls),
                                "ratio_median": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                                "ratios": ratios})
    finally:
        floor.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--settle", type=float, default=0.25, help="idle seconds before each timed call")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default /tmp)")
    report.add_output_args(ap)
    args = ap.parse_args()
    rows = run(args.size_mb, [int(w) for w in args.workers.split(",")], args.pairs, args.settle, args.dir)
    table = report.Table(f"stall vs warm memcpy, {args.size_mb} MiB, {args.pairs} pairs per row",
                         ["workers", "memcpy_s", "stall_s", "stall/memcpy median", "min", "max"])
    for r in rows:
        table.add([str(r["workers"]), report.fmt_s(r["memcpy_s"]), report.fmt_s(r["stall_s"]),
                   report.fmt_ratio(r["ratio_median"]), report.fmt_ratio(r["ratio_min"]),
                   report.fmt_ratio(r["ratio_max"])])
    report.emit(args, [table], rows)


if __name__ == "__main__":
    main()
