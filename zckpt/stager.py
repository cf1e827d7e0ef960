"""Staging: the one copy the trainer waits for, from its tensors into the arena.

For the native format each shard is laid out in its segment as the exact image of its
file (safetensors header, then entries), so a worker writes it in one sequential pass.
For the compat path tensors are packed back to back (64-byte aligned) and rebuilt in
the worker as tensors over the same shared memory.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from .arena import BufferSet, Segment
from .format import dtype_name
from .plan import SavePlan
from .protocol import FileTask, SegmentRef, TensorSpec

__all__ = ["byte_view", "stage_files", "stage_state", "layout_state"]

_ALIGN = 64
_SMALL = 1 << 20   # below this, copy with memmove instead of torch's copy_

# memmove that keeps the GIL (a PYFUNCTYPE call). Releasing it for a microsecond's copy
# invites a convoy: with a busy trainer thread, each release of the GIL on the stager
# thread costs up to a switch interval (5 ms) to win it back, thousands of times over.
_MEMMOVE_ADDR = ctypes.cast(ctypes.memmove, ctypes.c_void_p).value
assert _MEMMOVE_ADDR is not None
_memmove_holding_gil = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    _MEMMOVE_ADDR)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage of ``t`` (no copy)."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


def _copy(dst: torch.Tensor, src: torch.Tensor, device_stager: Optional[object]) -> None:
    if src.device.type == "cpu":
        dst.copy_(src)
    else:
        device_stager.copy(dst, src)  # type: ignore[union-attr]


def _needs_device(plan_sources: list[torch.Tensor]) -> bool:
    return any(t.device.type != "cpu" for t in plan_sources)


def stage_files(plan: SavePlan, bufset: BufferSet) -> list[FileTask]:
    """Copy every shard's file image into its segment; return the workers' tasks."""
    device_stager = None
    if _needs_device([s.source for s in plan.storages]):
        from ._cuda import DeviceStager
        device_stager = DeviceStager()
    tasks = []
    sources = {s.sid: s.source for s in plan.storages}
    with torch.no_grad():
        for shard in plan.shards:
            seg = bufset.segments[shard.index]
            out = seg.tensor
            base = out.data_ptr()
            _memmove_holding_gil(base, shard.header, len(shard.header))
            for p in shard.pieces:
                src = sources[p.sid]
                if p.nbytes < _SMALL and src.device.type == "cpu":
                    # ~1 us, against ~10 us for building byte views and a torch copy_:
                    # tens of ms over thousands of small tensors.
                    _memmove_holding_gil(base + p.file_offset, src.untyped_storage().data_ptr() + p.start,
                                         p.nbytes)
                else:  # large: torch's copy runs on several threads; device: async on a side stream
                    _copy(out[p.file_offset: p.file_offset + p.nbytes],
                          byte_view(src)[p.start: p.start + p.nbytes], device_stager)
            tasks.append(FileTask(shard.name, seg.ref(), 0, shard.nbytes, shard.chunks))
        if device_stager is not None:
            device_stager.wait()
    return tasks


def layout_state(tensors: list[torch.Tensor], shared_ok: bool) -> tuple[list[int], int]:
    """Byte offsets in one segment for each storage that must be copied (-1: zero-copy)."""
    offsets: list[int] = []
    seen: dict[tuple[str, int], int] = {}
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if shared_ok and t.device.type == "cpu" and t.is_shared() and st.nbytes() > 0:
            offsets.append(-1)
        elif st.nbytes() > 0 and key in seen:
            offsets.append(seen[key])
        else:
            offsets.append(total)
            if st.nbytes() > 0:
                seen[key] = total
            total += -(-st.nbytes() // _ALIGN) * _ALIGN
    return offsets, total


def _shared_ref(t: torch.Tensor) -> SegmentRef:
    """Where a worker maps a tensor the user already put in shared memory."""
    st = t.untyped_storage()
    if torch.multiprocessing.get_sharing_strategy() == "file_descriptor":
        fd, size = st._share_fd_cpu_()  # returns the existing fd of an already-shared storage
        return SegmentRef(f"user-{fd}", f"/proc/{os.getpid()}/fd/{fd}", size)
    _, name, size = st._share_filename_cpu_()
    name = name.decode() if isinstance(name, bytes) else name
    return SegmentRef(f"user-{name}", "/dev/shm/" + name.lstrip("/"), size)


def stage_state(tensors: list[torch.Tensor], offsets: list[int], segment: Optional[Segment]) -> list[TensorSpec]:
    """Copy the tensors that need it into ``segment``; describe all of them for the worker."""
    device_stager = None
    if _needs_device(tensors):
        from ._cuda import DeviceStager
        device_stager = DeviceStager()
    specs = []
    sids: dict[tuple[str, int], int] = {}
    copied: set[int] = set()
    with torch.no_grad():
        for t, off in zip(tensors, offsets):
            st = t.untyped_storage()
            skey = (str(t.device), st.data_ptr()) if st.nbytes() else ("empty", len(sids))
            sid = sids.setdefault(skey, len(sids))
            if off < 0:
                ref, byte_offset, cacheable = _shared_ref(t), 0, False
            else:
                assert segment is not None
                if off not in copied and st.nbytes():
                    _copy(segment.tensor[off: off + st.nbytes()], byte_view(t), device_stager)
                    copied.add(off)
                ref, byte_offset, cacheable = segment.ref(), off, True
            specs.append(TensorSpec(ref, byte_offset, st.nbytes(), dtype_name(t.dtype), tuple(t.shape),
                                    tuple(t.stride()), int(t.storage_offset()), sid, cacheable))
        if device_stager is not None:
            device_stager.wait()
    return specs
