"""zckpt.dcp: the DCP storage writer/stager and reader (single process, and gloo ranks)."""

from __future__ import annotations

import os
import pickle
import warnings

import dcp_cases
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_cases import full, save_with
from dist_helpers import run_ranks
from torch.distributed.checkpoint.api import CheckpointException

import zckpt
from zckpt.dcp import RAW_BYTES_EXTENSION, ZckptReader, ZckptWriter

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

FAST = zckpt.PoolConfig(num_workers=2, fsync=False, heartbeat_interval_s=0.2, heartbeat_liveness=5)


def _state(step: int) -> dict:
    base = full("w", (64, 33), step=step)
    sd = {
        "model": {"w": base, "tied": base, "t": base.t(),          # a tie and a transposed view
                  "bf": full("bf", (17,), torch.bfloat16, step), "empty": torch.zeros(0, 3),
                  "ints": full("i", (5,), step=step).to(torch.int64), "flag": torch.tensor([True, False])},
        "optim": {"state": {0: {"exp": full("exp", (9, 2), step=step)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "lst": [full("lst", (3,), step=step), 4], "step": step, "nums": (1, 2.5, "x"),
    }
    return sd


def _empty() -> dict:
    return {
        "model": {"w": torch.zeros(64, 33), "tied": torch.zeros(64, 33), "t": torch.zeros(33, 64),
                  "bf": torch.zeros(17, dtype=torch.bfloat16), "empty": torch.ones(0, 3),
                  "ints": torch.zeros(5, dtype=torch.int64), "flag": torch.zeros(2, dtype=torch.bool)},
        "optim": {"state": {0: {"exp": torch.zeros(9, 2)}}, "param_groups": [{"lr": 0.0, "params": [0]}]},
        "lst": [torch.zeros(3), 0], "step": -1, "nums": None,
    }


def _assert_equal(got: dict, want: dict, path: str = "") -> None:
    for k, w in want.items():
        g = got[k]
        if isinstance(w, dict):
            _assert_equal(g, w, f"{path}{k}.")
        elif isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and torch.equal(g, w), f"{path}{k}"
        elif isinstance(w, list):
            for i, (a, b) in enumerate(zip(g, w, strict=True)):
                assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, f"{path}{k}.{i}"
        else:
            assert g == w, f"{path}{k}"


def _load(path: str) -> dict:
    target = _empty()
    dcp.load(target, storage_reader=ZckptReader(path), no_dist=True)
    return target


@pytest.fixture
def writer():
    w = ZckptWriter(config=FAST)
    yield w
    w.close()


def test_save_and_async_save_round_trip(tmp_path, writer):
    dcp.save(_state(1), checkpoint_id=str(tmp_path / "s1"), storage_writer=writer, no_dist=True)
    sd = _state(2)
    fut = dcp.async_save(sd, checkpoint_id=str(tmp_path / "s2"), storage_writer=writer, no_dist=True)
    sd["model"]["w"].fill_(-1)            # the trainer goes on: the checkpoint holds step 2
    sd["optim"]["state"][0]["exp"].fill_(-1)
    sd["step"] = 99
    fut.result(timeout=60)
    _assert_equal(_load(str(tmp_path / "s1")), _state(1))
    _assert_equal(_load(str(tmp_path / "s2")), _state(2))
    assert zckpt.verify(tmp_path / "s2")["items"] > 0
    assert zckpt.latest(tmp_path) == str(tmp_path / "s2")
    # The tie was written once: both keys point at the same bytes.
    items = {it["fqn"]: it for it in _manifest(tmp_path / "s2")["items"]}
    assert (items["model.w"]["file"], items["model.w"]["at"]) == (items["model.tied"]["file"],
                                                                  items["model.tied"]["at"])


def _why(exc: BaseException) -> str:
    """A DCP CheckpointException's text with each rank's own exception."""
    failures = getattr(exc, "failures", {}) or {}
    return " | ".join([str(exc)] + [f"{type(e[0]).__name__}: {e[0]}" for e in failures.values()])


def _manifest(path) -> dict:
    import json
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)["zckpt_manifest"]


def test_second_save_allocates_nothing(tmp_path, writer):
    for i in range(3):
        dcp.async_save(_state(i), checkpoint_id=str(tmp_path / f"s{i}"), storage_writer=writer,
                       no_dist=True).result(timeout=60)
        if i == 0:
            after_first = writer.pool._engine.arena.allocations
    assert writer.pool._engine.arena.allocations == after_first


def test_refuses_an_existing_path_and_keeps_it(tmp_path, writer):
    dcp.save(_state(1), checkpoint_id=str(tmp_path / "s1"), storage_writer=writer, no_dist=True)
    before = sorted(os.listdir(tmp_path / "s1"))
    with pytest.raises(CheckpointException) as ei:
        dcp.save(_state(2), checkpoint_id=str(tmp_path / "s1"), storage_writer=writer, no_dist=True)
    assert "FileExistsError" in _why(ei.value) and "already exists" in _why(ei.value)
    assert sorted(os.listdir(tmp_path / "s1")) == before
    _assert_equal(_load(str(tmp_path / "s1")), _state(1))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_damaged_item_is_named_not_loaded(tmp_path, writer):
    dcp.save(_state(1), checkpoint_id=str(tmp_path / "s1"), storage_writer=writer, no_dist=True)
    item = next(it for it in _manifest(tmp_path / "s1")["items"] if it["fqn"] == "model.bf")
    name = _manifest(tmp_path / "s1")["files"][item["file"]]["name"]
    with open(tmp_path / "s1" / name, "r+b") as f:
        f.seek(item["at"] + 3)
        b = f.read(1)
        f.seek(item["at"] + 3)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointException) as ei:
        _load(str(tmp_path / "s1"))
    assert "CorruptCheckpointError" in _why(ei.value) and "model.bf" in _why(ei.value)
    with pytest.raises(zckpt.CorruptCheckpointError, match="model.bf"):
        zckpt.verify(tmp_path / "s1")


def test_dcp_filesystem_reader_reads_metadata_refuses_data(tmp_path, writer):
    from torch.distributed.checkpoint import FileSystemReader
    dcp.save(_state(1), checkpoint_id=str(tmp_path / "s1"), storage_writer=writer, no_dist=True)
    md = FileSystemReader(str(tmp_path / "s1")).read_metadata()
    assert md.state_dict_metadata["model.w"].size == torch.Size([64, 33])
    with pytest.raises(CheckpointException) as ei:
        dcp.load(_empty(), storage_reader=FileSystemReader(str(tmp_path / "s1")), no_dist=True)
    assert RAW_BYTES_EXTENSION.split("/")[0] in _why(ei.value)


def test_reader_loads_pool_checkpoints(tmp_path):
    with zckpt.CheckpointPool(config=FAST) as pool:
        pool.save(_state(3), tmp_path / "p3").result(timeout=60)
    _assert_equal(_load(str(tmp_path / "p3")), _state(3))


def test_writer_is_not_pickled_into_a_process(writer):
    with pytest.raises(TypeError, match="thread executor"):
        pickle.dumps(writer)


def test_keep_last_applies(tmp_path):
    with ZckptWriter(config=FAST.replace(keep_last=2)) as w:
        for i in range(4):
            dcp.async_save(_state(i), checkpoint_id=str(tmp_path / f"s{i}"), storage_writer=w,
                           no_dist=True).result(timeout=60)
    assert sorted(os.listdir(tmp_path)) == ["s2", "s3"]


def test_killed_worker_costs_a_retry_not_the_save(tmp_path):
    """A worker SIGKILLed while it writes: its file goes to the replacement (shard_retries)."""
    import signal

    from _writers import GateWriter
    gate = tmp_path / "gate"
    gate.mkdir()
    cfg = FAST.replace(num_workers=1, shard_retries=1)
    with zckpt.CheckpointPool(config=cfg, writer_factory=GateWriter, writer_kwargs={"gate_dir": str(gate)}) as pool, \
            ZckptWriter(pool=pool) as w:
        fut = dcp.async_save(_state(1), checkpoint_id=str(tmp_path / "ck" / "s1"), storage_writer=w, no_dist=True)
        pid = pool.worker_pids[0]
        dcp_cases_wait(gate / f"started-{pid}")
        os.kill(pid, signal.SIGKILL)
        (gate / "open").touch()
        fut.result(timeout=60)
    _assert_equal(_load(str(tmp_path / "ck" / "s1")), _state(1))


def dcp_cases_wait(path, timeout: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)   # polling cadence; the file decides


# --- saves that fail, and what the next one finds ---------------------------------------------
QUICK = FAST.replace(buffer_wait_timeout_s=10.0, save_timeout_s=60.0)


class Opaque:
    """A value torch's restricted unpickler refuses (a class it does not know)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)


@pytest.mark.parametrize("how", ["existing_path", "unpicklable_value", "pickled_staging"])
def test_a_failed_save_gives_its_staging_buffer_back(tmp_path, how):
    """Whatever fails between stage() and write_data, the next save gets a buffer at once
    (it waited buffer_wait_timeout_s, then failed, when the failed save kept it)."""
    import time
    with ZckptWriter(config=QUICK) as w:
        dcp.async_save(_state(1), checkpoint_id=str(tmp_path / "s1"), storage_writer=w,
                       no_dist=True).result(timeout=60)
        if how == "existing_path":
            with pytest.raises(CheckpointException):
                dcp.async_save(_state(2), checkpoint_id=str(tmp_path / "s1"), storage_writer=w,
                               no_dist=True).result(timeout=60)
        elif how == "unpicklable_value":
            sd = _state(2)
            sd["fn"] = lambda: None               # DCP's torch.save of it fails in write_data
            with pytest.raises(CheckpointException):
                dcp.async_save(sd, checkpoint_id=str(tmp_path / "s2"), storage_writer=w,
                               no_dist=True).result(timeout=60)
        else:   # what DCP's process executor does with a staged state dict
            with pytest.raises(TypeError, match="thread executor"):
                pickle.dumps(w.stage(_state(2)))
        t0 = time.monotonic()
        dcp.async_save(_state(3), checkpoint_id=str(tmp_path / "s3"), storage_writer=w,
                       no_dist=True).result(timeout=60)
        assert time.monotonic() - t0 < QUICK.buffer_wait_timeout_s
    _assert_equal(_load(str(tmp_path / "s3")), _state(3))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_saves_in_flight_commit_in_call_order(tmp_path):
    """The first save has many items (slow to plan and write), the second few: the second
    waits for the first to commit, so latest() and keep_last see them in call order."""
    first = {f"p{i}": torch.full((4,), float(i)) for i in range(5000)}
    with ZckptWriter(config=QUICK.replace(staging_buffers=2, keep_last=1)) as w:
        f1 = dcp.async_save(first, checkpoint_id=str(tmp_path / "step-0"), storage_writer=w, no_dist=True)
        f2 = dcp.async_save({"a": torch.ones(3)}, checkpoint_id=str(tmp_path / "step-1"), storage_writer=w,
                            no_dist=True)
        f1.result(timeout=120)
        f2.result(timeout=120)
    assert os.listdir(tmp_path) == ["step-1"]
    assert zckpt.latest(tmp_path) == str(tmp_path / "step-1")


def test_tensors_in_tuples_are_saved_alone(tmp_path, writer):
    """DCP torch.saves a tuple whole: a staged view there must not drag the arena along."""
    sd = {"big": torch.randn(1 << 20), "pair": (torch.ones(2), 3)}
    dcp.async_save(sd, checkpoint_id=str(tmp_path / "a"), storage_writer=writer, no_dist=True).result(timeout=60)
    on_disk = sum(os.path.getsize(tmp_path / "a" / n) for n in os.listdir(tmp_path / "a"))
    assert on_disk < 1.2 * (4 << 20)
    target = {"big": torch.zeros(1 << 20), "pair": None}
    dcp.load(target, storage_reader=ZckptReader(str(tmp_path / "a")), no_dist=True)
    assert torch.equal(target["big"], sd["big"]) and torch.equal(target["pair"][0], torch.ones(2))
    assert target["pair"][0].untyped_storage().nbytes() == 8


def test_plan_caching_is_refused_clearly(tmp_path, writer):
    from torch.distributed.checkpoint import DefaultSavePlanner
    planner = DefaultSavePlanner(enable_plan_caching=True)
    dcp.save(_state(1), checkpoint_id=str(tmp_path / "s1"), storage_writer=writer, planner=planner, no_dist=True)
    with pytest.raises(CheckpointException) as ei:
        dcp.save(_state(1), checkpoint_id=str(tmp_path / "s2"), storage_writer=writer, planner=planner,
                 no_dist=True)
    assert "plan caching" in _why(ei.value)
    assert not os.path.exists(tmp_path / "s2")


def test_non_tensor_values_load_only_if_the_restricted_unpickler_takes_them(tmp_path, writer):
    sd = {"w": torch.ones(2), "thing": Opaque()}
    dcp.save(sd, checkpoint_id=str(tmp_path / "s"), storage_writer=writer, no_dist=True)
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"w": torch.zeros(2), "thing": None}, storage_reader=ZckptReader(str(tmp_path / "s")),
                 no_dist=True)
    assert "weights_only=False" in _why(ei.value)
    target = {"w": torch.zeros(2), "thing": None}
    dcp.load(target, storage_reader=ZckptReader(str(tmp_path / "s"), weights_only=False), no_dist=True)
    assert target["thing"] == Opaque()


def test_zckpt_load_names_the_dcp_reader_and_inspect_reads_it(tmp_path, writer, capsys):
    from zckpt.cli import main
    dcp.save(_state(1), checkpoint_id=str(tmp_path / "s"), storage_writer=writer, no_dist=True)
    with pytest.raises(zckpt.CorruptCheckpointError, match="ZckptReader"):
        zckpt.load(tmp_path / "s")
    assert main(["inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.checkpoint" in out and "model.w" in out


# --- gloo ranks ------------------------------------------------------------------------------
def test_ranks_round_trip_resharded(tmp_path):
    res = run_ranks(2, dcp_cases.round_trip, str(tmp_path))
    for r in (0, 1):
        assert res[r]["bad_1"] == [] and res[r]["bad_2"] == [], res[r]
    assert res[0]["latest"] == f"{tmp_path}/step-2"
    assert res[0]["listing"] == ["step-1", "step-2"]


def test_other_world_sizes_and_zckpt_distributed_checkpoints(tmp_path):
    path = run_ranks(2, dcp_cases.save_at, str(tmp_path / "dcp"), 4)[0]
    assert run_ranks(3, dcp_cases.load_at, path, 4, "S1") == {0: [], 1: [], 2: []}
    # A checkpoint of zckpt.distributed, read through DCP at another world size.
    zd_path = run_ranks(2, save_with, str(tmp_path / "zd"), None, ["S0"], 6)[0]
    assert run_ranks(1, dcp_cases.load_at, zd_path, 6, "R") == {0: []}
    # And at world size 1 with no process group at all.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dcp_cases.load_at.__doc__


def test_fsdp2_state_through_async_save(tmp_path):
    res = run_ranks(2, dcp_cases.fsdp2, str(tmp_path))
    assert res[0]["bad"] == [] and res[1]["bad"] == []
    assert res[0]["optim_leaves"] >= 12   # step, exp_avg, exp_avg_sq of 4 parameters, and the groups


def test_ddp_state_written_once_loaded_at_world_size_one(tmp_path):
    import torch.distributed.checkpoint.state_dict as dsd
    res = run_ranks(2, dcp_cases.ddp, str(tmp_path))
    # Replicated tensors are written by one rank each (DCP's dedup), spread over both.
    assert any(f.startswith("__0_") for f in res[0]["files"]) and any(f.startswith("__1_") for f in res[0]["files"])
    model = dcp_cases._model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    dcp_cases._train(model, opt, 1, seed=7)
    msd, osd = dsd.get_state_dict(model, opt)
    target = {"model": msd, "optim": osd}
    dcp.load(target, storage_reader=ZckptReader(f"{tmp_path}/ddp"), no_dist=True)
    assert set(res[0]["model"]) == set(target["model"])
    for k, (values, dtype) in res[0]["model"].items():
        want = torch.tensor(values, dtype=getattr(torch, dtype.split(".")[1]))
        assert torch.equal(target["model"][k], want), k


def test_ranks_with_nothing_to_write_and_no_collectives(tmp_path):
    """One replicated tensor at 2 ranks: DCP gives one rank nothing to write; its staging
    goes back all the same (three saves in a row). use_collectives=False is refused."""
    res = run_ranks(2, dcp_cases.replicated_few, str(tmp_path))
    for r in (0, 1):
        assert res[r]["latest"] == f"{tmp_path}/step-3", res[r]
        assert "use_collectives" in res[r]["no_collectives"], res[r]
    assert not os.path.exists(f"{tmp_path}/nocoll")


def test_a_rank_failing_fails_the_save_everywhere(tmp_path):
    res = run_ranks(2, dcp_cases.failure, str(tmp_path), timeout=200)
    for r in (0, 1):
        assert res[r]["failed"] and "simulated disk full" in res[r]["failed"], res[r]
        assert not res[r]["step2_exists"]
        assert res[r]["latest_after_failure"] == f"{tmp_path}/step-1"
        assert res[r]["latest"] == f"{tmp_path}/step-3"
        assert res[r]["leftovers"] == []
