"""Power loss at every step of a save, on a FUSE file system that forgets what was not fsynced.

Each scenario runs real saves through a mounted :mod:`crashfs`, records every file-system
operation after a mark, and then checks every state a power loss after each operation
could leave (pessimistic, optimistic and reordered; see ``crashfs.crash_states``),
materialised into a real directory:

- ``latest(root)`` is the previous checkpoint or the new one, and it loads bit-exactly
  and verifies;
- once the whole save has run (``result()`` returned), the new one survives even the
  pessimistic crash;
- the next save into that root works, and afterwards nothing is left but checkpoints.

``ZCKPT_CRASH_FULL=1`` explores more reorderings per prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zckpt
from zckpt import PoolConfig

pytestmark = [pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
REORDERINGS = 6 if os.environ.get("ZCKPT_CRASH_FULL") else 2

if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
    pytest.skip("needs FUSE (/dev/fuse and fusermount3 from Debian's fuse3)", allow_module_level=True)
pytest.importorskip("mfusepy")
import crashfs  # noqa: E402


class Mount:
    """A crashfs server in its own process, mounted at ``path``; unmounted and reaped on exit."""

    def __init__(self, base: Path) -> None:
        self.path = base / "mnt"
        self.log = base / "ops.json"
        self.path.mkdir()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "crashfs.py"), str(self.path), str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                err = self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""
                pytest.fail(f"crashfs did not mount: {err}")
            time.sleep(0.01)   # polling cadence; the mount table decides

    def mark(self) -> None:
        (self.path / crashfs.MARK).touch()

    def finish(self) -> dict:
        """Unmount (the server then writes its log) and return the log."""
        self.close()
        return json.loads(self.log.read_text())

    def close(self) -> None:
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False, capture_output=True, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            subprocess.run(["fusermount3", "-uz", str(self.path)], check=False, capture_output=True, timeout=30)


@pytest.fixture
def mount(tmp_path):
    m = Mount(tmp_path)
    try:
        yield m
    finally:
        m.close()


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(300, generator=g).to(torch.bfloat16),
            "step": step}


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in ("w", "b"))


def explore(log: dict, roots: list[str], allowed: dict[str, set[str | None]], must_have: dict[str, str],
            expected: dict[str, dict], scratch: Path, pool: zckpt.CheckpointPool) -> int:
    """Check every crash state; return how many were explored."""
    n = 0
    states = list(crashfs.crash_states(log, seed=0, reorderings=REORDERINGS))
    last_k = len(log["ops"])
    for i, (label, tree) in enumerate(states):
        where = scratch / f"s{i}"
        where.mkdir()
        tree.materialize(str(where))
        for root in roots:
            r = where / root
            got = zckpt.latest(r) if r.exists() else None
            name = os.path.basename(got) if got else None
            assert name in allowed[root], f"{label}: latest({root}) is {name}, allowed {allowed[root]}"
            if label == f"after {last_k} ops, pessimistic":
                assert name == must_have[root], f"{label}: the save returned, yet {root} lost {must_have[root]}"
            if got is not None:
                zckpt.verify(got)
                assert same(zckpt.load(got), expected[name]), f"{label}: {got} does not load bit-exactly"
            # Whatever else is there is a whole checkpoint, or a temp/condemned directory that
            # the next save sweeps: never a half-written or half-deleted one under a real name.
            for entry in (os.listdir(r) if r.exists() else []):
                p = r / entry
                if ".tmp-" in entry or ".del-" in entry or not p.is_dir():
                    continue
                assert (p / "manifest.json").exists(), f"{label}: {root}/{entry} is neither whole nor gone"
                assert same(zckpt.load(p), expected[entry]), f"{label}: {root}/{entry} does not load"
        if len(roots) > 1:
            # What the next save's commit does first: a mirror that lacks the primary's
            # newest checkpoint gets it, whole (the promise for mirrors, README).
            primary, mirror = where / roots[0], where / roots[1]
            if zckpt.latest(primary) is not None:
                zckpt.commit.repair_mirror(str(primary), str(mirror), fsync=False)
                assert os.path.basename(zckpt.latest(mirror) or "") == os.path.basename(zckpt.latest(primary)), label
                zckpt.verify(zckpt.latest(mirror))
        if label.endswith("pessimistic"):
            # The next save into the first root works, and leaves nothing but checkpoints.
            r = where / roots[0]
            fut = pool.save(state(99), r / "next")
            assert fut.result(timeout=60) == str(r / "next")
            assert zckpt.latest(r) == str(r / "next")
            leftovers = [p for p in os.listdir(r) if ".tmp-" in p or ".del-" in p]
            assert not leftovers, f"{label}: left behind {leftovers}"
        shutil.rmtree(where)
        n += 1
    return n


def test_power_loss_during_a_first_save_into_new_directories_with_a_mirror(mount, tmp_path):
    """The directories the save creates (runs/, runs/ckpt/) must be durable before result()
    returns: found missing by an earlier power-loss simulation."""
    cfg = PoolConfig(num_workers=2, mirrors=(str(mount.path / "mirror" / "ckpt"),), heartbeat_interval_s=0.5)
    mount.mark()
    with zckpt.CheckpointPool(config=cfg) as pool:
        assert pool.save(state(1), mount.path / "runs" / "ckpt" / "step-1").result(timeout=120)
    log = mount.finish()
    assert len(log["ops"]) > 20
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with zckpt.CheckpointPool(num_workers=1, config=PoolConfig(fsync=False)) as checker:
        n = explore(log, ["runs/ckpt", "mirror/ckpt"], {"runs/ckpt": {None, "step-1"}, "mirror/ckpt": {None, "step-1"}},
                    {"runs/ckpt": "step-1", "mirror/ckpt": "step-1"}, {"step-1": state(1)}, scratch, checker)
    print(f"explored {n} crash states over {len(log['ops'])} operations")


def test_power_loss_during_a_save_that_applies_retention(mount, tmp_path):
    """keep_last deletes the oldest checkpoint in the same commit: after any crash it is whole
    or gone (a condemned leftover is swept), and the new one or the previous one is latest."""
    root = mount.path / "ckpt"
    cfg = PoolConfig(num_workers=2, keep_last=2, heartbeat_interval_s=0.5)
    with zckpt.CheckpointPool(config=cfg) as pool:
        for step in (1, 2):
            pool.save(state(step), root / f"step-{step}").result(timeout=120)
        mount.mark()
        pool.save(state(3), root / "step-3").result(timeout=120)
    log = mount.finish()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with zckpt.CheckpointPool(num_workers=1, config=PoolConfig(fsync=False)) as checker:
        n = explore(log, ["ckpt"], {"ckpt": {"step-2", "step-3"}}, {"ckpt": "step-3"},
                    {f"step-{i}": state(i) for i in (1, 2, 3)}, scratch, checker)
    print(f"explored {n} crash states over {len(log['ops'])} operations")


def test_power_loss_during_a_multi_rank_commit(mount, tmp_path):
    """Two ranks, each writing its part through its own pool, the coordinator committing the
    global index: after any crash the checkpoint is the previous one or the new one, whole."""
    from dist_cases import SHAPES, full, save_around_a_mark
    from dist_helpers import run_ranks
    root = mount.path / "ckpt"
    res = run_ranks(2, save_around_a_mark, str(root), str(mount.path / crashfs.MARK), timeout=300)
    assert res[0] == res[1] == str(root / "step-2")
    log = mount.finish()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    seen = {None: 0, "step-1": 0, "step-2": 0}
    states = list(crashfs.crash_states(log, seed=0, reorderings=REORDERINGS))
    for i, (label, tree) in enumerate(states):
        where = scratch / f"s{i}"
        where.mkdir()
        tree.materialize(str(where))
        got = zckpt.latest(where / "ckpt")
        name = os.path.basename(got) if got else None
        assert name in ("step-1", "step-2"), f"{label}: latest is {name}"
        if label == f"after {len(log['ops'])} ops, pessimistic":
            assert name == "step-2", f"{label}: every rank's result() returned, yet step-2 is lost"
        zckpt.verify(got)
        whole = zckpt.load(got)
        step = int(name.split("-")[1])
        for k, s in SHAPES.items():
            assert torch.equal(whole[k], full(k, s, step=step)), f"{label}: {k} of {name}"
        seen[name] += 1
        shutil.rmtree(where)
    print(f"explored {len(states)} crash states over {len(log['ops'])} operations: {seen}")
    assert seen["step-1"] and seen["step-2"]


# --- storage errors: a failed fsync, a full disk at every step of the commit -------------------
@pytest.mark.parametrize("op, match, err, names", [
    # (the parent fsync after the rename: only the directory /ckpt itself, not its children)
    ("fsync", "shard-00000", "EIO", "fdatasync of .*shard-00000-of-00002.safetensors failed with EIO"),
    ("write", "shard-00001", "ENOSPC", "ENOSPC|No space left"),
    ("create", "manifest.json", "ENOSPC", "ENOSPC|No space left"),
    ("fsync", "manifest.json", "EIO", "fsync of .*manifest.json failed with EIO"),
    ("rename", "ckpt/step-2", "ENOSPC", "ENOSPC|No space left"),
    ("fsyncdir", "=/ckpt", "EIO", "fsync of .*/mnt/ckpt failed with EIO"),
])
def test_a_storage_error_at_any_step_fails_the_save_and_keeps_the_previous_checkpoint(mount, op, match, err, names):
    """The save fails naming the file and errno, its temp dir is discarded, the previous
    checkpoint stays latest and loads, nothing is retried, and the pool keeps working. A
    failed fsync of the parent after the rename takes the rename back."""
    import errno as errno_mod
    root = mount.path / "ckpt"
    with zckpt.CheckpointPool(config=PoolConfig(num_workers=2, heartbeat_interval_s=0.5)) as pool:
        pool.save(state(1), root / "step-1").result(timeout=120)
        # The parent fsync of step-1's commit already ran: from here, faults hit step-2 only.
        (mount.path / crashfs.FAULTS).write_text(json.dumps(
            [{"op": op, "match": match.lstrip("="), "exact": match.startswith("="),
              "errno": getattr(errno_mod, err), "times": 1}]))
        fut = pool.save(state(2), root / "step-2")
        with pytest.raises(OSError, match=names):
            fut.result(timeout=120)
        assert zckpt.latest(root) == str(root / "step-1")
        assert same(zckpt.load(root / "step-1"), state(1))
        assert not (root / "step-2").exists()
        deadline = time.monotonic() + 30
        while [n for n in os.listdir(root) if ".tmp-" in n] and time.monotonic() < deadline:
            time.sleep(0.01)   # the cleanup thread discards the temp dir; poll with a deadline
        assert not [n for n in os.listdir(root) if ".tmp-" in n]
        assert pool.save(state(3), root / "step-3").result(timeout=120) == str(root / "step-3")
        assert zckpt.latest(root) == str(root / "step-3")


def test_a_retention_failure_after_the_commit_does_not_fail_the_save(mount):
    """Found by review: keep_last failing (here: the rename that condemns the old checkpoint
    gets EPERM) made result() raise although latest() named the new checkpoint."""
    import errno as errno_mod
    root = mount.path / "ckpt"
    with zckpt.CheckpointPool(config=PoolConfig(num_workers=1, keep_last=1, heartbeat_interval_s=0.5)) as pool:
        pool.save(state(1), root / "step-1").result(timeout=120)
        (mount.path / crashfs.FAULTS).write_text(json.dumps(
            [{"op": "rename", "match": ".del-", "errno": errno_mod.EPERM, "times": 1}]))
        assert pool.save(state(2), root / "step-2").result(timeout=120) == str(root / "step-2")
        assert zckpt.latest(root) == str(root / "step-2")
        assert pool.stats.saves_failed == 0
        pool.save(state(3), root / "step-3").result(timeout=120)   # retention catches up
        assert sorted(n for n in os.listdir(root)) == ["step-3"]
