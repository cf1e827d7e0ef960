"""zckpt.distributed on gloo ranks spawned from the test (see dist_helpers, dist_cases)."""

from __future__ import annotations

import os

import pytest
import torch
from dist_cases import SHAPES, full, round_trip
from dist_helpers import run_ranks

import zckpt
from zckpt.distributed.boxes import Box, assign_owners, intersect, shard_box, split_dim
from zckpt.distributed.plan import plan_rank

pytestmark = pytest.mark.timeout(240)


# --- pure planning: no processes --------------------------------------------------------------
@pytest.mark.parametrize("length", [0, 1, 5, 7, 10, 16])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_split_dim_is_torch_chunk(length, parts):
    pieces = torch.arange(length).chunk(parts) if length else ()
    got = [split_dim(length, parts, i) for i in range(parts)]
    want = [(int(p[0]) if len(p) else length, len(p)) for p in pieces]
    want += [(length, 0)] * (parts - len(want))   # torch.chunk drops trailing empty parts
    assert [n for _, n in got] == [n for _, n in want]
    assert [o for (o, n) in got if n] == [o for (o, n) in want if n]


@pytest.mark.parametrize("mesh_shape, placements", [
    ((4,), [("shard", 0)]), ((4,), [("shard", 1)]), ((2, 2), [("replicate", -1), ("shard", 0)]),
    ((2, 2), [("shard", 0), ("shard", 1)]), ((2, 3), [("shard", 0), ("shard", 0)]), ((3,), [("replicate", -1)]),
])
def test_shard_box_matches_dtensor(mesh_shape, placements):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    pl = [Replicate() if k == "replicate" else Shard(d) for k, d in placements]
    for global_shape in [(10, 7), (3, 5), (1, 9)]:
        for coord in _coords(mesh_shape):
            box = shard_box(global_shape, mesh_shape, coord, placements)
            shape, offset = _compute_local_shape_and_global_offset(global_shape, mesh_shape, list(coord), pl)
            assert box.size == tuple(shape), (global_shape, coord)
            if box.numel:
                assert box.offset == tuple(offset), (global_shape, coord)


def _coords(shape):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _coords(shape[1:]):
            yield (i, *rest)


def test_intersect():
    a = Box((0, 0), (5, 4), (10, 4))
    assert intersect(a, Box((3, 2), (5, 2), (10, 4))) == Box((3, 2), (2, 2), (10, 4))
    assert intersect(a, Box((5, 0), (5, 4), (10, 4))) is None


