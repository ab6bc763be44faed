"""The three ways into each fused op launch the same kernels and must agree bit for bit.

Eagerly an op runs through an ``autograd.Function`` (less host work per call than torch.library's
dispatch); under torch.compile it is the registered triton_op (CUDA) or custom op (CPU under the
interpreter). These tests call both registrations directly through ``torch.ops.soflow_fast``, eagerly
(the triton_op then launches its kernels directly, with its registered autograd formula and its
backward triton_op), and compare outputs and every gradient with the public function, and check
that the eager path really is neither op.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.utils import leaves, seed_all


def _grads(outputs, inputs, cotangents):
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if c is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)


def _assert_same(names, got, want):
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        meta = f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.dtype == b.dtype and a.shape == b.shape, meta
        assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


# The registered op names: the custom op's, and the triton_op's with this suffix.
ROUTES = {"custom_op": "", "triton_op": "_triton_op"}


def _op(name, route):
    return getattr(torch.ops.soflow_fast, name + ROUTES[route])


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_paths_agree(kernels, device, dtype, route):
    seed_all(0)
    b, n, d = 3, 5, 100
    x, h = (torch.randn(b, n, d, device=device).to(dtype) for _ in range(2))
    gate, shift, scale = (0.5 * torch.randn(b, d, device=device).to(dtype) for _ in range(3))
    dy = torch.randn(b, n, d, device=device).to(dtype)
    dxn = torch.randn(b, n, d, device=device).to(dtype)

    args = leaves(x, shift, scale)
    eager = kernels.modulated_layer_norm(*args)
    g_eager = _grads([eager], args, [dy])
    args = leaves(x, shift, scale)
    op = _op("modulated_layer_norm_forward", route)(*args, 1e-6)
    g_op = _grads([op], args, [dy])
    _assert_same(["y", "dx", "dshift", "dscale"], [eager, *g_eager], [op, *g_op])

    # both outputs used, then only y, then only x_new (the unused output's gradient reaches both
    # backwards as None)
    for cot in ([dxn, dy], [None, dy], [dxn, None]):
        args = leaves(x, h, gate, shift, scale)
        eager = kernels.gated_residual_modulated_layer_norm(*args)
        g_eager = _grads(eager, args, cot)
        args = leaves(x, h, gate, shift, scale)
        op = _op("gated_residual_modulated_layer_norm_forward", route)(*args, 1e-6)
        g_op = _grads(op, args, cot)
        names = ["x_new", "y", "dx", "dh", "dgate", "dshift", "dscale"]
        _assert_same(names, [*eager, *g_eager], [*op, *g_op])


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("trig", [False, True], ids=["euler", "trig"])
def test_loss_paths_agree(kernels, device, trig, route):
    seed_all(1)
    b = 3
    rows = [torch.randn(b, 2, 4, 4, device=device).to(torch.bfloat16) for _ in range(4)]
    t = torch.rand(b, device=device) * 0.8 + 0.2
    s = torch.rand(b, device=device) * t
    l_ = t + (s - t) * 0.3
    g = torch.tensor(0.75, device=device)

    nn_t = leaves(rows[0])[0]
    eager = kernels.euler_consistency_loss(nn_t, *rows[1:], t, l_, s, 1.0, 0.01, trig=trig)
    d_eager = _grads(eager[:1], [nn_t], [g])
    nn_t = leaves(rows[0])[0]
    op = _op("euler_consistency_loss_forward", route)(nn_t, *rows[1:], t, l_, s, 1.0, 0.01, trig)
    d_op = _grads(op[:1], [nn_t], [g])
    _assert_same(["loss", "mse", "weight", "d nn_t"], [*eager, *d_eager], [*op[:3], *d_op])

    dbds = torch.rand(b, device=device) + 0.5
    for dbds_arg in (dbds, 1.5):
        v = leaves(rows[0])[0]
        eager = kernels.adaptive_velocity_loss(v, rows[1], dbds_arg, 1.0, 0.01)
        d_eager = _grads(eager[:1], [v], [g])
        v = leaves(rows[0])[0]
        tensor = isinstance(dbds_arg, torch.Tensor)
        op = _op("adaptive_velocity_loss_forward", route)(
            v, rows[1], dbds_arg if tensor else None, 0.0 if tensor else dbds_arg, 1.0, 0.01
        )
        d_op = _grads(op[:1], [v], [g])
        _assert_same(["loss", "mse", "weight", "d v"], [*eager, *d_eager], [*op[:3], *d_op])

    # a backward that reaches only the statistics gives the prediction no gradient at all
    v = leaves(rows[0])[0]
    _, mse, _ = kernels.adaptive_velocity_loss(v, rows[1], dbds, 1.0, 0.01)
    assert not mse.requires_grad


def test_eager_path_is_not_the_custom_op(kernels, device):
    """The eager call's autograd node is the Function's, not torch.library's wrapper."""
    seed_all(2)
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    shift, scale = (torch.randn(2, 16, device=device) for _ in range(2))
    y = kernels.modulated_layer_norm(x, shift, scale)
    assert "ModulatedLayerNormFunction" in type(y.grad_fn).__name__
    for route in ROUTES:
        y_op = _op("modulated_layer_norm_forward", route)(x, shift, scale, 1e-6)
        assert "ModulatedLayerNormFunction" not in type(y_op.grad_fn).__name__, route
