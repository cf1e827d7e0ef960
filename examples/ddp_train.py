"""Train a small DDP model on CPU ranks, checkpoint asynchronously, resume from the latest.

    torchrun --nproc-per-node 2 examples/ddp_train.py --root /tmp/ddp-run --steps 8 --every 4
    torchrun --nproc-per-node 2 examples/ddp_train.py --root /tmp/ddp-run --steps 12 --every 4

Under DDP every rank holds the same (replicated) state: zckpt writes each tensor once,
split over the ranks so each writes about the same number of bytes, and commits all
ranks' files as one checkpoint. The second command resumes from the newest committed
checkpoint (step 8), checks the resumed state equals it, and trains on to step 12.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dsd
from torch.nn.parallel import DistributedDataParallel as DDP

import zckpt
import zckpt.distributed as zd


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randn(8, 32, generator=g), torch.randint(0, 4, (8,), generator=g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="directory of the run's checkpoints")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = make_model()
    start = 0
    ckpt = zd.DistributedCheckpointer(zckpt.PoolConfig(num_workers=1, keep_last=2))
    try:
        last = zckpt.latest(args.root)
        if last is not None:
            msd, osd = dsd.get_state_dict(model, opt)   # the optimizer's state initialised: a place per tensor
            state = {"model": msd, "optim": osd, "step": 0}
            zd.load(last, state)
            dsd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            start = state["step"]
            whole = zckpt.load(last)
            same = all(torch.equal(v, whole["model"][k]) for k, v in dsd.get_model_state_dict(model).items())
            if rank == 0:
                print(f"resumed from {last} (step {start}): "
                      f"{'state matches the checkpoint' if same else 'MISMATCH'}", flush=True)
            if not same:
                raise SystemExit(1)
        pending = []
        for step in range(start + 1, args.steps + 1):
            x, y = batch(step, rank)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % args.every == 0:
                msd, osd = dsd.get_state_dict(model, opt)
                pending.append(ckpt.save({"model": msd, "optim": osd, "step": step},
                                         os.path.join(args.root, f"step-{step}")))
                if rank == 0:
                    print(f"step {step}: loss {loss.item():.4f}, checkpoint staged", flush=True)
        for fut in pending:
            path = fut.result()
            if rank == 0:
                print(f"committed {path}", flush=True)
    finally:
        ckpt.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
