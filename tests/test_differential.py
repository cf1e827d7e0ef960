"""Differential tests: a round trip through zckpt must equal one through torch.save/torch.load.

``hypothesis`` generates nested state dicts (dict subclasses, lists, tuples, namedtuples,
objects holding tensors, keys of every hashable kind a state dict uses, tensors of every
dtype, views and aliases of one storage, Parameters, Python values) and checks that

(a) ``pool.save(sd, path).result()`` then ``zckpt.load(path, weights_only=False)``, and
(b) a ``zckpt.compat.CheckpointProcess`` with the stock ``CheckpointWriter``, read back
    with ``torch.load(weights_only=False)``,

give back exactly what ``torch.load(weights_only=False)`` of a ``torch.save`` of the same
object gives: the same Python types (``type(a) is type(b)``, recursively, containers'
instance attributes included), dict keys (order and types), values (tensors bit for
bit), dtypes, shapes, strides, storage offsets, ``requires_grad``, Parameter-ness, which
tensors share a storage and each storage's size. For (a), ``zckpt.verify`` must pass and,
when ``torch.load(weights_only=True)`` accepts the object, ``zckpt.load(path)`` with its
default must equal that. For (b), the file must be about as large as ``torch.save``'s:
no bytes of other tensors or of earlier, larger writes may leak into it.

Objects ``torch.save`` itself refuses (e.g. two dtypes viewing one storage) are out of
scope and rejected. Profiles (``ci``: reproducible and fast; ``thorough``: 5000
examples) are registered in conftest.py and chosen with ``ZCKPT_HYPOTHESIS_PROFILE``.
Every failure found is kept below as an explicit ``@example``.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import example, given, reject, settings
from hypothesis import strategies as st

import zckpt
from zckpt.compat import CheckpointProcess, CheckpointProcessConfig, CheckpointWriter, CheckpointWriterConfig, RankInfo

from _diff_objects import Holder, Pair, Triple, UserDict, UserList, noop_init

MAX_EXAMPLES = settings.default.max_examples
POOL_SETTINGS = settings(max_examples=MAX_EXAMPLES)
COMPAT_SETTINGS = settings(max_examples=max(1, MAX_EXAMPLES // 2))  # a compat write costs more
# Generous: a failing run also shrinks. ~0.05-0.1 s per example when all is well.
TIMEOUT_S = int(120 + 1.0 * MAX_EXAMPLES)

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
    torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]


def _can_grad(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


# --- the comparator -------------------------------------------------------------------------
# Each aspect is asserted on a line of its own: hypothesis tells failures apart by where
# they are raised, so distinct bugs are reported (and shrunk) separately.

def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    st_ = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st_, 0, (st_.nbytes(),), (1,))


def _value_bytes(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype)  # dense, stride 1 (expanded views are not)
    flat.copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def _same_tensor(a: torch.Tensor, b: torch.Tensor, path: str) -> None:
    assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.stride() == b.stride(), f"{path}: stride {a.stride()} != {b.stride()}"
    assert a.storage_offset() == b.storage_offset(), \
        f"{path}: storage_offset {a.storage_offset()} != {b.storage_offset()}"
    assert a.requires_grad == b.requires_grad, f"{path}: requires_grad {a.requires_grad} != {b.requires_grad}"
    assert a.is_leaf == b.is_leaf, f"{path}: is_leaf {a.is_leaf} != {b.is_leaf}"
    assert a.device == b.device, f"{path}: device {a.device} != {b.device}"
    assert (a.is_conj(), a.is_neg()) == (b.is_conj(), b.is_neg()), f"{path}: lazy conj/neg bits differ"
    assert torch.equal(_value_bytes(a), _value_bytes(b)), f"{path}: values differ (bitwise)"
    na, nb = a.untyped_storage().nbytes(), b.untyped_storage().nbytes()
    assert na == nb, f"{path}: storage nbytes {na} != {nb}"
    assert torch.equal(_storage_bytes(a), _storage_bytes(b)), f"{path}: storage bytes differ"


def _same_float(a: float, b: float, path: str) -> None:
    if math.isnan(a):
        assert math.isnan(b), f"{path}: {a!r} != {b!r}"
    else:
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"


def _same(a: Any, b: Any, path: str, ta: list, tb: list, paths: list) -> None:
    assert type(a) is type(b), f"{path}: type {type(a).__qualname__} != {type(b).__qualname__}"
    if isinstance(a, torch.Tensor):
        _same_tensor(a, b, path)
        ta.append(a)
        tb.append(b)
        paths.append(path)
        return
    if isinstance(a, float):
        _same_float(a, b, path)
        return
    if isinstance(a, (str, bytes, int, complex, type(None), torch.dtype, torch.device, type)):
        assert a == b, f"{path}: {a!r} != {b!r}"
        return
    if isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{path}: keys {ka!r} != {kb!r}"
        for x, y in zip(ka, kb, strict=True):
            _same(x, y, f"{path}<key {x!r}>", [], [], [])  # keys: same type and value, same order
        for x, y in zip(ka, kb, strict=True):
            _same(a[x], b[y], f"{path}[{x!r}]", ta, tb, paths)
        if isinstance(a, collections.defaultdict):
            assert a.default_factory is b.default_factory, f"{path}: default_factory differs"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]", ta, tb, paths)
    elif not hasattr(a, "__dict__"):
        assert a == b, f"{path}: {a!r} != {b!r}"
    # Instance attributes: _metadata of an OrderedDict, attributes of dict subclasses and
    # of objects holding tensors. Order-insensitive (the order of attributes means nothing).
    da, db = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
    if da is not None or db is not None:
        assert da is not None and db is not None, f"{path}: instance attributes differ"
        assert sorted(da) == sorted(db), f"{path}: attributes {sorted(da)} != {sorted(db)}"
        for k in sorted(da):
            _same(da[k], db[k], f"{path}.{k}", ta, tb, paths)


def _storage_partition(tensors: list[torch.Tensor]) -> list[int]:
    """For each tensor, the position of the first tensor on the same storage (by
    StorageImpl, not address). A 0-byte storage counts as the tensor's own: torch.load
    itself does not keep their identity (two views of one empty tensor come back on two
    storages), and sharing no bytes is not observable."""
    first: dict[int, int] = {}
    return [first.setdefault(t.untyped_storage()._cdata, i) if t.untyped_storage().nbytes() else i
            for i, t in enumerate(tensors)]


def assert_equivalent(expected: Any, actual: Any) -> None:
    """Fail unless ``actual`` is what ``expected`` is, down to types, bytes and aliasing."""
    ta: list[torch.Tensor] = []
    tb: list[torch.Tensor] = []
    paths: list[str] = []
    _same(expected, actual, "root", ta, tb, paths)
    pa, pb = _storage_partition(ta), _storage_partition(tb)
    assert pa == pb, "tensors share storages differently:\n" + "\n".join(
        f"  {p}: torch shares with {paths[x]}, zckpt with {paths[y]}" for p, x, y in zip(paths, pa, pb, strict=False)
        if x != y)


# --- the strategies --------------------------------------------------------------------------

SHAPES = st.one_of(
    st.lists(st.integers(0, 4), max_size=3).map(tuple),  # () is 0-dim; a 0 makes it empty
    st.integers(0, 64).map(lambda n: (n,)),
)


@st.composite
def fresh_tensors(draw: Callable) -> torch.Tensor:
    """A new tensor on its own storage: any dtype, any bits (NaN payloads, invalid float8...)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(SHAPES)
    nbytes = math.prod(shape) * dtype.itemsize
    seed = draw(st.one_of(st.none(), st.integers(0, 2**31 - 1)))
    if seed is None:
        raw = torch.zeros(nbytes, dtype=torch.uint8)
    else:
        raw = torch.randint(0, 2 if dtype is torch.bool else 256, (nbytes,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(seed))
    t = raw.view(dtype).reshape(shape)
    kind = draw(st.sampled_from(["plain", "requires_grad", "param", "frozen_param", "shared"]))
    if kind == "requires_grad" and _can_grad(dtype):
        t.requires_grad_(True)
    elif kind == "param":
        t = torch.nn.Parameter(t, requires_grad=_can_grad(dtype))
    elif kind == "frozen_param":
        t = torch.nn.Parameter(t, requires_grad=False)
    elif kind == "shared":  # already in shared memory: compat hands it over without a copy
        t.share_memory_()
    return t


class _Bases(list):
    """Base tensors, with a short repr (hypothesis prints strategies' arguments)."""

    def __repr__(self) -> str:
        return f"<{len(self)} base tensors>"


@st.composite
def derived_tensors(draw: Callable, bases: _Bases) -> torch.Tensor:
    """The same tensor again, or a view of it: aliasing, non-contiguity, storage offsets."""
    b = bases[draw(st.integers(0, len(bases) - 1))]
    d = b.detach()
    elems = d.untyped_storage().nbytes() // d.dtype.itemsize
    kind = draw(st.sampled_from(["same", "detach", "slice", "transpose", "strided", "expand", "unsqueeze",
                                 "param", "conj", "neg", "reinterpret"]))
    if kind == "same":  # the very same tensor object once more
        return b
    if kind == "slice" and d.dim() > 0:
        dim = draw(st.integers(0, d.dim() - 1))
        start = draw(st.integers(0, d.shape[dim]))
        step = draw(st.integers(1, 3))
        return d[(slice(None),) * dim + (slice(start, None, step),)]
    if kind == "transpose" and d.dim() >= 2:
        i, j = draw(st.permutations(range(d.dim())))[:2]
        return d.transpose(i, j)
    if kind == "strided" and elems:
        off = draw(st.integers(0, elems - 1))
        step = draw(st.integers(1, 3))
        n = draw(st.integers(0, (elems - 1 - off) // step + 1))
        return d.as_strided((n,), (step,), off)
    if kind == "expand" and elems:  # stride 0
        off = draw(st.integers(0, elems - 1))
        return d.as_strided((draw(st.integers(1, 4)),), (0,), off)
    if kind == "unsqueeze":
        return d.unsqueeze(0)
    if kind == "param":  # a Parameter tied to another tensor, possibly at an offset
        v = d[1:] if d.dim() > 0 and draw(st.booleans()) else d
        return torch.nn.Parameter(v, requires_grad=_can_grad(v.dtype) and draw(st.booleans()))
    if kind == "conj" and d.is_complex():  # lazy: the conj bit, not conjugated bytes
        return d.conj()
    if kind == "neg" and d.is_complex():  # lazy: the neg bit
        return d.conj().imag
    if kind == "reinterpret" and elems:  # torch.save refuses it beside the base (rejected then)
        others = [dt for dt in DTYPES if dt.itemsize == d.dtype.itemsize and dt != d.dtype]
        if others:
            return d.as_strided((elems,), (1,), 0).view(draw(st.sampled_from(others)))
    return d


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(2**63, 2**70), st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0]),
    st.text(max_size=5), st.binary(max_size=5),
    st.lists(st.integers(0, 4), max_size=3).map(torch.Size),
)

