"""SoFlowMLP: shapes, zero-init read-out, observation handling, and the objectives that drive it."""

from __future__ import annotations

import pytest
import torch

from soflow_fast.meanflow import MeanFlowConfig, MeanFlowObjective
from soflow_fast.models import SoFlowMLP
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from tests.utils import assert_rel_close, raises_naming


def _times(B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, B, generator=g)
    return torch.maximum(a, b), torch.minimum(a, b)


def _randomised(model: SoFlowMLP) -> SoFlowMLP:
    # the zero read-out makes F identically 0 at init; perturb it so every path carries signal
    with torch.no_grad():
        model.final_linear.weight.normal_(0, 0.1)
        model.final_linear.bias.normal_(0, 0.1)
    return model


# ----------------------------------------------------------------------------------------------
# Shapes and init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obs_size", "action_dim", "horizon", "shape"),
    [
        (4, 2, 8, (3, 8, 2)),  # chunk layout
        (4, 2, 8, (3, 16)),  # flat layout of the same chunk
        (0, 2, 1, (5, 2)),  # 2-D toy data, unconditional
        (0, 2, 1, (5, 1, 2)),
        (7, 3, 5, (1, 5, 3)),  # batch 1, odd sizes
    ],
)
def test_output_shape_and_zero_init(obs_size, action_dim, horizon, shape):
    m = SoFlowMLP(obs_size, action_dim, horizon, hidden_size=32, num_layers=2)
    x = torch.randn(shape)
    t, s = _times(shape[0])
    y = torch.randn(shape[0], obs_size) if obs_size else None
    out = m(x, t, s, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(x)), "the read-out is zero-initialised: F = 0 at init"
    out = _randomised(m)(x, t, s, y)
    assert out.abs().sum() > 0


def test_flat_and_chunk_layouts_agree():
    m = _randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2))
    x = torch.randn(6, 8, 2)
    t, s = _times(6)
    y = torch.randn(6, 4)
    assert torch.equal(m(x, t, s, y).reshape(6, 16), m(x.reshape(6, 16), t, s, y))


def test_conditioning_reaches_the_output():
    """t, s (through t - s) and the observation each change F."""
    m = _randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2))
    x, y = torch.randn(4, 8, 2), torch.randn(4, 4)
    t, s = _times(4)
    base = m(x, t, s, y)
    assert not torch.allclose(base, m(x, t, s * 0.5, y))
    assert not torch.allclose(base, m(x, t * 0.9, s, y))
    assert not torch.allclose(base, m(x, t, s, y + 1))


def test_second_embedder_sees_the_interval():
    """As in the DiT, the s-embedder is fed t - s: swapping it for an embedder of s changes F."""
    m = _randomised(SoFlowMLP(0, 2, 1, hidden_size=16, num_layers=1))
    x = torch.randn(5, 2)
    t, s = _times(5)
    seen = []
    handle = m.s_embedder.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    m(x, t, s)
    handle.remove()
    assert torch.equal(seen[0], t - s)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_observation_errors():
    cond = SoFlowMLP(4, 2, 8, hidden_size=16, num_layers=1)
    uncond = SoFlowMLP(0, 2, 1, hidden_size=16, num_layers=1)
    t, s = _times(3)
    with raises_naming(ValueError, "observations", "(3, 4)"):
        cond(torch.randn(3, 8, 2), t, s, None)
    with raises_naming(ValueError, "(3, 4)", "(3, 5)"):
        cond(torch.randn(3, 8, 2), t, s, torch.randn(3, 5))
    with raises_naming(TypeError, "torch.int64", "num_classes=None"):
        cond(torch.randn(3, 8, 2), t, s, torch.zeros(3, 4, dtype=torch.long))
    with raises_naming(ValueError, "obs_size=0", "y=None"):
        uncond(torch.randn(3, 2), t, s, torch.randn(3, 0))
    with raises_naming(ValueError, "(B, 8, 2)", "(3, 4, 4)"):
        cond(torch.randn(3, 4, 4), t, s, torch.randn(3, 4))
    with raises_naming(ValueError, "(3,)", "(2,)"):
        uncond(torch.randn(3, 2), t[:2], s)
    with raises_naming(ValueError, "action_dim", "got 0"):
        SoFlowMLP(4, 0)


