"""zckpt: take checkpointing off the critical path of PyTorch training.

    import zckpt
    with zckpt.CheckpointPool(num_workers=2) as pool:
        fut = pool.save(model.state_dict(), "ckpt/step-100")  # returns once staged
        ...                                                     # keep training
        fut.result()                                            # durable and committed
    state = zckpt.load(zckpt.latest("ckpt"))

Names are imported lazily: worker processes import ``zckpt.worker`` through this
package, and must not pay for importing torch (~2 s) unless their writer needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointPool": "pool", "SaveFuture": "save", "SaveState": "save", "PoolState": "pool", "PoolStats": "pool",
    "PoolConfig": "config",
    "load": "reader", "load_metadata": "reader", "verify": "reader",
    "latest": "commit",
    "ShardWriter": "writers", "LocalFileWriter": "writers",
    "ZckptError": "errors", "WorkerDiedError": "errors", "WorkerInitError": "errors",
    "CorruptCheckpointError": "errors", "PoolClosedError": "errors", "ReentrantSaveError": "errors",
    "TransientWriteError": "errors", "PoolBusyError": "errors", "SaveSkippedError": "errors",
    "StagingBudgetError": "errors",
}

# Spelled out (not derived from _EXPORTS) so type checkers and linters can read it.
__all__ = [
    "CheckpointPool", "CorruptCheckpointError", "LocalFileWriter", "PoolBusyError", "PoolClosedError", "PoolConfig",
    "PoolState", "PoolStats", "ReentrantSaveError", "SaveFuture", "SaveSkippedError", "SaveState", "ShardWriter",
    "StagingBudgetError", "TransientWriteError",
    "WorkerDiedError",
    "WorkerInitError", "ZckptError", "__version__", "latest", "load", "load_metadata", "verify",
]

if TYPE_CHECKING:  # pragma: no cover
    from .commit import latest
    from .config import PoolConfig
    from .errors import (
        CorruptCheckpointError,
        PoolClosedError,
        ReentrantSaveError,
        WorkerDiedError,
        WorkerInitError,
        ZckptError,
    )
    from .pool import CheckpointPool, PoolState, PoolStats
    from .reader import load, load_metadata, verify
    from .save import SaveFuture, SaveState
    from .writers import LocalFileWriter, ShardWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
