"""What checkpointing costs a training loop: step time with zckpt, torch.save, or nothing.

    python bench/overhead.py                      # MLP of ~256 MiB state, 60 steps, save every 10
    python bench/overhead.py --width 2048 --steps 100 --every 5 --json out.json

Runs the same CPU training loop (a few-layer MLP with AdamW) three times: without
checkpoints, with ``torch.save`` every K steps (synchronous), and with a zckpt pool every
K steps (the loop continues while the workers write). Reports the median step time, the
time blocked in the checkpoint call, and the total wall time, with ratios to the loop
without checkpoints. Workers compete with the loop for the CPU; on a 2-core machine that
competition is part of what is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import zckpt  # noqa: E402
from bench import harness, report  # noqa: E402


def build(width: int, depth: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(256, width), torch.nn.GELU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    layers.append(torch.nn.Linear(width, 10))
    model = torch.nn.Sequential(*layers)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model, opt = build(args.width, args.depth)
    gen = torch.Generator().manual_seed(1)
    pool: zckpt.CheckpointPool | None = None
    save: Callable[[dict, str], Any]
    if mode == "zckpt":
        pool = zckpt.CheckpointPool(num_workers=args.workers)
        pending: list[Any] = []

        def save(state: dict, path: str) -> Any:
            pending.append(pool.save(state, path))
    elif mode == "torch.save":
        def save(state: dict, path: str) -> Any:
            torch.save(state, path + ".pt")
    else:
        def save(state: dict, path: str) -> Any:
            return None
    steps, blocked = [], []
    t_start = time.perf_counter()
    try:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            x = torch.randn(args.batch, 256, generator=gen)
            y = torch.randint(0, 10, (args.batch,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.append(time.perf_counter() - t0)
            if mode != "none" and step % args.every == 0:
                t0 = time.perf_counter()
                save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                     str(root / f"{mode}-{step:06d}"))
                blocked.append(time.perf_counter() - t0)
        if pool is not None:
            for fut in pending:
                fut.result(timeout=600)
        wall = time.perf_counter() - t_start
    finally:
        if pool is not None:
            pool.close()
    state_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3 / 2**20
    return {"mode": mode, "median_step_s": harness.median(steps), "mean_step_s": statistics.fmean(steps),
            "blocked_per_save_s": harness.median(blocked) if blocked else 0.0, "saves": len(blocked),
            "wall_s": wall, "state_mib": state_mib}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: the system temp dir)")
    report.add_output_args(ap)
    args = ap.parse_args(argv)
    progress = harness.Progress("overhead")
    rows = []
    with harness.work_dir("zckpt-overhead-", args.dir) as root:
        for mode in ("none", "torch.save", "zckpt"):
            progress.update(f"running {mode}")
            rows.append(run(mode, args, root))
            harness.clear_dir(root)
        progress.end()
    base = rows[0]
    t = report.Table(f"state: {base['state_mib']:.0f} MiB (model + AdamW moments), {args.steps} steps, "
                     f"checkpoint every {args.every}",
                     ["mode", "median step", "x none", "blocked/save", "wall", "x none"])
    for r in rows:
        t.add([r["mode"], report.fmt_ms(r["median_step_s"]),
               report.fmt_ratio(report.ratio(r["median_step_s"], base["median_step_s"])),
               report.fmt_ms(r["blocked_per_save_s"]), f"{r['wall_s']:.2f}s",
               report.fmt_ratio(report.ratio(r["wall_s"], base["wall_s"]))])
    report.emit(args, [t], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
