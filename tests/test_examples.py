"""The multi-rank examples, end to end, launched with torchrun as the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def test_preemption_recipe_commits_an_emergency_checkpoint_after_sigterm_to_the_group(tmp_path):
    """SIGTERM to the whole process group, as SLURM and Kubernetes send it: the trainer
    commits its current state within the grace period and exits 0; the workers, which got
    the signal too, ignore it until the trainer is done with them."""
    import select
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "preemption.py"), "--root", str(root), "--size-mb", "8",
                             "--every", "5", "--grace-s", "20"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.txt", "w"), text=True,
                            start_new_session=True)   # stderr apart: torch may warn there first (no numpy)
    try:
        first = proc.stdout.readline() if select.select([proc.stdout], [], [], 60)[0] else ""
        assert first.startswith("training"), (first, (tmp_path / "stderr.txt").read_text()[-2000:])
        deadline = time.monotonic() + 60
        while zckpt.latest(root) is None:   # a regular checkpoint exists: training is under way
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, (out, (tmp_path / "stderr.txt").read_text()[-2000:])
    line = next(x for x in out.splitlines() if x.startswith("emergency checkpoint"))
    path = line.split()[2]
    step = int(line.split("(step ")[1].split(")")[0])
    assert zckpt.latest(root) == path
    assert zckpt.load(path)["step"] == step
    assert float(line.split("committed ")[1].split("s after")[0]) < 20
