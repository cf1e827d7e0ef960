"""Faults x phases: what each failure raises, and that nothing committed is lost.

fault                          phase        expected
-----------------------------  -----------  ---------------------------------------------
init_fn raises                 init         WorkerInitError + remote traceback
writer factory raises          init         WorkerInitError + remote traceback
init_fn hangs                  init         TimeoutError, worker killed
worker os._exit in init        init         WorkerInitError naming the exit code
SIGKILL                        idle         replaced; next save works
SIGKILL                        writing      WorkerDiedError; no partial checkpoint; replaced
SIGSTOP                        writing      WorkerDiedError (silent); replaced
long write, heartbeats flow    writing      no false death
writer hangs past save timeout writing      TimeoutError; replaced
close() with a hung writer     shutdown     returns by its deadline; save fails
trainer SIGKILLed              any          workers exit, no shared memory left
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch

import zckpt
from zckpt import PoolConfig

from _writers import GateWriter, failing_init, slow_init
from conftest import children_of, pid_alive, wait_until

pytestmark = pytest.mark.timeout(120)

FAST = dict(fsync=False, heartbeat_interval_s=0.2, heartbeat_liveness=3, init_timeout_s=30.0)


def started(gate) -> int:
    return len([f for f in os.listdir(gate) if f.startswith("started")])


def test_init_fn_error_carries_remote_traceback():
    with pytest.raises(zckpt.WorkerInitError, match="init_fn.*ValueError: bad cuda device 7") as info:
        zckpt.CheckpointPool(num_workers=2, config=PoolConfig(**FAST), init_fn=failing_init,
                             init_args=("bad cuda device 7",))
    assert "failing_init" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, ValueError)


def test_writer_factory_error_carries_remote_traceback():
    def factory(**kwargs):
        raise RuntimeError(f"no storage credentials for {kwargs['bucket']}")

    with pytest.raises(zckpt.WorkerInitError, match="writer_factory.*no storage credentials for b1") as info:
        zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST), writer_factory=factory,
                             writer_kwargs={"bucket": "b1"})
    assert "in factory" in info.value.remote_traceback


def test_writer_without_write_file_is_an_init_error():
    with pytest.raises(zckpt.WorkerInitError, match="no write_file"):
        zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST), writer_factory=lambda: object())


def test_init_timeout_raises_and_kills_the_worker(tmp_path):
    cfg = PoolConfig(**{**FAST, "init_timeout_s": 1.0})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 1.0s"):
        zckpt.CheckpointPool(num_workers=1, config=cfg, init_fn=slow_init, init_args=(str(tmp_path / "never"),))
    assert time.monotonic() - t0 < 15  # the deadline held (generous: a shared machine)
    # no_leaks asserts the hung worker was killed and reaped


def test_worker_exiting_during_init_is_an_init_error():
    with pytest.raises(zckpt.WorkerInitError, match="exit code 13"):
        zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST), init_fn=lambda: os._exit(13))


def test_sigkill_idle_worker_is_replaced(make_pool, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST))
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in pool.worker_pids and len(pool.worker_pids) == 2, 20,
               "the killed worker to be replaced")
    assert pool.stats.worker_restarts == 1
    pool.save({"a": torch.ones(5), "b": torch.ones(5)}, tmp_path / "c").result(timeout=60)
    assert torch.equal(zckpt.load(tmp_path / "c")["a"], torch.ones(5))


def test_sigkill_while_writing_fails_the_save_and_keeps_old_checkpoints(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST, shard_retries=0), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    (gate / "open").touch()
    pool.save({"a": torch.ones(5), "b": torch.ones(5)}, tmp_path / "ck" / "good").result(timeout=60)
    (gate / "open").unlink()
    for f in gate.iterdir():
        f.unlink()
    fut = pool.save({"a": torch.zeros(5), "b": torch.zeros(5)}, tmp_path / "ck" / "doomed")
    wait_until(lambda: started(gate) == 2, 30, "both workers to start writing")
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(zckpt.WorkerDiedError) as info:
        fut.result(timeout=30)
    died = info.value
    assert (died.slot, died.generation, died.pid, died.exitcode) == (0, 0, victim, -signal.SIGKILL)
    assert died.job is not None and "doomed" in died.job
    assert 0 <= died.silent_s < 10
    (gate / "open").touch()  # let the surviving worker finish its shard
    wait_until(lambda: sorted(os.listdir(tmp_path / "ck")) == ["good"], 20,
               "the failed save's temp directory to be removed")
    assert zckpt.latest(tmp_path / "ck") == str(tmp_path / "ck" / "good")
    zckpt.verify(tmp_path / "ck" / "good")
    wait_until(lambda: len(pool.worker_pids) == 2 and victim not in pool.worker_pids, 20, "a replacement")
    pool.save({"a": torch.full((5,), 2.0), "b": torch.ones(5)}, tmp_path / "ck" / "after").result(timeout=60)
    assert torch.equal(zckpt.load(tmp_path / "ck" / "after")["a"], torch.full((5,), 2.0))


def test_sigstop_while_writing_is_declared_dead_within_three_intervals(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cfg = PoolConfig(**FAST, shard_retries=0)
    pool = make_pool(num_workers=1, config=cfg, writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    fut = pool.save({"a": torch.ones(5)}, tmp_path / "c")
    wait_until(lambda: started(gate) == 1, 30, "the worker to start writing")
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        with pytest.raises(zckpt.WorkerDiedError) as info:
            fut.result(timeout=30)
        detected_after = time.monotonic() - t_stop
    finally:
        if pid_alive(victim):
            os.kill(victim, signal.SIGCONT)
    # The error carries the silence the supervisor measured: it must be past the limit
    # and well within 3 intervals plus the poll cadence. It was killed for it: SIGKILL.
    died = info.value
    assert died.pid == victim and died.exitcode == -signal.SIGKILL and died.job is not None
    assert cfg.dead_after_s <= died.silent_s <= cfg.dead_after_s + cfg.heartbeat_interval_s + 0.5
    assert detected_after < 10  # generous bound for a loaded machine
    (gate / "open").touch()
    wait_until(lambda: len(pool.worker_pids) == 1 and victim not in pool.worker_pids, 20, "a replacement")
    pool.save({"a": torch.ones(5)}, tmp_path / "d").result(timeout=60)


def test_heartbeats_flow_during_a_long_write(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cfg = PoolConfig(**{**FAST, "heartbeat_interval_s": 0.1})  # dead after 0.3 s of silence
    pool = make_pool(num_workers=1, config=cfg, writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    fut = pool.save({"a": torch.ones(5)}, tmp_path / "c")
    wait_until(lambda: started(gate) == 1, 30, "the worker to start writing")
    # The write is held for 5x the dead-after limit: what is under test is the duration.
    assert not fut.done()
    deadline = time.monotonic() + 5 * cfg.dead_after_s
    while time.monotonic() < deadline:
        assert not fut.done(), "the save ended while its worker was only busy"
        time.sleep(0.05)
    (gate / "open").touch()
    fut.result(timeout=30)
    assert pool.stats.worker_restarts == 0


def test_hung_writer_hits_save_timeout_and_is_replaced(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cfg = PoolConfig(**{**FAST, "save_timeout_s": 1.0})
    pool = make_pool(num_workers=1, config=cfg, writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    fut = pool.save({"a": torch.ones(5)}, tmp_path / "c")
    with pytest.raises(zckpt.WorkerDiedError, match="save_timeout_s") as info:
        fut.result(timeout=30)
    assert info.value.slot == 0 and info.value.generation == 0 and info.value.silent_s < cfg.dead_after_s
    wait_until(lambda: pool.stats.worker_restarts == 1 and len(pool.worker_pids) == 1, 20, "a replacement")
    (gate / "open").touch()
    pool.save({"a": torch.ones(5)}, tmp_path / "d").result(timeout=60)
    assert not os.path.exists(tmp_path / "c")


def test_close_is_bounded_when_a_write_hangs(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST), writer_factory=GateWriter,
                                writer_kwargs={"gate_dir": str(gate)})
    try:
        fut = pool.save({"a": torch.ones(5)}, tmp_path / "c")
        wait_until(lambda: started(gate) == 1, 30, "the worker to start writing")
        t0 = time.monotonic()
        pool.close(timeout_s=1.0)
        assert time.monotonic() - t0 < 15
    finally:
        pool.kill()
    with pytest.raises(zckpt.ZckptError):
        fut.result(timeout=5)
    assert not os.path.exists(tmp_path / "c")


TRAINER = textwrap.dedent("""
    import sys, time, torch, zckpt
    pool = zckpt.CheckpointPool(num_workers=2, config=zckpt.PoolConfig(fsync=False))
    fut = pool.save({"w": torch.randn(1000)}, sys.argv[1])
    fut.result(timeout=60)
    print(" ".join(map(str, pool.worker_pids)), flush=True)
    while True:          # a training loop that never ends: the test kills us
        time.sleep(0.1)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_exit_when_the_trainer_dies(tmp_path, sig):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    trainer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck")], stdout=subprocess.PIPE,
                               env=env, text=True)
    try:
        line = trainer.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and set(pids) <= children_of(trainer.pid)
        trainer.send_signal(sig)
        trainer.wait(timeout=30)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the orphaned workers to exit")
    finally:
        trainer.kill()
        trainer.wait(timeout=30)
    zckpt.verify(tmp_path / "ck")  # what was committed before the crash is intact
    assert not [n for n in os.listdir("/dev/shm") if "zckpt" in n or str(trainer.pid) in n]
    # The trainer could not remove its socket directory; its orphaned workers did.
    wait_until(lambda: not glob.glob(os.path.join(tempfile.gettempdir(), f"zckpt-{trainer.pid}-*")), 10,
               "the dead trainer's socket directory to be removed")


