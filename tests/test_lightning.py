"""zckpt.integrations.lightning: Lightning trains, prunes, resumes and survives faults through
ZckptCheckpointIO.

A tiny model (a Linear, Adam, a step LR schedule) trains on fixed data, on CPU, with
checkpoints at epoch ends (an epoch boundary is where Lightning resumes exactly). Every
resumed run is compared, tensor for tensor and bit for bit, with a run that was never
interrupted. The DDP case runs this file as a script (``python tests/test_lightning.py
ddp ...``): Lightning's "ddp" strategy launches rank 1 by running the same command again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import zckpt  # noqa: E402
from zckpt.integrations.lightning import ZckptCheckpointIO  # noqa: E402

STEPS_PER_EPOCH = 4
FAST = {"fsync": False, "heartbeat_interval_s": 0.2, "init_timeout_s": 30.0}


class Tiny(L.LightningModule):
    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]


def data(width: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS_PER_EPOCH * 8, width, generator=g)
    y = torch.randn(STEPS_PER_EPOCH * 8, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def trainer(root, max_epochs: int, callbacks=(), plugins=(), **kw) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=str(root),
                     enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                     enable_checkpointing=bool(callbacks), callbacks=list(callbacks), plugins=list(plugins), **kw)


def checkpointer(dirpath, top_k: int = 2, last: bool | str = True) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=str(dirpath), every_n_epochs=1, save_top_k=top_k, monitor="step", mode="max",
                           save_last=last)


def state_of(t: L.Trainer) -> dict:
    """What a bit-exact resume must reproduce: parameters and the optimizer's state."""
    return {"model": {k: v.detach().clone() for k, v in t.lightning_module.state_dict().items()},
            "optim": t.optimizers[0].state_dict()}


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict]:
    """An uninterrupted run: the state after 3 and after 5 epochs."""
    out = {}
    for epochs in (3, 5):
        t = trainer(tmp_path_factory.mktemp("ref"), epochs)
        t.fit(model(), data())
        out[epochs] = state_of(t)
    return out


def entries(d) -> list[str]:
    return sorted(os.listdir(d))


def ckpt(epoch: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> str:
    return f"epoch={epoch}-step={(epoch + 1) * steps_per_epoch}.ckpt"


def gated_writer_factory(gate_dir: str, marker: str):
    """A writer factory for the pool's workers: shard files whose path holds ``marker``
    announce themselves (``started-<pid>-<n>``) and wait until ``<gate_dir>/open`` exists.
    Defined inside a function so that cloudpickle sends it by value: workers need not
    import this module (and lightning)."""

    def factory():
        import os
        import time

        from zckpt.writers import LocalFileWriter

        inner = LocalFileWriter(fsync=False)

        class Gated:
            def write_file(self, path, data, *, progress, **kwargs):
                if marker in path:
                    open(os.path.join(gate_dir, f"started-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
                    deadline = time.monotonic() + 60
                    while not os.path.exists(os.path.join(gate_dir, "open")):
                        if time.monotonic() > deadline:
                            raise TimeoutError("the test never opened the gate")
                        time.sleep(0.005)  # polling cadence: the file decides
                inner.write_file(path, data, progress=progress)

        return Gated()

    return factory


def started_pids(gate) -> list[int]:
    return [int(n.split("-")[1]) for n in sorted(os.listdir(gate)) if n.startswith("started-")]


# --- one device: top-k pruning, last.ckpt replaced in place, bit-exact resume ------------------
@pytest.mark.timeout(90)
def test_topk_and_last_are_zckpt_checkpoints_and_resume_is_bit_exact(tmp_path, reference):
    d = tmp_path / "ckpt"
    io = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=2, staging_buffers=2, **FAST))
    t = trainer(tmp_path, 3, [checkpointer(d)], [io])
    t.fit(model(), data())
    at_save = state_of(t)
    # Only the top 2 and last remain: no temp, condemned or side directories.
    assert entries(d) == sorted([ckpt(1), ckpt(2), "last.ckpt"])
    for name in entries(d):
        assert os.path.isdir(d / name) and not os.path.islink(d / name)
        zckpt.verify(d / name)
    # last.ckpt was saved three times under one name: each replaced the last in place.
    last = io.load_checkpoint(d / "last.ckpt")
    assert last["global_step"] == 3 * STEPS_PER_EPOCH and last["epoch"] == 2
    assert_same(last["state_dict"], at_save["model"], "last.ckpt state_dict")
    assert_same(last["optimizer_states"][0], at_save["optim"], "last.ckpt optimizer")
    assert_same(at_save, reference[3], "3 epochs")
    assert zckpt.load_metadata(d / "last.ckpt") == {"lightning": {"epoch": 2, "global_step": 12}}
    assert os.path.realpath(zckpt.latest(d)) == str(d / "last.ckpt")

    # Resume from "last" in a fresh trainer, with a model initialised differently.
    io2 = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=2, **FAST))
    t2 = trainer(tmp_path, 5, [checkpointer(d)], [io2])
    t2.fit(model(seed=99), data(), ckpt_path="last")
    assert t2.ckpt_path == str(d / "last.ckpt")
    assert_same(state_of(t2), reference[5], "resumed run vs uninterrupted run")
    assert entries(d) == sorted([ckpt(3), ckpt(4), "last.ckpt"])
    assert io2.load_checkpoint(d / "last.ckpt")["global_step"] == 5 * STEPS_PER_EPOCH


