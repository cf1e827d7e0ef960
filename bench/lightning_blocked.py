"""How long Lightning's training loop is blocked per checkpoint: default IO vs async vs zckpt.

    python bench/lightning_blocked.py                     # ~96 MiB checkpoints, 20 steps, save every 5
    python bench/lightning_blocked.py --size-mb 768 --steps 60 --every 10 --no-save-last

The same Lightning run (an MLP with Adam on random data, CPU, ``ModelCheckpoint(
every_n_train_steps=K, save_top_k=2, save_last=True)``) once per checkpoint IO:

- ``torch``: Lightning's default ``TorchCheckpointIO`` (``torch.save`` to a buffer, then one
  write; no fsync);
- ``async``: Lightning's ``AsyncCheckpointIO`` around it (tensors cloned on the training
  thread, ``torch.save`` on a thread);
- ``zckpt``: ``ZckptCheckpointIO`` (copy into shared memory, workers write, fsync, commit).

The blocked time of a checkpoint is the time ``ModelCheckpoint``'s ``on_train_batch_end``
takes when it saves: building the checkpoint dict, every ``save_checkpoint`` call (top-k
and ``last.ckpt``) and the pruning of the oldest top-k checkpoint: the time the loop
cannot train. The first checkpoint is reported apart (zckpt starts its pool then, and
allocates its staging memory). The end-of-run flush (from ``on_train_end`` until ``fit``
returns: ``teardown`` waiting for saves still in flight; zckpt fsyncs them, ``torch.save``
leaves them in the page cache) is reported apart, and is part of the wall time.
Checkpoint size is the whole state: parameters plus Adam's two moments, 3x the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import zckpt from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

MODES = ("torch", "async", "zckpt")


def build_module(width: int, depth: int) -> Any:
    import lightning as L

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[torch.nn.Module] = []
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
            self.net = torch.nn.Sequential(*layers)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-5)

    torch.manual_seed(0)
    return MLP()


def timed_checkpoint(dirpath: str, every: int, save_last: bool) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Timed(ModelCheckpoint):
        """ModelCheckpoint that records how long each saving ``on_train_batch_end`` blocks."""

        def __init__(self) -> None:
            super().__init__(dirpath=dirpath, every_n_train_steps=every, save_top_k=2, monitor="step", mode="max",
                             save_last=save_last)
            self.blocked: list[float] = []
            self.staging: list[float] = []   # zckpt: the part spent in pool.save (its futures' blocked_s)
            self.train_end = 0.0

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_end(trainer, pl_module)
            self.train_end = time.perf_counter()   # what follows, until fit returns, is the flush

        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            before = self._last_global_step_saved
            futures = getattr(trainer.strategy.checkpoint_io, "futures", None)
            n = len(futures) if futures is not None else 0
            t0 = time.perf_counter()
            super().on_train_batch_end(trainer, *args, **kwargs)
            dt = time.perf_counter() - t0
            if self._last_global_step_saved != before:
                self.blocked.append(dt)
                if futures is not None:
                    new = trainer.strategy.checkpoint_io.futures[n:]
                    self.staging.append(sum(f.timings.get("blocked_s", 0.0) for f in new))

    return Timed()


def make_io(mode: str, workers: int, fsync: bool) -> Any:
    if mode == "torch":
        return None   # Lightning's default TorchCheckpointIO
    if mode == "async":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO
        return AsyncCheckpointIO()
    import zckpt
    from zckpt.integrations.lightning import ZckptCheckpointIO
    return ZckptCheckpointIO(config=zckpt.PoolConfig(num_workers=workers, staging_buffers=2, fsync=fsync))


def run(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    dirpath = root / mode
    cb = timed_checkpoint(str(dirpath), args.every, not args.no_save_last)
    io = make_io(mode, args.workers, not args.no_fsync)
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randn(args.steps * args.batch, args.width, generator=g)),
                        batch_size=args.batch)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        plugins=[io] if io is not None else [])
    model = build_module(args.width, args.depth)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    done = time.perf_counter()
    wall, flush = done - t0, done - cb.train_end
    nbytes = sum(f.stat().st_size for f in dirpath.rglob("*") if f.is_file() and not f.is_symlink())
    kept = sorted(p.name for p in dirpath.iterdir())
    shutil.rmtree(dirpath, ignore_errors=True)
    steady = cb.blocked[1:] or cb.blocked
    return {"mode": mode, "checkpoints": len(cb.blocked), "first_s": cb.blocked[0] if cb.blocked else None,
            "median_s": statistics.median(steady) if steady else None,
            "mean_s": statistics.fmean(steady) if steady else None, "blocked_s": cb.blocked,
            "staging_s": cb.staging, "wall_s": wall, "flush_s": flush, "kept": kept, "bytes_on_disk": nbytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=96, help="checkpoint size, parameters + Adam state (MiB)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N training steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="zckpt pool workers")
    p.add_argument("--no-save-last", action="store_true", help="ModelCheckpoint(save_last=False): one save per event")
    p.add_argument("--no-fsync", action="store_true", help="zckpt without fsync (torch.save never fsyncs)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    per_layer = args.width * (args.width + 1) * 4 * 3            # weight + bias, x3 with Adam's moments
    args.depth = max(1, round(args.size_mb * 2**20 / per_layer))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes: {sorted(unknown)}")
    warnings.filterwarnings("ignore")
    import logging

    import lightning  # noqa: F401 - configures its loggers on import: quieten them after
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    root = Path(tempfile.mkdtemp(prefix="zckpt-lightning-bench-", dir=args.dir))
    try:
        results = [run(m, args, root) for m in modes]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = args.depth * per_layer / 2**20
    print(f"checkpoint ~{size:.0f} MiB (MLP {args.depth}x{args.width}, Adam), {args.steps} steps, a checkpoint every "
          f"{args.every} (save_top_k=2, save_last={not args.no_save_last}), zckpt: {args.workers} workers, "
          f"fsync={not args.no_fsync}; {os.cpu_count()} CPUs")
    print("blocked per checkpoint (first; then median and mean of the others), the end-of-run flush (saves "
          "still in flight at the end), and the whole fit:")
    print(f"{'io':<7}{'ckpts':>6}{'first (s)':>11}{'median (s)':>12}{'mean (s)':>10}{'flush (s)':>11}{'wall (s)':>10}")
    for r in results:
        print(f"{r['mode']:<7}{r['checkpoints']:>6}{r['first_s'] or 0:>11.3f}{r['median_s'] or 0:>12.3f}"
              f"{r['mean_s'] or 0:>10.3f}{r['flush_s']:>11.2f}{r['wall_s']:>10.2f}")
        if r["staging_s"][1:]:
            print(f"{'':<7}of which in pool.save (staging copies), median {statistics.median(r['staging_s'][1:]):.3f}s")
    by = {r["mode"]: r for r in results}
    if "zckpt" in by and by["zckpt"]["median_s"]:
        z = by["zckpt"]
        for m in ("torch", "async"):
            if m in by and by[m]["median_s"]:
                print(f"blocked per checkpoint, {m} / zckpt: median {by[m]['median_s'] / z['median_s']:.1f}x, "
                      f"first {by[m]['first_s'] / z['first_s']:.1f}x; wall {by[m]['wall_s'] / z['wall_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
