"""Hugging Face ``Trainer`` checkpoints through a zckpt pool, and the way to resume from them.

The Trainer saves synchronously: every ``save_steps`` the training loop stops until the
model, optimizer, scheduler, RNG states and trainer state are on disk. With
:class:`ZckptCallback` attached, the same checkpoint is taken at the same point of the
loop, but the loop is blocked only while the tensors are copied into shared memory;
zckpt's worker processes write, checksum, fsync and commit it while training goes on::

    from zckpt.integrations.transformers import ZckptCallback, resume_from

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(ZckptCallback(trainer))   # periodic saves now go through zckpt
    trainer.train()                                # waits for the last save at the end

    # later, in a new process, a trainer built the same way (same args, data, seed):
    trainer.add_callback(ZckptCallback(trainer))   # to keep saving through zckpt
    resume_from(trainer, args.output_dir)          # instead of train(resume_from_checkpoint=...)

**What is saved.** Everything the Trainer's own ``_save_checkpoint`` saves for a
single-process run, at the same moment (after the step's logging, evaluation and
best-metric update): the model's ``state_dict()``, the optimizer's and LR scheduler's
state dicts, the gradient scaler's (when there is one), the RNG states (Python,
NumPy, torch CPU, and CUDA when available), and the :class:`~transformers.TrainerState`
(with the states of stateful callbacks) as JSON text in the checkpoint's metadata. With
``args.save_only_model`` only the model and the trainer state are saved, as the Trainer
does. Checkpoints are named as the Trainer names them, ``<output_dir>/checkpoint-<step>``,
but each is a zckpt checkpoint (``zckpt.verify``, ``zckpt load``, ``zckpt inspect`` work);
the Trainer's own ``train(resume_from_checkpoint=...)`` cannot read it: use
:func:`resume_from`.

**How the save is taken over.** When the Trainer decides to save (``control.should_save``,
any ``save_strategy``), it calls its ``_save_checkpoint``; the callback installs its own
in its place on that trainer (when training begins; it is removed when training ends), so
the Trainer's synchronous save never runs and every other callback still gets ``on_save``
(once the checkpoint is staged, not yet durable). Clearing ``control.should_save`` in
``on_step_end`` instead would take the snapshot before the step's log entry, evaluation
and best-metric update (so the saved trainer state would differ from the Trainer's, and
an ``EarlyStoppingCallback`` would resume with another best metric; its state is
restored, as for the Trainer's own checkpoints, with
``TrainingArguments(restore_callback_states_from_checkpoint=True)``), and cannot catch
``save_strategy="best"`` at all. If a transformers version no longer calls
``_save_checkpoint``, the callback's ``on_save`` sees a save it did not make and raises.

**Retention.** ``args.save_total_limit`` becomes the pool's ``keep_last``: after each
commit, all but the newest ``save_total_limit`` committed checkpoints under
``output_dir`` are deleted (zckpt's retention: by commit order, never an uncommitted one).

**Errors.** A save that failed in the background raises :class:`CheckpointSaveError`
(with the pool's error as ``__cause__``) from the next save, and from ``on_train_end``,
which waits for every save in flight: ``trainer.train()`` raises it. A save is never
silently lost.

**Not supported** (refused when training begins, naming the setting): more than one
process (``world_size > 1``; see ``zckpt.distributed``), DeepSpeed, FSDP, and
``load_best_model_at_end`` (the Trainer reloads the best model from its own file format).
``state.best_model_checkpoint`` is not tracked, and checkpoints are not pushed to the Hub.

**Resume.** :func:`resume_from` runs ``trainer.train(resume_from_checkpoint=...)`` with the
Trainer's own resume logic (the trainer state read back, the epochs and batches already
seen skipped, callback states restored), feeding it from the zckpt checkpoint: it
verifies and loads the checkpoint with ``zckpt.load(weights_only=True)`` (nothing is
unpickled beyond what ``torch.load(weights_only=True)`` accepts; the trainer state is
JSON), writes the trainer state into a temporary directory as ``trainer_state.json`` (the
only file the Trainer reads itself), and for the duration of that call replaces the
Trainer's loaders (``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``,
``_load_scaler``, ``_load_rng_state``) with ones that take the loaded state. So no copy
of the model or optimizer is written in the Trainer's format (a resume costs one
verified read), the RNG states are restored exactly where the Trainer restores them,
and a resumed run continues as the uninterrupted one would have (same data order, same
losses, bit for bit on the same machine and software). Should a transformers version
stop calling one of those loaders, the first training step raises ``RuntimeError``
naming it, instead of continuing from a partly restored state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

import zckpt
from zckpt.config import PoolConfig
from zckpt.errors import CorruptCheckpointError, ZckptError
from zckpt.pool import CheckpointPool
from zckpt.save import SaveFuture

__all__ = ["CheckpointSaveError", "ZckptCallback", "find_checkpoint", "resume_from", "METADATA_KEY"]

logger = logging.getLogger(__name__)

#: The key of this integration's entry in a checkpoint's metadata.
METADATA_KEY = "transformers"
#: Version of the layout below; a checkpoint with a higher one is refused.
FORMAT = 1
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# The Trainer methods the resume path stands in for, and the part each one restores.
_LOADERS = {"_load_from_checkpoint": "model", "_load_optimizer_and_scheduler": "optimizer",
            "_load_scaler": "scaler", "_load_rng_state": "rng"}


class CheckpointSaveError(ZckptError):
    """A checkpoint save failed in the background; ``__cause__`` is the pool's error.

    Attributes:
        path: the checkpoint directory that was not committed.
        step: the trainer's ``global_step`` of that save.
    """

    def __init__(self, message: str, path: str, step: int) -> None:
        super().__init__(message)
        self.path = path
        self.step = step


class ZckptCallback(TrainerCallback):
    """Takes the Trainer's periodic checkpoint off the training loop (see the module docstring).

    Args:
        trainer: The :class:`transformers.Trainer` to attach to; add the callback to it
            (``trainer.add_callback(callback)``).
        config: The pool's configuration (default ``PoolConfig()``); its ``keep_last``
            is set from ``args.save_total_limit`` unless it has one already.
        pool: An open pool to save through instead of one of the callback's own; it is
            not closed by the callback, and its retention (``keep_last``) is its own.

    The pool is started when training begins (``on_train_begin``; blocks about as long
    as a worker takes to start) and closed when training ends (``on_train_end``, after
    waiting for every save). When ``trainer.train()`` raises instead (a
    :class:`CheckpointSaveError` from a save, or any other error), ``on_train_end`` does
    not run: saves in flight go on, and :meth:`close` (after :meth:`wait`, to keep
    them) ends the pool; at interpreter exit zckpt closes it anyway.

    Attributes:
        timings: One dict per save: ``step``, ``path``, ``blocked_s`` (how long the
            trainer was held by the save, from the call to the return), and the save's
            own ``fut.timings`` once it is final.
        futures: The :class:`zckpt.SaveFuture` of each save of this training run.
    """

    def __init__(self, trainer: Trainer, config: PoolConfig | None = None, *,
                 pool: CheckpointPool | None = None) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"ZckptCallback needs the transformers.Trainer it is added to, got "
                            f"{type(trainer).__name__}")
        if config is not None and not isinstance(config, PoolConfig):
            raise TypeError(f"config must be a zckpt.PoolConfig, got {type(config).__name__}")
        if config is not None and pool is not None:
            raise ValueError("pass either config (for the callback's own pool) or pool, not both")
        self._trainer = trainer
        self._config = config
        self._pool = pool
        self._owns_pool = pool is None
        self._pending: list[tuple[SaveFuture, int]] = []   # saves not yet checked for failure
        self._saved_step: int | None = None
        self.timings: list[dict[str, Any]] = []
        self.futures: list[SaveFuture] = []

    # --- callback events -----------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Check the setup, start the pool if needed, install the save.

        Raises:
            ValueError: the callback is not among this trainer's callbacks, or
                ``load_best_model_at_end`` is set.
            NotImplementedError: DeepSpeed, FSDP or more than one process.
            RuntimeError: the Trainer lacks ``_save_checkpoint`` (an unsupported version).
            WorkerInitError, TimeoutError: the pool did not start.
        """
        trainer = self._trainer
        if self not in trainer.callback_handler.callbacks:
            raise ValueError("this ZckptCallback was made for another Trainer: build it with the trainer it is "
                             "added to, ZckptCallback(trainer)")
        if any(isinstance(cb, ZckptCallback) and cb is not self for cb in trainer.callback_handler.callbacks):
            raise ValueError("this Trainer has more than one ZckptCallback: add one")
        # Before anything starts: a run that would reach a step already saved there would
        # fail at that save (zckpt never overwrites), after training up to it.
        _refuse_later_checkpoints(trainer, state.global_step)
        _check_supported(trainer)
        if args.load_best_model_at_end:
            raise ValueError("ZckptCallback does not support load_best_model_at_end: the Trainer reloads the best "
                             "model from its own checkpoint format")
        if not callable(getattr(type(trainer), "_save_checkpoint", None)):
            raise RuntimeError(f"transformers {transformers.__version__}: Trainer has no _save_checkpoint to take "
                               "over; this version is not supported by ZckptCallback")
        if args.push_to_hub:
            logger.warning("ZckptCallback: checkpoints are not pushed to the Hub (push_to_hub)")
        if self._pool is None:
            cfg = self._config if self._config is not None else PoolConfig()
            if cfg.keep_last is None and args.save_total_limit is not None:
                cfg = cfg.replace(keep_last=int(args.save_total_limit))
            self._pool = CheckpointPool(config=cfg)
        elif args.save_total_limit is not None and self._pool.config.keep_last != args.save_total_limit:
            logger.warning("ZckptCallback: save_total_limit=%s is not applied: the pool given keeps %s",
                           args.save_total_limit, self._pool.config.keep_last)
        self._pending.clear()
        self.futures.clear()
        self.timings.clear()
        self._saved_step = None
        trainer._save_checkpoint = self._save_checkpoint  # type: ignore[method-assign]

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Check that the save the Trainer reports is one this callback made.

        Raises:
            RuntimeError: the Trainer saved without calling the callback's save (a
                transformers version that no longer calls ``_save_checkpoint``).
        """
        if self._saved_step != state.global_step:
            raise RuntimeError(f"transformers {transformers.__version__} saved step {state.global_step} without "
                               "calling Trainer._save_checkpoint, which ZckptCallback takes over; this version is "
                               "not supported by ZckptCallback")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Wait for every save in flight, close the callback's own pool, uninstall the save.

        Blocks until every save is committed or failed (each is bounded by the pool's
        ``save_timeout_s``).

        Raises:
            CheckpointSaveError: a save failed (the first one, after all were waited for).
        """
        try:
            self.wait()
        finally:
            self.close()

    # --- public helpers --------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every save made so far is final.

        Raises:
            CheckpointSaveError: a save failed (the first one not yet reported; each
                failure is raised once).
        """
        first: CheckpointSaveError | None = None
        for fut, step in self._pending:
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - reported below, after every save is final
                if first is None:
                    first = _failure(fut, step, exc)
        self._pending.clear()
        self._record_timings()
        if first is not None:
            raise first

    def close(self) -> None:
        """Close the callback's own pool (gracefully: saves in flight get the pool's
        ``shutdown_timeout_s``) and give the Trainer its own save back. Idempotent."""
        trainer = self._trainer
        if trainer.__dict__.get("_save_checkpoint") == self._save_checkpoint:
            del trainer.__dict__["_save_checkpoint"]
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    # --- the save --------------------------------------------------------------------------
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Stands in for ``Trainer._save_checkpoint``: stage, hand off, return.

        Blocks while the tensors are copied into shared memory (and, with
        ``staging_buffers=1``, until the previous save has been written).

        Raises:
            CheckpointSaveError: an earlier save failed.
            FileExistsError: a checkpoint already exists at the path (zckpt never
                overwrites).
        """
        t0 = time.perf_counter()
        self._raise_failed()
        trainer = self._trainer
        args, state = trainer.args, trainer.state
        if trainer.hp_search_backend is None and trial is None:
            trainer.store_flos()
        run_dir = trainer._get_output_dir(trial=trial)
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._saved_step = state.global_step
        if not args.should_save:
            return
        # As the Trainer does before writing its state: record the states of the callbacks
        # (and of the TrainerControl) that can be exported.
        # (TrainerState declares stateful_callbacks a list; it holds a dict by name.)
        exported = cast(dict[str, Any], state.stateful_callbacks)
        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(exported.get(name), list):
                exported[name].append(cb.state())
            else:
                exported[name] = cb.state()
        meta = {METADATA_KEY: {
            "format": FORMAT,
            "trainer_state": json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n",
            "global_step": int(state.global_step),
            "transformers_version": transformers.__version__,
            "save_only_model": bool(args.save_only_model),
        }}
        assert self._pool is not None, "the pool is started in on_train_begin"
        fut = self._pool.save(_training_state(trainer), path, metadata=meta)
        if not fut.staged.done():   # async_staging: the trainer mutates its tensors next
            fut.staged.result()
        blocked = time.perf_counter() - t0
        self.futures.append(fut)
        self._pending.append((fut, int(state.global_step)))
        self.timings.append({"step": int(state.global_step), "path": path, "blocked_s": blocked})
        logger.info("checkpoint %s staged in %.3fs; written in the background", path, blocked)

    def _raise_failed(self) -> None:
        """Raise the first save that failed (each failure once: later ones stay for the
        next call); forget the committed ones."""
        still = []
        failed: CheckpointSaveError | None = None
        for fut, step in self._pending:
            exc = fut.exception() if fut.done() else None
            if not fut.done() or (exc is not None and failed is not None):
                still.append((fut, step))
            elif exc is not None:
                failed = _failure(fut, step, exc)
        self._pending = still
        self._record_timings()
        if failed is not None:
            raise failed

    def _record_timings(self) -> None:
        for rec, fut in zip(self.timings, self.futures, strict=False):
            if fut.done() and "durable_s" not in rec:
                rec.update({k: v for k, v in fut.timings.items() if k not in rec})


