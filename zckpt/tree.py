"""The structure of a state dict: typed key paths to its tensors, and its pickled skeleton.

A checkpoint stores tensor bytes in shard files and everything else as a pickle, the
way ``torch.save`` does (its ``data.pkl``), so any object ``torch.save`` can store keeps
its type: dict subclasses (``OrderedDict`` with ``_metadata``, ``defaultdict``,
``Counter``), namedtuples, user objects that hold tensors. Tensors never go into the
pickle: each one becomes a persistent id naming its record in the manifest (storage,
dtype, shape, stride, offset), so tensors anywhere in the object, not only in dicts,
lists and tuples, are stored once in the shard files and keep their sharing.

Identity is structural, never a stand-in:

- a **key path** is a tuple of the keys and indices themselves (``("model", 0,
  "weight")``), never a string joined with ``"."`` (``{"a.b": x}`` and ``{"a": {"b":
  y}}`` are different paths); :func:`display_path` renders one unambiguously for people;
- a **storage** is identified by its ``StorageImpl`` (``untyped_storage()._cdata``), as
  ``torch.save`` does, never by its data pointer: two storages that start at the same
  address (``torch.frombuffer`` twice over one buffer) are two storages.

The persistent ids are tuples whose first element is ``"storage"``, because torch's
``weights_only`` unpickler refuses any other (see :func:`load_skeleton`).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import json
import pickle
import re
import struct
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

__all__ = ["KeyPath", "display_path", "encode_path", "decode_path", "path_key", "iter_tensors", "Collector",
           "dump_skeleton", "load_skeleton", "check_storable", "rebuild_tensor", "gc_paused",
           "StructureKey", "structure_key"]

KeyPath = tuple[Hashable, ...]

# Persistent-id tags (second element of a ("storage", tag, ...) tuple).
TENSOR_PID = "zckpt.tensor"           # ("storage", TENSOR_PID, tensor index)
STORAGE_PID = "zckpt.storage"         # ("storage", STORAGE_PID, storage id, dtype or None)

# torch.save pickles with protocol 2, and torch's weights_only unpickler warns on others.
PICKLE_PROTOCOL = 2

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def display_path(path: KeyPath | None) -> str:
    """An unambiguous, readable rendering: ``model['0.weight']``, ``optim.state[0].exp_avg``.

    Identifier-like string keys are joined with dots; every other key (ints, strings
    holding dots or digits, tuples) is shown in brackets with its ``repr``, so two
    different paths never render alike.
    """
    if path is None:
        return "<inside an object>"
    if not path:
        return "<root>"
    out = []
    for i, k in enumerate(path):
        if type(k) is str and _IDENT.match(k):
            out.append(k if i == 0 else "." + k)
        else:
            out.append(f"[{k!r}]")
    return "".join(out)


# --- key paths in JSON: each key keeps its type -------------------------------------------
def _encode_key(k: Any) -> Any:
    if type(k) is str:
        return k
    if type(k) is bool or k is None:
        return {"@": "const", "v": k}
    if type(k) is int:
        return {"@": "int", "v": str(k)}   # a string: JSON readers may round big ints
    if type(k) is float:
        return {"@": "float", "v": repr(k)}
    if type(k) is tuple:
        return {"@": "tuple", "v": [_encode_key(x) for x in k]}
    # Any other hashable key (enum members, frozensets, ...): identified by type and repr.
    return {"@": "other", "type": f"{type(k).__module__}.{type(k).__qualname__}", "v": repr(k)}


def _decode_key(v: Any) -> Any:
    if isinstance(v, str):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"bad key in a key path: {v!r}")
    tag = v.get("@")
    if tag == "const":
        return v["v"]
    if tag == "int":
        return int(v["v"])
    if tag == "float":
        return float(v["v"])
    if tag == "tuple":
        return tuple(_decode_key(x) for x in v["v"])
    if tag == "other":
        return _OtherKey(v["type"], v["v"])
    raise ValueError(f"bad key tag {tag!r} in a key path")


class _OtherKey:
    """A key of a type the manifest records only by type name and repr (equal only to
    another such key, never to a tuple or string that happens to look alike)."""

    __slots__ = ("type_name", "text")

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name, self.text = type_name, text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _OtherKey) and (self.type_name, self.text) == (other.type_name, other.text)

    def __hash__(self) -> int:
        return hash((_OtherKey, self.type_name, self.text))

    def __repr__(self) -> str:
        return self.text


def encode_path(path: KeyPath) -> list[Any]:
    """A key path as JSON data; equal paths, and only those, encode alike."""
    return [_encode_key(k) for k in path]


def decode_path(data: list[Any]) -> KeyPath:
    return tuple(_decode_key(v) for v in data)


def path_key(encoded: list[Any]) -> str:
    """A canonical string of an encoded key path: equal exactly when the paths are
    (``nan`` keys included, which never equal themselves as floats)."""
    return json.dumps(encoded, sort_keys=True, separators=(",", ":"))


# --- walking ------------------------------------------------------------------------------
def iter_tensors(obj: Any) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    """Yield ``(key path, tensor)`` for every tensor reachable through dicts, lists and
    tuples (and their subclasses), depth first in insertion order.

    Iterative, with an explicit stack: no closure refers to itself, so nothing this
    creates needs the cyclic garbage collector to be freed (training stacks often run
    with ``gc.disable()``). A container met again inside itself (a cycle) is not
    re-entered; one shared by two paths is walked under both.
    """
    stack: list[Any] = [(obj, ())]
    open_ids: set[int] = set()        # containers on the current path
    while stack:
        item = stack.pop()
        if type(item) is _Exit:
            open_ids.discard(item.ident)
            continue
        node, path = item
        if isinstance(node, torch.Tensor):
            yield path, node
            continue
        if isinstance(node, dict):
            children = [(v, path + (k,)) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            children = [(v, path + (i,)) for i, v in enumerate(node)]
        else:
            continue
        if id(node) in open_ids:
            continue
        open_ids.add(id(node))
        stack.append(_Exit(id(node)))
        stack.extend(reversed(children))


class _Exit:
    __slots__ = ("ident",)

    def __init__(self, ident: int) -> None:
        self.ident = ident


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def check_storable(t: torch.Tensor, where: str) -> None:
    """Refuse tensors zckpt cannot store, naming ``where``.

    Raises:
        TypeError: sparse, quantized, nested or meta tensors, and tensor subclasses.
    """
    # On the trainer's hot path: cheap checks first.
    if type(t) in _PLAIN and t.layout is torch.strided and not t.is_quantized and t.device.type != "meta" \
            and not t.is_nested:
        return
    if type(t) not in _PLAIN:
        # DTensor, FakeTensor, functional wrappers: their storage is not their data.
        raise TypeError(f"tensor {where} is a {type(t).__name__}; zckpt stores plain tensors "
                        "and Parameters (convert subclasses, e.g. DTensor.to_local())")
    if t.layout != torch.strided:
        raise TypeError(f"tensor {where} has layout {t.layout}; zckpt stores strided tensors only "
                        "(convert sparse tensors with .to_dense())")
    if t.is_quantized:
        raise TypeError(f"tensor {where} is quantized; zckpt does not store quantized tensors")
    if t.device.type == "meta":
        raise TypeError(f"tensor {where} is on the meta device and has no data to save")
    raise TypeError(f"tensor {where} is a nested tensor; zckpt does not store those")


def _has_python_state(t: torch.Tensor) -> bool:
    # torch.save keeps attributes set on a tensor (t.foo = 1) through its own reduce.
    d = getattr(t, "__dict__", None)
    return bool(d)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a state dict is planned.

    Planning allocates a few small objects per tensor, and every 700 allocations the
    collector traverses every tracked object, the caller's tensors included: for 2,000
    small tensors that was 20 of 49 ms of planning here (gc off: 29 ms). Nothing planned
    here forms a cycle, so pausing it loses nothing.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Collector:
    """The tensors and storages of one state dict, found by walking and by pickling.

    ``tensors`` holds ``(key path or None, tensor)``: one entry per key path that
    reaches a tensor through containers, plus one per tensor found only inside another
    object while pickling (path None). ``storages`` holds ``(storage, first user)`` per
    distinct storage in first-seen order (the user is None for a storage saved on its
    own); ``storage_of[i]`` is the storage id of ``tensors[i]``.
    """

    def __init__(self) -> None:
        self.tensors: list[tuple[KeyPath | None, torch.Tensor]] = []
        self.storage_of: list[int] = []
        self.storages: list[tuple[torch.UntypedStorage, torch.Tensor | None]] = []
        self._sid_by_impl: dict[int, int] = {}
        self._index_by_id: dict[int, int] = {}

    def walk(self, obj: Any) -> None:
        """Register every tensor reachable through containers, with its key path.

        Raises:
            TypeError: a tensor zckpt cannot store, naming its key path.
        """
        for path, t in iter_tensors(obj):
            check_storable(t, repr(display_path(path)))
            self._add(path, t)

    def add(self, path: KeyPath | None, t: torch.Tensor) -> int:
        """Register ``t`` under ``path`` as the next tensor; return its index."""
        return self._add(path, t)

    def _add(self, path: KeyPath | None, t: torch.Tensor) -> int:
        index = len(self.tensors)
        self.tensors.append((path, t))   # holds t: its id() cannot be reused meanwhile
        self.storage_of.append(self.storage_id(t.untyped_storage(), t))
        self._index_by_id.setdefault(id(t), index)
        return index

    def storage_id(self, st: torch.UntypedStorage, user: torch.Tensor | None = None) -> int:
        """The id of a storage, by its StorageImpl; registers it on first sight."""
        impl = st._cdata
        sid = self._sid_by_impl.get(impl)
        if sid is None:
            sid = self._sid_by_impl[impl] = len(self.storages)
            self.storages.append((st, user))   # holds the StorageImpl alive
        return sid

    def tensor_index(self, t: torch.Tensor) -> int:
        """Index of a tensor object met while pickling (registered with path None if new)."""
        index = self._index_by_id.get(id(t))
        if index is None:
            check_storable(t, "held inside an object")
            index = self._add(None, t)
        return index

    def release(self) -> None:
        """Drop every reference to the caller's tensors and storages."""
        self.tensors = []
        self.storages = []
        self._index_by_id = {}


