"""The CUDA staging path on a real GPU (issue 12): every test here is marked ``cuda``.

Where ``torch.cuda.is_available()`` is false (CI, the CPU build) each test is skipped and
says why. On a GPU machine::

    python -m pytest -m cuda tests/test_cuda.py      # or: bash bench/device_check.sh

What is checked, against ``zckpt/_cuda.py`` (page-locked arena via ``cudaHostRegister``,
device-to-host copies on a side stream that first waits for the caller's current stream):

- CUDA state dicts (fp32, bf16, fp16, ints, NaN/-0.0 bit patterns, fp8 where the chip has
  it, views, tied weights, a Parameter, mixed CPU and CUDA, a tensor split across workers,
  two devices when there are two) come back bit for bit, onto the CPU
  (``map_location="cpu"``), onto the devices they were saved from, and in place
  (``into=``);
- a tensor mutated on the GPU right after ``fut.staged`` leaves the checkpoint alone, also
  when the trainer's own stream still had kernels writing it queued when ``save()`` was
  called (the copy must wait for them), with synchronous and with asynchronous staging;
- the arena is page-locked once (``cudaHostRegister`` per segment, seen by CUDA itself
  through ``Tensor.is_pinned()``), never again on later saves, and unregistered at close;
- a second save (and a first one after ``reserve()``) allocates nothing: no new arena
  segment, no new registration, no device memory;
- a worker SIGKILLed during a GPU save: its shard goes to the replacement, or the save
  fails with ``WorkerDiedError`` when ``shard_retries=0``; the next save works;
- ``zckpt.compat`` with CUDA tensors, and what torch's own ``CheckpointProcess`` does with
  them (run in a child process, so its CUDA IPC state stays out of this one):
  torch's hands the writer the caller's CUDA tensors through CUDA IPC (same memory, the
  file holds ``cuda:N`` tensors); zckpt's copies them into its page-locked arena when
  ``write()`` stages, and the writer sees CPU shared-memory tensors (the file holds CPU
  tensors: load it with ``map_location`` to put them back on a GPU).

No sleep synchronises anything: GPU ordering is by streams and ``synchronize()``, worker
progress by the gate files of ``tests/_writers.py`` polled with a deadline.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import zckpt
from zckpt import PoolConfig

from _writers import GateWriter, kill_compat
from conftest import wait_until

HAVE_CUDA = torch.cuda.is_available()
NDEV = torch.cuda.device_count() if HAVE_CUDA else 0

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False "
                                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})"),
]

# Heartbeats slower than the CPU tests' 0.2 s: this runs first on a machine nobody has seen.
CFG = dict(fsync=False, heartbeat_interval_s=0.5, heartbeat_liveness=3, init_timeout_s=60.0)


@pytest.fixture(scope="module", autouse=True)
def cuda_ready():
    """Initialise CUDA (context, caching allocator, cudart) before any test's leak snapshot,
    so whatever the driver sets up once per process is not taken for a leak."""
    if HAVE_CUDA:
        torch.cuda.init()
        torch.empty(1, device="cuda").add_(1)
        torch.cuda.cudart()
        torch.cuda.synchronize()
    yield


# --- helpers ------------------------------------------------------------------------------
def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's own bytes, on the CPU (bit patterns: NaN payloads, -0.0, fp8 all compare)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of the tensor's storage, on the CPU."""
    from zckpt.stager import byte_view
    return byte_view(t.untyped_storage()).to("cpu")


def same(got: torch.Tensor, want: torch.Tensor, where: str, device: torch.device | str | None = None) -> None:
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    assert (got.dtype, tuple(got.shape), got.stride(), got.storage_offset()) == \
        (want.dtype, tuple(want.shape), want.stride(), want.storage_offset()), where
    assert got.requires_grad == want.requires_grad, where
    if device is not None:
        assert got.device == torch.device(device), f"{where}: on {got.device}, expected {device}"
    assert torch.equal(raw(got), raw(want)), f"{where}: values differ"
    assert torch.equal(storage_bytes(got), storage_bytes(want)), f"{where}: storage bytes differ"


