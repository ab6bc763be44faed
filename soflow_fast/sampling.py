"""One- and few-step sampling with a trained solution network.

Schedule t_i = 1 - i/N. The authors' multi-step sampler jumps to data at every step and
re-noises to the next time with fresh noise (``mode="renoise"``, the default); the chained
variant jumps t_i -> t_{i+1} with no fresh noise (``mode="chained"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

MODES = ("renoise", "chained")


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


@torch.no_grad()
def sample(
    model: nn.Module,
    objective,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    steps: int = 1,
    renoise: Sequence[torch.Tensor] | None = None,
    mode: str = "renoise",
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate x0 from noise in ``steps`` network calls (twice that with guidance_scale != 1).

    Args:
        model: the network F(x, t, s, y).
        objective: a ``SoFlowObjective`` (or anything with ``solution`` and ``alpha_beta``).
        noise: (B, *dims) standard normal at t = 1.
        y: (B,) labels or None (null label).
        steps: N >= 1.
        renoise: for mode "renoise", N - 1 noise tensors like ``noise``; drawn when None.
        mode: "renoise" (the authors') or "chained".
        generator: RNG for the re-noising draws.
        guidance_scale: extra inference-time guidance; 1.0 (default) is the trained-in guidance only.
    Returns:
        (B, *dims) samples at t = 0.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if renoise is not None and mode != "renoise":
        raise ValueError("renoise noise is only used with mode='renoise'")
    if renoise is not None and len(renoise) != steps - 1:
        raise ValueError(f"renoise must hold steps - 1 = {steps - 1} tensors, got {len(renoise)}")
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
            eps = (
                renoise[i]
                if renoise is not None
                else torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
            )
            if eps.shape != noise.shape:
                raise ValueError(f"renoise[{i}] has shape {tuple(eps.shape)}, expected {tuple(noise.shape)}")
            a, b, _, _ = objective.alpha_beta(full(times[i + 1]))
            x = a[0].to(x.dtype) * x + b[0].to(x.dtype) * eps
    return x