def test_replicated_bytes_are_balanced_on_a_ddp_state_dict():
    """Many replicated tensors of mixed sizes: every rank computes the same owners, and
    max/mean bytes per rank stays under 1.1 (DCP's in-order dedup: 1.8x max/min)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.{name}": torch.empty(int(n)) for i in range(24)
          for name, n in (("weight", torch.randint(1000, 40000, (1,), generator=g)),
                          ("bias", torch.randint(10, 400, (1,), generator=g)))}
    for world in (2, 3, 4, 8):
        ranks = list(range(world))
        plan = plan_rank(sd, ranks)
        per_rank = plan.bytes_per_rank(ranks)
        assert sum(per_rank.values()) == sum(t.nbytes for t in sd.values())
        mean = sum(per_rank.values()) / world
        assert max(per_rank.values()) / mean <= 1.1, (world, per_rank)
        assert plan_rank(sd, ranks).owners == plan.owners   # deterministic


def test_assign_owners_prefers_the_least_loaded_candidate():
    owners = assign_owners([(100, (0,)), (60, (0, 1)), (50, (0, 1)), (10, (0, 1))], [0, 1])
    assert owners == [0, 1, 1, 0] or owners == [0, 1, 1, 1]
    assert assign_owners([(5, (2,))], [0, 1, 2]) == [2]


# --- ranks ---------------------------------------------------------------------------------------
def test_two_ranks_round_trip_reshard_and_load_whole(tmp_path):
    res = run_ranks(2, round_trip, str(tmp_path))
    for r in (0, 1):
        assert res[r]["paths"] == [str(tmp_path / "step-1"), str(tmp_path / "step-2")]
        assert res[r]["bad_resharded"] == [], r
        assert res[r]["tied_kept"]
    assert res[0]["bad_whole"] == []
    assert res[0]["whole_view_shared"]
    assert res[0]["latest"] == str(tmp_path / "step-2")
    assert not [n for n in os.listdir(tmp_path) if ".dtmp-" in n]
    m = zckpt.manifest.read_manifest(str(tmp_path / "step-2"))
    assert m.version == 3 and {f.rank for f in m.files} == {0, 1}
    whole = zckpt.load(tmp_path / "step-1")       # in this process: no process group at all
    for k, s in SHAPES.items():
        assert torch.equal(whole[k], full(k, s, step=1))


def test_four_ranks_and_a_2x2_mesh_load_at_1_2_3_4(tmp_path):
    from dist_cases import load_at, save_with
    # HSDP-like: replicate across the first mesh dim, shard across the second.
    saved = run_ranks(4, save_with, str(tmp_path / "hsdp"), (2, 2), ["R", "S0"], 5)[0]
    for world, mesh_shape, pl in [(1, None, ["S0"]), (2, None, ["S1"]), (3, None, ["S0"]), (4, (2, 2), ["S1", "S0"])]:
        res = run_ranks(world, load_at, saved, 5, mesh_shape, pl)
        assert all(v == [] for v in res.values()), (world, res)


@pytest.mark.parametrize("kind", ["writer_raises", "worker_killed", "never_reports"])
def test_a_failure_on_one_rank_aborts_the_save_on_every_rank(tmp_path, kind):
    from dist_cases import failure
    res = run_ranks(2, failure, str(tmp_path), kind, timeout=200)
    for r in (0, 1):
        f = res[r]["failed"]
        assert f is not None and f["type"] == "CheckpointAborted", (r, res[r])
        assert 1 in f["ranks"], (r, f)
        assert not res[r]["step2_exists"]
        assert res[r]["latest_after_failure"] == str(tmp_path / "step-1")
        assert res[r]["recovered"] == str(tmp_path / "step-3")
    if kind == "never_reports":
        assert "did not report" in res[0]["failed"]["message"]
        assert res[0]["failed_after_s"] < 3.0 + 10   # commit_timeout_s plus a margin
    assert res[0]["leftovers"] == []
    zckpt.load(tmp_path / "step-1")
    zckpt.load(tmp_path / "step-3")


def test_ranks_that_disagree_on_the_structure_fail_naming_the_key(tmp_path):
    from dist_cases import mismatch
    res = run_ranks(2, mismatch, str(tmp_path))
    for r in (0, 1):
        assert res[r]["failed"] is not None and "only_on_rank_1" in res[r]["failed"], res[r]
        assert "value_only_on_rank_1" in res[r]["failed"], res[r]
        assert not res[r]["exists"]


def test_saves_commit_while_the_main_threads_all_reduce(tmp_path):
    from dist_cases import busy_collectives
    res = run_ranks(2, busy_collectives, str(tmp_path))
    assert res[0]["paths"] == res[1]["paths"] == [str(tmp_path / f"step-{i}") for i in range(3)]
    assert res[0]["reduces"] == res[1]["reduces"] >= 60


def test_fsdp2_model_and_optimizer_state(tmp_path):
    from dist_cases import fsdp2
    res = run_ranks(2, fsdp2, str(tmp_path))
    assert res[0]["bad_model"] == [] and res[1]["bad_model"] == []
    assert res[0]["bad_whole"] == []


def test_a_dead_coordinator_aborts_the_save_on_the_other_ranks(tmp_path):
    from dist_cases import coordinator_dies
    res = run_ranks(2, coordinator_dies, str(tmp_path), allow_missing=frozenset({0}))
    got = res[1]
    assert got["failed"] == [0], got
    assert "no verdict from the coordinator (rank 0)" in got["message"]
    assert got["after_s"] < 2 * 3.0 + 10
    assert not got["exists"] and got["latest"] == str(tmp_path / "step-1")


@pytest.mark.parametrize("which", ["extra_key", "shape"])
def test_a_load_that_cannot_be_satisfied_fails_on_every_rank_naming_the_key(tmp_path, which):
    from dist_cases import load_mismatch, save_with
    path = run_ranks(2, save_with, str(tmp_path), None, ["S0"], 1)[0]
    res = run_ranks(2, load_mismatch, path, which)
    if which == "extra_key":
        assert "KeyError" in res[1] and "not_saved" in res[1], res
        assert "RuntimeError" in res[0] and "another rank" in res[0], res
    else:
        assert all("ValueError" in v and "rep" in v for v in res.values()), res


def test_a_subgroup_and_the_world_each_agree_on_their_own_run(tmp_path):
    from dist_cases import subgroup_then_world
    res = run_ranks(3, subgroup_then_world, str(tmp_path))
    assert res[0]["sub"] == res[1]["sub"] == str(tmp_path / "sub")
    assert "not in the process group" in res[2]["nonmember"]
    assert {r["world"] for r in res.values()} == {str(tmp_path / "world")}
    assert zckpt.load(tmp_path / "world")["y"].tolist() == [0.0, 1.0, 2.0, 3.0]
