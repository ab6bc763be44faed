"""MeanFlow baseline: the JVP against finite differences, the guided target by hand, time draws,
one-step sampling, a 2-D run that learns, config errors and the compiled loss."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from soflow_fast.compiled import CompiledLoss
from soflow_fast.meanflow import PRESETS, MeanFlowConfig, MeanFlowDraws, MeanFlowObjective, forward_ad_safe
from soflow_fast.models import DiT
from soflow_fast.sampling import sample
from tests.utils import assert_rel_close, raises_naming

NC = 10  # classes of the tiny DiTs; the null label is index NC


@pytest.fixture(autouse=True)
def _one_thread():
    # these ops are tiny: on a shared 2-core host, OpenMP threads waiting on each other cost 10-30x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


class _DiT64(DiT):
    """The DiT with float64 time features: the stock embedder rounds t to fp32, which would bound a
    finite difference in t at ~1e-4 relative instead of the 1e-6 asked of it here."""

    def _time_features(self, embedder: nn.Module, t: torch.Tensor) -> torch.Tensor:
        half = embedder.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float64) / half)
        args = t.double()[:, None] * freqs
        return embedder.mlp(torch.cat([args.cos(), args.sin()], dim=-1))

    def embed_condition(self, t, s, y, batch):
        return (
            self._time_features(self.t_embedder, t)
            + self._time_features(self.s_embedder, t - s)
            + self.y_embedder(y, batch, t.device)
        )


def _tiny_dit(cls=DiT, depth: int = 1, dtype=torch.float32, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    m = cls(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=NC)
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero would make the output identically zero
            p.normal_(0, 0.1)
    return m.to(dtype)


class _AffineNet(nn.Module):
    """u(x, t, s | y) = table[y] + k x + a t + b (t - s): its derivative along (v, 1, 0) is k v + a + b.

    Records (rows, labels, grad enabled) of every call.
    """

    def __init__(self, dim: int, k: float, a: float, b: float):
        super().__init__()
        self.table = nn.Parameter(torch.randn(NC + 1, dim, dtype=torch.float64))
        self.k, self.a, self.b = k, a, b
        self.calls: list[tuple[int, torch.Tensor, bool]] = []

    def forward(self, x, t, s, y=None):
        self.calls.append((x.shape[0], y.clone(), torch.is_grad_enabled()))
        return self.table[y] + self.k * x + self.a * t[:, None] + self.b * (t - s)[:, None]


class _ToyNet(nn.Module):
    """A small MLP with the DiT's (x, t, s, y) signature for 2-D data."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.null = num_classes
        self.emb = nn.Embedding(num_classes + 1, 8)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x, t, s, y=None):
        if y is None:
            y = torch.full((x.shape[0],), self.null, dtype=torch.long)
        return self.net(torch.cat([x, t[:, None], (t - s)[:, None], self.emb(y)], dim=1))


def _draws(B: int, n_eq: int, shape, dtype, drop: list[bool]) -> MeanFlowDraws:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, B, generator=g, dtype=dtype) * 0.9 + 0.05
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r = torch.cat([t[:n_eq], r[n_eq:]])
    noise = torch.randn(shape, generator=g, dtype=dtype)
    return MeanFlowDraws(n_eq=n_eq, noise=noise, t=t, r=r, drop=torch.tensor(drop))


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


# ----------------------------------------------------------------------------------------------
# The JVP against central finite differences (float64)
# ----------------------------------------------------------------------------------------------