@pytest.mark.timeout(60)
def test_a_plain_torch_checkpoint_still_loads_and_is_replaced(tmp_path, reference):
    """An older run wrote last.ckpt with Lightning's default TorchCheckpointIO (a file):
    resuming from it goes through torch.load, and the next save replaces the file."""
    d = tmp_path / "ckpt"
    trainer(tmp_path, 3, [checkpointer(d)]).fit(model(), data())
    assert os.path.isfile(d / "last.ckpt")
    io = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=1, **FAST))
    t = trainer(tmp_path, 5, [checkpointer(d)], [io])
    t.fit(model(seed=7), data(), ckpt_path="last")
    assert_same(state_of(t), reference[5], "resumed from a torch.save file")
    assert os.path.isdir(d / "last.ckpt")
    zckpt.verify(d / "last.ckpt")
    # The torch-written top-k files were pruned like directories would be.
    assert entries(d) == sorted([ckpt(3), ckpt(4), "last.ckpt"])


@pytest.mark.timeout(60)
def test_save_last_link_resumes_through_the_link(tmp_path, reference):
    """save_last="link": Lightning makes last.ckpt a symbolic link to the newest top-k
    checkpoint (a directory here); "last" resolves through it, and loading follows it."""
    d = tmp_path / "ckpt"
    io = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=1, **FAST))
    trainer(tmp_path, 3, [checkpointer(d, last="link")], [io]).fit(model(), data())
    assert os.path.islink(d / "last.ckpt") and os.readlink(d / "last.ckpt") == ckpt(2)
    assert zckpt.latest(d) == str(d / ckpt(2))   # a link is never a checkpoint of its root
    t = trainer(tmp_path, 5, [checkpointer(d, last="link")], [ZckptCheckpointIO(config=zckpt.PoolConfig(
        num_workers=1, **FAST))])
    t.fit(model(seed=3), data(), ckpt_path="last")
    assert_same(state_of(t), reference[5], "resumed through last.ckpt -> top-k link")
    assert os.readlink(d / "last.ckpt") == ckpt(4) and entries(d) == sorted([ckpt(3), ckpt(4), "last.ckpt"])