def flat(obj, prefix=""):
    """``(dotted key, value)`` for every leaf of nested dicts and lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, obj


def has_fp8(dev: str = "cuda:0") -> bool:
    return hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability(dev) >= (8, 9)


def cuda_state(dev: str = "cuda:0", seed: int = 0, big: bool = True) -> dict:
    """Every kind of CUDA tensor the path must carry, plus CPU tensors and Python values."""
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    base = rnd(64, 48)
    tied = rnd(256, 128)
    sd = {
        "fp32": rnd(1000),
        "bf16": rnd(300, 7, dtype=torch.bfloat16),
        "fp16": rnd(33, dtype=torch.float16),
        "int64": torch.arange(-5, 500, device=dev),
        "uint8": torch.arange(256, device=dev, dtype=torch.uint8),
        "scalar": rnd(()),
        "bits": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45], device=dev),
        "param": torch.nn.Parameter(rnd(10, 3)),
        "views": {"base": base, "rows": base[8:16], "strided": base[:, ::3], "t": base.t(), "elem": base[3, 5]},
        "tied": {"emb": tied, "head": tied},
        "small": [rnd(i + 1) for i in range(150)],
        "step": 7 + seed, "lr": 1e-3, "name": "run",
    }
    if big:   # 40 MiB: over the 16 MiB split threshold and a worker's fair share, so cut in byte ranges
        sd["big"] = rnd(20 << 20, dtype=torch.bfloat16)
    if has_fp8(dev):
        sd["fp8"] = {"e4m3": rnd(4096).to(torch.float8_e4m3fn), "e5m2": rnd(77).to(torch.float8_e5m2)}
    return sd


def check_state(got: dict, want: dict, device=None, keep_devices: bool = False) -> None:
    """Bit-exact, with views and ties sharing storage as they did."""
    g, w = dict(flat(got)), dict(flat(want))
    assert g.keys() == w.keys(), sorted(set(g) ^ set(w))
    for key, wv in w.items():
        gv = g[key]
        if isinstance(wv, torch.Tensor):
            same(gv, wv, key, wv.device if keep_devices else device)
        else:
            assert gv == wv and type(gv) is type(wv), key
    for prefix in [k[: -len("views.base")] for k in g if k.endswith("views.base")]:
        base_st = g[prefix + "views.base"].untyped_storage().data_ptr()
        for k in ("rows", "strided", "t", "elem"):
            assert g[f"{prefix}views.{k}"].untyped_storage().data_ptr() == base_st, f"{prefix}views.{k}"
        assert g[prefix + "tied.emb"].untyped_storage().data_ptr() == \
            g[prefix + "tied.head"].untyped_storage().data_ptr(), prefix + "tied"


def cpu_copy(sd):
    """A CPU snapshot of ``sd`` with the same structure, views and ties (for later comparison)."""
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


def started(gate) -> int:
    return len([f for f in os.listdir(gate) if f.startswith("started")])


# --- round trips ----------------------------------------------------------------------------
def test_a_cuda_state_dict_round_trips_bit_exactly(make_pool, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG))
    sd = cuda_state()
    sd["cpu"] = {"a": torch.randn(100), "b": torch.arange(10, dtype=torch.int32)}
    sd["cpu"]["a_view"] = sd["cpu"]["a"][10:20]
    fut = pool.save(sd, tmp_path / "c")
    assert fut.staged.done()
    assert fut.result(timeout=120) == str(tmp_path / "c")
    zckpt.verify(tmp_path / "c")

    check_state(zckpt.load(tmp_path / "c", map_location="cpu"), sd, device="cpu")
    check_state(zckpt.load(tmp_path / "c"), sd, keep_devices=True)        # where each was saved from
    on_gpu = zckpt.load(tmp_path / "c", map_location="cuda:0")
    check_state(on_gpu, sd, device="cuda:0")
    assert type(on_gpu["param"]) is torch.nn.Parameter and on_gpu["param"].requires_grad
    # The manifest records where each storage came from (what map_location=None restores).
    from zckpt.manifest import read_manifest
    assert {st.device for st in read_manifest(str(tmp_path / "c")).storages} == {"cuda:0", "cpu"}


def test_load_into_cuda_tensors_fills_them_in_place(make_pool, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG))
    sd = {"w": torch.randn(512, 64, device="cuda"), "b": torch.randn(64, device="cuda").bfloat16(),
          "t": torch.randn(32, 16, device="cuda").t(), "step": 3}
    pool.save(sd, tmp_path / "c").result(timeout=120)
    into = {"w": torch.zeros(512, 64, device="cuda"), "b": torch.zeros(64, device="cuda", dtype=torch.bfloat16),
            "t": torch.zeros(16, 32, device="cuda"), "step": 0}
    ptrs = {k: v.data_ptr() for k, v in into.items() if isinstance(v, torch.Tensor)}
    out = zckpt.load(tmp_path / "c", into=into)
    for k, p in ptrs.items():
        assert out[k] is into[k] and into[k].data_ptr() == p and into[k].device.type == "cuda", k
        assert torch.equal(raw(into[k]), raw(sd[k])), k
    assert out["step"] == 3


@pytest.mark.skipif(NDEV < 2, reason=f"needs two CUDA devices, this machine has {NDEV}")
def test_tensors_on_two_devices_round_trip_and_are_snapshotted(make_pool, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG))
    sd = {"d0": cuda_state("cuda:0", seed=0, big=False), "d1": cuda_state("cuda:1", seed=1)}
    want = cpu_copy(sd)
    fut = pool.save(sd, tmp_path / "c")
    fut.staged.result(timeout=60)
    with torch.no_grad():   # right after staged, on both devices
        sd["d0"]["fp32"].add_(1)
        sd["d1"]["big"].mul_(2)
    fut.result(timeout=120)
    back = zckpt.load(tmp_path / "c")
    for key, t in flat(back):
        if isinstance(t, torch.Tensor):
            assert t.device == torch.device("cuda:0" if key.startswith("d0") else "cuda:1"), key
    check_state(zckpt.load(tmp_path / "c", map_location="cpu"), want, device="cpu")
    moved = zckpt.load(tmp_path / "c", map_location={"cuda:1": "cuda:0"})
    check_state(moved, want, device="cuda:0")


# --- snapshots: mutation after staged, kernels queued before save() --------------------------
@pytest.mark.parametrize("async_staging", [False, True], ids=["sync", "async_staging"])
def test_mutating_on_the_gpu_right_after_staged_leaves_the_checkpoint_alone(make_pool, tmp_path, async_staging):
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG, async_staging=async_staging))
    sd = cuda_state()
    want = cpu_copy(sd)
    for i in range(2):  # the first save allocates and pins the arena, the second reuses it
        fut = pool.save(sd, tmp_path / f"c{i}")
        if not async_staging:
            assert fut.staged.done(), "a synchronous save returns staged"
        fut.staged.result(timeout=60)
        with torch.no_grad():   # queued on the GPU at once, while the workers write
            for _, t in flat(sd):
                if isinstance(t, torch.Tensor) and t.is_cuda and t.is_floating_point() and t.dtype.itemsize > 1:
                    t.add_(1)
        fut.result(timeout=120)
        check_state(zckpt.load(tmp_path / f"c{i}", map_location="cpu"), want, device="cpu")
        want = cpu_copy(sd)


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync", "async_staging"])
@pytest.mark.parametrize("stream", ["default_stream", "side_stream"])
def test_save_sees_the_kernels_the_trainer_queued_before_it(make_pool, tmp_path, stream, async_staging):
    """The trainer queues ~100 ms of matrix products and then an in-place add on its
    current stream, and calls save() at once: the checkpoint must hold the value after the
    add (the copy waits for the trainer's stream), and not a later one."""
    pool = make_pool(num_workers=1, config=PoolConfig(**CFG, async_staging=async_staging))
    dev = torch.device("cuda:0")
    w = torch.zeros(1 << 20, device=dev)                      # 4 MiB, saved
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    torch.matmul(a, b, out=c)          # cuBLAS set up before the timed part
    pool.reserve({"w": w})             # arena allocated and pinned: the save itself is quick
    torch.cuda.synchronize()
    trainer = torch.cuda.Stream(device=dev) if stream == "side_stream" else torch.cuda.current_stream(dev)
    with torch.cuda.stream(trainer), torch.no_grad():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(80):
            torch.matmul(a, b, out=c)
        w.add_(1.0)                    # the value the checkpoint must hold
        end.record()
        fut = pool.save({"w": w}, tmp_path / "c")
        fut.staged.result(timeout=60)
        w.add_(1.0)                    # after staged: must not be in the checkpoint
    fut.result(timeout=120)
    torch.cuda.synchronize()
    queued_ms = start.elapsed_time(end)
    got = zckpt.load(tmp_path / "c", map_location="cpu")["w"]
    wrong = int((got != 1.0).sum())
    assert wrong == 0, (f"{wrong} of {got.numel()} elements are not the value the trainer's {stream} had "
                        f"queued before save() (values seen: {sorted(set(got.unique().tolist()))[:5]}; "
                        f"the queued kernels ran {queued_ms:.0f} ms)")
    assert torch.equal(w.cpu(), torch.full_like(got, 2.0))


# --- the arena: pinned once, unregistered at close, nothing allocated on later saves ----------
def _arena_segments(pool):
    arena = pool._arena
    with arena._cond:
        return [seg for s in arena._sets for seg in s.segments]


def test_the_arena_is_page_locked_once_and_unregistered_at_close(make_pool, tmp_path, monkeypatch):
    from zckpt import _cuda
    registered: list[tuple[int, int]] = []
    unregistered: list[int] = []
    real_register, real_unregister = _cuda.register_host, _cuda.unregister_host

    def register(t):
        registered.append((t.data_ptr(), t.numel()))
        real_register(t)

    def unregister(t):
        unregistered.append(t.data_ptr())
        real_unregister(t)

    monkeypatch.setattr(_cuda, "register_host", register)
    monkeypatch.setattr(_cuda, "unregister_host", unregister)
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG))
    sd = cuda_state()
    pool.save(sd, tmp_path / "c0").result(timeout=120)
    segs = _arena_segments(pool)
    assert segs and all(seg.pinned for seg in segs)
    assert sorted(registered) == sorted((seg.tensor.data_ptr(), seg.nbytes) for seg in segs)
    assert all(seg.tensor.is_pinned() for seg in segs), "CUDA does not see the arena as page-locked"
    for i in range(1, 4):
        pool.save(sd, tmp_path / f"c{i}").result(timeout=120)
    segs = _arena_segments(pool)
    assert len(registered) == len(segs) and len(set(registered)) == len(registered), \
        f"{len(registered)} registrations for {len(segs)} segments: a segment was page-locked again"
    assert all(seg.tensor.is_pinned() for seg in segs)
    held = [seg.tensor for seg in segs]   # keeps the mappings, to ask CUDA after close
    del segs
    pool.close()
    try:
        assert sorted(unregistered) == sorted(ptr for ptr, _ in registered)
        assert not any(t.is_pinned() for t in held), "a segment is still page-locked after close()"
    finally:
        del held
        gc.collect()


