"""Stall detection: a write job that reports no progress for stall_timeout_s is hung."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import zckpt
from zckpt import PoolConfig

from _stall_writers import HalfThenGateWriter, TricklingWriter
from conftest import wait_until

pytestmark = pytest.mark.timeout(120)

FAST = dict(fsync=False, heartbeat_interval_s=0.1, heartbeat_liveness=3, init_timeout_s=30.0)


def test_a_stalled_write_fails_naming_file_and_bytes_and_is_replaced(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cfg = PoolConfig(**FAST, stall_timeout_s=1.0, shard_retries=0)
    pool = make_pool(num_workers=1, config=cfg, writer_factory=HalfThenGateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    victim = pool.worker_pids[0]
    fut = pool.save({"a": torch.ones(1000)}, tmp_path / "c")
    with pytest.raises(zckpt.WorkerDiedError, match="no progress") as info:
        fut.result(timeout=30)
    died = info.value
    assert died.pid == victim and died.exitcode == -signal.SIGKILL
    assert died.job is not None and "shard-" in died.job and str(tmp_path / "c") in died.job
    written = int(str(died).split(" bytes written")[0].rsplit(" ", 1)[1])
    assert written > 0  # the half the writer reported
    assert died.silent_s < cfg.dead_after_s  # its heartbeats flowed: hung, not silent
    wait_until(lambda: pool.stats.worker_restarts == 1 and len(pool.worker_pids) == 1, 20, "a replacement")
    (gate / "open").touch()
    pool.save({"a": torch.ones(4)}, tmp_path / "d").result(timeout=60)
    assert not os.path.exists(tmp_path / "c")


def test_a_slow_write_that_progresses_is_not_a_stall(make_pool, tmp_path):
    cfg = PoolConfig(**FAST, stall_timeout_s=0.5, transient_retries=2)
    pool = make_pool(num_workers=1, config=cfg, writer_factory=TricklingWriter,
                     writer_kwargs={"total_s": 2.0, "tick_s": 0.05})  # 4x the stall limit
    pool.save({"a": torch.ones(4)}, tmp_path / "c").result(timeout=60)
    assert pool.stats.worker_restarts == 0
