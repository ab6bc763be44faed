"""The README's commands as users type them, only shortened: default sizes and side duties on.

``python soflow_fast/train.py`` and ``torchrun --nproc_per_node=2 soflow_fast/train.py`` with the
digits preset (grids from step 0, an eval npz, checkpoints, a resume, kill -9), the ImageNet command
on a small latents file at 2 ranks, an unconditional npz at 2 ranks, and the benchmark command.
Only step counts and intervals are changed (and, for the ImageNet preset, the model size).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from tests.utils import REPO, run_command, train_command

# the digits preset's own side duties, at intervals that fit a test: grids every 4 steps and at
# step 0, an eval npz of 50 samples, a checkpoint every 4 steps, a log line every 4 steps
SHORT = [
    "--total_steps=8",
    "--eval_demo_steps=4",
    "--ckpt_saving_steps=4",
    "--eval_steps=8",
    "--eval_num_samples=50",
    "--log_steps=4",
]


def _weights(work: Path) -> dict[str, torch.Tensor]:
    """Model weights of the run's latest checkpoint, read as a resume reads them."""
    from soflow_fast.models import DiT
    from soflow_fast.presets import build_config

    cfg = build_config("digits", str(work / "config.yaml"), [])
    sd = {k: torch.zeros_like(v) for k, v in DiT(**cfg.model.build_kwargs()).state_dict().items()}
    state = {"model": {"model": sd}}
    ckpts = Checkpointer(work / "ckpts")
    ckpts.load(ckpts.latest(), state)
    return state["model"]["model"]


def _check_digitsrun_command(work: Path, world: int, steps: int) -> None:
    log = (work / "log.txt").read_text()
    assert f"world {world}" in log and f"done at step {steps}" in log
    for k in range(0, steps + 1, 4):
        for kind in ("1step", "2step"):
            assert (work / "figs" / f"step_{k:08d}_{kind}.png").is_file(), (k, kind)
    ev = np.load(work / "evals" / "step_00000008_1step.npz")
    assert ev["arr_0"].shape == (50, 8, 8, 3) and ev["arr_0"].dtype == np.uint8
    assert ev["labels"].shape == (50,) and set(ev["labels"].tolist()) <= set(range(10))
    ckpts = sorted(p.name for p in (work / "ckpts").glob("step_*"))
    assert ckpts[-1] == f"step_{steps:08d}" and "step_00000004" in ckpts
    assert (work / "config.yaml").is_file() and json.loads((work / "classes.json").read_text())[:2] == ["0", "1"]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == steps and all(np.isfinite(r["loss"]) for r in rows)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """The default command at world 1 and 2, 8 steps each, every side duty on."""
    base = tmp_path_factory.mktemp("readme")
    one, two = base / "one", base / "two"
    one.mkdir()
    two.mkdir()
    train_command(1, one, *SHORT)
    train_command(2, two, *SHORT)
    return one / "runs" / "digits", two / "runs" / "digits"


def test_default_command_one_process(digits_runs):
    one, _ = digits_runs
    _check_digitsrun_command(one, 1, 8)


def test_default_command_two_ranks(digits_runs):
    one, two = digits_runs
    _check_digitsrun_command(two, 2, 8)
    # the eval npz is seeded per chunk, not per rank: 2 ranks write the samples 1 process writes
    # (up to the float differences of FSDP's sharded reductions, a uint8 step at most)
    a = np.load(one / "evals" / "step_00000008_1step.npz")
    b = np.load(two / "evals" / "step_00000008_1step.npz")
    assert np.array_equal(a["labels"], b["labels"])
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_interrupt_and_rerun_resumes(digits_runs, tmp_path):
    """README: 'Interrupt it and run the same command again: it resumes.' With grids and the eval
    npz in the loop (they swap the EMA weights in and out), kill -9 and a restart at 2 ranks end
    bit-identical to the uninterrupted run."""
    _, two = digits_runs
    train_command(2, tmp_path, *SHORT, env={"SOFLOW_TEST_KILL_AT_STEP": "6"}, expect_ok=False)
    work = tmp_path / "runs" / "digits"
    assert Checkpointer(work / "ckpts").latest().name == "step_00000004"
    train_command(2, tmp_path, *SHORT)
    assert "resumed from" in (work / "log.txt").read_text()
    _check_digitsrun_command(work, 2, 8)
    ref, got = _weights(two), _weights(work)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after kill -9 and the same command again"
    # and the run goes on past its end with more steps (a longer l schedule), at one process
    train_command(1, tmp_path, *SHORT[1:], "--total_steps=12", "--allow_config_change")
    _check_digitsrun_command(work, 1, 12)


