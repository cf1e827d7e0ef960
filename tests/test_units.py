"""Pure functions and small classes: config, protocol, tree encoding, shard planning."""

from __future__ import annotations

import collections
import math
import pickle

import pytest
import torch

from zckpt import PoolConfig
from zckpt import protocol as P
from zckpt.errors import ZckptError, describe_exit, pack_exception, unpack_exception
from zckpt.plan import collect_storages, plan_save
from zckpt.tree import TensorRef, flatten, from_json, to_json, unflatten


# --- config --------------------------------------------------------------------------
def test_config_defaults_and_units():
    cfg = PoolConfig()
    assert cfg.num_workers == 2 and cfg.heartbeat_liveness == 3
    assert isinstance(cfg.heartbeat_interval_s, float)
    assert cfg.dead_after_s == cfg.heartbeat_interval_s * 3
    assert PoolConfig(init_timeout_s=5).init_timeout_s == 5.0


@pytest.mark.parametrize("field, value", [
    ("num_workers", 0), ("num_workers", 1.5), ("num_workers", True), ("heartbeat_interval_s", 0),
    ("heartbeat_interval_s", -1.0), ("init_timeout_s", "3"), ("split", "random"), ("checksum", "md5"),
    ("staging_buffers", 0), ("fsync", "yes"), ("keep_last", 0),
])
def test_config_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PoolConfig(**{field: value})


def test_config_from_toml(tmp_path):
    path = tmp_path / "fanout.toml"
    path.write_text('num_workers = 4\nsplit = "round_robin"\nheartbeat_interval_s = 0.5\nmirrors = ["m"]\n')
    cfg = PoolConfig.from_toml(path)
    assert cfg.num_workers == 4 and cfg.split == "round_robin" and cfg.heartbeat_interval_s == 0.5
    assert cfg.mirrors == (str(tmp_path / "m"),)  # relative to the file
    table = tmp_path / "table.toml"
    table.write_text("[pool]\nnum_workers = 3\n")
    assert PoolConfig.from_toml(table).num_workers == 3


@pytest.mark.parametrize("text, match", [
    ("num_workerz = 4\n", "unknown key.*num_workerz"),
    ("num_workers = -1\n", "num_workers"),
    ('split = 3\n', "split"),
    ('mirrors = "one"\n', "mirrors"),
    ("num_workers = \n", "not valid TOML"),
])
def test_config_from_toml_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        PoolConfig.from_toml(path)
    assert "bad.toml" in str(info.value)


# --- protocol ------------------------------------------------------------------------
def test_protocol_round_trip():
    msg = P.Hello(pid=12, slot=1, generation=3)
    kind, body = P.decode(P.encode(P.Kind.HELLO, msg))
    assert kind is P.Kind.HELLO and body == msg
    assert P.parse_id(P.command_id(2, 5)) == ("w", 2, 5)
    assert P.parse_id(P.heartbeat_id(0, 0)) == ("h", 0, 0)
    assert P.parse_id(b"\xff\x00") is None and P.parse_id(b"x-1-2") is None


