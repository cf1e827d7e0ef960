"""Train a small model on CPU, checkpoint it every few steps through a zckpt pool, resume.

    python examples/demo.py

Prints, per save, how long the training loop was blocked by zckpt versus by a plain
``torch.save`` of the same state, then resumes from the newest committed checkpoint and
checks that training continues from exactly where it left off.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

import zckpt


def make_model(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, 10))


def train_steps(model, opt, steps: int, gen: torch.Generator) -> float:
    loss = torch.zeros(())
    model.train()
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    ap.add_argument("--width", type=int, default=1024, help="hidden width (1024: ~25 MiB of state)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="checkpoint root (default: a temp dir, removed after)")
    args = ap.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="zckpt-demo-")
    torch.manual_seed(0)
    model = make_model(args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3  # + Adam moments
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"~{nbytes / 2**20:.0f} MiB of checkpoint state; root {root}")

    blocked_zckpt, blocked_torch = [], []
    try:
        with zckpt.CheckpointPool(num_workers=args.workers) as pool:
            print(f"pool of {args.workers} workers started in {pool.startup_s:.2f}s")
            pending = []
            for step in range(args.every, args.steps + 1, args.every):
                loss = train_steps(model, opt, args.every, gen)
                state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                         "rng": gen.get_state()}
                t0 = time.perf_counter()
                fut = pool.save(state, os.path.join(root, f"step-{step:06d}"))
                blocked_zckpt.append(time.perf_counter() - t0)   # training resumes here
                pending.append(fut)
                t0 = time.perf_counter()
                torch.save(state, os.path.join(root, "torch-save.pt"))
                blocked_torch.append(time.perf_counter() - t0)
                print(f"step {step:4d}  loss {loss:.4f}  blocked: zckpt {blocked_zckpt[-1] * 1e3:7.2f} ms"
                      f"  torch.save {blocked_torch[-1] * 1e3:7.2f} ms")
            for fut in pending:
                fut.result(timeout=300)
        last = zckpt.latest(root)
        print(f"median blocked per save: zckpt {statistics.median(blocked_zckpt) * 1e3:.2f} ms, "
              f"torch.save {statistics.median(blocked_torch) * 1e3:.2f} ms "
              f"({statistics.median(blocked_torch) / statistics.median(blocked_zckpt):.1f}x less with zckpt)")

        # Resume: a fresh process would do exactly this.
        state = zckpt.load(last)
        resumed = make_model(args.width)
        resumed.load_state_dict(state["model"])
        ropt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
        ropt.load_state_dict(state["optim"])
        rgen = torch.Generator()
        rgen.set_state(state["rng"])
        print(f"resumed from {os.path.basename(last)} (step {state['step']})")
        a = train_steps(model, opt, 3, gen)
        b = train_steps(resumed, ropt, 3, rgen)
        same = a == b and all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=False))
        print(f"3 more steps: original loss {a:.6f}, resumed loss {b:.6f} -> {'identical' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit(1)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
