"""The multi-rank examples, end to end, launched with torchrun as the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zckpt

pytestmark = pytest.mark.timeout(300)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def torchrun(nproc: int, script: str, *args: str) -> str:
    """Run ``torchrun --standalone`` (a free port) in its own process group; kill the group
    if it overruns. Returns stdout; fails the test with the output if it exits non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(EXAMPLES / script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    return out


def test_ddp_example_resumes_and_continues_exactly_as_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "resumed"), str(tmp_path / "straight")
    out = torchrun(2, "ddp_train.py", "--root", a, "--steps", "8", "--every", "4")
    assert "committed" in out and zckpt.latest(a) == os.path.join(a, "step-8")
    out = torchrun(2, "ddp_train.py", "--root", a, "--steps", "12", "--every", "4")
    assert "resumed from" in out and "state matches the checkpoint" in out, out
    torchrun(2, "ddp_train.py", "--root", b, "--steps", "12", "--every", "4")
    resumed, straight = zckpt.load(os.path.join(a, "step-12")), zckpt.load(os.path.join(b, "step-12"))
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert sorted(os.listdir(a)) == ["step-12", "step-8"]   # keep_last=2


def test_fsdp2_example_resumes_at_another_world_size(tmp_path):
    root = str(tmp_path / "run")
    torchrun(2, "fsdp2_train.py", "--root", root, "--steps", "8", "--every", "4")
    out = torchrun(1, "fsdp2_train.py", "--root", root, "--steps", "12", "--every", "4")
    assert "at world size 1: state matches the checkpoint" in out, out
    assert zckpt.latest(root) == os.path.join(root, "step-12")
    zckpt.verify(os.path.join(root, "step-12"))