SIMPLE_KEYS = st.one_of(
    st.text(alphabet="ab.0_", max_size=3),  # "a.b", "0", "" ...
    st.text(max_size=3), st.integers(-1, 3), st.integers(), st.booleans(), st.none(),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, math.inf, -math.inf]),
)
KEYS = st.one_of(SIMPLE_KEYS, st.tuples(SIMPLE_KEYS, SIMPLE_KEYS))

MAPPING_KINDS = ["dict", "odict", "odict_meta", "defaultdict", "userdict", "userdict_attr"]
METADATA = st.dictionaries(st.text(alphabet="ab.", max_size=3), st.fixed_dictionaries({"version": st.integers(0, 3)}),
                           max_size=3).map(collections.OrderedDict)


def _items(values: st.SearchStrategy, max_size: int) -> st.SearchStrategy:
    """(key, value) lists with distinct keys. Keys are drawn first: a filter on (key,
    value) pairs would have hypothesis print the whole recursive strategy."""
    return st.lists(KEYS, max_size=max_size, unique=True).flatmap(
        lambda keys: st.tuples(*[values] * len(keys)).map(lambda vals: list(zip(keys, vals, strict=True))))


def make_mapping(kind: str, items: list[tuple[Any, Any]], extra: Any = None) -> dict:
    if kind == "dict":
        return dict(items)
    if kind in ("odict", "odict_meta"):
        od = collections.OrderedDict(items)
        if kind == "odict_meta":
            od._metadata = extra  # as nn.Module.state_dict() sets it
        return od
    if kind == "defaultdict":
        return collections.defaultdict(list, items)
    d = UserDict(items)
    if kind == "userdict_attr":
        d.note = extra
    return d


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    items = _items(children, 4)
    return st.one_of(
        st.builds(make_mapping, st.sampled_from(MAPPING_KINDS), items, st.one_of(METADATA, children)),
        # counts only: Counter's repr sorts its values (lr_scheduler milestones are one)
        st.dictionaries(KEYS, st.integers(), max_size=4).map(collections.Counter),
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.lists(children, max_size=4).map(UserList),
        st.builds(Pair, children, children),
        st.builds(Triple, children, children, children),
        st.builds(Holder, a=children, b=children),
    )


