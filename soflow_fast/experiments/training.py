"""The three methods of the comparison (their objectives and samplers), and the training and scoring
loop they share: the same network, optimiser, schedule and data stream for each."""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from torch import nn

from soflow_fast import meanflow, objective, sampling
from soflow_fast.experiments.tasks import Budget, Task
from soflow_fast.optim import lr_factor

METHODS = ("soflow", "meanflow", "fm")
EVAL_NFE = {"soflow": (1, 2, 4, 8), "meanflow": (1, 2), "fm": (1, 2, 10, 50)}


def make_objective(
    method: str, steps: int, soflow_overrides: dict | None = None, meanflow_overrides: dict | None = None
):
    """The objective of ``method`` for a run of ``steps`` steps (the l schedule spans the run)."""
    if method == "soflow":
        cfg = dataclasses.replace(objective.PRESETS["toy"], total_steps=steps, **(soflow_overrides or {}))
        return objective.SoFlowObjective(cfg, num_classes=None)
    if method == "fm":
        cfg = dataclasses.replace(objective.PRESETS["toy"], total_steps=steps, velocity_loss_ratio=1.0, p=0.0)
        return objective.SoFlowObjective(cfg, num_classes=None)
    if method == "meanflow":
        cfg = dataclasses.replace(meanflow.PRESETS["toy"], **(meanflow_overrides or {}))
        return meanflow.MeanFlowObjective(cfg, num_classes=None)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@torch.no_grad()
def generate(
    method: str, model: nn.Module, obj, noise: torch.Tensor, y, nfe: int, generator, mode: str | None = None
) -> torch.Tensor:
    """Samples with ``nfe`` network calls. ``mode``: the SoFlow sampler ("renoise", the default, or
    "chained"; MeanFlow always chains); flow matching takes Euler steps."""
    if method == "fm":
        x = noise
        for i in range(nfe):
            t = torch.full((noise.shape[0],), 1.0 - i / nfe)
            s = torch.full_like(t, 1.0 - (i + 1) / nfe)
            x = x + (s - t).view(-1, *([1] * (x.dim() - 1))) * obj.velocity(model, x, t, y)
        return x
    mode = (mode or "renoise") if method == "soflow" else "chained"
    return sampling.sample(model, obj, noise, y=y, steps=nfe, mode=mode, generator=generator)


def train(
    method: str,
    task: Task,
    budget: Budget,
    obj,
    log_every: int = 0,
    label: str = "",
    lr_schedule: str = "cosine",
    ema_decay: float | None = None,
    init: nn.Module | None = None,
    warmup_steps: int = 0,
) -> tuple[nn.Module, dict]:
    """Train a fresh network; returns it in eval mode (its EMA weights with ``ema_decay``) and a summary
    (losses, seconds). ``lr_schedule``: "cosine" (to zero over the run) or "constant", after a linear
    warm-up over the first ``warmup_steps``; ``init``: a network of the same shape whose weights it
    starts from (a teacher's, for a warm start)."""
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be cosine or constant, got {lr_schedule!r}")
    if not 0 <= warmup_steps < budget.steps:
        raise ValueError(f"warmup_steps must be in [0, steps), got {warmup_steps}")
    torch.manual_seed(budget.seed)  # the same initial weights for every method
    model = task.make_model(budget)
    if init is not None:
        model.load_state_dict(init.state_dict())
    ema = None if ema_decay is None else [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=budget.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, budget.steps, lr_schedule, warmup_steps))
    data_g = torch.Generator().manual_seed(budget.seed + 1)  # the same data stream for every method
    draw_g = torch.Generator().manual_seed(budget.seed + 2)
    losses = []
    start = time.perf_counter()
    for step in range(budget.steps):
        x0, y = task.draw(budget.batch, data_g)
        loss, _ = obj.loss(model, x0, y, step=step, generator=draw_g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label or method}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if budget.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - ema_decay)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            rate = (step + 1) / (time.perf_counter() - start)
            print(
                f"  [{label or method}] step {step + 1}/{budget.steps} loss {recent:.4f} ({rate:.0f} steps/s)",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - start
    tail = losses[-max(1, budget.steps // 10) :]
    if ema is not None:
        with torch.no_grad():
            for p, avg in zip(model.parameters(), ema, strict=True):
                p.copy_(avg)
    return model.eval(), {"train_seconds": round(seconds, 1), "final_loss": sum(tail) / len(tail)}


def evaluate(
    method: str, model: nn.Module, obj, task: Task, budget: Budget, nfes, mode: str | None = None
) -> tuple[dict, dict]:
    """Scores per NFE (with the sampler ``mode``, see ``generate``), and the samples (for the plots)."""
    g = torch.Generator().manual_seed(budget.seed + 100)
    reference, _ = task.draw(budget.eval_samples, g)
    _, y = task.draw(budget.eval_samples, g)  # conditions for the generated set (same law as the data)
    noise = torch.randn(reference.shape, generator=g)
    scores, samples = {}, {}
    for nfe in nfes:
        out = generate(method, model, obj, noise, y, nfe, torch.Generator().manual_seed(budget.seed + 200), mode)
        scores[nfe] = task.score(out, y, reference)
        samples[nfe] = out
    noise_score = task.score(noise, y, reference)
    return {"scores": scores, "noise": noise_score}, {"samples": samples, "reference": reference, "y": y}