@pytest.mark.timeout(60)
def test_a_name_saved_again_is_replaced_where_renameat2_cannot_exchange(tmp_path, monkeypatch):
    """On a file system without RENAME_EXCHANGE the old checkpoint is condemned, then the new
    one renamed into place: the name ends up holding the new checkpoint, nothing else is left."""
    import errno

    import zckpt.integrations.lightning as zl

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "not supported here", a)

    monkeypatch.setattr(zl, "_exchange", no_exchange)
    io = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=1, **FAST))
    try:
        for i in range(3):
            io.save_checkpoint({"state_dict": {"w": torch.full((4,), float(i))}}, tmp_path / "last.ckpt")
        # ddp_spawn pickles the plugin to its ranks: the copy leaves pool, thread and saves behind.
        import pickle
        copy = pickle.loads(pickle.dumps(io))
        assert copy.pool is None and copy.futures == [] and io.pool is not None
    finally:
        io.teardown()
    assert entries(tmp_path) == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.full((4,), 2.0))


@pytest.mark.timeout(60)
def test_a_directory_that_is_not_a_checkpoint_is_neither_replaced_nor_removed(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious").write_text("x")
    io = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=1, **FAST))
    try:
        with pytest.raises(FileExistsError, match="not a zckpt checkpoint"):
            io.save_checkpoint({"state_dict": {}}, tmp_path / "data")
        io.remove_checkpoint(tmp_path / "data")
        with pytest.raises(ValueError, match="local"):
            io.save_checkpoint({"state_dict": {}}, "s3://bucket/x.ckpt")
    finally:
        io.teardown()
    assert (tmp_path / "data" / "precious").read_text() == "x"


@pytest.mark.timeout(60)
def test_importing_zckpt_does_not_import_lightning():
    code = ("import sys, zckpt, zckpt.integrations; zckpt.CheckpointPool; zckpt.load; "
            "assert 'lightning' not in sys.modules and 'lightning_fabric' not in sys.modules, 'lightning imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=50)


# --- deletions wait for the saves that supersede them ---------------------------------------------
@pytest.mark.timeout(60)
def test_the_newest_checkpoint_is_not_deleted_while_its_replacement_is_written(tmp_path, make_pool):
    """remove_checkpoint(A) while the save of B is held mid-write: A stays until B commits,
    then goes; a save to a name being removed cancels the removal."""
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=1, config=zckpt.PoolConfig(num_workers=1, **FAST),
                     writer_factory=gated_writer_factory(str(gate), f"{os.sep}B.tmp-"))
    io = ZckptCheckpointIO(pool=pool)
    sd = {"state_dict": {"w": torch.arange(1000.0)}, "epoch": 0, "global_step": 1}
    io.save_checkpoint(sd, tmp_path / "A")
    io.futures[-1].result(timeout=30)
    io.save_checkpoint(sd, tmp_path / "B")
    io.remove_checkpoint(tmp_path / "A")
    from conftest import wait_until
    wait_until(lambda: started_pids(gate), 30, "B's write to start")
    # B is being written: A, the newest committed checkpoint, must still be there (now,
    # and until B commits: its deletion is queued behind B's outcome).
    assert zckpt.latest(tmp_path) == str(tmp_path / "A")
    (gate / "open").touch()
    io.teardown()
    assert not os.path.exists(tmp_path / "A") and os.path.isdir(tmp_path / "B")
    zckpt.verify(tmp_path / "B")
    # A removal followed by a save of the same name: the save wins.
    io.remove_checkpoint(tmp_path / "B")
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "B")
    io.teardown()
    assert torch.equal(zckpt.load(tmp_path / "B")["state_dict"]["w"], torch.ones(3))
    assert entries(tmp_path) == ["B", "gate"]


