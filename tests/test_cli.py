"""The zckpt command line, run as a user would: a subprocess of the console entry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.timeout(120)


def zckpt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zckpt.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def ckpt(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    pool.save({"enc": {"w": torch.randn(40, 30)}, "head": torch.zeros(7, dtype=torch.bfloat16), "step": 3},
              tmp_path / "root" / "step-3", metadata={"run": "r1"}).result(timeout=60)
    return tmp_path / "root" / "step-3"


def test_inspect_lists_tensors_files_and_workers(ckpt):
    out = zckpt_cli("inspect", str(ckpt))
    assert out.returncode == 0, out.stderr
    assert "enc.w" in out.stdout and "float32" in out.stdout and "40x30" in out.stdout
    assert "head" in out.stdout and "bfloat16" in out.stdout
    assert "shard-00000-of-00002.safetensors" in out.stdout and "worker 1" in out.stdout
    assert "{'run': 'r1'}" in out.stdout


def test_verify_exit_codes(ckpt):
    good = zckpt_cli("verify", str(ckpt))
    assert good.returncode == 0 and good.stdout.startswith("OK")
    shard = ckpt / "shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = zckpt_cli("verify", str(ckpt))
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr and shard.name in bad.stderr


def test_latest(ckpt, tmp_path):
    (tmp_path / "root" / "step-4.tmp-999999-00000000").mkdir()
    out = zckpt_cli("latest", str(tmp_path / "root"))
    assert out.returncode == 0 and out.stdout.strip() == str(ckpt)
    empty = zckpt_cli("latest", str(tmp_path / "nothing"))
    assert empty.returncode == 1 and "no committed checkpoint" in empty.stderr


def test_inspect_of_a_non_checkpoint_fails_cleanly(tmp_path):
    out = zckpt_cli("inspect", str(tmp_path))
    assert out.returncode == 1 and "not a committed zckpt checkpoint" in out.stderr
    assert os.listdir(tmp_path) == []
