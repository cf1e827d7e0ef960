"""How long the HF Trainer is blocked per checkpoint: its own save vs ZckptCallback.

    python bench/hf_blocked.py                          # GPT-2 shape, ~400 MiB of state, 12 steps, save every 3
    python bench/hf_blocked.py --n-embd 1024 --n-layer 8 --steps 24 --every 6 --json out.json

Runs the same training twice on the same machine (CPU, one process): a GPT-2 model built
from a config (no download), AdamW, a fixed in-memory dataset. First with the Trainer's
own checkpoint (``Trainer._save_checkpoint``: safetensors model, ``torch.save`` of the
optimizer, scheduler and RNG states, ``trainer_state.json``), then with
:class:`zckpt.integrations.transformers.ZckptCallback` (the same content, staged into
shared memory; worker processes write, fsync and commit it while training goes on). The
blocked time of a checkpoint is the time the training loop spends in the Trainer's call
to ``_save_checkpoint`` (whichever is installed), measured the same way for both.
The Trainer's own save does not fsync; zckpt's workers do (in the background).

Prints the blocked time of each checkpoint, the median over the checkpoints after the
first (the first zckpt save also allocates its shared memory), the total training wall
time (for zckpt including the wait for the last save at the end), and the ratios.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if __package__ in (None, ""):  # run as a file: import zckpt from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

import zckpt  # noqa: E402
from zckpt.integrations.transformers import ZckptCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class SaveTimer(transformers.TrainerCallback):
    """Wraps whatever ``_save_checkpoint`` the trainer has when training begins (added
    after ZckptCallback, so its replacement is the one timed) and records each call."""

    def __init__(self, trainer: transformers.Trainer) -> None:
        self.trainer = trainer
        self.blocked: list[tuple[int, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        inner = self.trainer._save_checkpoint

        def timed(model: Any, trial: Any) -> None:
            t0 = time.perf_counter()
            inner(model, trial)
            self.blocked.append((self.trainer.state.global_step, time.perf_counter() - t0))

        self.trainer._save_checkpoint = timed  # type: ignore[method-assign]


def run(mode: str, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=max(1, a.n_embd // 64),
                                     vocab_size=a.vocab, n_positions=a.seq, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.steps, save_strategy="steps",
        save_steps=a.every, logging_steps=a.every, learning_rate=1e-4, report_to=[], dataloader_num_workers=0,
        use_cpu=True, seed=0, disable_tqdm=True, log_level="warning")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(a.batch * a.steps, a.seq, a.vocab))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)   # no log lines on stdout
    cb = None
    if mode == "zckpt":
        cb = ZckptCallback(trainer, zckpt.PoolConfig(num_workers=a.workers))
        trainer.add_callback(cb)
    timer = SaveTimer(trainer)
    trainer.add_callback(timer)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        if cb is not None:
            cb.close()
    wall = time.perf_counter() - t0
    nparams = sum(p.numel() for p in model.parameters())
    last = out / f"checkpoint-{a.steps}"
    if mode == "zckpt":
        zckpt.verify(last)
    state_bytes = sum(f.stat().st_size for f in last.iterdir())
    split = [{k: t.get(k) for k in ("plan_s", "wait_buffer_s", "staged_s", "durable_s")} for t in cb.timings] \
        if cb is not None else []
    return {"mode": mode, "blocked": timer.blocked, "wall_s": wall, "params": nparams, "checkpoint_bytes": state_bytes,
            "zckpt_timings": split}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="zckpt worker processes")
    p.add_argument("--root", default=None, help="where checkpoints go (default: a temp dir, removed after)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    root = Path(tempfile.mkdtemp(prefix="hf-blocked-", dir=a.root))
    try:
        results = {mode: run(mode, a, root / mode) for mode in ("hf", "zckpt")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    hf, zc = results["hf"], results["zckpt"]
    print(f"GPT-2 {a.n_layer} layers x {a.n_embd}, vocab {a.vocab}: {hf['params'] / 1e6:.1f} M parameters, "
          f"checkpoint {hf['checkpoint_bytes'] / 2**20:.0f} MiB (HF) / {zc['checkpoint_bytes'] / 2**20:.0f} MiB "
          f"(zckpt); {a.steps} steps, a checkpoint every {a.every}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {os.cpu_count()} CPUs")
    print(f"{'step':>6} {'HF _save_checkpoint':>20} {'ZckptCallback':>14} {'ratio':>7}   zckpt: of which "
          "waiting for a buffer / copying; written durable after")
    for (step, h), (_, z), t in zip(hf["blocked"], zc["blocked"], zc["zckpt_timings"], strict=True):
        wait = t["wait_buffer_s"] or 0.0
        copy = (t["staged_s"] or 0.0) - wait - (t["plan_s"] or 0.0)
        print(f"{step:>6} {h:>19.3f}s {z:>13.3f}s {h / z:>6.1f}x   {wait:.3f}s / {copy:.3f}s; "
              f"{t['durable_s'] or 0:.2f}s")
    med_h = statistics.median(h for _, h in hf["blocked"][1:] or hf["blocked"])
    med_z = statistics.median(z for _, z in zc["blocked"][1:] or zc["blocked"])
    print(f"median blocked after the first: HF {med_h:.3f}s, zckpt {med_z:.3f}s: {med_h / med_z:.1f}x less blocked")
    print(f"training wall time: HF {hf['wall_s']:.2f}s, zckpt {zc['wall_s']:.2f}s "
          f"({hf['wall_s'] / zc['wall_s']:.2f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results,
                                            "median_blocked_s": {"hf": med_h, "zckpt": med_z}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