SILENT_TRAINER = textwrap.dedent("""
    import sys, time, torch, zckpt
    cfg = zckpt.PoolConfig(fsync=False, orphan_timeout_s=1.0, heartbeat_interval_s=0.2)
    pool = zckpt.CheckpointPool(num_workers=2, config=cfg)
    print(" ".join(map(str, pool.worker_pids)), flush=True)
    while True:
        time.sleep(0.1)
""")


def test_workers_exit_when_a_live_trainer_goes_silent(tmp_path):
    # The third liveness layer: the parent is alive (no death signal, same ppid) but
    # stopped, so its heartbeats stop; workers give up after orphan_timeout_s.
    script = tmp_path / "trainer.py"
    script.write_text(SILENT_TRAINER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) == 2
        trainer.send_signal(signal.SIGSTOP)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "workers of a silent trainer to exit")
        trainer.send_signal(signal.SIGCONT)
    finally:
        trainer.kill()
        trainer.wait(timeout=30)
    # Killed with no worker left to clean up after it: the next pool's sweep does.
    from zckpt._proc import sweep_stale_ipc_dirs
    sweep_stale_ipc_dirs(tempfile.gettempdir())
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"zckpt-{trainer.pid}-*"))


def test_workers_ignore_ctrl_c(make_pool, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST))
    pids = pool.worker_pids
    for pid in pids:
        os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole group
    pool.save({"a": torch.ones(3), "b": torch.ones(3)}, tmp_path / "c").result(timeout=60)
    assert pool.worker_pids == pids and pool.stats.worker_restarts == 0


