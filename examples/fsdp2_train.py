"""Train a small FSDP2 model on CPU ranks, checkpoint asynchronously, resume at any world size.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py --root /tmp/fsdp2-run --steps 8 --every 4
    torchrun --nproc-per-node 1 examples/fsdp2_train.py --root /tmp/fsdp2-run --steps 12 --every 4

The first run trains 8 steps and commits checkpoints at steps 4 and 8; the second starts
from the newest committed one (step 8), resharded from 2 ranks to 1, checks that the
model and optimizer it resumed with equal the checkpoint, and trains on to step 12.
Each save blocks training only while this rank's shards are copied into shared memory;
the commit (all ranks or none) happens in the background.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dsd
from torch.distributed.fsdp import fully_shard

import zckpt
import zckpt.distributed as zd


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every rank at every world size (a toy: real jobs shard data)."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)


def full_digest(model: torch.nn.Module) -> float:
    """A number that changes with any parameter: the sum of the full (gathered) parameters."""
    full = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    return float(sum(t.double().sum() for t in full.values())) if full else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="directory of the run's checkpoints")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = make_model()
    start = 0
    ckpt = zd.DistributedCheckpointer(zckpt.PoolConfig(num_workers=1, keep_last=2))
    try:
        last = zckpt.latest(args.root)
        if last is not None:
            # get_state_dict gives the optimizer's full structure (its state initialised),
            # so every saved tensor has a place to go; load reshards into this world size.
            msd, osd = dsd.get_state_dict(model, opt)
            state = {"model": msd, "optim": osd, "step": 0}
            zd.load(last, state)
            dsd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            start = state["step"]
            whole = zckpt.load(last)   # the unsharded checkpoint, read in this one process
            want = float(sum(t.double().sum() for t in whole["model"].values()))
            got = full_digest(model)
            if rank == 0:
                print(f"resumed from {last} (step {start}) at world size {world}: "
                      f"{'state matches the checkpoint' if got == want else f'MISMATCH {got} != {want}'}",
                      flush=True)
            if got != want:
                raise SystemExit(1)
        pending = []
        for step in range(start + 1, args.steps + 1):
            x, y = batch(step)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % args.every == 0:
                msd, osd = dsd.get_state_dict(model, opt)
                fut = ckpt.save({"model": msd, "optim": osd, "step": step}, os.path.join(args.root, f"step-{step}"))
                pending.append(fut)   # staged already: training goes on while it commits
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
