"""Chaos: train and checkpoint while workers, the disk and the trainer itself fail.

    python bench/chaos.py --minutes 10              # the full run
    python bench/chaos.py --minutes 1 --quick       # what CI runs

A driver runs a small training job as a child process and kills it (SIGKILL) at random
moments; each restart resumes from ``zckpt.latest()``. Inside the job a chaos thread
SIGKILLs and SIGSTOPs random workers, and the job's writer fails now and then: a full
disk (ENOSPC) for a while, an ``fdatasync`` that fails (EIO). Training is a deterministic
function of the step, so the driver checks every committed checkpoint against a replay
of the run from scratch to that step, bit for bit:

- **lost** (must be 0): a committed checkpoint that does not load, or loads different
  from the replay;
- **resumed exactly**: restarts whose later checkpoints equal the uninterrupted replay.

It also reports saves attempted / committed / failed cleanly (the future raised), and
the job's open fds, memory mappings, child processes and RSS at its start and end.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, report  # noqa: E402

WIDTH = 64


# --- the job ---------------------------------------------------------------------------------------
def _model_and_opt() -> tuple[Any, Any]:
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model: Any, opt: Any, step: int) -> None:
    import torch
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, WIDTH, generator=g), torch.randint(0, 4, (16,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _state(model: Any, opt: Any, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


class ChaosWriter:
    """A local writer that fails while ``<root>/.chaos-enospc`` exists (a full disk), and
    with EIO on the next fdatasync when ``<root>/.chaos-eio`` exists (then removes it)."""

    def __init__(self, root: str) -> None:
        from zckpt.writers import LocalFileWriter
        self.root = root
        self.inner = LocalFileWriter()

    def write_file(self, path: str, data: memoryview, **kw: Any) -> None:
        if os.path.exists(os.path.join(self.root, ".chaos-enospc")):
            raise OSError(errno.ENOSPC, "No space left on device (chaos)", path)
        self.inner.write_file(path, data, **kw)
        try:
            os.unlink(os.path.join(self.root, ".chaos-eio"))
        except FileNotFoundError:
            return
        raise OSError(errno.EIO, f"fdatasync of {path} failed with EIO (chaos)", path)


def _resources() -> dict[str, int]:
    from bench.harness import proc_status_kib
    pid = os.getpid()
    kids = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        kids += 1
            except (OSError, ValueError, IndexError):
                pass
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "maps": maps, "children": kids,
            "rss_kib": proc_status_kib(pid, "VmRSS") or 0}


def job(root: str, every: int, seed: int, log: str, step_ms: float) -> None:
    """Resume from latest(), train, save every ``every`` steps, until killed. Each step
    takes at least ``step_ms`` (the model is tiny: this stands for the real compute)."""
    import zckpt
    model, opt = _model_and_opt()
    start = 0
    last = zckpt.latest(root)
    if last is not None:
        st = zckpt.load(last)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        start = st["step"]
    cfg = zckpt.PoolConfig(num_workers=2, keep_last=4, heartbeat_interval_s=0.2, stall_timeout_s=2.0,
                           shard_retries=1, transient_retries=1, on_busy="skip")
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []

    def note(**e: Any) -> None:
        events.append(e)
        with open(log, "a") as f:
            f.write(json.dumps(e) + "\n")

    with zckpt.CheckpointPool(config=cfg, writer_factory=ChaosWriter, writer_kwargs={"root": root}) as pool:
        note(kind="start", pid=os.getpid(), step=start, resumed_from=last, res=_resources())
        stop = threading.Event()

        def chaos() -> None:
            while not stop.wait(rng.uniform(0.05, 0.4)):
                pids = pool.worker_pids
                r = rng.random()
                try:
                    if r < 0.25 and pids:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    elif r < 0.35 and pids:
                        os.kill(rng.choice(pids), signal.SIGSTOP)   # hung: the heartbeat finds it
                    elif r < 0.45:
                        Path(root, ".chaos-enospc").touch()         # a full disk, for a while
                    elif r < 0.60:
                        Path(root, ".chaos-enospc").unlink(missing_ok=True)
                    elif r < 0.70:
                        Path(root, ".chaos-eio").touch()
                except (ProcessLookupError, OSError):
                    pass

        t = threading.Thread(target=chaos, daemon=True)
        t.start()
        pending: list[tuple[int, Any]] = []
        step = start
        while True:
            step += 1
            t_step = time.perf_counter()
            _step(model, opt, step)
            time.sleep(max(0.0, step_ms / 1e3 - (time.perf_counter() - t_step)))   # simulated compute
            if step % every == 0:
                try:
                    pending.append((step, pool.save(_state(model, opt, step), os.path.join(root, f"step-{step:07d}"))))
                except Exception as exc:  # noqa: BLE001 - counted: a save refused at the call
                    note(kind="save", step=step, ok=False, error=type(exc).__name__)
            for s, fut in [p for p in pending if p[1].done()]:
                pending.remove((s, fut))
                exc = fut.exception()
                note(kind="save", step=s, ok=exc is None, error=type(exc).__name__ if exc else None)
            if step % (every * 5) == 0:
                note(kind="alive", pid=os.getpid(), step=step, res=_resources())


# --- the driver ------------------------------------------------------------------------------------
def _replay(until: int) -> dict[str, Any]:
    model, opt = _model_and_opt()
    for s in range(1, until + 1):
        _step(model, opt, s)
    return _state(model, opt, until)


def _equal(a: Any, b: Any) -> bool:
    import torch
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and \
            all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def drive(minutes: float, every: int, kill_mean_s: float, seed: int, parent: str | None,
          step_ms: float) -> dict[str, Any]:
    import zckpt
    from zckpt.commit import committed
    rng = random.Random(seed)
    out: dict[str, Any] = {"restarts": 0, "attempted": 0, "committed": 0, "failed_cleanly": 0, "lost": 0,
                           "checked": 0, "resumed": 0, "resumed_exactly": 0, "resources": []}
    with harness.work_dir("zckpt-chaos-", parent) as root:
        log = root / "events.jsonl"
        deadline = time.monotonic() + minutes * 60
        checked: set[str] = set()
        while time.monotonic() < deadline:
            proc = subprocess.Popen([sys.executable, __file__, "--job", str(root), "--every", str(every),
                                     "--seed", str(rng.randrange(1 << 30)), "--log", str(log),
                                     "--step-ms", str(step_ms)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            life = min(rng.expovariate(1 / kill_mean_s), max(0.5, deadline - time.monotonic()))
            try:
                proc.wait(timeout=life)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)    # the trainer (and its group) dies mid-whatever
                proc.wait(timeout=30)
            out["restarts"] += 1
            for path in committed(root):  # every checkpoint that says it is committed
                if path in checked:
                    continue
                checked.add(path)
                out["checked"] += 1
                try:
                    got = zckpt.load(path)
                    ok = _equal(got, _replay(got["step"]))
                except Exception:  # noqa: BLE001 - a committed checkpoint that does not load is lost
                    ok = False
                if not ok:
                    out["lost"] += 1
        events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    saves = [e for e in events if e["kind"] == "save"]
    out["attempted"] = len(saves)
    out["committed"] = sum(1 for e in saves if e["ok"])
    out["failed_cleanly"] = sum(1 for e in saves if not e["ok"])
    starts = [e for e in events if e["kind"] == "start"]
    out["resumed"] = sum(1 for e in starts if e["resumed_from"])
    # A resumed run continued exactly if every checkpoint it later committed matched the
    # replay; with lost == 0 that holds for all of them.
    out["resumed_exactly"] = out["resumed"] if out["lost"] == 0 else 0
    # Flat resources: the longest-lived job's first and last sample (at start, pool up).
    by_pid: dict[int, list[dict[str, int]]] = {}
    for e in events:
        if e["kind"] in ("start", "alive"):
            by_pid.setdefault(e["pid"], []).append(e["res"])
    longest = max(by_pid.values(), key=len, default=[])
    out["resources"] = [longest[0], longest[-1]] if longest else []
    out["samples"] = len(longest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="CI: saves every 5 steps, restarts every ~3 s")
    ap.add_argument("--every", type=int, default=None, help="a save every N steps")
    ap.add_argument("--kill-mean-s", type=float, default=None, help="mean seconds between trainer kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-ms", type=float, default=10.0, help="the least time a training step takes")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--log", default=None, help=argparse.SUPPRESS)
    report.add_output_args(ap)
    args = ap.parse_args()
    every = args.every or (5 if args.quick else 20)
    if args.job:
        job(args.job, every, args.seed, args.log, args.step_ms)
        return
    r = drive(args.minutes, every, args.kill_mean_s or (4.0 if args.quick else 15.0), args.seed, args.dir,
              args.step_ms)
    table = report.Table(f"chaos: {args.minutes:g} min, a save every {every} steps", ["what", "count"])
    for key in ("restarts", "attempted", "committed", "failed_cleanly", "checked", "lost", "resumed",
                "resumed_exactly"):
        table.add([key.replace("_", " "), str(r[key])])
    if r["resources"]:
        first, last = r["resources"]
        for k in first:
            table.add([f"{k}, first / last of the longest job ({r['samples']} samples)", f"{first[k]} / {last[k]}"])
    report.emit(args, [table], r)


if __name__ == "__main__":
    main()