@st.composite
def leaves(draw: Callable, bases: _Bases) -> Any:
    """Mostly tensors (half of them views or aliases of the bases), else a Python value."""
    if draw(st.integers(0, 3)) == 0:  # shrinks towards a Python value
        return draw(SCALARS)
    if draw(st.booleans()):
        return draw(derived_tensors(bases))
    return draw(fresh_tensors())


@st.composite
def state_dicts(draw: Callable) -> dict:
    """A nested state dict; its tensors may view a few shared base tensors."""
    bases = _Bases(draw(st.lists(fresh_tensors(), min_size=1, max_size=3)))
    if draw(st.integers(0, 9)) == 0:  # two storages over the same memory: not shared for torch.save
        buf = bytearray(draw(st.binary(min_size=8, max_size=32)))
        bases += [torch.frombuffer(buf, dtype=torch.uint8), torch.frombuffer(buf, dtype=torch.uint8)]
    tree = st.recursive(leaves(bases), _containers, max_leaves=10)
    items = draw(_items(tree, 5))
    collision = draw(st.sampled_from([None, "int_str", "dotted"]))
    if collision == "int_str":  # 0 and "0": keys that print alike
        k = draw(st.integers(0, 2))
        extra = [(k, draw(tree)), (str(k), draw(tree))]
    elif collision == "dotted":  # "x.y" beside {"x": {"y": ...}}
        extra = [("x.y", draw(tree)), ("x", {"y": draw(tree)})]
    else:
        extra = []
    if extra:
        taken = [k for k, _ in extra]
        items = [(k, v) for k, v in items if k not in taken]
        pos = draw(st.integers(0, len(items)))
        items[pos:pos] = extra
    kind = draw(st.sampled_from(MAPPING_KINDS))
    return make_mapping(kind, items, draw(METADATA) if kind == "odict_meta" else draw(tree))


