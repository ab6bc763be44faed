"""Helpers for the kernel parity tests: seeding, verbose comparisons, per-dtype tolerances."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from soflow_fast import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# fp32: the kernel against the fp32 reference, as norm(diff) / norm(ref).
FP32_RTOL = 1e-5
# bf16/fp16: the kernel's error against the fp32 reference may be at most this many times
# PyTorch's own error when it computes in the low precision, plus a floor for the cases where
# both are at fp32 rounding level (values that PyTorch promotes to fp32 anyway).
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-5

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled (not interpreted) Triton kernels"
)


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """norm(actual - expected) / norm(expected) in float64 (the plain norm of the difference if expected is 0)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> str:
    """Mismatch count (elements off by more than rtol * max|expected|) and the worst element."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    if diff.numel() == 0:
        return "empty"
    worst = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
    worst = tuple(int(i) for i in worst)
    bound = rtol * e.abs().max().item()
    n_bad = int((diff > bound).sum())
    return (
        f"{n_bad}/{diff.numel()} elements off by more than {bound:.3e}; worst at {worst}: "
        f"{a[worst].item():.8g} vs {e[worst].item():.8g} (|diff| {diff[worst].item():.3e})"
    )


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = FP32_RTOL) -> None:
    """Relative-norm check with a verbose report."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}; {describe_mismatch(actual, expected, rtol)}"


def assert_close_low_precision(
    actual: torch.Tensor, torch_low: torch.Tensor, expected: torch.Tensor, name: str
) -> None:
    """The kernel's error against the fp32 reference within 2x PyTorch's own low-precision error (+ floor)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    torch_err = rel_err(torch_low, expected)
    bound = LOW_PRECISION_FACTOR * torch_err + LOW_PRECISION_FLOOR
    assert err <= bound, (
        f"{name}: relative error {err:.3e} > {bound:.3e} (PyTorch's own low-precision error {torch_err:.3e}); "
        f"{describe_mismatch(actual, expected, bound)}"
    )


def check_all(
    names: list[str],
    actual: list[torch.Tensor],
    torch_low: list[torch.Tensor],
    expected: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Compare every output and gradient; all failures are reported together."""
    failures = []
    for name, a, lo, e in zip(names, actual, torch_low, expected, strict=True):
        try:
            if dtype == torch.float32:
                assert_close_fp32(a, e, name)
            else:
                assert_close_low_precision(a, lo, e, name)
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaf copies that require grad."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def block_and_losses(x, h, gate, shift, scale, shift2, scale2, nn_t, x_t, x_l, nn_l, t, l, s, v, tgt, dbds):
    """A DiT seam (gated residual + two modulated norms) feeding both SoFlow losses."""
    x_new, y = ops.gated_residual_modulated_layer_norm(x, h, gate, shift, scale)
    z = ops.modulated_layer_norm(x_new + torch.tanh(y), shift2, scale2)
    scm, scm_mse, scm_w = ops.euler_consistency_loss(nn_t * z.mean(), x_t, x_l, nn_l, t, l, s, 1.0, 0.01)
    fm, fm_mse, fm_w = ops.adaptive_velocity_loss(v * z.std(), tgt, dbds, 1.0, 0.01)
    return 0.25 * fm + 0.75 * scm, torch.stack([scm_mse, scm_w, fm_mse, fm_w])


def block_inputs(device: torch.device) -> list[torch.Tensor]:
    """Random inputs of ``block_and_losses``: batch 3, 5 tokens of width 100, 2x4x4 rows."""
    batch, tokens, width = 3, 5, 100
    seq = [torch.randn(batch, tokens, width, device=device) for _ in range(2)]
    vecs = [0.5 * torch.randn(batch, width, device=device) for _ in range(5)]
    rows = [torch.randn(batch, 2, 4, 4, device=device) for _ in range(6)]
    t = torch.rand(batch, device=device) * 0.8 + 0.2
    s = torch.rand(batch, device=device) * t
    l = t + (s - t) * 0.3
    dbds = torch.rand(batch, device=device) + 0.5
    return [*seq, *vecs, *rows[:4], t, l, s, *rows[4:], dbds]


def run_block(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``fn(*inputs)`` on fresh leaves: its loss and stats, and the gradients of the loss."""
    args = leaves(*inputs)
    loss, stats = fn(*args)
    differentiable = [args[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 14)]  # x, h, vectors, nn_t, v
    grads = torch.autograd.grad(loss, differentiable)
    return [loss, stats, *grads]
