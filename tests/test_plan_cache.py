"""Plan reuse: a save of the same structure reuses the last plan; any difference that
changes the plan, the manifest records or the pickled structure plans afresh."""

from __future__ import annotations

import collections

import pytest
import torch
from test_fidelity import same_tensor, torch_round_trip

import zckpt
import zckpt.pool as pool_module
from zckpt import PoolConfig

pytestmark = pytest.mark.timeout(120)


def base():
    w = torch.arange(12.0).reshape(3, 4)
    od = collections.OrderedDict(w=w, b=torch.zeros(4))
    od._metadata = collections.OrderedDict({"": {"version": 1}})
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    y = torch.tensor([5 + 6j, 7 - 8j], dtype=torch.complex64)   # only its imaginary view is saved
    return {"model": od, "tied": w, "step": 1, "name": "run", "opt": [torch.ones(2, dtype=torch.int64)],
            "stats": collections.defaultdict(list), "lr": 0.0, (1, 2): 5, "z": z, "im": y.imag}


def variants():
    """(name, factory): each differs from base() in exactly one way that matters."""
    def tweak(f):
        def make():
            sd = base()
            f(sd)
            return sd
        return make

    return [
        ("values-only", tweak(lambda sd: sd["model"]["w"].add_(1))),             # same structure: reused
        ("step", tweak(lambda sd: sd.update(step=2))),
        ("step-float", tweak(lambda sd: sd.update(step=1.0))),
        ("shape", tweak(lambda sd: sd["model"].update(b=torch.zeros(5)))),
        ("dtype", tweak(lambda sd: sd["model"].update(b=torch.zeros(4, dtype=torch.float64)))),
        ("stride", tweak(lambda sd: sd["model"].update(w=sd["model"]["w"].t().contiguous().t()))),
        ("untied", tweak(lambda sd: sd.update(tied=sd["model"]["w"].clone()))),
        ("key", tweak(lambda sd: sd.update(Step=sd.pop("step")))),
        ("key-type", tweak(lambda sd: sd.update({1: sd.pop("step")}))),
        ("container", tweak(lambda sd: sd.update(opt=tuple(sd["opt"])))),
        ("factory", tweak(lambda sd: sd.update(stats=collections.defaultdict(int)))),
        ("metadata", tweak(lambda sd: sd["model"]._metadata[""].update(version=2))),
        ("same-object", tweak(lambda sd: sd.update(opt=[sd["opt"][0], sd["opt"][0]]))),
        ("requires-grad", tweak(lambda sd: sd["model"]["b"].requires_grad_(True))),
        # Only a bit in the tensor's dispatch key set differs (same storage, dtype, shape, strides):
        ("conjugate-bit", tweak(lambda sd: sd.update(z=sd["z"].conj()))),
        ("negative-bit", tweak(lambda sd: sd.update(im=_neg_imag(sd["im"])))),
        # Equal under == but not the same value once pickled (found by review):
        ("negative-zero", tweak(lambda sd: sd.update(lr=-0.0))),
        ("tuple-key-element-type", lambda: _rekey(base(), (1, 2), (1.0, 2))),   # same place, equal key
        ("metadata-value-type", tweak(lambda sd: sd["model"]._metadata[""].update(version=True))),
        ("metadata-entry-type", tweak(lambda sd: sd["model"]._metadata.update(
            {"": collections.OrderedDict(version=1)}))),
    ]


def _neg_imag(im):
    """The same storage, dtype, shape and strides as ``im`` (a complex tensor's .imag),
    with the negative bit set."""
    base = torch.view_as_complex(torch.as_strided(im, (2, 2), (2, 1), im.storage_offset() - 1))
    out = base.conj().imag
    assert out.is_neg() and out.untyped_storage()._cdata == im.untyped_storage()._cdata
    return out


def _rekey(sd, old, new):
    """``sd`` with key ``old`` replaced by ``new`` in the same place (update() keeps an equal key)."""
    return {(new if type(k) is type(old) and k == old else k): v for k, v in sd.items()}


