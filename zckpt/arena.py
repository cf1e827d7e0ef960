"""The staging arena: reusable, pre-faulted shared-memory segments owned by the trainer.

Each segment is a memfd (no name in /dev/shm, so a SIGKILL of anyone leaks nothing)
mapped by the trainer through ``torch.UntypedStorage.from_file`` (the storage owns the
mapping, so no tensor can outlive it). Workers map the same memory by opening
``/proc/<trainer pid>/fd/<fd>``, which needs the trainer alive and the same user.

Copying into warm pages ran at 11-15 GB/s here, into fresh pages at 0.3-2 GB/s: so
segments are allocated and touched once, then reused save after save. A buffer set
holds one segment per shard; ``staging_buffers`` sets let save N+1 stage while save N
is written. A set grows (a new, larger segment with a new key) only when a save needs
more room than it has.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from .errors import PoolClosedError
from .protocol import SegmentRef

__all__ = ["Segment", "BufferSet", "Arena"]

logger = logging.getLogger(__name__)

_ROUND = 1 << 21          # segment sizes are multiples of 2 MiB (huge-page friendly)


def _round_up(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


class Segment:
    """One memfd mapped read-write in the trainer as a flat uint8 tensor."""

    def __init__(self, key: str, nbytes: int) -> None:
        self.key = key
        self.nbytes = nbytes
        self.fd = os.memfd_create(f"zckpt-{key}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            try:
                os.posix_fallocate(self.fd, 0, nbytes)  # fail now, not with SIGBUS later
            except OSError as exc:
                raise MemoryError(f"cannot reserve {nbytes} bytes of shared memory for staging: {exc}") from exc
            storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{self.fd}", shared=True, nbytes=nbytes)
            self.tensor = torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]
            self.tensor.fill_(0)  # touch every page once: later copies run at memcpy speed
        except BaseException:
            os.close(self.fd)
            raise
        self.pinned = False

    def ref(self) -> SegmentRef:
        return SegmentRef(self.key, f"/proc/{os.getpid()}/fd/{self.fd}", self.nbytes)

    def close(self) -> None:
        if self.pinned:
            from ._cuda import unregister_host
            unregister_host(self.tensor)
            self.pinned = False
        self.tensor = None  # type: ignore[assignment]  # drops the mapping with the storage
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class BufferSet:
    index: int
    segments: list[Segment]
    busy: bool = False


class Arena:
    """Buffer sets of segments; :meth:`acquire` hands one out, :meth:`release` returns it."""

    def __init__(self, num_sets: int, name: str, round_bytes: int = _ROUND, budget: int | None = None) -> None:
        self._name = name
        self._round = round_bytes  # segment sizes are multiples of this
        self._budget = budget      # the most bytes all segments together may hold (None: no limit)
        self._reserved = 0         # bytes being allocated right now by other threads (under the budget)
        self._sets = [BufferSet(i, []) for i in range(num_sets)]
        # Re-entrant: a signal handler that reads the pool's stats or closes it may run
        # on a thread that is inside acquire()/release() (a plain Lock would deadlock).
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._next_id = 0
        self.allocations = 0      # segments ever created: flat after the first save

    def reset_locks_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's copy may be held by a thread the child lacks)."""
        self._cond = threading.Condition(threading.RLock())

    @property
    def nbytes(self) -> int:
        """Shared memory currently held."""
        with self._cond:
            return sum(seg.nbytes for s in self._sets for seg in s.segments)

    def live_keys(self) -> list[str]:
        with self._cond:
            return [seg.key for s in self._sets for seg in s.segments]

    def acquire(self, sizes: list[int], timeout_s: float, pin: bool = False) -> BufferSet:
        """Wait for a free buffer set and make its segments at least ``sizes`` bytes.

        Blocks while every set is being written by an earlier save (at most
        ``timeout_s``; raises ``TimeoutError`` naming the wait).
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosedError("the staging arena is closed")
                free = [s for s in self._sets if not s.busy]
                if free:
                    # Prefer a set that already fits: no allocation on the hot path.
                    bufset = next((s for s in free if self._fits(s, sizes)), None)
                    if bufset is None and self._budget is not None and not self._growth_fits(free[0], sizes) \
                            and any(self._fits(s, sizes) for s in self._sets if s.busy):
                        free = []    # growing this one would break the budget; a busy one fits: wait for it
                    else:
                        bufset = bufset or free[0]
                if free and bufset is not None:
                    bufset.busy = True
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no staging buffer came free within {timeout_s:.1f}s "
                                       "(buffer_wait_timeout_s): earlier saves are still being written")
                self._cond.wait(left)
        try:
            self._grow(bufset, sizes, pin)
        except BaseException:
            self.release(bufset)
            raise
        return bufset

    @staticmethod
    def _fits(bufset: BufferSet, sizes: list[int]) -> bool:
        return len(bufset.segments) >= len(sizes) and all(
            seg.nbytes >= n for seg, n in zip(bufset.segments, sizes, strict=False))

    def _growth_fits(self, bufset: BufferSet, sizes: list[int]) -> bool:
        """Whether making ``bufset`` fit ``sizes`` stays within the budget (call with the lock held)."""
        assert self._budget is not None
        held = sum(seg.nbytes for s in self._sets for seg in s.segments) + self._reserved
        extra = sum(_round_up(n, self._round) for i, n in enumerate(sizes)
                    if i >= len(bufset.segments) or bufset.segments[i].nbytes < n)
        return held + extra <= self._budget

    def _grow(self, bufset: BufferSet, sizes: list[int], pin: bool) -> None:
        for i, need in enumerate(sizes):
            if i < len(bufset.segments) and bufset.segments[i].nbytes >= need:
                seg = bufset.segments[i]
            else:
                with self._cond:
                    key = f"{self._name}-{self._next_id}"
                    self._next_id += 1
                # The first allocation is exact (RSS overhead stays at 1x the state dict);
                # a regrowth adds 1/8 so a state dict that keeps growing reallocates rarely.
                regrow = i < len(bufset.segments)
                nbytes = _round_up(need + (need // 8 if regrow else 0), self._round)
                if self._budget is not None:
                    if regrow:
                        # Under a budget the smaller segment goes first (this set is ours: busy),
                        # so the arena never holds both. Counted as 0 until replaced below.
                        with self._cond:
                            bufset.segments[i].close()
                            bufset.segments[i].nbytes = 0
                    try:
                        nbytes = self._reserve(nbytes, _round_up(need, self._round),
                                               sum(_round_up(n, self._round) for n in sizes))
                    except BaseException:
                        with self._cond:   # no closed placeholder stays behind: the set just gets shorter
                            for seg in bufset.segments[i:]:
                                seg.close()
                            del bufset.segments[i:]
                        raise
                try:
                    t0 = time.perf_counter()
                    seg = Segment(key, nbytes)
                    logger.info("arena %s: allocated segment %s of %.1f MiB in %.3fs",
                                self._name, key, nbytes / 2**20, time.perf_counter() - t0)
                except BaseException:
                    if self._budget is not None:
                        with self._cond:
                            self._reserved -= nbytes
                    raise
                with self._cond:
                    if i < len(bufset.segments):
                        bufset.segments[i].close()
                        bufset.segments[i] = seg
                    else:
                        bufset.segments.append(seg)
                    self.allocations += 1
                    if self._budget is not None:
                        self._reserved -= nbytes   # counted as held from here
            if pin and not seg.pinned:
                from ._cuda import register_host
                register_host(seg.tensor)
                seg.pinned = True

    def _reserve(self, nbytes: int, least: int, whole: int) -> int:
        """Under the budget, reserve ``nbytes`` (or at least ``least``) for a new segment and
        return what was reserved; raise StagingBudgetError if even ``least`` does not fit.

        Counted against the budget: every segment held (one being replaced too: it stays
        mapped until the new one is in place, and in the workers until their next job),
        and what other threads have reserved and are allocating right now."""
        with self._cond:
            held = sum(seg.nbytes for s in self._sets for seg in s.segments) + self._reserved
            assert self._budget is not None
            if held + nbytes > self._budget:
                nbytes = least                          # without the regrowth's slack
            if held + nbytes > self._budget:
                from .errors import StagingBudgetError
                raise StagingBudgetError(
                    f"this save stages {whole / 2**20:.1f} MiB ({len(self._sets)} buffer set(s) of it need up to "
                    f"{len(self._sets) * whole / 2**20:.1f} MiB): its next segment of {nbytes / 2**20:.1f} MiB "
                    "would take the arena to "
                    f"{(held + nbytes) / 2**20:.1f} MiB, over staging_budget_bytes ({self._budget / 2**20:.1f} "
                    f"MiB, all {len(self._sets)} buffer set(s) together, segments in {self._round >> 10} KiB "
                    "steps; a segment being replaced counts until the new one is in place: reserve() with your "
                    "largest state dict first avoids regrowing)")
            self._reserved += nbytes
            return nbytes

    def segments_by_index(self) -> list[list[Segment]]:
        """``[i]``: segment ``i`` of every buffer set (the ones shard ``i`` stages into)."""
        with self._cond:
            width = max((len(s.segments) for s in self._sets), default=0)
            return [[s.segments[i] for s in self._sets if i < len(s.segments)] for i in range(width)]

    def has_free(self) -> bool:
        """Whether a buffer set is free now (a hint: another thread may take it first)."""
        with self._cond:
            return any(not s.busy for s in self._sets)

    def release(self, bufset: BufferSet) -> None:
        with self._cond:
            bufset.busy = False
            self._cond.notify_all()

    def close(self) -> None:
        """Unmap and close every segment. Idempotent."""
        with self._cond:
            self._closed = True
            sets, self._sets = self._sets, []
            self._cond.notify_all()
        for s in sets:
            for seg in s.segments:
                seg.close()
            s.segments.clear()
