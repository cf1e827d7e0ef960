"""The manifest schema (zckpt.manifest): records, build, parse, versions, and every check.

Most of this needs no pool and no torch: the schema is torch-free (workers write the
manifest and start without torch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from zckpt.errors import CorruptCheckpointError
from zckpt.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    TREE_ENCODING,
    CommitRecord,
    FileRecord,
    Manifest,
    PartRecord,
    StorageRecord,
    TensorRecord,
    build_manifest,
    checksum_hex,
    parse_manifest,
    read_manifest,
    read_manifest_body,
    validate_body,
    with_commit_record,
    write_manifest,
)

pytestmark = pytest.mark.timeout(120)

# A manifest exactly as zckpt (format version 2) wrote it before the schema had records:
# {"w": w, "wt": w.t(), 3: complex.conj(), ("k", 1): empty, "step": 7}, two workers.
GOLDEN_V2 = (
    '{"zckpt_manifest":{"commit":{"sequence":1,"unix_time_ns":1796089957409714250},"format":"zckpt","version":2,'
    '"checksum":"xxh3_64","tree":{"encoding":"pickle-2+zckpt-persistent-ids","b64":"gAJ9cQAoWAEAAAB3cQFYBwAAAHN0b3'
    'JhZ2VxAlgMAAAAemNrcHQudGVuc29ycQNLAIdxBFFYAgAAAHd0cQVoAmgDSwGHcQZRSwNoAmgDSwKHcQdRWAEAAABrcQhLAYZxCWgCaANLA4dx'
    'ClFYBAAAAHN0ZXBxC0sHdS4="},"metadata":{"run":"r1"},"torch_version":"2.13.0+cpu","files":[{"name":"shard-00000-'
    'of-00002.safetensors","nbytes":216,"worker":0,"chunks":[[0,192],[192,24]],"checksums":["22910536744a2cd2","dcd21'
    'c42ccaa9d2a"],"write_s":8.4e-05,"hash_s":5e-06},{"name":"shard-00001-of-00002.safetensors","nbytes":208,"worker'
    '":1,"chunks":[[0,192],[192,16]],"checksums":["b64c2bd35216151b","2fd785a6a8b2463b"],"write_s":9.4e-05,"hash_s":'
    '3e-06}],"storages":[{"nbytes":24,"device":"cpu","parts":[{"file":0,"offset":192,"start":0,"nbytes":24,"entry":"'
    'w"}]},{"nbytes":16,"device":"cpu","parts":[{"file":1,"offset":192,"start":0,"nbytes":16,"entry":"[3]"}]},{"nbyt'
    'es":0,"device":"cpu","parts":[]}],"tensors":[{"path":["w"],"name":"w","storage":0,"dtype":"float32","shape":[2,3'
    '],"stride":[3,1],"offset":0,"param":false,"requires_grad":false},{"path":["wt"],"name":"wt","storage":0,"dtype":'
    '"float32","shape":[3,2],"stride":[1,3],"offset":0,"param":false,"requires_grad":false},{"path":[{"@":"int","v":'
    '"3"}],"name":"[3]","storage":1,"dtype":"complex64","shape":[2],"stride":[1],"offset":0,"param":false,"requires_'
    'grad":false,"conj":true},{"path":[{"@":"tuple","v":["k",{"@":"int","v":"1"}]}],"name":"[(\'k\', 1)]","storage":2'
    ',"dtype":"float32","shape":[0],"stride":[1],"offset":0,"param":false,"requires_grad":false}],"created_unix":1796'
    '089957.3969815},"xxh3_64":"0bebdd6127520a3c"}'
)


def golden() -> dict[str, Any]:
    return json.loads(GOLDEN_V2)["zckpt_manifest"]


def sample_records() -> dict[str, Any]:
    """One of every record kind, optional fields set and not."""
    files = [
        FileRecord(name="shard-00000-of-00002.safetensors", nbytes=300, worker=0, chunks=((0, 100), (100, 200)),
                   checksums=("aa", "bb"), write_s=0.5, hash_s=0.25),
        FileRecord(name="shard-00001-of-00002.safetensors", nbytes=164, worker=1, chunks=((0, 100), (100, 64)),
                   checksums=("cc", "dd"), write_s=0.125, hash_s=0.0, rank=3),
    ]
    storages = [
        StorageRecord(nbytes=200, device="cpu",
                      parts=(PartRecord(file=0, offset=100, start=0, nbytes=200, entry="a"),)),
        StorageRecord(nbytes=64, device="cuda:0", rank=3,
                      parts=(PartRecord(file=1, offset=100, start=0, nbytes=64, entry="b#part0"),)),
        StorageRecord(nbytes=0, device="cpu", parts=()),
    ]
    tensors = [
        TensorRecord(path=("a",), name="a", storage=0, dtype="float32", shape=(10, 5), stride=(5, 1), offset=0,
                     param=True, requires_grad=True),
        TensorRecord(path=({"@": "int", "v": "3"}, {"@": "tuple", "v": ("k", {"@": "int", "v": "1"})}),
                     name="[3][('k', 1)]", storage=1, dtype="complex64", shape=(8,), stride=(1,), offset=0,
                     conj=True, neg=True, global_offset=(8,), global_shape=(32,)),
        TensorRecord(path=None, name="<inside an object>", storage=2, dtype="float32", shape=(0,), stride=(1,),
                     offset=0),
    ]
    return dict(checksum="xxh3_64", tree={"encoding": TREE_ENCODING, "b64": "gAJdcQAu"},
                metadata={"run": "r1", "step": [1, 2]}, torch_version="2.13.0", files=files, storages=storages,
                tensors=tensors, created_unix=1700000000.5)


# --- round trips ---------------------------------------------------------------------------------
def test_every_record_kind_round_trips_through_json():
    parts = sample_records()
    body = build_manifest(**parts)
    back = parse_manifest(json.loads(json.dumps(body)), "test")
    assert back.files == tuple(parts["files"])
    assert back.storages == tuple(parts["storages"])
    assert back.tensors == tuple(parts["tensors"])
    assert (back.version, back.checksum, back.tree, back.metadata, back.torch_version, back.created_unix) == (
        FORMAT_VERSION, "xxh3_64", parts["tree"], parts["metadata"], "2.13.0", 1700000000.5)
    assert back.commit is None and back.checks and back.nbytes == 264
    assert back.to_json() == body
    assert back.storages[1].parts[0] == PartRecord(file=1, offset=100, start=0, nbytes=64, entry="b#part0")


def test_the_commit_record_round_trips_first():
    body = with_commit_record(build_manifest(**sample_records()), 7, 123)
    back = parse_manifest(json.loads(json.dumps(body)), "test")
    assert back.commit == CommitRecord(7, 123)
    out = back.to_json()
    assert out == body and list(out)[0] == "commit"


def test_a_manifest_as_zckpt_wrote_it_reads_and_rewrites_byte_for_byte():
    """The on-disk layout did not change: the same keys, in the same order."""
    body = golden()
    m = parse_manifest(body, "golden")
    assert [t.name for t in m.tensors] == ["w", "wt", "[3]", "[('k', 1)]"]
    assert m.tensors[2].conj and not m.tensors[2].neg and m.tensors[0].path == ("w",)
    assert m.files[1] == FileRecord("shard-00001-of-00002.safetensors", 208, 1, ((0, 192), (192, 16)),
                                    ("b64c2bd35216151b", "2fd785a6a8b2463b"), 9.4e-05, 3e-06)
    assert m.commit == CommitRecord(1, 1796089957409714250)
    assert json.dumps(m.to_json(), separators=(",", ":")) == json.dumps(body, separators=(",", ":"))
    rebuilt = build_manifest(checksum=m.checksum, tree=m.tree, metadata=m.metadata, torch_version=m.torch_version,
                             files=m.files, storages=m.storages, tensors=m.tensors, created_unix=m.created_unix)
    assert json.dumps(with_commit_record(rebuilt, 1, 1796089957409714250)) == json.dumps(body)


def test_write_then_read_a_directory(tmp_path):
    body = with_commit_record(build_manifest(**sample_records()), 2, 5)
    write_manifest(str(tmp_path), body, fsync=False)
    assert read_manifest(str(tmp_path)) == parse_manifest(body, "x")
    assert read_manifest_body(str(tmp_path)) == body
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["xxh3_64"] == checksum_hex(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def test_multi_rank_fields_default_to_none_and_stay_out_of_the_json():
    f = FileRecord(name="f", nbytes=1, worker=0, chunks=((0, 1),))
    st = StorageRecord(nbytes=1, device="cpu", parts=())
    t = TensorRecord(path=("x",), name="x", storage=0, dtype="uint8", shape=(1,), stride=(1,), offset=0)
    assert f.rank is None and st.rank is None and t.global_offset is None and t.global_shape is None
    assert "rank" not in f.to_json() and "rank" not in st.to_json()
    assert "global_offset" not in t.to_json() and "global_shape" not in t.to_json()
    assert "conj" not in t.to_json() and "neg" not in t.to_json()   # as zckpt has always written them
    assert f.checksums is None and "checksums" not in f.to_json() and "write_s" not in f.to_json()
    ranked = parse_manifest(build_manifest(**sample_records()), "x")
    assert ranked.files[1].rank == 3 and ranked.storages[1].rank == 3
    assert (ranked.tensors[1].global_offset, ranked.tensors[1].global_shape) == ((8,), (32,))
    assert '"rank": 3' in json.dumps(ranked.files[1].to_json())


def test_keys_a_reader_does_not_know_are_ignored():
    body = golden()
    body["index"] = {"ranks": 4}
    body["files"][0]["future"] = 1
    body["tensors"][0]["future"] = [1]
    assert parse_manifest(body, "x").tensors == parse_manifest(golden(), "x").tensors


def test_records_are_immutable():
    rec = sample_records()["tensors"][0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.offset = 3
    assert not hasattr(rec, "__dict__")  # slots


def test_the_schema_module_does_not_import_torch():
    code = "import sys, zckpt.manifest; assert 'torch' not in sys.modules, 'zckpt.manifest imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- versions --------------------------------------------------------------------------------------
def v1_body() -> dict[str, Any]:
    """A version-1 manifest: tagged-JSON tree, tensor records with a joined "key"."""
    body = golden()
    body.pop("commit")
    body["version"] = 1
    body["tree"] = {"@": "dict", "items": [["w", {"@": "tensor", "i": 0}], ["wt", {"@": "tensor", "i": 1}]]}
    body["tensors"] = [{"key": t["name"], **{k: v for k, v in t.items() if k not in ("path", "name")}}
                       for t in body["tensors"][:2]]
    return body


def test_a_version_1_manifest_still_parses():
    body = v1_body()
    m = parse_manifest(body, "v1")
    assert m.version == 1 and m.tree == body["tree"] and m.commit is None
    assert [(t.name, t.path) for t in m.tensors] == [("w", None), ("wt", None)]
    assert m.to_json() == body   # written back in its own version's layout


@pytest.mark.parametrize("version", [max(READABLE_VERSIONS) + 1, 99])
def test_a_newer_version_is_refused_with_upgrade_advice(version):
    body = golden()
    body["version"] = version
    with pytest.raises(CorruptCheckpointError, match=rf"format version {version} was written by a newer zckpt.*"
                                                     r"upgrade zckpt"):
        parse_manifest(body, "here")


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, None, True])
def test_an_unknown_version_is_refused(version):
    body = golden()
    body["version"] = version
    with pytest.raises(CorruptCheckpointError, match=rf"format version {re.escape(repr(version))} is not supported"):
        parse_manifest(body, "here")
    assert READABLE_VERSIONS == (1, 2, 3)


@pytest.mark.parametrize("fmt", [None, "zckpt2", 1])
def test_another_format_is_refused(fmt):
    body = golden()
    body["format"] = fmt
    with pytest.raises(CorruptCheckpointError, match=r"not a zckpt manifest \(format="):
        parse_manifest(body, "here")


# --- every check -----------------------------------------------------------------------------------
def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, key, value = path_and_value

    def edit(body: dict[str, Any]) -> None:
        node: Any = body
        for p in path:
            node = node[p]
        node[key] = value
    return edit


def _drop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        node: Any = body
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    return edit


# (id, edit of a valid body, the field the message must name). Ranges are off by one byte
# (the valid body's last chunk and parts end exactly at their file's and storage's end).
CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("checksum-algorithm", _set("checksum", "sha1"), "checksum"),
    ("tree-not-a-record", _set("tree", "gAJ9"), "tree"),
    ("tree-encoding", _set("tree", "encoding", "json"), "tree"),
    ("tree-b64", _set("tree", "b64", 7), "tree"),
    ("torch-version", _set("torch_version", 2), "torch_version"),
    ("created-unix", _set("created_unix", "yesterday"), "created_unix"),
    ("no-files", _drop("files"), "files, storages and tensors"),
    ("storages-dict", _set("storages", {"x": 1}), "files, storages and tensors"),
    ("no-tensors", _drop("tensors"), "files, storages and tensors"),
    # files
    ("file-not-object", _set("files", 0, ["x"]), "files[0]"),
    ("file-name-missing", _drop("files", 0, "name"), "files[0].name"),
    ("file-name-relative", _set("files", 0, "name", "../../etc/passwd"), "files[0].name"),
    ("file-name-absolute", _set("files", 0, "name", "/etc/passwd"), "files[0].name"),
    ("file-name-empty", _set("files", 0, "name", ""), "files[0].name"),
    ("file-name-dotdot", _set("files", 0, "name", ".."), "files[0].name"),
    ("file-name-backslash", _set("files", 0, "name", "a\\b"), "files[0].name"),
    ("file-name-nul", _set("files", 0, "name", "a\0b"), "files[0].name"),
    ("file-nbytes-negative", _set("files", 0, "nbytes", -1), "files[0].nbytes"),
    ("file-nbytes-bool", _set("files", 0, "nbytes", True), "files[0].nbytes"),
    ("file-worker", _drop("files", 0, "worker"), "files[0].worker"),
    ("chunks-not-list", _set("files", 0, "chunks", {"0": 1}), "files[0].chunks"),
    ("chunks-empty", _set("files", 0, "chunks", []), "files[0].chunks"),
    ("chunk-not-pair", _set("files", 0, "chunks", 1, [192]), "files[0].chunks[1]"),
    ("chunk-offset", _set("files", 0, "chunks", 1, [-1, 24]), "files[0].chunks[1] offset"),
    ("chunk-nbytes", _set("files", 0, "chunks", 1, [192, 2.5]), "files[0].chunks[1] nbytes"),
    ("chunk-beyond-file", _set("files", 0, "chunks", 1, [192, 25]), "files[0].chunks[1]"),
    ("checksums-not-list", _set("files", 0, "checksums", "aa"), "files[0].checksums"),
    ("checksum-not-string", _set("files", 0, "checksums", 1, 17), "files[0].checksums[1]"),
    ("write-s", _set("files", 0, "write_s", -1.0), "files[0].write_s"),
    ("hash-s", _set("files", 0, "hash_s", "fast"), "files[0].hash_s"),
    ("file-rank", _set("files", 0, "rank", -2), "files[0].rank"),
    # storages and their parts
    ("storage-not-object", _set("storages", 0, 5), "storages[0]"),
    ("storage-nbytes-negative", _set("storages", 0, "nbytes", -5), "storages[0].nbytes"),
    ("storage-nbytes-string", _set("storages", 0, "nbytes", "8"), "storages[0].nbytes"),
    ("storage-device", _set("storages", 0, "device", 0), "storages[0].device"),
    ("parts-not-list", _set("storages", 0, "parts", {}), "storages[0].parts"),
    ("part-not-object", _set("storages", 0, "parts", 0, [0]), "storages[0].parts[0]"),
    ("part-file", _set("storages", 0, "parts", 0, "file", "0"), "storages[0].parts[0].file"),
    ("part-offset", _set("storages", 0, "parts", 0, "offset", -1), "storages[0].parts[0].offset"),
    ("part-start", _drop("storages", 0, "parts", 0, "start"), "storages[0].parts[0].start"),
    ("part-nbytes", _set("storages", 0, "parts", 0, "nbytes", None), "storages[0].parts[0].nbytes"),
    ("part-entry", _set("storages", 0, "parts", 0, "entry", 3), "storages[0].parts[0].entry"),
    ("part-file-out-of-range", _set("storages", 0, "parts", 0, "file", 9), "storages[0].parts[0].file"),
    ("part-beyond-file", _set("storages", 0, "parts", 0, "offset", 193), "storages[0].parts[0].offset"),
    ("part-beyond-storage", _set("storages", 0, "parts", 0, "start", 1), "storages[0].parts[0].start"),
    ("storage-rank", _set("storages", 0, "rank", "0"), "storages[0].rank"),
    # tensors
    ("tensor-not-object", _set("tensors", 0, None), "tensors[0]"),
    ("tensor-path", _set("tensors", 0, "path", "w"), "tensors[0].path"),
    ("tensor-name", _drop("tensors", 0, "name"), "tensors[0].name"),
    ("tensor-storage-type", _set("tensors", 0, "storage", 0.0), "tensors[0].storage"),
    ("tensor-storage-out-of-range", _set("tensors", 0, "storage", 7), "tensors[0].storage"),
    ("tensor-dtype", _set("tensors", 0, "dtype", None), "tensors[0].dtype"),
    ("tensor-shape-not-list", _set("tensors", 0, "shape", 6), "tensors[0].shape"),
    ("tensor-shape-negative", _set("tensors", 0, "shape", [-2, 3]), "tensors[0].shape[0]"),
    ("tensor-stride-negative", _set("tensors", 0, "stride", [3, -1]), "tensors[0].stride[1]"),
    ("tensor-stride-length", _set("tensors", 0, "stride", [1]), "tensors[0].stride"),
    ("tensor-offset", _set("tensors", 0, "offset", -3), "tensors[0].offset"),
    ("tensor-param", _set("tensors", 0, "param", 1), "tensors[0].param"),
    ("tensor-requires-grad", _set("tensors", 0, "requires_grad", "no"), "tensors[0].requires_grad"),
    ("tensor-conj", _set("tensors", 0, "conj", None), "tensors[0].conj"),
    ("tensor-neg", _set("tensors", 0, "neg", 0), "tensors[0].neg"),
    ("global-offset-alone", _set("tensors", 0, "global_offset", [0, 0]), "tensors[0].global_offset"),
    ("global-shape-negative", lambda b: b["tensors"][0].update(global_offset=[0, 0], global_shape=[-4, 3]),
     "tensors[0].global_shape[0]"),
    ("global-box-outside", lambda b: b["tensors"][0].update(global_offset=[0, 1], global_shape=[2, 3]),
     "tensors[0].global_offset"),
    ("global-box-dims", lambda b: b["tensors"][0].update(global_offset=[0], global_shape=[2]),
     "tensors[0].global_offset"),
]


@pytest.mark.parametrize("edit,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_check_names_its_field(edit, field):
    body = golden()
    edit(body)
    with pytest.raises(CorruptCheckpointError, match=rf"^here: malformed manifest: {re.escape(field)} "):
        parse_manifest(body, "here")
    with pytest.raises(CorruptCheckpointError, match=re.escape(field)):
        validate_body(body, "here")       # the dict-level name of the same checks


def test_the_cases_start_from_a_valid_body_and_leave_it_alone():
    pristine = golden()
    parse_manifest(pristine, "here")
    for _, edit, _ in CASES:
        body = copy.deepcopy(pristine)
        edit(body)
        assert json.dumps(body) != json.dumps(pristine)   # as JSON: 0.0 == 0 in Python
    assert pristine == golden()


def test_a_version_1_record_needs_its_key():
    body = v1_body()
    body["tensors"][1]["key"] = ["w", "t"]
    with pytest.raises(CorruptCheckpointError, match=r"malformed manifest: tensors\[1\]\.key "):
        parse_manifest(body, "v1")
    body = v1_body()
    body["tree"] = "anything"      # a version-1 tree is tagged JSON, checked as it is decoded
    assert parse_manifest(body, "v1").tree == "anything"


def test_the_body_must_be_an_object():
    with pytest.raises(CorruptCheckpointError, match="malformed manifest: the body"):
        parse_manifest([golden()], "here")


def test_a_manifest_that_is_not_sealed_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"zckpt_manifest": golden(), "xxh3_64": "0"}))
    with pytest.raises(CorruptCheckpointError, match="manifest checksum mismatch"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"zckpt_manifest": [1], "xxh3_64": "0"}))
    with pytest.raises(CorruptCheckpointError, match="manifest checksum mismatch"):
        read_manifest(str(tmp_path))


# --- the records a save plans, and checkpoints on disk (needs torch and a pool) ---------------------
def test_a_saved_checkpoint_round_trips_and_a_plans_records_match_it(make_pool, tmp_path):
    torch = pytest.importorskip("torch")
    from zckpt.plan import collect_storages, plan_records, plan_save
    from zckpt.tree import Collector

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    sd = {"w": w, "wt": w.t(), 3: torch.ones(2, dtype=torch.complex64).conj(), ("k", 1): torch.zeros(0),
          "p": torch.nn.Parameter(torch.ones(3)), "step": 7}
    pool = make_pool(num_workers=2)
    pool.save(sd, tmp_path / "c", metadata={"run": "r1"}).result(timeout=60)
    body = read_manifest_body(str(tmp_path / "c"))
    m = read_manifest(str(tmp_path / "c"))
    assert json.dumps(m.to_json()) == json.dumps(body)   # parse loses nothing zckpt writes

    collector = Collector()
    collector.walk(sd)
    storages, infos = collect_storages(collector)
    plan = plan_save(storages, infos, 2)
    st_recs, t_recs = plan_records(plan)
    assert all(isinstance(r, StorageRecord) for r in st_recs) and all(isinstance(r, TensorRecord) for r in t_recs)
    assert tuple(t_recs) == m.tensors and [s.nbytes for s in st_recs] == [s.nbytes for s in m.storages]
    assert m.tensors[4].param and m.tensors[2].conj


def test_a_version_1_checkpoint_loads_and_verifies(make_pool, tmp_path):
    torch = pytest.importorskip("torch")
    import zckpt

    sd = {"a": torch.randn(4, 3), "b": {"c": torch.arange(5)}}
    pool = make_pool(num_workers=1)
    path = tmp_path / "c"
    pool.save(sd, path).result(timeout=60)
    body = read_manifest_body(str(path))
    body.pop("commit")
    body["version"] = 1
    body["tree"] = {"@": "dict", "items": [["a", {"@": "tensor", "i": 0}],
                                           ["b", {"@": "dict", "items": [["c", {"@": "tensor", "i": 1}]]}]]}
    body["tensors"] = [{"key": t["name"], **{k: v for k, v in t.items() if k not in ("path", "name")}}
                       for t in body["tensors"]]
    (path / MANIFEST_NAME).unlink()
    write_manifest(str(path), body, fsync=False)
    assert read_manifest(str(path)).version == 1
    assert zckpt.verify(path)["tensors"] == 2
    back = zckpt.load(path)
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"]["c"], sd["b"]["c"])
    into = {"a": torch.zeros(4, 3), "b": {"c": torch.zeros(5, dtype=torch.int64)}}
    zckpt.load(path, into=into)
    assert torch.equal(into["a"], sd["a"]) and torch.equal(into["b"]["c"], sd["b"]["c"])


def test_manifest_is_a_record_not_a_dict():
    m = parse_manifest(golden(), "x")
    assert isinstance(m, Manifest)
    with pytest.raises(TypeError):
        m["files"]  # type: ignore[index]


def test_rank_directories_are_allowed_only_in_multi_rank_manifests():
    """Version 3 names files rank-<r>/<name> (its rank field must agree); version 2 never
    names a path, and nothing may climb out of the checkpoint."""
    def with_file(version, name, rank):
        body = golden()
        body["version"] = version
        body["files"][0]["name"] = name
        if rank is not None:
            body["files"][0]["rank"] = rank
        return body

    assert parse_manifest(with_file(3, "rank-1/shard.safetensors", 1), "v3").files[0].name == "rank-1/shard.safetensors"
    for version, name, rank in [(2, "rank-1/shard.safetensors", 1), (3, "rank-1/shard.safetensors", 2),
                                (3, "rank-1/../x", 1), (3, "rank-01/x", 1), (3, "../rank-1/x", 1),
                                (3, "rank-1/a/b", 1), (3, "rank-1/", 1)]:
        with pytest.raises(CorruptCheckpointError, match=r"files\[0\]\.name"):
            parse_manifest(with_file(version, name, rank), "here")