def test_stale_socket_directories_are_swept(tmp_path):
    stale = os.path.join(tempfile.gettempdir(), "zckpt-999999-stale")
    os.makedirs(stale, exist_ok=True)
    pool = zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST))
    pool.close()
    assert not os.path.exists(stale)


def test_deaths_seen_before_the_kill_command_are_kills_not_crashes(make_pool, tmp_path):
    """Was: kill() signalled the workers before telling the supervisor, which could see the
    deaths first and take them for crashes: the save in flight failed with WorkerDiedError
    and replacements were spawned during the kill (1 kill() in 5 under load). Here the
    supervisor is told (as kill_now does, first) and the signal lands before any command."""
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    fut = pool.save({"a": torch.ones(8)}, tmp_path / "c")
    wait_until(lambda: glob.glob(str(gate / "started-*")), 30, "the gated write")
    pool._supervisor._kill_requested.set()
    os.kill(pool.worker_pids[0], signal.SIGKILL)
    with pytest.raises(zckpt.PoolClosedError, match="killed"):
        fut.result(timeout=30)
    assert pool.stats.worker_restarts == 0
    pool.kill()


def test_a_worker_killed_mid_write_costs_a_retry_not_the_save(make_pool, tmp_path):
    """shard_retries (default 1): the shard goes to the replacement worker, which writes it
    again from the same snapshot in shared memory; the save commits and loads bit-exactly."""
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    sd = {"a": torch.arange(4096.0), "b": torch.ones(1000, dtype=torch.bfloat16)}
    fut = pool.save(sd, tmp_path / "c")
    wait_until(lambda: started(gate) == 2, 30, "both workers to start writing")
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: started(gate) == 3, 30, "the replacement to start the shard again")
    (gate / "open").touch()
    assert fut.result(timeout=60) == str(tmp_path / "c")
    assert fut.timings["shard_retries"] == 1.0
    back = zckpt.load(tmp_path / "c")
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])
    assert pool.stats.worker_restarts == 1 and victim not in pool.worker_pids