@pytest.mark.timeout(60)
def test_a_failed_replacement_keeps_the_newest_checkpoint_and_raises_once(tmp_path, make_pool, monkeypatch):
    gate = tmp_path / "gate"
    gate.mkdir()
    cfg = zckpt.PoolConfig(num_workers=1, shard_retries=0, **FAST)
    pool = make_pool(num_workers=1, config=cfg, writer_factory=gated_writer_factory(str(gate), f"{os.sep}B.tmp-"))
    io = ZckptCheckpointIO(pool=pool)
    # Hold the plugin's thread: the failure must surface on the next call even before that
    # thread has seen it (the call looks at the futures itself).
    held = threading.Event()
    finish = io._finish
    monkeypatch.setattr(io, "_finish", lambda s: (held.wait(30), finish(s)))
    sd = {"state_dict": {"w": torch.arange(1000.0)}}
    io.save_checkpoint(sd, tmp_path / "A")
    io.futures[-1].result(timeout=30)
    io.save_checkpoint(sd, tmp_path / "B")
    io.remove_checkpoint(tmp_path / "A")
    from conftest import wait_until
    wait_until(lambda: started_pids(gate), 30, "B's write to start")
    os.kill(started_pids(gate)[0], signal.SIGKILL)
    with pytest.raises(zckpt.WorkerDiedError):
        io.futures[-1].result(timeout=30)
    with pytest.raises(zckpt.WorkerDiedError):   # surfaces on the next call...
        io.save_checkpoint(sd, tmp_path / "C")
    assert not os.path.lexists(tmp_path / "C")
    held.set()
    io.teardown()                                 # ...once: teardown has nothing left to raise
    assert entries(tmp_path) == ["A", "gate"]     # A, the newest committed checkpoint, was kept
    zckpt.verify(tmp_path / "A")


@pytest.mark.timeout(60)
def test_teardown_while_training_fails_keeps_the_training_error(tmp_path, make_pool):
    """Lightning tears down from its except block: a checkpoint failure found then is
    logged and noted on the training error, which stays the one that propagates."""
    from _writers import FailingWriter
    pool = make_pool(num_workers=1, config=zckpt.PoolConfig(num_workers=1, shard_retries=0, **FAST),
                     writer_factory=FailingWriter)
    io = ZckptCheckpointIO(pool=pool)
    io.save_checkpoint({"state_dict": {"w": torch.ones(8)}}, tmp_path / "A")
    with pytest.raises(OSError):
        io.futures[-1].result(timeout=30)
    with pytest.raises(RuntimeError, match="user error in training") as ei:
        try:
            raise RuntimeError("user error in training")
        except RuntimeError:
            io.teardown()
            raise
    assert any("simulated disk full" in note for note in getattr(ei.value, "__notes__", []))


# --- a worker SIGKILLed mid-write while Lightning trains -------------------------------------------
class KillWhileWriting(Callback):
    """At the first batch of epoch 2 (epoch 1's checkpoint is held mid-write by the gate),
    SIGKILL a worker writing it; with ``retry``, open the gate (the replacement writes the
    shard again), else wait for the save to fail first."""

    def __init__(self, io: ZckptCheckpointIO, gate, retry: bool) -> None:
        self.io, self.gate, self.retry = io, gate, retry
        self.victim: int | None = None
        self.future: zckpt.SaveFuture | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != 2 or batch_idx != 0:
            return
        from conftest import wait_until
        wait_until(lambda: started_pids(self.gate), 30, "epoch 1's checkpoint to be written")
        self.future = self.io.futures[-1]
        assert self.future.path == str(trainer.checkpoint_callback.dirpath) + os.sep + ckpt(1)
        self.victim = started_pids(self.gate)[0]
        os.kill(self.victim, signal.SIGKILL)
        if not self.retry:
            wait_until(self.future.done, 30, "the save to fail")
        (self.gate / "open").touch()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("retry", [True, False], ids=["shard-retried", "save-failed"])