class _SkeletonPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, collector: Collector) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._collector = collector

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if t is torch.Tensor or t is torch.nn.Parameter:
            if _has_python_state(obj):
                return None  # torch's own reduce keeps its attributes; its storage comes here
            return ("storage", TENSOR_PID, self._collector.tensor_index(obj))
        if t is torch.storage.TypedStorage:
            sid = self._collector.storage_id(obj._untyped_storage)
            return ("storage", STORAGE_PID, sid, obj.dtype)
        if t is torch.UntypedStorage:
            return ("storage", STORAGE_PID, self._collector.storage_id(obj), None)
        if isinstance(obj, torch.Tensor):
            check_storable(obj, "held inside an object")
        return None


def dump_skeleton(obj: Any, collector: Collector, *, by_value: bool = False) -> bytes:
    """Pickle ``obj`` with every tensor and storage replaced by a persistent id.

    Tensors the collector has not seen (held inside other objects) are registered.
    With ``by_value`` the pickle is cloudpickle's (classes and functions defined in
    ``__main__`` travel by value): for a worker process, never for a checkpoint file,
    which ``torch.load``'s rules must be able to read.

    Raises:
        TypeError: a value cannot be pickled, or a tensor cannot be stored.
    """
    buf = io.BytesIO()
    pickler = _cloud_pickler_type()(buf, collector) if by_value else _SkeletonPickler(buf, collector)
    try:
        pickler.dump(obj)
    except TypeError as exc:
        if str(exc).startswith("tensor "):
            raise  # check_storable's own message, naming the tensor
        raise TypeError(f"{_locate_unpicklable(obj)} cannot be saved: it is not picklable ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a user's __reduce__ may raise anything
        raise TypeError(f"{_locate_unpicklable(obj)} cannot be saved: it is not picklable ({exc!r})") from exc
    return buf.getvalue()


_CLOUD_PICKLER: type | None = None


def _cloud_pickler_type() -> type:
    global _CLOUD_PICKLER
    if _CLOUD_PICKLER is None:
        import cloudpickle

        class _CloudSkeletonPickler(cloudpickle.Pickler):
            def __init__(self, file: io.BytesIO, collector: Collector) -> None:
                super().__init__(file)
                self._collector = collector

            persistent_id = _SkeletonPickler.persistent_id

        _CLOUD_PICKLER = _CloudSkeletonPickler
    return _CLOUD_PICKLER


def _locate_unpicklable(obj: Any) -> str:
    """Name the first leaf reachable through containers that does not pickle (error path only)."""
    stack: list[tuple[Any, KeyPath]] = [(obj, ())]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if isinstance(node, torch.Tensor) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend(reversed([(v, path + (k,)) for k, v in node.items()]))
            continue
        if isinstance(node, (list, tuple)):
            stack.extend(reversed([(v, path + (i,)) for i, v in enumerate(node)]))
            continue
        try:
            _SkeletonPickler(io.BytesIO(), Collector()).dump(node)
        except Exception:  # noqa: BLE001 - any failure names this leaf
            return f"the value at {display_path(path)!r} ({type(node).__name__})"
    return "a value in the state dict"


def load_skeleton(data: bytes, tensor: Callable[[int], torch.Tensor],
                  storage: Callable[[int, torch.dtype | None], Any], *, weights_only: bool) -> Any:
    """Unpickle a skeleton, resolving persistent ids through ``tensor`` and ``storage``.

    With ``weights_only`` the pickle is read by torch's own restricted unpickler
    (``torch._weights_only_unpickler``, the one ``torch.load(weights_only=True)`` uses,
    honouring ``torch.serialization.add_safe_globals``): it accepts exactly the types
    ``torch.load(weights_only=True)`` accepts and raises ``pickle.UnpicklingError``
    naming any other. Without it, any pickle runs: use only for trusted checkpoints.
    """
    def persistent_load(pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in the checkpoint's structure")
        if pid[1] == TENSOR_PID:
            return tensor(int(pid[2]))
        if pid[1] == STORAGE_PID:
            return storage(int(pid[2]), pid[3] if len(pid) > 3 else None)
        raise pickle.UnpicklingError(f"unknown persistent id kind {pid[1]!r}")

    if weights_only:
        from torch import _weights_only_unpickler

        up: Any = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    else:
        up = pickle.Unpickler(io.BytesIO(data))
    up.persistent_load = persistent_load
    return up.load()


def rebuild_tensor(storage: torch.UntypedStorage, dtype: torch.dtype, storage_offset: int, shape: Any,
                   stride: Any, *, requires_grad: bool, is_param: bool, conj: bool = False,
                   neg: bool = False) -> torch.Tensor:
    """A view of ``storage`` rebuilt the way ``torch.load`` rebuilds a saved tensor.

    Uses torch's own ``_rebuild_tensor_v2`` (lazy conjugate and negative bits restored
    from the metadata, as torch does) and ``Parameter(data, requires_grad)``.
    """
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    metadata = {k: True for k, v in (("conj", conj), ("neg", neg)) if v} or None
    t = torch._utils._rebuild_tensor_v2(typed, storage_offset, tuple(shape), tuple(stride),
                                        requires_grad and not is_param, collections.OrderedDict(), metadata)
    if is_param:
        t = torch.nn.Parameter(t, requires_grad)
    return t


class StructureKey:
    """What a save's plan, manifest records and pickled skeleton depend on, for reuse.

    ``key`` is a hashable description of a plain state dict (containers, plain tensors,
    simple values): every container's type, keys, length and identity (a container or
    tensor object met again is a back-reference, as the pickle memo sees it), every
    simple value, and every tensor's dtype, shape, stride, offset, flags and storage
    (by first-seen index, with its size and device). ``storages`` are the caller's
    storages in the order a :class:`Collector` would find them.
    """

    __slots__ = ("key", "storages")

    def __init__(self, key: tuple[Any, ...], storages: list[torch.UntypedStorage]) -> None:
        self.key = key
        self.storages = storages


_SIMPLE = (int, float, bool, str, bytes, type(None))


# Mappings whose whole state is their items (and nn.Module's _metadata, and a
# defaultdict's factory): any other subclass may carry state the key cannot see.
_MAPPINGS = (dict, collections.OrderedDict, collections.defaultdict, collections.Counter)


def _exact(x: Any) -> Any:
    """A token equal for two simple values exactly when pickling them gives the same value:
    == would make 0.0 and -0.0 alike, and (1, 2) and (1.0, 2); floats go by their bits."""
    t = type(x)
    if t is float:
        return (float, struct.pack("<d", x))
    if t is tuple:
        return (tuple, tuple(_exact(e) for e in x))
    return (t, x)


def _simple_key(k: Any) -> bool:
    return type(k) in _SIMPLE or (type(k) is tuple and all(type(x) in _SIMPLE for x in k))


def _simple_metadata(meta: Any) -> tuple[Any, ...] | None:
    """nn.Module's ``_metadata`` (module name -> {"version": n}) as a token, or None."""
    if not isinstance(meta, dict):
        return None
    out = []
    for name, entry in meta.items():
        if type(name) is not str or not isinstance(entry, dict) or \
                not all(type(k) is str and type(v) in _SIMPLE for k, v in entry.items()):
            return None
        out.append((name, type(entry), tuple((k, _exact(v)) for k, v in entry.items())))
    return (type(meta), tuple(out))


def structure_key(obj: Any) -> StructureKey | None:
    """The :class:`StructureKey` of ``obj``, or None when it holds anything else (objects,
    tensor subclasses, storages, nesting deeper than the recursion limit): such state
    dicts are planned afresh every time.

    Walks in :func:`iter_tensors`' order, so storages come out in a Collector's order.
    About 1.3 us per tensor (planning afresh: about 12).
    """
    walker = _KeyWalker()
    try:
        if not walker.visit(obj):
            return None
    except RecursionError:
        return None
    return StructureKey(tuple(walker.tokens), walker.storages)


_dispatch_keys = torch._C._dispatch_keys
# Dispatch key sets (as ints) seen so far -> whether such a tensor is a plain strided
# tensor with data (not sparse, quantized, nested, meta or a functorch wrapper). The key
# set also carries the conjugate and negative bits and the device type, so one call
# (0.35 us) stands for six property reads (0.65 us) in the per-save identity check.
_PLAIN_KEYSETS: dict[int, bool] = {}


def _plain_keyset(node: torch.Tensor, keys: int) -> bool:
    ok = _PLAIN_KEYSETS.get(keys)
    if ok is None:
        ok = _PLAIN_KEYSETS[keys] = (node.layout is torch.strided and not node.is_quantized
                                     and not node.is_nested and node.device.type != "meta")
    return ok


class _KeyWalker:
    """Depth-first, recursive over containers only (a method, not a closure: no cycle).

    The hot path of every save of a reused plan: about 1.3 us per tensor here, so the
    loops below inline what a helper call per item would cost (0.1-0.3 us each).
    """

    __slots__ = ("tokens", "storages", "sid_of", "seen", "keep")

    def __init__(self) -> None:
        self.tokens: list[Any] = []
        self.storages: list[torch.UntypedStorage] = []   # hold every storage whose _cdata is a key
        self.sid_of: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        # Containers met, so their ids stay unique during the walk (a tensor in a dict is
        # held by that dict, and its storage by ``storages``).
        self.keep: list[Any] = []

    def visit(self, node: Any) -> bool:
        t = type(node)
        if t in _SIMPLE:
            self.tokens.append(_exact(node))
            return True
        seen = self.seen
        back = seen.get(id(node))
        if back is not None:               # met again: a back-reference, as the pickle memo sees it
            self.tokens.append(("ref", back))
            return True
        seen[id(node)] = len(seen)
        self.keep.append(node)
        if t is torch.Tensor or t is torch.nn.Parameter:
            return self._tensor(node, t)
        tokens = self.tokens
        if t in _MAPPINGS:
            state = getattr(node, "__dict__", None)
            if state and set(state) != {"_metadata"}:
                return False
            meta = _simple_metadata(state["_metadata"]) if state else ()
            if meta is None:
                return False
            tokens.append((t, len(node), meta, node.default_factory if t is collections.defaultdict else None))
            sid_of, storages = self.sid_of, self.storages
            for k, v in node.items():
                # A str key is its own token: every other token is a tuple, so none is equal to it.
                if type(k) is str:
                    tokens.append(k)
                elif _simple_key(k):
                    tokens.append(_exact(k))  # a key's place is fixed by its container's header
                else:
                    return False
                tv = type(v)
                if (tv is torch.Tensor or tv is torch.nn.Parameter) and id(v) not in seen:
                    # The tensor in a dict: the common case, inlined (see _tensor).
                    seen[id(v)] = len(seen)
                    keys = _dispatch_keys(v).raw_repr()
                    if v.__dict__ or not (_PLAIN_KEYSETS.get(keys) or _plain_keyset(v, keys)):
                        return False
                    st = v.untyped_storage()
                    sid = sid_of.get(st._cdata)
                    if sid is None:
                        sid = sid_of[st._cdata] = len(storages)
                        storages.append(st)
                        tokens.append((tv, sid, keys, v.dtype, v.shape, v.stride(), v.storage_offset(),
                                       v.requires_grad, st.nbytes(), v.get_device()))
                    else:
                        tokens.append((tv, sid, keys, v.dtype, v.shape, v.stride(), v.storage_offset(),
                                       v.requires_grad))
                elif not self.visit(v):
                    return False
        elif t is list or t is tuple or (issubclass(t, tuple) and hasattr(t, "_fields")
                                         and not getattr(node, "__dict__", None)):
            tokens.append((t, len(node)))
            for v in node:
                if not self.visit(v):
                    return False
        else:
            return False
        tokens.append(None)                # closes the container
        return True

    def _tensor(self, node: torch.Tensor, t: type) -> bool:
        """A tensor's token. The dict loop in :meth:`visit` inlines this: keep the two alike."""
        keys = _dispatch_keys(node).raw_repr()
        if node.__dict__ or not _plain_keyset(node, keys):
            return False
        st = node.untyped_storage()
        sid = self.sid_of.get(st._cdata)
        if sid is None:
            # First sight of the storage: its size and device index come with this token
            # (the device's type is in the key set); a later tensor of it has a shorter one.
            sid = self.sid_of[st._cdata] = len(self.storages)
            self.storages.append(st)
            self.tokens.append((t, sid, keys, node.dtype, node.shape, node.stride(), node.storage_offset(),
                                node.requires_grad, st.nbytes(), node.get_device()))
        else:
            self.tokens.append((t, sid, keys, node.dtype, node.shape, node.stride(), node.storage_offset(),
                                node.requires_grad))
        return True
