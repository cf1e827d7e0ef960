"""A storage back end for ``torch.distributed.checkpoint`` (DCP): zckpt's pool under DCP's API.

::

    import torch.distributed.checkpoint as dcp
    from zckpt.dcp import ZckptWriter, ZckptReader

    writer = ZckptWriter(pool=pool)          # or ZckptWriter(config=zckpt.PoolConfig(...))
    resp = dcp.async_save(sd, checkpoint_id=f"/ckpt/step-{step}", storage_writer=writer)
    ...                                      # train on: the tensors were copied once
    resp.result()                            # committed (or raises)
    dcp.load(sd, storage_reader=ZckptReader(f"/ckpt/step-{step}"))

How a save runs, and who is blocked:

1. ``dcp.async_save`` calls :meth:`ZckptWriter.stage` on the trainer's thread: every
   tensor (a DTensor's local shard) is copied once into the pool's staging arena
   (shared memory; page-locked for CUDA tensors) and a state dict of views of that
   memory is returned. This copy is all the trainer waits for. (``dcp.save``, the
   blocking call, skips ``stage``: :meth:`ZckptWriter.write_data` copies then.)
2. DCP plans on its thread, as with any storage writer: its planner decides which rank
   writes which item (replicated tensors once).
3. :meth:`ZckptWriter.write_data` hands each rank's items to the pool's worker
   processes as ranges of the arena: each worker writes one file of them, with an xxh3
   checksum per item, and fsyncs it. Nothing is copied again. Non-tensor items (DCP
   pickles them with ``torch.save``) are a few bytes, written by DCP's thread.
4. :meth:`ZckptWriter.finish` (the coordinator rank) writes DCP's ``.metadata`` and
   zckpt's ``manifest.json`` (item locations and checksums, DCP's metadata as JSON) into
   the temporary directory every rank wrote into, fsyncs it, renames it to the
   checkpoint's path and fsyncs the parent: the checkpoint appears whole or not at all.
   A failed save leaves nothing at the path.

Layout of a checkpoint (one directory)::

    __<rank>_<k>.distcp     the items rank <rank>'s k-th worker wrote (raw bytes)
    __<rank>_<n>.distcp     that rank's non-tensor items, if any (DCP's torch.save bytes)
    .metadata               DCP's Metadata, pickled, as DCP's FileSystemWriter writes it
    manifest.json           zckpt's manifest (format "zckpt-dcp", see zckpt.manifest)

DCP's own ``FileSystemReader`` reads the ``.metadata`` (``read_metadata()`` shows every
key, shape and dtype) but refuses the data: tensors are stored as raw bytes, not as
``torch.save`` records, and every item names the storage extension
``zckpt.raw-bytes``, which DCP does not know, so ``dcp.load(..., storage_reader=
FileSystemReader(path))`` raises ``ValueError: Unknown extension`` rather than misread
them. Load with :class:`ZckptReader`, which also reads checkpoints written by
:class:`zckpt.CheckpointPool` and :mod:`zckpt.distributed`: DCP reshards all of them
(any world size, any placement).

Trust: :class:`ZckptReader` reads ``manifest.json`` (JSON, sealed with a checksum: that
proves the bytes are the ones written, not that their writer was honest) and never
unpickles ``.metadata``. A non-tensor item goes to DCP's load planner, which unpickles it
with ``torch.load(weights_only=False)``; so the reader first checks that torch's
restricted unpickler accepts it (``ZckptReader(path, weights_only=False)`` skips that,
for checkpoints you trust). Checkpoints written by the pool load their non-tensor values
with ``weights_only=True``.

Several ranks with two saves in flight (``staging_buffers=2``): DCP runs each save's
collectives on its own thread, so two saves at once on one process group can deadlock
(DCP's rule, not zckpt's): give ``dcp.async_save`` a separate ``process_group`` per save in
flight, or call ``result()`` before the next one. Saves commit in the order they were
called either way.

Limits: DCP's process executor (``AsyncCheckpointerType.PROCESS``) would pickle the
writer into another process: refused with ``TypeError`` (use the default thread
executor: the writing happens in zckpt's workers anyway). ``ShardedTensor`` is not
staged (use DTensor). ``planner_data`` must be JSON data (the default planner's is).
DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) and
``use_collectives=False`` across ranks are refused. The pool's ``mirrors`` do not apply.
"""

from .reader import ZckptReader
from .writer import RAW_BYTES_EXTENSION, ZckptWriter

__all__ = ["ZckptWriter", "ZckptReader", "RAW_BYTES_EXTENSION"]