def test_a_second_save_allocates_nothing(make_pool, tmp_path):
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG))
    sd = cuda_state()
    pool.reserve(sd)     # allocates and pins now: the first save costs what later ones do
    torch.cuda.synchronize()

    def snapshot():
        segs = _arena_segments(pool)
        return (pool.stats.arena_allocations, pool.stats.arena_nbytes, pool._arena.live_keys(),
                [(s.tensor.data_ptr(), s.pinned) for s in segs])

    before = snapshot()
    for i in range(3):
        mem0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fut = pool.save(sd, tmp_path / f"c{i}")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        fut.result(timeout=120)
        assert snapshot() == before, f"save {i} changed the arena"
        assert fut.timings["wait_buffer_s"] < 5.0
        assert torch.cuda.memory_allocated() == mem0, f"save {i} kept device memory"
        assert peak - mem0 <= 1 << 20, f"save {i} allocated {peak - mem0} bytes of device memory on the way"
    check_state(zckpt.load(tmp_path / "c2", map_location="cpu"), sd, device="cpu")


# --- a worker killed during a GPU save ---------------------------------------------------------
def test_a_worker_killed_during_a_gpu_save_costs_a_retry_not_the_save(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    assert pool.config.shard_retries == 1
    sd = cuda_state()
    want = cpu_copy(sd)
    fut = pool.save(sd, tmp_path / "c")
    with torch.no_grad():
        sd["big"].add_(1)          # the retry writes the snapshot, not the live tensor
        sd["fp32"].zero_()
    wait_until(lambda: started(gate) == 2, 60, "both workers to start writing")
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: started(gate) == 3, 60, "the replacement to start the shard again")
    (gate / "open").touch()
    assert fut.result(timeout=120) == str(tmp_path / "c")
    assert fut.timings["shard_retries"] == 1.0
    assert victim not in pool.worker_pids
    check_state(zckpt.load(tmp_path / "c", map_location="cpu"), want, device="cpu")
    pool.save(sd, tmp_path / "after").result(timeout=120)
    check_state(zckpt.load(tmp_path / "after"), sd, keep_devices=True)


