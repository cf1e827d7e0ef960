"""Loading a checkpoint into a (possibly sharded) state dict, at any world size.

Each rank works out the box it needs of every tensor (a ``DTensor``: its local shard
under its *current* placements; a plain tensor: all of it), intersects it with the
boxes saved, reads only the storages of the chunks that overlap (every byte of them
checked against the manifest's checksums) and copies the overlaps straight into its
tensors. Non-tensor values come from the checkpoint's structure. Works for multi-rank
checkpoints (version 3) and single-rank ones alike.

With a process group, the ranks agree at two points (a one-int ``all_reduce``: load is
called on every rank's main thread, never concurrently with training) so that a key,
shape or dtype mismatch, or a damaged file, fails the load on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CorruptCheckpointError
from ..format import dtype_from_name, dtype_name
from ..manifest import Manifest, TensorRecord, decode_skeleton, path_json, read_manifest
from ..reader import _check_files, _check_views, _read_storages, _tensor_from
from ..tree import KeyPath, display_path, encode_path, iter_tensors, load_skeleton, path_key
from .boxes import Box, intersect

__all__ = ["load"]


class _Slot:
    """Where the skeleton had a tensor: replaced by the target's own."""


def load(path: str | os.PathLike[str], state_dict: Any, *, process_group: Any = None, verify: bool = True,
         weights_only: bool = True) -> Any:
    """Fill ``state_dict`` in place from the checkpoint at ``path``; return it.

    Call on every rank. Tensors are matched by key path; each ``DTensor`` receives the
    part of the saved tensor its current placement puts on this rank (resharding from
    whatever placement and world size saved it), each plain tensor the whole. Non-tensor
    values at key paths the checkpoint has are replaced by the saved ones.

    Args:
        path: a committed checkpoint directory (multi-rank or single-rank).
        state_dict: the target, with tensors of the saved global shapes and dtypes.
        process_group: the ranks loading together (default: the default group when
            ``torch.distributed`` is initialised, else this process alone).
        verify: check every byte read against its checksum.
        weights_only: read the structure with torch's restricted unpickler.

    Raises:
        KeyError: a tensor of ``state_dict`` is not in the checkpoint (named), on every rank.
        ValueError: a global shape or dtype differs (named), on every rank.
        CorruptCheckpointError: a damaged file or manifest, on every rank.
    """
    group = process_group
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    directory = os.fspath(path)
    m: Manifest | None = None
    paths: list[str] = []
    targets: list[tuple[KeyPath, torch.Tensor, Box, list[TensorRecord]]] = []
    err: BaseException | None = None
    try:
        m = read_manifest(directory)
        paths = _check_files(directory, m)
        _check_views(m, directory)
        targets = _targets(state_dict, _chunks_by_path(m))
    except (KeyError, ValueError, CorruptCheckpointError, FileNotFoundError) as exc:
        err = exc
    _agree(group, err, "checking the checkpoint against the state dict")
    assert m is not None
    try:
        _fill(m, paths, targets, verify)
        _set_values(m, directory, state_dict, weights_only)
    except (CorruptCheckpointError, OSError) as exc:
        err = exc
    _agree(group, err, "reading the checkpoint")
    return state_dict


