"""Plain flow matching (run.objective=fm): its loss, its place in the step protocol, and the ODE samplers
(Euler and Heun, ``--nfe`` network calls) that ``sample --solver`` runs."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn as nn

from soflow_fast import sample as sample_cli
from soflow_fast.flow_matching import FlowMatchingObjective
from soflow_fast.models import DiT
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.presets import build_config
from soflow_fast.sampling import default_mode, integrate, sample
from soflow_fast.step import build_objective
from tests.utils import assert_rel_close


def tiny_dit(dtype=torch.float64) -> DiT:
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.to(dtype)


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------


def test_p0_is_the_plain_mean_squared_error():
    """Unguided, p = 0: the loss is mean((F(x_t, t, t) - (eps - x0))^2) over every row and dimension."""
    model, x0 = tiny_dit(), torch.randn(6, 3, 8, 8, dtype=torch.float64)
    obj = FlowMatchingObjective(SoFlowConfig(p=0.0, cfg_scale=1.0), num_classes=10)
    y = torch.arange(6)
    d = obj.draw(x0, y, generator=torch.Generator().manual_seed(1))
    assert d.n_fm == 6 and torch.equal(d.s, d.t)
    loss, logs = obj.loss_from_draws(model, x0, y, d)
    t = d.t[:, None, None, None]  # x_t's coefficients in the draws' float32, as the engine computes them
    x_t = (1 - t).double() * x0 + t.double() * d.noise
    plain = (model(x_t, d.t, d.t, y) - (d.noise - x0)).square().mean()
    assert_rel_close(loss, plain, 1e-12, "loss")
    assert set(logs) == set(obj.log_keys) == {"loss", "fm_loss", "fm_mse", "fm_weight"}
    assert logs["fm_weight"] == 1.0


def test_it_is_soflows_flow_matching_term_on_every_row():
    """With the adaptive weight (p = 1) and guidance, the loss is SoFlow's with velocity_loss_ratio = 1."""
    model, x0, y = tiny_dit(), torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.arange(6)
    cfg = SoFlowConfig(cfg_drop_rate=0.3, velocity_loss_ratio=0.25)
    fm = FlowMatchingObjective(cfg, num_classes=10)
    soflow = SoFlowObjective(SoFlowConfig(cfg_drop_rate=0.3, velocity_loss_ratio=1.0), num_classes=10)
    d = fm.draw(x0, y, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fm.loss_from_draws(model, x0, y, d)[0], soflow.loss_from_draws(model, x0, y, d)[0])
    assert cfg.velocity_loss_ratio == 0.25  # the config passed in is left as it was


def test_the_trainer_builds_it_and_the_config_checks_it():
    cfg = build_config("digits", None, ["--objective=fm", "--p=0"])
    obj = build_objective(cfg)
    assert isinstance(obj, FlowMatchingObjective) and obj.config.p == 0 and obj.config.velocity_loss_ratio == 1
    assert default_mode(obj) == "heun" and default_mode(SoFlowObjective()) == "renoise"
    with pytest.raises(ValueError, match="run.objective=fm trains F\\(x, t, t\\) as the velocity"):
        build_config("digits", None, ["--objective=fm", "--coefficient_type=Trig"])
    with pytest.raises(ValueError, match="coefficient_type=Trig"):
        FlowMatchingObjective(SoFlowConfig(coefficient_type="Trig"))


