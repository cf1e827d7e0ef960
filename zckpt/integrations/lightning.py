"""Lightning's ``CheckpointIO`` through a zckpt pool: ``Trainer(plugins=[ZckptCheckpointIO()])``.

::

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from zckpt.integrations.lightning import ZckptCheckpointIO

    trainer = L.Trainer(plugins=[ZckptCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath="ckpt", save_top_k=2, save_last=True, ...)])
    trainer.fit(model, ckpt_path="last")       # resumes from ckpt/last.ckpt when there is one

Each checkpoint Lightning writes is a zckpt checkpoint *directory* under the name Lightning
chose (``ckpt/epoch=0-step=100.ckpt/`` holding shard files and ``manifest.json``).
``save_checkpoint`` returns once the state is copied into shared memory; the pool's
workers write, fsync and commit it atomically while training goes on.

How it fits Lightning 2.x (read from its sources: ``ModelCheckpoint``,
``_CheckpointConnector``, ``TorchCheckpointIO``):

- Lightning calls ``save_checkpoint`` and ``remove_checkpoint`` on global rank 0 only (its
  DDP strategies), ``load_checkpoint`` on every rank. The pool is made, lazily, in the
  process that saves; the plugin pickles without it (``ddp_spawn``).
- ``ModelCheckpoint`` checks names with ``fs.exists`` and finds ``ckpt_path="last"``
  among ``last*.ckpt`` entries of its directory by ``fs.modified``; both work on
  directories. A save in flight does not exist yet under its name (it is written into a
  ``*.tmp-*`` directory and renamed into place by its commit).
- ``save_last=True`` saves to the same ``last.ckpt`` again at every checkpoint. zckpt never
  overwrites, so a save to a name that exists (or is being saved) is committed beside it,
  as ``<name>.zckpt-<id>``, and once committed swapped into place in one atomic
  ``renameat2(RENAME_EXCHANGE)`` (on file systems without it: two renames, microseconds
  apart); the replaced checkpoint is then deleted. A crash at any point leaves a complete
  checkpoint under the name (old or new); a crash between the new one's commit and the swap
  leaves it complete under ``<name>.zckpt-<id>``, which ``zckpt.latest(dirpath)`` names.
- ``save_last="link"`` makes ``last.ckpt`` a symbolic link (Lightning's own code) to the
  newest top-k checkpoint right after its ``save_checkpoint`` returned, i.e. while it is
  still being written: if the trainer dies before that save commits, the link dangles and
  Lightning's ``ckpt_path="last"`` finds nothing. With this plugin prefer ``save_last=True``,
  or resume with ``ckpt_path=zckpt.latest(dirpath)``, which always names the newest
  committed checkpoint.
- ``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` itself, not
  through the plugin: load a zckpt checkpoint with ``ZckptCheckpointIO().load_checkpoint(path)``
  (or ``zckpt.load``) and ``model.load_state_dict(ckpt["state_dict"])``.

Deletions (``remove_checkpoint``, ``ModelCheckpoint``'s top-k pruning) run on a background
thread, in order after every save asked for before them, and never delete the newest
committed checkpoint of a directory while a newer save into it is in flight or after such a
save failed: they wait until a newer one commits (see :meth:`ZckptCheckpointIO.remove_checkpoint`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import queue
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .. import commit as C
from ..config import PoolConfig
from ..manifest import MANIFEST_NAME
from ..pool import CheckpointPool
from ..reader import load as zckpt_load
from ..save import SaveFuture

__all__ = ["ZckptCheckpointIO"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: The sibling a save to an existing name is committed as, before it is swapped into place.
_SIDE_SUFFIX = ".zckpt-"
_AT_FDCWD = -100
_FUTURES_KEPT = 1024
_RENAME_EXCHANGE = 2


@dataclass(eq=False)
class _Save:
    """A save the plugin handed to the pool and has not finished with (committed and in
    place, or failed)."""

    seq: int
    path: str     # the name Lightning asked for
    target: str   # where the pool commits it: ``path``, or a sibling swapped in afterwards
    root: str
    future: SaveFuture
    done: threading.Event = field(default_factory=threading.Event)
    reported: bool = False   # its failure was recorded (raised, or to be raised, once)


@dataclass(eq=False)
class _Deletion:
    path: str
    root: str
    armed: bool = False   # set, in order, once every save asked for before it is finished


class ZckptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves through a :class:`zckpt.CheckpointPool`.

    Args:
        pool: A pool to save through. The plugin does not close it (its owner does), and
            it cannot travel to other processes (``ddp_spawn``): there, pass ``config``.
        config: The configuration of the pool the plugin makes, lazily, on its first save
            in the process that saves (Lightning's global rank 0), and closes at
            :meth:`teardown`. Default: ``PoolConfig(staging_buffers=2)``: with
            ``save_last=True`` Lightning saves twice per checkpoint (the top-k one, then
            ``last.ckpt``), and with one set of staging buffers the second save would wait
            until the first is written. This holds two copies of the checkpoint in shared
            memory.
        weights_only: What to load with when Lightning passes ``weights_only=None`` (its
            default). None: restricted unpickling (``True``), as ``torch.load`` does
            since torch 2.6 and so as Lightning's own ``TorchCheckpointIO`` does; see
            :meth:`load_checkpoint`.

    Raises:
        TypeError: both ``pool`` and ``config`` given, or either of the wrong type.
    """

    def __init__(self, pool: CheckpointPool | None = None, config: PoolConfig | None = None, *,
                 weights_only: bool | None = None) -> None:
        super().__init__()
        if pool is not None and config is not None:
            raise TypeError("pass a pool or a config, not both")
        if pool is not None and not isinstance(pool, CheckpointPool):
            raise TypeError(f"pool must be a zckpt.CheckpointPool, got {type(pool).__name__}")
        if config is not None and not isinstance(config, PoolConfig):
            raise TypeError(f"config must be a zckpt.PoolConfig, got {type(config).__name__}")
        cfg = pool.config if pool is not None else config
        if cfg is not None and (cfg.keep_last is not None or cfg.mirrors):
            logger.warning("keep_last and mirrors apply to the names the pool commits (a name saved again is "
                           "committed as <name>%s<id>, then swapped into place), not to ModelCheckpoint's top-k: "
                           "leave them unset with ZckptCheckpointIO", _SIDE_SUFFIX)
        self._given_pool = pool
        self._config = config if config is not None else PoolConfig(staging_buffers=2)
        self._weights_only = weights_only
        self._reset_runtime()

    # --- process-local state ------------------------------------------------------------
    def _reset_runtime(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: CheckpointPool | None = None
        self._owns_pool = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._inflight: list[_Save] = []
        self._last_seq: dict[str, int] = {}            # path -> seq of its newest save
        self._failed: list[tuple[int, str]] = []       # (seq, root) of failed saves
        self._deletions: list[_Deletion] = []
        self._errors: list[tuple[str, BaseException]] = []   # failures not yet raised
        # The newest saves since the last teardown (timings, retries: for tests and benchmarks).
        self._futures: deque[SaveFuture] = deque(maxlen=_FUTURES_KEPT)

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the plugin to its ranks: the pool, thread and lock stay here.
        state = {k: self.__dict__[k] for k in ("_config", "_weights_only")}
        state["_given_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def _check_process(self) -> None:
        """A forked child starts afresh: the parent's pool, thread and saves are the parent's."""
        if self._pid != os.getpid():
            given = self._given_pool
            self._reset_runtime()
            self._given_pool = given   # its own save() refuses in a child, naming the owner

    @property
    def pool(self) -> CheckpointPool | None:
        """The pool saves go through in this process (None before the first save)."""
        return self._pool

    @property
    def futures(self) -> list[SaveFuture]:
        """The :class:`zckpt.SaveFuture` of each save since the last :meth:`teardown` (the
        newest 1024), oldest first (their ``timings`` say where the time went; a save to an existing name is
        committed under its sibling's path first)."""
        with self._lock:
            return list(self._futures)

    # --- CheckpointIO ----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike,
                        storage_options: Any | None = None) -> None:
        """Stage ``checkpoint`` into shared memory and have the pool write it to ``path``.

        Blocks while the tensors are copied into the pool's staging memory (and, the first
        time in a process, while the pool starts: about 0.3 s; and when every staging
        buffer is held by earlier saves still being written, until one is free). Returns
        once staged: Lightning may go on training. ``path`` becomes a checkpoint
        directory once the save commits; a save to a name that exists, or is being saved,
        replaces it atomically once committed (see the module docstring).

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: A local (or mounted) path; ``file://`` URLs are accepted. What is there
                already is replaced if it is a zckpt checkpoint, a file (``torch.save``'s) or
                a symbolic link (the link, not its target).
            storage_options: None, or ``{"metadata": {...}}``: JSON data stored in the
                manifest (``zckpt.load_metadata``) beside ``epoch`` and ``global_step``.

        Raises:
            The first failure of an earlier save or deletion not raised yet (its own type:
            ``zckpt.WorkerDiedError``, ``OSError``, ...), before anything is saved.
            ValueError: ``path`` is a remote URL.
            FileExistsError: ``path`` is a directory that is not a zckpt checkpoint.
            TypeError: bad ``storage_options``, or a value zckpt cannot store.
            zckpt.PoolClosedError, zckpt.StagingBudgetError, TimeoutError: as
            :meth:`zckpt.CheckpointPool.save`.
        """
        self._check_process()
        self._raise_failures()
        final = _local_path(path)
        metadata = _metadata(checkpoint, storage_options)
        pool = self._ensure_pool()
        root = os.path.dirname(final)
        if _foreign_dir(final):
            raise FileExistsError(f"{final} is a directory but not a zckpt checkpoint: refusing to replace it")
        with self._lock:
            cancelled = [d for d in self._deletions if d.path == final]
            self._deletions = [d for d in self._deletions if d.path != final]
            replacing = os.path.lexists(final) or any(s.path == final for s in self._inflight)
        for _ in cancelled:
            logger.debug("a new save of %s supersedes the deletion asked for before it", final)
        target = f"{final}{_SIDE_SUFFIX}{uuid.uuid4().hex[:8]}" if replacing else final
        fut = pool.save(checkpoint, target, metadata=metadata)
        fut.staged.result()   # with async_staging: Lightning must not mutate its tensors before this
        with self._lock:
            self._seq += 1
            entry = _Save(self._seq, final, target, root, fut)
            self._inflight.append(entry)
            self._last_seq[final] = entry.seq
            self._futures.append(fut)
        self._submit(functools.partial(self._finish, entry))

    def remove_checkpoint(self, path: PathLike) -> None:
        """Delete the checkpoint at ``path``, in the background, once it is safe.

        Returns at once. The deletion runs on the plugin's thread after every save asked
        for before it has finished (so a checkpoint still being written is deleted only
        once written). It waits while ``path`` is the newest committed checkpoint of its
        directory and a save into that directory is in flight, and while it is the newest
        after a later save into it failed: it then happens once a newer checkpoint commits
        there (at :meth:`teardown`, one still waiting is kept, and logged). A new save to
        ``path`` cancels it (the save replaces the checkpoint anyway). A committed
        checkpoint is renamed to ``*.del-*``, the rename made durable, then removed, so a
        crash leaves it whole or gone; a plain file or link is unlinked; a directory that
        is not a zckpt checkpoint is left alone (logged).

        Raises:
            The first failure of an earlier save or deletion not raised yet.
            ValueError: ``path`` is a remote URL.
        """
        self._check_process()
        self._raise_failures()
        target = _local_path(path)
        d = _Deletion(target, os.path.dirname(target))
        with self._lock:
            self._deletions.append(d)
        self._submit(functools.partial(self._arm, d))

    def load_checkpoint(self, path: PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint: a zckpt checkpoint directory, or a file ``torch.save`` wrote.

        A zckpt directory (one with a ``manifest.json``; a link to one is followed) is read
        with :func:`zckpt.load`, every byte verified against its checksums. Anything else
        (an older run's ``.ckpt`` file, a URL) goes to Lightning's ``TorchCheckpointIO``,
        as without the plugin. Waits first for saves to ``path`` made in this process and
        still in flight.

        Trust: a checkpoint's non-tensor structure is a pickle. Lightning passes
        ``weights_only`` through from ``trainer.fit(..., weights_only=...)`` (default
        None); None means the plugin's ``weights_only`` (constructor), itself None by
        default, which means restricted unpickling (torch's ``weights_only`` unpickler:
        containers, primitives, tensors and types registered with
        ``torch.serialization.add_safe_globals``). That is what Lightning's default
        ``TorchCheckpointIO`` does under torch >= 2.6, and it accepts everything Lightning
        itself puts in a checkpoint (loops, callbacks, optimizer and scheduler states, and
        ``hyper_parameters`` made of plain values). We do not default to ``False`` even
        though a checkpoint the user's own trainer wrote is usually trusted: the plugin
        cannot tell that a directory came from this user's trainer and not from a
        download. A model whose hyper-parameters hold other types fails to load naming
        the type; register it with ``add_safe_globals``, or pass
        ``weights_only=False`` (to ``fit`` or to the plugin) for checkpoints you trust.

        Args:
            path: The checkpoint.
            map_location: As ``torch.load``'s. None: every tensor on the CPU, as
                ``TorchCheckpointIO`` loads by default (Lightning moves them later).
            weights_only: See above.

        Blocks until the checkpoint is read (and verified).

        Raises:
            The first failure of an earlier save or deletion not raised yet.
            FileNotFoundError: nothing at ``path``, or a directory without a manifest
                (not a committed zckpt checkpoint).
            zckpt.CorruptCheckpointError: a damaged checkpoint (names file and tensors).
            pickle.UnpicklingError: restricted unpickling refused a type (names it).
        """
        self._check_process()
        local = _maybe_local_path(path)
        if local is not None:
            with self._lock:
                waits = [s for s in self._inflight if s.path == local]
            for s in waits:
                s.done.wait()
        self._raise_failures()
        if local is not None and os.path.isdir(local):
            if not os.path.isfile(os.path.join(local, MANIFEST_NAME)):
                raise FileNotFoundError(f"{local} is a directory but not a committed zckpt checkpoint "
                                        f"(it has no {MANIFEST_NAME})")
            wo = weights_only if weights_only is not None else self._weights_only
            loaded = zckpt_load(local, map_location="cpu" if map_location is None else map_location,
                                weights_only=True if wo is None else wo)
            if not isinstance(loaded, dict):
                raise TypeError(f"{local} holds a {type(loaded).__name__}, not a Lightning checkpoint dict")
            return loaded
        wo = weights_only if weights_only is not None else self._weights_only
        torch_io, where = TorchCheckpointIO(), os.fspath(path)
        if map_location is None:   # TorchCheckpointIO's own default: every storage on the CPU
            return torch_io.load_checkpoint(where, weights_only=wo)
        return torch_io.load_checkpoint(where, map_location=map_location, weights_only=wo)

    def teardown(self) -> None:
        """Wait for every save and deletion asked for, then close the pool the plugin made.

        Blocks until every save has committed or failed (each is bounded by the pool's
        ``save_timeout_s``) and the deletions that may run have run. Deletions still
        waiting (their checkpoint is the newest of its directory and the save that was to
        replace it failed) are dropped: the checkpoint is kept, and logged. A pool passed
        to the constructor is left open. The plugin can be used again afterwards (a new
        pool is made on the next save).

        Raises:
            The first failure of a save or deletion not raised yet (others are logged);
            none while an exception is already propagating (Lightning tears down from its
            ``except`` block when training raised): the failures are then logged and
            added as notes to that exception, which stays the one the user sees.
        """
        self._check_process()
        thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join()
        self._thread = None
        with self._lock:
            kept, self._deletions = self._deletions, []
        for d in kept:
            logger.warning("kept %s: it is still the newest committed checkpoint of %s, and the save that was to "
                           "replace it did not commit", d.path, d.root)
        pool, owned = self._pool, self._owns_pool
        self._pool, self._owns_pool = None, False
        try:
            if pool is not None and owned:
                pool.close()
        finally:
            with self._lock:
                self._futures.clear()
            in_flight = sys.exc_info()[1]
            if in_flight is None:
                self._raise_failures()
            else:
                self._report_failures(in_flight)

    def _report_failures(self, in_flight: BaseException) -> None:
        """Teardown while ``in_flight`` propagates: log the failures, note them on it."""
        try:
            self._raise_failures()
        except BaseException as exc:  # noqa: BLE001 - the first failure; the rest were logged
            logger.error("a checkpoint failed while training was already failing (%s): %s: %s",
                         type(in_flight).__name__, type(exc).__name__, exc)
            if hasattr(in_flight, "add_note"):
                in_flight.add_note(f"zckpt: a checkpoint also failed: {type(exc).__name__}: {exc}")

    # --- background work ---------------------------------------------------------------------
    def _ensure_pool(self) -> CheckpointPool:
        if self._pool is None:
            if self._given_pool is not None:
                self._pool, self._owns_pool = self._given_pool, False
            else:
                self._pool, self._owns_pool = CheckpointPool(config=self._config), True
                logger.info("zckpt pool for Lightning checkpoints started in %.3fs", self._pool.startup_s)
        return self._pool

    def _submit(self, job: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            # A daemon: at interpreter exit the pool's own finalizer gives saves in flight
            # their time; this thread must not hold the exit up on top of that.
            self._thread = threading.Thread(target=self._run, name="zckpt-lightning", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - recorded, raised on the trainer's next call
                self._record("the plugin's background work", exc)

    def _record(self, what: str, exc: BaseException, save: _Save | None = None) -> None:
        with self._lock:
            if save is not None:
                if save.reported:
                    return
                save.reported = True
            self._errors.append((what, _noted(exc, what)))
        logger.warning("%s failed: %s: %s", what, type(exc).__name__, exc)

    def _raise_failures(self) -> None:
        """Raise the first failure not raised yet: recorded by the plugin's thread, or a
        save whose future has failed and which that thread has not reached yet (so a
        failure surfaces on the first call after it happened, deterministically)."""
        with self._lock:
            for s in self._inflight:
                if not s.reported and s.future.done() and not s.future.cancelled():
                    exc = s.future.exception()
                    if exc is not None:
                        s.reported = True
                        self._errors.append((f"the save of {s.path}", _noted(exc, f"the save of {s.path}")))
            errors, self._errors = self._errors, []
        if not errors:
            return
        for what, exc in errors[1:]:
            logger.error("also failed: %s: %s: %s", what, type(exc).__name__, exc)
        raise errors[0][1]

    def _finish(self, s: _Save) -> None:
        """On the plugin's thread: wait for a save; put a replacement in place; run deletions."""
        failed = False
        try:
            s.future.result()
            if s.target != s.path:
                self._put_in_place(s.target, s.path)
        except BaseException as exc:  # noqa: BLE001 - recorded, raised on the trainer's next call
            failed = True
            if s.target != s.path and os.path.isdir(s.target):
                logger.error("%s is committed but could not replace %s: it is left where it is", s.target, s.path)
            self._record(f"the save of {s.path}", exc, s)
        finally:
            with self._lock:
                self._inflight.remove(s)
                if failed:
                    self._failed.append((s.seq, s.root))
            s.done.set()
        self._run_deletions()

    def _arm(self, d: _Deletion) -> None:
        with self._lock:
            d.armed = True
        self._run_deletions()

    def _run_deletions(self) -> None:
        with self._lock:
            armed = [d for d in self._deletions if d.armed]
        for d in armed:
            verdict = self._verdict(d)
            if verdict == "wait":
                continue
            with self._lock:
                if d not in self._deletions:   # cancelled meanwhile by a new save of its path
                    continue
                self._deletions.remove(d)
                if not any(s.path == d.path for s in self._inflight):
                    self._last_seq.pop(d.path, None)
            if verdict == "delete":
                try:
                    self._delete(d.path)
                except OSError as exc:
                    self._record(f"the deletion of {d.path}", exc)

    def _verdict(self, d: _Deletion) -> str:
        """"delete", "wait" or "gone" (nothing there any more)."""
        with self._lock:
            if any(s.path == d.path for s in self._inflight):
                return "wait"
            root_busy = any(s.root == d.root for s in self._inflight)
            own = self._last_seq.get(d.path, 0)
            failed_since = any(seq > own and root == d.root for seq, root in self._failed)
        if not os.path.lexists(d.path):
            return "gone"
        newest = C.latest(d.root)
        if newest is None or os.path.abspath(newest) != d.path:
            return "delete"
        if root_busy or failed_since:
            logger.debug("deletion of %s waits: it is the newest committed checkpoint of %s", d.path, d.root)
            return "wait"
        return "delete"

    def _delete(self, path: str) -> None:
        """Remove a checkpoint so that a crash leaves it whole or gone (zckpt's retention rule)."""
        parent = os.path.dirname(path) or "."
        if _foreign_dir(path) and not C.is_temp_dir(os.path.basename(path)):
            logger.warning("not removing %s: a directory, but not a zckpt checkpoint", path)
            return
        if os.path.isdir(path) and not os.path.islink(path):
            condemned = path if C.is_temp_dir(os.path.basename(path)) else f"{path}.del-{uuid.uuid4().hex[:8]}"
            if condemned != path:
                try:
                    os.rename(path, condemned)
                except FileNotFoundError:
                    return
                if self._fsync:
                    C.fsync_dir(parent)
            C.discard(condemned)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            if self._fsync:
                C.fsync_dir(parent)
        logger.info("removed checkpoint %s", path)

    def _put_in_place(self, new: str, path: str) -> None:
        """Make the committed checkpoint ``new`` the one at ``path``; delete what was there."""
        parent = os.path.dirname(path) or "."
        old: str | None = None
        if os.path.lexists(path):
            try:
                _exchange(new, path)
                old = new   # the exchange left the replaced checkpoint under the sibling's name
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                # No RENAME_EXCHANGE here: condemn the old one, then rename; apart for microseconds.
                old = f"{path}.del-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
                os.rename(new, path)
        else:
            os.rename(new, path)
        if self._fsync:
            C.fsync_dir(parent)
        logger.debug("%s now holds the checkpoint committed as %s", path, new)
        if old is not None:
            self._delete(old)

    @property
    def _fsync(self) -> bool:
        pool = self._pool
        return (pool.config if pool is not None else self._config).fsync


# --- helpers -------------------------------------------------------------------------------------
def _noted(exc: BaseException, what: str) -> BaseException:
    """``exc``, noting (Python >= 3.11) which of the plugin's operations it failed."""
    note = f"(zckpt Lightning plugin: {what})"
    if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return exc


def _maybe_local_path(path: PathLike) -> str | None:
    s = os.fspath(path)
    if not isinstance(s, str):
        s = os.fsdecode(s)
    if "://" in s:
        scheme, rest = s.split("://", 1)
        if scheme != "file":
            return None
        s = rest
    return os.path.abspath(s)


def _foreign_dir(path: str) -> bool:
    """A real directory (not a link) without a zckpt manifest."""
    return (os.path.isdir(path) and not os.path.islink(path)
            and not os.path.isfile(os.path.join(path, MANIFEST_NAME)))


def _local_path(path: PathLike) -> str:
    local = _maybe_local_path(path)
    if local is None:
        raise ValueError(f"ZckptCheckpointIO writes to local or mounted file systems, not {os.fspath(path)!r}")
    return local


def _metadata(checkpoint: Mapping[str, Any], storage_options: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"lightning": {k: checkpoint[k] for k in ("epoch", "global_step")
                                          if type(checkpoint.get(k)) is int}}
    if storage_options is not None:
        if not isinstance(storage_options, Mapping) or set(storage_options) - {"metadata"}:
            raise TypeError("ZckptCheckpointIO's storage_options is None or {'metadata': {...}} (JSON data for the "
                            f"manifest), got {storage_options!r}")
        extra = storage_options.get("metadata")
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise TypeError(f"storage_options['metadata'] must be a mapping, got {type(extra).__name__}")
            meta.update(extra)
    return meta


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):   # a libc without it (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> None:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Raises:
        OSError: ENOSYS without ``renameat2``, EINVAL where the file system lacks the flag.
    """
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", a)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a, None, b)
