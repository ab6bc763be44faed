"""soflow_fast.evaluator: a run's grids, eval npz and scores. After a kill, a full disk or a scoring
failure, grids and eval npz are whole or absent, a resume makes the missing ones (equal to an uninterrupted
run's) and no hidden part file stays; FID against a reference batch lands in log.txt and metrics.jsonl, a
failed score is one error line and training goes on; eval files and settings are checked before step 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soflow_fast.checkpoint import Checkpointer
from tests.utils import TINY, assert_one_line_error, child_env, losses, metrics_rows, train_here

# the trainer with a fault injected (SOFLOW_TEST_FAULT=kind:step): SIGKILL half-way through writing a
# grid or the merged eval npz of that step, a full disk there, or a stand-in for the FID scorer
# (`fake_scorer`; `fake_scorer_killed`: killed while it scores that step; `failing_scorer`: every
# score fails; `unbuildable_scorer`: the scorer cannot be built, as with bad Inception weights)
FAULTY_TRAIN = r"""
import errno, os, signal, sys
from pathlib import Path
import numpy as np
import soflow_fast.evaluate as E
import soflow_fast.evaluator as R
from soflow_fast import train

kind, at = os.environ["SOFLOW_TEST_FAULT"].split(":")  # "none:0": no fault
name = f"step_{int(at):08d}_1step"

def kill_after_half(path):
    os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

save_grid, savez = R.save_grid, np.savez

def grid(x, path, **kw):
    out = save_grid(x, path, **kw)
    if kind == "kill_in_grid" and name in Path(path).name:
        kill_after_half(out)
    return out

def merged_npz(file, *a, **kw):
    if name in Path(file).name and ".rank" not in Path(file).name:  # the merged file, not a rank's part
        if kind == "full_disk":
            Path(file).write_bytes(b"PK" * 2048)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "kill_in_npz":
            savez(file, *a, **kw)
            kill_after_half(file)
    return savez(file, *a, **kw)

class FakeScorer:
    def __init__(self, ref, inception, device, say=print, **kwargs):
        if kind == "unbuildable_scorer":
            raise RuntimeError("Invalid magic number; corrupt file?")
    def score(self, path):
        if kind == "failing_scorer":
            raise ValueError("k=3 nearest neighbours need more than 3 feature vectors, got 3")
        if kind == "fake_scorer_killed" and name in path.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"IS": 1.5, "FID": 12.0, "sFID": 3.0, "prec": 0.5, "recall": 0.25}

R.save_grid, np.savez = grid, merged_npz
if "scorer" in kind:
    E.ReferenceScorer = FakeScorer
