"""Flatten a nested state dict into (skeleton, tensors), and encode skeletons as JSON.

The skeleton is the user's structure with every tensor replaced by a
:class:`TensorRef`; containers are copied (dicts keep their type and the
``_metadata`` attribute that ``nn.Module.state_dict()`` attaches), leaves are kept.
The compat path pickles the skeleton; the native format stores it as JSON in the
manifest (:func:`to_json` / :func:`from_json`), with anything JSON cannot hold
pickled (the same trust model as ``torch.load(weights_only=False)``).
"""

from __future__ import annotations

import base64
import collections
import math
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["TensorRef", "flatten", "unflatten", "to_json", "from_json", "key_path"]


@dataclass(frozen=True)
class TensorRef:
    """Placeholder for the ``index``-th tensor of a flattened state dict."""

    index: int


def key_path(parts: tuple[Any, ...]) -> str:
    """``("model", "fc", "weight")`` -> ``"model.fc.weight"`` (for names and errors)."""
    return ".".join(str(p) for p in parts) if parts else "<root>"


def flatten(obj: Any, resolve_lazy: bool = True) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """Return the skeleton of ``obj`` and its tensors in visiting order, with key paths.

    With ``resolve_lazy``, lazy conjugate/negative views are replaced by what they read
    as (a copy); without it they are returned as they are.

    Raises:
        TypeError: for a reference cycle, or a tensor zckpt cannot store, naming the key.
    """
    tensors: list[tuple[str, torch.Tensor]] = []
    active: set[int] = set()

    def visit(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, torch.Tensor):
            _check_storable(node, path)
            if resolve_lazy and (node.is_conj() or node.is_neg()):
                # A lazy conj/neg view's storage holds the un-conjugated values and the
                # manifest has no bit for it: store the values it reads as (a copy).
                node = node.resolve_conj().resolve_neg()
            tensors.append((key_path(path), node))
            return TensorRef(len(tensors) - 1)
        if isinstance(node, (dict, list, tuple)):
            if id(node) in active:
                raise TypeError(f"state dict has a reference cycle at {key_path(path)!r}")
            active.add(id(node))
            try:
                return _map_container(node, path, visit)
            finally:
                active.discard(id(node))
        return node

    return visit(obj, ()), tensors


def _map_container(node: Any, path: tuple[Any, ...], visit: Callable[[Any, tuple[Any, ...]], Any]) -> Any:
    if isinstance(node, dict):
        items = [(k, visit(v, path + (k,))) for k, v in node.items()]
        out: Any = collections.OrderedDict(items) if isinstance(node, collections.OrderedDict) else dict(items)
        meta = getattr(node, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # nn.Module.load_state_dict reads versions from it
        return out
    if isinstance(node, list):
        return [visit(v, path + (i,)) for i, v in enumerate(node)]
    if hasattr(node, "_fields") and type(node) is not tuple:  # namedtuple
        return type(node)(*(visit(v, path + (i,)) for i, v in enumerate(node)))
    return tuple(visit(v, path + (i,)) for i, v in enumerate(node))


def _check_storable(t: torch.Tensor, path: tuple[Any, ...]) -> None:
    # On the trainer's hot path: cheap checks first, the key path only on error.
    if t.layout is torch.strided and not t.is_quantized and type(t) in _PLAIN and t.device.type != "meta" \
            and not t.is_nested:
        return
    where = key_path(path)
    if t.layout != torch.strided:
        raise TypeError(f"tensor {where!r} has layout {t.layout}; zckpt stores strided tensors only "
                        "(convert sparse tensors with .to_dense())")
    if t.is_quantized:
        raise TypeError(f"tensor {where!r} is quantized; zckpt does not store quantized tensors")
    if t.device.type == "meta":
        raise TypeError(f"tensor {where!r} is on the meta device and has no data to save")
    if t.is_nested:
        raise TypeError(f"tensor {where!r} is a nested tensor; zckpt does not store those")
    # DTensor, FakeTensor, functional wrappers: their storage is not their data.
    raise TypeError(f"tensor {where!r} is a {type(t).__name__}; zckpt stores plain tensors "
                    "and Parameters (convert subclasses, e.g. DTensor.to_local())")


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def unflatten(skeleton: Any, tensors: list[Any]) -> Any:
    """Inverse of :func:`flatten`: put ``tensors[i]`` where ``TensorRef(i)`` stands."""
    def visit(node: Any) -> Any:
        if isinstance(node, TensorRef):
            return tensors[node.index]
        if isinstance(node, (dict, list, tuple)):
            return _map_container(node, (), lambda v, _p: visit(v))
        return node
    return visit(skeleton)


# --- JSON encoding of a skeleton (the manifest's "tree") ------------------------------
# Tagged objects: {"@": kind, ...}. Plain JSON scalars stand for themselves; floats that
# JSON cannot spell (nan, inf) and everything else go through tags.

def to_json(skeleton: Any) -> Any:
    """Encode a skeleton as JSON-compatible data.

    Raises:
        TypeError: for a leaf that cannot be pickled, naming its key path.
    """
    def enc(node: Any, path: tuple[Any, ...]) -> Any:
        if node is None or isinstance(node, (bool, str)):
            return node
        if type(node) is int:
            return node
        if type(node) is float:
            return node if math.isfinite(node) else {"@": "float", "v": repr(node)}
        if isinstance(node, TensorRef):
            return {"@": "tensor", "i": node.index}
        if type(node) in (dict, collections.OrderedDict):
            out: dict[str, Any] = {
                "@": "odict" if isinstance(node, collections.OrderedDict) else "dict",
                "items": [[enc(k, path + (k,)), enc(v, path + (k,))] for k, v in node.items()],
            }
            meta = getattr(node, "_metadata", None)
            if meta is not None:
                out["meta"] = enc(meta, path + ("_metadata",))
            return out
        if type(node) is list:
            return {"@": "list", "items": [enc(v, path + (i,)) for i, v in enumerate(node)]}
        if type(node) is tuple:
            return {"@": "tuple", "items": [enc(v, path + (i,)) for i, v in enumerate(node)]}
        try:
            blob = pickle.dumps(node, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"value at {key_path(path)!r} ({type(node).__name__}) cannot be "
                            f"saved: it is not picklable ({exc})") from exc
        return {"@": "pickle", "b64": base64.b64encode(blob).decode("ascii")}

    return enc(skeleton, ())


def from_json(data: Any) -> Any:
    """Decode :func:`to_json` output back into a skeleton with :class:`TensorRef` leaves."""
    if not isinstance(data, dict):
        return data
    tag = data.get("@")
    if tag == "tensor":
        return TensorRef(int(data["i"]))
    if tag in ("dict", "odict"):
        items = [(from_json(k), from_json(v)) for k, v in data["items"]]
        out: Any = collections.OrderedDict(items) if tag == "odict" else dict(items)
        if "meta" in data:
            out._metadata = from_json(data["meta"])
        return out
    if tag == "list":
        return [from_json(v) for v in data["items"]]
    if tag == "tuple":
        return tuple(from_json(v) for v in data["items"])
    if tag == "float":
        return float(data["v"])
    if tag == "pickle":
        return pickle.loads(base64.b64decode(data["b64"]))
    raise ValueError(f"unknown tree node tag {tag!r}")

