"""Staging for DCP saves: each rank's tensors copied once into a pool's arena (see zckpt.dcp)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..arena import Arena, BufferSet

__all__ = ["Staged", "StagedStateDict", "stage_tensors", "collect_tensors", "rebuild_staged", "GAP"]

_ALIGN = 64          # each staged tensor starts at a multiple of this (any dtype's alignment)
GAP = _ALIGN - 1     # padding between two staged tensors: written along, so they stay one run


class Staged:
    """One arena buffer set holding one save's staged tensors, until its items are written.

    Released (once) when that save's ``write_data`` is done with it; or, when the save
    never gets there (planning failed on some rank, DCP's process executor, an error
    between ``stage`` and ``write_data``), when the thread that claimed it in ``reset``
    has ended, or when the staged tensors are garbage (see ``ZckptWriter._sweep``).
    """

    def __init__(self, arena: Arena, bufset: BufferSet, nbytes: int) -> None:
        self.arena, self.bufset, self.nbytes = arena, bufset, nbytes
        self.segment = bufset.segments[0]
        self.base = self.segment.tensor.data_ptr()
        self._lock = threading.Lock()
        self.released = False
        self.ticket = -1                                  # the save's place in call order
        self.stage_thread: threading.Thread | None = None
        self.claimed_by: threading.Thread | None = None   # the thread running its DCP save

    def locate(self, t: torch.Tensor) -> int | None:
        """The byte offset of ``t``'s data in this set, if ``t`` is contiguous in it."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        ptr = t.data_ptr()
        n = t.numel() * t.element_size()
        if self.base <= ptr and ptr + n <= self.base + self.nbytes:
            return ptr - self.base
        return None

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        self.arena.release(self.bufset)


def stage_tensors(tensors: list[torch.Tensor], arena: Arena, acquire: Callable[[int, bool], BufferSet]
                   ) -> tuple[Staged | None, list[torch.Tensor]]:
    """Copy ``tensors`` into one arena buffer set; return it and the contiguous copies.

    Blocks for the copy (device-to-host copies are waited for) and, before it, for a free
    buffer set (``acquire(nbytes, pin)``, which bounds the wait).
    """
    offsets, total = [], 0
    for t in tensors:
        if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type == "meta":
            raise TypeError(f"ZckptWriter cannot stage a {t.layout} {'quantized ' if t.is_quantized else ''}"
                            f"tensor on {t.device} (dense strided tensors only)")
        offsets.append(total)
        n = t.numel() * t.element_size()
        total += -(-n // _ALIGN) * _ALIGN
    if total == 0:
        return None, [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    on_device = any(t.device.type != "cpu" for t in tensors)
    bufset = acquire(total, on_device)
    staged = Staged(arena, bufset, total)
    try:
        out = []
        device_stager = None
        if on_device:
            from .._cuda import DeviceStager
            device_stager = DeviceStager()
        flat = staged.segment.tensor
        try:
            with torch.no_grad():
                for t, off in zip(tensors, offsets, strict=True):
                    n = t.numel() * t.element_size()
                    if n == 0:
                        out.append(torch.empty(t.shape, dtype=t.dtype))
                        continue
                    dst = flat[off: off + n].view(t.dtype).view(t.shape)
                    src = t.detach()
                    if src.device.type == "cpu":
                        dst.copy_(src)
                    else:
                        assert device_stager is not None
                        device_stager.copy(dst, src)
                    out.append(dst)
        finally:   # no copy may still be landing in a buffer set that is released
            if device_stager is not None:
                device_stager.wait()
    except BaseException:
        staged.release()
        raise
    return staged, out


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t._local_tensor if isinstance(t, DTensor) else t


def collect_tensors(obj: Any, found: dict[int, torch.Tensor]) -> None:
    """Every distinct tensor (a DTensor's local shard) in a state dict, by identity."""
    if isinstance(obj, torch.Tensor):
        if type(obj).__name__ == "ShardedTensor":
            raise TypeError("ZckptWriter does not stage ShardedTensor: use DTensor (FSDP2, tensor parallel)")
        local = _local(obj)
        found.setdefault(id(local), local)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            collect_tensors(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            collect_tensors(v, found)


class StagedStateDict(dict):
    """The state dict :meth:`ZckptWriter.stage` returns: views of shared memory that must
    not travel to another process (DCP's process executor would pickle it)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a state dict staged by ZckptWriter cannot be pickled into another process: use DCP's "
                        "default thread executor (AsyncCheckpointerType.THREAD); zckpt writes in its own "
                        "processes anyway")


def rebuild_staged(obj: Any, copies: dict[int, torch.Tensor], in_leaf: bool = False) -> Any:
    """``obj`` with every tensor replaced by its staged copy (DTensors keep their spec);
    other values deep-copied, so the trainer may change them once staging returns.

    ``in_leaf``: inside a tuple, which DCP saves whole with ``torch.save``: a view there
    would drag the whole arena segment into the file, so those tensors are cloned.
    """
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        local = copies[id(obj._local_tensor)]
        return DTensor(local.clone() if in_leaf else local, obj._spec, requires_grad=obj.requires_grad)
    if isinstance(obj, torch.Tensor):
        t = copies[id(obj)].clone() if in_leaf else copies[id(obj)]
        return t.requires_grad_(obj.requires_grad) if obj.requires_grad and t.is_floating_point() else t
    if isinstance(obj, Mapping):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = rebuild_staged(v, copies, in_leaf)  # type: ignore[index]
        return out
    if isinstance(obj, list):
        return [rebuild_staged(v, copies, in_leaf) for v in obj]
    if isinstance(obj, tuple):
        values = [rebuild_staged(v, copies, True) for v in obj]
        return type(obj)._make(values) if hasattr(type(obj), "_fields") else type(obj)(values)  # type: ignore[attr-defined]
    return copy.deepcopy(obj)
