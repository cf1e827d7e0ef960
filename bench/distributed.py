"""Multi-rank saves: zckpt.distributed against DCP async_save, at 1, 2, 4 and 8 ranks.

    python bench/distributed.py                       # 64 MiB DDP state, ranks 1,2,4,8
    python bench/distributed.py --size-mb 256 --ranks 2,4 --rounds 5

Each world size runs as spawned gloo ranks on one machine (a Store hosted by this
process, as torchrun's agent does). Every rank holds the same DDP-style (replicated)
state dict; per world size and method, median over ``--rounds`` after a warm-up save:

- ``blocked_s``: the ``save()``/``async_save()`` call, the slowest rank; ``snapshot_s``:
  until the rank may mutate its tensors (zckpt: the same; DCP with async staging: its
  staging future); ``memcpy_s``: a warm copy of the bytes that rank writes (zckpt copies
  only what it writes), and snapshot / memcpy (target <= 1.25x);
- ``durable_s``: from the call until every rank sees the checkpoint committed;
- ``commit_ms`` (zckpt): from the last rank's files durable to the verdict seen on every
  rank (target < 50 ms at 8 ranks);
- bytes written per rank, max/mean (zckpt's balanced split of replicated tensors);
- ``allreduce_rate``: all-reduces per second the main threads ran while saves were in
  flight, against the same loop with no save (no collective is issued by a zckpt save,
  so the two differ only by CPU contention).

On this 2-CPU machine 8 ranks (plus a writer per rank) share 2 cores: absolute times
grow with the rank count for reasons that have nothing to do with the protocol.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, report  # noqa: E402
from bench.harness import median  # noqa: E402


def _rank(rank: int, world: int, port: int, args: dict[str, Any], out: Any) -> None:
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
        try:
            out.put((rank, True, _measure(rank, world, args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, traceback.format_exc()))


def _measure(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import zckpt
    import zckpt.distributed as zd
    from zckpt.distributed.plan import plan_rank
    sd = harness.make_state_dict(args["size_mb"] << 20, seed=0)
    root = Path(args["dir"]) / f"w{world}"
    res: dict[str, Any] = {}
    # The floor: a warm copy of the bytes this rank writes.
    plan = plan_rank(sd, list(range(world)))
    owned = list(plan.owned(rank).values())
    res["bytes_per_rank"] = plan.bytes_per_rank(list(range(world)))
    bufs = [torch.empty_like(t) for t in owned]
    for b, t in zip(bufs, owned, strict=True):
        b.copy_(t)
    copies = []
    for _ in range(args["rounds"]):
        t0 = time.perf_counter()
        for b, t in zip(bufs, owned, strict=True):
            b.copy_(t)
        copies.append(time.perf_counter() - t0)
    res["memcpy_s"] = median(copies)
    del bufs
    # zckpt.distributed
    with zd.DistributedCheckpointer(zckpt.PoolConfig(num_workers=1), commit_timeout_s=300) as ck:
        ck.save(sd, root / "zckpt-warm").result()
        rows = []
        for i in range(args["rounds"]):
            dist.barrier()
            fut = ck.save(sd, root / f"zckpt-{i}")
            fut.result()
            rows.append(dict(fut.timings))
        res["zckpt"] = rows
        # All-reduces while a save is in flight, then the same loop idle.
        dist.barrier()
        fut = ck.save(sd, root / "zckpt-busy")
        n, t0 = 0, time.perf_counter()
        x = torch.ones(4096)
        while True:   # every rank runs the same collectives: the exit is agreed on, never local
            dist.all_reduce(x)
            n += 1
            if n % 20 == 0:
                flag = torch.tensor([0 if fut.done() else 1])
                dist.all_reduce(flag)
                if flag.item() == 0:
                    break
        busy_s = time.perf_counter() - t0
        fut.result()
        res["allreduce_busy_per_s"] = n / busy_s
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        res["allreduce_idle_per_s"] = n / (time.perf_counter() - t0)
    # DCP async_save, thread and (if asked) process executors.
    for kind in args["dcp"]:
        res[f"dcp_{kind}"] = _dcp(sd, root, kind, args["rounds"])
    return res


def _dcp(sd: Any, root: Path, kind: str, rounds: int) -> list[dict[str, float]] | str:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    try:
        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=True,
                                              use_async_staging=True, use_non_blocking_copy=False))
        typ = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
        rows = []
        for i in range(rounds + 1):
            dist.barrier()
            t0 = time.perf_counter()
            resp = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(str(root / f"dcp-{kind}-{i}"),
                                                                          sync_files=True),
                                  async_checkpointer_type=typ, async_stager=stager)
            blocked = time.perf_counter() - t0
            if hasattr(resp, "staging_completion"):
                resp.staging_completion.result()
            snapshot = time.perf_counter() - t0     # async staging: the copy ends here, not at return
            done = resp.upload_completion if hasattr(resp, "upload_completion") else resp
            done.result()
            durable = time.perf_counter() - t0
            dist.barrier()   # every rank's part written: the checkpoint is complete
            if i:
                rows.append({"blocked_s": blocked, "snapshot_s": snapshot,
                             "durable_s": max(durable, time.perf_counter() - t0)})
        stager.close()
        return rows
    except Exception as exc:  # noqa: BLE001 - a peer failing here is a row, not a crash
        return f"failed: {harness.first_line(exc)}"


def run_world(world: int, args: dict[str, Any], timeout: float) -> dict[int, Any]:
    import torch.distributed as dist
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300))
    procs = [ctx.Process(target=_rank, args=(r, world, server.port, args, out), daemon=False) for r in range(world)]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, ok, value = out.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=10)
        del server
    if len(results) < world:
        raise RuntimeError(f"{world - len(results)} rank(s) did not answer within {timeout:.0f}s")
    return results


def summarise(world: int, res: dict[int, Any]) -> list[dict[str, Any]]:
    ranks = sorted(res)
    rows = []
    per_rank = res[0]["bytes_per_rank"]
    mean = sum(per_rank.values()) / len(per_rank)
    balance = max(per_rank.values()) / mean if mean else 1.0
    memcpy = max(res[r]["memcpy_s"] for r in ranks)
    rounds = len(res[0]["zckpt"])
    blocked = median([max(res[r]["zckpt"][i]["blocked_s"] for r in ranks) for i in range(rounds)])
    durable = median([max(res[r]["zckpt"][i]["durable_s"] for r in ranks) for i in range(rounds)])
    commit = median([max(res[r]["zckpt"][i]["verdict_unix"] for r in ranks)
                     - max(res[r]["zckpt"][i]["local_durable_unix"] for r in ranks) for i in range(rounds)])
    busy = median([res[r]["allreduce_busy_per_s"] for r in ranks])
    idle = median([res[r]["allreduce_idle_per_s"] for r in ranks])
    rows.append({"ranks": world, "method": "zckpt", "blocked_s": blocked, "snapshot_s": blocked, "memcpy_s": memcpy,
                 "durable_s": durable,
                 "commit_ms": commit * 1e3, "bytes_max_over_mean": balance, "allreduce_busy_vs_idle": busy / idle})
    for key in [k for k in res[0] if k.startswith("dcp_")]:
        if isinstance(res[0][key], str):
            rows.append({"ranks": world, "method": key, "error": res[0][key]})
            continue
        n = len(res[0][key])
        rows.append({"ranks": world, "method": key, "memcpy_s": memcpy,
                     "blocked_s": median([max(res[r][key][i]["blocked_s"] for r in ranks) for i in range(n)]),
                     "snapshot_s": median([max(res[r][key][i]["snapshot_s"] for r in ranks) for i in range(n)]),
                     "durable_s": median([max(res[r][key][i]["durable_s"] for r in ranks) for i in range(n)])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=64, help="state dict size (every rank holds all of it)")
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dcp", default="thread,process", help="DCP executors to compare ('' for none)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default /tmp)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per world size")
    report.add_output_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")   # DCP's process executor needs an address
    parent = tempfile.mkdtemp(prefix="zckpt-dist-bench-", dir=args.dir)
    rows: list[dict[str, Any]] = []
    try:
        for world in [int(w) for w in args.ranks.split(",")]:
            print(f"[bench] {world} rank(s)", file=sys.stderr, flush=True)
            conf = {"size_mb": args.size_mb, "rounds": args.rounds, "dir": parent,
                    "dcp": [k for k in args.dcp.split(",") if k]}
            try:
                rows += summarise(world, run_world(world, conf, args.timeout))
            except Exception as exc:  # noqa: BLE001 - one world size failing is a row
                rows.append({"ranks": world, "method": "zckpt", "error": harness.first_line(exc, 300)})
            harness.clear_dir(Path(parent))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    table = report.Table(f"multi-rank saves, {args.size_mb} MiB replicated state per rank, median of {args.rounds}",
                         ["ranks", "method", "blocked_s", "snapshot_s", "memcpy_s", "snapshot/memcpy", "durable_s",
                          "commit_ms",
                          "bytes max/mean", "all-reduce rate busy/idle", "note"], free_last=True)
    for r in rows:
        table.add([str(r["ranks"]), r["method"], report.fmt_s(r.get("blocked_s")), report.fmt_s(r.get("snapshot_s")),
                   report.fmt_s(r.get("memcpy_s")),
                   report.fmt_ratio(report.ratio(r.get("snapshot_s"), r.get("memcpy_s"))),
                   report.fmt_s(r.get("durable_s")), report.fmt_num(r.get("commit_ms"), 1),
                   report.fmt_num(r.get("bytes_max_over_mean"), 3), report.fmt_num(r.get("allreduce_busy_vs_idle"), 2),
                   r.get("error", "")])
    report.emit(args, [table], rows)


if __name__ == "__main__":
    main()
