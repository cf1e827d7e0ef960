"""Fan-out configs, mirrors, retention, and loading into existing tensors."""

from __future__ import annotations

import glob
import os

import pytest
import torch

import zckpt
from zckpt import PoolConfig

pytestmark = pytest.mark.timeout(120)

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench", "configs", "*.toml")))


def test_there_are_example_configs():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"fanout-1.toml", "fanout-2.toml", "fanout-4.toml", "fanout-2-mirror.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_example_config_builds_a_working_pool(path, tmp_path):
    cfg = PoolConfig.from_toml(path)
    if cfg.mirrors:  # keep the test inside its own directory
        cfg = cfg.replace(mirrors=tuple(str(tmp_path / f"mirror{i}") for i in range(len(cfg.mirrors))))
    cfg = cfg.replace(fsync=False)
    sd = {f"w{i}": torch.randn(128, 64) for i in range(8)}
    pool = zckpt.CheckpointPool(config=cfg)
    try:
        assert len(pool.worker_pids) == cfg.num_workers
        pool.save(sd, tmp_path / "main" / "step-1").result(timeout=60)
    finally:
        pool.kill()
    shards = [p for p in os.listdir(tmp_path / "main" / "step-1") if p.endswith(".safetensors")]
    assert len(shards) == cfg.num_workers
    for root in [tmp_path / "main"] + [tmp_path / f"mirror{i}" for i in range(len(cfg.mirrors))]:
        back = zckpt.load(root / "step-1")
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_num_workers_argument_overrides_config(make_pool):
    pool = make_pool(num_workers=3, config=PoolConfig(num_workers=1, fsync=False))
    assert len(pool.worker_pids) == 3 and pool.config.num_workers == 3


def test_mirrors_commit_the_same_checkpoint_twice(make_pool, tmp_path):
    mirror = tmp_path / "mirror"
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False, mirrors=(str(mirror),)))
    pool.save({"a": torch.arange(10)}, tmp_path / "main" / "step-1").result(timeout=60)
    for root in (tmp_path / "main", mirror):
        assert zckpt.latest(root) == str(root / "step-1")
        zckpt.verify(root / "step-1")
    # A mirror that already has the name is left out (never overwritten); the primary decides.
    os.rename(tmp_path / "main" / "step-1", tmp_path / "main" / "moved")
    fut = pool.save({"a": torch.arange(10) + 1}, tmp_path / "main" / "step-1")
    assert fut.result(timeout=60) and "already exists" in fut.mirror_errors[0]
    assert torch.equal(zckpt.load(mirror / "step-1")["a"], torch.arange(10))   # untouched


def test_retention_keeps_the_newest_and_ignores_uncommitted(make_pool, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "step-0").mkdir()                             # uncommitted: never touched
    (root / "notes.txt").write_text("keep me")
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, keep_last=2))
    for step in range(1, 6):
        pool.save({"s": torch.tensor(step)}, root / f"step-{step}").result(timeout=60)
    assert sorted(os.listdir(root)) == ["notes.txt", "step-0", "step-4", "step-5"]
    assert zckpt.load(zckpt.latest(root))["s"].item() == 5


def test_load_into_fills_existing_tensors_in_place(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 32)).sum().backward()
    opt.step()
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 9}
    pool.save(saved, tmp_path / "c").result(timeout=60)

    fresh = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 4))
    target = {"model": fresh.state_dict(), "opt": saved["opt"], "step": 0}
    target["opt"] = {"state": {i: {"momentum_buffer": torch.zeros_like(v["momentum_buffer"])}
                               for i, v in saved["opt"]["state"].items()},
                     "param_groups": saved["opt"]["param_groups"]}
    ptrs = {k: v.data_ptr() for k, v in target["model"].items()}
    out = zckpt.load(tmp_path / "c", into=target)
    for k, v in fresh.state_dict().items():
        assert v.data_ptr() == ptrs[k]  # same memory, filled in place
        assert torch.equal(v, saved["model"][k])
    assert out["step"] == 9 and out["model"]["0.weight"] is target["model"]["0.weight"]
    assert torch.equal(target["opt"]["state"][0]["momentum_buffer"], saved["opt"]["state"][0]["momentum_buffer"])


