"""The authors' CIFAR-10 recipe run from their YAML file, as the README shows it, only shortened.

``python soflow_fast/train.py --config cifar.yaml`` and the same under ``torchrun --nproc_per_node=2``:
the U-Net with EDM augmentation labels and dropout, RAdam, the float64 EMA every 16 steps, grids
(``eval_demo_shape``), an eval npz and checkpoints. There is no CIFAR-10 download here, so a
stand-in ``CIFAR10/cifar-10-batches-py`` of random images is written in the python-pickle
layout. Shortened: the U-Net's width and depth, the batch, the steps, the intervals, the workers.
A run stopped half-way and started again with the same command ends bit-identical to one that ran
through, at each world size.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from soflow_fast.checkpoint import Checkpointer
from soflow_fast.export import load_exported
from tests.utils import REPO, raises_naming, run_command, train_command, write_cifar

CIFAR_YAML = REPO / "tests" / "assets" / "authors" / "cifar.yaml"
WORK = "your_experiment_name_cifar"  # the working_dir their file names
SHORT = [
    "--model_channels=16",
    "--channel_mult=[1, 2]",
    "--num_blocks=1",
    "--batch_size=8",
    "--total_steps=6",
    "--ckpt_saving_steps=3",
    "--eval_demo_steps=3",
    "--eval_steps=6",
    "--eval_num_samples=8",
    "--logging_steps=3",
    "--num_workers=0",
]


def _stand_in_cifar(root) -> None:
    """A stand-in ``CIFAR10/cifar-10-batches-py`` in CIFAR-10's pickle layout: 24 random images per batch."""
    write_cifar(root / "CIFAR10" / "cifar-10-batches-py", per_batch=24)