# --- explicit examples: inputs known to have differed from torch --------------------------------

def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scheduler_state() -> dict:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4])  # milestones is a Counter
    return {"sched": sched.state_dict(), "stats": collections.defaultdict(list)}


def _conv_bn_state() -> dict:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict()


def _shared_through_object() -> dict:
    t = torch.arange(4.0)
    return {"t": t, "h": Holder(a=t, b=t[1:])}


def _conj_neg() -> dict:
    z = torch.randn(3, dtype=torch.complex64, generator=_g(7))
    return {"z": z, "c": z.conj(), "n": z.conj().imag}


def _frombuffer_twins() -> dict:
    buf = bytearray(range(16))
    return {"a": torch.frombuffer(buf, dtype=torch.uint8), "b": torch.frombuffer(buf, dtype=torch.uint8)[4:]}


def _shared_memory() -> dict:
    t = torch.randn(8, generator=_g(8)).share_memory_()
    return {"t": t, "v": t[2:6], "i": torch.arange(3).share_memory_()}


def _with_attr(obj: Any, **attrs: Any) -> Any:
    obj.__dict__.update(attrs)
    return obj


KNOWN = [
    # a key with a dot beside the nested keys it spells
    {"a.b": torch.full((4,), 1.0), "a": {"b": torch.full((4,), 2.0)}},
    # int and str keys that render alike
    {0: torch.randn(3, generator=_g(1)), "0": torch.randn(3, generator=_g(2))},
    # dict subclasses: Counter (milestones), defaultdict
    _scheduler_state(),
    # two dtypes, two storages
    {"a": torch.randn(4, generator=_g(3)), "b": torch.arange(3)},
    # a module's state dict: float parameters and an int64 num_batches_tracked
    _conv_bn_state(),
    # found by hypothesis (minimal forms):
    # container subclasses came back as their base type
    {"c": collections.Counter({2: 1}), "d": collections.defaultdict(list), "u": UserDict(a=1), "l": UserList([1]),
     "s": torch.Size([2]), "p": Pair(1, 2)},
    # a user dict subclass's attributes
    {"u": _with_attr(UserDict(a=1), note=torch.ones(2))},
    # a Python-values-only save kept its staging buffer: the next save waited for save_timeout_s
    {"step": 1},
    {"a": torch.ones(2)},
    # a tensor inside an object: uint64 failed to unpickle; sharing with a tensor outside was lost
    {"h": Holder(a=torch.zeros(2, dtype=torch.uint64))},
    _shared_through_object(),
    # Parameter-ness and requires_grad (compat dropped them)
    {"p": torch.nn.Parameter(torch.ones(2)), "f": torch.nn.Parameter(torch.ones(2), requires_grad=False),
     "g": torch.ones(2).requires_grad_()},
    # lazy conj/neg bits (they were resolved into copies)
    _conj_neg(),
    # only empty tensors (compat's worker failed with an empty message)
    {"e": torch.empty(0, 2, 4, dtype=torch.float16)},
    # two storages over the same memory (frombuffer twice): torch.save keeps them apart
    _frombuffer_twins(),
    # tensors already in shared memory, one a view of the other (compat maps them, no copy)
    _shared_memory(),
]