def test_a_worker_killed_mid_run(tmp_path, make_pool, reference, retry):
    gate = tmp_path / "gate"
    gate.mkdir()
    d = tmp_path / "ckpt"
    cfg = zckpt.PoolConfig(num_workers=2, shard_retries=1 if retry else 0, **FAST)
    pool = make_pool(config=cfg, writer_factory=gated_writer_factory(str(gate), ckpt(1)))
    io = ZckptCheckpointIO(pool=pool)
    killer = KillWhileWriting(io, gate, retry)
    t = trainer(tmp_path, 3, [killer, checkpointer(d, top_k=1, last=False)], [io])
    if retry:
        t.fit(model(), data())
        # The killed worker's shard went to its replacement; the save committed; training went on.
        assert pool.stats.worker_restarts == 1 and killer.victim not in pool.worker_pids
        assert killer.future is not None and killer.future.timings["shard_retries"] == 1.0
        assert pool.stats.saves_failed == 0 and pool.stats.saves_committed == 3
        assert entries(d) == [ckpt(2)]
        newest = d / ckpt(2)
    else:
        # The failed save surfaces on the plugin's next call: the save at the end of epoch 2.
        with pytest.raises(zckpt.WorkerDiedError):
            t.fit(model(), data())
        assert pool.stats.saves_failed == 1 and isinstance(killer.future.exception(), zckpt.WorkerDiedError)
        # top_k=1 asked to delete epoch 0's checkpoint once epoch 1's was saved: it was kept,
        # as the newest committed one, since epoch 1's failed.
        assert entries(d) == [ckpt(0)]
        newest = d / ckpt(0)
    assert zckpt.latest(d) == str(newest)
    zckpt.verify(newest)
    # Resume from the newest committed checkpoint: bit-exact with the uninterrupted run.
    t2 = trainer(tmp_path, 5, [checkpointer(d, top_k=1, last=False)],
                 [ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=1, **FAST))])
    t2.fit(model(seed=5), data(), ckpt_path=zckpt.latest(d))
    assert_same(state_of(t2), reference[5], "resumed after a killed worker")


# --- DDP: two CPU processes (gloo), rank 0 saves ------------------------------------------------------
class RecordSaves(Callback):
    """At the end of training (before teardown): how many saves this rank made, and whether
    it has a pool."""

    def __init__(self, io: ZckptCheckpointIO, root: str) -> None:
        self.io, self.root = io, root

    def on_train_end(self, trainer, pl_module) -> None:
        with open(os.path.join(self.root, f"rank-{trainer.global_rank}.txt"), "w") as f:
            f.write(f"saves={len(self.io.futures)} pool={self.io.pool is not None}\n")


def _ddp_main(root: str) -> None:
    """Run by the test below, and by Lightning again as rank 1."""
    d = os.path.join(root, "ckpt")
    io = ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=1, **FAST))
    t = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=root,
                  enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                  callbacks=[RecordSaves(io, root), checkpointer(d)], plugins=[io])
    t.fit(model(), data())
    if t.global_rank == 0:
        torch.save(state_of(t), os.path.join(root, "final.pt"))


@pytest.mark.timeout(150)
def test_ddp_two_cpu_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                            "LOCAL_RANK", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "ddp", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=130)
    finally:
        if proc.poll() is None:   # hung: kill the whole session (rank 1 and the pool's workers too)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
    d = tmp_path / "ckpt"
    per_rank = STEPS_PER_EPOCH // 2   # the distributed sampler gives each rank half the batches
    assert entries(d) == sorted([ckpt(1, per_rank), ckpt(2, per_rank), "last.ckpt"])
    for name in entries(d):
        zckpt.verify(d / name)
    # Rank 0 saved everything (one pool, there); rank 1 never made a pool.
    assert (tmp_path / "rank-0.txt").read_text() == "saves=6 pool=True\n"   # 3 top-k + 3 last.ckpt
    assert (tmp_path / "rank-1.txt").read_text() == "saves=0 pool=False\n"
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    last = zckpt.load(d / "last.ckpt")
    assert last["global_step"] == 3 * per_rank
    assert_same(last["state_dict"], final["model"], "DDP last.ckpt vs rank 0's final state")
    assert_same(last["optimizer_states"][0], final["optim"], "DDP optimizer state")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "ddp":
        _ddp_main(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} ddp ROOT")
