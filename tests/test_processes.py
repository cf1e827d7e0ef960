"""Every way a pool meets more than one process or thread, and its defined outcome.

meeting                                        outcome
---------------------------------------------  ----------------------------------------------
SIGTERM to the process group (preemption)      workers ignore it while the trainer lives;
                                               the save in flight and one more commit
save()/reserve() re-entered on the same        ReentrantSaveError at once (no wait for the
thread (signal handler, callback)              buffer its own thread holds); the outer save
                                               commits
a handler reads stats/state while the          no deadlock (re-entrant locks)
interrupted code holds the pool's locks
close() from a handler inside save()           returns without waiting for that save
save/close/kill from a SaveFuture callback     ReentrantSaveError (the pool's own thread)
(the pool's own thread)
fork                                           the child's calls raise PoolClosedError naming
                                               the owner, or do nothing; the parent's pool
                                               is untouched
threads saving concurrently                    all commit, each with its own data
interpreter exit with the pool unclosed        bounded; in-flight saves drain and commit;
                                               no workers or socket directory left
TMPDIR too long for an ipc path                OSError naming TMPDIR; no fd or directory left
"""

from __future__ import annotations

import glob
import json
import os
import select
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
import zckpt.pool as pool_module
from zckpt import PoolConfig

from _writers import GateWriter
from conftest import pid_alive, wait_until

pytestmark = pytest.mark.timeout(120)

FAST = dict(fsync=False, heartbeat_interval_s=0.2, heartbeat_liveness=3, init_timeout_s=30.0)


def started(gate) -> int:
    return len([f for f in os.listdir(gate) if f.startswith("started")])


def signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` is still pending for ``pid`` (not yet taken by any of its threads)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    except FileNotFoundError:  # exited (and reaped): nothing is pending
        return False
    return any(m & (1 << (sig - 1)) for m in masks)


# --- 1. preemption: SIGTERM to the whole process group ------------------------------------
def test_sigterm_to_workers_is_ignored_while_the_trainer_lives(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=2, config=PoolConfig(**FAST), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    pids = pool.worker_pids
    fut = pool.save({"a": torch.ones(1000), "b": torch.full((1000,), 2.0)}, tmp_path / "in-flight")
    wait_until(lambda: started(gate) == 2, 30, "both workers to start writing")
    for pid in pids:  # what SLURM's preemption sends the whole process group (never ours here)
        os.kill(pid, signal.SIGTERM)
    # Taken by the workers (their handler runs before the gated write can go on).
    wait_until(lambda: not any(signal_pending(p, signal.SIGTERM) for p in pids), 10, "the workers to take SIGTERM")
    (gate / "open").touch()
    assert fut.result(timeout=60) == str(tmp_path / "in-flight")
    # The trainer's preemption handler saves once more.
    emergency = pool.save({"a": torch.full((1000,), 3.0), "b": torch.ones(1000)}, tmp_path / "emergency")
    assert emergency.result(timeout=60) == str(tmp_path / "emergency")
    assert pool.worker_pids == pids and pool.stats.worker_restarts == 0
    assert zckpt.load(tmp_path / "in-flight")["b"][0].item() == 2.0
    assert zckpt.load(tmp_path / "emergency")["a"][0].item() == 3.0


# --- 2. re-entrancy -----------------------------------------------------------------------
@pytest.mark.parametrize("nested", ["save", "reserve"])
def test_a_nested_call_inside_save_raises_at_once(make_pool, tmp_path, monkeypatch, nested):
    # One staging buffer (the default): the nested call would wait for the buffer the
    # outer save holds on this very thread. save_timeout_s bounds that wait if the
    # guard were missing, so a regression fails in seconds, not an hour.
    pool = make_pool(config=PoolConfig(**FAST, num_workers=1, save_timeout_s=5.0))
    real_stage = pool_module.stage_files
    seen: dict = {}

    def stage_with_a_nested_call(plan, bufset, sources, **kwargs):
        t0 = time.monotonic()
        try:
            if nested == "save":
                pool.save({"x": torch.ones(2)}, tmp_path / "nested")
            else:
                pool.reserve({"x": torch.ones(2)}, timeout_s=5.0)
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            seen["exc"] = exc
        seen["elapsed"] = time.monotonic() - t0
        return real_stage(plan, bufset, sources, **kwargs)

    monkeypatch.setattr(pool_module, "stage_files", stage_with_a_nested_call)
    fut = pool.save({"a": torch.ones(8)}, tmp_path / "outer")
    assert isinstance(seen.get("exc"), zckpt.ReentrantSaveError), seen
    assert isinstance(seen["exc"], RuntimeError) and isinstance(seen["exc"], zckpt.ZckptError)
    assert seen["elapsed"] < 1.0
    message = str(seen["exc"])
    assert f"pool.{nested}()" in message and "inside pool.save()" in message
    assert "signal handler" in message and "set a flag" in message.lower()
    assert fut.result(timeout=60) == str(tmp_path / "outer")
    assert not os.path.exists(tmp_path / "nested")
    monkeypatch.undo()
    # The depth is back to zero: the thread saves again.
    pool.save({"a": torch.ones(8)}, tmp_path / "after").result(timeout=60)


def test_save_from_a_signal_handler_inside_save_raises_at_once(make_pool, tmp_path, monkeypatch):
    pool = make_pool(config=PoolConfig(**FAST, num_workers=1, save_timeout_s=5.0))
    real_stage = pool_module.stage_files
    seen: dict = {}

    def handler(signum, frame):
        t0 = time.monotonic()
        try:
            pool.save({"x": torch.ones(2)}, tmp_path / "emergency")
        except BaseException as exc:  # noqa: BLE001 - a handler must not raise into the save
            seen["exc"] = exc
        seen["elapsed"] = time.monotonic() - t0

    def stage_and_get_signalled(plan, bufset, sources, **kwargs):
        # os.kill to ourselves runs the Python handler before it returns, on this thread.
        os.kill(os.getpid(), signal.SIGUSR2)
        seen["handler_ran_inside_staging"] = "elapsed" in seen
        return real_stage(plan, bufset, sources, **kwargs)

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        monkeypatch.setattr(pool_module, "stage_files", stage_and_get_signalled)
        fut = pool.save({"a": torch.ones(8)}, tmp_path / "outer")
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert seen.get("handler_ran_inside_staging"), seen
    assert isinstance(seen.get("exc"), zckpt.ReentrantSaveError), seen
    assert seen["elapsed"] < 1.0
    assert fut.result(timeout=60) == str(tmp_path / "outer")
    assert not os.path.exists(tmp_path / "emergency")


@pytest.mark.timeout(30)  # a deadlock (a non-re-entrant lock) fails here, by pytest-timeout
def test_a_handler_reads_stats_and_state_while_the_interrupted_code_holds_the_locks(make_pool):
    pool = make_pool(num_workers=1)
    seen: dict = {}

    def handler(signum, frame):
        seen["state"], seen["stats"] = pool.state, pool.stats

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        with pool._lock, pool._arena._cond:  # where save() or reserve() may be interrupted
            os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert seen["state"] is zckpt.PoolState.READY
    assert seen["stats"].saves_started == 0


def test_close_from_a_handler_inside_save_does_not_wait_for_that_save(make_pool, tmp_path):
    # The save is registered (close() would wait for it) but not yet handed to the
    # workers, and cannot be until the handler returns.
    pool = make_pool(config=PoolConfig(**FAST, num_workers=1, shutdown_timeout_s=20.0))
    real_dispatch = pool._dispatch
    seen: dict = {}

    def close_then_dispatch(save, tasks, writer_kwargs):
        t0 = time.monotonic()
        pool.close()
        seen["close_s"] = time.monotonic() - t0
        real_dispatch(save, tasks, writer_kwargs)

    pool._dispatch = close_then_dispatch
    fut = pool.save({"a": torch.ones(8)}, tmp_path / "c")
    assert seen["close_s"] < 5.0
    with pytest.raises(zckpt.PoolClosedError, match="shut down"):
        fut.result(timeout=10)
    assert pool.state is zckpt.PoolState.CLOSED
    assert os.listdir(tmp_path) == []  # no checkpoint, no temp dir


def test_pool_calls_from_a_save_callback_are_refused(make_pool, tmp_path):
    # SaveFuture callbacks run on the pool's supervisor thread: close() there would wait
    # for (and join) that thread itself, save() for a buffer only it can release.
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=1, config=PoolConfig(**FAST, shutdown_timeout_s=5.0), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    seen: dict = {}
    done = threading.Event()

    def callback(f):
        seen["thread"] = threading.current_thread().name
        calls = {"save": lambda: pool.save({"x": torch.ones(2)}, tmp_path / "from-callback"),
                 "close": pool.close, "kill": pool.kill}
        for name, call in calls.items():
            t0 = time.monotonic()
            try:
                call()
                seen[name] = None
            except BaseException as exc:  # noqa: BLE001
                seen[name] = exc
            seen[name + "_s"] = time.monotonic() - t0
        done.set()

    fut = pool.save({"a": torch.ones(8)}, tmp_path / "c")
    fut.add_done_callback(callback)  # before the gate opens: it runs where the save completes
    (gate / "open").touch()
    assert done.wait(60)
    assert seen["thread"] == "zckpt-supervisor"
    for name in ("save", "close", "kill"):
        assert isinstance(seen[name], zckpt.ReentrantSaveError), (name, seen[name])
        assert "own thread" in str(seen[name]) and seen[name + "_s"] < 1.0
    assert fut.result(timeout=10) == str(tmp_path / "c")
    pool.save({"a": torch.ones(8)}, tmp_path / "d").result(timeout=60)
    assert not os.path.exists(tmp_path / "from-callback")


# --- 3. fork --------------------------------------------------------------------------------
def _child_report(pool, tmp_path) -> dict:
    """In the forked child: try every call, record what each did (no torch here: a fork
    of a process that ran torch's thread pools must not use them)."""
    calls = {
        "save": lambda: pool.save({"x": 1}, str(tmp_path / "from-child")),
        "reserve": lambda: pool.reserve({"x": 1}),
        "stats": lambda: pool.stats.saves_committed,
        "kill": pool.kill,  # before close(): a close() that ran would make kill() return early
        "close": pool.close,
        "finalize": pool._engine._finalizer,  # what garbage collection or interpreter exit runs
        "del": pool.__del__,
    }
    out = {}
    for name, call in calls.items():
        t0 = time.monotonic()
        try:
            out[name] = ["ok", repr(call())]
        except BaseException as exc:  # noqa: BLE001
            out[name] = [type(exc).__name__, str(exc)]
        out[name].append(time.monotonic() - t0)
    return out


def test_a_forked_child_cannot_use_or_harm_the_pool(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    pool.save({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "before").result(timeout=60)
    pids = pool.worker_pids
    ipc_dir = os.path.dirname(pool._supervisor.endpoint[len("ipc://"):])
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(r)
            os.write(w, json.dumps(_child_report(pool, tmp_path)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready, "the forked child did not report within 30s"
        chunks = []
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(child, 0)
        child = 0
    finally:
        os.close(r)
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out = json.loads(b"".join(chunks))
    for name in ("save", "reserve"):
        kind, message, elapsed = out[name]
        assert kind == "PoolClosedError", out[name]
        assert f"belongs to process {os.getpid()}" in message and elapsed < 1.0
    for name in ("close", "kill", "finalize", "del", "stats"):
        assert out[name][0] == "ok", (name, out[name])
    # The parent's pool is untouched: same workers, socket, files; it still saves.
    assert pool.worker_pids == pids and all(pid_alive(p) for p in pids)
    assert os.path.exists(os.path.join(ipc_dir, "ctl"))
    assert sorted(os.listdir(tmp_path)) == ["before"]
    pool.save({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "after").result(timeout=60)
    assert pool.worker_pids == pids and pool.stats.worker_restarts == 0


# --- threads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("buffers", [1, 2])
def test_threads_saving_concurrently_each_commit_their_own_data(make_pool, tmp_path, buffers):
    pool = make_pool(config=PoolConfig(**FAST, num_workers=2, staging_buffers=buffers))
    n_threads, n_saves = 4, 3
    barrier = threading.Barrier(n_threads)
    results: dict = {}
    errors: list = []

    def run(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            futs = []
            for i in range(n_saves):
                sd = {"w": torch.full((128, 128), float(10 * t + i)), "v": torch.arange(5000) * (t + 1) + i,
                      "tag": (t, i)}
                futs.append((i, sd, pool.save(sd, tmp_path / f"t{t}-s{i}")))
            for i, sd, fut in futs:
                results[(t, i)] = (sd, fut.result(timeout=60))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=90)
    assert not any(th.is_alive() for th in threads), "a saving thread hung"
    assert not errors, errors
    assert len(results) == n_threads * n_saves
    for (t, i), (sd, path) in results.items():
        assert path == str(tmp_path / f"t{t}-s{i}")
        back = zckpt.load(path)
        assert back["tag"] == (t, i)
        assert torch.equal(back["w"], sd["w"]) and torch.equal(back["v"], sd["v"]), (t, i)
    assert pool.stats.saves_committed == n_threads * n_saves


# --- interpreter exit -------------------------------------------------------------------------
EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch, zckpt
    from _writers import GateWriter
    root, gate, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    open(gate + "/open", "w").close() if mode == "idle" else None
    pool = zckpt.CheckpointPool(num_workers=2, config=zckpt.PoolConfig(fsync=False),
                                writer_factory=GateWriter, writer_kwargs={"gate_dir": gate})
    if mode == "idle":
        pool.save({"w": torch.ones(1000), "step": 1}, root + "/committed").result(timeout=60)
    else:  # a save still being written when the interpreter exits
        pool.save({"w": torch.full((1000,), 2.0), "step": 2}, root + "/in-flight")
    print(" ".join(map(str, pool.worker_pids)), flush=True)
    # exits without close(): the pool's finalizer runs at interpreter exit
""")


@pytest.mark.parametrize("mode", ["idle", "in-flight"])
def test_interpreter_exit_with_an_unclosed_pool(tmp_path, mode):
    script = tmp_path / "trainer.py"
    script.write_text(EXIT_SCRIPT)
    root, gate = tmp_path / "ck", tmp_path / "gate"
    root.mkdir()
    gate.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with open(tmp_path / "stderr.txt", "w") as err:
        trainer = subprocess.Popen([sys.executable, str(script), str(root), str(gate), mode],
                                   stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
        assert len(pids) == 2
        if mode == "in-flight":
            wait_until(lambda: started(gate) >= 1, 30, "the in-flight save to start writing")
            (gate / "open").touch()
        t0 = time.monotonic()
        assert trainer.wait(timeout=30) == 0
        exit_s = time.monotonic() - t0
    finally:
        trainer.kill()
        trainer.wait(timeout=30)
    assert exit_s < 15
    # Stopped and reaped by the exiting trainer itself, not left to the parent-death signal.
    assert not [p for p in pids if pid_alive(p)]
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "worker exits" not in stderr, stderr
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"zckpt-{trainer.pid}-*"))
    name = "committed" if mode == "idle" else "in-flight"
    assert os.listdir(root) == [name]  # and no temp dir
    zckpt.verify(root / name)
    assert zckpt.load(root / name)["step"] == (1 if mode == "idle" else 2)


# --- 4. socket path too long ------------------------------------------------------------------
def test_a_too_long_tmpdir_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_dir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    assert tempfile.gettempdir() == str(long_dir)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="TMPDIR") as info:
        zckpt.CheckpointPool(num_workers=1, config=PoolConfig(**FAST))
    assert str(long_dir) in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert os.listdir(long_dir) == []


# --- 5. an unclosed pool collected on its own supervisor thread; Ctrl-C during start-up -------
def test_a_pool_collected_on_its_supervisor_thread_still_frees_its_arena(tmp_path):
    """The save's callback holds the last reference: the finalizer runs on the supervisor
    thread, which must neither wait for nor join itself (found by review: the arena's memfds
    stayed open for the life of the process)."""
    import gc
    import weakref

    from _writers import GateWriter
    from conftest import _memfd_fds, wait_until
    gate = tmp_path / "gate"
    gate.mkdir()
    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.warns(ResourceWarning):
            pool = zckpt.CheckpointPool(num_workers=2, config=zckpt.PoolConfig(fsync=False, init_timeout_s=30.0),
                                        writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
            fut = pool.save({"w": torch.ones(8 << 20, dtype=torch.uint8)}, tmp_path / "a")
            wait_until(lambda: any(p.name.startswith("started") for p in gate.iterdir()), 30, "a write to start")
            ref = weakref.ref(pool)
            del pool            # the save in flight holds the pool now: it dies on the supervisor thread
            (gate / "open").touch()
            fut.result(timeout=60)
            wait_until(lambda: (gc.collect() or True) and ref() is None, 30, "the pool to be collected")
        wait_until(lambda: not _memfd_fds(), 30, "the arena's memfds to close")
    finally:
        sys.unraisablehook = old_hook
    assert not unraisable, [u.exc_value for u in unraisable]


def _wait_forever_for(path: str) -> None:
    open(path + ".started", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)   # polling cadence; this init is meant to be interrupted


def test_ctrl_c_while_the_workers_start_tears_everything_down(tmp_path):
    from conftest import wait_until, worker_children
    gate = str(tmp_path / "gate")

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 30
        while not os.path.exists(gate + ".started") and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt_once_started, daemon=True)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        zckpt.CheckpointPool(num_workers=1, config=zckpt.PoolConfig(init_timeout_s=60.0),
                             init_fn=_wait_forever_for, init_args=(gate,))
    t.join(timeout=30)
    wait_until(lambda: not worker_children(), 15, "the workers to be gone")
    assert not [th for th in threading.enumerate() if th.name.startswith("zckpt")]