def _failure(fut: SaveFuture, step: int, exc: BaseException) -> CheckpointSaveError:
    err = CheckpointSaveError(f"checkpoint {fut.path} (step {step}) was not saved: {type(exc).__name__}: {exc}",
                              fut.path, step)
    err.__cause__ = exc
    return err


def _check_supported(trainer: Trainer) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise NotImplementedError("zckpt's Trainer integration does not support DeepSpeed")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError("zckpt's Trainer integration does not support FSDP")
    if trainer.args.world_size > 1:
        raise NotImplementedError(f"zckpt's Trainer integration runs in one process (world_size is "
                                  f"{trainer.args.world_size}); for many ranks see zckpt.distributed")


def _training_state(trainer: Trainer) -> dict[str, Any]:
    """What the Trainer's own checkpoint holds, as one state dict of tensors and plain values."""
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.lr_scheduler
    if model is None:
        raise RuntimeError("the trainer has no model to save")
    out: dict[str, Any] = {"model": model.state_dict()}
    if trainer.args.save_only_model:
        return out
    if optimizer is None or scheduler is None:
        raise RuntimeError("the trainer has no optimizer or LR scheduler to save (called outside training?)")
    out["optimizer"] = optimizer.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save or load the state of the optimizer.*")
        out["lr_scheduler"] = scheduler.state_dict()
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None:
        out["scaler"] = scaler.state_dict()
    out["rng"] = _rng_state()
    return out


