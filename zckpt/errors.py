"""The exceptions zckpt raises, and how a worker's exception crosses the process gap.

Everything derives from :class:`ZckptError` so callers can catch one type. Errors that
happen inside a worker travel as (pickled exception, formatted traceback); the trainer
re-raises the original type where it can, with ``__cause__`` set to a
:class:`RemoteTraceback` holding the worker's text, the way CPython's process pool does.
"""

from __future__ import annotations

import pickle
import signal
import traceback
from typing import Optional

__all__ = [
    "ZckptError",
    "WorkerDiedError",
    "WorkerInitError",
    "CorruptCheckpointError",
    "PoolClosedError",
    "ReentrantSaveError",
    "RemoteTraceback",
    "describe_exit",
]


class ZckptError(Exception):
    """Base class of every error zckpt raises on purpose."""


class WorkerDiedError(ZckptError):
    """A checkpoint worker died, or went silent for longer than its heartbeat allows."""


class WorkerInitError(ZckptError):
    """A worker's ``init_fn`` or writer factory raised; carries the remote traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class CorruptCheckpointError(ZckptError):
    """A checkpoint on disk does not match its manifest (checksum, size, missing file)."""


class PoolClosedError(ZckptError):
    """The pool was closed, killed or broken, so it takes no more work."""


class ReentrantSaveError(ZckptError, RuntimeError):
    """A pool call that would wait on a buffer or lock its own thread holds.

    Raised at once, instead of deadlocking: ``save()`` or ``reserve()`` entered again on a
    thread already inside one of them (a signal handler or callback interrupting it), or
    a pool call made from one of the pool's own threads (a ``SaveFuture`` callback).
    """


class RemoteTraceback(Exception):
    """Holds a worker's formatted traceback; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def pack_exception(exc: BaseException) -> tuple[Optional[bytes], str]:
    """Turn an exception into what a worker sends: (pickled exception or None, text)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        return None, text
    return blob, text


def unpack_exception(blob: Optional[bytes], text: str, context: str) -> BaseException:
    """Rebuild a worker's exception in the trainer, with the remote traceback as cause.

    A fresh object every call: sharing one exception between futures makes it gain
    frames on every raise (CPython's test_broken_process_pool_traceback).
    """
    exc: Optional[BaseException] = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
        exc = ZckptError(f"{context}: {last}")
    else:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(context)
    exc.__cause__ = RemoteTraceback(text)
    return exc


def describe_exit(returncode: Optional[int]) -> str:
    """Name an exit status the way a person reads it: ``SIGKILL(-9)``, ``exit code 3``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal"
        hint = ""
        if -returncode == signal.SIGKILL:
            hint = " (killed: by zckpt, a user, or the OOM killer)"
        elif -returncode == signal.SIGSEGV:
            hint = " (segmentation fault)"
        return f"{name}({returncode}){hint}"
    return f"exit code {returncode}"
