"""The exceptions zckpt raises, and how a worker's exception crosses the process gap.

Everything derives from :class:`ZckptError` so callers can catch one type. Errors that
happen inside a worker travel as data: the type's name, its args when they are plain
values, and the formatted traceback (never a pickle: unpickling runs code). The trainer
rebuilds the original type only from a fixed allow-list (builtin exceptions whose
constructors take plain values, and zckpt's own); anything else becomes a
:class:`RemoteError` naming the remote type. Either way ``__cause__`` is a
:class:`RemoteTraceback` holding the worker's text, the way CPython's process pool does.
"""

from __future__ import annotations

import builtins
import signal
import traceback
from typing import Any

__all__ = [
    "ZckptError",
    "WorkerDiedError",
    "WorkerInitError",
    "RemoteError",
    "CorruptCheckpointError",
    "PoolClosedError",
    "ReentrantSaveError",
    "RemoteTraceback",
    "describe_exit",
]


class ZckptError(Exception):
    """Base class of every error zckpt raises on purpose."""


class WorkerDiedError(ZckptError):
    """A checkpoint worker died, or went silent for longer than its heartbeat allows.

    The facts are attributes, so callers and tests need not parse the message:

    - ``slot``, ``generation``, ``pid``: which worker incarnation;
    - ``exitcode``: its exit status (negative: the signal), None if it had not exited
      when declared dead;
    - ``silent_s``: seconds since the supervisor last heard from it;
    - ``job``: what it was doing (e.g. ``"WriteFiles save 3 -> /ckpt/step-3"``), or None.
    """

    def __init__(self, message: str = "", *, slot: int | None = None, generation: int | None = None,
                 pid: int | None = None, exitcode: int | None = None, silent_s: float | None = None,
                 job: str | None = None) -> None:
        super().__init__(message)
        self.slot, self.generation, self.pid = slot, generation, pid
        self.exitcode, self.silent_s, self.job = exitcode, silent_s, job

    def __reduce__(self) -> Any:  # keep the attributes through pickle (compat users pickle errors)
        return (_rebuild_with_state, (type(self), self.args, self.__dict__))


def _rebuild_with_state(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class WorkerInitError(ZckptError):
    """A worker's ``init_fn`` or writer factory raised; carries the remote traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class CorruptCheckpointError(ZckptError):
    """A checkpoint on disk does not match its manifest (checksum, size, missing file)."""


class TransientWriteError(ZckptError, OSError):
    """Raise this from a writer's ``write_file`` for a failure worth trying again (a
    throttled or briefly unreachable store): the worker removes the partial file and
    calls ``write_file`` again after 0.1, 0.2, 0.4 ... s (at most 5 s), up to
    ``PoolConfig.transient_retries`` times; the last failure fails the save. Any other
    exception fails the save at once. Counted in ``fut.timings["write_retries"]``."""


class PoolBusyError(ZckptError):
    """``on_busy="raise"``: a save arrived while earlier ones still held every staging
    buffer (or ``max_pending`` saves were in flight)."""


class SaveSkippedError(ZckptError):
    """``on_busy="skip"``: the save was dropped at once because earlier ones still held
    every staging buffer (or ``max_pending`` were in flight); nothing was written."""


class StagingBudgetError(ZckptError, MemoryError):
    """Staging a state dict would take the arena past ``PoolConfig.staging_budget_bytes``."""


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


class RemoteError(ZckptError):
    """A worker raised an exception whose type is not rebuilt in the trainer.

    ``remote_type`` names it (``"module.QualName"``); ``__cause__`` holds its traceback.
    """

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type


#: Plain values an exception's args may hold to travel as data.
Plain = None | bool | int | float | str

#: Builtin exception types rebuilt in the trainer: their constructors take plain values
#: and run no user code. Subclasses of OSError come back through ``OSError(errno, ...)``,
#: which picks FileNotFoundError and friends from the errno itself.
_BUILTIN_ALLOWED = frozenset({
    "Exception", "ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError",
    "IndexError", "KeyError", "LookupError", "MemoryError", "NotImplementedError", "OverflowError",
    "RuntimeError", "TimeoutError", "TypeError", "ValueError", "ZeroDivisionError",
    "OSError", "BlockingIOError", "ChildProcessError", "ConnectionError", "BrokenPipeError",
    "ConnectionAbortedError", "ConnectionRefusedError", "ConnectionResetError", "FileExistsError",
    "FileNotFoundError", "InterruptedError", "IsADirectoryError", "NotADirectoryError", "PermissionError",
    "ProcessLookupError",
})


def _zckpt_allowed() -> dict[str, type]:
    return {f"{__name__}.{cls.__name__}": cls for cls in (
        ZckptError, WorkerDiedError, WorkerInitError, CorruptCheckpointError, PoolClosedError,
        ReentrantSaveError, RemoteError, TransientWriteError, PoolBusyError, SaveSkippedError,
        StagingBudgetError)}


def _is_plain(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def pack_exception(exc: BaseException) -> tuple[tuple[str, list[Plain]], str]:
    """What a worker sends for an exception: ((type name, plain args), traceback text).

    Args that are not plain values are replaced by ``[str(exc)]``; an OSError's filename
    is appended so ``OSError(errno, strerror, filename)`` rebuilds it.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cls = type(exc)
    name = f"{cls.__module__}.{cls.__qualname__}"
    args: list[Plain] = list(exc.args)
    if isinstance(exc, OSError) and exc.errno is not None:
        args = [exc.errno, exc.strerror] + ([exc.filename] if exc.filename is not None else [])
    if not all(_is_plain(a) for a in args):
        args = [str(exc)]
    return (name, args), text


def unpack_exception(info: tuple[str, list[Plain]] | None, text: str, context: str) -> BaseException:
    """Rebuild a worker's exception in the trainer, with the remote traceback as cause.

    Only allow-listed types are rebuilt, and only from plain args: nothing a worker sends
    runs code here. Anything else becomes a :class:`RemoteError` naming the remote type.
    A fresh object every call: sharing one exception between futures makes it gain
    frames on every raise (CPython's test_broken_process_pool_traceback).
    """
    name, args = info if info is not None else ("", [])
    exc: BaseException | None = None
    cls: type | None = None
    if name.startswith("builtins.") and name[len("builtins."):] in _BUILTIN_ALLOWED:
        cls = getattr(builtins, name[len("builtins."):])
    else:
        cls = _zckpt_allowed().get(name)
    if cls is not None and all(_is_plain(a) for a in args):
        try:
            exc = cls(*args)
        except Exception:  # noqa: BLE001 - a constructor that wants other args: fall back to text
            exc = None
    if exc is None:
        last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
        exc = RemoteError(f"{context}: {last}", remote_type=name or "unknown")
    elif hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(context)
    exc.__cause__ = RemoteTraceback(text)
    return exc


def describe_exit(returncode: int | None) -> str:
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