def _agree(group: Any, err: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed (``err`` here, or elsewhere)."""
    failed = err is not None
    if group is not None:
        flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
        dist.all_reduce(flag, group=group)
        failed_somewhere = int(flag.item()) > 0
    else:
        failed_somewhere = failed
    if err is not None:
        raise err
    if failed_somewhere:
        raise RuntimeError(f"zckpt.distributed.load failed on another rank while {what} (its error names why)")


def _chunks_by_path(m: Manifest) -> dict[str, list[TensorRecord]]:
    """Records by key path (canonical JSON: int keys and list indices encode as objects)."""
    out: dict[str, list[TensorRecord]] = {}
    for rec in m.tensors:
        if rec.path is not None:
            out.setdefault(path_json(rec.path), []).append(rec)
    return out


def _saved_box(rec: TensorRecord) -> Box:
    if rec.global_shape is None or rec.global_offset is None:
        return Box.whole(tuple(rec.shape))
    return Box(tuple(rec.global_offset), tuple(rec.shape), tuple(rec.global_shape))


def _targets(state_dict: Any, groups: dict[str, list[TensorRecord]]) -> list[tuple[KeyPath, torch.Tensor, Box,
                                                                                    list[TensorRecord]]]:
    """``(path, local tensor to fill, its box, the saved chunks)`` per tensor of the target."""
    out = []
    for path, t in _walk(state_dict):
        where = display_path(path)
        chunks = groups.get(path_key(encode_path(path)))
        if not chunks:
            raise KeyError(f"tensor {where} is not in the checkpoint")
        local, box = _local_and_box(t, where)
        saved = _saved_box(chunks[0])
        if saved.global_shape != box.global_shape:
            raise ValueError(f"tensor {where}: the checkpoint holds global shape {list(saved.global_shape)}, "
                             f"the state dict {list(box.global_shape)}")
        if chunks[0].dtype != dtype_name(local.dtype):
            raise ValueError(f"tensor {where}: the checkpoint holds {chunks[0].dtype}, the state dict "
                             f"{dtype_name(local.dtype)}")
        out.append((path, local, box, chunks))
    return out


def _local_and_box(t: torch.Tensor, where: str) -> tuple[torch.Tensor, Box]:
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t._local_tensor if hasattr(t, "_local_tensor") else t.to_local()
        if tuple(local.shape) != tuple(shape):
            raise ValueError(f"DTensor {where}: local shape {tuple(local.shape)}, its placement says {tuple(shape)}")
        return local, Box(tuple(int(o) for o in offset), tuple(int(s) for s in shape), tuple(t.shape))
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise ValueError(f"tensor {where} is a {type(t).__name__}: load fills plain tensors and DTensors")
    return t, Box.whole(tuple(t.shape))


def _walk(obj: Any) -> list[tuple[KeyPath, torch.Tensor]]:
    """Every tensor of the target by key path (``tree.iter_tensors``), a tied one once."""
    seen: set[int] = set()
    out = []
    for path, t in iter_tensors(obj):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((path, t))
    return out


def _fill(m: Manifest, paths: list[str], targets: Sequence[tuple[KeyPath, torch.Tensor, Box, list[TensorRecord]]],
          verify: bool) -> None:
    needed: dict[int, None] = {}
    work = []
    for _path, local, box, chunks in targets:
        for rec in chunks:
            common = intersect(box, _saved_box(rec))
            if common is not None and common.numel:
                needed[rec.storage] = None
                work.append((local, box, rec, common))
    buffers: list[torch.Tensor | None] = [torch.empty(st.nbytes, dtype=torch.uint8) if sid in needed else None
                                          for sid, st in enumerate(m.storages)]
    _read_storages(m, paths, buffers, verify and m.checks, None)
    storages = [b.untyped_storage() if b is not None else torch.UntypedStorage(0) for b in buffers]
    with torch.no_grad():
        for local, box, rec, common in work:
            src = _tensor_from(rec, storages).detach()
            saved = _saved_box(rec)
            src_part = src[tuple(slice(c - s, c - s + n) for c, s, n in zip(common.offset, saved.offset, common.size,
                                                                              strict=True))]
            dst_part = local[tuple(slice(c - b, c - b + n) for c, b, n in zip(common.offset, box.offset, common.size,
                                                                               strict=True))]
            dst_part.copy_(src_part.to(dtype_from_name(rec.dtype)))


def _set_values(m: Manifest, directory: str, state_dict: Any, weights_only: bool) -> None:
    """Replace the target's non-tensor values by the saved ones, where both have the key path."""
    if m.version < 2:
        return
    slot: Any = _Slot()   # stands where the structure has a tensor (the target keeps its own)
    saved = load_skeleton(decode_skeleton(m.tree, directory), lambda i: slot, lambda sid, dtype: None,
                          weights_only=weights_only)
    _copy_values(saved, state_dict)


def _copy_values(saved: Any, target: Any) -> None:
    if isinstance(saved, dict) and isinstance(target, dict):
        for k, v in saved.items():
            if k not in target:
                continue
            if isinstance(v, (dict, list)) and not isinstance(target[k], torch.Tensor):
                _copy_values(v, target[k])
            elif not isinstance(v, _Slot) and not isinstance(target[k], torch.Tensor) \
                    and not isinstance(v, (dict, list, tuple)):
                target[k] = v
    elif isinstance(saved, list) and isinstance(target, list):
        for i, v in enumerate(saved[: len(target)]):
            if isinstance(v, (dict, list)):
                _copy_values(v, target[i])
            elif not isinstance(v, _Slot) and not isinstance(target[i], torch.Tensor) and not isinstance(v, tuple):
                target[i] = v
