"""How zckpt scales with writers and with state-dict size; load speed; checksum cost.

    python bench/fanout.py                                  # 1, 2, 4 writers x 64, 256, 1024 MiB
    python bench/fanout.py --workers 1,2,4,8 --sizes-mb 64,256,1024,4096 --json out.json

Pools are built from ``bench/configs/fanout-<N>.toml`` where one exists (the others get
``num_workers=N`` over fanout-4's settings). Per (writers, size) it measures, median of
``--rounds`` after a warm-up save:

- save: ``blocked_s`` (the save call), ``durable_s`` (until committed), GB/s;
- checksum cost: the same saves with ``checksum="none"`` interleaved; the share is
  ``1 - durable(none) / durable(xxh3)`` (hashing runs beside the write, so the
  sum of hash time inside the manifest overstates it);
- load: ``zckpt.load`` (verified) and ``torch.load`` of the same data saved with
  ``torch.save``, with the files evicted from the page cache first (``posix_fadvise
  DONTNEED`` after fsync), so both read from the device.

Prints parallel efficiency (GB/s at N / (N x GB/s at 1)) and the knee (the last writer
count that still adds more than ``--knee-gain``). Ratios within one run are what to
trust on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import zckpt  # noqa: E402
from bench import harness, report  # noqa: E402
from bench.harness import evict, median  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def config_for(workers: int, checksum: str) -> zckpt.PoolConfig:
    path = CONFIGS / f"fanout-{workers}.toml"
    cfg = zckpt.PoolConfig.from_toml(path if path.exists() else CONFIGS / "fanout-4.toml")
    return cfg.replace(num_workers=workers, checksum=checksum, mirrors=(), keep_last=None)


def measure(workers: int, sd: dict, nbytes: int, work: Path, rounds: int, progress: harness.Progress,
            label: str) -> dict[str, Any]:
    pools = {c: zckpt.CheckpointPool(config=config_for(workers, c)) for c in ("xxh3_64", "none")}
    out: dict[str, Any] = {"workers": workers, "size_mib": nbytes / 2**20}
    try:
        times: dict[str, dict[str, list[float]]] = {c: {"blocked": [], "durable": []} for c in pools}
        hash_share: list[float] = []
        for r in range(rounds + 1):  # round 0 warms the arena and is not counted
            # (the last xxh3 checkpoint is kept for the load measurement)
            # Alternate which variant goes first: the first save of a round meets the
            # previous round's device write-back, a bias that must not land on one side.
            for c, pool in (list(pools.items()) if r % 2 else list(pools.items())[::-1]):
                progress.update(f"{label} round {r}/{rounds} {c}")
                path = work / f"w{workers}-{c}-r{r}"
                t0 = time.perf_counter()
                fut = pool.save(sd, path)
                t1 = time.perf_counter()
                fut.result(timeout=600)
                t2 = time.perf_counter()
                if r:
                    times[c]["blocked"].append(t1 - t0)
                    times[c]["durable"].append(t2 - t0)
                if c == "xxh3_64" and r:
                    body = json.loads((path / "manifest.json").read_text())["zckpt_manifest"]
                    hash_share.append(sum(f["hash_s"] for f in body["files"]) /
                                      max(1e-9, sum(f["write_s"] for f in body["files"])))
                if r < rounds or c == "none":
                    shutil.rmtree(path)
        last = work / f"w{workers}-xxh3_64-r{rounds}"
        evict(last)
        t0 = time.perf_counter()
        back = zckpt.load(last)
        load_s = time.perf_counter() - t0
        ok = harness.compare(back, sd).ok
        shutil.rmtree(last)
        d = {c: median(times[c]["durable"]) for c in pools}
        out.update(
            blocked_s=median(times["xxh3_64"]["blocked"]), durable_s=d["xxh3_64"],
            save_gbps=nbytes / d["xxh3_64"] / 1e9, durable_nohash_s=d["none"],
            checksum_share=max(0.0, 1 - d["none"] / d["xxh3_64"]),
            hash_time_over_write_time=median(hash_share),
            load_s=load_s, load_gbps=nbytes / load_s / 1e9, correct=ok,
            startup_s=pools["xxh3_64"].startup_s,
        )
    finally:
        for pool in pools.values():
            pool.close()
    return out


def torch_load_baseline(sd: dict, nbytes: int, work: Path) -> dict[str, float]:
    path = work / "torch.pt"
    t0 = time.perf_counter()
    torch.save(sd, path)
    harness.fsync_path(path)
    save_s = time.perf_counter() - t0
    evict(path)
    t0 = time.perf_counter()
    torch.load(path, weights_only=True)
    load_s = time.perf_counter() - t0
    path.unlink()
    return {"torch_save_fsync_s": save_s, "torch_load_s": load_s, "torch_load_gbps": nbytes / load_s / 1e9}


def table(rows: list[dict[str, Any]], base: dict[int, dict[str, float]]) -> report.Table:
    """One row per (size, writers); efficiency against 1 writer at the same size, same run."""
    t = report.Table("", ["MiB", "writers", "blocked_s", "durable_s", "save GB/s", "efficiency",
                          "checksum cost", "load GB/s", "torch.load GB/s", "correct"])
    for r in rows:
        one = next((x for x in rows if x["size_mib"] == r["size_mib"] and x["workers"] == 1), None)
        eff = report.ratio(r["save_gbps"], r["workers"] * one["save_gbps"]) if one else None
        r["efficiency"] = eff if eff is not None else float("nan")
        b = base[int(r["size_mib"])]
        t.add([f"{r['size_mib']:.0f}", str(r["workers"]), f"{r['blocked_s']:.3f}", f"{r['durable_s']:.3f}",
               f"{r['save_gbps']:.2f}", report.fmt_num(eff), f"{r['checksum_share'] * 100:.1f}%",
               f"{r['load_gbps']:.2f}", f"{b['torch_load_gbps']:.2f}", "ok" if r["correct"] else "MISMATCH"])
    return t


def knees(rows: list[dict[str, Any]], gain: float) -> dict[int, int]:
    out = {}
    for size in sorted({int(r["size_mib"]) for r in rows}):
        series = sorted((r["workers"], r["save_gbps"]) for r in rows if int(r["size_mib"]) == size)
        knee = series[0][0]
        for (_, prev), (n, cur) in zip(series, series[1:], strict=False):
            if cur > prev * (1 + gain):
                knee = n
            else:
                break
        out[size] = knee
    return out


def plot(rows: list[dict[str, Any]]) -> Any:
    """The ``--png`` drawer: durable save GB/s against writers, one line per size."""
    lines = {f"{size:.0f} MiB": [(r["workers"], r["save_gbps"]) for r in rows if r["size_mib"] == size]
             for size in sorted({r["size_mib"] for r in rows})}

    def draw(plt: Any, path: str) -> bool:
        return report.line_chart(plt, path, lines, "writers", "durable save GB/s", "zckpt fan-out scaling")

    return draw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="comma list of writer counts")
    ap.add_argument("--sizes-mb", default="64,256,1024", help="comma list of state-dict sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir); "
                    "put it on the disk you checkpoint to")
    ap.add_argument("--knee-gain", type=float, default=0.10)
    report.add_output_args(ap, png="a chart of save GB/s against writers")
    args = ap.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    sizes = [int(x) for x in args.sizes_mb.split(",")]
    rows: list[dict[str, Any]] = []
    base: dict[int, dict[str, float]] = {}
    progress = harness.Progress("fanout")
    with harness.work_dir("zckpt-fanout-", args.dir) as work:
        for size in sizes:
            sd = harness.make_state_dict(size << 20)
            nbytes = harness.state_dict_nbytes(sd)
            base[size] = torch_load_baseline(sd, nbytes, work)
            for n in workers:
                rows.append(measure(n, sd, nbytes, work, args.rounds, progress, f"{size} MiB, {n} writers:"))
                rows[-1]["size_mib"] = size
            del sd
        progress.end()
    t = table(rows, base)
    t.footer = [f"{size} MiB: knee at {knee} writer(s) (more writers add < {args.knee_gain:.0%})"
                for size, knee in knees(rows, args.knee_gain).items()]
    report.emit(args, [t], {"rows": rows, "torch_baseline": base}, png=plot(rows))
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
