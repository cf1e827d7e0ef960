"""Multi-rank checkpoints on ``torch.distributed``: one commit for all ranks.

::

    import zckpt.distributed as zd
    ckpt = zd.DistributedCheckpointer(config=zckpt.PoolConfig(num_workers=2))
    fut = ckpt.save(state_dict, "ckpt/step-100")   # every rank, same path, same order
    fut.result()                                   # the path on every rank, or CheckpointAborted on every rank
    zd.load("ckpt/step-100", state_dict)           # every rank: filled in place, resharded

Modules: :mod:`.boxes` (boxes and who writes what, pure), :mod:`.plan` (a rank's part of
a save), :mod:`.two_phase` (the commit protocol over the Store), :mod:`.index` (the
global manifest), :mod:`.checkpointer` (the API), :mod:`.load` (loading at any world
size).
"""

from .checkpointer import CheckpointAborted, DistributedCheckpointer, DistributedSaveFuture
from .load import load

__all__ = ["DistributedCheckpointer", "DistributedSaveFuture", "CheckpointAborted", "load"]
