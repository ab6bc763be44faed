"""The training engine end to end on CPU (gloo): FSDP2 parity, kill -9 and resume, outputs, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from soflow_fast.checkpoint import Checkpointer
from soflow_fast.models import DiT, build_model
from soflow_fast.presets import build_config
from tests.utils import REPO, TINY, TRAIN, child_env, final_state, launch, losses

GOLDEN_LOSSES = REPO / "tests" / "assets" / "losses" / "digits_tiny.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs shared by several tests: 1 process standing in for 2 ranks, and 2 ranks."""
    base = tmp_path_factory.mktemp("runs")
    one, two = base / "one", base / "two"
    launch(one, 1, "--draw_groups=2")
    launch(two, 2)
    return base, one, two


def test_two_rank_fsdp_matches_one_rank(runs):
    _, one, two = runs
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    sa, sb = final_state(one), final_state(two)
    for k in sa:
        np.testing.assert_allclose(sb[k].numpy(), sa[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_kill9_then_resume_is_bit_identical(runs):
    base, _, two = runs
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
    proc = launch(work, 1, "--total_steps=8", "--allow_config_change")
    assert "saved by 2 rank(s), now 1" in (work / "log.txt").read_text()
    assert ckpt.latest().name == "step_00000008"


def test_one_process_outputs_and_resume(tmp_path):
    work = tmp_path / "w"
    launch(
        work,
        1,
        "--total_steps=4",
        "--eval_demo_steps=4",
        "--eval_steps=4",
        "--eval_num_samples=20",
        "--max_steps_this_run=3",
    )
    assert Checkpointer(work / "ckpts").latest().name == "step_00000003"
    launch(work, 1, "--total_steps=4", "--eval_demo_steps=4", "--eval_steps=4", "--eval_num_samples=20")
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
    launch(other, 1, "--total_steps=1", "--fused_ops=layer_norms")
    assert (
        "parallel.fused_ops=layer_norms has no effect without parallel.use_fused_kernels=true"
        in (other / "log.txt").read_text()
    )


def test_checkpoint_from_other_model_is_one_clear_error(runs, tmp_path):
    _, one, _ = runs
    work = tmp_path / "copy"
    shutil.copytree(one, work)
    saved_config = (work / "config.yaml").read_text()
    proc = launch(work, 1, "--hidden_size=64", "--total_steps=8", expect_ok=False)
    assert proc.returncode == 1
    assert "model.hidden_size was 32, this run has 64" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the refused run must not rewrite config.yaml: export and sample read the model from it
    assert (work / "config.yaml").read_text() == saved_config
    proc = launch(work, 1, "--total_steps=8", "--ema_decays=[0.9]", expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "keeps EMA weights for ema.ema_decays=(0.9, 0.99), this run asks for (0.9,)" in proc.stderr
    assert (work / "config.yaml").read_text() == saved_config


def test_resume_takes_the_optimiser_settings_of_the_config(runs, tmp_path):
    """Loading the optimiser restores the saved lr and betas; a resume that changes them in the config
    runs with the new values (and says so) instead of silently keeping the old ones."""
    _, one, _ = runs
    work = tmp_path / "copy"
    shutil.copytree(one, work)
    (work / "metrics.jsonl").unlink()
    launch(work, 1, "--draw_groups=2", "--total_steps=8", "--lr=2e-3", "--betas=[0.8, 0.95]", "--allow_config_change")
    log = (work / "log.txt").read_text()
    assert "optimiser settings from the config, not the checkpoint: lr 0.001 -> 0.002" in log
    assert "betas (0.9, 0.99) -> (0.8, 0.95)" in log
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 8] and all(r["lr"] == 2e-3 for r in rows)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    x[5, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(64) % 10)
    proc = launch(tmp_path / "n", 1, "--dataset=npz", f"--data_path={tmp_path / 'nan.npz'}", expect_ok=False)
    assert proc.returncode == 1 and "floating-point images hold NaN or infinite values" in proc.stderr
    # finite data whose square overflows float32: the loss, not the reader, goes non-finite
    x[5, 0, 0, 0] = 3e38
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(64) % 10)
    work = tmp_path / "w"
    proc = launch(work, 1, "--dataset=npz", f"--data_path={tmp_path / 'bad.npz'}", "--total_steps=6", expect_ok=False)
    assert proc.returncode == 1
    assert "non-finite loss at or before step" in proc.stderr
    assert Checkpointer(work / "ckpts").latest() is None  # nothing saved from the poisoned run


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


def test_golden_loss_curve(tmp_path):
    """A short digits run's loss curve, checked in; regenerate with SOFLOW_REGEN_GOLDEN=1."""
    work = tmp_path / "g"
    launch(work, 1, "--total_steps=10", "--ckpt_saving_steps=0")
    got = losses(work)
    if os.environ.get("SOFLOW_REGEN_GOLDEN"):
        GOLDEN_LOSSES.write_text(json.dumps({"args": TINY + ["--total_steps=10"], "loss": got}, indent=1))
    ref = json.loads(GOLDEN_LOSSES.read_text())["loss"]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_export_and_sample_cli(runs, tmp_path):
    from soflow_fast.ema import EMA
    from soflow_fast.export import load_exported

    _, one, _ = runs
    out = tmp_path / "ema.safetensors"
    env = child_env()
    r = subprocess.run(
        [sys.executable, "-m", "soflow_fast.export", str(one), str(out), "--decay=0.99"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    model, meta = load_exported(out)
    assert meta["step"] == "6" and meta["decay"] == "0.99"
    # the exported weights are the run's EMA at decay 0.99, read back through DCP independently
    cfg = build_config("digits", None, TINY)
    ref = DiT(**cfg.model.build_kwargs())
    ema = EMA(ref, decays=(0.9, 0.99))
    dcp.load({"ema": ema}, checkpoint_id=str(Checkpointer(one / "ckpts").latest()))
    ema.copy_to(ref, 0.99)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(final_state(one)["final_layer.linear.weight"], ref.final_layer.linear.weight)

    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    for src in (["--work-dir", str(one)], ["--weights", str(out)]):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "soflow_fast.sample",
                *src,
                "--num=12",
                "--steps=2",
                "--labels",
                "3",
                "4",
                f"--out={png}",
                f"--npz={npz}",
                "--force",  # the second source replaces the first one's files
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert png.is_file() and np.load(npz)["arr_0"].shape == (12, 8, 8, 3)
        assert np.load(npz)["labels"].tolist() == [3, 4] * 6

    official = tmp_path / "authors.pt"
    torch.save(
        {"model": {f"network.{k}": v for k, v in ref.state_dict().items()}, "ema_model": ref.state_dict()}, official
    )

    def sample_official():
        cmd = [sys.executable, "-m", "soflow_fast.sample", "--official", str(official), "--model=DiT-T/2"]
        cmd += ["--input-size=8", "--in-channels=1", "--num-classes=10", "--num=4", f"--out={png}", "--force"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    r = sample_official()
    # DiT-T/2 is larger than the tiny run: the loader must name the key it misses
    assert r.returncode == 1 and "missing key" in r.stderr and "blocks.2" in r.stderr and "Traceback" not in r.stderr
    from soflow_fast.models import build_model

    tiny2 = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    torch.save({"model": tiny2.state_dict(), "ema_model": tiny2.state_dict()}, official)
    r = sample_official()
    assert r.returncode == 0, r.stderr


def test_whole_loss_compile_matches_eager(tmp_path):
    """parallel.compile_scope=loss: SoFlow's loss compiled as one graph trains as the eager loss does."""
    steps = ["--total_steps=3", "--ckpt_saving_steps=0"]
    eager, comp = tmp_path / "eager", tmp_path / "loss"
    launch(eager, 1, *steps)
    proc = launch(comp, 1, "--compile=true", "--compile_scope=loss", *steps)
    assert "running eager from now on" not in proc.stderr, proc.stderr[-2000:]  # no silent fallback
    assert "compile True (loss)" in (comp / "log.txt").read_text()
    np.testing.assert_allclose(losses(comp), losses(eager), rtol=1e-4)
    # the whole-loss graph is one process's: a strided stand-in for two ranks is refused with a reason
    proc = launch(tmp_path / "bad", 1, "--compile=true", "--compile_scope=loss", "--draw_groups=2", expect_ok=False)
    assert proc.returncode == 1 and "needs world size 1, parallel.fsdp=false and one draw group" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_meanflow_objective_trains_on_one_and_two_ranks(tmp_path):
    for nproc in (1, 2):
        work = tmp_path / f"mf{nproc}"
        launch(work, nproc, "--objective=meanflow", "--total_steps=3", "--ckpt_saving_steps=0", "--meanflow.p=0.5")
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert set(rows[0]) >= {"loss", "mse", "weight"} and all(np.isfinite(r["loss"]) for r in rows)
        assert yaml_section(work, "meanflow")["p"] == 0.5
    proc = launch(tmp_path / "bad", 1, "--objective=meanflow", "--fsdp=true", expect_ok=False)
    assert proc.returncode == 1 and "cannot use parallel.fsdp=true" in proc.stderr


def yaml_section(work: Path, name: str) -> dict:
    import yaml

    return yaml.safe_load((work / "config.yaml").read_text())[name]


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


def test_bad_inputs_are_one_clear_line(runs, tmp_path):
    proc = launch(tmp_path / "shape", 1, "--in_channels=3", expect_ok=False)
    assert proc.returncode == 1 and "holds samples of shape (1, 8, 8)" in proc.stderr and "Traceback" not in proc.stderr
    proc = launch(tmp_path / "nofile", 1, "--dataset=npz", f"--data_path={tmp_path / 'missing.npz'}", expect_ok=False)
    assert proc.returncode == 1 and "missing.npz" in proc.stderr and "Traceback" not in proc.stderr
    proc = launch(tmp_path / "key", 1, "--learnin_rate=1", expect_ok=False)
    assert proc.returncode == 2 and "unknown config key 'learnin_rate'" in proc.stderr
    # a checkpoint whose data file lost its end (tensors; the non-tensor values at its start, which the
    # check reads, are whole), with a marker that records no file sizes (as markers written before they
    # did): it passes the check, and loading it is one clear error
    _, one, _ = runs
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
    proc = launch(work, 1, expect_ok=False)
    assert proc.returncode == 1 and f"could not load checkpoint {latest}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_activation_checkpointing_and_compile_match_eager(runs, tmp_path):
    """The engine's switches change speed and memory, not the numbers (compile: to float tolerance)."""
    _, one, _ = runs
    ac = tmp_path / "ac"
    launch(ac, 1, "--draw_groups=2", "--activation_checkpointing=true", "--total_steps=3", "--ckpt_saving_steps=0")
    np.testing.assert_allclose(losses(ac), losses(one)[:3], rtol=1e-6)
    comp = tmp_path / "compiled"
    launch(comp, 1, "--draw_groups=2", "--compile=true", "--total_steps=3", "--ckpt_saving_steps=0")
    assert "compile True" in (comp / "log.txt").read_text()
    np.testing.assert_allclose(losses(comp), losses(one)[:3], rtol=1e-4)


def test_export_and_sample_bad_arguments_are_one_clear_line(runs, tmp_path, capsys):
    import argparse

    from soflow_fast import export, sample

    _, one, _ = runs
    for flag in ("--num", "--batch", "--steps"):
        with pytest.raises(SystemExit) as info:
            sample.main(["--work-dir", str(one), flag, "0"])
        assert info.value.code == 2 and f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        sample.main(["--work-dir", str(one), "--cfg-scale", "nan"])
    assert info.value.code == 2 and "--cfg-scale must be a finite number, got nan" in capsys.readouterr().err
    unconditional = tmp_path / "unconditional.pt"
    tiny = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=0, class_dropout_prob=0.0)
    torch.save(tiny.state_dict(), unconditional)
    official = ["--official", str(unconditional), "--model=DiT-T/2", "--input-size=8", "--in-channels=1"]
    assert sample.main([*official, "--num-classes=0", "--cfg-scale=2", "--num=2"]) == 1
    assert "--cfg-scale needs a class-conditional model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        export.main([str(one), str(tmp_path)])
    assert info.value.code == 2 and "out must be a file path" in capsys.readouterr().err
    pickled = tmp_path / "namespace.pt"
    torch.save(argparse.Namespace(a=1), pickled)  # not a state dict: the safe loader refuses it
    assert sample.main(["--official", str(pickled), "--model=DiT-T/2", "--input-size=8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_unlabelled_data_with_a_conditional_model_is_one_clear_error(tmp_path):
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    data = tmp_path / "nolabels.npz"
    np.savez(data, x=x)
    proc = launch(tmp_path / "w", 1, "--dataset=npz", f"--data_path={data}", "--total_steps=1", expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has no labels, but model.num_classes=10" in proc.stderr


def test_a_batch_too_small_for_flow_matching_rows_is_logged(tmp_path):
    work = tmp_path / "w"
    launch(work, 1, "--batch_size=1", "--total_steps=1")
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
    proc = launch(work, 1, *args, "--total_steps=1", expect_ok=False)  # RGB folder, 1-channel model
    assert proc.returncode == 1 and "(or data.channels=1|3 and data.image_size" in proc.stderr
    launch(work, 1, *args, "--channels=1", "--total_steps=2")
    assert json.loads((work / "classes.json").read_text()) == ["a", "b"]
    log = (work / "log.txt").read_text()
    assert "warning: " in log and "outside the 2 class sub-folders, and are left out (first: stray.png)" in log
    # a class folder that sorts first would shift every label of the checkpoint by one
    (root / "_new").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "_new" / "0.png")
    proc = launch(work, 1, *args, "--channels=1", "--total_steps=4", expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "trained with 2 classes, the data now has 3, and label 0 meant 'a' but now means '_new'" in proc.stderr

    data = tmp_path / "cube.npz"  # (N, 8, 8, 8): the channel axis cannot be told from the shape
    np.savez(data, x=rng.uniform(-1, 1, (16, 8, 8, 8)).astype(np.float32), y=np.arange(16) % 3)
    npz = ["--dataset=npz", f"--data_path={data}", "--in_channels=8", "--total_steps=1"]
    proc = launch(tmp_path / "n", 1, *npz, expect_ok=False)
    assert proc.returncode == 1 and "cannot tell the channel axis" in proc.stderr and "--layout=" in proc.stderr
    launch(tmp_path / "n", 1, *npz, "--layout=NCHW")
    assert yaml_section(tmp_path / "n", "data")["layout"] == "NCHW"


def test_every_checkpoint_is_kept_by_default_and_sample_picks_one_by_step(tmp_path):
    """As the authors' runs: every ckpt_saving_steps checkpoint stays (keep_checkpoints caps them), and
    sample/export take --ckpt-steps to use an older one."""
    all_kept, capped = tmp_path / "all", tmp_path / "capped"
    launch(all_kept, 1, "--total_steps=5", "--ckpt_saving_steps=1")
    launch(capped, 1, "--total_steps=5", "--ckpt_saving_steps=1", "--keep_checkpoints=2")
    names = lambda w: [p.name for p in Checkpointer(w / "ckpts").complete_checkpoints()]  # noqa: E731
    assert names(all_kept) == [f"step_{k:08d}" for k in range(1, 6)]
    assert names(capped) == ["step_00000004", "step_00000005"]
    env = child_env()
    npz = tmp_path / "s.npz"
    outs = {}
    for k in (2, 5):
        r = subprocess.run(
            [sys.executable, "-m", "soflow_fast.sample", "--work-dir", str(all_kept), "--ckpt-steps", str(k)]
            + ["--num=4", f"--out={tmp_path / 'g.png'}", f"--npz={npz}", "--force"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        outs[k] = np.load(npz)["arr_0"]
    assert not np.array_equal(outs[2], outs[5])  # other weights, same noise
    r = subprocess.run(
        [sys.executable, "-m", "soflow_fast.sample", "--work-dir", str(capped), "--ckpt-steps", "2", "--num=4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "no complete checkpoint of step 2" in r.stderr and "(steps: 4, 5)" in r.stderr
    assert "Traceback" not in r.stderr
