"""What each rank runs in the DCP back-end tests (module level, so spawned ranks import it).

State and expected values come from dist_cases (computed, never stored).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from dist_cases import FAST, _mesh, check_state, empty_like_state, fsdp2_model, sharded_state


def _writer(**changes: Any) -> Any:
    import zckpt
    from zckpt.dcp import ZckptWriter
    return ZckptWriter(config=zckpt.PoolConfig(**{**FAST, **changes}))


def _scribble(sd: dict[str, Any]) -> None:
    """What a training step does right after a save returns: change every tensor in place."""
    from torch.distributed.tensor import DTensor
    seen: set[int] = set()
    for v in list(sd.values()) + [sd["optim"]["state"][0]["exp_avg"], sd["lst"][0]]:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            (v.to_local() if isinstance(v, DTensor) else v).fill_(-7)
    sd["step"] = 99
    sd["meta"]["lr"] = 9.0


def round_trip(rank: int, world: int, root: str) -> dict[str, Any]:
    """dcp.save then dcp.async_save through one ZckptWriter; the trainer scribbles over its
    state as soon as async_save returns; both load back (resharded to Shard(1)) exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard

    import zckpt
    from zckpt.dcp import ZckptReader
    mesh = _mesh(world)
    writer = _writer()
    try:
        dcp.save(sharded_state(mesh, [Shard(0)], step=1), checkpoint_id=f"{root}/step-1", storage_writer=writer)
        sd2 = sharded_state(mesh, [Shard(0)], step=2)
        fut = dcp.async_save(sd2, checkpoint_id=f"{root}/step-2", storage_writer=writer)
        _scribble(sd2)
        fut.result(timeout=90)
    finally:
        writer.close()
    out: dict[str, Any] = {}
    for step in (1, 2):
        target = empty_like_state(mesh, [Shard(1)])
        dcp.load(target, storage_reader=ZckptReader(f"{root}/step-{step}"))
        out[f"bad_{step}"] = check_state(target, step)
    if rank == 0:
        out["verify"] = zckpt.verify(f"{root}/step-2")
        out["latest"] = zckpt.latest(root)
        out["listing"] = sorted(os.listdir(root))
    return out


def save_at(rank: int, world: int, root: str, step: int) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard
    mesh = _mesh(world)
    path = f"{root}/step-{step}"
    with _writer() as writer:
        dcp.async_save(sharded_state(mesh, [Shard(0)], step=step), checkpoint_id=path,
                       storage_writer=writer).result(timeout=90)
    return path


def load_at(rank: int, world: int, path: str, step: int, placement: str) -> list[str]:
    """Load a checkpoint (of ZckptWriter or of zckpt.distributed) at this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate, Shard

    from zckpt.dcp import ZckptReader
    mesh = _mesh(world)
    target = empty_like_state(mesh, [Replicate() if placement == "R" else Shard(int(placement[1:]))])
    dcp.load(target, storage_reader=ZckptReader(path))
    return check_state(target, step)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 8, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()


def fsdp2(rank: int, world: int, root: str) -> dict[str, Any]:
    """FSDP2 model and optimizer through dcp.async_save + ZckptWriter, loaded into a fresh
    FSDP2 model with dcp.load + ZckptReader: the full state dicts are equal bit for bit."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dsd

    from zckpt.dcp import ZckptReader

    make = fsdp2_model
    model, opt = make()
    _train(model, opt, 2, seed=rank)
    msd, osd = dsd.get_state_dict(model, opt)
    full = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    want_m, want_o = dsd.get_state_dict(model, opt, options=full)
    with _writer(num_workers=2) as writer:
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/fsdp",
                       storage_writer=writer).result(timeout=90)
    model2, opt2 = make()
    _train(model2, opt2, 1, seed=100 + rank)   # other values, same structure (optimizer state exists)
    msd2, osd2 = dsd.get_state_dict(model2, opt2)
    target = {"model": msd2, "optim": osd2}
    dcp.load(target, storage_reader=ZckptReader(f"{root}/fsdp"))
    dsd.set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    got_m, got_o = dsd.get_state_dict(model2, opt2, options=full)
    bad = [k for k in want_m if not torch.equal(want_m[k], got_m[k])]
    got = dict(_leaves(got_o))
    bad += [f"optim.{k}" for k, v in _leaves(want_o)
            if not (torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else v == got.get(k))]
    return {"bad": bad, "optim_leaves": len(got)}


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _leaves(v, f"{prefix}{k}.")]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _leaves(v, f"{prefix}{i}.")]
    return [(prefix, obj)]