def _rng_state() -> dict[str, Any]:
    """The RNG states the Trainer saves, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.random.get_rng_state()
    return rng


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.random.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        if torch.cuda.is_available():
            torch.cuda.random.set_rng_state(rng["cuda"])
        else:
            logger.warning("the checkpoint holds a CUDA RNG state but CUDA is not available: not restored")


# --- resume ----------------------------------------------------------------------------------
def find_checkpoint(path_or_root: str | os.PathLike[str]) -> str:
    """The checkpoint ``path_or_root`` names: itself if it is a committed zckpt
    checkpoint, else the newest committed one directly under it (``zckpt.latest``).

    Raises:
        FileNotFoundError: no committed checkpoint there.
        ValueError: it is a checkpoint of the Trainer's own format (``trainer_state.json``
            without a zckpt manifest): resume from it with ``trainer.train(resume_from_checkpoint=...)``.
    """
    path = os.fspath(path_or_root)
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise ValueError(f"{path} is a checkpoint in the Trainer's own format, not a zckpt one: resume from it with "
                         "trainer.train(resume_from_checkpoint=...)")
    newest = zckpt.latest(path) if os.path.isdir(path) else None
    if newest is None:
        raise FileNotFoundError(f"no committed zckpt checkpoint at or under {path!r}")
    return newest


def resume_from(trainer: Trainer, path_or_root: str | os.PathLike[str], **train_kwargs: Any) -> TrainOutput:
    """Resume training from a checkpoint written by :class:`ZckptCallback`, and train to the end.

    ``trainer`` must be built as the interrupted one was (model architecture, arguments,
    datasets, collator, seed); its weights are replaced by the checkpoint's. Runs
    ``trainer.train(resume_from_checkpoint=<a temporary directory>, **train_kwargs)`` with the
    Trainer's loaders taking the loaded state instead of files (see the module
    docstring), so the Trainer skips the data already seen and restores the RNG states
    exactly as it does for its own checkpoints.

    Args:
        trainer: The trainer to continue with; attach a :class:`ZckptCallback` first to
            keep saving through zckpt.
        path_or_root: A checkpoint directory, or a directory (e.g. ``args.output_dir``)
            whose newest committed checkpoint is taken.
        **train_kwargs: Passed to ``trainer.train`` (``trial``, ``ignore_keys_for_eval``).

    Blocks for the whole training run; before training starts, for one verified read
    of the checkpoint (held in CPU memory until each part is restored).

    Returns:
        What ``trainer.train`` returns.

    Raises:
        FileNotFoundError: no committed checkpoint at ``path_or_root``.
        ValueError: not a checkpoint written by ZckptCallback (or a newer format); or the
            trainer has a ZckptCallback and ``output_dir`` already holds checkpoints of
            later steps than the one resumed from, which the resumed run would try to
            write again (zckpt never overwrites): move them or use another output_dir.
        CorruptCheckpointError: the checkpoint does not verify.
        pickle.UnpicklingError: it holds a type ``weights_only`` loading refuses.
        NotImplementedError: DeepSpeed, FSDP or more than one process.
        RuntimeError: this transformers version did not call one of the loaders the
            resume stands in for (raised at the first training step).
        CheckpointSaveError: from a ZckptCallback on the trainer, as in ``train()``.
    """
    if "resume_from_checkpoint" in train_kwargs:
        raise TypeError("resume_from() chooses resume_from_checkpoint itself; pass the checkpoint as path_or_root")
    _check_supported(trainer)
    path = find_checkpoint(path_or_root)
    info = (zckpt.load_metadata(path) or {}).get(METADATA_KEY)
    if not isinstance(info, dict) or not isinstance(info.get("trainer_state"), str):
        raise ValueError(f"{path} was not written by zckpt.integrations.transformers.ZckptCallback "
                         f"(its metadata has no {METADATA_KEY!r} entry)")
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: integration format {info.get('format')!r}, this zckpt reads {FORMAT}")
    step = int(info["global_step"])
    _refuse_later_checkpoints(trainer, step)
    # _load_scaler may be absent (older versions): a scaler state then never restored stops
    # the run at its first step (see _Restorer.on_step_begin).
    missing = [name for name in _LOADERS if name != "_load_scaler" and not callable(getattr(type(trainer), name, None))]
    if missing:
        raise RuntimeError(f"transformers {transformers.__version__}: Trainer has no {', '.join(missing)}; this "
                           "version is not supported by zckpt's resume")
    try:
        state = zckpt.load(path, map_location="cpu", weights_only=True)
    except CorruptCheckpointError as exc:
        if os.fspath(path_or_root) != path:   # taken as the newest under a root: say what to do
            raise CorruptCheckpointError(f"{exc} (the newest checkpoint under {os.fspath(path_or_root)!r}: move it "
                                         "away to resume from the one before it)") from exc
        raise
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} holds no model state: not written by ZckptCallback")
    restorer = _Restorer(trainer, path, state)
    tmp = tempfile.mkdtemp(prefix="zckpt-resume-")
    try:
        with open(os.path.join(tmp, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
            f.write(info["trainer_state"])
        logger.info("resuming from %s (step %d)", path, step)
        restorer.install()
        trainer.add_callback(restorer)
        return trainer.train(resume_from_checkpoint=tmp, **train_kwargs)
    finally:
        restorer.uninstall()
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_later_checkpoints(trainer: Trainer, step: int) -> None:
    if not any(isinstance(cb, ZckptCallback) for cb in trainer.callback_handler.callbacks):
        return
    out = trainer.args.output_dir
    if out is None or not os.path.isdir(out):
        return
    later = sorted((int(m.group(1)), name) for name in os.listdir(out)
                   if (m := _CHECKPOINT_RE.match(name)) is not None and int(m.group(1)) > step)
    if later:
        names = ", ".join(name for _, name in later)
        raise ValueError(f"{out} already holds checkpoints of later steps than {step} ({names}); the resumed run "
                         "would write them again and zckpt never overwrites: move them away or use another "
                         "output_dir")


class _Restorer(TrainerCallback):
    """Stands in for the Trainer's loaders during one ``train()``; at the first training
    step, checks that each part of the checkpoint was restored."""

    def __init__(self, trainer: Trainer, path: str, state: dict[str, Any]) -> None:
        self.trainer, self.path, self.state = trainer, path, state
        self.expected = {part for part in ("model", "optimizer", "scaler", "rng") if part in state}
        # Each part is dropped once restored (the memory goes back), except with
        # auto_find_batch_size, whose retries run the Trainer's loaders again.
        self.keep = bool(trainer.args.auto_find_batch_size)
        self.restored: set[str] = set()
        self.installed: list[str] = []
        self.checked = False

    def install(self) -> None:
        loaders: dict[str, Callable[..., None]] = {
            "_load_from_checkpoint": self._load_model, "_load_optimizer_and_scheduler": self._load_optimizer,
            "_load_scaler": self._load_scaler, "_load_rng_state": self._load_rng}
        for name, fn in loaders.items():
            setattr(self.trainer, name, fn)
            self.installed.append(name)

    def uninstall(self) -> None:
        for name in self.installed:
            self.trainer.__dict__.pop(name, None)
        self.installed.clear()
        if self in self.trainer.callback_handler.callbacks:
            self.trainer.remove_callback(self)
        self.state = {}

    def _take(self, part: str) -> Any:
        return self.state[part] if self.keep else self.state.pop(part)

    def _load_model(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        target = model if model is not None else self.trainer.model
        if target is None:
            raise RuntimeError("the trainer has no model to restore into")
        target.load_state_dict(self._take("model"))
        self.restored.add("model")

    def _load_optimizer(self, checkpoint: str | None) -> None:
        if "optimizer" not in self.state:
            return
        optimizer, scheduler = self.trainer.optimizer, self.trainer.lr_scheduler
        if optimizer is None or scheduler is None:
            raise RuntimeError("the trainer has no optimizer or LR scheduler to restore into")
        optimizer.load_state_dict(self._take("optimizer"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*save or load the state of the optimizer.*")
            scheduler.load_state_dict(self._take("lr_scheduler"))
        self.restored.add("optimizer")

    def _load_scaler(self, checkpoint: str | None) -> None:
        if "scaler" not in self.state:
            return
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is None:
            logger.warning("%s holds a gradient scaler state but this trainer has no scaler: not restored", self.path)
        else:
            scaler.load_state_dict(self.state["scaler"])
        self._take("scaler")
        self.restored.add("scaler")

    def _load_rng(self, checkpoint: str | None) -> None:
        if "rng" in self.state:
            _set_rng_state(self.state["rng"])   # kept (small): a retry may restore it again
            self.restored.add("rng")

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        if self.checked:
            return
        self.checked = True
        missing = sorted(self.expected - self.restored)
        if missing:
            names = [name for name, part in _LOADERS.items() if part in missing]
            raise RuntimeError(f"transformers {transformers.__version__} did not call {', '.join(names)} while "
                               f"resuming from {self.path}: {', '.join(missing)} not restored; this version is not "
                               "supported by zckpt's resume")
