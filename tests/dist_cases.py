"""What each rank runs in the multi-rank tests (module level, so spawned ranks import it).

Expected values are computed, never stored: every tensor is a deterministic function of
its key and global shape (:func:`full`), so any rank at any world size knows what a
checkpoint must hold without gathering anything.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch

FAST = dict(fsync=False, heartbeat_interval_s=0.2, heartbeat_liveness=5, init_timeout_s=60.0, num_workers=1,
            shard_retries=0)   # a killed or hung worker fails its save here: the tests are about the abort


def full(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, step: int = 0) -> torch.Tensor:
    """The whole value of tensor ``key`` at ``step`` (distinct per key, element and step)."""
    n = 1
    for s in shape:
        n *= s
    salt = sum(ord(c) for c in key)
    return (torch.arange(n, dtype=torch.float64) * 0.5 + salt + 1000 * step).reshape(shape).to(dtype)


SHAPES = {"w": (10, 4), "emb": (7, 6), "bias": (5,), "odd": (3, 5)}


def _fit(placements: list[Any], ndim: int) -> list[Any]:
    """``Shard(d)`` past a tensor's last dimension becomes ``Shard(0)`` (1-D tensors)."""
    from torch.distributed.tensor import Shard
    return [Shard(0) if isinstance(p, Shard) and p.dim >= ndim else p for p in placements]


def sharded_state(mesh: Any, placements: list[Any], step: int = 0) -> dict[str, Any]:
    """DTensors of every SHAPE on ``mesh``, plus replicated plain tensors, a tie, a view and values."""
    from torch.distributed.tensor import distribute_tensor
    sd: dict[str, Any] = {k: distribute_tensor(full(k, s, step=step), mesh, _fit(placements, len(s)))
                          for k, s in SHAPES.items()}
    rep = full("rep", (4, 3), torch.bfloat16, step)
    sd["rep"] = rep
    sd["rep_row"] = rep[1]                      # a view sharing rep's storage
    sd["tied"] = sd["w"]                        # the same DTensor under two keys
    sd["ints"] = full("ints", (6,), step=step).to(torch.int64)
    # An optimizer's state is keyed by int parameter ids; lists hold tensors by index.
    sd["optim"] = {"state": {0: {"exp_avg": distribute_tensor(full("exp_avg", (6, 4), step=step), mesh,
                                                               _fit(placements, 2))}},
                   "param_groups": [{"lr": 0.1, "params": [0]}]}
    sd["lst"] = [full("lst", (3,), step=step)]
    sd["step"] = step
    sd["meta"] = {"lr": 0.5, "names": ["a", "b"], "flag": True}
    return sd


def empty_like_state(mesh: Any, placements: list[Any]) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor
    sd: dict[str, Any] = {k: distribute_tensor(torch.zeros(s), mesh, _fit(placements, len(s)))
                          for k, s in SHAPES.items()}
    sd["rep"] = torch.zeros(4, 3, dtype=torch.bfloat16)
    sd["rep_row"] = torch.zeros(3, dtype=torch.bfloat16)
    sd["tied"] = sd["w"]
    sd["ints"] = torch.zeros(6, dtype=torch.int64)
    sd["optim"] = {"state": {0: {"exp_avg": distribute_tensor(torch.zeros(6, 4), mesh, _fit(placements, 2))}},
                   "param_groups": [{"lr": 0.0, "params": [0]}]}
    sd["lst"] = [torch.zeros(3)]
    sd["step"] = -1
    sd["meta"] = {"lr": 0.0, "names": ["", ""], "flag": False}
    return sd


def check_state(sd: dict[str, Any], step: int) -> list[str]:
    """Differences between a loaded state dict (DTensors or whole tensors) and step ``step``."""
    from torch.distributed.tensor import DTensor
    bad = []
    for k, s in SHAPES.items():
        t = sd[k].full_tensor() if isinstance(sd[k], DTensor) else sd[k]
        if not torch.equal(t, full(k, s, step=step)):
            bad.append(k)
    if not torch.equal(sd["rep"], full("rep", (4, 3), torch.bfloat16, step)):
        bad.append("rep")
    if not torch.equal(sd["rep_row"], full("rep", (4, 3), torch.bfloat16, step)[1]):
        bad.append("rep_row")
    if not torch.equal(sd["ints"], full("ints", (6,), step=step).to(torch.int64)):
        bad.append("ints")
    exp = sd["optim"]["state"][0]["exp_avg"]
    if not torch.equal(exp.full_tensor() if isinstance(exp, DTensor) else exp, full("exp_avg", (6, 4), step=step)):
        bad.append("optim.state.0.exp_avg")
    if not torch.equal(sd["lst"][0], full("lst", (3,), step=step)) or sd["optim"]["param_groups"][0]["lr"] != 0.1:
        bad.append("lst/param_groups")
    if sd["step"] != step or sd["meta"] != {"lr": 0.5, "names": ["a", "b"], "flag": True}:
        bad.append("values")
    return bad