def with_examples(examples: list) -> Callable:
    def deco(fn: Callable) -> Callable:
        for ex in reversed(examples):
            fn = example(obj=ex)(fn)
        return fn
    return deco


# --- the tests -----------------------------------------------------------------------------

def _torch_round_trip(obj: Any, fname: str) -> tuple[Any, Any | None, int]:
    """torch.load(weights_only=False) of a torch.save of ``obj``; the weights_only=True load
    (None if torch refuses it); the file's size. Rejects objects torch cannot round trip."""
    try:
        torch.save(obj, fname)
        ref = torch.load(fname, weights_only=False)
    except Exception:  # noqa: BLE001 - whatever torch.save refuses is out of scope
        reject()  # out of scope: torch.save refuses it (e.g. dtypes viewing one storage)
    try:
        ref_wo = torch.load(fname, weights_only=True)
    except pickle.UnpicklingError:  # "Weights only load failed"
        ref_wo = None
    return ref, ref_wo, os.path.getsize(fname)


def _pool_config() -> zckpt.PoolConfig:
    # save_timeout_s: a save that hangs fails fast instead of stalling every later example
    return zckpt.PoolConfig(num_workers=2, fsync=False, init_timeout_s=30.0,
                            save_timeout_s=10.0)


@pytest.mark.timeout(TIMEOUT_S)
def test_pool_round_trip_equals_torch(tmp_path):
    pool = zckpt.CheckpointPool(config=_pool_config())
    counter = itertools.count()
    try:
        @POOL_SETTINGS
        @with_examples(KNOWN)
        @given(obj=state_dicts())
        def check(obj: dict) -> None:
            n = next(counter)
            ref, ref_wo, _ = _torch_round_trip(obj, str(tmp_path / f"torch-{n}.pt"))
            path = tmp_path / f"zckpt-{n}"
            try:
                pool.save(obj, path).result(timeout=60)
                assert_equivalent(ref, zckpt.load(path, weights_only=False))
                zckpt.verify(path)
                if ref_wo is not None:  # zckpt.load's default is weights_only=True, as torch.load's
                    assert_equivalent(ref_wo, zckpt.load(path))
                else:  # torch.load(weights_only=True) refuses it: so must zckpt.load
                    with pytest.raises(pickle.UnpicklingError):
                        zckpt.load(path)
            finally:
                shutil.rmtree(path, ignore_errors=True)
                os.unlink(tmp_path / f"torch-{n}.pt")

        check()
    finally:
        pool.kill()


