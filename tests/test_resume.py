"""Nothing lost, nothing changed behind the user's back: the working-dir lock, the resume policy,
verified checkpoints, no re-save of a complete checkpoint, Ctrl-C, and disk errors as one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from tests.utils import TINY, TRAIN, child_env, error_lines, final_state, launch


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
        second = launch(work, 1, "--seed=7", expect_ok=False)
        assert second.returncode == 1
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and "is in use by another trainer" in lines[0], second.stderr
        assert f"pid {first.pid}" in lines[0]
        assert (work / "config.yaml").read_bytes() == config_before
        assert "--seed" not in (work / "log.txt").read_text()
    finally:
        first.send_signal(signal.SIGTERM)  # saves and exits
        first.wait(timeout=120)
        err.close()
    assert first.returncode == 0, (tmp_path / "first.stderr").read_text()[-2000:]
    # the lock died with its holder: the same dir resumes
    proc = launch(work, 1, "--total_steps=100000", "--max_steps_this_run=1", "--ckpt_saving_steps=0")
    assert "resumed from" in (work / "log.txt").read_text(), proc.stderr


def test_a_changed_seed_on_resume_is_refused_and_config_yaml_kept(tmp_path):
    work = tmp_path / "w"
    launch(work, 1, "--total_steps=2")
    config_before = (work / "config.yaml").read_bytes()
    proc = launch(work, 1, "--total_steps=2", "--seed=7", "--cfg_scale=1.5", expect_ok=False)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "run.seed 0 -> 7, soflow.cfg_scale 2.0 -> 1.5" in lines[0]
    assert "--allow_config_change" in lines[0]
    assert (work / "config.yaml").read_bytes() == config_before
    # settings that do not change what is trained are taken and logged
    launch(work, 1, "--total_steps=2", "--log_steps=2", "--lr=2e-3")
    log = (work / "log.txt").read_text()
    assert "resuming with: optim.lr 0.001 -> 0.002, run.log_steps 1 -> 2" in log
    assert (work / "config.00000002.yaml").read_bytes() == config_before
    # the flag accepts the change; the config that described the checkpoints is kept beside the new one
    launch(work, 1, "--total_steps=4", "--seed=7", "--allow_config_change")
    log = (work / "log.txt").read_text()
    assert "--allow_config_change: resuming with changed settings: run.seed 0 -> 7, soflow.total_steps 2 -> 4" in log
    assert "seed: 7" in (work / "config.yaml").read_text()
    assert (work / "config.00000002.yaml").read_bytes() == config_before  # every earlier config is kept
    assert "lr: 0.002" in (work / "config.00000002.1.yaml").read_text()


@pytest.mark.parametrize("damage", ["flip", "truncate_distcp", "truncate_metadata", "marker"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    work = tmp_path / "w"
    args = ["--total_steps=6", "--ckpt_saving_steps=2"]
    launch(work, 1, *args, "--max_steps_this_run=4")
    ckpts = Checkpointer(work / "ckpts")
    latest = ckpts.latest()
    assert latest.name == "step_00000004"
    distcp = next(latest.glob("*.distcp"))
    if damage == "flip":
        data = bytearray(distcp.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
        distcp.write_bytes(bytes(data))
        why = "does not match its recorded checksum"
    elif damage == "truncate_distcp":
        distcp.write_bytes(distcp.read_bytes()[:-100])
        why = "bytes, the marker recorded"
    elif damage == "truncate_metadata":
        meta = latest / ".metadata"
        meta.write_bytes(meta.read_bytes()[:10])
        why = ".metadata has"
    else:
        (latest / "COMPLETE").write_text("{ not json")
        why = "unreadable COMPLETE marker"
    launch(work, 1, *args)
    log = (work / "log.txt").read_text()
    assert f"warning: skipping checkpoint {latest}" in log and why in log, log[-2000:]
    assert f"resumed from {work / 'ckpts' / 'step_00000002'} at step 2" in log
    assert "done at step 6" in log
    # the damaged checkpoint was set aside (never deleted) and step 4 written anew
    assert len(list((work / "ckpts").glob("damaged_step_00000004_*"))) == 1
    assert ckpts.latest().name == "step_00000006"


def test_sigterm_on_a_checkpoint_step_and_a_finished_rerun_never_rewrite_a_checkpoint(tmp_path):
    work = tmp_path / "w"
    env = {"SOFLOW_TEST_KILL_AT_STEP": "4", "SOFLOW_TEST_KILL_SIGNAL": "TERM"}
    launch(work, 1, "--total_steps=5", "--ckpt_saving_steps=2", env=env)
    log = (work / "log.txt").read_text()
    assert "SIGTERM: saving at step 4 and exiting" in log
    assert "step 4 already has a complete checkpoint: kept as it is" in log
    launch(work, 1, "--total_steps=5", "--ckpt_saving_steps=2")  # finishes at 5 (not a multiple of 2)
    step5 = Checkpointer(work / "ckpts").latest()
    assert step5.name == "step_00000005"
    before = {p.name: p.stat().st_mtime_ns for p in step5.iterdir()}
    launch(work, 1, "--total_steps=5", "--ckpt_saving_steps=2")  # a rerun of the finished run
    assert {p.name: p.stat().st_mtime_ns for p in step5.iterdir()} == before
    assert "step 5 already has a complete checkpoint: kept as it is" in (work / "log.txt").read_text()


def test_ctrl_c_saves_and_the_rerun_ends_where_an_uninterrupted_run_ends(tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "w"
    args = ["--total_steps=6", "--ckpt_saving_steps=0"]
    launch(ref, 1, *args)
    proc = launch(work, 1, *args, env={"SOFLOW_TEST_KILL_AT_STEP": "3", "SOFLOW_TEST_KILL_SIGNAL": "INT"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "Ctrl-C: saving a checkpoint and exiting" in proc.stderr
    assert Checkpointer(work / "ckpts").latest().name == "step_00000003"
    launch(work, 1, *args)
    a, b = final_state(ref), final_state(work)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        work = mnt / "w"
        # the model and its optimiser state outgrow 400 KiB: the first checkpoint does not fit
        proc = launch(work, 1, "--hidden_size=64", "--total_steps=2", "--ckpt_saving_steps=1", expect_ok=False)
        assert proc.returncode == 1
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "no space left on the device" in lines[0], proc.stderr[-3000:]
        assert "could not save checkpoint" in lines[0] and "Traceback" not in proc.stderr
        assert Checkpointer(work / "ckpts").latest() is None
        # a read-only file system under an export: one line too
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
        runs = tmp_path / "run"
        launch(runs, 1, "--total_steps=1")
        r = subprocess.run(
            [sys.executable, "-m", "soflow_fast.export", str(runs), str(ro / "x.safetensors")],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and len(error_lines(r.stderr)) == 1 and "read-only" in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["umount", str(tmp_path / "ro")], check=False)


def test_a_resume_on_data_that_lost_a_file_says_so_and_how_to_go_on(tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "imgs"
    for i in range(12):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(data / f"c{i % 2}" / f"{i}.png")
    work = tmp_path / "w"
    args = ["--dataset=image_folder", f"--data_path={data}", "--image_size=8", "--in_channels=3", "--num_classes=2"]
    args += ["--batch_size=4", "--total_steps=4", "--max_steps_this_run=2"]
    launch(work, 1, *args)
    (data / "c1" / "11.png").unlink()
    proc = launch(work, 1, *args, expect_ok=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "the data had 12 samples when checkpoint" in lines[0] and "has 11 now (-1)" in lines[0]
    assert "--allow_config_change" in lines[0]
    launch(work, 1, *args, "--allow_config_change")
    log = (work / "log.txt").read_text()
    assert "the data stream starts over" in log and "done at step 4" in log
