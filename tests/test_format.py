"""The on-disk format: safetensors interop, verify, corruption, latest and temp dirs."""

from __future__ import annotations

import json
import os

import pytest
import torch

import zckpt
from zckpt import CorruptCheckpointError
from zckpt.commit import committed, sweep_temp_dirs

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def ckpt(make_pool, tmp_path):
    """A committed two-shard checkpoint of known content."""
    pool = make_pool(num_workers=2)
    torch.manual_seed(1)
    sd = {"layer": {"weight": torch.randn(64, 32), "bias": torch.randn(32)},
          "emb": torch.randn(100, 16).bfloat16(), "step": 7}
    sd["tied"] = sd["layer"]["weight"]
    path = tmp_path / "root" / "step-7"
    pool.save(sd, path).result(timeout=60)
    return path, sd


def shards(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))


def test_shards_open_with_safetensors(ckpt):
    safetensors = pytest.importorskip("safetensors.torch")
    path, sd = ckpt
    seen = {}
    for name in shards(path):
        seen.update(safetensors.load_file(str(path / name)))
    assert torch.equal(seen["layer.weight"], sd["layer"]["weight"])
    assert torch.equal(seen["layer.bias"], sd["layer"]["bias"])
    assert torch.equal(seen["emb"], sd["emb"]) and seen["emb"].dtype == torch.bfloat16
    assert "tied" not in seen  # the tied tensor is stored once, under its first name


def test_verify_reports_what_it_checked(ckpt):
    path, _ = ckpt
    summary = zckpt.verify(path)
    assert summary["files"] == 2 and summary["tensors"] == 4 and summary["storages"] == 3
    assert summary["bytes_checked"] == sum(os.path.getsize(path / s) for s in shards(path))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_flipped_data_byte_names_file_and_tensor(ckpt):
    path, _ = ckpt
    manifest = json.loads((path / "manifest.json").read_text())["zckpt_manifest"]
    part = manifest["storages"][0]["parts"][0]  # layer.weight, shared with "tied"
    fname = manifest["files"][part["file"]]["name"]
    _flip(path / fname, part["offset"] + 100)
    for check in (zckpt.verify, zckpt.load):
        with pytest.raises(CorruptCheckpointError, match=rf"{fname}.*checksum mismatch.*layer\.weight.*tied"):
            check(path)
    back = zckpt.load(path, verify=False)  # the escape hatch reads it anyway
    assert back["step"] == 7


def test_flipped_header_byte_is_caught(ckpt):
    path, _ = ckpt
    name = shards(path)[0]
    _flip(path / name, 20)  # inside the JSON header
    with pytest.raises(CorruptCheckpointError, match=name):
        zckpt.verify(path)
    with pytest.raises(CorruptCheckpointError, match=name):
        zckpt.load(path)


def test_truncated_file(ckpt):
    path, _ = ckpt
    name = shards(path)[1]
    size = os.path.getsize(path / name)
    os.truncate(path / name, size - 10)
    for check in (zckpt.verify, zckpt.load):
        with pytest.raises(CorruptCheckpointError, match=rf"{name}.*truncated"):
            check(path)


def test_missing_file(ckpt):
    path, _ = ckpt
    name = shards(path)[0]
    os.unlink(path / name)
    for check in (zckpt.verify, zckpt.load):
        with pytest.raises(CorruptCheckpointError, match=rf"{name}.*missing"):
            check(path)


def test_edited_manifest(ckpt):
    path, _ = ckpt
    doc = json.loads((path / "manifest.json").read_text())
    doc["zckpt_manifest"]["tensors"][0]["shape"] = [32, 64]
    (path / "manifest.json").write_text(json.dumps(doc))
    for check in (zckpt.verify, zckpt.load):
        with pytest.raises(CorruptCheckpointError, match="manifest checksum mismatch"):
            check(path)


def test_garbage_manifest(ckpt):
    path, _ = ckpt
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        zckpt.load(path)


def test_directory_without_manifest_is_not_a_checkpoint(ckpt):
    path, _ = ckpt
    os.unlink(path / "manifest.json")
    with pytest.raises(CorruptCheckpointError, match="not a committed"):
        zckpt.load(path)
    assert zckpt.latest(path.parent) is None


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        zckpt.load(tmp_path / "nope")


def test_map_location(ckpt):
    path, sd = ckpt
    back = zckpt.load(path, map_location="cpu")
    assert back["layer"]["weight"].device.type == "cpu"
    back = zckpt.load(path, map_location={"cpu": "cpu"}, num_threads=1)
    assert torch.equal(back["emb"], sd["emb"])


