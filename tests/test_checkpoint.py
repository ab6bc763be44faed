"""soflow_fast.checkpoint: a run, ``export`` and ``sample --work-dir`` take the newest intact checkpoint
by step, whatever the pointer says; damaged ones are skipped with a warning and set aside (never deleted),
and none intact is one error line. A complete checkpoint is never written again; a second Ctrl-C or a full
disk during a save leaves the previous one the latest; every checkpoint stays unless keep_checkpoints caps
them."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from soflow_fast import export, sample
from soflow_fast.checkpoint import Checkpointer, CheckpointError
from tests.utils import (
    TINY,
    assert_one_line_error,
    child_env,
    error_lines,
    latest_verified,
    launch,
    raises_naming,
    train_here,
)

ARGS = ["--total_steps=6", "--ckpt_saving_steps=2"]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A run stopped at step 4, with complete checkpoints of steps 2 and 4."""
    work = tmp_path_factory.mktemp("ckpt_safety") / "w"
    train_here(work, *ARGS, "--max_steps_this_run=4")
    return work


@pytest.fixture
def work(run4, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(run4, copy)
    return copy


def _export_and_sample(work, tmp_path, capsys) -> tuple[int, int, str]:
    """Return codes of ``export WORK`` and ``sample --work-dir WORK``, and their stderr."""
    rc_export = export.main([str(work), str(tmp_path / "ema.safetensors")])
    rc_sample = sample.main(
        ["--work-dir", str(work), "--num", "1", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    )
    return rc_export, rc_sample, capsys.readouterr().err


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_not_started_over(work, tmp_path, capsys):
    ckpts = work / "ckpts"
    shards = sorted(ckpts.glob("step_*/*.distcp"))
    assert [p.parent.name for p in shards] == ["step_00000002", "step_00000004"]
    for f in shards:
        f.write_bytes(f.read_bytes()[:-100])
    kept = {p: p.read_bytes() for p in [work / "metrics.jsonl", work / "config.yaml", *shards]}

    def outputs():  # the run's files but its log and TensorBoard's file, which every attempt writes to
        return sorted(p.relative_to(work) for p in work.rglob("*") if p.name != "log.txt" and p.parent.name != "tb")

    listing = outputs()
    logged = len((work / "log.txt").read_text())
    # even with another model: nothing to resume from is not a reason to start a new run over this one
    proc = train_here(work, *ARGS, "--hidden_size=64", expect_ok=False)
    line = assert_one_line_error(proc, str(ckpts), "step_00000004 (__0_0.distcp", "step_00000002 (__0_0.distcp")
    assert f"mv {ckpts} {ckpts}.damaged" in line  # what to do next
    log = (work / "log.txt").read_text()[logged:]  # this attempt's lines
    assert "starting a new run" not in log and "resumed from" not in log
    assert {p: p.read_bytes() for p in kept} == kept
    assert outputs() == listing
    # export and sample find the run's checkpoint through the same code, and say the same
    rc_export, rc_sample, err = _export_and_sample(work, tmp_path, capsys)
    assert (rc_export, rc_sample) == (1, 1), err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [line, line]
    with raises_naming(CheckpointError, str(ckpts), "step_00000004", "step_00000002"):
        export.load_run_weights(work)
    # moved aside as the message says, the working dir starts over
    shutil.move(ckpts, f"{ckpts}.damaged")
    logged = len((work / "log.txt").read_text())
    train_here(work, *ARGS, "--max_steps_this_run=2")
    assert f"starting a new run in {work}" in (work / "log.txt").read_text()[logged:]


@pytest.mark.parametrize("pointer", ["garbage", "older", "empty", "nul", "missing", "directory"])
def test_the_newest_intact_checkpoint_is_used_whatever_the_pointer_says(work, tmp_path, capsys, pointer):
    ckpts = work / "ckpts"
    step2, step4 = ckpts / "step_00000002", ckpts / "step_00000004"
    ptr = ckpts / "latest"
    if pointer == "garbage":
        ptr.write_bytes(bytes([0x3C, 0xA9, 0xFF, 0x10, 0x80]) * 7)
        why = "it cannot be read (UnicodeDecodeError"
    elif pointer == "older":  # a crash after step 4's marker, before the pointer moved
        ptr.write_text(step2.name)
        why = "names step_00000002, but step_00000004 is newer and intact"
    elif pointer == "empty":
        ptr.write_text("")
        why = "it names no checkpoint folder ('')"
    elif pointer == "nul":
        ptr.write_bytes(b"\0")
        why = "it names no checkpoint folder ('\\x00')"
    elif pointer == "missing":
        ptr.write_text("step_00000008")
        why = "it names step_00000008, which is not a complete checkpoint"
    else:
        ptr.unlink()
        ptr.mkdir()
        why = "it cannot be read (IsADirectoryError"
    path, messages = latest_verified(work)
    assert path == step4
    assert len(messages) == 1 and why in messages[0] and str(ptr) in messages[0], messages
    rc_export, rc_sample, err = _export_and_sample(work, tmp_path, capsys)
    assert (rc_export, rc_sample) == (0, 0), err
    assert export.load_run_weights(work)[1]["step"] == 4
    if pointer in ("garbage", "older"):  # the run itself resumes from step 4 and logs why
        train_here(work, *ARGS, "--max_steps_this_run=1")
        log = (work / "log.txt").read_text()
        assert f"warning: {messages[0]}" in log
        assert f"resumed from {step4} at step 4" in log and "stopped (run.max_steps_this_run) at step 5 of 6" in log


def test_a_checkpoint_without_its_metadata_is_skipped_named_and_set_aside(work):
    ckpts = work / "ckpts"
    step4 = ckpts / "step_00000004"
    (step4 / ".metadata").unlink()
    files = {p.name: p.read_bytes() for p in step4.iterdir()}
    path, messages = latest_verified(work)
    assert path == ckpts / "step_00000002"
    assert messages == [f"skipping checkpoint {step4}: .metadata is missing (the index of the checkpoint's files)"]
    train_here(work, *ARGS, "--max_steps_this_run=2")
    log = (work / "log.txt").read_text()
    assert f"warning: {messages[0]}" in log
    assert (
        f"resumed from {ckpts / 'step_00000002'} at step 2" in log
        and "stopped (run.max_steps_this_run) at step 4 of 6" in log
    )
    # step 4 was written anew; the damaged one was set aside with every file it had, not deleted
    (aside,) = ckpts.glob("damaged_step_00000004_*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == files
    assert latest_verified(work) == (step4, [])


# the trainer, with a second Ctrl-C sent while it writes the file of step 3's checkpoint (the first
# comes after step 3, from SOFLOW_TEST_KILL_AT_STEP, and asks for that save)
SECOND_CTRL_C = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as fs
from soflow_fast import train

write_item, save = fs._write_item, dcp.save

def ctrl_c_then_write(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return write_item(*args, **kwargs)

def save_step3_with_ctrl_c(state, checkpoint_id, **kwargs):
    if checkpoint_id.endswith("step_00000003"):
        fs._write_item = ctrl_c_then_write
    return save(state, checkpoint_id=checkpoint_id, **kwargs)

dcp.save = save_step3_with_ctrl_c
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("keep", [0, 1])
def test_a_second_ctrl_c_during_a_save_says_so_exits_130_and_leaves_no_partial_folder(tmp_path, keep):
    work = tmp_path / "w"
    script = tmp_path / "second_ctrl_c.py"
    script.write_text(SECOND_CTRL_C)
    cmd = [sys.executable, str(script), f"--working_dir={work}", *TINY, *ARGS, f"--keep_checkpoints={keep}"]
    env = child_env({"SOFLOW_TEST_KILL_AT_STEP": "3", "SOFLOW_TEST_KILL_SIGNAL": "INT"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not error_lines(proc.stderr), proc.stderr[-3000:]
    ckpts = work / "ckpts"
    assert (
        f"interrupted: a second Ctrl-C interrupted the save of {ckpts / 'step_00000003'}; its unfinished folder "
        f"was removed and the last complete checkpoint ({ckpts / 'step_00000002'}) stays the latest"
    ) in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
    assert latest_verified(work) == (ckpts / "step_00000002", [])


def test_corrupt_checkpoint_is_never_latest(tmp_path):
    ck = Checkpointer(tmp_path)
    good, partial = ck.step_dir(2), ck.step_dir(4)
    for p in (good, partial):
        p.mkdir(parents=True)
        (p / ".metadata").write_bytes(b"x")
    (good / "COMPLETE").write_text("{}")
    assert ck.latest() == good  # the newer folder has no marker: a save cut short
    (tmp_path / "latest").write_text(partial.name)
    assert ck.latest() == good  # a pointer to an incomplete folder is not followed
    (tmp_path / "latest").write_text(good.name)
    assert ck.latest() == good


def test_every_checkpoint_is_kept_by_default_and_sample_picks_one_by_step(tmp_path, capsys):
    """As the authors' runs: every ckpt_saving_steps checkpoint stays (keep_checkpoints caps them), and
    sample/export take --ckpt-steps to use an older one."""
    all_kept, capped = tmp_path / "all", tmp_path / "capped"
    train_here(all_kept, "--total_steps=5", "--ckpt_saving_steps=1")
    train_here(capped, "--total_steps=5", "--ckpt_saving_steps=1", "--keep_checkpoints=2")
    names = lambda w: [p.name for p in Checkpointer(w / "ckpts").complete_checkpoints()]  # noqa: E731
    assert names(all_kept) == [f"step_{k:08d}" for k in range(1, 6)]
    assert names(capped) == ["step_00000004", "step_00000005"]
    npz = tmp_path / "s.npz"
    outs = {}
    for k in (2, 5):
        argv = ["--work-dir", str(all_kept), "--ckpt-steps", str(k), "--num=4", f"--out={tmp_path / 'g.png'}"]
        assert sample.main([*argv, f"--npz={npz}", "--force"]) == 0, capsys.readouterr().err
        outs[k] = np.load(npz)["arr_0"]
    assert not np.array_equal(outs[2], outs[5])  # other weights, same noise
    capsys.readouterr()
    assert sample.main(["--work-dir", str(capped), "--ckpt-steps", "2", "--num=4"]) == 1
    assert_one_line_error(capsys.readouterr().err, "step 2", "(steps: 4, 5)")


@pytest.mark.parametrize("damage", ["flip", "truncate_distcp", "truncate_metadata", "marker"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    work = tmp_path / "w"
    args = ["--total_steps=6", "--ckpt_saving_steps=2"]
    train_here(work, *args, "--max_steps_this_run=4")
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
    train_here(work, *args)
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
    train_here(work, "--total_steps=5", "--ckpt_saving_steps=2")  # finishes at 5 (not a multiple of 2)
    step5 = Checkpointer(work / "ckpts").latest()
    assert step5.name == "step_00000005"
    before = {p.name: p.stat().st_mtime_ns for p in step5.iterdir()}
    train_here(work, "--total_steps=5", "--ckpt_saving_steps=2")  # a rerun of the finished run
    assert {p.name: p.stat().st_mtime_ns for p in step5.iterdir()} == before
    assert "step 5 already has a complete checkpoint: kept as it is" in (work / "log.txt").read_text()


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        work = mnt / "w"
        # the model and its optimiser state outgrow 400 KiB: the first checkpoint does not fit
        proc = train_here(work, "--hidden_size=64", "--total_steps=2", "--ckpt_saving_steps=1", expect_ok=False)
        assert_one_line_error(proc, "could not save checkpoint", str(work / "ckpts"), "no space left on the device")
        assert Checkpointer(work / "ckpts").latest() is None
        # a read-only file system under an export: one line too
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
        runs = tmp_path / "run"
        train_here(runs, "--total_steps=1")
        capsys.readouterr()
        assert export.main([str(runs), str(ro / "x.safetensors")]) == 1
        assert_one_line_error(capsys.readouterr().err, str(ro / "x.safetensors"), "read-only")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["umount", str(tmp_path / "ro")], check=False)
