#!/usr/bin/env python
"""DCP's ``async_save``: zckpt's storage writer against DCP's own writer, same run.

    python bench/dcp.py                          # 1 GiB, 3 rounds
    python bench/dcp.py --size-mb 256 --rounds 5 --json dcp.json

Runs ``bench/throughput.py`` with the DCP methods (every other option passes through):

- ``dcp_thread`` / ``dcp_process``: ``dcp.async_save`` with ``FileSystemWriter`` and
  DCP's ``DefaultStager`` (shared memory, async staging), thread or process executor;
- ``dcp_zckpt_2``: ``dcp.async_save`` with :class:`zckpt.dcp.ZckptWriter` (2 workers);
- ``memcpy_warm``: the floor for the blocked time (one copy of the state dict).

blocked_s is the time ``async_save`` holds the trainer, snapshot_s until the trainer may
change its tensors, durable_s until the checkpoint is fsynced and committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the bench package from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import throughput  # noqa: E402

METHODS = "memcpy_warm,dcp_thread,dcp_process,dcp_zckpt_2"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--methods" or a.startswith("--methods=") for a in args):
        args += ["--methods", METHODS]
    if not any(a == "--small-tensors" or a.startswith("--small-tensors=") for a in args):
        args += ["--small-tensors", "0"]   # the small-tensor table is about zckpt's own pool
    return throughput.main(args)


if __name__ == "__main__":
    sys.exit(main())
