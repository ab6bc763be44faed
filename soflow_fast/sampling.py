"""One- and few-step sampling with a trained solution network, and ODE sampling of a velocity.

Schedule t_i = 1 - i/N. The authors' multi-step sampler jumps to data at every step and
re-noises to the next time with fresh noise (``mode="renoise"``, the default); the chained
variant jumps t_i -> t_{i+1} with no fresh noise (``mode="chained"``).

A flow-matching model (``run.objective=fm``) is sampled by integrating its velocity
v(x, t) = d/ds f(x, t, s) at s = t (F(x, t, t) with Euler coefficients) from t = 1 to 0 (``mode="euler"`` or
``"heun"``). ``steps`` then counts network calls (NFE): Euler takes N uniform steps; Heun takes ceil(N/2)
uniform steps of two calls each, except that with N odd the last step is a single Euler call (as EDM's
sampler ends), so N = 1 is one Euler step and N = 4 two Heun steps. An objective names its default
mode (``default_sampler``; "renoise" when it names none).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

MODES = ("renoise", "chained")
SOLVERS = ("euler", "heun")  # ODE modes: integrate the velocity; steps = network calls


def integrate(field, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, steps: int, solver: str = "heun",
              v0: torch.Tensor | None = None, last_euler: bool = False) -> torch.Tensor:  # fmt: skip
    """x at time s from x at time t along dx/dtau = field(x, tau), in ``steps`` uniform steps per row.

    Args:
        field: (x, tau) -> velocity, tau of shape (B,).
        t, s: (B,) start and end times (any order); the steps' times are lerp(t, s, k / steps), s exactly at the end.
        solver: "euler" (one call per step) or "heun" (the trapezoid of the velocities at both ends of an
            Euler step: two calls per step).
        v0: field(x, t), when the caller has it already (the first step then skips that call).
        last_euler: the last step is a plain Euler step (one call).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    for k in range(steps):
        a, b = torch.lerp(t, s, k / steps), torch.lerp(t, s, (k + 1) / steps)
        h = (b - a).to(x.dtype).reshape(shape)
        v = v0 if k == 0 and v0 is not None else field(x, a)
        x_euler = x + h * v
        if solver == "euler" or (last_euler and k == steps - 1):
            x = x_euler
        else:
            x = x + h * 0.5 * (v + field(x_euler, b))
    return x


def default_mode(objective) -> str:
    """The sampler an objective's models take by default: its ``default_sampler``, else "renoise"."""
    return getattr(objective, "default_sampler", "renoise")


