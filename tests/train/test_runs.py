"""Background runs: started detached, found again by reading folders, stopped through the Ctrl-C path
(a checkpoint), resumed from it, and their failures reported with the trainer's own message."""

from __future__ import annotations

import os
import signal
import time

import pytest

from loraforge.config import load_config
from loraforge.train.runs import (
    RunError,
    config_diff,
    list_runs,
    log_tail,
    resume_run,
    run_info,
    smoothed,
    start_run,
    stop_run,
)


def wait_for(predicate, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    yield root
    for info in list_runs(root):
        if info.pid:
            os.kill(info.pid, signal.SIGKILL)


def test_finished_run_is_found_in_its_folder(toy_run, runs):
    config = load_config(toy_run(train={"max_steps": 3}))
    started = start_run(config, runs, "quick")
    assert started.status == "running" and started.pid
    info = wait_for(lambda: (i := run_info(runs / "quick")).status == "finished" and i)
    assert info.adapter_dir is not None and [r["step"] for r in info.metrics() if "loss" in r] == [1, 2, 3]
    assert all("grad_norm" in r for r in info.metrics() if "loss" in r)
    assert info.progress.step == info.progress.total == 3
    assert [r.name for r in list_runs(runs)] == ["quick"]
    assert "done: steps 3" in info.log_tail()


def test_stop_saves_a_checkpoint_and_resume_goes_on(toy_run, runs):
    config = load_config(toy_run(train={"max_steps": 100_000}))
    start_run(config, runs, "long")
    wait_for(lambda: len(run_info(runs / "long").metrics()) >= 3)
    with pytest.raises(RunError, match="is running"):
        start_run(config, runs, "long")
    stop_run(runs / "long")
    info = wait_for(lambda: (i := run_info(runs / "long")).status == "stopped" and i)
    stopped_at = int(info.checkpoint.name.split("-")[1])
    assert stopped_at >= 3 and "interrupted: checkpoint saved" in info.log_tail()

    resumed = resume_run(runs / "long")
    assert resumed.status == "running"
    # stop once the resumed run has stepped (a Ctrl-C while it loads ends it before any new checkpoint)
    wait_for(lambda: max(r["step"] for r in run_info(runs / "long").metrics()) > stopped_at)
    assert f"resumed from {info.checkpoint}" in run_info(runs / "long").log_tail()
    stop_run(runs / "long")
    again = wait_for(lambda: (i := run_info(runs / "long")).status == "stopped" and i)
    assert int(again.checkpoint.name.split("-")[1]) > stopped_at
    with pytest.raises(RunError, match="not running"):
        stop_run(runs / "long")


def test_a_failed_run_shows_the_trainers_error(toy_run, runs):
    config = load_config(toy_run(model={"source": "tiny-llama"}, adapter={"target_modules": ["no_such_proj"]}))
    start_run(config, runs, "broken")
    info = wait_for(lambda: (i := run_info(runs / "broken")).status == "failed" and i)
    assert "no_such_proj" in info.error and "Traceback" not in info.error


def test_bad_names_are_refused(toy_run, runs):
    with pytest.raises(RunError, match="run name"):
        start_run(load_config(toy_run()), runs, "../escape")


def test_helpers():
    assert smoothed([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert smoothed([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert config_diff({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}, "b": {"z": None}}) == [
        ("a.x", 1, 1), ("a.y", 2, 3), ("b.z", None, None)]


def test_log_tail_keeps_the_last_redraw_of_a_progress_bar(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("start\ntrain: 1/3\rtrain: 2/3\rtrain: 3/3\ndone\n")
    assert log_tail(log) == "start\ntrain: 3/3\ndone\n"