def test_load_into_handles_views_and_ties(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    w = torch.randn(6, 6)
    pool.save({"w": w, "tied": w, "t": w.t()}, tmp_path / "c").result(timeout=60)
    a = torch.zeros(6, 6)
    target = {"w": a, "tied": a, "t": torch.zeros(6, 6)}
    zckpt.load(tmp_path / "c", into=target)
    assert torch.equal(a, w) and torch.equal(target["t"], w.t())


def test_load_into_mismatches_are_named(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    pool.save({"a": torch.ones(3), "b": torch.ones(2)}, tmp_path / "c").result(timeout=60)
    with pytest.raises(ValueError, match=r"'a' is float32\[4\].*float32\[3\]"):
        zckpt.load(tmp_path / "c", into={"a": torch.ones(4), "b": torch.ones(2)})
    with pytest.raises(KeyError, match="missing from `into`: \\['b'\\]"):
        zckpt.load(tmp_path / "c", into={"a": torch.ones(3)})
    with pytest.raises(KeyError, match="not in the checkpoint: \\['z'\\]"):
        zckpt.load(tmp_path / "c", into={"a": torch.ones(3), "b": torch.ones(2), "z": torch.ones(1)})
    out = zckpt.load(tmp_path / "c", into={"a": torch.ones(3), "b": torch.ones(2), "z": torch.ones(1)},
                     strict=False)
    assert torch.equal(out["a"], torch.ones(3))


def test_a_mirror_that_cannot_commit_does_not_fail_the_save_and_the_next_commit_completes_it(make_pool, tmp_path):
    """The promise: result() returns once the primary is committed; a mirror that failed
    (here: its root is a file for a while) is named in fut.mirror_errors, and the next
    save's commit copies the missing checkpoint there first."""
    import zckpt

    from _writers import GateWriter
    primary, mirror, gate = tmp_path / "primary", tmp_path / "mirror", tmp_path / "gate"
    gate.mkdir()
    (gate / "open").touch()
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False, mirrors=(str(mirror),)),
                     writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    fut = pool.save({"w": torch.arange(10.0)}, primary / "step-1")
    assert fut.result(timeout=60) == str(primary / "step-1") and fut.mirror_errors == []
    # Break the mirror while the shards are written: the mirror's rename cannot happen.
    (gate / "open").unlink()
    fut = pool.save({"w": torch.arange(10.0) + 2}, primary / "step-2")
    blocker = mirror / "step-2"
    blocker.write_text("in the way")            # a file where the mirror's checkpoint goes
    (gate / "open").touch()
    assert fut.result(timeout=60) == str(primary / "step-2")
    assert len(fut.mirror_errors) == 1 and "step-2" in fut.mirror_errors[0]
    assert zckpt.latest(primary) == str(primary / "step-2") and zckpt.latest(mirror) == str(mirror / "step-1")
    blocker.unlink()
    fut = pool.save({"w": torch.arange(10.0) + 3}, primary / "step-3")
    assert fut.result(timeout=60) and fut.mirror_errors == []
    assert [p.rsplit("/", 1)[1] for p in zckpt.commit.committed(mirror)] == ["step-1", "step-2", "step-3"]
    assert torch.equal(zckpt.load(mirror / "step-2")["w"], torch.arange(10.0) + 2)
    zckpt.verify(mirror / "step-2")
    assert not [n for n in os.listdir(mirror) if ".tmp-" in n]


def test_a_mirror_that_cannot_even_be_prepared_leaves_the_primary_save_alone(make_pool, tmp_path):
    """Found by review: a mirror root under a regular file (or read-only) failed the whole
    save at save() time. The primary decides: the mirror is left out and named."""
    import zckpt
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, mirrors=(str(blocker / "mirror"),)))
    fut = pool.save({"w": torch.arange(5.0)}, tmp_path / "primary" / "s1")
    assert fut.result(timeout=60) == str(tmp_path / "primary" / "s1")
    assert len(fut.mirror_errors) == 1 and "not-a-dir" in fut.mirror_errors[0]
    assert zckpt.latest(tmp_path / "primary") == str(tmp_path / "primary" / "s1")


def test_a_damaged_checkpoint_is_never_copied_into_a_mirror(make_pool, tmp_path):
    """Found by review: repair copied a byte-flipped shard; a missing one also kept the
    current save out of the mirror. Now the copy is verified, and a failed repair is said
    without stopping the current save's mirror commit."""
    import zckpt
    primary, mirror = tmp_path / "primary", tmp_path / "mirror"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    pool.save({"w": torch.arange(4096.0)}, primary / "s1").result(timeout=60)
    shard = next((primary / "s1").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    pool2 = make_pool(config=PoolConfig(num_workers=1, fsync=False, mirrors=(str(mirror),)))
    fut = pool2.save({"w": torch.arange(4096.0) + 1}, primary / "s2")
    assert fut.result(timeout=60)
    assert any("completing it from" in e and "checksum" in e for e in fut.mirror_errors), fut.mirror_errors
    assert sorted(os.listdir(mirror)) == ["s2"]
    zckpt.verify(mirror / "s2")