def ddp(rank: int, world: int, root: str) -> dict[str, Any]:
    """DDP: every rank holds the whole (replicated) state; DCP writes each tensor once.
    Returns rank 0's state to compare with a load at world size 1."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dsd
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, 3, seed=rank)
    msd, osd = dsd.get_state_dict(model, opt)
    with _writer(num_workers=2) as writer:
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/ddp",
                       storage_writer=writer).result(timeout=90)
    files = sorted(n for n in os.listdir(f"{root}/ddp") if n.endswith(".distcp"))
    # Plain lists: a tensor would travel back as shared memory of a process that has exited.
    return {"model": {k: (v.tolist(), str(v.dtype)) for k, v in msd.items()}, "files": files}


def failure(rank: int, world: int, root: str) -> dict[str, Any]:
    """A committed save; one whose writer raises on rank 1 (it fails on every rank and leaves
    nothing); then one that commits again."""
    import functools

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.tensor import Shard

    import zckpt
    from zckpt.dcp import ZckptWriter

    from _writers import FailingWriter
    mesh = _mesh(world)
    factory = functools.partial(_Armed, FailingWriter, os.path.join(root, "armed")) if rank == 1 else None
    pool = zckpt.CheckpointPool(config=zckpt.PoolConfig(**FAST), writer_factory=factory)
    writer = ZckptWriter(pool=pool)
    out: dict[str, Any] = {}
    try:
        dcp.async_save(sharded_state(mesh, [Shard(0)], step=1), checkpoint_id=f"{root}/step-1",
                       storage_writer=writer).result(timeout=90)
        if rank == 1:
            open(os.path.join(root, "armed"), "w").close()
        try:
            dcp.async_save(sharded_state(mesh, [Shard(0)], step=2), checkpoint_id=f"{root}/step-2",
                           storage_writer=writer).result(timeout=90)
            out["failed"] = None
        except CheckpointException as exc:   # a BaseException: DCP's way of failing every rank
            failures = getattr(exc, "failures", {}) or {}
            out["failed"] = " | ".join([f"{type(exc).__name__}: {exc}"]
                                       + [f"{type(e[0]).__name__}: {e[0]}" for e in failures.values()])
        out["step2_exists"] = os.path.exists(f"{root}/step-2")
        out["latest_after_failure"] = zckpt.latest(root)
        torch.distributed.barrier()
        if rank == 1:
            os.unlink(os.path.join(root, "armed"))
        torch.distributed.barrier()
        dcp.async_save(sharded_state(mesh, [Shard(0)], step=3), checkpoint_id=f"{root}/step-3",
                       storage_writer=writer).result(timeout=90)
        out["latest"] = zckpt.latest(root)
    finally:
        writer.close()
        pool.close()
    torch.distributed.barrier()
    out["leftovers"] = sorted(n for n in os.listdir(root) if ".tmp-" in n)
    return out


class _Armed:
    """Behaves like ``cls`` while the file ``marker`` exists, like a plain writer otherwise."""

    def __init__(self, cls: type, marker: str) -> None:
        from zckpt.writers import LocalFileWriter
        self.bad, self.good, self.marker = cls(), LocalFileWriter(fsync=False), marker

    def write_file(self, path: str, data: memoryview, **kw: Any) -> None:
        (self.bad if os.path.exists(self.marker) else self.good).write_file(path, data, **kw)


def replicated_few(rank: int, world: int, root: str) -> dict[str, Any]:
    """Fewer replicated tensors than ranks: a rank with nothing to write, three times."""
    import torch.distributed.checkpoint as dcp

    import zckpt
    out: dict[str, Any] = {}
    with _writer(buffer_wait_timeout_s=10.0) as writer:
        for step in (1, 2, 3):
            dcp.async_save({"w": torch.full((4,), float(step))}, checkpoint_id=f"{root}/step-{step}",
                           storage_writer=writer).result(timeout=60)
        try:
            dcp.save({"w": torch.ones(4)}, checkpoint_id=f"{root}/nocoll", storage_writer=writer,
                     use_collectives=False)
            out["no_collectives"] = "saved"
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["no_collectives"] = f"{type(exc).__name__}: {exc}"
    torch.distributed.barrier()
    out["latest"] = zckpt.latest(root)
    return out
