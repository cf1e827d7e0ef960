"""Planning a multi-rank save, locally: what this rank writes, and the global structure.

Every rank walks its own state dict and computes, without communicating:

- the *leaves*: every tensor reachable through containers, in walk order (tied
  tensors once), each with its box in the global tensor and the ranks holding that same
  box (a plain tensor under DDP: every rank; a ``DTensor``: the ranks whose mesh
  coordinates differ only along ``Replicate()`` dimensions);
- who writes each leaf (:func:`zckpt.distributed.boxes.assign_owners`: one rank per box,
  replicated bytes balanced);
- a *structure digest* (key paths, global shapes, dtypes, placements) that the commit
  compares across ranks, so ranks that disagree fail the save instead of writing a
  checkpoint nobody can load;
- a *proxy* of the state dict, with each leaf replaced by a placeholder, which the
  coordinator pickles as the checkpoint's structure (non-tensor values are written once,
  from the coordinator's state dict, as DCP does).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..format import dtype_name
from ..tree import KeyPath, display_path, encode_path
from .boxes import Box, assign_owners, shard_box

__all__ = ["Leaf", "RankPlan", "plan_rank", "chunk_key"]


@dataclass(frozen=True)
class Leaf:
    """One tensor of the state dict, as this rank holds it."""

    index: int                    # the placeholder's place in the walk (the skeleton's tensor id)
    path: KeyPath
    local: torch.Tensor           # this rank's data: the tensor itself, or a DTensor's local shard
    pieces: tuple[tuple[Box, tuple[int, ...]], ...]   # every distinct box of the tensor, and the
                                  # ranks holding it (global ranks, ascending); the same on every rank
    mine: int                     # which of ``pieces`` this rank holds
    placements: str               # "" for a plain tensor; e.g. "R,S(0)" for a DTensor
    param: bool
    requires_grad: bool
    placeholder: torch.Tensor     # stands for the tensor in the proxy (and so in the skeleton)

    @property
    def box(self) -> Box:
        return self.pieces[self.mine][0]

    def piece_nbytes(self, k: int) -> int:
        return self.pieces[k][0].numel * self.local.element_size()


@dataclass(frozen=True)
class RankPlan:
    leaves: list[Leaf]
    owners: list[int]             # per leaf, the rank that writes this rank's piece of it
    piece_owners: list[list[int]]  # per leaf, the writing rank of each of its pieces
    written: list[tuple[int, int]]  # (bytes, writing rank) of every piece written, whole save
    proxy: Any                    # the state dict with every leaf a placeholder (for the skeleton)
    digest: str                   # of the global structure; equal on every rank that agrees
    describe: list[str]           # one line per leaf, to name differences between ranks

    def owned(self, rank: int) -> dict[str, torch.Tensor]:
        """The state dict this rank's pool writes: ``chunk_key(i) -> local tensor``."""
        return {chunk_key(leaf.index): leaf.local for leaf, owner in zip(self.leaves, self.owners, strict=True)
                if owner == rank}

    def bytes_per_rank(self, ranks: Sequence[int]) -> dict[int, int]:
        """Bytes each rank writes (the whole save's, as every rank computes it alike)."""
        out = {r: 0 for r in ranks}
        for nbytes, owner in self.written:
            out[owner] = out.get(owner, 0) + nbytes
        return out


def chunk_key(index: int) -> str:
    """The key of leaf ``index`` in a rank's own save (and so in its manifest)."""
    return f"t{index}"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _placement_desc(placements: Sequence[Any]) -> list[tuple[str, int]]:
    from torch.distributed.tensor import Replicate, Shard
    out = []
    for p in placements:
        if type(p) is Shard:  # not _StridedShard (a Shard subclass) whose layout differs
            out.append(("shard", int(p.dim)))
        elif isinstance(p, Replicate):
            out.append(("replicate", -1))
        else:
            raise TypeError(f"a DTensor with placement {p!r} cannot be saved: zckpt saves Shard(d) and "
                            "Replicate() placements (redistribute Partial ones first)")
    return out


def _dtensor_leaf(index: int, path: KeyPath, dt: Any) -> Leaf:
    mesh = dt.device_mesh
    desc = _placement_desc(dt.placements)
    global_shape = tuple(dt.shape)
    mesh_ranks = mesh.mesh
    coord = mesh.get_coordinate()
    where = display_path(path)
    if coord is None:
        raise ValueError(f"DTensor {where}: this rank is not in its device mesh")
    box = shard_box(global_shape, tuple(mesh_ranks.shape), coord, desc)
    local = dt._local_tensor if hasattr(dt, "_local_tensor") else dt.to_local()
    if tuple(local.shape) != box.size:
        raise ValueError(f"DTensor {where}: its local shard has shape {tuple(local.shape)}, but its placements "
                         f"{dt.placements} put a {box.size} box here (uneven sharding zckpt does not know)")
    # Every coordinate's box; ranks with equal boxes are replicas of one piece.
    flat = mesh_ranks.reshape(-1).tolist()
    shape = tuple(mesh_ranks.shape)
    by_box: dict[Box, list[int]] = {}
    for pos, r in enumerate(flat):
        c, rem = [], pos
        for n in reversed(shape):
            c.append(rem % n)
            rem //= n
        c.reverse()
        by_box.setdefault(shard_box(global_shape, shape, c, desc), []).append(int(r))
    pieces = tuple(sorted(((b, tuple(sorted(rs))) for b, rs in by_box.items()), key=lambda p: (p[0].offset, p[1])))
    mine = next(k for k, (b, _) in enumerate(pieces) if b == box)
    text = ",".join("R" if k == "replicate" else f"S({d})" for k, d in desc)
    return Leaf(index, path, local.detach(), pieces, mine, text,
                isinstance(dt, torch.nn.Parameter), bool(dt.requires_grad), torch.empty(0))


