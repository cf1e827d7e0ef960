"""Run a function on N gloo ranks spawned from a test, with a deadline, and clean up.

Each rank is a spawned process with ``torch.distributed`` initialised (gloo) on a
``TCPStore`` that the test process itself hosts on 127.0.0.1, as ``torchrun``'s agent
does: a rank that dies does not take the Store with it. ``fn(rank, world, *args)`` runs
there and its return value (or its traceback) comes back through a queue. Every rank is
killed (by pid) and joined, and the Store shut down, when the call returns or raises.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
        try:
            result = fn(rank, world, *args)
            out.put((rank, True, result))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put((rank, False, traceback.format_exc()))


class RankFailed(AssertionError):
    pass


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0,
              allow_missing: frozenset[int] = frozenset()) -> dict[int, Any]:
    """``{rank: fn's result}``; raises RankFailed with the tracebacks if a rank raised or
    did not answer within ``timeout`` (ranks in ``allow_missing`` may die silently)."""
    import torch.distributed as dist
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    port = server.port
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out), daemon=True) for r in range(world)]
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        want = set(range(world)) - set(allow_missing)
        while not want <= set(results) | set(errors):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for r, p in enumerate(procs) if r in want - set(results) - set(errors)):
                    # every rank we still wait for has exited: drain what is left, then stop
                    try:
                        rank, ok, value = out.get(timeout=2.0)
                    except queue.Empty:
                        break
                else:
                    continue
            (results if ok else errors)[rank] = value
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(timeout=10)
        out.close()
        del server   # the Store's server thread and socket go with it
    missing = sorted(set(range(world)) - set(allow_missing) - set(results) - set(errors))
    if errors or missing:
        msg = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RankFailed(f"ranks failed: {sorted(errors)}; no answer from {missing}{msg}")
    return results