def _compat_process() -> CheckpointProcess:
    return CheckpointProcess(
        rank_info=RankInfo(global_rank=0, global_world_size=1), config=CheckpointProcessConfig(),
        subprocess_init_fn=noop_init, subprocess_init_args=(),
        checkpoint_writer_init_fn=CheckpointWriter,  # the stock writer: torch.save to checkpoint_<rank>.pt
        checkpoint_writer_init_args={"config": CheckpointWriterConfig()})


def _close(cp: CheckpointProcess) -> None:
    if cp.process is not None:
        cp.process.processes[0].kill()
    cp.close()


def _size_close(got: int, want: int) -> bool:
    return abs(got - want) <= 2048 + want // 10


@pytest.mark.timeout(TIMEOUT_S)
def test_compat_write_equals_torch(tmp_path):
    cp = _compat_process()
    counter = itertools.count()
    try:
        cp.process_creation_future.result(timeout=60)

        @COMPAT_SETTINGS
        @with_examples(KNOWN)
        @given(obj=state_dicts())
        def check(obj: dict) -> None:
            n = next(counter)
            ref, _, want = _torch_round_trip(obj, str(tmp_path / f"torch-{n}.pt"))
            path = tmp_path / f"compat-{n}"
            try:
                cp.write(obj, str(path)).result(timeout=60)
                fname = path / "checkpoint_0.pt"
                assert_equivalent(ref, torch.load(fname, weights_only=False))
                got = os.path.getsize(fname)
                assert _size_close(got, want), f"checkpoint_0.pt is {got} bytes, torch.save writes {want}"
            finally:
                shutil.rmtree(path, ignore_errors=True)
                os.unlink(tmp_path / f"torch-{n}.pt")

        check()
    finally:
        _close(cp)


@pytest.mark.timeout(120)
def test_compat_small_write_after_a_large_one_holds_only_its_own_bytes(tmp_path):
    big = {"a": torch.randn(4096, 1024, generator=_g(4))}  # 16 MiB
    small = {"a": torch.randn(16, generator=_g(5)), "b": torch.randn(8, generator=_g(6))}
    ref, _, want = _torch_round_trip(small, str(tmp_path / "torch.pt"))
    cp = _compat_process()
    try:
        cp.write(big, str(tmp_path / "big")).result(timeout=60)
        cp.write(small, str(tmp_path / "small")).result(timeout=60)
    finally:
        _close(cp)
    fname = tmp_path / "small" / "checkpoint_0.pt"
    got = os.path.getsize(fname)
    assert _size_close(got, want), f"checkpoint_0.pt is {got} bytes, torch.save writes {want}"
    data = fname.read_bytes()
    flat = big["a"].reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), flat.numel() // 16):  # 16 samples of the big write
        assert bytes(flat[start: start + 64].tolist()) not in data, f"bytes {start}.. of the earlier write leaked"
    assert_equivalent(ref, torch.load(fname, weights_only=False))


# --- the comparator itself -------------------------------------------------------------------

