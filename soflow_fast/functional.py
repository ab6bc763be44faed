"""A functional surface over ``SoFlowObjective`` and ``sampling``, named after the Elixir/Axon binding.

The Elixir binding (``Edifice.Generative.SoFlow``) exposes SoFlow as free functions on action
chunks. These are the same entry points in PyTorch, each a thin wrapper: the math lives in
``soflow_fast.objective`` and ``soflow_fast.sampling``, nothing is re-derived here. ``config``
is a ``SoFlowConfig``, a dict of its fields, the name of a preset in
``soflow_fast.objective.PRESETS`` (where that table exists), or None for ``SoFlowConfig()``.

Conditioning is continuous: ``y`` carries observations (B, obs_size) or is None, and the
objective behind every function is built with ``num_classes=None``, so no label is dropped and
no guidance target is formed. For class-conditional guidance use ``SoFlowObjective`` directly.

Time conventions
----------------
The binding runs time the other way round: noise at 0, data at 1. Everything here (and every
argument of these functions) uses this package's convention, data at 0 and noise at 1. Writing
tau for the binding's time, the two meet at tau = 1 - t:

================================  ==================================  ==========================================
quantity                          binding (noise tau = 0, data 1)     here (data t = 0, noise 1)
================================  ==================================  ==========================================
current time                      tau                                 t = 1 - tau
target time                       sigma                               s = 1 - sigma; going toward data, s < t
noisy point                       (1 - tau) noise + tau data          (1 - t) data + t noise (the same point)
path velocity                     dx/dtau = data - noise              v = dx/dt = noise - data = -(dx/dtau)
second time embedder sees         the target time sigma               the interval t - s (= sigma - tau)
Euler jump                        x + (sigma - tau) F_b               x + (s - t) F; s - t = -(sigma - tau)
so the networks relate by         F_b(x, tau, sigma)                  F(x, t, s) = -F_b(x, 1 - t, 1 - s)
one step                          noise + F_b(noise, 0, 1)            f(noise, 1, 0) = noise - F(noise, 1, 0)
multi-step                        chained, tau_i = i / N              t_i = 1 - i / N; re-noising by default,
                                                                      ``mode="chained"`` is the binding's
================================  ==================================  ==========================================

The jump has the same form in both (start point plus elapsed time times F), but the elapsed time
changes sign, so the network output changes sign with it: a velocity that points toward the data
in the binding points toward the noise here. Two differences are not a change of variables: the
binding's consistency target comes from an EMA network and its loss is an unweighted MSE mixed as
lambda L_FM + (1 - lambda) L_SCM, while here the target comes from the same network under
no_grad, both terms carry the adaptive weight 1 / (mse + eps)^p, and the batch is split by
``velocity_loss_ratio``.

Argument order also differs in two places: the binding's ``interpolate(x_0, x_1, tau)`` takes the
noise first, ``interpolate(x0, noise, t)`` here takes the data first; its
``euler_parameterize(x_t, f_theta, t, s)`` takes the network output second, here it comes last.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from soflow_fast import objective as _objective_module
from soflow_fast import sampling
from soflow_fast.objective import SoFlowConfig, SoFlowObjective, _bcast
from soflow_fast.optim import lr_factor

__all__ = [
    "combined_loss",
    "consistency_loss",
    "euler_parameterize",
    "flow_matching_loss",
    "interpolate",
    "lr_scheduler",
    "multi_step_sample",
    "objective_for",
    "one_step_sample",
    "output_size",
    "recommended_defaults",
]

ConfigLike = SoFlowConfig | dict | str | None

DEFAULT_STEPS = 3000  # recommended_defaults()'s run length, as in the search that chose it


def objective_for(config: ConfigLike = None) -> SoFlowObjective:
    """The unguided ``SoFlowObjective`` behind every function here (``num_classes=None``)."""
    if config is None:
        cfg = SoFlowConfig()
    elif isinstance(config, SoFlowConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = SoFlowConfig.from_dict(config)
    elif isinstance(config, str):
        presets = getattr(_objective_module, "PRESETS", {})
        if config not in presets:
            known = ", ".join(sorted(presets)) or "none defined"
            raise ValueError(f"unknown SoFlow preset {config!r}; presets: {known}")
        cfg = presets[config]
    else:
        raise TypeError(f"config must be a SoFlowConfig, a dict, a preset name or None, got {type(config).__name__}")
    return SoFlowObjective(cfg, num_classes=None)


# ----------------------------------------------------------------------------------------------
# Path and parameterisation
# ----------------------------------------------------------------------------------------------


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, config: ConfigLike = None) -> torch.Tensor:
    """x_t = alpha(t) x0 + beta(t) noise ((1 - t) x0 + t noise for the Linear path); t: (B,), 1 is noise."""
    return objective_for(config).interpolate(x0, noise, t)[0]


def euler_parameterize(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """f(x_t, t, s) = x_t + (s - t) F, the Euler solution from network output F; t, s: (B,)."""
    a, b = objective_for(SoFlowConfig(coefficient_type="Euler")).coefficients(t, s)
    return _bcast(a, x_t) * x_t + _bcast(b, x_t) * F


# ----------------------------------------------------------------------------------------------
# Losses: each returns (loss, logs), logs 0-dim tensors
# ----------------------------------------------------------------------------------------------


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    config: ConfigLike = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adaptive-weighted flow-matching loss at times t (B,); logs fm_mse (mean delta^2), fm_weight."""
    loss, mse, w = objective_for(config).velocity_loss(model, x0, noise, t, y)
    return loss, {"fm_loss": loss.detach(), "fm_mse": mse, "fm_weight": w}


