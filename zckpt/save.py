"""One save, from ``pool.save()`` to its verdict, with its state named.

::

    STAGING ──▶ WRITING ──▶ COMMITTING ──▶ COMMITTED
       │           │            │
       └───────────┴────────────┴────────▶ FAILED

- STAGING: planning and the copy into the arena (the trainer is blocked, or the stager
  thread works); ``fut.staged`` is not done yet.
- WRITING: ``fut.staged`` is done; the workers write the shard files.
- COMMITTING: every shard is durable; the commit waits for its turn (saves commit in the
  order they were made) and a worker writes the manifest and renames.
- COMMITTED / FAILED: final. ``fut.result()`` returns the path / raises.

Every transition goes through :meth:`Save.transition`, which logs it and changes, in one
place and in this order, everything observable about the save: the pool's counters (via
``on_final``), its temp directories (removed on failure), then its futures. So whoever a
future wakes sees the counters and the file system as they will stay (a test that failed
one run in five under load read ``saves_failed`` before it was counted).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import commit as C
from .errors import ZckptError

if TYPE_CHECKING:  # pragma: no cover
    from . import protocol as P
    from .arena import BufferSet
    from .plan import SavePlan

__all__ = ["SaveState", "SaveFuture", "Save"]

logger = logging.getLogger(__name__)


class SaveState(enum.Enum):
    STAGING = "staging"
    WRITING = "writing"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"


_ALLOWED: dict[SaveState, frozenset[SaveState]] = {
    SaveState.STAGING: frozenset({SaveState.WRITING, SaveState.FAILED}),
    SaveState.WRITING: frozenset({SaveState.COMMITTING, SaveState.FAILED}),
    SaveState.COMMITTING: frozenset({SaveState.COMMITTED, SaveState.FAILED}),
    SaveState.COMMITTED: frozenset(),
    SaveState.FAILED: frozenset(),
}
FINAL = frozenset({SaveState.COMMITTED, SaveState.FAILED})


class SaveFuture(Future):
    """The handle of one save. ``result()`` returns the committed path once durable.

    Attributes:
        staged: a ``Future`` done when the trainer may mutate its tensors again.
        path: the final checkpoint directory.
        save_id: the save's id in its pool (in log lines as ``save <id>``).
        timings: where the save's time went, in seconds: ``plan_s``, ``wait_buffer_s``,
            ``staged_s``, ``blocked_s``, ``durable_s``; and ``shard_retries``, how many
            shards were written again by a replacement worker, and ``write_retries``, how
            many writer calls were repeated after a ``TransientWriteError``.
        mirror_errors: once committed, the mirrors it could not be committed under (one
            line each; empty normally). The next save's commit completes them.
    """

    def __init__(self, path: str, save_id: int = -1) -> None:
        super().__init__()
        self.path = path
        self.save_id = save_id
        self.staged: Future = Future()
        self.timings: dict[str, float] = {}
        self.mirror_errors: list[str] = []   # mirrors this save could not be committed under


class Save:
    """Book-keeping of one save; its state changes only in :meth:`transition`.

    Touched by the trainer (or stager) thread while staging, then by the supervisor and
    cleanup threads; the fields other than ``state`` are filled in while STAGING and
    only read afterwards (``pending`` and ``results`` by the supervisor thread alone).

    Args:
        save_id: unique in its pool, from birth.
        finals: the final directories (primary first, then mirrors).
        t0: ``time.perf_counter()`` when ``save()`` was called.
        on_final: called with the save when it reaches COMMITTED or FAILED, before its
            futures resolve (the pool counts it and lets the next save commit).
    """

    def __init__(self, save_id: int, finals: list[str], t0: float, on_final: Callable[[Save], None]) -> None:
        self.id = save_id
        self.finals = finals
        self.t0 = t0
        self.future = SaveFuture(finals[0], save_id)
        self.state = SaveState.STAGING
        self.tmp_dirs: list[str] = []
        self.created_dirs: list[str] = []   # directories this save created (their parents get fsynced)
        self.jobs: list[Any] = []           # its shard jobs (ShardJob), for the retry count
        self.bufset: BufferSet | None = None
        self.plan: SavePlan | None = None
        self.tree: dict[str, Any] = {}             # the manifest's encoded structure
        self.metadata: Any = None                   # the caller's JSON metadata
        self.pending: set[int] = set()            # shard indices still being written
        self.task_indices: list[int] = []         # the shard index of each task dispatched
        self.writer_kwargs: dict[str, Any] = {}   # passed to every write_file of the save
        self.cuda_events: Any = None              # async staging: the trainer's CUDA streams at save()
        self.per_round = 1 << 30                  # shards per round (a save in rounds): a file's worker slot
        self.round_retries: list[Any] = []        # the earlier rounds' jobs, for the retry count
        self.results: dict[int, P.JobResult] = {}
        self.error: BaseException | None = None  # the first error seen
        self._on_final = on_final
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.finals[0]

    def transition(self, to: SaveState, error: BaseException | None = None) -> bool:
        """Move to ``to`` if allowed from the current state; False (and nothing done) if not.

        Entering WRITING resolves ``staged``; entering COMMITTED or FAILED counts the
        save (``on_final``), removes its temp directories on failure, and resolves its
        futures, in that order. May run ``rmtree``: call FAILED off the supervisor thread.
        """
        with self._lock:
            was = self.state
            if to not in _ALLOWED[was]:
                return False
            self.state = to
            if error is not None and self.error is None:
                self.error = error
        level = logging.WARNING if to is SaveState.FAILED else logging.DEBUG
        logger.log(level, "save %d of %s: %s -> %s%s", self.id, self.path, was.value, to.value,
                   f" ({self.error})" if to is SaveState.FAILED else "")
        fut = self.future
        now = time.perf_counter()
        if to is SaveState.WRITING:
            fut.timings["staged_s"] = now - self.t0
            fut.timings.setdefault("blocked_s", now - self.t0)
            fut.staged.set_result(None)
        elif to is SaveState.COMMITTED:
            fut.timings["durable_s"] = now - self.t0
            self._on_final(self)
            logger.info("committed %s in %.3fs (save %d)", self.path, fut.timings["durable_s"], self.id)
            fut.set_result(self.path)
        elif to is SaveState.FAILED:
            for tmp in self.tmp_dirs:
                C.discard(tmp)
            self._on_final(self)
            exc = self.error or ZckptError(f"save {self.id} of {self.path} failed")
            if not fut.staged.done():
                fut.staged.set_exception(exc)
            fut.set_exception(exc)
        return True
