"""soflow_fast.resume: a resume continues the same run. Changes to what it trains are refused, naming
each key and the flag that accepts them, and config.yaml is kept; a checkpoint of another model or other
EMA decays is one error line; the optimiser takes the config's settings; data that lost a file says so."""

from __future__ import annotations

import json
import shutil

from tests.utils import assert_one_line_error, train_here


def test_a_changed_seed_on_resume_is_refused_and_config_yaml_kept(tmp_path):
    work = tmp_path / "w"
    train_here(work, "--total_steps=2")
    config_before = (work / "config.yaml").read_bytes()
    proc = train_here(work, "--total_steps=2", "--seed=7", "--cfg_scale=1.5", expect_ok=False)
    assert_one_line_error(proc, "run.seed 0 -> 7, soflow.cfg_scale 2.0 -> 1.5", "pass --allow_config_change")
    assert (work / "config.yaml").read_bytes() == config_before
    # settings that do not change what is trained are taken and logged
    train_here(work, "--total_steps=2", "--log_steps=2", "--lr=2e-3")
    log = (work / "log.txt").read_text()
    assert "resuming with: optim.lr 0.001 -> 0.002, run.log_steps 1 -> 2" in log
    assert (work / "config.00000002.yaml").read_bytes() == config_before
    # the flag accepts the change; the config that described the checkpoints is kept beside the new one
    train_here(work, "--total_steps=4", "--seed=7", "--allow_config_change")
    log = (work / "log.txt").read_text()
    assert "--allow_config_change: resuming with changed settings: run.seed 0 -> 7, soflow.total_steps 2 -> 4" in log
    assert "seed: 7" in (work / "config.yaml").read_text()
    assert (work / "config.00000002.yaml").read_bytes() == config_before  # every earlier config is kept
    assert "lr: 0.002" in (work / "config.00000002.1.yaml").read_text()


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
    train_here(work, *args)
    (data / "c1" / "11.png").unlink()
    proc = train_here(work, *args, expect_ok=False)
    assert_one_line_error(proc, "12 samples", "11 now (-1)", "pass --allow_config_change")
    train_here(work, *args, "--allow_config_change")
    log = (work / "log.txt").read_text()
    assert "the data stream starts over" in log and "done at step 4" in log


def test_checkpoint_from_other_model_is_one_clear_error(tiny_runs, tmp_path):
    _, one, _ = tiny_runs
    work = tmp_path / "copy"
    shutil.copytree(one, work)
    saved_config = (work / "config.yaml").read_text()
    proc = train_here(work, "--hidden_size=64", "--total_steps=8", expect_ok=False)
    assert_one_line_error(proc, "model.hidden_size was 32, this run has 64")
    # the refused run must not rewrite config.yaml: export and sample read the model from it
    assert (work / "config.yaml").read_text() == saved_config
    proc = train_here(work, "--total_steps=8", "--ema_decays=[0.9]", expect_ok=False)
    assert_one_line_error(proc, "ema.ema_decays=(0.9, 0.99)", "(0.9,)")
    assert (work / "config.yaml").read_text() == saved_config


def test_resume_takes_the_optimiser_settings_of_the_config(tiny_runs, tmp_path):
    """Loading the optimiser restores the saved lr and betas; a resume that changes them in the config
    runs with the new values (and says so) instead of silently keeping the old ones."""
    _, one, _ = tiny_runs
    work = tmp_path / "copy"
    shutil.copytree(one, work)
    (work / "metrics.jsonl").unlink()
    train_here(work, "--draw_groups=2", "--total_steps=8", "--lr=2e-3", "--betas=[0.8, 0.95]", "--allow_config_change")
    log = (work / "log.txt").read_text()
    assert "optimiser settings from the config, not the checkpoint: lr 0.001 -> 0.002" in log
    assert "betas (0.9, 0.99) -> (0.8, 0.95)" in log
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 8] and all(r["lr"] == 2e-3 for r in rows)
