"""Teacher mode and flow matching through the trainer (CPU, gloo): ``--objective=fm`` trains a teacher that
``sample --solver heun`` samples; ``--teacher`` and ``--init_from`` train a student at 1 and 2 ranks, each
stopped at a checkpoint and resumed, the resume reading nothing of ``--init_from``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from soflow_fast.export import export, load_run_weights
from soflow_fast.objective import SoFlowObjective
from soflow_fast.presets import build_config
from soflow_fast.sampling import sample
from soflow_fast.viz import to_uint8
from tests.utils import assert_one_line_error, child_env

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "soflow_fast" / "train.py")
TINY = [
    "--hidden_size=32",
    "--depth=2",
    "--num_heads=2",
    "--batch_size=16",
    "--log_steps=1",
    "--eval_demo_steps=0",
    "--ckpt_saving_steps=2",
    "--total_steps=4",
    "--warmup_steps=0",
    "--lr=1e-3",
]
INIT_LINE = "initialised the model and its EMA from exported weights"


def launch(work: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """The trainer as a user runs it: plain python for one process, torchrun for several."""
    cmd = [sys.executable, TRAIN] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}", TRAIN]  # fmt: skip
    cmd += [f"--working_dir={work}", *TINY, *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> Path:
    """A flow-matching run with the plain MSE (p = 0), its step-0 and step-4 grids sampled by Heun."""
    work = tmp_path_factory.mktemp("fm") / "fm"
    launch(work, 1, "--objective=fm", "--soflow.p=0", "--eval_demo_steps=4")
    return work


def test_fm_trains_the_velocity_alone(fm_run):
    rows = metrics(fm_run)
    assert len(rows) == 4 and all(r["fm_weight"] == 1 and "scm_loss" not in r for r in rows)
    assert all(r["loss"] == r["fm_loss"] == r["fm_mse"] for r in rows)  # p = 0: the plain mean squared error
    for step in (0, 4):
        for n in (1, 2):
            assert (fm_run / "figs" / f"step_{step:08d}_{n}step.png").is_file()


def _sample(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "soflow_fast.sample", *args, "--device=cpu"]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


def test_sample_solver_heun_integrates_the_fm_run(fm_run, tmp_path):
    """``sample --solver heun --nfe 4`` writes what Heun's 2 steps (4 network calls) give in-process."""
    npz = tmp_path / "heun4.npz"
    proc = _sample(f"--working_dir={fm_run}", "--solver=heun", "--nfe=4", "--num=6", f"--npz={npz}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (fm_run / "samples" / "heun4.png").is_file()
    model, info = load_run_weights(fm_run)
    cfg = info["config"]
    noise = torch.randn((6, *cfg.model.sample_shape()), generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % cfg.model.num_classes
    want = sample(model, SoFlowObjective(cfg.soflow, num_classes=cfg.model.num_classes), noise, y, steps=4, mode="heun")
    with np.load(npz) as z:
        assert np.array_equal(z["arr_0"], to_uint8(want)) and np.array_equal(z["labels"], y.numpy())
    proc = _sample(f"--working_dir={fm_run}", "--mode=renoise", f"--out={tmp_path / 'x.png'}")
    assert_one_line_error(proc, "--mode renoise", "run.objective=fm", "--solver")


def test_a_packaged_sampler_refuses_the_fm_run(fm_run, tmp_path, capsys):
    """A .pt2/.onnx runs solution steps; an fm run's velocity needs the ODE solver, so export refuses it."""
    from soflow_fast import export as export_cli

    out = tmp_path / "fm.pt2"
    assert export_cli.main([str(fm_run), str(out)]) == 1
    err = capsys.readouterr().err
    assert "run.objective=fm" in err and "--solver" in err and not out.exists()


@pytest.fixture(scope="module")
def students(fm_run, tmp_path_factory) -> tuple[Path, Path]:
    """Students of the fm run (its EMA weights the teacher, guidance on, 2 Heun steps per target), started
    from an export of it: one process standing in for 2 ranks, and 2 ranks (FSDP). Each stops at step 2 and
    resumes after its --init_from file is deleted: a resume that read it would fail."""
    base = tmp_path_factory.mktemp("students")
    runs = []
    for nproc, name in ((1, "one"), (2, "two")):
        init = export(fm_run, base / f"init_{name}.safetensors")
        args = [f"--teacher={fm_run}", f"--init_from={init}", "--teacher_steps=2"]
        args += ["--draw_groups=2"] if nproc == 1 else []
        launch(base / name, nproc, *args, "--max_steps_this_run=2")
        init.unlink()
        launch(base / name, nproc, *args)
        runs.append(base / name)
    return runs[0], runs[1]


def test_students_start_from_init_from_once_and_resume(students, fm_run):
    for work in students:
        log = (work / "log.txt").read_text()
        assert log.count(INIT_LINE) == 1 and "resumed from" in log, log
        assert log.count(f"teacher: run {fm_run} (EMA") == 2  # loaded at each start, the resume's included
        rows = metrics(work)
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["scm_loss"]) for r in rows)
        # at step 1 the student is its teacher, so its flow-matching error is the guidance term alone, which
        # is tiny while the teacher's 4 steps of training barely tell its classes apart
        assert rows[0]["fm_mse"] < 1e-8 < metrics(fm_run)[0]["fm_mse"]


def _final_weights(work: Path) -> dict[str, torch.Tensor]:
    cfg = build_config("digits", None, TINY)
    sd = {k: torch.zeros_like(v) for k, v in cfg.model.build().state_dict().items()}
    ckpts = Checkpointer(work / "ckpts")
    state = {"model": {"model": sd}}
    ckpts.load(ckpts.latest(), state)
    return state["model"]["model"]


def test_one_and_two_ranks_train_the_same_student(students):
    one, two = students
    a, b = [[r["loss"] for r in metrics(w)] for w in students]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    wa, wb = _final_weights(one), _final_weights(two)
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
