"""The original's data types: rank, configs, request and response records."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["RankInfo", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse",
           "CheckpointWriterConfig", "STATE_DICT"]

STATE_DICT = dict[str, Any]


@dataclass
class RankInfo:
    """Rank of this process and the world size (passed to the writer as ``rank_info``)."""

    global_rank: int
    global_world_size: int


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the checkpoint process, in seconds (same defaults as torch)."""

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60


class RequestType(Enum):
    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "exit"


@dataclass
class WorkerRequest:
    """A request to the worker (kept for API compatibility; zckpt's wire format differs)."""

    request_type: RequestType
    payload: dict[str, Any]


@dataclass
class WorkerResponse:
    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: dict[str, Any] | None = None


@dataclass
class CheckpointWriterConfig:
    """Options of :class:`CheckpointWriter` (same default as torch)."""

    write_barrier_timeout_secs: int = 600
