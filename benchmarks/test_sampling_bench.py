"""Sampling throughput: SoFlow's one network call against a 50-step flow-matching Euler sampler.

    pytest benchmarks/test_sampling_bench.py --benchmark-only

Both samplers drive the same network. The Euler baseline reads the velocity the way a
flow-matching model would (s = t, v = F under the Euler parameterisation) and takes 50 uniform
steps from t = 1 to t = 0; the one-step sampler is ``soflow_fast.sampling.sample(steps=1)``.
On CUDA the network runs under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from benchmarks._util import CPU_CASES, GPU_CASES, CpuMeter, randomize_zero_init
from soflow_fast.models import build_model
from soflow_fast.objective import SoFlowObjective
from soflow_fast.sampling import sample

EULER_STEPS = 50
SAMPLERS = {"soflow-1step": 1, f"fm-euler-{EULER_STEPS}": EULER_STEPS}  # name -> network calls
# Seconds of timed sampling per case; a 50-call round of DiT-S/4 at batch 64 takes ~20 s on two cores,
# so it gets one round (its 50 calls average among themselves), the one-call sampler up to ten.
TIME_BUDGET_S = 8.0
# the largest CPU training size is also the sampling size that matters; T/2 at batch 16 adds nothing
CASES = [c for c in CPU_CASES if c.batch == 64] + GPU_CASES


@torch.no_grad()
def euler_flow_matching(model, noise: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """x <- x + (t_next - t) F(x, t, t | y) on t_i = 1 - i / steps: plain flow-matching sampling."""
    x = noise
    B = noise.shape[0]
    for i in range(steps):
        t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
        tt = torch.full((B,), t, device=noise.device)
        x = x + (t_next - t) * model(x, tt, tt, y)
    return x


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampling(benchmark, sampler, case):
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU size: needs CUDA")
    device = torch.device(case.device)
    torch.manual_seed(0)
    model = (
        build_model(case.model, input_size=case.input_size, in_channels=case.in_channels, num_classes=case.num_classes)
        .to(device)
        .eval()
    )
    randomize_zero_init(model)
    objective = SoFlowObjective(num_classes=case.num_classes)
    g = torch.Generator(device).manual_seed(1)
    noise = torch.randn(case.batch, case.in_channels, case.input_size, case.input_size, generator=g, device=device)
    y = torch.randint(0, case.num_classes, (case.batch,), generator=g, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    nfe = SAMPLERS[sampler]

    def forward_s() -> float:
        """Seconds of one network call, after one call that pays for first-use allocations."""
        tt = torch.ones(case.batch, device=device)
        for _ in range(2):
            start = time.perf_counter()
            with torch.no_grad(), autocast:
                model(noise, tt, tt, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    def run():
        with autocast:
            if nfe == 1:
                out = sample(model, objective, noise, y, steps=1)
            else:
                out = euler_flow_matching(model, noise, y, EULER_STEPS)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"sampling {case.id}"
    with CpuMeter() as cpu:
        rounds = int(min(10, max(1, TIME_BUDGET_S // (nfe * forward_s()))))
        out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)

    assert out.shape == noise.shape
    assert torch.isfinite(out).all()
    # a trivial network would hand the noise back; this one must have moved it
    assert (out.float() - noise).abs().mean() > 1e-3
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        sampler=sampler,
        case=case.id,
        model=case.model,
        input=f"{case.in_channels}x{case.input_size}x{case.input_size}",
        batch=case.batch,
        nfe=nfe,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        images_per_s=round(case.batch / median, 2),
        ms_per_batch=round(median * 1e3, 3),
        **cpu.info(),
    )
