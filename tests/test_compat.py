"""zckpt.compat against the behaviour of torch's experimental CheckpointProcess.

Covers what the original's own tests cover (request types and defaults, init and close,
plain and Future state dicts, kwargs, init timeout, init and writer-factory failure,
graceful and forced termination, a dead worker, the shared-memory round trip) plus the
deliberate improvements (bounded close, no copy of already-shared tensors).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch

from zckpt import compat
from zckpt.compat import (
    CheckpointProcess,
    CheckpointProcessConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    RankInfo,
    RequestType,
    WorkerRequest,
    WorkerResponse,
)

from _writers import kill_compat, wait_for_file
from conftest import pid_alive, wait_until

pytestmark = pytest.mark.timeout(120)

RANK = RankInfo(global_rank=0, global_world_size=1)


def subprocess_init_fn(name: str, parent_pid: int) -> None:
    assert name == "test-checkpointer", name
    assert os.getpid() != parent_pid
    assert os.getppid() == parent_pid, "the worker must be a direct child of the trainer"


def failing_subprocess_init_fn(name: str, parent_pid: int) -> None:
    raise RuntimeError("Subprocess initialization failed")


def gated_init_fn(name: str, parent_pid: int) -> None:
    wait_for_file(os.path.join(os.environ.get("ZCKPT_TEST_GATE", "/nonexistent"), "open"), timeout_s=60)


def ckpt_writer_init_fn(**kwargs: Any) -> CheckpointWriter:
    return CheckpointWriter(config=kwargs.get("config"), rank_info=kwargs.get("rank_info"))


def failing_ckpt_writer_init_fn(**kwargs: Any) -> CheckpointWriter:
    raise RuntimeError("CheckpointWriter initialization failed")


def shared_tensor_verifier_init_fn(**kwargs: Any) -> CheckpointWriter:
    class SharedTensorVerifier(CheckpointWriter):
        def write(self, state_dict, path, **_):
            assert state_dict["shared_tensor"].is_shared()
            state_dict["shared_tensor"][0] = 42.0
            assert state_dict["regular_tensor"].is_shared()
            return None

    return SharedTensorVerifier(config=CheckpointWriterConfig(), rank_info=kwargs.get("rank_info"))


def kwargs_recorder_init_fn(**kwargs: Any) -> CheckpointWriter:
    class Recorder(CheckpointWriter):
        def write(self, path, state_dict, **kw):
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "kwargs.txt"), "w") as f:
                f.write(repr(sorted(kw.items())))

    return Recorder(config=CheckpointWriterConfig(), rank_info=kwargs["rank_info"])


def gate_writer_init_fn(gate: str, **kwargs: Any) -> CheckpointWriter:
    class Gate(CheckpointWriter):
        def write(self, path, state_dict, **kw):
            open(os.path.join(gate, "started"), "w").close()
            wait_for_file(os.path.join(gate, "open"))
            super().write(path, state_dict, **kw)

    return Gate(config=CheckpointWriterConfig(), rank_info=kwargs["rank_info"])


def state() -> dict:
    return {"model": torch.nn.Linear(10, 5).state_dict(), "optimizer": {"param_groups": [{"lr": 0.01}]},
            "epoch": 5, "step": 1000}


@pytest.fixture
def processes():
    made: list[CheckpointProcess] = []

    def make(init_fn=subprocess_init_fn, writer_fn=ckpt_writer_init_fn, init_timeout=30, writer_args=None,
             shutdown_timeout=60) -> CheckpointProcess:
        cp = CheckpointProcess(
            rank_info=RANK,
            config=CheckpointProcessConfig(subprocess_init_timeout_secs=init_timeout,
                                           subprocess_shutdown_timeout_secs=shutdown_timeout),
            subprocess_init_fn=init_fn, subprocess_init_args=("test-checkpointer", os.getpid()),
            checkpoint_writer_init_fn=writer_fn,
            checkpoint_writer_init_args=writer_args if writer_args is not None else
            {"config": CheckpointWriterConfig(), "rank_info": RANK},
        )
        made.append(cp)
        return cp

    try:
        yield make
    finally:
        for cp in made:
            kill_compat(cp)


def test_request_types_and_messages():
    assert RequestType.PING.value == "ping"
    assert RequestType.WRITE_CHECKPOINT.value == "write_checkpoint"
    assert RequestType.TERMINATE_PROCESS.value == "exit"
    req = WorkerRequest(request_type=RequestType.PING, payload={"test": "data"})
    assert req.payload["test"] == "data"
    resp = WorkerResponse(request_type=RequestType.PING, success=True, error_msg=None, payload={"r": 1})
    assert resp.success and resp.error_msg is None and resp.payload == {"r": 1}
    assert WorkerResponse(RequestType.PING, False).payload is None


def test_config_defaults():
    assert CheckpointProcessConfig().subprocess_init_timeout_secs == 30
    assert CheckpointProcessConfig().subprocess_shutdown_timeout_secs == 60
    assert CheckpointProcessConfig(10, 30).subprocess_shutdown_timeout_secs == 30
    assert CheckpointWriterConfig().write_barrier_timeout_secs == 600


def test_initialization_and_close(processes):
    cp = processes()
    cp.process_creation_future.result()
    proc = cp.process.processes[0]
    assert proc.is_alive() and proc.pid in _children()
    cp.close()
    assert not proc.is_alive()
    cp.close()  # idempotent


def _children() -> set[int]:
    from conftest import children_of
    return children_of(os.getpid())


def test_write_plain_state_dict(processes, tmp_path):
    cp = processes()
    cp.process_creation_future.result()
    fut = cp.write(state(), str(tmp_path / "ckpt"))
    assert isinstance(fut, Future)
    assert fut.result(timeout=60) is None
    loaded = torch.load(tmp_path / "ckpt" / "checkpoint_0.pt")
    assert loaded["epoch"] == 5 and loaded["step"] == 1000
    assert set(loaded["model"]) == {"weight", "bias"}


def test_write_future_state_dict(processes, tmp_path):
    cp = processes()
    cp.process_creation_future.result()
    with ThreadPoolExecutor(1) as ex:
        sd_future = ex.submit(state)
        cp.write(sd_future, str(tmp_path / "ckpt")).result(timeout=60)
    assert torch.load(tmp_path / "ckpt" / "checkpoint_0.pt")["step"] == 1000


def test_write_kwargs_reach_the_writer(processes, tmp_path):
    cp = processes(writer_fn=kwargs_recorder_init_fn)
    cp.write(state(), str(tmp_path / "ckpt"), custom_arg="test_value", another_arg=42).result(timeout=60)
    assert (tmp_path / "ckpt" / "kwargs.txt").read_text() == repr([("another_arg", 42), ("custom_arg", "test_value")])


def test_rank_info_is_added_to_writer_args(processes, tmp_path):
    cp = processes(writer_args={"config": CheckpointWriterConfig()})
    cp.write(state(), str(tmp_path / "ckpt")).result(timeout=60)
    assert (tmp_path / "ckpt" / "checkpoint_0.pt").exists()


def test_initialization_timeout(processes, tmp_path, monkeypatch):
    monkeypatch.setenv("ZCKPT_TEST_GATE", str(tmp_path))  # never opened
    cp = processes(init_fn=gated_init_fn, init_timeout=1)
    with pytest.raises(TimeoutError, match="Timed out"):
        cp.process_creation_future.result(timeout=30)


def test_initialization_failure(processes):
    cp = processes(init_fn=failing_subprocess_init_fn)
    with pytest.raises(RuntimeError, match="Subprocess initialization failed"):
        cp.process_creation_future.result(timeout=30)


def test_writer_factory_failure(processes):
    cp = processes(writer_fn=failing_ckpt_writer_init_fn)
    with pytest.raises(RuntimeError, match="CheckpointWriter initialization failed"):
        cp.process_creation_future.result(timeout=30)


def test_graceful_termination(processes):
    cp = processes()
    cp.process_creation_future.result()
    proc = cp.process.processes[0]
    cp.close()
    assert not proc.is_alive()
    assert proc.exitcode == 0  # it exited by itself after TERMINATE


def test_forced_termination(processes, tmp_path):
    # The worker is inside a write that never ends, so it never gets to act on TERMINATE:
    # close() kills it once subprocess_shutdown_timeout_secs (2 s) have passed, instead of
    # waiting for the write as the original does (its save timeout here is an hour).
    gate = tmp_path / "gate"
    gate.mkdir()
    cp = processes(writer_fn=gate_writer_init_fn, writer_args={"gate": str(gate)}, shutdown_timeout=2)
    fut = cp.write(state(), str(tmp_path / "ckpt"))
    wait_for_file(str(gate / "started"), 30)
    proc = cp.process.processes[0]
    t0 = time.monotonic()
    cp.close()
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 2 + 10  # the timeout, plus at most the kill-and-reap margin
    assert not proc.is_alive()
    assert proc.exitcode == -signal.SIGKILL
    with pytest.raises(compat.ChildProcessTerminatedError, match="Child process terminated unexpectedly"):
        fut.result(timeout=10)


def test_dead_worker_makes_write_fail(processes, tmp_path):
    cp = processes()
    cp.process_creation_future.result()
    proc = cp.process.processes[0]
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(proc.pid), 10, "the worker to die")
    with pytest.raises(RuntimeError, match="Child process terminated unexpectedly") as info:
        cp.write(state(), str(tmp_path / "ckpt")).result(timeout=30)
    assert isinstance(info.value, compat.ChildProcessTerminatedError)


def test_worker_dying_mid_write_fails_the_write(processes, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cp = processes(writer_fn=gate_writer_init_fn, writer_args={"gate": str(gate)})
    fut = cp.write(state(), str(tmp_path / "ckpt"))
    wait_for_file(str(gate / "started"), 30)
    cp.process.processes[0].kill()
    with pytest.raises(RuntimeError, match="Child process terminated unexpectedly"):
        fut.result(timeout=30)


def test_shared_memory_tensor_is_the_same_memory(processes):
    cp = processes(writer_fn=shared_tensor_verifier_init_fn)
    cp.process_creation_future.result()
    shared = torch.randn(100, 100)
    shared.share_memory_()
    ptr = shared.data_ptr()
    regular = torch.randn(50, 50)
    assert shared.is_shared() and not regular.is_shared()
    cp.write({"shared_tensor": shared, "regular_tensor": regular}, "/unused").result(timeout=60)
    assert shared[0, 0].item() == 42.0 and torch.all(shared[0, 1:] == 42.0)
    assert shared.data_ptr() == ptr
    assert not regular.is_shared()  # improvement: the caller's tensor is left where it was


def test_close_is_bounded_when_a_write_hangs(processes, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cp = processes(writer_fn=gate_writer_init_fn, writer_args={"gate": str(gate)}, shutdown_timeout=1)
    fut = cp.write(state(), str(tmp_path / "ckpt"))
    wait_for_file(str(gate / "started"), 30)
    proc = cp.process.processes[0]
    t0 = time.monotonic()
    cp.close()
    assert time.monotonic() - t0 < 15  # the original would wait for the write forever
    assert not proc.is_alive()
    with pytest.raises(compat.ChildProcessTerminatedError, match="Child process terminated unexpectedly"):
        fut.result(timeout=10)


def test_lambdas_travel_cloudpickled(processes, tmp_path):
    seen = tmp_path / "seen"
    cp = processes(init_fn=lambda name, pid: open(str(seen), "w").write(name))
    cp.write(state(), str(tmp_path / "ckpt")).result(timeout=60)
    assert seen.read_text() == "test-checkpointer"


class _ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_the_writer_replaces_the_file_atomically(tmp_path):
    """The original overwrites checkpoint_<rank>.pt in place: a failure (or a crash) mid-write
    loses the previous checkpoint. Ours writes beside it and renames over it."""
    from zckpt.compat import CheckpointWriter, CheckpointWriterConfig, RankInfo
    w = CheckpointWriter(CheckpointWriterConfig(), RankInfo(global_rank=0, global_world_size=1))
    target = tmp_path / "new" / "dir"
    w.write(str(target), {"a": torch.arange(10)})
    first = (target / "checkpoint_0.pt").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        w.write(str(target), {"a": torch.arange(1000), "b": _ExplodesWhenPickled()})
    assert (target / "checkpoint_0.pt").read_bytes() == first
    assert os.listdir(target) == ["checkpoint_0.pt"]          # no staging directory left behind
    w.write(str(target), {"a": torch.arange(3)})
    assert torch.equal(torch.load(target / "checkpoint_0.pt")["a"], torch.arange(3))


def test_the_writer_sweeps_staging_dirs_a_crashed_writer_left(tmp_path):
    from zckpt.compat import CheckpointWriter, CheckpointWriterConfig, RankInfo
    stale = tmp_path / ".checkpoint_0.pt.tmp-99999999-0badc0de"      # no such process
    stale.mkdir()
    (stale / "checkpoint_0.pt").write_bytes(b"partial")
    CheckpointWriter(CheckpointWriterConfig(), RankInfo(0, 1)).write(str(tmp_path), {"a": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0.pt"]
