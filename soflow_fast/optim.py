"""The optimiser and its learning-rate schedule: config, construction, and the settings a resume applies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from soflow_fast.config_fields import Section, at_least, finite, in_range, one_of, option


def lr_factor(step: int, steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """The learning rate at ``step`` over the base rate: a linear warm-up over ``warmup_steps``, times
    a cosine from 1 to 0 over ``steps`` ("cosine") or 1 ("constant")."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


@dataclass(kw_only=True)
class OptimConfig(Section):
    """The optimiser; a resume takes every one of these from the config, keeping the saved moments."""

    SECTION: ClassVar[str] = "optim"

    optimizer: str = option("AdamW", check=one_of("AdamW", "Adam", "RAdam"))
    lr: float = option(1e-4, check=finite(above=0), resume_safe=True)
    betas: tuple[float, float] = option((0.9, 0.99), check=in_range(0, 1, open_high=True), resume_safe=True)
    weight_decay: float = option(0.0, check=at_least(0), resume_safe=True)
    adam_eps: float = option(1e-8, check=finite(above=0), resume_safe=True)
    grad_clip: float = option(0.0, check=at_least(0), resume_safe=True)  # max global grad norm; 0 = off
    warmup_steps: int = option(0, check=at_least(0), resume_safe=True)  # linear learning-rate warm-up

    def build(self, params, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
        """The optimiser over ``params``: fused Adam(W) on CUDA (one kernel for all parameters), foreach on
        CPU. ``capturable`` keeps its step counts on the device, so that a CUDA graph can hold the step."""
        kw = dict(lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.adam_eps)
        if capturable:
            kw["capturable"] = True
        if self.optimizer == "RAdam":
            return torch.optim.RAdam(params, foreach=True, **kw)
        cls = torch.optim.AdamW if self.optimizer == "AdamW" else torch.optim.Adam
        return cls(params, fused=True, **kw) if device.type == "cuda" else cls(params, foreach=True, **kw)

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up over ``warmup_steps``, then constant."""
        warm = self.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)

    def apply(self, optimizer: torch.optim.Optimizer, scheduler) -> list[str]:
        """Put this config's settings into a loaded optimiser and schedule; returns what changed.

        Loading a checkpoint brings back the saved lr, betas, weight decay and eps: a resume that changes
        them in the config runs with the new ones (the moments and the step count are kept).
        """
        want = {"betas": tuple(self.betas), "weight_decay": self.weight_decay, "eps": self.adam_eps}
        changed = []
        if any(base != self.lr for base in scheduler.base_lrs):
            changed.append(f"lr {scheduler.base_lrs[0]:g} -> {self.lr:g}")
        scheduler.base_lrs = [self.lr] * len(optimizer.param_groups)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * factor
            for key, value in want.items():
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changed.append(f"{key} {old} -> {value}")
                group[key] = value
        keep_optimizer_impl(optimizer)
        return list(dict.fromkeys(changed))


def keep_optimizer_impl(optimizer: torch.optim.Optimizer) -> None:
    """After loading a state dict, the optimiser runs as this process built it.

    Loading replaces the param groups with the saved ones, implementation flags included: a CPU run's
    checkpoint (foreach) would resume on CUDA without the fused kernel, and one saved without
    ``parallel.cuda_graphs=step`` would fail that route's capture (capturable False). The flags go back to
    the optimiser's own, and the step counts to where they want them: on the parameter's device for a
    fused or capturable optimiser, on the host otherwise (a device step count would cost a sync a step).
    """
    flags = {
        k: optimizer.defaults[k]
        for k in ("foreach", "fused", "capturable", "differentiable")
        if k in optimizer.defaults
    }
    for group in optimizer.param_groups:
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)
