"""The model and data registries: a kind from outside the package trains with one entry and no other edit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from soflow_fast import export, train
from soflow_fast.config_fields import at_least, option
from soflow_fast.data import DataConfig, build_dataset, dataset_names
from soflow_fast.models import ModelConfig, build_model, model_kinds, register_model
from soflow_fast.presets import build_config
from tests.utils import raises_naming


class TinyNet(nn.Module):
    """A two-convolution F(x, t, s, y): the smallest network the engine can train."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.times = nn.Linear(2, width)
        self.labels = nn.Embedding(num_classes + 1, width)  # the last row is the null label
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x, t, s, y=None):
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, device=x.device)
        cond = self.times(torch.stack([t, t - s], dim=1).to(x.dtype)) + self.labels(y)
        return self.out(torch.nn.functional.silu(self.inp(x) + cond[:, :, None, None]))


@register_model
@dataclass(kw_only=True)
class TinyConfig(ModelConfig):
    LABEL: ClassVar[str] = "Tiny"

    width: int = option(16, check=at_least(1))  # channels of the hidden layer

    @classmethod
    def construct(cls, name, **kwargs):
        return TinyNet(**kwargs)

    def build_kwargs(self):
        return dict(super().build_kwargs(), width=self.width)


def test_a_kind_registered_outside_the_package_trains_resumes_and_samples(tmp_path):
    work = tmp_path / "run"
    args = [f"--working_dir={work}", "--model=Tiny", "--width=8", "--total_steps=2", "--batch_size=16"]
    args += ["--ckpt_saving_steps=1", "--eval_demo_steps=2", "--log_steps=1", "--warmup_steps=0"]
    assert train.main([*args, "--max_steps_this_run=1"]) == 0  # stops at step 1 with a checkpoint
    assert train.main(args) == 0  # resumes and finishes
    log = (work / "log.txt").read_text()
    assert "resumed from" in log and "at step 1" in log and "done at step 2" in log
    assert sorted(p.name for p in (work / "ckpts").glob("step_*")) == ["step_00000001", "step_00000002"]
    figs = work / "figs"
    assert (figs / "step_00000000_1step.png").is_file() and (figs / "step_00000002_2step.png").is_file()
    assert json.loads(json.dumps(build_config(None, str(work / "config.yaml")).model.to_dict()))["width"] == 8
    model, info = export.load_run_weights(work)
    assert isinstance(model, TinyNet) and info["step"] == 2


def test_the_built_in_kinds_and_readers_are_entries():
    assert {"DiT", "UNet", "MLP", "Tiny"} <= set(model_kinds())
    assert {"digits", "npz", "image_folder", "cifar10", "latents_h5"} <= set(dataset_names())
    assert isinstance(build_model("Tiny", input_size=8, in_channels=1, num_classes=3, width=4), TinyNet)
    mlp = ModelConfig.from_dict({"model": "MLP", "obs_size": 4, "action_dim": 2, "action_horizon": 8})
    assert mlp.sample_shape() == (8, 2) and mlp.condition() == ("obs", 4)
    assert mlp.build()(torch.zeros(3, 8, 2), torch.ones(3), torch.zeros(3), torch.zeros(3, 4)).shape == (3, 8, 2)
    with raises_naming(ValueError, "model.width", "Tiny", "model.model=DiT-T/2"):
        ModelConfig.from_dict({"model": "DiT-T/2", "width": 3})
    with raises_naming(ValueError, "model.num_classes", "model.model=MLP", "got 10"):
        ModelConfig.from_dict({"model": "MLP", "obs_size": 4, "num_classes": 10})


def test_a_reader_registered_outside_the_package_is_a_dataset(tmp_path):
    from soflow_fast.data import ArrayDataset, register_dataset

    @register_dataset
    @dataclass(kw_only=True)
    class OnesData(DataConfig):
        LABEL: ClassVar[str] = "ones"
        NEEDS_PATH: ClassVar[bool] = False

        count: int = option(5, check=at_least(1))  # how many images

        @classmethod
        def open(cls, path, *, image_size, conditional, count=5):
            return ArrayDataset(torch.ones(count, 1, 8, 8), torch.zeros(count, dtype=torch.long), num_classes=1)

    cfg = build_config("digits", None, ["--dataset=ones", "--count=7"])
    assert type(cfg.data) is OnesData and cfg.data.reader_kwargs() == {"count": 7}
    assert len(build_dataset("ones", count=3)) == 3
    with raises_naming(ValueError, "data.count", ">= 1", "got 0"):
        build_config("digits", None, ["--dataset=ones", "--count=0"])
