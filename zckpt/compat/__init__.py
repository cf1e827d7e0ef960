"""Drop-in replacement for ``torch.distributed.checkpoint._experimental``'s CheckpointProcess.

Switch with one import::

    # from torch.distributed.checkpoint._experimental.checkpoint_process import ...
    from zckpt.compat import CheckpointProcess, CheckpointProcessConfig, RankInfo, ...

Same constructor arguments, defaults and behaviour as torch 2.13: the constructor
returns at once and ``process_creation_future`` resolves when the worker has run its
init (``TimeoutError`` past ``subprocess_init_timeout_secs``, ``RuntimeError`` if init
or the writer factory raised); ``write()`` returns a ``Future``; the writer in the worker
receives tensors in shared memory (``is_shared()``), and tensors the caller already put
in shared memory are the very same memory (no copy: the caller must not mutate them
until the future resolves); ``close()`` terminates gracefully, then kills;
``process.processes[0]`` has ``pid``, ``is_alive()`` and ``kill()``; a dead worker makes
``write()`` fail with ``RuntimeError("Child process terminated unexpectedly ...")``.

Deliberate differences from torch:

- It runs on zckpt's engine (the workers, supervisor and arena under CheckpointPool):
  a ZeroMQ control plane with heartbeats, a memfd staging arena, a worker that starts
  without importing torch until its writer needs it.
- A tensor that is not yet in shared memory is copied into the reusable arena, instead
  of being moved into freshly allocated shared memory in place (which costs page
  faults on every save and changes the caller's tensor). Each storage gets a segment of
  its own (page-rounded, reused from write to write), mapped in the worker as a shared
  storage of exactly the caller's size: the writer sees what the original's sees, and
  ``torch.save`` writes the same file. The trainer holds one fd per staged storage.
- ``close()`` is bounded by ``subprocess_shutdown_timeout_secs`` even when a write hangs
  (the original waits for the write forever).
- ``CheckpointWriter`` fsyncs the file it writes (the original does not).
- Errors are zckpt errors too (``ChildProcessTerminatedError`` is a ``RuntimeError`` and a
  :class:`zckpt.WorkerDiedError`), and carry the worker's traceback as ``__cause__``.
"""

from __future__ import annotations

from .errors import CheckpointWriteError, ChildProcessTerminatedError
from .process import CheckpointProcess
from .types import (
                    STATE_DICT,
                    CheckpointProcessConfig,
                    CheckpointWriterConfig,
                    RankInfo,
                    RequestType,
                    WorkerRequest,
                    WorkerResponse,
)
from .writer import CheckpointWriter, WriterHook

__all__ = [
    "CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse",
    "CheckpointWriter", "CheckpointWriterConfig", "WriterHook", "RankInfo", "STATE_DICT",
    "ChildProcessTerminatedError", "CheckpointWriteError",
]
