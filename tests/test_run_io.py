"""soflow_fast.run_io: the working dir's lock, the stop signals (SIGTERM and Ctrl-C save, then exit), and
metrics.jsonl and TensorBoard holding each step once after a resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from soflow_fast.run_io import RunLogger
from tests.utils import (
    TINY,
    TRAIN,
    assert_one_line_error,
    child_env,
    final_state,
    launch,
    losses,
    metrics_rows,
    train_here,
)


def test_sigterm_saves_then_exits(tmp_path):
    import signal
    import time

    work = tmp_path / "w"
    cmd = [sys.executable, TRAIN, f"--working_dir={work}", *TINY, "--total_steps=100000", "--ckpt_saving_steps=0"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = work / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    latest = Checkpointer(work / "ckpts").latest()
    assert latest is not None and 3 <= int(latest.name.split("_")[1]) < 100000
    assert "SIGTERM: saving at step" in (work / "log.txt").read_text()


def test_a_second_trainer_on_the_same_dir_exits_at_once_and_touches_nothing(tmp_path):
    work = tmp_path / "w"
    cmd = [sys.executable, str(TRAIN)]
    cmd += [f"--working_dir={work}", *TINY, "--total_steps=100000", "--ckpt_saving_steps=0"]
    err = open(tmp_path / "first.stderr", "w")  # a file, not a pipe nobody reads while it runs
    first = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while not (work / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert (work / "metrics.jsonl").is_file(), "the first trainer did not start"
        config_before = (work / "config.yaml").read_bytes()
        second = train_here(work, "--seed=7", expect_ok=False)
        assert_one_line_error(second, "is in use by another trainer", f"pid {first.pid}")
        assert (work / "config.yaml").read_bytes() == config_before
        assert "--seed" not in (work / "log.txt").read_text()
    finally:
        first.send_signal(signal.SIGTERM)  # saves and exits
        first.wait(timeout=120)
        err.close()
    assert first.returncode == 0, (tmp_path / "first.stderr").read_text()[-2000:]
    # the lock died with its holder: the same dir resumes
    proc = train_here(work, "--total_steps=100000", "--max_steps_this_run=1", "--ckpt_saving_steps=0")
    assert "resumed from" in (work / "log.txt").read_text(), proc.stderr


def test_ctrl_c_saves_and_the_rerun_ends_where_an_uninterrupted_run_ends(tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "w"
    args = ["--total_steps=6", "--ckpt_saving_steps=0"]
    train_here(ref, *args)
    proc = launch(work, 1, *args, env={"SOFLOW_TEST_KILL_AT_STEP": "3", "SOFLOW_TEST_KILL_SIGNAL": "INT"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "Ctrl-C: saving a checkpoint and exiting" in proc.stderr
    assert Checkpointer(work / "ckpts").latest().name == "step_00000003"
    train_here(work, *args)
    a, b = final_state(ref), final_state(work)
    for k in a:
        assert torch.equal(a[k], b[k]), k


SET_ASIDE_ARGS = ["--total_steps=6", "--ckpt_saving_steps=4"]


@pytest.fixture(scope="module")
def killed_at_step_6(tmp_path_factory):
    """A run killed (SIGKILL) after step 6's update: metrics.jsonl holds steps 1-5, the last checkpoint is
    step 4's (copy it to resume it)."""
    work = tmp_path_factory.mktemp("killed") / "w"
    proc = launch(work, 1, *SET_ASIDE_ARGS, env={"SOFLOW_TEST_KILL_AT_STEP": "6"}, expect_ok=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    return work


@pytest.mark.parametrize("new_lr", [None, 3e-3])
def test_a_resume_sets_aside_the_metrics_written_after_the_last_checkpoint(killed_at_step_6, tmp_path, new_lr):
    work = tmp_path / "w"
    shutil.copytree(killed_at_step_6, work)
    args = SET_ASIDE_ARGS
    assert [r["step"] for r in metrics_rows(work)] == [1, 2, 3, 4, 5]
    step5 = metrics_rows(work)[4]
    train_here(work, *args, *([f"--lr={new_lr}"] if new_lr else []))
    metrics = metrics_rows(work)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics_rows(work, "metrics.abandoned.jsonl") == [step5]
    log = (work / "log.txt").read_text()
    assert f"resumed from {work / 'ckpts' / 'step_00000004'} at step 4" in log
    assert "resumed at step 4: moved 1 line(s) of later steps from metrics.jsonl to metrics.abandoned.jsonl" in log
    if new_lr is None:  # the same steps again
        ref = tmp_path / "ref"
        train_here(ref, *args)
        assert losses(work) == losses(ref)
    else:  # steps 5 and 6 trained again with the new lr, each logged once
        assert [r["lr"] for r in metrics] == [1e-3] * 4 + [new_lr] * 2 and step5["lr"] == 1e-3


def test_tensorboard_drops_the_events_after_the_resumed_step(tmp_path, monkeypatch):
    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append((Path(log_dir), purge_step))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    RunLogger(tmp_path / "new", enabled=True).begin(0)
    (tmp_path / "old" / "tb").mkdir(parents=True)
    (tmp_path / "old" / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    RunLogger(tmp_path / "old", enabled=True).begin(30)
    assert made == [(tmp_path / "new" / "tb", None), (tmp_path / "old" / "tb", 31)]


def test_metrics_lines_past_the_start_and_a_line_cut_short_go_to_the_side_file(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (10, 20, 20, 25)] + ['{"step": 30, "lo']
    (work / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps({"step": 20, "eval/FID": 3.0}) + "\n")
    with open(work / "metrics.jsonl", "a") as f:
        f.write("\n".join(lines[2:]))
    logger = RunLogger(work, enabled=True)
    assert not logger.has_eval_scores(10) and logger.has_eval_scores(20)
    logger.begin(20)
    assert (work / "metrics.jsonl").read_text().splitlines() == [
        lines[0],
        json.dumps({"step": 20, "eval/FID": 3.0}),
        lines[2],
    ]
    assert (work / "metrics.abandoned.jsonl").read_text().splitlines() == lines[3:]
    assert "moved 2 line(s) of later steps" in (work / "log.txt").read_text()
    logger.close()
