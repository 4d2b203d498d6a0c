"""The run-directory protocol: waiting for a hand-over, pruning step folders."""

from __future__ import annotations

import os

import pytest

from rlrun.rundir import list_steps, prune, wait_for


def test_wait_for_returns_zero_as_a_ready_value():
    calls = iter([None, False, 0])
    assert wait_for(lambda: next(calls), "version 0", timeout_s=5) == 0


def test_wait_for_times_out_naming_what_it_waited_for():
    with pytest.raises(TimeoutError, match="weights/step_3"):
        wait_for(lambda: None, "weights/step_3", timeout_s=0.05)


def test_prune_keeps_newest_and_removes_dead_writers_staging(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / ".step_6.tmp-999999").mkdir()  # left by a killed writer
    (tmp_path / f".step_7.tmp-{os.getpid()}").mkdir()  # this process is writing it now
    prune(tmp_path, keep_last=2, keep={1})
    assert list_steps(tmp_path) == [1, 4, 5]
    assert not (tmp_path / ".step_6.tmp-999999").exists()
    assert (tmp_path / f".step_7.tmp-{os.getpid()}").exists()
