"""The global index of a multi-rank checkpoint: one manifest over every rank's files.

Each rank's pool commits its own part under ``<tmp root>/rank-<r>/`` with a manifest of
its own (files, checksums, its chunks keyed ``t<leaf>``, and in its metadata the box of
each chunk). The coordinator reads those manifests (JSON, checked; never a pickle from a
peer) and writes one version-3 manifest at the top: files as ``rank-<r>/<name>``,
storages and parts re-indexed, and per chunk a tensor record with its key path, its
``global_offset`` and the tensor's ``global_shape``. Records ``0..n-1`` are one chunk of
each leaf in the skeleton's order; the other chunks of a leaf follow. ``zckpt.load``,
``zckpt.verify``, ``zckpt.latest`` and ``zckpt inspect`` read it like any manifest.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..format import dtype_name
from ..manifest import (
    MULTI_RANK_VERSION,
    FileRecord,
    StorageRecord,
    TensorRecord,
    build_manifest,
    frozen_path,
    read_manifest,
)
from ..tree import display_path, encode_path
from .plan import Leaf, chunk_key

__all__ = ["rank_dir", "rank_metadata", "build_index", "PlanMismatchError"]


class PlanMismatchError(Exception):
    """A rank's part does not fit the plan (a missing or mis-sized chunk)."""


def rank_dir(root: str, rank: int) -> str:
    return os.path.join(root, f"rank-{rank}")


def rank_metadata(rank: int, leaves: Sequence[Leaf], owners: Sequence[int]) -> dict[str, Any]:
    """What a rank records in its own manifest for the index: the box of each chunk it wrote."""
    return {"zckpt_rank": rank,
            "boxes": {chunk_key(leaf.index): list(leaf.box.offset)
                      for leaf, owner in zip(leaves, owners, strict=True) if owner == rank}}


def build_index(root: str, ranks: Sequence[int], leaves: Sequence[Leaf], *, tree: Any, metadata: Any,
                checksum: str, created_unix: float) -> dict[str, Any]:
    """The global manifest body for the rank directories under ``root``.

    Raises:
        PlanMismatchError: a rank's manifest lacks a chunk, names an unknown one, or the chunks
            of a leaf do not cover it exactly.
        CorruptCheckpointError: a rank's manifest is missing or damaged.
    """
    by_key = {frozen_path(encode_path((chunk_key(leaf.index),))): leaf for leaf in leaves}
    files: list[FileRecord] = []
    storages: list[StorageRecord] = []
    chunks: dict[int, list[TensorRecord]] = {leaf.index: [] for leaf in leaves}
    for r in ranks:
        m = read_manifest(rank_dir(root, r))
        meta = m.metadata if isinstance(m.metadata, dict) else {}
        boxes = meta.get("boxes")
        if meta.get("zckpt_rank") != r or not isinstance(boxes, dict):
            raise PlanMismatchError(f"rank {r}'s manifest does not record its rank and boxes")
        file_base, storage_base = len(files), len(storages)
        files += [dataclasses.replace(f, name=f"rank-{r}/{f.name}", rank=r) for f in m.files]
        storages += [StorageRecord(nbytes=s.nbytes, device=s.device, rank=r,
                                   parts=tuple(dataclasses.replace(p, file=p.file + file_base) for p in s.parts))
                     for s in m.storages]
        for rec in m.tensors:
            leaf = by_key.get(rec.path)
            if leaf is None:
                raise PlanMismatchError(f"rank {r} wrote a chunk {rec.name!r} the plan does not have")
            offset = boxes.get(chunk_key(leaf.index))
            if not (isinstance(offset, list) and len(offset) == len(leaf.box.global_shape)
                    and all(type(o) is int and o >= 0 for o in offset)):
                raise PlanMismatchError(f"rank {r} recorded no box for {display_path(leaf.path)}")
            if rec.dtype != dtype_name(leaf.local.dtype):
                raise PlanMismatchError(f"rank {r} wrote {display_path(leaf.path)} as {rec.dtype}, the plan says "
                                  f"{dtype_name(leaf.local.dtype)}")
            chunks[leaf.index].append(TensorRecord(
                path=frozen_path(encode_path(leaf.path)), name=display_path(leaf.path),
                storage=rec.storage + storage_base, dtype=rec.dtype, shape=rec.shape, stride=rec.stride,
                offset=rec.offset, param=leaf.param, requires_grad=leaf.requires_grad, conj=rec.conj, neg=rec.neg,
                global_offset=tuple(offset), global_shape=leaf.box.global_shape))
    first: list[TensorRecord] = []
    rest: list[TensorRecord] = []
    for leaf in leaves:
        got = chunks[leaf.index]
        whole = math.prod(leaf.box.global_shape)
        covered = sum(math.prod(c.shape) for c in got)
        if not got or covered != whole:
            raise PlanMismatchError(f"{display_path(leaf.path)}: the ranks wrote {len(got)} chunk(s) covering "
                                    f"{covered} of its {whole} elements")
        first.append(got[0])
        rest += got[1:]
    body = build_manifest(checksum=checksum, tree=tree, metadata=metadata, torch_version=str(torch.__version__),
                          files=files, storages=storages, tensors=first + rest, created_unix=created_unix,
                          version=MULTI_RANK_VERSION)
    body["ranks"] = list(ranks)
    return body

