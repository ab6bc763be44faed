"""What a new user meets first: a start that fails, a read-only or full disk, the first metrics, a paused
run, a short authors' file, and evaluation inputs checked as torch-fidelity checks them."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from soflow_fast.presets import build_config
from tests.utils import TINY, assert_one_line_error, launch


def test_a_failed_start_leaves_the_working_dir_as_it_found_it(tmp_path):
    missing = tmp_path / "missing.npz"
    new = tmp_path / "new"
    proc = launch(new, 1, "--dataset=npz", f"--data_path={missing}", expect_ok=False)
    assert_one_line_error(proc, str(missing), code=1)
    assert not new.exists()  # no skeleton: no log.txt, .lock or empty folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert launch(empty, 1, "--dataset=npz", f"--data_path={missing}", expect_ok=False).returncode == 1
    assert list(empty.iterdir()) == []


def _mount(path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_read_only_working_dir_and_a_full_disk_are_one_line_each(tmp_path):
    ro, small = tmp_path / "ro", tmp_path / "small"
    try:
        _mount(ro, "ro,size=64k")
        proc = launch(ro / "w", 1, expect_ok=False)
        assert_one_line_error(proc, f"run.working_dir={ro / 'w'}", "read-only", code=1)
        _mount(small, "size=400k")
        # the model and its optimiser state outgrow 400 KiB: the first checkpoint does not fit
        work = small / "w"
        proc = launch(work, 1, "--hidden_size=64", "--total_steps=2", "--ckpt_saving_steps=1", expect_ok=False)
        assert_one_line_error(proc, "could not save checkpoint", "no space left on the device", code=1)
        assert proc.stderr.count("no space left on the device") == 1  # the log's copy goes to log.txt only
        assert not any((work / "ckpts").glob("step_*")), "a partial checkpoint folder was left behind"
    finally:
        for mounted in (ro, small):
            subprocess.run(["umount", str(mounted)], check=False, capture_output=True)


def test_the_first_step_is_logged_and_a_pause_says_how_to_go_on(tmp_path):
    work = tmp_path / "w"
    args = [a for a in TINY if not a.startswith("--log_steps")] + ["--log_steps=50", "--total_steps=4"]
    launch(work, 1, *args, "--max_steps_this_run=3")
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3]  # the run's first step, then its last
    assert (
        "stopped (run.max_steps_this_run) at step 3 of 4; run the same command again to continue"
        in (work / "log.txt").read_text()
    )
    launch(work, 1, *args)
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 4] and "done at step 4" in (work / "log.txt").read_text()


@pytest.mark.parametrize("kind", ["Imagenet", "CIFAR10"])
def test_a_short_authors_file_takes_their_trainers_defaults(tmp_path, kind):
    path = tmp_path / "short.yaml"
    path.write_text(f"dataset_type: {kind}\nmodel_type: {'DiT-B-2' if kind == 'Imagenet' else 'UNet'}\n")
    cfg = build_config(None, str(path))
    assert (cfg.run.seed, cfg.run.batch_size, cfg.run.log_steps, cfg.checkpoint.ckpt_saving_steps) == (
        42,
        256,
        100,
        200_000,
    )
    assert (cfg.soflow.cfg_scale, cfg.soflow.mix_ratio, cfg.soflow.cfg_drop_rate) == (1.0, 1.0, 0.0)
    assert (
        cfg.eval.eval_demo_shape == (4, 8)
        and cfg.optim.betas == (0.9, 0.99)
        and cfg.run.working_dir.endswith("your_working_dir")
    )
    assert cfg.model.model == ("DiT-B/2" if kind == "Imagenet" else "UNet")
    assert cfg.data.data_path == "./imagenet_latent"


def test_inception_weights_are_checked_by_hash_and_a_latent_reference_is_refused(inception_weights, tmp_path):  # noqa: F811
    from soflow_fast import evaluate
    from soflow_fast.eval.checks import check_inception_weights, check_reference_batch, sha256_of

    with pytest.raises(ValueError, match="SHA-256"):
        check_inception_weights(inception_weights)  # random weights are not torch-fidelity's file
    assert check_inception_weights(inception_weights, sha256_of(inception_weights)[:8]) == inception_weights
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 8, 8, 3), np.uint8), latents=np.zeros((8, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="latent preview"):
        check_reference_batch(ref)
    samples = tmp_path / "samples"
    samples.mkdir()
    args = ["--ref_batch", str(ref), "--sample_batch_dir", str(samples), "--inception", str(inception_weights)]
    with pytest.raises(SystemExit) as done:
        evaluate.main(args)
    assert "latent preview" in str(done.value.code) or "SHA-256" in str(done.value.code)


def test_a_gpu_that_torch_cannot_use_is_one_note(tmp_path, monkeypatch):
    from soflow_fast.parallel import unused_gpu_note

    device = tmp_path / "nvidia0"
    device.write_text("")
    assert unused_gpu_note((str(tmp_path / "none"),)) is None  # no GPU here: nothing to say
    monkeypatch.setattr("torch.version.cuda", None)
    assert "is a CPU build" in unused_gpu_note((str(device),))
    monkeypatch.setattr("torch.version.cuda", "13.0")
    assert "cannot use it" in unused_gpu_note((str(device),))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert unused_gpu_note((str(device),)) is None