def test_jvp_and_loss_match_finite_differences():
    m = _tiny_dit(_DiT64, depth=2, dtype=torch.float64)
    cfg = MeanFlowConfig(omega=1.2, kappa=0.5, p=1.0)
    obj = MeanFlowObjective(cfg, num_classes=NC)
    B, h = 6, 1e-4
    x0 = torch.randn(B, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    d = _draws(B, 3, x0.shape, torch.float64, [False, True, False, False, True, False])
    z, v = obj.interpolate(x0, d.noise, d.t)
    y_in = torch.where(d.drop, NC, y)
    null = torch.full((B,), NC)

    with torch.no_grad():  # the guided velocity, from three separate calls
        un, co = m(z, d.t, d.t, null), m(z, d.t, d.t, y)
        v_g = 1.2 * v + (1 - 1.2 - 0.5) * un + 0.5 * co
        v_g = torch.where(d.drop[:, None, None, None], v, v_g)
        ones = torch.ones(B, dtype=torch.float64)

        def fd(tan_z, tan_t):
            hi = m(z + h * tan_z, d.t + h * tan_t, d.r, y_in)
            lo = m(z - h * tan_z, d.t - h * tan_t, d.r, y_in)
            return (hi - lo) / (2 * h)

        dudt_fd = fd(v_g, ones)
        dudt_t_fd = fd(torch.zeros_like(z), ones)  # the time path alone: t and t - s embedders

    torch.testing.assert_close(obj.guided_velocity(m, z, d.t, v, y, d.drop), v_g, rtol=1e-12, atol=1e-12)
    u, dudt = obj.u_and_dudt(m, z, d.t, d.r, y_in, v_g)
    assert_rel_close(dudt, dudt_fd, 1e-6, "dudt along (v_g, 1, 0)")
    _, dudt_t = obj.u_and_dudt(m, z, d.t, d.r, y_in, torch.zeros_like(z))
    assert_rel_close(dudt_t, dudt_t_fd, 1e-6, "dudt along (0, 1, 0)")
    assert dudt_t.abs().mean() > 1e-3 * dudt.abs().mean()  # the time path is not negligible

    u_plain = m(z, d.t, d.r, y_in)
    u_tgt = v_g - (d.t - d.r).clamp(0, 1)[:, None, None, None] * dudt_fd
    sq = (u_plain - u_tgt).square().flatten(1).sum(1)
    w = 1.0 / (sq.detach() + 0.01)
    expected = (w * sq).mean()
    loss, logs = obj.loss_from_draws(m, x0, y, d)
    assert_rel_close(loss, expected, 1e-6, "loss")
    assert_rel_close(logs["mse"], sq.mean(), 1e-6, "mse")
    assert_rel_close(logs["weight"], w.mean(), 1e-6, "weight")
    assert all(v.dim() == 0 for v in logs.values())
    # the gradient flows through u alone: it is that of the plain forward against the fixed target
    for got, want in zip(_grads(m, loss), _grads(m, expected), strict=True):
        assert_rel_close(got, want, 1e-6, "grad")


# ----------------------------------------------------------------------------------------------
# The guided target by hand
# ----------------------------------------------------------------------------------------------


def test_guided_loss_by_hand():
    omega, kappa, k, a, b = 1.5, 0.25, 0.3, 0.7, -0.2
    net = _AffineNet(3, k, a, b)
    obj = MeanFlowObjective(MeanFlowConfig(omega=omega, kappa=kappa, p=0.5), num_classes=NC)
    B = 4
    x0 = torch.randn(B, 3, dtype=torch.float64)
    y = torch.tensor([7, 0, 3, 9])
    d = _draws(B, 3, x0.shape, torch.float64, [False, True, False, False])
    loss, logs = obj.loss_from_draws(net, x0, y, d)

    t, r, tab = d.t[:, None], d.r[:, None], net.table.detach()
    z = (1 - t) * x0 + t * d.noise
    v = d.noise - x0
    pred = lambda labels: tab[labels] + k * z + a * t  # the network at h = 0
    v_g = omega * v + (1 - omega - kappa) * pred(torch.full((B,), NC)) + kappa * pred(y)
    v_g[1] = v[1]  # the dropped row keeps the sample velocity
    y_in = torch.tensor([7, NC, 3, 9])
    u = tab[y_in] + k * z + a * t + b * (t - r)
    u_tgt = v_g - (t - r).clamp(0, 1) * (k * v_g + a + b)
    sq = ((u - u_tgt) ** 2).sum(1)
    w = 1 / (sq + 0.01) ** 0.5
    assert_rel_close(loss, (w * sq).mean(), 1e-10, "loss")
    assert_rel_close(logs["mse"], sq.mean(), 1e-10, "mse")
    assert_rel_close(logs["weight"], w.mean(), 1e-10, "weight")
    # one batched no-grad guidance call (null then real labels), then the JVP pass on dropped labels
    assert [(n, g) for n, _, g in net.calls] == [(2 * B, False), (B, True)]
    assert torch.equal(net.calls[0][1], torch.cat([torch.full((B,), NC), y]))
    assert torch.equal(net.calls[1][1], y_in)


@pytest.mark.parametrize(
    ("omega", "kappa", "guide_labels"),
    [(1.0, 0.5, "null+y"), (2.0, 0.0, "null"), (0.5, 0.5, "y"), (1.0, 0.0, "")],
)
def test_guidance_calls_are_batched(omega, kappa, guide_labels):
    """Only the predictions with a non-zero weight are computed, all in one no-grad call."""
    net = _AffineNet(2, 0.1, 0.2, 0.3)
    obj = MeanFlowObjective(MeanFlowConfig(omega=omega, kappa=kappa), num_classes=NC)
    y = torch.tensor([1, 2, 3, 4])
    obj.loss(net, torch.randn(4, 2, dtype=torch.float64), y, generator=torch.Generator().manual_seed(0))
    expected = {"null": [torch.full((4,), NC)], "y": [y], "null+y": [torch.full((4,), NC), y], "": []}[guide_labels]
    no_grad = [c for c in net.calls if not c[2]]
    assert len(net.calls) == 1 + bool(expected) and len(no_grad) == bool(expected)
    if expected:
        assert torch.equal(no_grad[0][1], torch.cat(expected))


def test_unconditional_sees_no_labels():
    calls = []

    def net(x, t, s, y=None):
        calls.append(y)
        return 0.5 * x + t[:, None]

    obj = MeanFlowObjective(num_classes=None)
    loss, _ = obj.loss(net, torch.randn(8, 2, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    assert calls == [None] and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# Time draws
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("B", "n_eq"), [(4, 3), (40, 30), (20000, 15000)])
def test_time_draws(B, n_eq):
    obj = MeanFlowObjective(num_classes=NC)
    d = obj.draw(torch.zeros(B, 2), torch.zeros(B, dtype=torch.long), torch.Generator().manual_seed(0))
    assert d.n_eq == n_eq
    assert torch.equal(d.r[:n_eq], d.t[:n_eq])
    assert bool((d.r[n_eq:] < d.t[n_eq:]).all())
    assert bool((d.t >= d.r).all()) and bool((d.t < 1).all()) and bool((d.r > 0).all())
    if B == 20000:
        # logit(t) + logit(r) is a sum of two N(-0.4, 1): mean -0.8, sd sqrt(2)/sqrt(5000) = 0.02 here
        logit = lambda p: torch.log(p / (1 - p))
        assert abs((logit(d.t[n_eq:]) + logit(d.r[n_eq:])).mean().item() + 0.8) < 0.08
        assert abs(d.drop.float().mean().item() - 0.1) < 0.01


# ----------------------------------------------------------------------------------------------
# Sampling through the shared sampler
# ----------------------------------------------------------------------------------------------


def test_one_step_sample_is_one_jump():
    m = _tiny_dit(depth=2)
    obj = MeanFlowObjective(num_classes=NC)
    noise, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, NC, 7, 9])
    with torch.no_grad():
        expected = noise - m(noise, torch.ones(5), torch.zeros(5), y)
        cond, uncond = m(noise, torch.ones(5), torch.zeros(5), y), m(noise, torch.ones(5), torch.zeros(5), None)
    torch.testing.assert_close(sample(m, obj, noise, y, steps=1), expected, rtol=0, atol=0)
    guided = sample(m, obj, noise, y, steps=1, guidance_scale=2.0)
    torch.testing.assert_close(guided, noise - (uncond + 2.0 * (cond - uncond)), rtol=1e-5, atol=1e-6)
    two = sample(m, obj, noise, y, steps=2, mode="chained")
    with torch.no_grad():
        half = torch.full((5,), 0.5)
        x = noise - 0.5 * m(noise, torch.ones(5), half, y)
        x = x - 0.5 * m(x, half, torch.zeros(5), y)
    torch.testing.assert_close(two, x, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# A 2-D run that learns
# ----------------------------------------------------------------------------------------------


def test_toy_2d_loss_decreases():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]])
    net = _ToyNet(4)
    # p = 0: the plain squared error, so the logged loss shows learning (p = 1 flattens it near 1)
    obj = MeanFlowObjective(MeanFlowConfig(p=0.0), num_classes=4)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(200):
        y = torch.randint(0, 4, (64,), generator=g)
        x0 = centers[y] + 0.1 * torch.randn(64, 2, generator=g)
        loss, _ = obj.loss(net, x0, y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    # seeds 0-3 end at 0.33-0.42 of the start (200 steps), so 0.6 leaves room without being vacuous
    assert last < 0.6 * first, (first, last)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noising_type", "Trig"),
        ("time_mean", float("nan")),
        ("time_std", 0.0),
        ("ratio_r_neq_t", 1.5),
        ("cfg_drop_rate", -0.1),
        ("p", -1.0),
        ("eps", 0.0),
        ("omega", 0.0),
        ("kappa", 1.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with raises_naming(ValueError, f"meanflow.{field}"):
        MeanFlowConfig(**{field: value})


def test_config_from_dict_and_presets():
    with raises_naming(ValueError, "'meanflow.omeg'"):
        MeanFlowConfig.from_dict({"omeg": 1.0})
    assert MeanFlowConfig.from_dict({"kappa": 0.2}).kappa == 0.2
    c = PRESETS["imagenet"]
    assert (c.time_mean, c.time_std, c.ratio_r_neq_t, c.p, c.eps) == (-0.4, 1.0, 0.25, 1.0, 0.01)
    assert (c.omega, c.kappa, c.cfg_drop_rate, c.noising_type) == (1.0, 0.5, 0.1, "Linear")


def test_forward_ad_safe_restores_flash_flags():
    m = _tiny_dit(depth=2)
    attn = [b.attn for b in m.blocks]
    attn[1].allow_flash_attn = False
    with forward_ad_safe(m):
        assert [a.allow_flash_attn for a in attn] == [False, False]
    assert [a.allow_flash_attn for a in attn] == [True, False]


# ----------------------------------------------------------------------------------------------
# The compiled loss
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_loss_matches_eager(fresh_dynamo):
    """The whole loss (guidance, JVP, loss) traces as ONE graph and matches eager in loss and grads.

    aot_eager keeps the test fast while still going through AOTAutograd's joint forward/backward,
    where torch 2.13 failed; inductor was checked by hand (see the report).
    """
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    m = _tiny_dit(depth=1)
    x0, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    eager = MeanFlowObjective(num_classes=NC)
    compiled = CompiledLoss(eager.loss_from_draws, {"backend": counting})
    le, logs_e = eager.loss(m, x0, y, generator=torch.Generator().manual_seed(1))
    lc, logs_c = compiled(m, x0, y, eager.draw(x0, y, torch.Generator().manual_seed(1)))
    assert compiled.error is None and len(graphs) == 1
    names = [getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes]
    # the dual-number JVP is inside the graph, and both network passes are traced: the guidance
    # pass through SDPA, the JVP pass through the written-out attention with its fp32 softmax
    assert "_make_dual" in names and "_unpack_dual" in names
    assert names.count("scaled_dot_product_attention") == 1
    assert names.count("softmax") == 1
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    for key in ("loss", "mse", "weight"):
        torch.testing.assert_close(logs_c[key], logs_e[key], rtol=1e-6, atol=1e-7)
    for got, want in zip(_grads(m, lc), _grads(m, le), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_compiled_loss_falls_back_loudly(fresh_dynamo):
    def broken(gm, example_inputs):
        raise RuntimeError("backend refuses: meanflow-test")

    net = _AffineNet(2, 0.1, 0.2, 0.3)
    x0, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    eager = MeanFlowObjective(num_classes=NC)
    obj = CompiledLoss(eager.loss_from_draws, {"backend": broken})
    with pytest.warns(RuntimeWarning, match="meanflow-test"):
        loss, _ = obj(net, x0, y, eager.draw(x0, y, torch.Generator().manual_seed(2)))
    assert "meanflow-test" in obj.error
    torch.testing.assert_close(loss, eager.loss(net, x0, y, generator=torch.Generator().manual_seed(2))[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not every step
        again, _ = obj(net, x0, y, eager.draw(x0, y, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(again, loss)


def test_compiled_loss_does_not_blame_the_compiler_for_bad_inputs(fresh_dynamo):
    net = _AffineNet(2, 0.1, 0.2, 0.3)
    mf = MeanFlowObjective(num_classes=NC)
    obj = CompiledLoss(mf.loss_from_draws, {"backend": "aot_eager"})
    x0, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError):  # 3 labels for 4 rows: the eager rerun raises the same error
        obj(net, x0, y, mf.draw(x0, y))
    assert obj.error is None


def test_grouped_draws_give_each_rank_its_rows_with_r_equal_t_first():
    """draw_batch(groups=G): every rank draws the same global batch and takes rows g::G, whose first
    rows (the same share as one process's) have r = t; with G = 1 it is ``draw`` itself."""
    obj = MeanFlowObjective(num_classes=NC)
    shape = (8, 1, 4, 4)
    one = obj.draw_batch(shape, "cpu", torch.float32, True, generator=torch.Generator().manual_seed(3))
    two = obj.draw_batch(shape, "cpu", torch.float32, True, generator=torch.Generator().manual_seed(3), groups=2)
    x0 = torch.zeros(shape)
    ref = obj.draw(x0, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(3))
    for name in ("noise", "t", "r", "drop"):
        assert torch.equal(getattr(one, name), getattr(ref, name)), name
    assert one.n_eq == 6 and two.n_eq == 6  # int(0.75 * 8), and 2 x int(0.75 * 4)
    assert torch.equal(two.noise, one.noise) and torch.equal(two.t, one.t)
    for g in range(2):
        rows = two.group(g)
        assert rows.groups == 1 and rows.n_eq == 3
        assert torch.equal(rows.t, one.t[g::2]) and torch.equal(rows.noise, one.noise[g::2])
        assert torch.equal(rows.r[:3], rows.t[:3]) and (rows.r[3:] <= rows.t[3:]).all()