def test_a_worker_killed_during_a_gpu_save_without_retries_fails_it_and_the_next_works(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = make_pool(num_workers=2, config=PoolConfig(**CFG, shard_retries=0), writer_factory=GateWriter,
                     writer_kwargs={"gate_dir": str(gate)})
    sd = cuda_state()
    fut = pool.save(sd, tmp_path / "ck" / "doomed")
    wait_until(lambda: started(gate) == 2, 60, "both workers to start writing")
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(zckpt.WorkerDiedError):
        fut.result(timeout=60)
    (gate / "open").touch()
    wait_until(lambda: len(pool.worker_pids) == 2 and victim not in pool.worker_pids, 60, "a replacement")
    with torch.no_grad():
        sd["big"].add_(1)
    pool.save(sd, tmp_path / "ck" / "after").result(timeout=120)
    assert zckpt.latest(tmp_path / "ck") == str(tmp_path / "ck" / "after")
    check_state(zckpt.load(tmp_path / "ck" / "after", map_location="cpu"), sd, device="cpu")


# --- zckpt.compat, and torch's own CheckpointProcess, with CUDA tensors ------------------------
def device_recorder_writer(record: str, **kwargs):
    from zckpt.compat import CheckpointWriter, CheckpointWriterConfig

    class DeviceRecorder(CheckpointWriter):
        def write(self, path, state_dict, **kw):
            seen = {k: [str(v.device), bool(v.is_shared())] for k, v in state_dict["model"].items()}
            with open(record, "w") as f:
                json.dump(seen, f)
            return super().write(path, state_dict, **kw)

    return DeviceRecorder(config=CheckpointWriterConfig(), rank_info=kwargs["rank_info"])


def test_compat_with_cuda_tensors_writes_cpu_copies_staged_through_the_pinned_arena(tmp_path):
    from zckpt.compat import CheckpointProcess, CheckpointProcessConfig, RankInfo
    record = tmp_path / "seen.json"
    cp = CheckpointProcess(rank_info=RankInfo(global_rank=0, global_world_size=1),
                           config=CheckpointProcessConfig(subprocess_init_timeout_secs=60,
                                                          subprocess_shutdown_timeout_secs=30),
                           subprocess_init_fn=lambda: None, subprocess_init_args=(),
                           checkpoint_writer_init_fn=device_recorder_writer,
                           checkpoint_writer_init_args={"record": str(record)})
    try:
        w = torch.randn(300, 40, device="cuda")
        model = {"w": w, "tied": w, "view": w[5:9], "b": torch.randn(77, device="cuda").bfloat16(),
                 "cpu": torch.arange(12.0)}
        sd = {"model": model, "step": 11}
        want = cpu_copy(sd)
        for i in range(2):   # the second write reuses the arena segments (one per storage)
            cp.write(sd, str(tmp_path / f"ck{i}")).result(timeout=120)
            seen = json.loads(record.read_text())
            assert seen == {k: ["cpu", True] for k in model}, seen
            back = torch.load(tmp_path / f"ck{i}" / "checkpoint_0.pt", weights_only=True)
            assert back["step"] == 11
            for k, t in back["model"].items():
                assert t.device.type == "cpu", k
                same(t, want["model"][k], k)
            assert back["model"]["w"].untyped_storage().data_ptr() == back["model"]["tied"].untyped_storage().data_ptr()
            assert back["model"]["w"].untyped_storage().data_ptr() == back["model"]["view"].untyped_storage().data_ptr()
            on_gpu = torch.load(tmp_path / f"ck{i}" / "checkpoint_0.pt", map_location="cuda:0", weights_only=True)
            assert torch.equal(on_gpu["model"]["w"], w)
        segs = [seg for s in cp._writer.engine.arena._sets for seg in s.segments]
        assert any(seg.pinned for seg in segs), "CUDA storages were not staged through page-locked segments"
    finally:
        kill_compat(cp)


_TORCH_ORIGINAL = textwrap.dedent('''
    import json, os, sys
    import torch

    def recorder_init_fn(rank_info, record):
        from torch.distributed.checkpoint._experimental.checkpoint_writer import (
            CheckpointWriter, CheckpointWriterConfig)

        class Recorder(CheckpointWriter):
            def write(self, path, state_dict, **kw):
                seen = {k: [str(v.device), bool(v.is_shared())] for k, v in state_dict["model"].items()}
                with open(record, "w") as f:
                    json.dump(seen, f)
                return super().write(path, state_dict, **kw)
        return Recorder(config=CheckpointWriterConfig(), rank_info=rank_info)

    def noop_init(*args):
        pass

    def main(out):
        try:
            from torch.distributed.checkpoint._experimental.checkpoint_process import (
                CheckpointProcess, CheckpointProcessConfig)
            from torch.distributed.checkpoint._experimental.types import RankInfo
        except ImportError as e:
            print(json.dumps({"skip": f"torch {torch.__version__} has no experimental CheckpointProcess: {e}"}))
            return
        record = os.path.join(out, "seen.json")
        cp = CheckpointProcess(rank_info=RankInfo(global_rank=0, global_world_size=1),
                               config=CheckpointProcessConfig(subprocess_init_timeout_secs=90,
                                                              subprocess_shutdown_timeout_secs=20),
                               subprocess_init_fn=noop_init, subprocess_init_args=(),
                               checkpoint_writer_init_fn=recorder_init_fn,
                               checkpoint_writer_init_args={"record": record})
        try:
            w = torch.arange(64.0, device="cuda")
            cp.write({"model": {"w": w, "b": w[8:16]}, "step": 1}, os.path.join(out, "ck")).result(timeout=90)
        finally:
            cp.close()
        back = torch.load(os.path.join(out, "ck", "checkpoint_0.pt"), weights_only=True)
        print(json.dumps({"writer_saw": json.load(open(record)),
                          "file_devices": {k: str(v.device) for k, v in back["model"].items()},
                          "equal": bool(torch.equal(back["model"]["w"].cpu(), torch.arange(64.0)))}))

    if __name__ == "__main__":
        main(sys.argv[1])
''')


@pytest.mark.timeout(150)
def test_what_torchs_own_checkpoint_process_does_with_cuda_tensors(tmp_path):
    """Documents the original (torch's experimental CheckpointProcess) against zckpt.compat:
    torch pickles the state dict to its spawned child through torch.multiprocessing, so a
    CUDA tensor travels as a CUDA IPC handle: the writer gets the caller's own CUDA memory
    (on the same device; the caller must not touch it until the future resolves) and its
    ``torch.save`` writes ``cuda:N`` tensors. zckpt.compat stages a copy into its
    page-locked arena instead (the test above): the writer sees CPU shared-memory tensors
    and the file holds CPU tensors. Run in a child process (its CUDA IPC bookkeeping and
    spawned worker stay out of this one); skipped when the original cannot run here."""
    script = tmp_path / "original.py"
    script.write_text(_TORCH_ORIGINAL)
    try:
        out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                             timeout=120, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:
        pytest.skip(f"torch's CheckpointProcess did not finish within 120 s with CUDA tensors: {e}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        pytest.skip(f"torch's CheckpointProcess failed with CUDA tensors here (exit {out.returncode}): "
                    f"{(out.stderr or out.stdout).strip()[-1500:]}")
    result = json.loads(lines[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    print("torch's CheckpointProcess with CUDA tensors:", result)
    assert result["equal"]
    assert result["writer_saw"]["w"][0].startswith("cuda"), result   # CUDA IPC: the caller's memory
    assert result["file_devices"] == {"w": "cuda:0", "b": "cuda:0"}, result
