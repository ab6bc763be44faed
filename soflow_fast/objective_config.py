"""``SoFlowConfig``: the SoFlow objective's hyper-parameters, under the authors' YAML key names.

Kept apart from ``soflow_fast.objective`` (which re-exports everything here) so that the objective
file holds the method only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

NOISING_TYPES = ("Linear", "Trig")
COEFFICIENT_TYPES = ("Euler", "Trig")
L_SCHEDULES = ("Const", "Linear", "Cosine", "Exponent")


@dataclass(kw_only=True)
class SoFlowConfig:
    """Objective hyper-parameters; defaults are the authors' ImageNet 256 (DiT) settings."""

    noising_type: str = "Linear"  # Linear: x_t = (1-t) x0 + t eps; Trig: cos/sin(pi t / 2)
    coefficient_type: str = "Euler"  # Euler: f = x + (s-t) F; Trig: f = cos x + sin F of pi/2 (s-t)
    velocity_loss_ratio: float = 0.75  # share of each batch that trains the flow-matching loss
    p: float = 1.0  # adaptive weight exponent: w = 1 / (mse + eps)^p
    eps: float = 0.01  # adaptive weight floor
    time_mean: tuple[float, float, float] = (-0.2, -1.0, 0.2)  # logit-normal means: FM t, SCM s, SCM t
    time_std: tuple[float, float, float] = (1.0, 0.8, 0.8)  # logit-normal stds, same order
    cfg_scale: float = 3.0  # guidance scale baked in at training time; <= 1 turns guidance off
    mix_ratio: float = 0.25  # share of the guided target kept; the rest is the model's own prediction
    cfg_drop_rate: float = 0.1  # probability that a sample sees the null label
    cfg_decay_time: float = 0.8  # guidance fades out for t above this; >= 1 keeps it everywhere
    l_schedule: str = "Exponent"  # how the middle time l approaches t over training
    l_init_ratio: float = 0.1  # r(0): (t - l) / (t - s) at the first step
    l_end_ratio: float = 0.002  # r(K): at the last step
    total_steps: int = 400_000  # K in the l schedule

    def __post_init__(self) -> None:
        self.time_mean = tuple(float(v) for v in self.time_mean)
        self.time_std = tuple(float(v) for v in self.time_std)
        _check_choice("noising_type", self.noising_type, NOISING_TYPES)
        _check_choice("coefficient_type", self.coefficient_type, COEFFICIENT_TYPES)
        _check_choice("l_schedule", self.l_schedule, L_SCHEDULES)
        if len(self.time_mean) != 3:
            raise ValueError(f"time_mean must have 3 entries (FM t, SCM s, SCM t), got {len(self.time_mean)}")
        if len(self.time_std) != 3:
            raise ValueError(f"time_std must have 3 entries (FM t, SCM s, SCM t), got {len(self.time_std)}")
        if any(not (v > 0 and math.isfinite(v)) for v in self.time_std):
            raise ValueError(f"time_std entries must be finite and > 0, got {self.time_std}")
        if any(not math.isfinite(v) for v in self.time_mean):
            raise ValueError(f"time_mean entries must be finite, got {self.time_mean}")
        _check_range("velocity_loss_ratio", self.velocity_loss_ratio, 0.0, 1.0)
        _check_range("mix_ratio", self.mix_ratio, 0.0, 1.0)
        _check_range("cfg_drop_rate", self.cfg_drop_rate, 0.0, 1.0)
        if not (self.p >= 0 and math.isfinite(self.p)):
            raise ValueError(f"p must be finite and >= 0, got {self.p}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be finite and > 0, got {self.eps}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be finite and >= 0, got {self.cfg_scale}")
        if not (self.cfg_decay_time >= 0 and math.isfinite(self.cfg_decay_time)):
            raise ValueError(f"cfg_decay_time must be finite and >= 0, got {self.cfg_decay_time}")
        for name in ("l_init_ratio", "l_end_ratio"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        if self.l_schedule == "Exponent" and (self.l_init_ratio <= 0 or self.l_end_ratio <= 0):
            raise ValueError("l_init_ratio and l_end_ratio must be > 0 for l_schedule 'Exponent'")
        if int(self.total_steps) != self.total_steps or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps}")

    @classmethod
    def from_dict(cls, d: dict) -> SoFlowConfig:
        """Build from a mapping with the authors' key names; an unknown key is an error naming it."""
        return config_from_dict(cls, d)


def config_from_dict(cls, d: dict):
    """``cls(**d)`` for a dataclass, with an unknown key reported by name instead of a TypeError."""
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            raise ValueError(f"unknown {cls.__name__} key {key!r}; known keys: {', '.join(sorted(known))}")
    return cls(**d)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


# Named objective settings. Shared instances: take a copy (dataclasses.replace) before changing a
# field. "imagenet" is the authors' DiT setting (the defaults); "toy" is for low-dimensional data
# (2-D sets, action chunks, 64-pixel digits with an MLP), chosen by the search and ablation that
# `python -m soflow_fast.experiments.compare` runs (see docs/compare/README.md): no guidance (the
# conditions there are continuous), the rest at the authors' values, which the ablation left
# within noise. Train with a decaying learning rate (cosine, lr 3e-3 for Adam on a 256-wide MLP);
# set total_steps to the run length so the l schedule spans it.
PRESETS: dict[str, SoFlowConfig] = {
    "imagenet": SoFlowConfig(),
    "toy": SoFlowConfig(
        cfg_scale=1.0,
        p=0.5,
        eps=0.1,
        velocity_loss_ratio=0.25,
        time_mean=(-0.2, -2.0, 1.0),
        total_steps=2000,
    ),
}
