"""Order of checkpoints: by what each commit recorded in its manifest, never by file times."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import pytest
import torch

import zckpt
from zckpt import PoolConfig
from zckpt.commit import apply_retention, committed
from zckpt.manifest import (
    MANIFEST_NAME,
    CommitRecord,
    peek_commit_record,
    read_manifest,
    read_manifest_body,
    with_commit_record,
    write_manifest,
)

pytestmark = pytest.mark.timeout(120)


def _save(pool, root, *steps):
    for step in steps:
        pool.save({"s": torch.tensor(step)}, root / f"step-{step}").result(timeout=60)


def _names(paths):
    return [os.path.basename(p) for p in paths]


def _record(path):
    return read_manifest(str(path)).commit


def _mtime(path):
    return os.stat(path / MANIFEST_NAME).st_mtime_ns


def test_copy_without_times_keeps_the_order_and_retention(make_pool, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    _save(pool, src, 1, 2, 3)
    assert [_record(src / f"step-{s}").sequence for s in (1, 2, 3)] == [1, 2, 3]
    dst.mkdir()
    for step in (3, 2, 1):  # a copy that does not keep times, newest first
        shutil.copytree(src / f"step-{step}", dst / f"step-{step}", copy_function=shutil.copyfile)
        time.sleep(0.01)
    assert _mtime(dst / "step-1") > _mtime(dst / "step-2") > _mtime(dst / "step-3")  # the trap is set
    assert zckpt.latest(dst) == str(dst / "step-3")
    assert _names(committed(dst)) == ["step-1", "step-2", "step-3"]

    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, keep_last=2))
    _save(pool, dst, 4)
    assert _record(dst / "step-4").sequence == 4
    assert zckpt.latest(dst) == str(dst / "step-4")
    assert sorted(os.listdir(dst)) == ["step-3", "step-4"]
    assert zckpt.load(zckpt.latest(dst))["s"].item() == 4


def test_scrambled_mtimes_do_not_change_the_order(make_pool, tmp_path):
    root = tmp_path / "root"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    _save(pool, root, 1, 2, 3, 4)
    now = time.time()
    for step, age in ((1, 0), (2, 1000), (3, 3000), (4, 2000)):  # step-1 looks newest
        for p in (root / f"step-{step}" / MANIFEST_NAME, root / f"step-{step}"):
            os.utime(p, (now - age, now - age))
    assert zckpt.latest(root) == str(root / "step-4")
    assert _names(committed(root)) == ["step-1", "step-2", "step-3", "step-4"]

    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, keep_last=2))
    _save(pool, root, 5)
    assert sorted(os.listdir(root)) == ["step-4", "step-5"]
    assert zckpt.latest(root) == str(root / "step-5")


def test_each_mirror_root_has_its_own_sequence(make_pool, tmp_path):
    main, mirror = tmp_path / "main", tmp_path / "mirror"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    _save(pool, main, 1, 2)
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False, mirrors=(str(mirror),)))
    _save(pool, main, 3)
    assert _record(main / "step-3").sequence == 3
    # A new mirror first receives the primary's newest earlier checkpoint (what completes a
    # mirror that missed one), then the save's own.
    assert _record(mirror / "step-2").sequence == 1
    assert _record(mirror / "step-3").sequence == 2
    for root in (main, mirror):
        assert zckpt.latest(root) == str(root / "step-3")
        zckpt.verify(root / "step-3")  # each root's manifest carries a checksum of its own body
    a, b = read_manifest(str(main / "step-3")), read_manifest(str(mirror / "step-3"))
    # the same checkpoint; only the commit record differs
    assert a.commit != b.commit and dataclasses.replace(a, commit=None) == dataclasses.replace(b, commit=None)


def test_unreadable_manifests_are_skipped_and_never_deleted(make_pool, tmp_path):
    root = tmp_path / "root"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    _save(pool, root, 1, 2, 3)
    (root / "step-3" / MANIFEST_NAME).write_text("{not json")                 # garbage
    manifest2 = root / "step-2" / MANIFEST_NAME
    data = manifest2.read_bytes()
    manifest2.write_bytes(data[: len(data) // 2])       # torn: the record at its start survives
    assert peek_commit_record(str(root / "step-2"))[0] == 2  # a hint only: not trusted
    assert zckpt.latest(root) == str(root / "step-1")
    assert committed(root) == [str(root / "step-1")]

    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, keep_last=1))
    _save(pool, root, 4)
    assert sorted(os.listdir(root)) == ["step-2", "step-3", "step-4"]
    assert zckpt.latest(root) == str(root / "step-4")
    assert apply_retention(str(root), 1) == []
    assert sorted(os.listdir(root)) == ["step-2", "step-3", "step-4"]


def _strip_record(path, created_unix="keep"):
    """Rewrite a committed manifest the way a zckpt without commit records wrote it."""
    body = read_manifest_body(str(path))
    del body["commit"]
    if created_unix is None:
        del body["created_unix"]
    elif created_unix != "keep":
        body["created_unix"] = created_unix
    os.unlink(path / MANIFEST_NAME)
    write_manifest(str(path), body, fsync=False)


def test_old_manifests_without_a_record_rank_below_recorded_ones(make_pool, tmp_path):
    root = tmp_path / "root"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    _save(pool, root, 1, 2, 3)
    future = time.time() + 10_000
    _strip_record(root / "step-3", created_unix=future)
    _strip_record(root / "step-1", created_unix=future + 1000)
    for step in (1, 3):
        os.utime(root / f"step-{step}" / MANIFEST_NAME, (future, future))
    zckpt.verify(root / "step-3")  # still a valid, committed checkpoint
    # Unrecorded ones first (among themselves by created_unix), then recorded ones.
    assert _names(committed(root)) == ["step-3", "step-1", "step-2"]
    assert zckpt.latest(root) == str(root / "step-2")

    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, keep_last=2))
    _save(pool, root, 4)
    assert _record(root / "step-4").sequence == 3
    assert sorted(os.listdir(root)) == ["step-2", "step-4"]


def test_old_manifests_fall_back_to_created_unix_then_mtime(make_pool, tmp_path):
    root = tmp_path / "root"
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    _save(pool, root, 1, 2, 3)
    _strip_record(root / "step-1", created_unix=200.0)
    _strip_record(root / "step-2", created_unix=None)       # no created_unix: its mtime
    _strip_record(root / "step-3", created_unix=100.0)
    os.utime(root / "step-2" / MANIFEST_NAME, (150, 150))
    assert _names(committed(root)) == ["step-3", "step-2", "step-1"]
    assert zckpt.latest(root) == str(root / "step-1")
    os.utime(root / "step-2" / MANIFEST_NAME, (250, 250))
    assert zckpt.latest(root) == str(root / "step-2")


def test_commit_record_is_first_and_the_body_is_not_mutated(tmp_path):
    body = {"format": "zckpt", "version": 1, "commit": {"sequence": 9, "unix_time_ns": 9}, "x": [1],
            "files": [], "storages": [], "tensors": []}
    stamped = with_commit_record(body, 5, 123)
    assert body["commit"] == {"sequence": 9, "unix_time_ns": 9}
    assert list(stamped)[:4] == ["commit", "format", "version", "x"] and stamped["x"] is body["x"]
    write_manifest(str(tmp_path), stamped, fsync=False)
    assert peek_commit_record(str(tmp_path)) == (5, 123)
    assert read_manifest(str(tmp_path)).commit == CommitRecord(5, 123)


def test_overlapping_saves_commit_in_the_order_they_were_made(make_pool, tmp_path):
    """Was: with two staging buffers, a later save whose writes finished first committed
    first, so the earlier one got the higher sequence: latest() named it and keep_last=1
    deleted the newer checkpoint."""
    from concurrent.futures import wait

    from _writers import GateWriter, wait_for_started

    gate = tmp_path / "gate"
    gate.mkdir()
    root = tmp_path / "root"
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False, staging_buffers=2, keep_last=1,
                                       heartbeat_interval_s=0.2),
                     writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    first = pool.save({"a": torch.ones(1000), "b": torch.ones(1000), "step": 100}, root / "step-100")
    wait_for_started(gate)
    second = pool.save({"step": 200}, root / "step-200")       # nothing to write: ready at once
    done, _ = wait([second], timeout=1.0)
    assert not done, "a later save committed while an earlier one was still being written"
    (gate / "open").touch()
    assert first.result(timeout=60) and second.result(timeout=60)
    assert zckpt.latest(root) == str(root / "step-200")
    assert sorted(os.listdir(root)) == ["step-200"]




def test_retention_and_latest_ignore_symlinks(make_pool, tmp_path):
    """Was: a link root/pretrained -> /archive/step-1 was ranked, and retention deleted
    the archive's manifest through it."""
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    archive = tmp_path / "archive"
    pool.save({"w": torch.ones(2)}, archive / "step-1").result(timeout=60)
    root = tmp_path / "root"
    root.mkdir()
    (root / "pretrained").symlink_to(archive / "step-1")
    kept = make_pool(config=PoolConfig(num_workers=1, fsync=False, keep_last=1))
    for step in (2, 3):
        kept.save({"w": torch.full((2,), float(step))}, root / f"step-{step}").result(timeout=60)
    zckpt.verify(archive / "step-1")
    assert zckpt.latest(root) == str(root / "step-3")
    assert sorted(os.listdir(root)) == ["pretrained", "step-3"]
