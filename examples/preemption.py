"""Preemption: on SIGTERM, finish or abandon the save in flight, commit an emergency checkpoint, exit.

    setsid python examples/preemption.py --root "$(mktemp -d)" --size-mb 256 &
    sleep 5; kill -TERM -- -$!    # what SLURM or Kubernetes does: SIGTERM to the process group

(``setsid`` gives the job a process group of its own, as a scheduler's job step has; a
script without job control would otherwise signal its own group.)

Schedulers send SIGTERM and wait a grace period (SLURM's KillWait, Kubernetes'
terminationGracePeriodSeconds, 30 s by default) before SIGKILL. The recipe:

1. The handler only sets a flag (a handler must not save: it would interrupt the
   training step, and ``save()`` from a handler that interrupted ``save()`` is refused).
2. The loop checks the flag once per step. When set, it waits for the save in flight
   until a deadline (it is likely further along than a new one), then saves the current
   state and waits for that commit, then closes the pool, all within ``--grace-s``.
3. zckpt's workers ignore the group's SIGTERM while the trainer lives (they would
   otherwise die mid-commit) and exit with it.

Prints one line when done: the step saved and the seconds from SIGTERM to committed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

import zckpt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--size-mb", type=int, default=64, help="state size (a stack of linear layers)")
    ap.add_argument("--every", type=int, default=20, help="a regular checkpoint every N steps")
    ap.add_argument("--grace-s", type=float, default=25.0, help="seconds from SIGTERM to exit (below the kill)")
    args = ap.parse_args()

    preempted: list[float] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(time.monotonic()))

    width = 1024
    layers = max(1, (args.size_mb << 20) // (width * width * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    pool = zckpt.CheckpointPool(config=zckpt.PoolConfig(num_workers=2, keep_last=2))
    pool.reserve({"model": model.state_dict(), "step": 0})
    in_flight = None
    step = 0
    print(f"training ({layers} layers, {args.size_mb} MiB), pid {os.getpid()}", flush=True)
    try:
        while not preempted:
            step += 1
            x = torch.randn(8, width)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if step % args.every == 0:
                in_flight = pool.save({"model": model.state_dict(), "step": step},
                                      os.path.join(args.root, f"step-{step:06d}"))
        deadline = preempted[0] + args.grace_s
        if in_flight is not None and not in_flight.done():
            try:   # the save in flight is further along than a new one: let it finish first
                in_flight.result(timeout=max(0.0, (deadline - time.monotonic()) / 2))
            except Exception as exc:  # noqa: BLE001 - a failed regular save must not stop the emergency one
                print(f"the save in flight did not finish: {exc}", file=sys.stderr)
        path = os.path.join(args.root, f"step-{step:06d}")
        if not os.path.exists(path):
            pool.save({"model": model.state_dict(), "step": step}, path).result(
                timeout=max(0.0, deadline - time.monotonic()))
        print(f"emergency checkpoint {path} (step {step}) committed {time.monotonic() - preempted[0]:.3f}s "
              "after SIGTERM", flush=True)
    finally:
        pool.close(timeout_s=max(1.0, (preempted[0] + args.grace_s - time.monotonic()) if preempted else 10.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
