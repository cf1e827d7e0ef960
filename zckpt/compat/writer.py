"""The writer the checkpoint process runs: ``checkpoint_<rank>.pt`` through ``torch.save``."""

from __future__ import annotations

import abc
import logging
import os
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
    """Writes ``<path>/checkpoint_<rank>.pt`` with ``torch.save``, then fsyncs it.

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
        full_path = Path(path) / f"checkpoint_{self._rank_info.global_rank}.pt"
        os.makedirs(full_path.parent, exist_ok=True)
        # By name, as the original does: torch.save names the zip's root after the file
        # ("checkpoint_0/"), so the file is the original's byte for byte; then fsync it.
        torch.save(state_dict, str(full_path))
        fd = os.open(full_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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
