"""The writer the checkpoint process runs: ``checkpoint_<rank>.pt`` through ``torch.save``."""

from __future__ import annotations

import abc
import logging
import os
import shutil
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from .types import STATE_DICT, CheckpointWriterConfig, RankInfo

__all__ = ["WriterHook", "CheckpointWriter"]

logger = logging.getLogger(__name__)


class WriterHook(abc.ABC):
    """Callbacks around a checkpoint commit."""

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after the file is written, before the barrier."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after the barrier."""


class CheckpointWriter:
    """Writes ``<path>/checkpoint_<rank>.pt`` with ``torch.save``, atomically and durably.

    Args:
        config: writer options.
        rank_info: this process's rank (names the file).
        barrier: optional object with ``execute_barrier()``, run between the hooks.
        commit_hook: optional :class:`WriterHook`.
    """

    def __init__(self, config: CheckpointWriterConfig, rank_info: RankInfo, barrier: Any = None,
                 commit_hook: WriterHook | None = None) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> Future | None:
        """Write ``<path>/checkpoint_<rank>.pt`` atomically and durably.

        The original overwrites the file in place and fsyncs nothing, so a crash
        mid-write loses the previous checkpoint. Here ``torch.save`` writes into a fresh
        hidden directory beside it (under the file's own name: torch names the zip's
        root after the file, so the bytes are the original's), the file is fsynced and
        renamed over the old one, and the directory is fsynced (and the parents of any
        directory this created), so a power loss leaves the old file or the new one.
        """
        from .._sync import fsync_fd
        from ..commit import fsync_created, fsync_dir, make_dirs

        name = f"checkpoint_{self._rank_info.global_rank}.pt"
        directory = os.path.abspath(path)
        created = make_dirs(directory)
        _sweep_staging(directory, name)
        staging = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(staging)
        try:
            tmp_file = os.path.join(staging, name)
            torch.save(state_dict, tmp_file)
            fd = os.open(tmp_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fsync_fd(fd, tmp_file)
            finally:
                os.close(fd)
            fsync_created(created)
            os.replace(tmp_file, os.path.join(directory, name))
            fsync_dir(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        full_path = Path(directory) / name
        if self._commit_hook is not None:
            self._commit_hook.pre_commit(path, **kwargs)
        if self._barrier is not None:
            self._barrier.execute_barrier()
        if self._commit_hook is not None:
            self._commit_hook.post_commit(path, **kwargs)
        logger.info("wrote checkpoint %s", full_path)
        return None

    def close(self) -> None:
        """Release resources (nothing to release here)."""


def _sweep_staging(directory: str, name: str) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` staging dirs of writers that no longer run (a crash
    mid-write left them; the previous checkpoint file itself is intact)."""
    from .._proc import pid_alive
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
