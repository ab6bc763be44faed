"""Parity of the fused SoFlow losses with the PyTorch reference: loss, logged statistics, gradient."""

from __future__ import annotations

import pytest
import torch

from soflow_fast import ops
from tests.kernels.utils import DTYPES, check_all, leaves, requires_cuda, seed_all

# (B, per-sample shape): an odd width (100 = 4x5x5, 1023), batch 3 and batch 1, a CIFAR-sized
# latent (3x32x32), and rows longer than one register block: 9000 with batch 2 is split into two
# slices (the last ragged), 8193 with batch 4 is a single slice of the split path.
SHAPES = [(3, (4, 5, 5)), (2, (1023,)), (4, (3, 32, 32)), (2, (9000,)), (4, (8193,)), (1, (64,))]


def _times(batch, device):
    t = torch.rand(batch, device=device) * 0.8 + 0.2
    # s above t for the last sample so that both signs of b(t, s) are covered.
    s = torch.rand(batch, device=device) * t
    s[-1] = torch.clamp(t[-1] + 0.1, max=1.0) if batch > 1 else s[-1]
    l = t + (s - t) * (0.1 + 0.5 * torch.rand(batch, device=device))
    return t, l, s


def _consistency_inputs(batch, dims, dtype, device):
    nn_t, x_t, x_l, nn_l = (torch.randn(batch, *dims, device=device).to(dtype) for _ in range(4))
    return (nn_t, x_t, x_l, nn_l, *_times(batch, device))


@pytest.mark.parametrize("trig", [False, True], ids=["euler", "trig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_euler_consistency_loss(kernels, device, shape, dtype, trig):
    seed_all(0)
    batch, dims = shape
    nn_t, x_t, x_l, nn_l, t, l, s = _consistency_inputs(batch, dims, dtype, device)
    p, eps = 0.75, 1e-3
    grad_out = 0.6  # the SCM share of the batch scales the loss; the gradient must follow it

    def run(fn, nn, *rest, **kw):
        (nn,) = leaves(nn)
        loss, mse, weight = fn(nn, *rest, p, eps, trig, **kw)
        (grad,) = torch.autograd.grad(loss * grad_out, nn)
        return [loss, mse, weight, grad]

    out = run(kernels.euler_consistency_loss, nn_t, x_t, x_l, nn_l, t, l, s)
    low = run(ops.euler_consistency_loss_ref, nn_t, x_t, x_l, nn_l, t, l, s, upcast=False)
    ref = run(ops.euler_consistency_loss_ref, *(v.float() for v in (nn_t, x_t, x_l, nn_l, t, l, s)))
    assert [v.dtype for v in out] == [torch.float32] * 3 + [dtype]
    check_all(["loss", "mse", "weight", "d nn_t"], out, low, ref, dtype)


@pytest.mark.parametrize("dbds_kind", ["tensor", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adaptive_velocity_loss(kernels, device, shape, dtype, dbds_kind):
    seed_all(1)
    batch, dims = shape
    v_pred, target = (torch.randn(batch, *dims, device=device).to(dtype) for _ in range(2))
    # Negative entries check the |db/ds| (Trig noising has db/ds = pi/2 cos(...) of either sign).
    dbds = (torch.rand(batch, device=device) + 0.5) * torch.where(torch.arange(batch, device=device) % 2 == 0, 1, -1)
    dbds = dbds if dbds_kind == "tensor" else -1.25
    p, eps = 1.0, 0.01
    grad_out = 0.75

    def run(fn, v, tgt, db, **kw):
        (v,) = leaves(v)
        loss, mse, weight = fn(v, tgt, db, p, eps, **kw)
        (grad,) = torch.autograd.grad(loss * grad_out, v)
        return [loss, mse, weight, grad]

    out = run(kernels.adaptive_velocity_loss, v_pred, target, dbds)
    low = run(ops.adaptive_velocity_loss_ref, v_pred, target, dbds, upcast=False)
    ref = run(ops.adaptive_velocity_loss_ref, v_pred.float(), target.float(), dbds)
    assert [v.dtype for v in out] == [torch.float32] * 3 + [dtype]
    check_all(["loss", "mse", "weight", "d v_pred"], out, low, ref, dtype)


def test_only_the_prediction_gets_a_gradient(kernels, device):
    """dq, w, targets and times are constants; mse and weight are logging values with no graph."""
    seed_all(2)
    nn_t, x_t, x_l, nn_l, t, l, s = leaves(*_consistency_inputs(3, (10,), torch.float32, device))
    loss, mse, weight = kernels.euler_consistency_loss(nn_t, x_t, x_l, nn_l, t, l, s, 1.0, 0.01)
    assert not mse.requires_grad and not weight.requires_grad
    loss.backward()
    assert nn_t.grad is not None
    assert all(v.grad is None for v in (x_t, x_l, nn_l, t, l, s))

    v_pred, target = leaves(*(torch.randn(3, 10, device=device) for _ in range(2)))
    (dbds,) = leaves(torch.rand(3, device=device) + 0.5)
    loss, mse, weight = kernels.adaptive_velocity_loss(v_pred, target, dbds, 1.0, 0.01)
    assert not mse.requires_grad and not weight.requires_grad
    loss.backward()
    assert v_pred.grad is not None and target.grad is None and dbds.grad is None


def test_times_in_any_shape(kernels, device):
    """The objective may hold times as (B, 1, 1, 1) for broadcasting; only their B values matter."""
    seed_all(3)
    nn_t, x_t, x_l, nn_l, t, l, s = _consistency_inputs(3, (2, 4, 4), torch.float32, device)
    flat = kernels.euler_consistency_loss(nn_t, x_t, x_l, nn_l, t, l, s, 1.0, 0.01)
    shaped = kernels.euler_consistency_loss(nn_t, x_t, x_l, nn_l, *(v.view(3, 1, 1, 1) for v in (t, l, s)), 1.0, 0.01)
    for a, b in zip(flat, shaped, strict=True):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_training_shapes_on_gpu(kernels, dtype):
    """Compiled kernels at the ImageNet latent size (4x32x32) and batch 256."""
    seed_all(4)
    nn_t, x_t, x_l, nn_l, t, l, s = _consistency_inputs(256, (4, 32, 32), dtype, torch.device("cuda"))
    outs = []
    for fn, args, kw in (
        (kernels.euler_consistency_loss, (nn_t, x_t, x_l, nn_l, t, l, s), {}),
        (ops.euler_consistency_loss_ref, (nn_t, x_t, x_l, nn_l, t, l, s), {"upcast": False}),
        (ops.euler_consistency_loss_ref, tuple(v.float() for v in (nn_t, x_t, x_l, nn_l, t, l, s)), {}),
    ):
        nn = args[0].detach().clone().requires_grad_(True)
        loss, mse, weight = fn(nn, *args[1:], 1.0, 0.01, **kw)
        outs.append([loss, mse, weight, torch.autograd.grad(loss, nn)[0]])
    check_all(["loss", "mse", "weight", "d nn_t"], *outs, dtype)