def plan_rank(state_dict: Any, ranks: Sequence[int]) -> RankPlan:
    """Walk ``state_dict`` and plan this rank's part of a save by the ranks ``ranks``.

    Raises:
        TypeError: an unsupported placement or a tensor subclass other than DTensor.
        ValueError: a DTensor whose mesh does not hold this rank, or unknown uneven sharding.
    """
    dtensor = _dtensor_type()
    leaves: list[Leaf] = []
    values: list[KeyPath] = []    # where non-tensor values are: part of the structure ranks must agree on
    memo: dict[int, Any] = {}
    group = tuple(sorted(int(r) for r in ranks))

    def proxy(node: Any, path: KeyPath) -> Any:
        got = memo.get(id(node))
        if got is not None:
            return got
        if isinstance(node, torch.Tensor):
            index = len(leaves)
            if dtensor is not None and isinstance(node, dtensor):
                leaf = _dtensor_leaf(index, path, node)
            elif type(node) in (torch.Tensor, torch.nn.Parameter):
                leaf = Leaf(index, path, node.detach(), ((Box.whole(tuple(node.shape)), group),), 0, "",
                            type(node) is torch.nn.Parameter, bool(node.requires_grad), torch.empty(0))
            else:
                raise TypeError(f"tensor {display_path(path)} is a {type(node).__name__}: zckpt.distributed "
                                "saves plain tensors and DTensors")
            leaves.append(leaf)
            out: Any = leaf.placeholder   # the skeleton refers to it by the leaf's index
        elif isinstance(node, dict):
            out = copy.copy(node)       # keeps the type and attributes (nn.Module's _metadata)
            memo[id(node)] = out
            for k, v in node.items():
                out[k] = proxy(v, path + (k,))
            return out
        elif isinstance(node, list):
            out = type(node)() if type(node) is not list else []
            memo[id(node)] = out
            out.extend(proxy(v, path + (i,)) for i, v in enumerate(node))
            return out
        elif isinstance(node, tuple):
            items = [proxy(v, path + (i,)) for i, v in enumerate(node)]
            out = type(node)(*items) if hasattr(type(node), "_fields") else type(node)(items)
        else:
            values.append(path)         # a value: pickled as it is (by the coordinator)
            return node
        memo[id(node)] = out
        return out

    proxied = proxy(state_dict, ())
    # Replicated tensors that share a storage (a view of a weight, tied weights saved under
    # two tensors) are written by one rank, so the checkpoint keeps them sharing: the
    # first of them (in walk order, the same on every rank) heads the group.
    head: dict[int, int] = {}
    group_of: list[int] = []
    for leaf in leaves:
        if leaf.placements:
            group_of.append(leaf.index)
            continue
        group_of.append(head.setdefault(leaf.local.untyped_storage()._cdata, leaf.index))
    flat: list[tuple[int, tuple[int, ...]]] = []
    where: dict[tuple[int, int], int] = {}
    for leaf in leaves:
        if group_of[leaf.index] != leaf.index:
            continue
        for k, (_, reps) in enumerate(leaf.pieces):
            nbytes = leaf.local.untyped_storage().nbytes() if not leaf.placements else leaf.piece_nbytes(k)
            where[(leaf.index, k)] = len(flat)
            flat.append((nbytes, reps))
    flat_owners = assign_owners(flat, group)
    piece_owners = [[flat_owners[where[(group_of[leaf.index], k)]] for k in range(len(leaf.pieces))]
                    for leaf in leaves]
    owners = [po[leaf.mine] for leaf, po in zip(leaves, piece_owners, strict=True)]
    describe = [f"{display_path(leaf.path)}: {dtype_name(leaf.local.dtype)}{list(leaf.box.global_shape)}"
                f"{' ' + leaf.placements if leaf.placements else ''}"
                f"{f' shares #{group_of[leaf.index]}' if group_of[leaf.index] != leaf.index else ''}"
                for leaf in leaves]
    # Values' key paths count (a key only one rank has is a different structure); their
    # values do not (they may differ per rank; the coordinator's are written).
    describe += [f"{display_path(p)}: value" for p in values]
    token = json.dumps([[encode_path(leaf.path), d] for leaf, d in zip(leaves, describe, strict=False)]
                       + [encode_path(p) for p in values], default=repr, separators=(",", ":"))
    written = [(nbytes, owner) for (nbytes, _), owner in zip(flat, flat_owners, strict=True)]
    return RankPlan(leaves, owners, piece_owners, written, proxied, xxhash.xxh3_64_hexdigest(token.encode()), describe)
