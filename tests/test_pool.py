"""CheckpointPool: round trips, snapshot semantics, arena reuse, bad input, lifecycle."""

from __future__ import annotations

import collections
import os
import pickle
import threading

import pytest
import torch

import zckpt
from zckpt import PoolConfig

from _writers import FailingWriter, RecordingWriter, marker_init

pytestmark = pytest.mark.timeout(90)


def sample_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 1000, "lr": 0.5, "name": "run-1", "none": None, "flag": True,
        "nan": float("nan"), "pair": (1, "a"), "list": [torch.ones(2), 3],
        "dtypes": {str(dt): (torch.rand(5) * 10).to(dt) for dt in (
            torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
            torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
            torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
            torch.uint16, torch.uint32, torch.uint64)},
        "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3), "noncontig": base.t(),
        "slice": base[1:3, ::2], "strided": torch.arange(100)[::7],
    }


def assert_same(a, b, path="root"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
        if a.dtype.is_floating_point and a.dtype.itemsize == 1:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def test_round_trip_every_kind_of_value(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    sd = sample_state()
    fut = pool.save(sd, tmp_path / "ckpt" / "step-1")
    assert fut.staged.done()
    assert fut.result(timeout=60) == str(tmp_path / "ckpt" / "step-1")
    back = zckpt.load(tmp_path / "ckpt" / "step-1")
    assert_same(sd, back)
    # optimizer state keeps its int keys, module state dicts their version metadata
    assert list(back["optimizer"]["state"].keys()) == [0, 1, 2, 3]
    assert back["model"]._metadata == sd["model"]._metadata
    assert isinstance(back["model"], collections.OrderedDict)
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    fresh.load_state_dict(back["model"])


def test_aliasing_survives_like_torch_save(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    w = torch.randn(8, 8)
    sd = {"emb": w, "head": w, "view": w[2:4], "t": w.t(), "other": torch.randn(3)}
    pool.save(sd, tmp_path / "c").result(timeout=60)
    back = zckpt.load(tmp_path / "c")
    ptr = back["emb"].untyped_storage().data_ptr()
    for key in ("head", "view", "t"):
        assert back[key].untyped_storage().data_ptr() == ptr, key
    assert back["other"].untyped_storage().data_ptr() != ptr
    back["emb"][2, 0] = 123.0
    assert back["view"][0, 0] == 123.0 and back["t"][0, 2] == 123.0
    manifest = zckpt.verify(tmp_path / "c")
    assert manifest["storages"] == 2  # the tied storage is stored once


def test_parameters_come_back_as_parameters(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    p = torch.nn.Parameter(torch.randn(3, 3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    pool.save({"p": p, "frozen": frozen}, tmp_path / "c").result(timeout=60)
    back = zckpt.load(tmp_path / "c")
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad
    assert isinstance(back["frozen"], torch.nn.Parameter) and not back["frozen"].requires_grad
    assert torch.equal(back["p"].detach(), p.detach())


def test_mutating_after_staged_does_not_change_the_checkpoint(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    from _writers import GateWriter
    pool = make_pool(num_workers=2, writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}
    expected = {k: v.clone() for k, v in tensors.items()}
    fut = pool.save(tensors, tmp_path / "c")
    assert fut.staged.done() and not fut.done()  # workers are held at the gate
    for v in tensors.values():
        v.add_(1000.0)  # the trainer's next step
    (gate / "open").touch()
    fut.result(timeout=60)
    back = zckpt.load(tmp_path / "c")
    for k in expected:
        assert torch.equal(back[k], expected[k]), f"{k} was torn by a mutation after staging"


def test_second_save_allocates_no_new_shared_memory(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    sd = {f"w{i}": torch.randn(256, 256) for i in range(6)}
    pool.save(sd, tmp_path / "a").result(timeout=60)
    first = pool.stats
    for i in range(3):
        for v in sd.values():
            v.mul_(1.01)
        pool.save(sd, tmp_path / f"b{i}").result(timeout=60)
    after = pool.stats
    assert after.arena_allocations == first.arena_allocations
    assert after.arena_nbytes == first.arena_nbytes
    assert after.saves_committed == 4
    assert_same(sd, zckpt.load(tmp_path / "b2"))


def test_fan_out_balances_bytes_across_workers(make_pool, tmp_path):
    pool = make_pool(num_workers=4)
    sd = {f"t{i:02d}": torch.randn(64, 64) for i in range(32)}
    pool.save(sd, tmp_path / "c").result(timeout=60)
    shards = sorted(p for p in os.listdir(tmp_path / "c") if p.endswith(".safetensors"))
    assert len(shards) == 4
    sizes = [os.path.getsize(tmp_path / "c" / s) for s in shards]
    quarter = sum(sizes) / 4
    assert all(abs(s - quarter) / quarter < 0.05 for s in sizes), sizes


def test_existing_checkpoint_is_refused_and_kept(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    pool.save({"a": torch.ones(10)}, tmp_path / "c").result(timeout=60)
    with pytest.raises(FileExistsError, match="already exists"):
        pool.save({"a": torch.zeros(10)}, tmp_path / "c")
    assert torch.equal(zckpt.load(tmp_path / "c")["a"], torch.ones(10))
    assert os.listdir(tmp_path) == ["c"]


@pytest.mark.parametrize("bad, match", [
    ([torch.ones(2)], "must be a mapping"),
    ("not a dict", "must be a mapping"),
    ({"lock": threading.Lock()}, "lock.*not picklable"),
    ({"sparse": torch.eye(3).to_sparse()}, "sparse.*strided"),
    ({"meta": torch.empty(3, device="meta")}, "meta"),
])
def test_bad_input_raises_and_leaves_nothing(make_pool, tmp_path, bad, match):
    pool = make_pool(num_workers=1)
    with pytest.raises(TypeError, match=match):
        pool.save(bad, tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")
    assert os.listdir(tmp_path) == []
    pool.save({"ok": torch.ones(1)}, tmp_path / "d").result(timeout=60)  # pool still works


def test_reference_cycle_round_trips_as_with_torch_save(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    sd: dict = {"a": torch.ones(1)}
    sd["self"] = sd
    pool.save(sd, tmp_path / "c").result(timeout=60)
    back = zckpt.load(tmp_path / "c")
    assert back["self"] is back and torch.equal(back["a"], torch.ones(1))


def test_writer_error_fails_the_future_with_remote_traceback(make_pool, tmp_path):
    pool = make_pool(num_workers=2, writer_factory=FailingWriter)
    fut = pool.save({"a": torch.ones(10), "b": torch.ones(10)}, tmp_path / "c")
    with pytest.raises(OSError, match="simulated disk full") as info:
        fut.result(timeout=60)
    assert isinstance(info.value.__cause__, zckpt.errors.RemoteTraceback)
    assert "_writers.py" in str(info.value.__cause__)  # the worker-side frame
    wait_empty = lambda: os.listdir(tmp_path) == []  # noqa: E731
    from conftest import wait_until
    wait_until(wait_empty, 10, "the failed save's temp directory to be removed")
    assert pool.stats.saves_failed == 1


def test_writer_kwargs_and_save_kwargs_reach_the_writer(make_pool, tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    pool = make_pool(num_workers=1, writer_factory=lambda d: RecordingWriter(d), writer_kwargs={"d": str(rec)})
    pool.save({"a": torch.ones(3)}, tmp_path / "c", tag="nightly", step=7).result(timeout=60)
    calls = list(rec.iterdir())
    assert len(calls) == 1
    assert calls[0].read_text() == repr([("step", 7), ("tag", "nightly")])


def test_init_fn_closure_runs_in_each_worker(make_pool, tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    prefix = "closure"

    class LocalInit:  # a locally defined class travels by value too
        def __call__(self, d):
            marker_init(d, prefix)

    pool = make_pool(num_workers=2, init_fn=LocalInit(), init_args=(str(seen),))
    files = sorted(os.listdir(seen))
    assert len(files) == 2
    assert {int(f.split("-")[1]) for f in files} == set(pool.worker_pids)
    for f in files:  # each ran as a direct child of this process
        assert (seen / f).read_text() == str(os.getpid())


def test_python_only_state_dict_commits(make_pool, tmp_path):
    pool = make_pool(num_workers=2)
    pool.save({"step": 3, "cfg": {"lr": 0.1}}, tmp_path / "c").result(timeout=60)
    assert zckpt.load(tmp_path / "c") == {"step": 3, "cfg": {"lr": 0.1}}


def test_metadata_is_stored(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    pool.save({"a": torch.ones(1)}, tmp_path / "c", metadata={"step": 5}).result(timeout=60)
    from zckpt.manifest import read_manifest
    assert read_manifest(str(tmp_path / "c")).metadata == {"step": 5}
    assert zckpt.load_metadata(tmp_path / "c") == {"step": 5}
    with pytest.raises(TypeError, match="JSON"):
        pool.save({"a": torch.ones(1)}, tmp_path / "d", metadata={"x": object()})


@pytest.mark.parametrize("metadata, says", [
    (["a"], "must be a mapping"), ({1: "x"}, "key 1 .int.: JSON keys are strings"),
    ({"t": (1, 2)}, r"metadata\['t'\] is a tuple"), ({"x": float("nan")}, "NaN and infinities"),
    ({"x": [float("inf")]}, r"metadata\['x'\]\[0\] is inf"),
])
def test_metadata_that_would_not_read_back_equal_is_refused(make_pool, tmp_path, metadata, says):
    """JSON would turn 1 into "1" and tuples into lists, and NaN is not JSON at all."""
    pool = make_pool(num_workers=1)
    with pytest.raises(TypeError, match=says):
        pool.save({"a": torch.ones(1)}, tmp_path / "d", metadata=metadata)
    assert not (tmp_path / "d").exists()
    assert pool.save({"a": torch.ones(1)}, tmp_path / "e", metadata={"ok": [1, 2.5, None]}).result(timeout=60)
    assert zckpt.load_metadata(tmp_path / "e") == {"ok": [1, 2.5, None]}


def test_an_existing_directory_is_never_called_a_checkpoint(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileExistsError, match="a directory already exists"):
        pool.save({"a": torch.ones(1)}, tmp_path / "plain")
    pool.save({"a": torch.ones(1)}, tmp_path / "ck").result(timeout=60)
    with pytest.raises(FileExistsError, match="a checkpoint already exists"):
        pool.save({"a": torch.ones(1)}, tmp_path / "ck")


def test_close_is_graceful_and_idempotent(tmp_path):
    pool = zckpt.CheckpointPool(num_workers=2, config=PoolConfig(fsync=False))
    pids = pool.worker_pids
    assert len(pids) == 2
    fut = pool.save({"a": torch.randn(1000)}, tmp_path / "c")
    pool.close()
    assert fut.done() and fut.exception() is None  # in-flight save drained
    assert pool.state is zckpt.PoolState.CLOSED
    assert pool.worker_pids == []
    pool.close()
    pool.kill()
    with pytest.raises(zckpt.PoolClosedError):
        pool.save({"a": torch.ones(1)}, tmp_path / "d")


def test_context_manager_closes(tmp_path):
    with zckpt.CheckpointPool(num_workers=1, config=PoolConfig(fsync=False)) as pool:
        pool.save({"a": torch.ones(3)}, tmp_path / "c").result(timeout=60)
    assert pool.state is zckpt.PoolState.CLOSED


def test_kill_fails_in_flight_saves_and_removes_temp_dirs(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    from _writers import GateWriter
    from conftest import wait_until
    pool = zckpt.CheckpointPool(num_workers=2, config=PoolConfig(fsync=False),
                                writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    try:
        fut = pool.save({"a": torch.ones(10), "b": torch.ones(10)}, tmp_path / "out" / "c")
        wait_until(lambda: len([f for f in os.listdir(gate) if f.startswith("started")]) == 2, 30,
                   "both workers to start writing")
    finally:
        pool.kill()
    with pytest.raises(zckpt.ZckptError):
        fut.result(timeout=10)
    assert os.listdir(tmp_path / "out") == []
    pool.kill()
    pool.close()


def test_save_future_is_a_future(make_pool, tmp_path):
    from concurrent.futures import Future, wait
    pool = make_pool(num_workers=1)
    futs = [pool.save({"a": torch.ones(4) * i}, tmp_path / f"s{i}") for i in range(3)]
    assert all(isinstance(f, Future) for f in futs)
    done, not_done = wait(futs, timeout=60)
    assert not not_done
    assert [zckpt.load(f.result())["a"][0].item() for f in futs] == [0.0, 1.0, 2.0]
    assert zckpt.latest(tmp_path) == str(tmp_path / "s2")


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="num_workers"):
        zckpt.CheckpointPool(num_workers=0)
    with pytest.raises(TypeError, match="init_fn"):
        zckpt.CheckpointPool(num_workers=1, init_fn=3)
    with pytest.raises(TypeError, match="config"):
        zckpt.CheckpointPool(config={"num_workers": 1})
    with pytest.raises(TypeError, match="cannot be pickled"):
        zckpt.CheckpointPool(num_workers=1, init_fn=print, init_args=(threading.Lock(),))


def test_pickled_checkpoint_tree_uses_no_tensor_pickles(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    pool.save({"a": torch.ones(1000)}, tmp_path / "c").result(timeout=60)
    raw = (tmp_path / "c" / "manifest.json").read_bytes()
    assert len(raw) < 4096  # tensor bytes live in the shards, not the manifest
    from zckpt.manifest import decode_skeleton, read_manifest
    tree = decode_skeleton(read_manifest(str(tmp_path / "c")).tree, "c")
    assert len(tree) < 256 and bytes(torch.ones(4).untyped_storage()) not in tree
    # The tensor's bytes are in its shard, raw (safetensors data), and no file is a pickle.
    shard = next((tmp_path / "c").glob("*.safetensors")).read_bytes()
    assert bytes(torch.ones(1000).untyped_storage()) in shard
    assert not any(f.read_bytes().startswith(pickle.PROTO) for f in (tmp_path / "c").iterdir())


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_and_buffered_writes_round_trip(make_pool, tmp_path, direct_io):
    # 3 MiB + 5 bytes: an O_DIRECT bulk and an unaligned tail written through the page cache
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=True, direct_io=direct_io))
    sd = {"big": torch.randint(0, 255, (3 * 2**20 + 5,), dtype=torch.uint8), "f": torch.randn(1000)}
    pool.save(sd, tmp_path / "c").result(timeout=60)
    zckpt.verify(tmp_path / "c")
    back = zckpt.load(tmp_path / "c")
    assert torch.equal(back["big"], sd["big"]) and torch.equal(back["f"], sd["f"])


def test_direct_io_falls_back_where_refused(tmp_path, monkeypatch):
    import errno

    from zckpt.writers import LocalFileWriter
    real_open = os.open
    refused = []

    def no_direct(path, flags, *args):  # a file system without O_DIRECT says EINVAL
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    data = memoryview(bytes(range(256)) * 64)
    writer = LocalFileWriter(fsync=True, direct_io=True)
    seen: list = []
    for name in ("a", "b"):
        writer.write_file(str(tmp_path / name), data, progress=seen.append)
        assert (tmp_path / name).read_bytes() == bytes(data)
    assert len(refused) == 1  # remembered per file system: not retried for "b"
    assert sum(seen) == 2 * len(data)


def test_reserve_makes_the_first_save_allocate_nothing(make_pool, tmp_path):
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False, staging_buffers=2))
    sd = {f"w{i}": torch.randn(128, 128) for i in range(6)}
    assert pool.stats.arena_allocations == 0
    pool.reserve(sd)
    reserved = pool.stats
    assert reserved.arena_allocations == 4  # 2 buffer sets x 2 shards, pre-faulted
    for i in range(3):
        pool.save(sd, tmp_path / f"s{i}").result(timeout=60)
    assert pool.stats.arena_allocations == reserved.arena_allocations
    assert pool.stats.arena_nbytes == reserved.arena_nbytes


def test_async_staging_returns_before_the_copy_and_keeps_the_snapshot(make_pool, tmp_path, monkeypatch):
    import zckpt.pool as pool_module
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False, async_staging=True))
    real_stage = pool_module.stage_files
    copy_may_run = threading.Event()
    copy: dict = {}

    def held_stage(plan, bufset, sources, **kwargs):
        copy["thread"] = threading.current_thread().name
        copy["was_held"] = copy_may_run.wait(timeout=10)  # synchronous staging would block save() here
        return real_stage(plan, bufset, sources, **kwargs)

    monkeypatch.setattr(pool_module, "stage_files", held_stage)
    sd = {f"w{i}": torch.full((256, 256), float(i)) for i in range(8)}
    expected = {k: v.clone() for k, v in sd.items()}
    fut = pool.save(sd, tmp_path / "c")
    assert not fut.staged.done()  # returned while the copy is provably not done
    copy_may_run.set()
    fut.staged.result(timeout=60)  # the contract: wait for staged before mutating
    assert copy["was_held"] and copy["thread"].startswith("zckpt-stage")
    for v in sd.values():
        v.add_(1.0)
    fut.result(timeout=60)
    assert fut.timings["blocked_s"] < fut.timings["staged_s"]
    back = zckpt.load(tmp_path / "c")
    assert all(torch.equal(back[k], expected[k]) for k in sd)


def test_async_staging_failure_fails_both_futures(make_pool, tmp_path, monkeypatch):
    import zckpt.pool as pool_module
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, async_staging=True))

    def broken_stage(plan, bufset, sources, **kwargs):
        raise MemoryError("simulated: cannot copy")

    monkeypatch.setattr(pool_module, "stage_files", broken_stage)
    fut = pool.save({"a": torch.ones(3)}, tmp_path / "root" / "c")
    with pytest.raises(MemoryError):
        fut.staged.result(timeout=30)
    with pytest.raises(MemoryError):
        fut.result(timeout=30)
    assert os.listdir(tmp_path / "root") == []
    monkeypatch.undo()
    pool.save({"a": torch.ones(3)}, tmp_path / "root" / "d").result(timeout=60)


def test_workers_never_import_torch_on_the_native_path(make_pool, tmp_path):
    # Importing torch costs ~2 s of start-up and ~300 MB per worker; writing, checksums
    # and the commit (run by a worker) must not need it.
    from _writers import TorchProbeWriter
    rec = tmp_path / "rec"
    rec.mkdir()
    pool = make_pool(num_workers=1, writer_factory=TorchProbeWriter, writer_kwargs={"record_dir": str(rec)})
    for i in range(3):  # save 2 and 3 run after a commit in the same worker
        pool.save({"a": torch.ones(4), "step": i}, tmp_path / f"s{i}").result(timeout=60)
    assert (rec / "torch-imported").read_text().split() == ["False"] * 3


def test_async_staging_bad_input_fails_the_futures(make_pool, tmp_path):
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, async_staging=True))
    fut = pool.save({"lock": threading.Lock()}, tmp_path / "root" / "c")
    with pytest.raises(TypeError, match="lock.*not picklable"):
        fut.staged.result(timeout=30)
    with pytest.raises(TypeError):
        fut.result(timeout=30)
    assert not os.path.exists(tmp_path / "root" / "c")
    assert pool.stats.saves_failed == 1


def test_two_staging_buffers_let_the_next_save_stage_while_one_writes(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    from _writers import GateWriter
    from conftest import wait_until
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, staging_buffers=2),
                     writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    first = pool.save({"a": torch.ones(1000)}, tmp_path / "s1")
    wait_until(lambda: any(f.startswith("started") for f in os.listdir(gate)), 30, "the first write")
    second = pool.save({"a": torch.full((1000,), 2.0)}, tmp_path / "s2")  # stages into the spare set
    assert second.staged.done() and not first.done()
    (gate / "open").touch()
    assert first.result(timeout=60) == str(tmp_path / "s1") and second.result(timeout=60) == str(tmp_path / "s2")
    assert zckpt.load(tmp_path / "s2")["a"][0].item() == 2.0


def test_one_staging_buffer_waits_for_the_write_with_a_deadline(make_pool, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    from _writers import GateWriter
    from conftest import wait_until
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False, staging_buffers=1, save_timeout_s=30.0,
                                       buffer_wait_timeout_s=0.3),
                     writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)})
    first = pool.save({"a": torch.ones(1000)}, tmp_path / "s1")
    wait_until(lambda: any(f.startswith("started") for f in os.listdir(gate)), 30, "the first write")
    # The buffer is busy until the first save is written: the buffer wait has its own
    # deadline (0.3 s here), not the save's hour.
    with pytest.raises(TimeoutError, match="buffer_wait_timeout_s"):
        pool.save({"a": torch.ones(1000)}, tmp_path / "waits")
    assert pool.stats.saves_failed == 1 and not os.path.exists(tmp_path / "waits")
    (gate / "open").touch()
    first.result(timeout=60)
    pool.save({"a": torch.ones(1000)}, tmp_path / "s2").result(timeout=60)


def test_lazy_conjugate_views_are_saved_as_they_read(make_pool, tmp_path):
    pool = make_pool(num_workers=1)
    z = torch.randn(5, dtype=torch.complex64)
    sd = {"conj": z.conj(), "neg": torch._neg_view(torch.randn(4, dtype=torch.complex64))}
    assert sd["conj"].is_conj() and sd["neg"].is_neg()
    pool.save(sd, tmp_path / "c").result(timeout=60)
    back = zckpt.load(tmp_path / "c")
    assert torch.equal(back["conj"], sd["conj"].resolve_conj())
    assert torch.equal(back["neg"], sd["neg"].resolve_neg())
