"""Boxes: where a piece of a tensor lies in the whole, and who writes which piece.

Pure functions, torch-free: every rank runs them on the same inputs and gets the same
answer, which is what lets ranks plan a save without talking to each other.

- A :class:`Box` is a hyper-rectangle of a tensor of ``global_shape``: ``offset`` and
  ``size`` per dimension (DCP calls it a chunk: ``offsets``/``sizes`` of
  ``ChunkStorageMetadata``).
- :func:`shard_box` is where a ``DTensor``'s local shard lies, for any mesh coordinate,
  from its placements (``Shard(d)`` splits as ``torch.chunk`` does, ``Replicate()`` keeps
  the whole); the save checks it against what torch reports for the rank itself.
- :func:`assign_owners` picks, for each piece held by several ranks (replicated), the
  one rank that writes it: largest first, each to the candidate with the fewest bytes so
  far (the longest-processing-time rule, Graham 1969), so replicated bytes are balanced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Box", "shard_box", "split_dim", "intersect", "assign_owners"]


@dataclass(frozen=True, slots=True)
class Box:
    """``offset[d] <= i[d] < offset[d] + size[d]`` in a tensor of ``global_shape``."""

    offset: tuple[int, ...]
    size: tuple[int, ...]
    global_shape: tuple[int, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Box:
        return cls(tuple(0 for _ in shape), tuple(shape), tuple(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def is_whole(self) -> bool:
        return self.size == self.global_shape and not any(self.offset)


def split_dim(length: int, parts: int, index: int) -> tuple[int, int]:
    """``(offset, size)`` of part ``index`` of ``length`` split into ``parts`` as ``torch.chunk``
    splits it (DTensor's ``Shard``): parts of ``ceil(length / parts)``, the last ones shorter
    or empty."""
    if parts <= 0 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts}")
    step = -(-length // parts) if length else 0
    start = min(index * step, length)
    return start, max(0, min(length, start + step) - start)


def shard_box(global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
              placements: Sequence[tuple[str, int]]) -> Box:
    """The box of the local shard at mesh ``coordinate``.

    ``placements[i]`` is ``("shard", d)`` or ``("replicate", -1)`` for mesh dimension
    ``i`` (partial placements are not saved: reduce them first). Mesh dimensions shard in
    order, each splitting what the earlier ones left, as DTensor does.
    """
    offset = [0] * len(global_shape)
    size = list(global_shape)
    for mesh_dim, (kind, dim) in enumerate(placements):
        if kind == "replicate":
            continue
        if kind != "shard" or not 0 <= dim < len(global_shape):
            raise ValueError(f"unsupported placement {kind}({dim}) on mesh dimension {mesh_dim}")
        start, length = split_dim(size[dim], mesh_shape[mesh_dim], coordinate[mesh_dim])
        offset[dim] += start
        size[dim] = length
    return Box(tuple(offset), tuple(size), tuple(global_shape))


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same tensor, or None."""
    off, size = [], []
    for ao, asz, bo, bsz in zip(a.offset, a.size, b.offset, b.size, strict=True):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        off.append(lo)
        size.append(hi - lo)
    return Box(tuple(off), tuple(size), a.global_shape)


def assign_owners(pieces: Sequence[tuple[int, Sequence[int]]], ranks: Sequence[int]) -> list[int]:
    """The writing rank of each piece ``(nbytes, candidate ranks)``, balanced.

    Pieces with one candidate are that rank's; the rest go largest first to the
    candidate with the fewest bytes so far (ties: the piece's order, then the lowest
    rank). Deterministic: every rank computes the same list.
    """
    load = {r: 0 for r in ranks}
    owners = [-1] * len(pieces)
    for i, (nbytes, cands) in enumerate(pieces):
        if len(cands) == 1:
            owners[i] = cands[0]
            load[cands[0]] = load.get(cands[0], 0) + nbytes
    order = sorted((i for i, (_, c) in enumerate(pieces) if len(c) > 1), key=lambda i: (-pieces[i][0], i))
    for i in order:
        cands = pieces[i][1]
        best = min(cands, key=lambda r: (load.get(r, 0), r))
        owners[i] = best
        load[best] = load.get(best, 0) + pieces[i][0]
    return owners

