"""compat's errors: both zckpt errors and the ``RuntimeError`` the original raises."""

from __future__ import annotations

from ..errors import PoolClosedError, WorkerDiedError, ZckptError

__all__ = ["ChildProcessTerminatedError", "CheckpointWriteError", "compat_error"]


class ChildProcessTerminatedError(WorkerDiedError, RuntimeError):
    """The checkpoint process died (the original raises a plain ``RuntimeError``)."""


class CheckpointWriteError(ZckptError, RuntimeError):
    """The worker's writer or init raised; ``__cause__`` holds the remote error."""


def compat_error(exc: BaseException) -> BaseException:
    died = exc if isinstance(exc, WorkerDiedError) else None
    if isinstance(exc, PoolClosedError) and isinstance(exc.__cause__, WorkerDiedError):
        died = exc.__cause__
    if died is not None:
        err: BaseException = ChildProcessTerminatedError(f"Child process terminated unexpectedly: {died}")
    elif isinstance(exc, (TimeoutError, PoolClosedError)):
        return exc
    else:
        remote = getattr(exc.__cause__, "tb", None) or str(exc)
        err = CheckpointWriteError(f"Unexpected response from worker process: {remote}")
    err.__cause__ = exc
    return err
