"""The CUDA staging path, kept small and apart: it cannot be tested on CPU-only machines.

Device tensors are copied into the page-locked arena with ``non_blocking=True`` on a side
stream; the stream is synchronised before ``staged`` resolves. The arena is page-locked
once with ``cudaHostRegister`` (segments are page-aligned and live as long as the pool).
CUDA IPC handles are never passed to workers: they fail in containers.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_REGISTER_DEFAULT = 0


def register_host(tensor: torch.Tensor) -> None:
    """Page-lock an arena segment so device-to-host copies run at full speed, async."""
    rc = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), _REGISTER_DEFAULT)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister of {tensor.numel()} bytes failed with error {int(rc)}")


def unregister_host(tensor: torch.Tensor) -> None:
    try:
        rc = torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
        if int(rc) != 0:
            logger.warning("cudaHostUnregister failed with error %d", int(rc))
    except Exception:  # interpreter shutdown, CUDA already torn down
        logger.debug("cudaHostUnregister skipped", exc_info=True)


def record_current_streams() -> dict[int, torch.cuda.Event] | None:
    """On the trainer's thread, at ``save()``: an event at the tail of the current stream
    of every CUDA device, so that a copy issued later from another thread (async
    staging) waits for the kernels the trainer had queued, on whatever stream it used.
    None when CUDA was never initialised (no CUDA tensor can exist)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    events = {}
    for d in range(torch.cuda.device_count()):
        events[d] = torch.cuda.current_stream(d).record_event()
    return events


class DeviceStager:
    """Issues device-to-host copies on a side stream; :meth:`wait` makes them visible.

    ``after``: events from :func:`record_current_streams` taken on the trainer's thread;
    without them, each copy waits for the current stream of the thread issuing it (right
    when that is the trainer's own thread).
    """

    def __init__(self, after: dict[int, torch.cuda.Event] | None = None) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._used: list[torch.cuda.Stream] = []
        self._after = after
        self._ordered: set[torch.device] = set()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dev = src.device
        stream: torch.cuda.Stream | None = self._streams.get(dev)
        if stream is None:
            stream = self._streams[dev] = torch.cuda.Stream(device=dev)
        if dev not in self._ordered:
            # The side stream must see the trainer's pending writes to src (once per
            # device and save: later copies are queued behind the first on the same stream).
            event = self._after.get(dev.index if dev.index is not None else torch.cuda.current_device()) \
                if self._after is not None else None
            if event is not None:
                stream.wait_event(event)
            else:
                stream.wait_stream(torch.cuda.current_stream(dev))
            self._ordered.add(dev)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        if stream not in self._used:
            self._used.append(stream)

    def wait(self) -> None:
        for stream in self._used:
            stream.synchronize()
        self._used.clear()