def _mesh(world: int, shape: tuple[int, ...] | None = None) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", shape or (world,))


def round_trip(rank: int, world: int, root: str) -> dict[str, Any]:
    """Two saves in flight, both committed; load into Shard(1), and whole with zckpt.load."""
    from torch.distributed.tensor import Shard

    import zckpt
    import zckpt.distributed as zd
    mesh = _mesh(world)
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=60) as ck:
        f1 = ck.save(sharded_state(mesh, [Shard(0)], step=1), f"{root}/step-1")
        f2 = ck.save(sharded_state(mesh, [Shard(0)], step=2), f"{root}/step-2")
        assert f1.staged.done() and f2.staged.done()
        paths = [f1.result(timeout=90), f2.result(timeout=90)]
    target = empty_like_state(mesh, [Shard(1)])
    zd.load(paths[1], target)
    out: dict[str, Any] = {"paths": paths, "bad_resharded": check_state(target, 2),
                           "tied_kept": target["tied"] is target["w"]}
    if rank == 0:
        whole = zckpt.load(paths[0])
        out["bad_whole"] = check_state(whole, 1)
        out["whole_view_shared"] = whole["rep_row"].untyped_storage()._cdata == whole["rep"].untyped_storage()._cdata
        out["verify"] = zckpt.verify(paths[1])
        out["latest"] = zckpt.latest(root)
    return out


def load_at(rank: int, world: int, path: str, step: int, mesh_shape: tuple[int, ...] | None,
            placements: list[str]) -> list[str]:
    """Load a checkpoint saved at another world size into this world's placements."""
    from torch.distributed.tensor import Replicate, Shard

    import zckpt.distributed as zd
    mesh = _mesh(world, mesh_shape)
    pl = [Replicate() if p == "R" else Shard(int(p[1:])) for p in placements]
    target = empty_like_state(mesh, pl)
    zd.load(path, target)
    return check_state(target, step)


def save_with(rank: int, world: int, root: str, mesh_shape: tuple[int, ...] | None, placements: list[str],
              step: int) -> str:
    from torch.distributed.tensor import Replicate, Shard

    import zckpt
    import zckpt.distributed as zd
    mesh = _mesh(world, mesh_shape)
    pl = [Replicate() if p == "R" else Shard(int(p[1:])) for p in placements]
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=60) as ck:
        return ck.save(sharded_state(mesh, pl, step=step), f"{root}/step-{step}").result(timeout=90)


def failure(rank: int, world: int, root: str, kind: str) -> dict[str, Any]:
    """A committed save, then one that fails on rank 1 in the way ``kind`` says, then one more.

    Returns what each rank saw of the failed save and of the recovery."""
    from torch.distributed.tensor import Shard

    import zckpt
    import zckpt.distributed as zd

    from _writers import FailingWriter, GateWriter
    mesh = _mesh(world)
    gate = os.path.join(root, f"gate-{rank}")
    os.makedirs(gate, exist_ok=True)
    cfg = dict(FAST)
    factory, kwargs = None, None
    commit_timeout = 60.0
    if rank == 1 and kind == "writer_raises":
        factory = _switchable(FailingWriter)
    if rank == 1 and kind in ("worker_killed", "never_reports"):
        factory, kwargs = _switchable(GateWriter), {"gate_dir": gate}
    if kind == "never_reports":
        commit_timeout = 3.0
        if rank == 1:
            cfg["stall_timeout_s"] = 8.0   # it gives up only after the coordinator did
    out: dict[str, Any] = {}
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**cfg), commit_timeout_s=commit_timeout,
                                    writer_factory=factory, writer_kwargs=kwargs) as ck:
        _arm(rank, root, False)
        ck.save(sharded_state(mesh, [Shard(0)], step=1), f"{root}/step-1").result(timeout=90)
        _arm(rank, root, True)
        t0 = time.monotonic()
        fut = ck.save(sharded_state(mesh, [Shard(0)], step=2), f"{root}/step-2")
        if rank == 1 and kind == "worker_killed":
            _wait_file(os.path.join(gate, f"started-{ck._pool.worker_pids[0]}"), 30)
            os.kill(ck._pool.worker_pids[0], signal.SIGKILL)
        try:
            fut.result(timeout=120)
            out["failed"] = None
        except zd.CheckpointAborted as exc:
            out["failed"] = {"type": type(exc).__name__, "ranks": sorted(exc.reasons), "message": str(exc)}
        out["failed_after_s"] = time.monotonic() - t0
        out["step2_exists"] = os.path.exists(f"{root}/step-2")
        _arm(rank, root, False)
        if rank == 1 and kind in ("worker_killed", "never_reports"):
            open(os.path.join(gate, "open"), "w").close()
        out["latest_after_failure"] = zckpt.latest(root)
        out["recovered"] = ck.save(sharded_state(mesh, [Shard(0)], step=3), f"{root}/step-3").result(timeout=90)
    out["leftovers"] = sorted(n for n in os.listdir(root) if ".dtmp-" in n)
    return out