def test_a_shard_that_fails_on_every_attempt_fails_the_save_once_retries_run_out(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST, shard_retries=2), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    fut = pool.save({"a": torch.ones(8)}, tmp_path / "c")
    for attempt in range(3):     # the first worker and two replacements each die mid-write
        wait_until(lambda n=attempt: started(gate) == n + 1, 30, f"attempt {attempt + 1} to start")
        os.kill(pool.worker_pids[0], signal.SIGKILL)
    with pytest.raises(zckpt.WorkerDiedError) as info:
        fut.result(timeout=60)
    assert info.value.generation == 2 and not (tmp_path / "c").exists()
    (gate / "open").touch()
    assert pool.save({"a": torch.ones(8)}, tmp_path / "d").result(timeout=60)


def test_a_transient_writer_error_is_retried_with_backoff(make_pool, tmp_path):
    from _writers import FlakyWriter
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST), writer_factory=FlakyWriter, writer_kwargs={"fail": 2})
    sd = {"a": torch.arange(100.0)}
    fut = pool.save(sd, tmp_path / "c")
    assert fut.result(timeout=60) == str(tmp_path / "c")
    assert fut.timings["write_retries"] == 2.0
    assert torch.equal(zckpt.load(tmp_path / "c")["a"], sd["a"])   # the partial files were replaced


def test_a_transient_error_that_persists_fails_the_save_once_retries_run_out(make_pool, tmp_path):
    from _writers import FlakyWriter
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST, transient_retries=1), writer_factory=FlakyWriter,
                     writer_kwargs={"fail": 5})
    with pytest.raises(zckpt.TransientWriteError, match="throttled"):
        pool.save({"a": torch.ones(4)}, tmp_path / "c").result(timeout=60)
    assert not (tmp_path / "c").exists()


