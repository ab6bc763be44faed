"""The trainer end to end on CPU (gloo): FSDP2 at 2 ranks equal to one process, kill -9 and resume,
the outputs of one process, the engine's switches (compile, activation checkpointing, fused ops, MeanFlow),
the golden loss curve, and bad input as one error line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from tests.utils import REPO, TINY, assert_one_line_error, final_state, launch, losses, train_here

GOLDEN_LOSSES = REPO / "tests" / "assets" / "losses" / "digits_tiny.json"


def test_two_rank_fsdp_matches_one_rank(tiny_runs):
    _, one, two = tiny_runs
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    sa, sb = final_state(one), final_state(two)
    for k in sa:
        np.testing.assert_allclose(sb[k].numpy(), sa[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_kill9_then_resume_is_bit_identical(tiny_runs):
    base, _, two = tiny_runs
    work = base / "killed"
    proc = launch(work, 2, env={"SOFLOW_TEST_KILL_AT_STEP": "5"}, expect_ok=False)
    assert proc.returncode != 0, "the run should have been killed"
    ckpt = Checkpointer(work / "ckpts")
    assert ckpt.latest().name == "step_00000004"
    launch(work, 2)
    assert ckpt.latest().name == "step_00000006"
    ref, got = final_state(two), final_state(work)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after kill -9 and resume"
    # resume at another world size: 2 ranks -> 1 process, two more steps (a longer l schedule)
    proc = train_here(work, "--total_steps=8", "--allow_config_change")
    assert "saved by 2 rank(s), now 1" in (work / "log.txt").read_text()
    assert ckpt.latest().name == "step_00000008"


def test_one_process_outputs_and_resume(tmp_path):
    work = tmp_path / "w"
    train_here(
        work,
        "--total_steps=4",
        "--eval_demo_steps=4",
        "--eval_steps=4",
        "--eval_num_samples=20",
        "--max_steps_this_run=3",
    )
    assert Checkpointer(work / "ckpts").latest().name == "step_00000003"
    train_here(work, "--total_steps=4", "--eval_demo_steps=4", "--eval_steps=4", "--eval_num_samples=20")
    assert (work / "config.yaml").is_file() and (work / "log.txt").is_file()
    assert "resumed from" in (work / "log.txt").read_text()
    assert len(losses(work)) == 4
    for name in ("step_00000004_1step.png", "step_00000004_2step.png", "step_00000000_1step.png"):
        assert (work / "figs" / name).is_file(), name
    ev = np.load(work / "evals" / "step_00000004_1step.npz")
    assert ev["arr_0"].shape == (20, 8, 8, 3) and ev["arr_0"].dtype == np.uint8
    assert set(ev["labels"].tolist()) <= set(range(10))


def test_fused_kernels_on_cpu_say_they_run_the_reference(tmp_path):
    work = tmp_path / "w"
    launch(work, 1, "--total_steps=1", "--use_fused_kernels=true", "--fused_ops=losses")
    log = (work / "log.txt").read_text()
    assert "parallel.use_fused_kernels: the fused Triton ops run on CUDA only; reference ops here" in log
    assert "fused_ops: losses" in (work / "config.yaml").read_text()
    other = tmp_path / "other"
    train_here(other, "--total_steps=1", "--fused_ops=layer_norms")
    assert (
        "parallel.fused_ops=layer_norms has no effect without parallel.use_fused_kernels=true"
        in (other / "log.txt").read_text()
    )


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    x[5, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(64) % 10)
    proc = train_here(tmp_path / "n", "--dataset=npz", f"--data_path={tmp_path / 'nan.npz'}", expect_ok=False)
    assert_one_line_error(proc, str(tmp_path / "nan.npz"), "NaN")
    # finite data whose square overflows float32: the loss, not the reader, goes non-finite
    x[5, 0, 0, 0] = 3e38
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(64) % 10)
    work = tmp_path / "w"
    proc = train_here(work, "--dataset=npz", f"--data_path={tmp_path / 'bad.npz'}", "--total_steps=6", expect_ok=False)
    assert "non-finite loss at or before step" in assert_one_line_error(proc)  # the guard that fired
    assert Checkpointer(work / "ckpts").latest() is None  # nothing saved from the poisoned run


def test_golden_loss_curve(tmp_path):
    """A short digits run's loss curve, checked in; regenerate with SOFLOW_REGEN_GOLDEN=1."""
    work = tmp_path / "g"
    train_here(work, "--total_steps=10", "--ckpt_saving_steps=0")
    got = losses(work)
    if os.environ.get("SOFLOW_REGEN_GOLDEN"):
        GOLDEN_LOSSES.write_text(json.dumps({"args": TINY + ["--total_steps=10"], "loss": got}, indent=1))
    ref = json.loads(GOLDEN_LOSSES.read_text())["loss"]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_whole_loss_compile_matches_eager(tmp_path):
    """parallel.compile_scope=loss: SoFlow's loss compiled as one graph trains as the eager loss does."""
    steps = ["--total_steps=3", "--ckpt_saving_steps=0"]
    eager, comp = tmp_path / "eager", tmp_path / "loss"
    train_here(eager, *steps)
    proc = launch(comp, 1, "--compile=true", "--compile_scope=loss", *steps)
    assert "running eager from now on" not in proc.stderr, proc.stderr[-2000:]  # no silent fallback
    assert "compile True (loss)" in (comp / "log.txt").read_text()
    np.testing.assert_allclose(losses(comp), losses(eager), rtol=1e-4)
    # the whole-loss graph is one process's: a strided stand-in for two ranks is refused with a reason
    proc = train_here(tmp_path / "bad", "--compile=true", "--compile_scope=loss", "--draw_groups=2", expect_ok=False)
    assert_one_line_error(proc, "parallel.compile_scope=loss", "parallel.fsdp=false", "one draw group")