# ----------------------------------------------------------------------------------------------
# ODE sampling
# ----------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """F(x, t, s) = k x: the ODE dx/dt = k x, whose solution from t = 1 to 0 is x e^{-k}."""

    def __init__(self, k: float):
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, x, t, s, y=None):
        self.calls += 1
        return self.k * x


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 8])
def test_each_solver_makes_nfe_network_calls_and_its_own_steps(nfe):
    """Euler: nfe steps of h = -1/nfe. Heun: ceil(nfe/2) steps of h = -1/ceil(nfe/2), each multiplying x by
    1 + hk + (hk)^2/2, the last by 1 + hk (Euler) when nfe is odd."""
    x, k, obj = torch.randn(3, 4, dtype=torch.float64), 0.7, SoFlowObjective(SoFlowConfig())
    for solver in ("euler", "heun"):
        net = Linear(k)
        got = sample(net, obj, x, steps=nfe, mode=solver)
        assert net.calls == nfe, solver
        if solver == "euler":
            want = x * (1 - k / nfe) ** nfe
        else:
            n = math.ceil(nfe / 2)
            hk = -k / n
            want = x * (1 + hk + hk**2 / 2) ** (nfe // 2) * (1 + hk) ** (nfe % 2)
        assert_rel_close(got, want, 1e-6, f"{solver} with {nfe} calls")  # the times are float32


def test_heun_is_second_order():
    """The error against x e^{-k} falls like 1/N^2 for Heun, 1/N for Euler (N even)."""
    x, obj = torch.ones(1, 1, dtype=torch.float64), SoFlowObjective(SoFlowConfig())
    exact = x * math.exp(-1.0)
    err = {
        s: [float((sample(Linear(1.0), obj, x, steps=n, mode=s) - exact).abs()) for n in (32, 64)]
        for s in ("euler", "heun")
    }
    assert 1.8 < err["euler"][0] / err["euler"][1] < 2.2
    assert 3.6 < err["heun"][0] / err["heun"][1] < 4.4
    assert err["heun"][1] < err["euler"][1] / 20


def test_integrate_runs_per_row_times_and_ends_exactly_at_s():
    """Rows integrate over their own intervals, the last stage's time being s itself."""
    t = torch.tensor([0.9, 0.35, 0.7])
    s = torch.tensor([0.1, 0.3, 0.69999])
    seen = []

    def field(x, tau):
        seen.append(tau.clone())
        return torch.ones_like(x)

    x = integrate(field, torch.zeros(3, 2, dtype=torch.float64), t, s, 3, "heun")
    assert torch.equal(seen[-1], s) and torch.equal(seen[0], t) and len(seen) == 6
    assert_rel_close(x[:, 0], (s - t).double(), 1e-6, "x moved by (s - t) at unit velocity")
    v0 = torch.full((3, 2), 2.0, dtype=torch.float64)
    seen.clear()
    integrate(field, torch.zeros(3, 2, dtype=torch.float64), t, s, 2, "heun", v0=v0)
    assert len(seen) == 3  # the first stage's velocity was given


def test_ode_sampling_with_guidance_and_labels():
    """Inference-time guidance: each call evaluates the conditional and null rows in one batch."""
    model, obj = tiny_dit(torch.float32), SoFlowObjective(SoFlowConfig(), num_classes=10)
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = sample(model, obj, noise, y, steps=3, mode="heun", guidance_scale=2.0)
    assert calls == [4, 4, 4] and out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="renoise noise is only used with mode='renoise'"):
        sample(model, obj, noise, y, steps=2, mode="euler", renoise=[noise])


def test_the_sample_command_picks_the_flag_that_fits_the_run():
    a = lambda **kw: argparse.Namespace(**{"mode": None, "solver": None, **kw})  # noqa: E731
    assert sample_cli.sampler(a(), "fm") == "heun"
    assert sample_cli.sampler(a(solver="euler"), "fm") == "euler"
    assert sample_cli.sampler(a(), "soflow") == "renoise"
    assert sample_cli.sampler(a(mode="chained"), None) == "chained"
    assert sample_cli.sampler(a(solver="heun"), None) == "heun"  # a file that does not record its objective
    with pytest.raises(ValueError, match="--mode renoise samples a SoFlow model"):
        sample_cli.sampler(a(mode="renoise"), "fm")
    with pytest.raises(ValueError, match="--solver integrates a flow-matching model's velocity"):
        sample_cli.sampler(a(solver="heun"), "soflow")
