"""The Hugging Face Trainer integration: saves off the loop, resume identical, retention, errors.

A 2-layer GPT-2 of a few thousand parameters, built from a config (no download), with
its dropout on (so the RNG states matter), trained on CPU for 12 steps over 2 epochs of
a shuffled in-memory dataset.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

import zckpt  # noqa: E402
from zckpt.integrations.transformers import (  # noqa: E402
    METADATA_KEY,
    CheckpointSaveError,
    ZckptCallback,
    find_checkpoint,
    resume_from,
)
from zckpt.writers import LocalFileWriter  # noqa: E402

safe_globals = transformers.trainer_pt_utils.safe_globals

STEPS, SAVE_EVERY, BATCH, SAMPLES = 12, 3, 4, 24     # 6 steps an epoch: checkpoint-3, -6 (its end), -9, -12
FAST = zckpt.PoolConfig(num_workers=1, fsync=False, heartbeat_interval_s=0.2, init_timeout_s=30.0)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = SAMPLES, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(transformers.TrainerCallback):
    """The loss logged at each step (logging_steps=1: one step's loss each)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def make_trainer(out: str, cls: type[transformers.Trainer] = transformers.Trainer,
                 **overrides: Any) -> transformers.Trainer:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    kw: dict[str, Any] = dict(output_dir=out, per_device_train_batch_size=BATCH, max_steps=STEPS,
                              save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=1, learning_rate=3e-3,
                              warmup_steps=2, report_to=[], dataloader_num_workers=0, use_cpu=True, seed=42,
                              disable_tqdm=True)
    kw.update(overrides)
    return cls(model=model, args=transformers.TrainingArguments(**kw), train_dataset=TokenDataset())


@pytest.fixture
def callbacks() -> Iterator[Callable[..., ZckptCallback]]:
    """ZckptCallbacks closed (their pools with them) whatever the test did."""
    made: list[ZckptCallback] = []

    def make(trainer: transformers.Trainer, *args: Any, **kwargs: Any) -> ZckptCallback:
        kwargs.setdefault("config", None if "pool" in kwargs else FAST)
        cb = ZckptCallback(trainer, *args, **kwargs)
        trainer.add_callback(cb)
        made.append(cb)
        return cb

    yield make
    for cb in made:
        cb.close()


def run(out: str, callbacks: Callable[..., ZckptCallback] | None, resume: str | None = None,
        **overrides: Any) -> tuple[transformers.Trainer, LossLog, ZckptCallback | None]:
    trainer = make_trainer(out, **overrides)
    log = LossLog()
    trainer.add_callback(log)
    cb = callbacks(trainer) if callbacks is not None else None
    if resume is None:
        trainer.train()
    else:
        resume_from(trainer, resume)
    return trainer, log, cb


