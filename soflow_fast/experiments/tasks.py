"""The comparison's tasks: the budget every method gets alike, and per data set the training draws,
the network and the scores against reference draws."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from soflow_fast.data.toy import TOY_DATASETS, ActionChunkTask, sample_toy
from soflow_fast.eval import metrics
from soflow_fast.models.mlp import SoFlowMLP

DATASETS = (*TOY_DATASETS, "actions", "digits")


@dataclass
class Budget:
    """What every method gets alike."""

    steps: int = 2000
    batch: int = 256
    lr: float = 3e-3
    hidden: int = 256
    layers: int = 4
    seed: int = 0
    eval_samples: int = 4000
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "hidden", "eval_samples"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(self.layers) != self.layers or self.layers < 0:
            raise ValueError(f"layers must be an integer >= 0, got {self.layers!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")


@dataclass
class Task:
    name: str
    draw: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]  # (x, y)
    make_model: Callable[[Budget], nn.Module]
    score: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], dict]  # (samples, y, reference)
    primary: str  # the metric the tables and the chart lead with (lower is better)


def _distances(samples: torch.Tensor, reference: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "energy": metrics.energy_distance(samples, reference),
        "sw2": metrics.sliced_wasserstein2(samples, reference, generator=g),
        "mmd": metrics.mmd_rbf(samples, reference),
    }


def _toy_task(name: str) -> Task:
    def draw(n, g):
        return sample_toy(name, n, g), None

    def make_model(b: Budget):
        return SoFlowMLP(0, 2, action_horizon=1, hidden_size=b.hidden, num_layers=b.layers)

    return Task(name, draw, make_model, lambda s, y, ref: _distances(s, ref), "sw2")


def _actions_task() -> Task:
    task = ActionChunkTask()

    def draw(n, g):
        actions, obs, _ = task.sample(n, g)
        return actions, obs

    def make_model(b: Budget):
        return SoFlowMLP(task.obs_size, task.action_dim, task.horizon, hidden_size=b.hidden, num_layers=b.layers)

    def score(samples, obs, reference):
        out = _distances(samples, reference)
        cov = task.coverage(samples, obs)
        out["off_mode"] = float(cov["off_mode"])
        out["mode_fractions"] = [round(float(v), 4) for v in cov["fractions"]]
        out["mode_weights"] = [round(float(v), 4) for v in cov["weights"]]
        return out

    return Task("actions", draw, make_model, score, "off_mode")


def _digits_task() -> Task:
    from soflow_fast.data.datasets import load_digits

    data = load_digits()
    images = data.images.float().reshape(len(data), -1)  # (1797, 64), the training scale
    labels = data.labels.long()
    eye = torch.eye(10)

    def draw(n, g):
        idx = torch.randint(0, len(images), (n,), generator=g)
        return images[idx], eye[labels[idx]]

    def make_model(b: Budget):
        return SoFlowMLP(10, 64, action_horizon=1, hidden_size=b.hidden, num_layers=b.layers)

    def score(samples, y, reference):
        imgs = samples.reshape(-1, 1, 8, 8)
        ref = reference.reshape(-1, 1, 8, 8)
        return {
            "frechet_digits": metrics.frechet_digits_distance(imgs, ref),
            "label_accuracy": metrics.digits_label_accuracy(imgs, y.argmax(dim=1)),
            "energy": metrics.energy_distance(samples, reference),
        }

    # 64-pixel vectors through the same MLP, the one-hot label as the observation
    return Task("digits", draw, make_model, score, "frechet_digits")


def build_task(name: str) -> Task:
    if name in TOY_DATASETS:
        return _toy_task(name)
    if name == "actions":
        return _actions_task()
    if name == "digits":
        return _digits_task()
    raise ValueError(f"unknown data {name!r}; choose from {', '.join(DATASETS)}")