def _arm(rank: int, root: str, on: bool) -> None:
    """Switch the misbehaving writer on or off (a marker file its worker checks)."""
    marker = os.path.join(root, f"armed-{rank}")
    if on:
        open(marker, "w").close()
    elif os.path.exists(marker):
        os.unlink(marker)


class _Switchable:
    """Behaves like ``cls`` while ``<root>/armed-<rank>`` exists, like a plain writer otherwise."""

    def __init__(self, cls: type, **kwargs: Any) -> None:
        from zckpt.writers import LocalFileWriter
        self.bad = cls(**kwargs)
        self.good = LocalFileWriter(fsync=False)

    def write_file(self, path: str, data: memoryview, **kw: Any) -> None:
        # path: <root>/step-N.dtmp-<nonce>-<seq>/rank-<r>.tmp-.../shard...
        root = os.path.dirname(os.path.dirname(os.path.dirname(path)))
        rank = os.path.basename(os.path.dirname(path)).split(".")[0].split("-")[1]
        armed = os.path.exists(os.path.join(root, f"armed-{rank}"))
        (self.bad if armed else self.good).write_file(path, data, **kw)


def _switchable(cls: type) -> Any:
    import functools
    return functools.partial(_Switchable, cls)


def _wait_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)   # polling cadence; the file decides


def mismatch(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 1 holds a key the others lack: the save fails on every rank, naming it."""
    from torch.distributed.tensor import Shard

    import zckpt
    import zckpt.distributed as zd
    mesh = _mesh(world)
    sd = sharded_state(mesh, [Shard(0)], step=1)
    if rank == 1:
        sd["only_on_rank_1"] = torch.ones(3)
        sd["value_only_on_rank_1"] = 5          # a value's key is structure too (its value is not)
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=60) as ck:
        try:
            ck.save(sd, f"{root}/step-1").result(timeout=90)
            return {"failed": None}
        except zd.CheckpointAborted as exc:
            return {"failed": str(exc), "exists": os.path.exists(f"{root}/step-1")}


def busy_collectives(rank: int, world: int, root: str) -> dict[str, Any]:
    """The main thread all-reduces without pause while saves stage and commit."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    import zckpt
    import zckpt.distributed as zd
    mesh = _mesh(world)
    done = threading.Event()
    reduces = 0
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=60) as ck:
        futs = []
        for step in range(3):
            futs.append(ck.save(sharded_state(mesh, [Shard(0)], step=step), f"{root}/step-{step}"))
            for _ in range(20):
                x = torch.ones(1000) * (rank + 1)
                dist.all_reduce(x)
                assert x[0].item() == sum(range(1, world + 1))
                reduces += 1
        while not all(f.done() for f in futs):
            x = torch.ones(10)
            dist.all_reduce(x)
            reduces += 1
        done.set()
        paths = [f.result(timeout=60) for f in futs]
    return {"paths": paths, "reduces": reduces}


def fsdp2_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same small MLP on every call (seed 0), each Linear and the whole fully_shard()ed, and AdamW."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def fsdp2(rank: int, world: int, root: str) -> dict[str, Any]:
    """FSDP2 model + optimizer state through get_state_dict: save, load back sharded, and whole."""
    import torch.distributed.checkpoint.state_dict as dsd

    import zckpt
    import zckpt.distributed as zd

    make = fsdp2_model
    model, opt = make()
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = dsd.get_state_dict(model, opt)
    full_opts = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    want_model = dsd.get_model_state_dict(model, options=full_opts)
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=60) as ck:
        path = ck.save({"model": msd, "optim": osd}, f"{root}/fsdp").result(timeout=90)
    model2, opt2 = make()
    msd2, osd2 = dsd.get_state_dict(model2, opt2)
    target = {"model": msd2, "optim": osd2}
    # the optimizer state of a fresh optimizer is empty: take its structure from a step
    model2(torch.randn(4, 8)).sum().backward()
    opt2.step()
    opt2.zero_grad()
    msd2, osd2 = dsd.get_state_dict(model2, opt2)
    target = {"model": msd2, "optim": osd2}
    zd.load(path, target)
    dsd.set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    got_model = dsd.get_model_state_dict(model2, options=full_opts)
    bad = [k for k in want_model if not torch.equal(want_model[k], got_model[k])]
    out: dict[str, Any] = {"bad_model": bad}
    if rank == 0:
        whole = zckpt.load(path)
        out["bad_whole"] = [k for k in want_model if not torch.equal(whole["model"][k], want_model[k])]
    return out