def params(trainer: transformers.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal values, tensors bit for bit (NumPy arrays as tensors)."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if isinstance(b, np.ndarray):
        b = torch.from_numpy(b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.timeout(180)
def test_a_resumed_run_continues_bit_for_bit(tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    full, full_log, cb = run(str(tmp_path / "full"), callbacks)
    assert cb is not None and not cb._pending
    assert sorted(full_log.losses) == list(range(1, STEPS + 1))
    names = sorted(os.listdir(tmp_path / "full"), key=lambda n: int(n.split("-")[1]))
    assert names == [f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    for name in names:
        zckpt.verify(tmp_path / "full" / name)
    end = params(full)
    assert [t["step"] for t in cb.timings] == [3, 6, 9, 12] and all(t["blocked_s"] > 0 for t in cb.timings)

    # mid-epoch 0; at the end of epoch 0 (the Trainer restores the RNG states at the start of the
    # next epoch instead of after skipping batches); mid-epoch 1 (the data order of a later epoch)
    for step in (3, 6, 9):
        out = tmp_path / f"resumed-{step}"
        resumed, log, _ = run(str(out), callbacks, resume=str(tmp_path / "full" / f"checkpoint-{step}"))
        assert resumed.state.global_step == STEPS
        assert sorted(log.losses) == list(range(step + 1, STEPS + 1)), "the resumed run redid or skipped steps"
        for s in range(step + 1, STEPS + 1):
            assert log.losses[s] == full_log.losses[s], f"resumed from {step}: step {s} loss differs"
        assert_same(params(resumed), end, f"final params resumed from {step}")
        # the resumed run's own last checkpoint holds what the uninterrupted run's does
        last, full_last = out / f"checkpoint-{STEPS}", tmp_path / "full" / f"checkpoint-{STEPS}"
        assert_same(zckpt.load(last), zckpt.load(full_last), f"checkpoint-{STEPS} resumed from {step}")
        assert zckpt.load_metadata(last) == zckpt.load_metadata(full_last), "trainer states differ"

    # a root resumes from its newest checkpoint: training is already over, nothing to redo
    again, log, _ = run(str(tmp_path / "again"), None, resume=str(tmp_path / "full"))
    assert again.state.global_step == STEPS and not log.losses
    assert_same(params(again), end, "params resumed from the last checkpoint")


@pytest.mark.timeout(180)
def test_a_checkpoint_holds_what_the_trainers_own_checkpoint_holds(
        tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    # logging every 2 steps: the save at step 3 comes with flops not yet stored by a log
    run(str(tmp_path / "hf"), None, max_steps=SAVE_EVERY, logging_steps=2)       # the Trainer's own save
    run(str(tmp_path / "z"), callbacks, max_steps=SAVE_EVERY, logging_steps=2)   # the same run through zckpt
    hf, z = tmp_path / "hf" / f"checkpoint-{SAVE_EVERY}", tmp_path / "z" / f"checkpoint-{SAVE_EVERY}"
    ours = zckpt.load(z)
    state_text = zckpt.load_metadata(z)[METADATA_KEY]["trainer_state"]
    assert state_text == (hf / "trainer_state.json").read_text()
    weights = safetensors.torch.load_file(str(hf / "model.safetensors"))
    assert set(weights) <= set(ours["model"])     # the Trainer's file leaves tied copies out
    assert_same(weights, {k: ours["model"][k] for k in weights}, "model")
    assert_same(torch.load(hf / "optimizer.pt", weights_only=True), ours["optimizer"], "optimizer")
    assert_same(torch.load(hf / "scheduler.pt", weights_only=True), ours["lr_scheduler"], "lr_scheduler")
    with safe_globals():   # the Trainer's own allow-list for its NumPy RNG state
        rng = torch.load(hf / "rng_state.pth", weights_only=True)
    assert set(rng) == set(ours["rng"])
    assert_same(rng["python"], ours["rng"]["python"], "python rng")
    assert_same(rng["cpu"], ours["rng"]["cpu"], "torch rng")
    n = ours["rng"]["numpy"]
    assert_same(tuple(rng["numpy"]), (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                      n["cached_gaussian"]), "numpy rng")


@pytest.mark.timeout(120)
def test_save_total_limit_is_the_retention(tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    run(str(tmp_path / "out"), callbacks, max_steps=8, save_steps=2, save_total_limit=2)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-6", "checkpoint-8"]
    assert zckpt.latest(tmp_path / "out") == str(tmp_path / "out" / "checkpoint-8")
    for name in ("checkpoint-6", "checkpoint-8"):
        zckpt.verify(tmp_path / "out" / name)


@pytest.mark.timeout(120)
def test_a_new_run_into_a_used_output_dir_is_refused_before_it_trains(
        tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    """Its first save would meet checkpoint-<step> of the earlier run (zckpt never overwrites):
    refused when training begins, not after training up to that step; nothing left patched."""
    run(str(tmp_path / "out"), callbacks, max_steps=4, save_steps=2)
    trainer = make_trainer(str(tmp_path / "out"), max_steps=4, save_steps=2)
    log = LossLog()
    trainer.add_callback(log)
    callbacks(trainer)
    with pytest.raises(ValueError, match="already holds checkpoints of later steps"):
        trainer.train()
    assert log.losses == {}
    assert "_save_checkpoint" not in vars(trainer)


@pytest.mark.timeout(60)
def test_two_callbacks_on_one_trainer_are_refused(tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    trainer = make_trainer(str(tmp_path / "out"), max_steps=2)
    callbacks(trainer)
    callbacks(trainer)
    with pytest.raises(ValueError, match="more than one ZckptCallback"):
        trainer.train()


class WaitForSaves(transformers.TrainerCallback):
    """Holds each step until the saves made so far are final: makes "the next save" deterministic."""

    def __init__(self, cb: ZckptCallback) -> None:
        self.cb = cb

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        concurrent.futures.wait(self.cb.futures, timeout=60)


@pytest.mark.timeout(120)
def test_a_failed_save_raises_at_the_next_save_and_at_the_end(
        tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    def failing_writer(marker: str) -> Any:
        """A writer that fails the shard files of the checkpoint named ``marker`` (a local
        function: it travels to the workers by value, without importing this module)."""

        class Writer(LocalFileWriter):
            def write_file(self, path: str, data: memoryview, **kwargs: Any) -> None:
                if f"{os.sep}{marker}.tmp-" in path:
                    raise OSError(28, "No space left on device (injected)", path)
                super().write_file(path, data, **kwargs)

        return Writer(fsync=False)

    for failing, raised_at in (("checkpoint-2", 4), ("checkpoint-4", 4)):
        out = tmp_path / failing
        pool = zckpt.CheckpointPool(config=FAST, writer_factory=failing_writer, writer_kwargs={"marker": failing})
        try:
            trainer = make_trainer(str(out), max_steps=4, save_steps=2)
            cb = callbacks(trainer, pool=pool)
            trainer.add_callback(WaitForSaves(cb))
            with pytest.raises(CheckpointSaveError) as info:
                trainer.train()
            assert info.value.step == int(failing.split("-")[1]) and info.value.path == str(out / failing)
            assert isinstance(info.value.__cause__, OSError) and "injected" in str(info.value.__cause__)
            assert trainer.state.global_step == raised_at
            if failing == "checkpoint-2":    # raised by the next save, which therefore never started
                assert len(cb.futures) == 1
            else:                            # raised by on_train_end; the earlier save is intact
                assert len(cb.futures) == 2 and zckpt.latest(out) == str(out / "checkpoint-2")
            assert not os.path.exists(out / failing)
        finally:
            pool.kill()


@pytest.mark.timeout(60)
def test_resume_refuses_what_it_cannot_resume_from(tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path)
    hf = tmp_path / "checkpoint-3"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(ValueError, match="Trainer's own format"):
        find_checkpoint(hf)
    with zckpt.CheckpointPool(config=FAST) as pool:   # a zckpt checkpoint, not the Trainer's
        pool.save({"w": torch.zeros(2)}, tmp_path / "plain").result()
    trainer = make_trainer(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="not written by"):
        resume_from(trainer, tmp_path / "plain")
    # resuming into an output_dir that holds later checkpoints would collide with them
    run(str(tmp_path / "out"), callbacks, max_steps=4, save_steps=2)
    trainer = make_trainer(str(tmp_path / "out"))
    callbacks(trainer)
    with pytest.raises(ValueError, match="later steps than 2"):
        resume_from(trainer, tmp_path / "out" / "checkpoint-2")


class SkipsOurRngLoader(transformers.Trainer):
    """As if a transformers version restored the RNG states by another route than
    ``_load_rng_state``: the resume must stop, not continue partly restored."""

    def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop("_load_rng_state", None)
        return super()._prepare_for_training(*args, **kwargs)


class SavesByItself(transformers.TrainerCallback):
    """As if a transformers version saved without calling ``_save_checkpoint``."""

    def __init__(self, trainer: transformers.Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.trainer.__dict__.pop("_save_checkpoint", None)


@pytest.mark.timeout(120)
def test_a_trainer_that_bypasses_the_integration_is_stopped(
        tmp_path: Any, callbacks: Callable[..., ZckptCallback]) -> None:
    trainer = make_trainer(str(tmp_path / "own"), max_steps=4, save_steps=2)
    callbacks(trainer)
    trainer.add_callback(SavesByItself(trainer))
    with pytest.raises(RuntimeError, match="without calling Trainer._save_checkpoint"):
        trainer.train()
    run(str(tmp_path / "out"), callbacks, max_steps=4, save_steps=2)
    trainer = make_trainer(str(tmp_path / "resumed"), cls=SkipsOurRngLoader)
    log = LossLog()
    trainer.add_callback(log)
    with pytest.raises(RuntimeError, match="did not call _load_rng_state"):
        resume_from(trainer, tmp_path / "out" / "checkpoint-2")
    assert not log.losses, "a step ran from a partly restored state"
    assert "_load_from_checkpoint" not in trainer.__dict__, "the resume's loaders outlived it"