@pytest.mark.parametrize("config", [None, "configs/imagenet.yaml", "tests/assets/authors/imagenet.yaml"])
def test_imagenet_command_on_a_small_latents_file(tmp_path, config):
    """README: torchrun --nproc_per_node=N ... --preset imagenet-b2 --data_path=...h5, the same with
    --config configs/imagenet.yaml, and the authors' own imagenet.yaml (no preset: its dataset_type
    names the recipe; its dataset_path ./imagenet_latent and working_dir as they are), at 2 ranks on
    40 random 4x8x8 latents of 5 classes in the authors' HDF5 layout (mean | std moments, labels);
    a DiT-S/4 shrunk to width 32 and depth 2 stands in for B/2 and B/4."""
    nproc = 2
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    # the file, or (as prepare_latents writes it) the folder holding imagenet_latent.hdf5
    path = tmp_path / "imagenet256_latents.h5" if config else tmp_path / "imagenet_latent"
    h5 = path if config else path / "imagenet_latent.hdf5"
    authors = config is not None and "authors" in config
    if authors:  # their file as it is: the folder ./imagenet_latent, 1,000 classes, their working_dir
        path = tmp_path / "imagenet_latent"
        h5 = path / "imagenet_latent.hdf5"
    h5.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(h5, "w") as f:
        mean = rng.normal(size=(40, 4, 8, 8)).astype(np.float32)
        std = rng.uniform(0.05, 0.2, size=(40, 4, 8, 8)).astype(np.float32)
        f.create_dataset("latents", data=np.concatenate([mean, std], axis=1))
        f.create_dataset("labels", data=np.arange(40) % 5)
    if authors:
        args = ["--config", str(REPO / config), "--model_type=DiT-S-4", "--data_size=8", "--batch_size=8"]
        args += ["--total_steps=4", "--logging_steps=2", "--ckpt_saving_steps=2", "--num_workers=0"]
    else:
        args = ["--preset", "imagenet-b2"] + (["--config", str(REPO / config)] if config else [])
        args += [f"--data_path={path}", "--model=DiT-S/4", "--input_size=8", "--working_dir=runs/imagenet-b2"]
        args += ["--num_classes=5", "--batch_size=8", "--total_steps=4", "--log_steps=2", "--ckpt_saving_steps=2"]
    args += ["--hidden_size=32", "--depth=2", "--num_heads=2"]
    args += ["--eval_demo_steps=4", "--eval_steps=4", "--eval_num_samples=10"]
    train_command(nproc, tmp_path, *args)
    work = tmp_path / ("your_experiment_name" if authors else "runs/imagenet-b2")
    log = (work / "log.txt").read_text()
    assert f"world {nproc}" in log and "done at step 4" in log
    assert (work / "figs" / "step_00000004_1step.png").is_file()
    ev = np.load(work / "evals" / "step_00000004_1step.npz")
    assert ev["latents"].shape == (10, 4, 8, 8) and set(ev["labels"].tolist()) <= set(range(1000 if authors else 5))
    assert Checkpointer(work / "ckpts").latest().name == "step_00000004"


def test_unconditional_npz_at_two_ranks(tmp_path):
    """An unlabelled npz of 3-channel images with an unconditional model, at 2 ranks."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "imgs.npz", x=rng.integers(0, 256, size=(32, 8, 8, 3), dtype=np.uint8))
    args = ["--dataset=npz", f"--data_path={tmp_path / 'imgs.npz'}", "--in_channels=3", "--num_classes=0"]
    args += ["--class_dropout_prob=0", "--cfg_scale=1.0", "--batch_size=16", *SHORT]
    train_command(2, tmp_path, *args)
    work = tmp_path / "runs" / "digits"
    assert "done at step 8" in (work / "log.txt").read_text()
    ev = np.load(work / "evals" / "step_00000008_1step.npz")
    assert ev["arr_0"].shape == (50, 8, 8, 3) and (ev["labels"] == -1).all()
    assert (work / "figs" / "step_00000000_1step.png").is_file()


def test_benchmark_command_shortened(tmp_path):
    """README: pytest benchmarks/ --benchmark-only, on its smallest CPU case, for our step (the
    trainer's TrainStep), MeanFlow's and the authors' loop."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_train_step.py", "--benchmark-only", "-q", "-p"]
    cmd += ["no:cacheprovider", f"--benchmark-json={out}", "-k"]
    cmd += ["cpu-DiT-T2-8px-b16 and (soflow-reference-eager or meanflow-eager or authors-loop)"]
    proc = run_command(cmd, REPO)
    assert "3 passed" in proc.stdout, proc.stdout[-2000:]
    rows = {b["params"]["variant"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert set(rows) == {"soflow-reference-eager", "meanflow-eager", "authors-loop"}
    for info in rows.values():
        assert info["images_per_s"] > 0 and info["flops_per_step"] > 0