def test_latest_ignores_temp_and_uncommitted(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    root = tmp_path / "root"
    for step in (1, 2):
        pool.save({"s": torch.tensor(step)}, root / f"step-{step}").result(timeout=60)
    (root / "step-3.tmp-999999-deadbeef").mkdir()          # a crashed trainer's leftover
    (root / "step-4").mkdir()                              # no manifest: never committed
    assert zckpt.latest(root) == str(root / "step-2")
    assert committed(root) == [str(root / "step-1"), str(root / "step-2")]
    assert zckpt.latest(tmp_path / "empty") is None


def test_leftover_temp_dirs_are_swept_on_next_save(make_pool, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    dead = root / "step-1.tmp-999999-0badc0de"    # pid 999999: not running
    dead.mkdir()
    (dead / "shard-00000-of-00001.safetensors").write_bytes(b"partial")
    live = root / f"step-2.tmp-{os.getppid()}-0badc0de"  # a live process's save in progress
    live.mkdir()
    pool = make_pool(num_workers=1)
    pool.save({"s": torch.ones(1)}, root / "step-3").result(timeout=60)
    assert not dead.exists() and live.exists()
    assert sweep_temp_dirs(str(root)) == []


def test_leftovers_are_judged_by_process_identity_not_pid(tmp_path):
    """A pid alone lies: the kernel reuses it, after a reboot it names another process, and
    on another host sharing the file system it means nothing here. Temp dirs carry pid,
    start time, machine id and boot id: same boot, by pid and start time; this machine
    rebooted: dead; another machine: never judged from here (left alone)."""
    from zckpt._proc import process_identity
    root = tmp_path / "root"
    root.mkdir()
    pid, start, host = process_identity(os.getppid())        # a live process: the test runner's parent
    machine, boot = host[:8], host[8:]
    other = "f" * 8 if boot != "f" * 8 else "0" * 8
    live = root / f"a.tmp-{pid}-{start}-{host}-0badc0de"
    reused = root / f"b.tmp-{pid}-{start + 1}-{host}-0badc0de"     # same pid, another process
    rebooted = root / f"c.tmp-{pid}-{start}-{machine}{other}-0badc0de"
    condemned = root / "d.del-0badc0de"                            # retention's leftover
    elsewhere = root / f"e.tmp-1-1-{'9' * 8 if machine != '9' * 8 else '8' * 8}{boot}-0badc0de"
    huge = root / "f.tmp-99999999999999999999-0badc0de"           # no such pid (os.kill would overflow)
    for d in (live, reused, rebooted, condemned, elsewhere, huge):
        d.mkdir()
        (d / "x").write_bytes(b"partial")
    swept = sorted(os.path.basename(p) for p in sweep_temp_dirs(str(root)))
    assert swept == sorted([reused.name, rebooted.name, condemned.name, huge.name])
    assert live.exists() and elsewhere.exists()


def test_make_dirs_reports_what_it_created_top_down(tmp_path):
    from zckpt.commit import make_dirs
    (tmp_path / "a").mkdir()
    assert make_dirs(str(tmp_path / "a" / "b" / "c")) == [str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c")]
    assert make_dirs(str(tmp_path / "a" / "b" / "c")) == []


def test_retention_renames_before_it_deletes_and_condemned_dirs_are_never_checkpoints(tmp_path, monkeypatch):
    """A power loss mid-delete must leave the checkpoint whole or condemned (swept later),
    never a half-deleted directory under a checkpoint's name."""
    import shutil

    from zckpt import commit as C
    from zckpt.manifest import build_manifest
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        tmp = root / f"s{i}.tmp-1-0badc0de"
        tmp.mkdir()
        C.commit_dir(str(tmp), str(root / f"s{i}"), build_manifest(
            checksum="none", tree=None, metadata=None, torch_version=None, files=[], storages=[], tensors=[],
            created_unix=None), fsync=False)
    seen = []
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: seen.append(os.path.basename(p)))   # "crash" before delete
    removed = C.apply_retention(str(root), keep_last=1)
    assert [os.path.basename(p) for p in removed] == ["s0", "s1"]
    assert all(C._DEL_RE.search(n) for n in seen) and len(seen) == 2
    assert C.committed(str(root)) == [str(root / "s2")]          # the condemned ones are not checkpoints
    monkeypatch.undo()
    C.sweep_temp_dirs(str(root))
    assert sorted(os.listdir(root)) == ["s2"]
