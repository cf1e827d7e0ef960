"""The save's state machine: allowed transitions, and what each one changes, in order."""

from __future__ import annotations

import os

import pytest

from zckpt.errors import ZckptError
from zckpt.save import Save, SaveState

pytestmark = pytest.mark.timeout(30)


def make(tmp_path, seen):
    tmp = tmp_path / "c.tmp-1-0000abcd"
    tmp.mkdir()
    save = Save(7, [str(tmp_path / "c")], 0.0, on_final=lambda s: seen.append(("final", s.state, tmp.exists())))
    save.tmp_dirs = [str(tmp)]
    save.future.add_done_callback(lambda f: seen.append(("future", save.state, tmp.exists())))
    return save, tmp


def test_a_failure_is_counted_and_cleaned_before_the_future_resolves(tmp_path):
    seen: list = []
    save, tmp = make(tmp_path, seen)
    assert save.transition(SaveState.FAILED, OSError(28, "disk full"))
    # on_final (the pool's counters) ran first, then the temp dir went, then the future.
    assert seen == [("final", SaveState.FAILED, False), ("future", SaveState.FAILED, False)]
    assert isinstance(save.future.exception(), OSError) and isinstance(save.future.staged.exception(), OSError)
    assert not save.transition(SaveState.COMMITTED) and not save.transition(SaveState.FAILED)  # final


def test_the_happy_path_and_refused_jumps(tmp_path):
    seen: list = []
    save, tmp = make(tmp_path, seen)
    assert not save.transition(SaveState.COMMITTED)       # STAGING cannot commit
    assert not save.transition(SaveState.COMMITTING)
    assert save.transition(SaveState.WRITING) and save.future.staged.done() and not save.future.done()
    assert not save.transition(SaveState.STAGING)
    assert save.transition(SaveState.COMMITTING) and save.transition(SaveState.COMMITTED)
    assert save.future.result() == save.path and seen[0] == ("final", SaveState.COMMITTED, True)
    assert set(save.future.timings) >= {"staged_s", "durable_s"}


def test_a_failure_without_a_cause_still_names_the_save(tmp_path):
    save, _ = make(tmp_path, [])
    save.transition(SaveState.FAILED)
    with pytest.raises(ZckptError, match="save 7"):
        save.future.result()
    assert not os.listdir(tmp_path)