def test_meanflow_objective_trains_on_one_and_two_ranks(tmp_path):
    args = ["--objective=meanflow", "--total_steps=3", "--ckpt_saving_steps=0", "--meanflow.p=0.5"]
    for nproc in (1, 2):
        work = tmp_path / f"mf{nproc}"
        if nproc == 1:
            train_here(work, *args)
        else:
            launch(work, nproc, *args)
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert set(rows[0]) >= {"loss", "mse", "weight"} and all(np.isfinite(r["loss"]) for r in rows)
        assert yaml_section(work, "meanflow")["p"] == 0.5
    proc = train_here(tmp_path / "bad", "--objective=meanflow", "--fsdp=true", expect_ok=False)
    assert_one_line_error(proc, "run.objective=meanflow", "parallel.fsdp=true")


def yaml_section(work: Path, name: str) -> dict:
    import yaml

    return yaml.safe_load((work / "config.yaml").read_text())[name]


def test_bad_inputs_are_one_clear_line(tiny_runs, tmp_path):
    proc = train_here(tmp_path / "shape", "--in_channels=3", expect_ok=False)
    assert_one_line_error(proc, "(1, 8, 8)", "model.in_channels")
    proc = train_here(tmp_path / "nofile", "--dataset=npz", f"--data_path={tmp_path / 'missing.npz'}", expect_ok=False)
    assert_one_line_error(proc, str(tmp_path / "missing.npz"))
    proc = launch(tmp_path / "key", 1, "--learnin_rate=1", expect_ok=False)
    assert_one_line_error(proc, "'learnin_rate'", code=2)
    # a checkpoint whose data file lost its end (tensors; the non-tensor values at its start, which the
    # check reads, are whole), with a marker that records no file sizes (as markers written before they
    # did): it passes the check, and loading it is one clear error
    _, one, _ = tiny_runs
    work = tmp_path / "corrupt"
    shutil.copytree(one, work)
    ckpts = Checkpointer(work / "ckpts")
    for path in ckpts.complete_checkpoints():
        marker = json.loads((path / "COMPLETE").read_text())
        del marker["files"]
        (path / "COMPLETE").write_text(json.dumps(marker))
    latest = ckpts.latest()
    for f in latest.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:-100])
    proc = train_here(work, expect_ok=False)
    assert_one_line_error(proc, f"could not load checkpoint {latest}")


def test_activation_checkpointing_and_compile_match_eager(tiny_runs, tmp_path):
    """The engine's switches change speed and memory, not the numbers (compile: to float tolerance)."""
    _, one, _ = tiny_runs
    ac = tmp_path / "ac"
    train_here(ac, "--draw_groups=2", "--activation_checkpointing=true", "--total_steps=3", "--ckpt_saving_steps=0")
    np.testing.assert_allclose(losses(ac), losses(one)[:3], rtol=1e-6)
    comp = tmp_path / "compiled"
    launch(comp, 1, "--draw_groups=2", "--compile=true", "--total_steps=3", "--ckpt_saving_steps=0")
    assert "compile True" in (comp / "log.txt").read_text()
    np.testing.assert_allclose(losses(comp), losses(one)[:3], rtol=1e-4)


def test_unlabelled_data_with_a_conditional_model_is_one_clear_error(tmp_path):
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    data = tmp_path / "nolabels.npz"
    np.savez(data, x=x)
    proc = train_here(tmp_path / "w", "--dataset=npz", f"--data_path={data}", "--total_steps=1", expect_ok=False)
    assert_one_line_error(proc, "'npz'", "model.num_classes=10", "model.num_classes=0")


def test_a_batch_too_small_for_flow_matching_rows_is_logged(tmp_path):
    work = tmp_path / "w"
    train_here(work, "--batch_size=1", "--total_steps=1")
    assert "rounds to no flow-matching rows: only the consistency loss trains" in (work / "log.txt").read_text()


def test_reader_options_class_names_and_data_warnings_reach_the_run(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for name in ("a/0.png", "a/1.png", "b/0.png", "b/1.png", "stray.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
    work = tmp_path / "w"
    args = ["--dataset=image_folder", f"--data_path={root}", "--image_size=8", "--batch_size=4"]
    proc = train_here(work, *args, "--total_steps=1", expect_ok=False)  # RGB folder, 1-channel model
    assert_one_line_error(proc, "(3, 8, 8)", "data.channels=1|3", "data.image_size")
    train_here(work, *args, "--channels=1", "--total_steps=2")
    assert json.loads((work / "classes.json").read_text()) == ["a", "b"]
    log = (work / "log.txt").read_text()
    assert "warning: " in log and "outside the 2 class sub-folders, and are left out (first: stray.png)" in log
    # a class folder that sorts first would shift every label of the checkpoint by one
    (root / "_new").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "_new" / "0.png")
    proc = train_here(work, *args, "--channels=1", "--total_steps=4", expect_ok=False)
    assert_one_line_error(proc, "2 classes", "has 3", "label 0", "'a'", "'_new'")

    data = tmp_path / "cube.npz"  # (N, 8, 8, 8): the channel axis cannot be told from the shape
    np.savez(data, x=rng.uniform(-1, 1, (16, 8, 8, 8)).astype(np.float32), y=np.arange(16) % 3)
    npz = ["--dataset=npz", f"--data_path={data}", "--in_channels=8", "--total_steps=1"]
    proc = train_here(tmp_path / "n", *npz, expect_ok=False)
    assert_one_line_error(proc, str(data), "--layout=")
    train_here(tmp_path / "n", *npz, "--layout=NCHW")
    assert yaml_section(tmp_path / "n", "data")["layout"] == "NCHW"
