"""1- and N-step sampling: shapes, determinism, modes, argument errors."""

from __future__ import annotations

import pytest
import torch

from soflow_fast.models import DiT
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from tests.utils import raises_naming


@pytest.fixture
def setup():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m, SoFlowObjective(SoFlowConfig(), num_classes=10), torch.randn(5, 1, 8, 8), torch.arange(5)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("mode", ["renoise", "chained"])
def test_shapes_and_determinism(setup, steps, mode):
    m, obj, noise, y = setup
    a = sample(m, obj, noise, y, steps=steps, mode=mode, generator=torch.Generator().manual_seed(1))
    b = sample(m, obj, noise, y, steps=steps, mode=mode, generator=torch.Generator().manual_seed(1))
    assert a.shape == noise.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_one_step_is_one_jump(setup):
    m, obj, noise, y = setup
    expected = obj.solution(m, noise, torch.ones(5), torch.zeros(5), y)
    torch.testing.assert_close(sample(m, obj, noise, y, steps=1), expected, rtol=0, atol=0)


def test_two_step_renoise_by_hand(setup):
    m, obj, noise, y = setup
    eps = torch.randn_like(noise)
    x = obj.solution(m, noise, torch.ones(5), torch.zeros(5), y)
    x = 0.5 * x + 0.5 * eps  # Linear noising at t = 0.5
    x = obj.solution(m, x, torch.full((5,), 0.5), torch.zeros(5), y)
    torch.testing.assert_close(sample(m, obj, noise, y, steps=2, renoise=[eps]), x, rtol=0, atol=0)
    chained = obj.solution(m, noise, torch.ones(5), torch.full((5,), 0.5), y)
    chained = obj.solution(m, chained, torch.full((5,), 0.5), torch.zeros(5), y)
    torch.testing.assert_close(sample(m, obj, noise, y, steps=2, mode="chained"), chained, rtol=0, atol=0)


def test_renoise_draws_differ_by_generator(setup):
    m, obj, noise, y = setup
    a = sample(m, obj, noise, y, steps=2, generator=torch.Generator().manual_seed(1))
    b = sample(m, obj, noise, y, steps=2, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_inference_guidance(setup):
    m, obj, noise, y = setup
    plain = sample(m, obj, noise, y, steps=1)
    torch.testing.assert_close(sample(m, obj, noise, y, steps=1, guidance_scale=1.0), plain, rtol=0, atol=0)
    g = sample(m, obj, noise, y, steps=1, guidance_scale=2.0)
    ones, zeros = torch.ones(5), torch.zeros(5)
    cond = m(noise, ones, zeros, y)
    unc = m(noise, ones, zeros, None)
    torch.testing.assert_close(g, noise - (unc + 2.0 * (cond - unc)), rtol=1e-5, atol=1e-6)


def test_argument_errors(setup):
    m, obj, noise, y = setup
    with raises_naming(ValueError, "mode", "'ddim'"):
        sample(m, obj, noise, y, mode="ddim")
    with raises_naming(ValueError, "steps", "got 0"):
        sample(m, obj, noise, y, steps=0)
    with raises_naming(ValueError, "renoise", "steps - 1 = 2", "got 1"):
        sample(m, obj, noise, y, steps=3, renoise=[noise])
    with raises_naming(ValueError, "renoise", "mode='renoise'"):
        sample(m, obj, noise, y, steps=2, renoise=[noise], mode="chained")


def test_bad_steps_guidance_and_labels_are_one_clear_error(setup):
    m, obj, noise, y = setup
    for steps in (2.0, True, "2"):
        with raises_naming(ValueError, "steps", f"got {steps!r}"):
            sample(m, obj, noise, y, steps=steps)
    for scale in (float("nan"), float("inf")):
        with raises_naming(ValueError, "guidance_scale", f"got {scale}"):
            sample(m, obj, noise, y, guidance_scale=scale)
    with raises_naming(ValueError, "label 11", "0..9", "10 is the null label"):
        sample(m, obj, noise, torch.tensor([0, 1, 2, 3, 11]))
    with raises_naming(ValueError, "label -1", "0..9"):
        sample(m, obj, noise, torch.tensor([0, 1, -1, 3, 4]))
    with raises_naming(ValueError, "y", "integer", "(5,)"):
        sample(m, obj, noise, torch.arange(4))
    with raises_naming(ValueError, "y", "integer", "(5,)"):
        sample(m, obj, noise, y.float())
    # the null label itself is a valid label: an explicit unconditional row
    null = torch.full((5,), 10)
    torch.testing.assert_close(sample(m, obj, noise, null), sample(m, obj, noise, None), rtol=0, atol=0)
    unconditional = SoFlowObjective(SoFlowConfig(), num_classes=None)
    with raises_naming(ValueError, "guidance_scale=2", "num_classes"):
        sample(m, unconditional, noise, y, guidance_scale=2.0)
    assert sample(m, obj, noise, y, steps=torch.tensor(2).item()).shape == noise.shape