@pytest.mark.parametrize("frames, match", [
    ([b"", b"\x01", b"x"], "2 frames"),
    ([b"x", b"\x01" + pickle.dumps(P.Empty())], "delimiter"),
    ([b"", b"\x63" + pickle.dumps(P.Empty())], "unknown message kind"),
    ([b"", b"\x01"], "too short"),
    ([b"", b"\x01not a pickle"], "does not unpickle"),
    ([b"", b"\x01" + pickle.dumps(P.Empty())], "HELLO body is a Empty"),
])
def test_protocol_rejects_bad_frames(frames, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(frames)


def test_encode_refuses_wrong_body():
    with pytest.raises(TypeError):
        P.encode(P.Kind.HELLO, P.Empty())


# --- errors --------------------------------------------------------------------------
def test_remote_exception_round_trip():
    try:
        raise KeyError("missing shard")
    except KeyError as exc:
        blob, text = pack_exception(exc)
    rebuilt = unpack_exception(blob, text, "in worker 1")
    assert isinstance(rebuilt, KeyError) and "missing shard" in str(rebuilt.__cause__)
    assert unpack_exception(blob, text, "x") is not rebuilt  # a fresh object per raise
    fallback = unpack_exception(None, "Traceback...\nWeirdError: boom\n", "in worker 0")
    assert isinstance(fallback, ZckptError) and "WeirdError: boom" in str(fallback)


def test_describe_exit():
    assert describe_exit(-9).startswith("SIGKILL(-9)")
    assert describe_exit(3) == "exit code 3"
    assert "segmentation" in describe_exit(-11)


# --- tree ----------------------------------------------------------------------------
Point = collections.namedtuple("Point", "x y")


def test_flatten_unflatten_and_json():
    od = collections.OrderedDict(w=torch.ones(2))
    od._metadata = {"": {"version": 1}}
    tree = {"m": od, 3: [torch.zeros(1), ("a", None)], (1, 2): 1.5, "inf": math.inf, "p": Point(1, torch.ones(1))}
    skel, tensors = flatten(tree)
    assert [k for k, _ in tensors] == ["m.w", "3.0", "p.1"]
    assert isinstance(skel["m"]["w"], TensorRef)
    back = unflatten(from_json(to_json(skel)), [t for _, t in tensors])
    assert back["m"]._metadata == {"": {"version": 1}} and isinstance(back["m"], collections.OrderedDict)
    assert back[3][1] == ("a", None) and back[(1, 2)] == 1.5 and back["inf"] == math.inf
    assert type(back["p"]) is Point and back["p"].y is tensors[2][1]


# --- planning ------------------------------------------------------------------------
def _plan(tensors, workers, **kw):
    storages, infos = collect_storages(list(tensors.items()))
    return plan_save(storages, infos, workers, **kw)


def test_plan_balances_equal_tensors():
    plan = _plan({f"t{i}": torch.empty(1000) for i in range(32)}, 4)
    assert len(plan.shards) == 4
    assert [len(s.pieces) for s in plan.shards] == [8, 8, 8, 8]


def test_plan_largest_first_is_close_to_optimal():
    sizes = [97, 85, 70, 66, 51, 40, 33, 30, 22, 18, 11, 9, 5, 3]
    plan = _plan({f"t{i}": torch.empty(n * 1024, dtype=torch.uint8) for i, n in enumerate(sizes)}, 3)
    loads = [sum(p.nbytes for p in s.pieces) for s in plan.shards]
    assert max(loads) <= (sum(sizes) * 1024 / 3) * 4 / 3


def test_plan_splits_a_huge_tensor_across_workers():
    plan = _plan({"big": torch.empty(64 << 20, dtype=torch.uint8), "small": torch.empty(10)}, 4)
    parts = [p for s in plan.shards for p in s.pieces if p.sid == 0]
    assert len(parts) == 4 and sum(p.nbytes for p in parts) == 64 << 20
    assert all(p.start % 4096 == 0 for p in parts)
    no_split = _plan({"big": torch.empty(64 << 20, dtype=torch.uint8)}, 4, split_large=False)
    assert len(no_split.shards) == 1


def test_plan_entries_are_self_aligned():
    tensors = {"u8": torch.empty(3, dtype=torch.uint8), "f64": torch.empty(3, dtype=torch.float64),
               "f16": torch.empty(3, dtype=torch.float16), "c128": torch.empty(1, dtype=torch.complex128)}
    plan = _plan(tensors, 1)
    for p in plan.shards[0].pieces:
        assert p.file_offset % p.itemsize == 0, p.name
    assert (len(plan.shards[0].header)) % 64 == 0


def test_plan_stores_shared_storage_once():
    w = torch.empty(10, 10)
    storages, infos = collect_storages([("a", w), ("b", w.t()), ("c", w[3])])
    assert len(storages) == 1 and [i.sid for i in infos] == [0, 0, 0]
    assert infos[2].storage_offset == 30


def test_public_names_resolve_lazily():
    import zckpt
    assert sorted(set(zckpt.__all__) - {"__version__"}) == sorted(zckpt._EXPORTS)
    for name in zckpt.__all__:
        assert getattr(zckpt, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zckpt.nope  # noqa: B018
