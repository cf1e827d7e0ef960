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
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import zckpt  # noqa: E402

from _peers import make_state_dict, state_dict_nbytes  # noqa: E402


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


def config_for(workers: int, checksum: str) -> zckpt.PoolConfig:
    path = HERE / "configs" / f"fanout-{workers}.toml"
    cfg = zckpt.PoolConfig.from_toml(path if path.exists() else HERE / "configs" / "fanout-4.toml")
    return cfg.replace(num_workers=workers, checksum=checksum, mirrors=(), keep_last=None)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure(workers: int, sd: dict, nbytes: int, work: Path, rounds: int, progress: str) -> dict[str, Any]:
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
                print(f"\r{progress} round {r}/{rounds} {c:8}", end="", file=sys.stderr, flush=True)
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
        ok = all(torch.equal(a, b) for a, b in zip(_tensors(back), _tensors(sd), strict=False))
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


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in obj for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def torch_load_baseline(sd: dict, nbytes: int, work: Path) -> dict[str, float]:
    path = work / "torch.pt"
    t0 = time.perf_counter()
    torch.save(sd, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    save_s = time.perf_counter() - t0
    evict(path)
    t0 = time.perf_counter()
    torch.load(path, weights_only=True)
    load_s = time.perf_counter() - t0
    path.unlink()
    return {"torch_save_fsync_s": save_s, "torch_load_s": load_s, "torch_load_gbps": nbytes / load_s / 1e9}


def render(rows: list[dict[str, Any]], base: dict[int, dict[str, float]]) -> tuple[str, str]:
    head = ["MiB", "writers", "blocked_s", "durable_s", "save GB/s", "efficiency", "checksum cost",
            "load GB/s", "torch.load GB/s", "correct"]
    lines = []
    for r in rows:
        one = next((x for x in rows if x["size_mib"] == r["size_mib"] and x["workers"] == 1), None)
        eff = r["save_gbps"] / (r["workers"] * one["save_gbps"]) if one else float("nan")
        r["efficiency"] = eff
        b = base[int(r["size_mib"])]
        lines.append([f"{r['size_mib']:.0f}", str(r["workers"]), f"{r['blocked_s']:.3f}", f"{r['durable_s']:.3f}",
                      f"{r['save_gbps']:.2f}", f"{eff:.2f}", f"{r['checksum_share'] * 100:.1f}%",
                      f"{r['load_gbps']:.2f}", f"{b['torch_load_gbps']:.2f}", "ok" if r["correct"] else "MISMATCH"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)) for row in [head] + lines)
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(
        "| " + " | ".join(line) + " |" for line in lines)
    return text, md


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


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'zckpt[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({r["size_mib"] for r in rows}):
        series = sorted((r["workers"], r["save_gbps"]) for r in rows if r["size_mib"] == size)
        ax.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=f"{size:.0f} MiB")
    ax.set_xlabel("writers")
    ax.set_ylabel("durable save GB/s")
    ax.set_title("zckpt fan-out scaling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="comma list of writer counts")
    ap.add_argument("--sizes-mb", default="64,256,1024", help="comma list of state-dict sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir); "
                    "put it on the disk you checkpoint to")
    ap.add_argument("--knee-gain", type=float, default=0.10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",")]
    sizes = [int(x) for x in args.sizes_mb.split(",")]
    work = Path(tempfile.mkdtemp(prefix="zckpt-fanout-", dir=args.dir))
    rows: list[dict[str, Any]] = []
    base: dict[int, dict[str, float]] = {}
    try:
        for size in sizes:
            sd = make_state_dict(size << 20)
            nbytes = state_dict_nbytes(sd)
            base[size] = torch_load_baseline(sd, nbytes, work)
            for n in workers:
                rows.append(measure(n, sd, nbytes, work, args.rounds, f"[{size} MiB, {n} writers]"))
                rows[-1]["size_mib"] = size
            del sd
        print(file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text, md = render(rows, base)
    print(text)
    for size, knee in knees(rows, args.knee_gain).items():
        print(f"{size} MiB: knee at {knee} writer(s) (more writers add < {args.knee_gain:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "torch_baseline": base}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.png:
        plot(rows, args.png)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
