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
from zckpt.tree import (
    Collector,
    decode_path,
    display_path,
    dump_skeleton,
    encode_path,
    iter_tensors,
    load_skeleton,
    path_key,
)


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


_HDR = b"\x01" + P.VERSION.to_bytes(2, "big") + bytes(32)  # HELLO, this version, no proof


@pytest.mark.parametrize("frames, match", [
    ([b"", b"\x01", b"x"], "2 frames"),
    ([b"x", _HDR + b"\x90"], "delimiter"),
    ([b"", b"\x63" + _HDR[1:] + b"\x90"], "unknown message kind"),
    ([b"", _HDR], "too short"),
    ([b"", _HDR + b"\xc1not msgpack"], "does not decode"),
    ([b"", _HDR + pickle.dumps(P.Empty())], "does not decode|not \\[type index"),
    ([b"", _HDR + b"\x91\x00"], "expected 3 fields"),                 # [0]: a Hello without fields
    ([b"", _HDR + b"\x94\x00\x01\xa1x\x03"], "slot: str is not int"),  # [0, 1, "x", 3]
    ([b"", b"\x01\x00\x09" + bytes(32) + b"\x94\x00\x01\x02\x03"], "protocol version 9"),
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


def test_key_paths_are_typed_and_displayed_unambiguously():
    od = collections.OrderedDict(w=torch.ones(2))
    od._metadata = {"": {"version": 1}}
    tree = {"m": od, 3: [torch.zeros(1), ("a", None)], "3": torch.ones(1), "a.b": torch.ones(1),
            "a": {"b": torch.ones(1)}, (1, 2): torch.ones(1), "p": Point(1, torch.ones(1))}
    paths = [p for p, _ in iter_tensors(tree)]
    assert paths == [("m", "w"), (3, 0), ("3",), ("a.b",), ("a", "b"), ((1, 2),), ("p", 1)]
    shown = [display_path(p) for p in paths]
    assert shown == ["m.w", "[3][0]", "['3']", "['a.b']", "a.b", "[(1, 2)]", "p[1]"]
    assert len(set(shown)) == len(shown)
    for p in paths:
        assert decode_path(encode_path(p)) == p
        assert path_key(json_round(encode_path(p))) == path_key(encode_path(p))
    assert len({path_key(encode_path(p)) for p in paths}) == len(paths)
    # nan keys match themselves; an unrecorded key type never equals a look-alike tuple
    nan = float("nan")
    assert path_key(encode_path((nan,))) == path_key(json_round(encode_path((nan,))))
    odd = decode_path(encode_path((frozenset({1, 2}),)))
    assert odd != (("builtins.frozenset", "frozenset({1, 2})"),)
    assert odd == decode_path(encode_path((frozenset({1, 2}),)))


def json_round(x):
    import json
    return json.loads(json.dumps(x))


def test_iter_tensors_survives_cycles_and_walks_shared_containers_twice():
    shared = {"t": torch.ones(1)}
    loop: list = [shared]
    loop.append(loop)
    tree = {"x": shared, "y": shared, "loop": loop}
    assert [p for p, _ in iter_tensors(tree)] == [("x", "t"), ("y", "t"), ("loop", 0, "t")]


def test_skeleton_pickle_keeps_types_and_identities():
    od = collections.OrderedDict(w=torch.ones(2))
    od._metadata = {"": {"version": 1}}
    w = torch.arange(6.0)
    tree = {"m": od, "p": Point(1, w), "again": w, "inf": math.inf, "c": collections.Counter(a=2)}
    c = Collector()
    c.walk(tree)
    blob = dump_skeleton(tree, c)
    assert b"arange" not in blob and len(blob) < 1024
    tensors = [t for _, t in c.tensors]
    back = load_skeleton(blob, lambda i: tensors[i], lambda sid, dt: None, weights_only=False)
    assert back["m"]._metadata == {"": {"version": 1}} and isinstance(back["m"], collections.OrderedDict)
    assert type(back["p"]) is Point and back["p"].y is w and back["again"] is w
    assert back["inf"] == math.inf and type(back["c"]) is collections.Counter
    assert c.storage_of == [0, 1, 1]


# --- planning ------------------------------------------------------------------------
def _collect(obj):
    c = Collector()
    c.walk(obj)
    return collect_storages(c)


def _plan(tensors, workers, **kw):
    storages, infos = _collect(tensors)
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
    storages, infos = _collect({"a": w, "b": w.t(), "c": w[3]})
    assert len(storages) == 1 and [i.sid for i in infos] == [0, 0, 0]
    assert infos[2].storage_offset == 30


def test_public_names_resolve_lazily():
    import zckpt
    assert sorted(set(zckpt.__all__) - {"__version__"}) == sorted(zckpt._EXPORTS)
    import importlib
    for name in sorted(set(zckpt.__all__) - {"__version__"}):
        # The very object its module defines (not the module, nor a stand-in).
        home = importlib.import_module(f"zckpt.{zckpt._EXPORTS[name]}")
        assert getattr(zckpt, name) is getattr(home, name), name
        assert getattr(zckpt, name).__name__ == name
    assert isinstance(zckpt.__version__, str) and zckpt.__version__.count(".") == 2
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zckpt.nope  # noqa: B018


class Box:
    def __init__(self, *ts):
        self.ts = ts


def test_plan_entry_names_are_unique_even_when_names_repeat():
    c = Collector()
    tree = {"box": Box(torch.ones(3), torch.zeros(5))}
    c.walk(tree)
    dump_skeleton(tree, c)      # the two tensors are found inside the object: no key path
    storages, infos = collect_storages(c)
    assert [i.path for i in infos] == [None, None]
    plan = plan_save(storages, infos, 1)
    names = [p.name for p in plan.shards[0].pieces]
    assert len(names) == 2 and len(set(names)) == 2