@settings(max_examples=max(1, MAX_EXAMPLES // 3))
@with_examples(KNOWN)
@given(obj=state_dicts())
def test_comparator_accepts_a_torch_round_trip(obj):
    """torch against torch must pass: the comparator asks nothing torch does not keep."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        a, _, _ = _torch_round_trip(obj, os.path.join(d, "a.pt"))
        b, wo, _ = _torch_round_trip(obj, os.path.join(d, "b.pt"))
    assert_equivalent(a, b)
    if wo is not None:
        assert_equivalent(a, wo)


def _variants() -> list[tuple[str, Any, Any]]:
    """Pairs of objects that differ in exactly one aspect."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    other = base.clone()
    p = torch.nn.Parameter(torch.ones(3))
    od = collections.OrderedDict(w=1)
    od_meta = collections.OrderedDict(w=1)
    od_meta._metadata = collections.OrderedDict({"": {"version": 1}})
    ones = torch.ones(16)
    return [
        ("dtype", {"w": base}, {"w": base.to(torch.float64)}),
        ("shape", {"w": base}, {"w": base.reshape(4, 3)}),
        ("stride", {"w": torch.ones(3, 4).t()}, {"w": torch.ones(4, 3)}),  # same values and storage bytes
        ("storage offset", {"w": ones[4:8]}, {"w": torch.ones(16)[0:4]}),  # same values and storage bytes
        ("storage size", {"w": ones[:4]}, {"w": torch.ones(4)}),
        ("value", {"w": base}, {"w": base + 1}),
        ("storage bytes outside the view", {"w": torch.arange(4.0)[:2]}, {"w": torch.tensor([0.0, 1, 7, 7])[:2]}),
        ("nan payload", {"w": torch.tensor([math.nan])},
         {"w": torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)}),
        ("float8 bits", {"w": torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)},
         {"w": torch.tensor([0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)}),
        ("negative zero", {"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])}),
        ("requires_grad", {"w": base.clone().requires_grad_()}, {"w": base.clone()}),
        ("parameter", {"w": p}, {"w": p.detach().clone().requires_grad_()}),
        ("sharing", {"a": base, "b": base}, {"a": base, "b": other}),
        ("sharing via a view", {"a": base, "b": base.view(12)}, {"a": base, "b": other.view(12)}),
        ("container type", {"w": [1, 2]}, {"w": (1, 2)}),
        ("dict subclass", collections.OrderedDict(w=1), {"w": 1}),
        ("Counter", {"m": collections.Counter({2: 1})}, {"m": {2: 1}}),
        ("defaultdict", {"s": collections.defaultdict(list)}, {"s": {}}),
        ("default_factory", {"s": collections.defaultdict(list)}, {"s": collections.defaultdict(int)}),
        ("user dict", {"s": UserDict(a=1)}, {"s": {"a": 1}}),
        ("user dict attribute", {"s": UserDict(a=1)}, {"s": _with_attr(UserDict(a=1), note=1)}),
        ("namedtuple", {"p": Pair(1, 2)}, {"p": (1, 2)}),
        ("torch.Size", {"s": torch.Size([2])}, {"s": (2,)}),
        ("_metadata", od_meta, od),
        ("attribute", {"h": Holder(a=1)}, {"h": Holder(a=2)}),
        ("tensor in an attribute", {"h": Holder(a=torch.ones(2))}, {"h": Holder(a=torch.zeros(2))}),
        ("key type", {0: 1}, {"0": 1}),
        ("key type bool", {True: 1}, {1: 1}),
        ("key order", {"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ("nested keys", {"a.b": 1}, {"a": {"b": 1}}),
        ("int vs float", {"x": 1}, {"x": 1.0}),
        ("float sign", {"x": 0.0}, {"x": -0.0}),
        ("nan vs inf", {"x": math.nan}, {"x": math.inf}),
        ("bytes vs str", {"x": b"a"}, {"x": "a"}),
    ]


@pytest.mark.parametrize("name,a,b", _variants(), ids=[v[0] for v in _variants()])
def test_comparator_rejects_objects_that_differ_in_one_aspect(name, a, b):
    assert_equivalent(a, a)
    assert_equivalent(b, b)
    with pytest.raises(AssertionError):
        assert_equivalent(a, b)
    with pytest.raises(AssertionError):
        assert_equivalent(b, a)