sys.argv = ["train.py"] + sys.argv[1:]
sys.exit(train.main())
"""

EVAL_ARGS = ["--total_steps=6", "--ckpt_saving_steps=4", "--eval_demo_steps=4", "--eval_steps=4"]
EVAL_ARGS += ["--eval_num_samples=20", "--eval_batch_size=8"]


def launch_faulty(work: Path, fault: str, *args: str, base: list[str] = TINY) -> subprocess.CompletedProcess:
    """The trainer with ``fault`` (``none:0``: none) on the ``base`` arguments and ``args``."""
    cmd = [sys.executable, "-c", FAULTY_TRAIN, f"--working_dir={work}", *base, *args]
    return subprocess.run(cmd, env=child_env({"SOFLOW_TEST_FAULT": fault}), capture_output=True, text=True, timeout=300)


def hidden(work: Path) -> list[str]:
    return sorted(p.name for d in ("figs", "evals") for p in (work / d).iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("ref") / "w"
    proc = train_here(work, *EVAL_ARGS)
    (work.parent / "stderr.txt").write_text(proc.stderr)
    return work


def test_eval_sampling_shows_its_progress(uninterrupted):
    shown = (uninterrupted.parent / "stderr.txt").read_text()
    assert "eval samples, step 4" in shown  # the eval's own bar, beside the training bar


@pytest.mark.parametrize("fault", ["kill_in_grid", "kill_in_npz"])
def test_a_grid_or_eval_npz_cut_short_by_a_kill_is_remade_as_the_uninterrupted_run_wrote_it(
    uninterrupted, tmp_path, fault
):
    work = tmp_path / "w"
    proc = launch_faulty(work, f"{fault}:4", *EVAL_ARGS)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert Checkpointer(work / "ckpts").latest().name == "step_00000004"
    # written to temporary names: the kill left no half file under a real name
    assert not (work / "evals" / "step_00000004_1step.npz").exists()
    assert (work / "figs" / "step_00000004_1step.png").exists() == (fault == "kill_in_npz")
    left = hidden(work)
    assert left, "the kill should have left a temporary file (and, in the eval, the rank's part file)"
    train_here(work, *EVAL_ARGS)
    log = (work / "log.txt").read_text()
    assert f"removed {len(left)} unfinished file(s) that a stopped run was writing: " in log
    assert all(f"/{name}" in log for name in left), (left, log[-2000:])
    made = "sample grids, eval npz" if fault == "kill_in_grid" else "eval npz"
    assert f"step 4's {made} were not written before the run stopped: making them now" in log
    assert hidden(work) == []
    for name in ("step_00000004_1step.png", "step_00000004_2step.png"):
        want = np.asarray(Image.open(uninterrupted / "figs" / name))
        np.testing.assert_array_equal(np.asarray(Image.open(work / "figs" / name)), want, err_msg=name)
    with np.load(work / "evals" / "step_00000004_1step.npz") as got:
        with np.load(uninterrupted / "evals" / "step_00000004_1step.npz") as want:
            assert sorted(got.files) == sorted(want.files) == ["arr_0", "labels"]
            for k in want.files:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert losses(work) == losses(uninterrupted)


def test_a_model_with_dropout_samples_without_it_so_a_remade_grid_is_the_same(tmp_path):
    """A U-Net with dropout: the grids and the eval npz are sampled in eval mode (no masks drawn from
    the global RNG, whose state a resume does not restore)."""
    unet = ["--model=UNet", "--num_classes=0", "--model_channels=16", "--channel_mult=[1, 2]", "--num_blocks=1"]
    unet += ["--attn_resolutions=[]", "--dropout=0.3", "--augment=edm", "--batch_size=16", "--warmup_steps=0"]
    ref, work = tmp_path / "ref", tmp_path / "w"
    train_here(ref, *EVAL_ARGS, base=unet)
    assert launch_faulty(work, "kill_in_grid:4", *EVAL_ARGS, base=unet).returncode == -9
    train_here(work, *EVAL_ARGS, base=unet)
    for name in ("step_00000004_1step.png", "step_00000004_2step.png"):
        want = np.asarray(Image.open(ref / "figs" / name))
        np.testing.assert_array_equal(np.asarray(Image.open(work / "figs" / name)), want, err_msg=name)
    with np.load(work / "evals" / "step_00000004_1step.npz") as got:
        with np.load(ref / "evals" / "step_00000004_1step.npz") as want:
            np.testing.assert_array_equal(got["arr_0"], want["arr_0"])


def test_a_full_disk_while_writing_the_eval_npz_names_the_file_and_leaves_no_part_file(tmp_path):
    work = tmp_path / "w"
    args = ["--total_steps=4", "--eval_steps=2", "--eval_num_samples=20", "--eval_batch_size=8"]
    proc = launch_faulty(work, "full_disk:2", *args)
    npz = work / "evals" / "step_00000002_1step.npz"
    # the one wording of a disk error (soflow_fast.files), as the README gives it
    assert assert_one_line_error(proc) == f"error: could not write {npz}: no space left on the device (ENOSPC)"
    assert hidden(work) == [] and not npz.exists()


def test_a_grid_or_npz_cut_short_by_an_older_version_is_not_taken_as_written(tmp_path):
    from soflow_fast.evaluator import intact
    from soflow_fast.viz import save_grid

    png, npz = tmp_path / "g.png", tmp_path / "e.npz"
    save_grid(torch.zeros(4, 1, 8, 8), png, nrow=2)
    np.savez(npz, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert intact(png) and intact(npz) and not intact(tmp_path / "none.png")
    for path in (png, npz):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        assert not intact(path), path


@pytest.fixture(scope="module")
def scoring_files(tmp_path_factory, inception_weights):
    ref = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8))
    return [f"--eval_reference={ref}", f"--inception={inception_weights}", "--inception_sha256=none"]


def test_a_scoring_failure_is_one_error_line_and_training_goes_on(tmp_path, scoring_files):
    work = tmp_path / "w"
    args = ["--total_steps=4", "--eval_steps=2", "--eval_num_samples=20", *scoring_files]
    proc = launch_faulty(work, "failing_scorer:0", *args)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    log = (work / "log.txt").read_text()
    assert "done at step 4" in log
    errors = [line.split("] ", 1)[1] for line in log.splitlines() if "] error:" in line]
    assert len(errors) == 2, errors  # steps 2 and 4, each once
    for step, line in zip((2, 4), errors, strict=True):
        npz = work / "evals" / f"step_{step:08d}_1step.npz"
        assert line.startswith(f"error: cannot score {npz} against ")
        assert "ValueError: k=3 nearest neighbours need more than 3 feature vectors, got 3; training goes on" in line
        assert "python -m soflow_fast.evaluate --ref_batch " in line and npz.is_file()
    assert not any("eval/FID" in r for r in metrics_rows(work))


def test_a_scorer_that_cannot_be_built_is_one_error_line_for_the_run(tmp_path, scoring_files):
    work = tmp_path / "w"
    args = ["--total_steps=4", "--eval_steps=2", "--eval_num_samples=20", *scoring_files]
    proc = launch_faulty(work, "unbuildable_scorer:0", *args)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    log = (work / "log.txt").read_text()
    errors = [line.split("] ", 1)[1] for line in log.splitlines() if "] error:" in line]
    npz = work / "evals" / "step_00000002_1step.npz"
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot score {npz} with eval.eval_reference="), errors
    assert "RuntimeError: Invalid magic number; corrupt file?; training goes on without eval scores" in errors[0]
    assert "done at step 4" in log and npz.is_file() and (work / "evals" / "step_00000004_1step.npz").is_file()


def test_missing_eval_scores_are_made_on_resume_without_rewriting_the_npz(tmp_path, scoring_files):
    work = tmp_path / "w"
    args = ["--total_steps=6", "--ckpt_saving_steps=4", "--eval_steps=2", "--eval_num_samples=20", *scoring_files]
    proc = launch_faulty(work, "fake_scorer_killed:4", *args)
    assert proc.returncode == -9, proc.stderr[-3000:]
    npz = work / "evals" / "step_00000004_1step.npz"
    before = npz.stat().st_mtime_ns
    proc = launch_faulty(work, "fake_scorer:0", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert npz.stat().st_mtime_ns == before
    assert (
        "step 4's eval scores were not written before the run stopped: making them now"
        in (work / "log.txt").read_text()
    )
    evals = [(r["step"], r["eval/FID"]) for r in metrics_rows(work) if "eval/FID" in r]
    assert evals == [(2, 12.0), (4, 12.0), (6, 12.0)]


def test_eval_files_and_settings_are_checked_at_start(tmp_path, scoring_files, inception_weights):
    """What would fail at the first eval fails before the first step, one line each."""
    ref = tmp_path / "float_ref.npz"
    np.savez(ref, arr_0=np.zeros((12, 8, 8, 3), dtype=np.float32))
    latents = tmp_path / "latents.npz"  # a latent model's data: 4 channels, no VAE to decode its samples
    np.savez(latents, x=np.random.default_rng(0).normal(size=(24, 4, 8, 8)).astype(np.float32), y=np.arange(24) % 10)
    not_weights = tmp_path / "weights.npz"
    np.savez(not_weights, arr_0=np.zeros(3))
    cases = {  # the arguments, and what the error line names: the file or key, and what is wrong
        "float": (
            [f"--eval_reference={ref}", f"--inception={inception_weights}", "--inception_sha256=none"],
            (str(ref), "uint8", "float32"),
        ),
        "weights": ([scoring_files[0], f"--inception={not_weights}"], (str(not_weights), "Inception-v3")),
        "count": ([*scoring_files, "--eval_num_samples=3"], ("eval.eval_num_samples", "3 image(s)", "at least 4")),
        "latent": (
            [*scoring_files, "--in_channels=4", "--dataset=npz", f"--data_path={latents}"],
            ("eval.eval_reference", "4-channel", "eval.vae"),
        ),
    }
    for name, (args, names) in cases.items():
        work = tmp_path / name
        proc = train_here(work, "--total_steps=4", "--eval_steps=2", *args, expect_ok=False)
        assert_one_line_error(proc, *names)
        assert not (work / "ckpts").is_dir() or not any((work / "ckpts").iterdir())  # no step was taken


@pytest.mark.slow  # two 2048 x 2048 matrix square roots (FID, sFID) on 2 cores
def test_every_eval_npz_is_scored_and_logged(tmp_path, inception_weights):
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8))
    work = tmp_path / "w"
    args = ["--total_steps=2", "--eval_steps=2", "--eval_num_samples=10"]
    train_here(work, *args, f"--eval_reference={ref}", f"--inception={inception_weights}", "--inception_sha256=none")
    log = (work / "log.txt").read_text()
    assert "eval step 2 | IS " in log and "| FID " in log and "| recall " in log
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/FID" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["eval/FID"] > 0
    assert 0 <= evals[0]["eval/prec"] <= 1 and evals[0]["eval/IS"] >= 1


def test_a_missing_reference_or_inception_is_one_clear_error_before_training(tmp_path):
    proc = train_here(tmp_path / "w", "--eval_steps=2", f"--eval_reference={tmp_path / 'ref.npz'}", expect_ok=False)
    assert_one_line_error(proc, "eval.eval_reference", "eval.inception", code=2)
    proc = train_here(
        tmp_path / "w",
        "--eval_steps=2",
        f"--eval_reference={tmp_path / 'ref.npz'}",
        f"--inception={tmp_path / 'inc.pth'}",
        expect_ok=False,
    )
    assert_one_line_error(proc, "eval.eval_reference", str(tmp_path / "ref.npz"))
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