def _final_state(work) -> dict[str, torch.Tensor]:
    """Model and EMA tensors of the run's latest checkpoint, read as a resume reads them."""
    from soflow_fast.config import load_yaml
    from soflow_fast.ema import EMA

    cfg = load_yaml(work / "config.yaml")
    model = cfg.model.build()
    ema = EMA(model, decays=cfg.ema.ema_decays, every=cfg.ema.ema_every, fp64=cfg.ema.ema_fp64)
    state = {"model": {"model": model.state_dict()}, "ema": ema.state_dict()}
    ckpts = Checkpointer(work / "ckpts")
    ckpts.load(ckpts.latest(), state)
    return {**state["model"]["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


@pytest.mark.parametrize("nproc", [1, 2])
def test_cifar_recipe_from_their_yaml_trains_resumes_and_writes_grids(tmp_path, nproc):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        _stand_in_cifar(d)
    train_command(nproc, whole, "--config", str(CIFAR_YAML), *SHORT)
    train_command(nproc, split, "--config", str(CIFAR_YAML), *SHORT, "--max_steps_this_run=3")
    train_command(nproc, split, "--config", str(CIFAR_YAML), *SHORT)

    work = whole / WORK
    log = (work / "log.txt").read_text()
    assert "authors' config: differs from their trainer by design" in log
    assert f"world {nproc}" in log and "done at step 6" in log
    assert "resumed from" in (split / WORK / "log.txt").read_text()
    for k in (0, 3, 6):
        grid = work / "figs" / f"step_{k:08d}_1step.png"
        assert grid.is_file(), grid
    ev = np.load(work / "evals" / "step_00000006_1step.npz")
    assert ev["arr_0"].shape == (8, 32, 32, 3) and ev["arr_0"].dtype == np.uint8
    assert sorted(p.name for p in (work / "ckpts").glob("step_*")) == ["step_00000003", "step_00000006"]

    a, b = _final_state(work), _final_state(split / WORK)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if nproc == 1:  # the run's weights out again: sample and export read the U-Net from the run's config
        sample = ["-m", "soflow_fast.sample", "--work-dir", str(work), "--num", "8", "--npz", "s.npz"]
        run_command([sys.executable, *sample], whole)
        assert np.load(whole / "s.npz")["arr_0"].shape == (8, 32, 32, 3)
        run_command([sys.executable, "-m", "soflow_fast.export", str(work), "ema.safetensors"], whole)
        model, meta = load_exported(whole / "ema.safetensors")
        assert type(model).__name__ == "SongUNet" and meta["model_name"] == "UNet"
    # the EMA blended once (at the first step; the next update is due at step 17) in float64
    assert int(a["ema.num_updates"]) == 1 and int(a["ema.calls"]) == 6
    model_keys = [k for k in a if not k.startswith("ema.")]
    assert any(not torch.equal(a[k], a[f"ema.shadow.0.{k}"]) for k in model_keys if f"ema.shadow.0.{k}" in a)


def test_their_pt_checkpoint_in_the_working_dir_is_continued(tmp_path):
    """Their trainer's layout, ``<working_dir>/ckpts/<step>.pt``, under the same YAML: the run continues it
    (weights, EMA, RAdam state, step) at 2 ranks instead of starting afresh."""
    from torch import nn

    from soflow_fast.presets import build_config

    _stand_in_cifar(tmp_path)
    cfg = build_config(None, str(CIFAR_YAML), SHORT)

    class Soflow(nn.Module):  # what their checkpoints hold: the network under `network.`
        def __init__(self):
            super().__init__()
            self.network = cfg.model.build()

    torch.manual_seed(3)
    theirs, ema = Soflow(), Soflow()
    ema.load_state_dict(theirs.state_dict())
    opt = torch.optim.RAdam(theirs.network.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        t = torch.rand(4)
        labels = torch.zeros(4, 6)
        theirs.network(x, t, t * 0.5, None, labels).square().mean().backward()
        opt.step()
        opt.zero_grad()
    ckpts = tmp_path / WORK / "ckpts"
    ckpts.mkdir(parents=True)
    saved = {"model": theirs.state_dict(), "ema_model": ema.state_dict(), "optimizer": opt.state_dict()}
    torch.save({**saved, "finished_steps": 5, "finished_epochs": 0}, ckpts / "5.pt")
    (tmp_path / WORK / "config.yaml").write_bytes(CIFAR_YAML.read_bytes())  # their trainer copies its YAML there

    train_command(2, tmp_path, "--config", str(CIFAR_YAML), *SHORT, "--total_steps=7")
    log = (tmp_path / WORK / "log.txt").read_text()
    assert f"continuing the authors' checkpoint {WORK}/ckpts/5.pt at step 5 (RAdam state" in log
    assert "steps 5 -> 7" in log and "done at step 7" in log and "starting a new run" not in log
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000007"]
    assert (ckpts / "5.pt").is_file()  # theirs is left as it was, and so is their config, under another name
    assert (tmp_path / WORK / "config.00000005.yaml").read_bytes() == CIFAR_YAML.read_bytes()


def test_every_network_call_of_a_step_sees_the_steps_augmentation_labels():
    """``TrainStep`` augments the batch with draws made after the objective's, from the step's generator,
    and passes the labels to each network call, row for row; MeanFlow, which passes none, is refused."""
    from soflow_fast.data.augment import EDMAugment
    from soflow_fast.parallel import DistInfo
    from soflow_fast.presets import build_config
    from soflow_fast.step import TrainStep, step_seed

    unet = ["--model_channels=16", "--channel_mult=[1, 2]", "--num_blocks=1", "--batch_size=8"]
    cfg = build_config("cifar10", None, [*unet, "--velocity_loss_ratio=0.5"])
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = cfg.model.build()
    seen, forward = [], model.forward
    model.forward = lambda x, t, s, y=None, augment_labels=None: (
        seen.append(augment_labels),
        forward(x, t, s, y, augment_labels),
    )[1]
    step = TrainStep.build(cfg, model, dist_info)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    step.loss(x, None, 4)

    g = torch.Generator().manual_seed(step_seed(cfg.run.seed, 4))
    step.objective.draw_batch(x.shape, x.device, x.dtype, False, 4, g, groups=1)
    expected = EDMAugment()(x, generator=g)[1]
    assert len(seen) == 2 and all(s is not None for s in seen)  # the target pass and the grad pass
    assert torch.equal(seen[-1], expected)  # the grad pass runs every row
    rows = {tuple(r.tolist()) for r in expected}
    assert all(tuple(r.tolist()) in rows for r in seen[0])
    assert 0 < expected[:, 0].sum() < 8  # the step flips some rows and not others

    with raises_naming(ValueError, "meanflow", "augmentation labels"):
        TrainStep.build(build_config("cifar10", None, [*unet, "--objective=meanflow"]), cfg.model.build(), dist_info)


def test_cifar10_preset_command_at_two_ranks(tmp_path):
    """README: torchrun --nproc_per_node=N soflow_fast/train.py --preset cifar10 --data_path=..., shortened."""
    _stand_in_cifar(tmp_path)
    data = tmp_path / "CIFAR10" / "cifar-10-batches-py"
    short = [a.replace("--logging_steps", "--log_steps") for a in SHORT]
    train_command(2, tmp_path, "--preset", "cifar10", f"--data_path={data}", *short)
    work = tmp_path / "runs" / "cifar10"
    log = (work / "log.txt").read_text()
    assert "world 2" in log and "done at step 6" in log and "authors' config" not in log
    assert (work / "figs" / "step_00000006_2step.png").is_file() and (
        work / "evals" / "step_00000006_1step.npz"
    ).is_file()
