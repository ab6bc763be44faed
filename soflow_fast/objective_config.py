"""``SoFlowConfig``: the SoFlow objective's hyper-parameters, under the authors' YAML key names.

Kept apart from ``soflow_fast.objective`` (which re-exports everything here) so that the objective
file holds the method only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from soflow_fast.config_fields import Section, at_least, finite, in_range, one_of, option

NOISING_TYPES = ("Linear", "Trig")
COEFFICIENT_TYPES = ("Euler", "Trig")
L_SCHEDULES = ("Const", "Linear", "Cosine", "Exponent")


@dataclass(kw_only=True)
class SoFlowConfig(Section):
    """Objective hyper-parameters; defaults are the authors' ImageNet 256 (DiT) settings."""

    SECTION: ClassVar[str] = "soflow"

    noising_type: str = option("Linear", check=one_of(*NOISING_TYPES))  # Linear: x_t = (1-t) x0 + t eps;
    # Trig: cos/sin(pi t / 2)
    coefficient_type: str = option("Euler", check=one_of(*COEFFICIENT_TYPES))  # Euler: f = x + (s-t) F;
    # Trig: f = cos x + sin F of pi/2 (s-t)
    velocity_loss_ratio: float = option(0.75, check=in_range(0, 1))  # share of each batch that trains the
    # flow-matching loss
    p: float = option(1.0, check=finite(at_least=0))  # adaptive weight exponent: w = 1 / (mse + eps)^p
    eps: float = option(0.01, check=finite(above=0))  # adaptive weight floor
    time_mean: tuple[float, float, float] = option((-0.2, -1.0, 0.2), check=finite())  # logit-normal means:
    # FM t, SCM s, SCM t
    time_std: tuple[float, float, float] = option((1.0, 0.8, 0.8), check=finite(above=0))  # logit-normal stds,
    # same order
    cfg_scale: float = option(3.0, check=finite(at_least=0))  # guidance scale baked in at training time; <= 1
    # turns guidance off
    mix_ratio: float = option(0.25, check=in_range(0, 1))  # share of the guided target kept; the rest is the
    # model's own prediction
    cfg_drop_rate: float = option(0.1, check=in_range(0, 1))  # probability that a sample sees the null label
    cfg_decay_time: float = option(0.8, check=finite(at_least=0))  # guidance fades out for t above this; >= 1
    # keeps it everywhere
    l_schedule: str = option("Exponent", check=one_of(*L_SCHEDULES))  # how the middle time l approaches t
    l_init_ratio: float = option(0.1, check=in_range(0, 1))  # r(0): (t - l) / (t - s) at the first step
    l_end_ratio: float = option(0.002, check=in_range(0, 1))  # r(K): at the last step
    total_steps: int = option(400_000, check=at_least(1))  # K in the l schedule

    def check(self) -> None:
        if self.l_schedule == "Exponent" and (self.l_init_ratio <= 0 or self.l_end_ratio <= 0):
            raise ValueError("soflow.l_init_ratio and l_end_ratio must be > 0 for l_schedule 'Exponent'")


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