# --- overload and memory: on_busy, max_pending, staging_budget_bytes ------------------------------
def _held_save(make_pool, tmp_path, **cfg):
    """A pool whose first save is held mid-write (its staging buffer stays busy)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST, **cfg), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    first = pool.save({"a": torch.ones(1000)}, tmp_path / "first")
    wait_until(lambda: started(gate) == 1, 30, "the first save to start writing")
    return pool, first, gate


def test_on_busy_skip_drops_the_save_at_once_and_says_so(make_pool, tmp_path):
    pool, first, gate = _held_save(make_pool, tmp_path, on_busy="skip")
    fut = pool.save({"a": torch.zeros(1000)}, tmp_path / "second")
    assert fut.staged.done()
    with pytest.raises(zckpt.SaveSkippedError, match="staging buffer"):
        fut.result(timeout=1)
    assert pool.stats.saves_skipped == 1 and not (tmp_path / "second").exists()
    (gate / "open").touch()
    assert first.result(timeout=60) == str(tmp_path / "first")
    assert pool.save({"a": torch.zeros(1000)}, tmp_path / "third").result(timeout=60)


def test_on_busy_raise_refuses_at_once(make_pool, tmp_path):
    pool, first, gate = _held_save(make_pool, tmp_path, on_busy="raise")
    t0 = time.monotonic()
    with pytest.raises(zckpt.PoolBusyError, match="staging buffer"):
        pool.save({"a": torch.zeros(1000)}, tmp_path / "second")
    assert time.monotonic() - t0 < 5
    st = pool.stats
    assert (st.saves_refused, st.saves_started) == (1, 1)    # a refused save never started
    (gate / "open").touch()
    assert first.result(timeout=60)


def test_max_pending_counts_saves_in_flight_even_with_free_buffers(make_pool, tmp_path):
    pool, first, gate = _held_save(make_pool, tmp_path, on_busy="raise", staging_buffers=2, max_pending=1)
    with pytest.raises(zckpt.PoolBusyError, match="max_pending=1"):
        pool.save({"a": torch.zeros(1000)}, tmp_path / "second")
    (gate / "open").touch()
    assert first.result(timeout=60)


def test_the_staging_arena_never_exceeds_its_budget(make_pool, tmp_path):
    budget = 6 << 20
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST, staging_budget_bytes=budget))
    with pytest.raises(zckpt.StagingBudgetError, match="over staging_budget_bytes"):
        pool.save({"a": torch.ones(2 << 20), "b": torch.ones(2 << 20)}, tmp_path / "big")   # 16 MiB
    assert not (tmp_path / "big").exists()
    for i in range(3):
        pool.save({"a": torch.ones(256 << 10) * i, "b": torch.ones(256 << 10)}, tmp_path / f"s{i}").result(timeout=60)
    assert 0 < pool.stats.arena_nbytes <= budget
    assert torch.equal(zckpt.load(tmp_path / "s2")["a"], torch.ones(256 << 10) * 2)


def test_threads_staging_at_once_never_take_the_arena_past_its_budget(make_pool, tmp_path):
    """Found by review: the budget was checked, then allocated outside the lock, so two
    threads could both pass the check (516 MiB held under a 300 MiB budget)."""
    import threading
    budget = 24 << 20
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST, staging_buffers=2, staging_budget_bytes=budget))
    results: list[object] = []
    barrier = threading.Barrier(2)

    def save(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            results.append(pool.save({"a": torch.ones(4 << 20) * i}, tmp_path / f"s{i}").result(timeout=60))
        except zckpt.StagingBudgetError as exc:
            results.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and pool.stats.arena_nbytes <= budget
    assert sum(isinstance(r, zckpt.StagingBudgetError) for r in results) == 1, results


def test_a_budget_for_one_copy_with_two_buffer_sets_waits_instead_of_failing(make_pool, tmp_path):
    """Found by a new user: with staging_buffers=2 and a budget that holds one copy, a save
    overlapping the previous one failed with StagingBudgetError although its state fit. It
    now waits (on_busy="wait") for the set that fits instead of growing the other one."""
    gate = tmp_path / "gate"
    gate.mkdir()
    state_bytes = 8 << 20
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST, staging_buffers=2, staging_budget_bytes=12 << 20),
                     writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    first = pool.save({"a": torch.ones(state_bytes // 4)}, tmp_path / "s0")
    wait_until(lambda: started(gate) == 1, 30, "the first save to start writing")
    opener = threading.Timer(0.5, (gate / "open").touch)   # the first write finishes meanwhile
    opener.start()
    try:
        second = pool.save({"a": torch.ones(state_bytes // 4) * 2}, tmp_path / "s1")   # waits for set 0
    finally:
        opener.join()
    assert first.result(timeout=60) and second.result(timeout=60)
    assert pool.stats.arena_nbytes <= 12 << 20 and pool.stats.saves_failed == 0
    assert torch.equal(zckpt.load(tmp_path / "s1")["a"], torch.ones(state_bytes // 4) * 2)


def test_a_state_dict_larger_than_the_budget_is_saved_in_rounds(make_pool, tmp_path):
    """over_budget="rounds": stage a part, write it, stage the next; one commit; the arena
    never exceeds the budget; the checkpoint is whole and loads bit-exactly."""
    budget = 8 << 20
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST, staging_budget_bytes=budget, over_budget="rounds"))
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(1 << 20, generator=g) for i in range(6)}      # 24 MiB of fp32 in 6 tensors
    sd["big"] = torch.randn(5 << 20, generator=g)                              # 20 MiB: cut across rounds
    sd["step"] = 7
    fut = pool.save(sd, tmp_path / "c")
    assert fut.staged.done()
    assert fut.result(timeout=120) == str(tmp_path / "c")
    assert fut.timings["rounds"] >= 6
    assert pool.stats.arena_nbytes <= budget
    back = zckpt.load(tmp_path / "c")
    assert back["step"] == 7 and all(torch.equal(back[k], v) for k, v in sd.items() if k != "step")
    zckpt.verify(tmp_path / "c")
    refuse = make_pool(num_workers=1, config=PoolConfig(**FAST, staging_budget_bytes=budget))
    with pytest.raises(zckpt.StagingBudgetError):
        refuse.save(sd, tmp_path / "d")


def test_rounds_after_a_smaller_save_and_with_a_tiny_share_and_an_early_round_failure(make_pool, tmp_path):
    """Found by review of rounds: (1) a set grown after a smaller save broke the budget
    mid-save (the old segment counted until replaced); (2) a share too small for one
    2 MiB segment per worker was refused though one per round fits; (3) a failure while
    an earlier round was written came out of save() instead of the future."""
    budget = 8 << 20
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST, staging_budget_bytes=budget, over_budget="rounds"))
    pool.save({"a": torch.ones(1000)}, tmp_path / "small").result(timeout=60)
    sd = {f"t{i}": torch.arange(1 << 20, dtype=torch.float32) + i for i in range(6)}
    assert pool.save(sd, tmp_path / "big").result(timeout=120)
    assert pool.stats.arena_nbytes <= budget
    assert all(torch.equal(zckpt.load(tmp_path / "big")[k], v) for k, v in sd.items())
    tiny = make_pool(num_workers=3, config=PoolConfig(**FAST, staging_budget_bytes=4 << 20, over_budget="rounds"))
    assert tiny.save({"x": torch.arange(1.5 * (1 << 20))}, tmp_path / "tiny").result(timeout=120)
    assert torch.equal(zckpt.load(tmp_path / "tiny")["x"], torch.arange(1.5 * (1 << 20)))
    from _writers import FailingWriter
    failing = make_pool(num_workers=1, config=PoolConfig(**FAST, staging_budget_bytes=budget, over_budget="rounds"),
                        writer_factory=FailingWriter)
    fut = failing.save(sd, tmp_path / "fails")          # round 0 fails: the future says so, save() does not raise
    with pytest.raises(OSError, match="simulated disk full"):
        fut.result(timeout=60)
    assert not (tmp_path / "fails").exists()
    wait_until(lambda: not [n for n in os.listdir(tmp_path) if ".tmp-" in n], 30, "the temp dir to be discarded")