# ----------------------------------------------------------------------------------------------
# The objectives and the sampler take it unchanged
# ----------------------------------------------------------------------------------------------


class _Recorder(torch.nn.Module):
    """Wraps a model and records the y of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.ys = []

    def forward(self, x, t, s, y=None):
        self.ys.append(y)
        return self.model(x, t, s, y)


OBJECTIVE_CONFIGS = [dict(), dict(velocity_loss_ratio=0.0), dict(noising_type="Trig", coefficient_type="Trig")]


@pytest.mark.parametrize("cfg", OBJECTIVE_CONFIGS)
def test_soflow_objective_passes_observations_through(cfg):
    """num_classes=None: y is a float observation, never masked or replaced, whatever cfg_scale says."""
    torch.manual_seed(0)
    m = _Recorder(_randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2)))
    obj = SoFlowObjective(SoFlowConfig(cfg_scale=3.0, **cfg), num_classes=None)
    x0, y = torch.randn(8, 8, 2), torch.randn(8, 4)
    assert not obj.guided(y)
    loss, logs = obj.loss(m, x0, y, step=3, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())
    n_fm = int(obj.config.velocity_loss_ratio * 8)
    for seen in m.ys:
        rows = seen.shape[0]
        assert seen.dtype == y.dtype
        assert torch.equal(seen, y[8 - rows :] if rows < 8 else y)  # the consistency pass takes the last rows
    assert len(m.ys) == (2 if n_fm < 8 else 1)


def test_soflow_batched_loss_equals_components():
    """The batched loss on the MLP equals the per-term losses on the same draws (float64)."""
    m = _randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2)).double()
    obj = SoFlowObjective(SoFlowConfig(), num_classes=None)
    x0, y = torch.randn(16, 8, 2, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    d = obj.draw(x0, y, step=10, generator=torch.Generator().manual_seed(1))
    batched, _ = obj.loss_from_draws(m, x0, y, d)
    n = d.n_fm
    fm = obj.velocity_loss(m, x0[:n], d.noise[:n], d.t[:n], y[:n])[0]
    sc = obj.consistency_loss(m, x0[n:], d.noise[n:], d.t[n:], d.l[n:], d.s[n:], y[n:])[0]
    assert_rel_close(batched, fm * n / 16 + sc * (16 - n) / 16, 1e-12, "loss")


def test_meanflow_objective_runs_on_the_mlp():
    """MeanFlow's JVP goes through the MLP (t and r tangents) and its loss trains every parameter."""
    m = _randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2))
    obj = MeanFlowObjective(MeanFlowConfig(), num_classes=None)
    x0, y = torch.randn(8, 8, 2), torch.randn(8, 4)
    loss, logs = obj.loss(m, x0, y, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("steps", [1, 2])
def test_sampling_with_observations(steps):
    m = _randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2))
    obj = SoFlowObjective(SoFlowConfig(), num_classes=None)
    noise, y = torch.randn(5, 8, 2), torch.randn(5, 4)
    out = sample(m, obj, noise, y=y, steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    if steps == 1:
        ones, zeros = torch.ones(5), torch.zeros(5)
        assert torch.equal(out, noise - m(noise, ones, zeros, y))  # f(eps, 1, 0) = eps + (0 - 1) F


# ----------------------------------------------------------------------------------------------
# The functional surface equals the objective path it wraps
# ----------------------------------------------------------------------------------------------


def test_functional_equals_objective():
    import soflow_fast.functional as SF

    m = _randomised(SoFlowMLP(4, 2, 8, hidden_size=32, num_layers=2))
    cfg = SoFlowConfig(p=0.75, eps=0.001, total_steps=100)
    obj = SoFlowObjective(cfg, num_classes=None)
    x0, noise, y = torch.randn(8, 8, 2), torch.randn(8, 8, 2), torch.randn(8, 4)
    t, s = _times(8)
    l = t + (s - t) * 0.1

    assert torch.equal(SF.interpolate(x0, noise, t), obj.interpolate(x0, noise, t)[0])
    F = torch.randn(8, 8, 2)
    assert torch.equal(SF.euler_parameterize(noise, t, s, F), noise + (s - t)[:, None, None] * F)
    assert torch.equal(SF.euler_parameterize(noise, t, s, m(noise, t, s, y)), obj.solution(m, noise, t, s, y))

    fm, fm_logs = SF.flow_matching_loss(m, x0, noise, t, y, config=cfg)
    assert torch.equal(fm, obj.velocity_loss(m, x0, noise, t, y)[0])
    assert set(fm_logs) == {"fm_loss", "fm_mse", "fm_weight"}
    sc, sc_logs = SF.consistency_loss(m, x0, noise, t, l, s, y, config=cfg)
    assert torch.equal(sc, obj.consistency_loss(m, x0, noise, t, l, s, y)[0])
    assert set(sc_logs) == {"scm_loss", "scm_mse", "scm_weight"}
    total, logs = SF.combined_loss(m, x0, y, step=7, config=cfg, generator=torch.Generator().manual_seed(3))
    ref, ref_logs = obj.loss(m, x0, y, step=7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(total, ref) and set(logs) == set(ref_logs)
    # a dict of fields is the same config; None is SoFlowConfig()
    as_dict = {"p": 0.75, "eps": 0.001, "total_steps": 100}
    assert torch.equal(SF.combined_loss(m, x0, y, 7, as_dict, torch.Generator().manual_seed(3))[0], ref)
    dflt = SoFlowObjective(SoFlowConfig(), num_classes=None)
    assert torch.equal(SF.flow_matching_loss(m, x0, noise, t, y)[0], dflt.velocity_loss(m, x0, noise, t, y)[0])

    assert torch.equal(SF.one_step_sample(m, noise, y), sample(m, obj, noise, y=y, steps=1))
    got = SF.multi_step_sample(m, noise, 3, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, sample(m, obj, noise, y=y, steps=3, generator=torch.Generator().manual_seed(5)))
    got = SF.multi_step_sample(m, noise, 3, y, mode="chained")
    assert torch.equal(got, sample(m, obj, noise, y=y, steps=3, mode="chained"))


def test_functional_time_convention_table():
    """The module table: the binding's noisy point at tau is ours at t = 1 - tau, and its jump
    x + (sigma - tau) F_b equals ours with F(x, t, s) = -F_b(x, 1 - t, 1 - s)."""
    import soflow_fast.functional as SF

    x0, noise = torch.randn(6, 8, 2), torch.randn(6, 8, 2)
    tau, sigma = _times(6, seed=1)
    tau, sigma = sigma, tau  # the binding moves toward data: sigma > tau
    theirs = (1 - tau)[:, None, None] * noise + tau[:, None, None] * x0
    torch.testing.assert_close(SF.interpolate(x0, noise, 1 - tau), theirs)
    F_b = torch.randn(6, 8, 2)
    jump_theirs = theirs + (sigma - tau)[:, None, None] * F_b
    torch.testing.assert_close(SF.euler_parameterize(theirs, 1 - tau, 1 - sigma, -F_b), jump_theirs)


def test_functional_sizes_defaults_and_errors():
    import soflow_fast.functional as SF

    assert SF.output_size(action_dim=2, action_horizon=8) == 16
    d = SF.recommended_defaults()
    model = SoFlowMLP(obs_size=4, action_dim=2, **d["model"])
    cfg = SoFlowConfig(**d["objective"])
    x = torch.randn(3, d["model"]["action_horizon"], 2)
    assert SF.one_step_sample(model, x, torch.randn(3, 4), config=cfg).shape == x.shape
    with raises_naming(ValueError, "'no-such-preset'", "imagenet, toy"):
        SF.objective_for("no-such-preset")
    with raises_naming(ValueError, "'soflow.bogus'"):
        SF.objective_for({"bogus": 1})
    with raises_naming(TypeError, "SoFlowConfig", "int"):
        SF.objective_for(3)
