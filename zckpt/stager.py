"""Staging: the one copy the trainer waits for, from its tensors into the arena.

For the native format each shard is laid out in its segment as the exact image of its
file (safetensors header, then entries), so a worker writes it in one sequential pass.
For the compat path each storage gets a segment of its own, and the worker maps it as
a storage of exactly that size, so the writer sees the caller's storages, not the arena.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from .arena import BufferSet
from .format import dtype_name
from .plan import SavePlan, ShardPlan
from .protocol import FileTask, SegmentRef, StorageSpec, TensorSpec
from .tree import Collector

__all__ = ["byte_view", "stage_files", "stage_state", "layout_state", "tensor_specs"]

_SMALL = 1 << 20   # below this, copy with memmove instead of torch's copy_

# memmove that keeps the GIL (a PYFUNCTYPE call). Releasing it for a microsecond's copy
# invites a convoy: with a busy trainer thread, each release of the GIL on the stager
# thread costs up to a switch interval (5 ms) to win it back, thousands of times over.
_MEMMOVE_ADDR = ctypes.cast(ctypes.memmove, ctypes.c_void_p).value
assert _MEMMOVE_ADDR is not None
_memmove_holding_gil = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    _MEMMOVE_ADDR)


def byte_view(st: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole of storage ``st`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (st.nbytes(),), (1,))


def _copy(dst: torch.Tensor, src: torch.Tensor, device_stager: object | None) -> None:
    if src.device.type == "cpu":
        dst.copy_(src)
    else:
        device_stager.copy(dst, src)  # type: ignore[union-attr]


def stage_files(plan: SavePlan, bufset: BufferSet, sources: list[torch.UntypedStorage],
                shards: list[ShardPlan] | None = None, after: Any = None) -> list[FileTask]:
    """Copy every shard's file image into its segment; return the workers' tasks.

    ``sources[sid]`` is the caller's storage ``sid`` of the plan (the plan itself holds
    none, so one plan serves every save of the same structure). ``shards``: only these
    (one round of a save in rounds), the k-th into segment k. ``after``: the CUDA events
    of :func:`zckpt._cuda.record_current_streams`, taken on the trainer's thread (async
    staging copies from another thread).

    Device-to-host copies are waited for before this returns, also when it raises (the
    caller then releases the buffer set: no copy may still be landing in it).
    """
    device_stager = None
    if plan.on_device:
        from ._cuda import DeviceStager
        device_stager = DeviceStager(after)
    try:
        return _stage_files(plan, bufset, sources, shards, device_stager)
    finally:
        if device_stager is not None:
            device_stager.wait()


def _stage_files(plan: SavePlan, bufset: BufferSet, sources: list[torch.UntypedStorage],
                 shards: list[ShardPlan] | None, device_stager: Any) -> list[FileTask]:
    tasks = []
    memmove, on_cpu = _memmove_holding_gil, plan.on_cpu
    with torch.no_grad():
        for k, shard in enumerate(shards if shards is not None else plan.shards):
            seg = bufset.segments[k if shards is not None else shard.index]
            out = seg.tensor
            base = out.data_ptr()
            memmove(base, shard.header, len(shard.header))
            for file_offset, sid, start, nbytes in shard.copies:
                src = sources[sid]
                if nbytes < _SMALL and on_cpu[sid]:
                    # ~1 us, against ~10 us for building byte views and a torch copy_:
                    # tens of ms over thousands of small tensors.
                    memmove(base + file_offset, src.data_ptr() + start, nbytes)
                else:  # large: torch's copy runs on several threads; device: async on a side stream
                    _copy(out[file_offset: file_offset + nbytes], byte_view(src)[start: start + nbytes],
                          device_stager)
            tasks.append(FileTask(shard.name, seg.ref(), 0, shard.nbytes, shard.chunks))
    return tasks


def layout_state(storages: list[tuple[torch.UntypedStorage, torch.Tensor | None]]
                 ) -> tuple[list[int], list[int], list[SegmentRef | None]]:
    """Which storages go through the arena, and the size of each one's segment.

    Returns ``(slot per storage, segment sizes, shared refs)``: slot ``-1`` for an empty
    storage or one the caller already put in shared memory (handed over without a copy,
    as the original does; its ref says where the worker maps it), else the index of the
    segment that holds exactly that storage. One segment per storage: the worker maps
    each as a storage of exactly its own size, so ``torch.save`` there writes only that
    storage's bytes, never a neighbour's.
    """
    slots: list[int] = []
    sizes: list[int] = []
    refs: list[SegmentRef | None] = []
    for st, _ in storages:
        n = st.nbytes()
        ref = _shared_ref(st) if n and st.device.type == "cpu" and st.is_shared() else None
        refs.append(ref)
        if n == 0 or ref is not None:
            slots.append(-1)
        else:
            slots.append(len(sizes))
            sizes.append(n)
    return slots, sizes, refs


def _shared_ref(st: torch.UntypedStorage) -> SegmentRef | None:
    """Where a worker maps a storage the user already put in shared memory; None when it
    cannot be handed over (a ``torch.from_file`` storage is shared but has no fd): then
    it is copied like any other."""
    try:
        if torch.multiprocessing.get_sharing_strategy() == "file_descriptor":
            fd, size = st._share_fd_cpu_()  # returns the existing fd of an already-shared storage
            if fd < 0:
                return None
            return SegmentRef(f"user-{fd}", f"/proc/{os.getpid()}/fd/{fd}", size)
        _, name, size = st._share_filename_cpu_()
    except RuntimeError:
        return None
    name = name.decode() if isinstance(name, bytes) else name
    return SegmentRef(f"user-{name}", "/dev/shm/" + name.lstrip("/"), size)


def stage_state(storages: list[tuple[torch.UntypedStorage, torch.Tensor | None]], slots: list[int],
                refs: list[SegmentRef | None], bufset: BufferSet | None) -> list[StorageSpec]:
    """Copy the storages that need it into their segments; describe every storage for the worker."""
    device_stager = None
    if any(st.device.type != "cpu" for st, _ in storages):
        from ._cuda import DeviceStager
        device_stager = DeviceStager()
    specs = []
    with torch.no_grad():
        for (st, _), slot, ref in zip(storages, slots, refs, strict=False):
            n = st.nbytes()
            if n == 0:
                specs.append(StorageSpec(None, 0, False))
            elif ref is not None:
                specs.append(StorageSpec(ref, n, False))
            else:
                assert bufset is not None
                seg = bufset.segments[slot]
                _copy(seg.tensor[:n], byte_view(st), device_stager)
                specs.append(StorageSpec(seg.ref(), n, True))
        if device_stager is not None:
            device_stager.wait()
    return specs


def tensor_specs(collector: Collector) -> list[TensorSpec]:
    """How the worker rebuilds each tensor the skeleton refers to."""
    out = []
    for (_, t), sid in zip(collector.tensors, collector.storage_of, strict=False):
        out.append(TensorSpec(sid, dtype_name(t.dtype), tuple(t.shape), tuple(t.stride()), int(t.storage_offset()),
                              t.requires_grad, type(t) is torch.nn.Parameter, t.is_conj(), t.is_neg()))
    return out