def coordinator_dies(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0 (the coordinator) exits while its part of the second save is being written."""
    from torch.distributed.tensor import Shard

    import zckpt
    import zckpt.distributed as zd

    from _writers import GateWriter
    mesh = _mesh(world)
    gate = os.path.join(root, f"gate-{rank}")
    os.makedirs(gate, exist_ok=True)
    factory = _switchable(GateWriter) if rank == 0 else None
    kwargs = {"gate_dir": gate} if rank == 0 else None
    ck = zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=3.0, writer_factory=factory,
                                    writer_kwargs=kwargs)
    try:
        ck.save(sharded_state(mesh, [Shard(0)], step=1), f"{root}/step-1").result(timeout=90)
        _arm(rank, root, True)
        t0 = time.monotonic()
        fut = ck.save(sharded_state(mesh, [Shard(0)], step=2), f"{root}/step-2")
        if rank == 0:
            _wait_file(os.path.join(gate, f"started-{ck._pool.worker_pids[0]}"), 30)
            os._exit(0)        # no report, no verdict, no cleanup (its workers follow it: parent-death signal)
        try:
            fut.result(timeout=60)
            return {"failed": None}
        except zd.CheckpointAborted as exc:
            return {"failed": sorted(exc.reasons), "message": str(exc), "after_s": time.monotonic() - t0,
                    "exists": os.path.exists(f"{root}/step-2"), "latest": zckpt.latest(root)}
    finally:
        if rank != 0:
            ck.close()


def load_mismatch(rank: int, world: int, path: str, which: str) -> str:
    """A target the checkpoint cannot fill: the load fails on every rank."""
    from torch.distributed.tensor import Shard

    import zckpt.distributed as zd
    mesh = _mesh(world)
    target = empty_like_state(mesh, [Shard(0)])
    if which == "extra_key" and rank == 1:
        target["not_saved"] = torch.zeros(2)
    if which == "shape":
        target["rep"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    try:
        zd.load(path, target)
        return "loaded"
    except (KeyError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def save_around_a_mark(rank: int, world: int, root: str, mark: str) -> str:
    """step-1 committed by every rank; rank 0 marks the crash file system; then step-2."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    import zckpt
    import zckpt.distributed as zd
    mesh = _mesh(world)
    cfg = dict(FAST, fsync=True)
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**cfg), commit_timeout_s=60) as ck:
        ck.save(sharded_state(mesh, [Shard(0)], step=1), f"{root}/step-1").result(timeout=90)
        if rank == 0:
            open(mark, "w").close()
        dist.barrier()
        return ck.save(sharded_state(mesh, [Shard(0)], step=2), f"{root}/step-2").result(timeout=90)


def subgroup_then_world(rank: int, world: int, root: str) -> dict[str, Any]:
    """Ranks 0 and 1 make a checkpointer on their subgroup, then every rank one on the world:
    each group agrees on its own run id, so both commit (found by review: the world's
    ranks outside the subgroup took the subgroup's id and every world save aborted)."""
    import torch.distributed as dist

    import zckpt
    import zckpt.distributed as zd
    sub = dist.new_group([0, 1])
    out: dict[str, Any] = {}
    if rank in (0, 1):
        with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), process_group=sub, commit_timeout_s=30) as ck:
            out["sub"] = ck.save({"x": torch.ones(2) * rank}, f"{root}/sub").result(timeout=60)
    else:
        try:
            zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), process_group=sub)
            out["nonmember"] = "accepted"
        except ValueError as exc:
            out["nonmember"] = str(exc)
    with zd.DistributedCheckpointer(zckpt.PoolConfig(**FAST), commit_timeout_s=30) as ck:
        out["world"] = ck.save({"y": torch.arange(4.0)}, f"{root}/world").result(timeout=60)
    return out