def consistency_loss(
    model: nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    l: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor | None = None,
    config: ConfigLike = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Solution-consistency surrogate at times t > l > s (each (B,)); logs scm_mse (mean dq^2), scm_weight.

    The value is a surrogate whose gradient is the weighted consistency gradient, not an error to
    read; watch ``scm_mse``.
    """
    loss, mse, w = objective_for(config).consistency_loss(model, x0, noise, t, l, s, y)
    return loss, {"scm_loss": loss.detach(), "scm_mse": mse, "scm_weight": w}


def combined_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    step: int = 0,
    config: ConfigLike = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full training loss of one batch: noise and times drawn inside, ``step`` drives the l schedule."""
    return objective_for(config).loss(model, x0, y, step=step, generator=generator)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def one_step_sample(
    model: nn.Module, noise: torch.Tensor, y: torch.Tensor | None = None, config: ConfigLike = None
) -> torch.Tensor:
    """x0 = f(noise, 1, 0 | y): one network call."""
    return sampling.sample(model, objective_for(config), noise, y=y, steps=1)


def multi_step_sample(
    model: nn.Module,
    noise: torch.Tensor,
    steps: int,
    y: torch.Tensor | None = None,
    config: ConfigLike = None,
    generator: torch.Generator | None = None,
    mode: str = "renoise",
) -> torch.Tensor:
    """``steps`` network calls; mode "renoise" (the authors', fresh noise from ``generator``) or
    "chained" (f(x, t_i, t_(i+1)) with no fresh noise, the binding's multi-step)."""
    return sampling.sample(model, objective_for(config), noise, y=y, steps=steps, mode=mode, generator=generator)


# ----------------------------------------------------------------------------------------------
# Sizes and defaults
# ----------------------------------------------------------------------------------------------


def output_size(action_dim: int, action_horizon: int) -> int:
    """Numbers per generated chunk: action_horizon * action_dim."""
    return action_dim * action_horizon


def recommended_defaults(steps: int = DEFAULT_STEPS) -> dict[str, dict]:
    """The low-dimensional recipe (action chunks, 2-D data, small MLPs) for a run of ``steps`` steps.

    The objective is ``objective.PRESETS["toy"]``; the training is Adam at 3e-3 (betas 0.9, 0.999),
    batch 1024, a linear warm-up of the learning rate over the first tenth of the steps, then a cosine
    decay to zero. Both were chosen by a multi-seed search over seven data sets and two networks
    (``docs/compare/recipe/``). Batch 256 costs a quarter of the rows; it is worse on rings and spiral
    and, within a spread, a little better on the two sets held out of the choice. The warm-up is part
    of the recipe: at 3e-3 from the first step a network 256 wide can collapse to F = 0, whose one-step
    samples are their own noise. Wider networks may want a lower rate, which is not built in: on an MLP
    512 wide with 3 blocks the recipe (at batch 256) collapsed in 3 of 21 runs and half the rate in
    none, but on one 768 wide with 2 blocks (two other data sets) 3e-3, 1.5e-3 and 1e-3 tied and none
    collapsed.

    Returns:
        ``model``: ``SoFlowMLP`` keyword arguments besides obs_size and action_dim;
        ``objective``: ``SoFlowConfig`` fields, ``total_steps`` equal to ``steps`` (the l schedule spans
        the run);
        ``training``: Adam learning rate and betas, ``lr_schedule``, ``warmup_steps``, batch size and
        ``steps``; ``lr_scheduler(optimizer, training)`` builds the schedule.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise ValueError(f"steps must be an integer >= 10 (the warm-up is a tenth of them), got {steps!r}")
    fields = dataclasses.asdict(dataclasses.replace(_objective_module.PRESETS["toy"], total_steps=steps))
    return {
        "model": {"action_horizon": 8, "hidden_size": 256, "num_layers": 4},
        "objective": fields,
        "training": {
            "lr": 3e-3,
            "betas": (0.9, 0.999),
            "lr_schedule": "cosine",
            "warmup_steps": steps // 10,
            "batch_size": 1024,
            "steps": steps,
        },
    }


def lr_scheduler(optimizer: torch.optim.Optimizer, training: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``recommended_defaults()["training"]`` on ``optimizer``: a linear
    warm-up over ``warmup_steps``, then a cosine to zero at ``steps`` ("cosine") or flat ("constant").
    Call its ``step()`` once after each optimiser step."""
    missing = [k for k in ("steps", "lr_schedule", "warmup_steps") if k not in training]
    if missing:
        raise KeyError(f"training settings lack {', '.join(missing)} (see recommended_defaults()['training'])")
    steps = training["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"training steps must be a positive integer, got {steps!r}")
    if training["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {training['lr_schedule']!r}")
    schedule, warmup = training["lr_schedule"], training["warmup_steps"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, steps, schedule, warmup))