def _sample_ode(model, objective, noise: torch.Tensor, y, nfe: int, solver: str, guidance_scale: float):
    """x0 from noise along the model's velocity, in ``nfe`` network calls (twice that with guidance)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0 or y is None:
            return objective.velocity(model, x, t, y)
        null = torch.full_like(y, objective.num_classes)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return objective.velocity_from_network(x, t, uncond + guidance_scale * (cond - uncond))

    B = noise.shape[0]
    one, zero = (torch.full((B,), v, device=noise.device, dtype=torch.float32) for v in (1.0, 0.0))
    if solver == "euler":
        return integrate(velocity, noise, one, zero, nfe, "euler")
    return integrate(velocity, noise, one, zero, (nfe + 1) // 2, "heun", last_euler=nfe % 2 == 1)


def _guided_solution(model, objective, x, t, s, y, guidance_scale: float):
    """f(x, t, s | y), optionally with inference-time guidance on top of the trained-in one."""
    if guidance_scale == 1.0 or y is None:
        return objective.solution(model, x, t, s, y)
    null = torch.full_like(y, objective.num_classes)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    net = uncond + guidance_scale * (cond - uncond)
    a, b = objective.coefficients(t, s)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return a.to(x.dtype).reshape(shape) * x + b.to(x.dtype).reshape(shape) * net


def _check_labels(objective, y: torch.Tensor | None, batch: int, guidance_scale: float) -> None:
    """Labels are user input here: one clear error instead of an index error (or, on CUDA, a
    device-side assert) deep in the embedding."""
    if y is None:
        return
    num_classes = getattr(objective, "num_classes", None)
    if num_classes is None:
        # no class labels: y, if given, is whatever conditioning the model takes (the toy MLPs'
        # observation vectors, say), passed through unchecked
        if guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale:g} needs a class-conditional objective (num_classes set): "
                "guidance contrasts a label with the null label"
            )
        return
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != (batch,):
        raise ValueError(f"y must be an integer tensor of shape ({batch},) (one label per noise sample) or None")
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high > num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} is out of range: labels are 0..{num_classes - 1}, and {num_classes} is the null label"
            )


@torch.no_grad()
def sample(
    model: nn.Module,
    objective,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    steps: int = 1,
    renoise: Sequence[torch.Tensor] | None = None,
    mode: str | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate x0 from noise in ``steps`` network calls (twice that with guidance_scale != 1).

    Args:
        model: the network F(x, t, s, y).
        objective: a ``SoFlowObjective`` (or anything with ``solution`` and ``alpha_beta``).
        noise: (B, *dims) standard normal at t = 1.
        y: (B,) integer labels or None (null label); the null label itself is ``objective.num_classes``.
        steps: N >= 1.
        renoise: for mode "renoise", N - 1 noise tensors like ``noise``; drawn when None.
        mode: "renoise" (the authors') or "chained"; "euler" or "heun" integrate the velocity (a flow-matching
            model's; ``steps`` network calls, see the module docstring). None: the objective's
            ``default_sampler``, else "renoise".
        generator: RNG for the re-noising draws.
        guidance_scale: extra inference-time guidance; 1.0 (default) is the trained-in guidance only.
            It needs labels: with ``y=None`` every row is already the null label and it has no effect.
    Returns:
        (B, *dims) samples at t = 0.
    """
    if mode is None:
        mode = default_mode(objective)
    if mode not in MODES + SOLVERS:
        raise ValueError(f"mode must be one of {', '.join(MODES + SOLVERS)}; got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if not (isinstance(noise, torch.Tensor) and noise.is_floating_point() and noise.dim() >= 1):
        raise ValueError("noise must be a floating-point tensor (B, *dims)")
    _check_labels(objective, y, noise.shape[0], guidance_scale)
    if renoise is not None and mode != "renoise":
        raise ValueError("renoise noise is only used with mode='renoise'")
    if renoise is not None and len(renoise) != steps - 1:
        raise ValueError(f"renoise must hold steps - 1 = {steps - 1} tensors, got {len(renoise)}")
    if mode in SOLVERS:
        return _sample_ode(model, objective, noise, y, steps, mode, guidance_scale)

    def draw(i: int) -> torch.Tensor:
        if renoise is None:
            return torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
        if renoise[i].shape != noise.shape:
            raise ValueError(f"renoise[{i}] has shape {tuple(renoise[i].shape)}, expected {tuple(noise.shape)}")
        return renoise[i]

    return sample_steps(model, objective, noise, y, steps, mode, draw, guidance_scale)


def sample_steps(
    model: nn.Module,
    objective,
    noise: torch.Tensor,
    y: torch.Tensor | None,
    steps: int,
    mode: str,
    renoise_at: Callable[[int], torch.Tensor] | None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """``sample``'s arithmetic with no checks and no RNG of its own: ``renoise_at(i)`` is the noise that
    re-noises after step i (mode "renoise", i < steps - 1). The packaged sampler
    (``soflow_fast.shipping``) traces this function, so the shipped file computes what ``sample`` does.
    Modes "renoise" and "chained" only: the ODE solvers ("euler", "heun") are not shipped."""
    B = noise.shape[0]
    times = [1.0 - i / steps for i in range(steps + 1)]
    full = lambda v: torch.full((B,), v, device=noise.device, dtype=torch.float32)
    x = noise
    for i in range(steps):
        t = full(times[i])
        if mode == "chained":
            x = _guided_solution(model, objective, x, t, full(times[i + 1]), y, guidance_scale)
            continue
        x = _guided_solution(model, objective, x, t, full(0.0), y, guidance_scale)
        if i < steps - 1:
            eps = renoise_at(i)
            a, b, _, _ = objective.alpha_beta(full(times[i + 1]))
            x = a[0].to(x.dtype) * x + b[0].to(x.dtype) * eps
    return x