@pytest.mark.parametrize("name, factory", variants(), ids=[n for n, _ in variants()])
def test_a_changed_structure_is_planned_afresh_and_values_alone_reuse_the_plan(make_pool, tmp_path, monkeypatch,
                                                                               name, factory):
    pool = make_pool(config=PoolConfig(num_workers=2, fsync=False))
    plans = []
    real = pool_module.plan_save
    monkeypatch.setattr(pool_module, "plan_save", lambda *a, **k: plans.append(1) or real(*a, **k))
    pool.save(base(), tmp_path / "a").result(timeout=60)
    sd = factory()
    pool.save(sd, tmp_path / "b").result(timeout=60)
    assert len(plans) == (1 if name == "values-only" else 2), name
    back, want = zckpt.load(tmp_path / "b", weights_only=False), torch_round_trip(sd)
    assert list(back) == list(want) and back["step" if "step" in want else list(want)[2]] == \
        want["step" if "step" in want else list(want)[2]]
    for k in ("model",):
        for kk in want[k]:
            same_tensor(back[k][kk], want[k][kk], f"{name}: {k}.{kk}")
    for k in ("z", "im"):
        same_tensor(back[k], want[k], f"{name}: {k}")
    assert back["model"]._metadata == want["model"]._metadata
    assert repr(back["model"]._metadata) == repr(want["model"]._metadata)   # types too: True vs 1
    assert [(type(k), repr(k)) for k in back] == [(type(k), repr(k)) for k in want]
    assert repr(back.get("lr")) == repr(want.get("lr"))                        # -0.0 vs 0.0
    assert type(back["stats"]) is type(want["stats"]) and back["stats"].default_factory is want["stats"].default_factory
    assert [type(x) for x in (back["opt"],)] == [type(want["opt"])]
    assert (back["tied"].untyped_storage()._cdata == back["model"]["w"].untyped_storage()._cdata) == \
        (want["tied"].untyped_storage()._cdata == want["model"]["w"].untyped_storage()._cdata)
    assert (len(back["opt"]) == 2 and back["opt"][0] is back["opt"][1]) == \
        (len(want["opt"]) == 2 and want["opt"][0] is want["opt"][1])


def test_objects_are_never_reused(make_pool, tmp_path, monkeypatch):
    """A state dict holding an object (whose state the key cannot see) plans every time."""
    from test_fidelity import Holder
    pool = make_pool(config=PoolConfig(num_workers=1, fsync=False))
    plans = []
    real = pool_module.plan_save
    monkeypatch.setattr(pool_module, "plan_save", lambda *a, **k: plans.append(1) or real(*a, **k))
    for i in range(2):
        pool.save({"h": Holder(torch.ones(2) * i, i)}, tmp_path / f"c{i}").result(timeout=60)
    assert len(plans) == 2
    assert zckpt.load(tmp_path / "c1", weights_only=False)["h"].y == 1


def test_nesting_deeper_than_the_recursion_limit_is_planned_afresh():
    from zckpt.tree import structure_key
    deep: dict = {"t": torch.ones(1)}
    for _ in range(5000):
        deep = {"d": deep}
    assert structure_key(deep) is None
    assert structure_key({"a": [torch.ones(1)], "b": {"c": 1}}) is not None


@pytest.mark.parametrize("make", [
    lambda: torch.ones(2, device="meta"),
    lambda: torch.ones(2, 2).to_sparse(),
    lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
], ids=["meta", "sparse", "quantized"])
def test_tensors_the_key_cannot_describe_are_never_reused(make):
    """Found by their dispatch key set (one C call), also when met first in a dict."""
    from zckpt.tree import structure_key
    plain = {"a": torch.ones(2)}
    assert structure_key(plain) is not None
    for sd in ({"a": torch.ones(2), "x": make()}, {"a": [make()]}):
        assert structure_key(sd) is None
