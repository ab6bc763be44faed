"""soflow_fast.ops: the reference semantics of the shared ops, and which path each call takes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from soflow_fast import ops
from tests.utils import assert_rel_close, raises_naming

# Calls with the kernels on for any device run where they can: the GPU if there is one, else the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = (
    "modulated_layer_norm",
    "gated_residual_modulated_layer_norm",
    "euler_consistency_loss",
    "adaptive_velocity_loss",
)


# ----------------------------------------------------------------------------------------------
# Reference semantics, checked against a plain per-sample loop in float64
# ----------------------------------------------------------------------------------------------


def test_modulated_layer_norm_ref_formula():
    x, shift, scale = torch.randn(3, 5, 7, dtype=torch.float64), *torch.randn(2, 3, 7, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert_rel_close(ops.modulated_layer_norm_ref(x, shift, scale), expected, 1e-12)
    h, gate = torch.randn_like(x), torch.randn(3, 7, dtype=torch.float64)
    x_new, y = ops.gated_residual_modulated_layer_norm_ref(x, h, gate, shift, scale)
    assert_rel_close(x_new, x + gate[:, None] * h, 1e-12)
    assert_rel_close(y, ops.modulated_layer_norm_ref(x_new, shift, scale), 1e-12)


def _coefficients(trig: bool, time: float, s: float) -> tuple[float, float]:
    """(a, b) of f(x, time, s) = a x + b F."""
    if trig:
        return math.cos(math.pi / 2 * (s - time)), math.sin(math.pi / 2 * (s - time))
    return 1.0, s - time


@pytest.mark.parametrize("trig", [False, True])
def test_consistency_loss_ref_against_a_loop(trig):
    batch, p, eps = 4, 0.75, 1e-3
    nn_t, x_t, x_l, nn_l = (torch.randn(batch, 2, 3, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.7, 0.3], dtype=torch.float64)
    s = torch.tensor([0.1, 0.2, 0.9, 0.0], dtype=torch.float64)  # sample 2 has s > t
    l = t + (s - t) * 0.4
    terms, ms, ws, grads = [], [], [], []
    for i in range(batch):
        a_t, b_t = _coefficients(trig, float(t[i]), float(s[i]))
        a_l, b_l = _coefficients(trig, float(l[i]), float(s[i]))
        f_t = a_t * x_t[i] + b_t * nn_t[i]
        f_l = a_l * x_l[i] + b_l * nn_l[i]
        dq = (f_t - f_l) / (t[i] - l[i])
        m = (dq**2).mean()
        w = (m + eps) ** -p
        sign = math.copysign(1.0, b_t)
        terms.append(sign * (nn_t[i] * dq).mean() * w)
        ms.append(m)
        ws.append(w)
        grads.append(sign * dq * w / (batch * dq.numel()))
    nn = nn_t.clone().requires_grad_(True)
    loss, mse, weight = ops.euler_consistency_loss_ref(nn, x_t, x_l, nn_l, t, l, s, p, eps, trig=trig)
    loss.backward()
    assert_rel_close(loss, torch.stack(terms).mean(), 1e-12, "loss")
    assert_rel_close(mse, torch.stack(ms).mean(), 1e-12, "mse")
    assert_rel_close(weight, torch.stack(ws).mean(), 1e-12, "weight")
    assert_rel_close(nn.grad, torch.stack(grads), 1e-12, "grad")
    assert not mse.requires_grad and not weight.requires_grad


@pytest.mark.parametrize("dbds", ["tensor", "float"])
def test_velocity_loss_ref_against_a_loop(dbds):
    batch, p, eps = 3, 1.0, 0.01
    v, target = torch.randn(batch, 5, dtype=torch.float64), torch.randn(batch, 5, dtype=torch.float64)
    db = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64) if dbds == "tensor" else -1.5
    terms, ms, ws, grads = [], [], [], []
    for i in range(batch):
        delta = v[i] - target[i]
        m = (delta**2).mean()
        w = 1.0 / (abs(float(db[i] if dbds == "tensor" else db)) * (m + eps) ** p)
        terms.append(w * m)
        ms.append(m)
        ws.append(w)
        grads.append(w * 2 * delta / (batch * delta.numel()))
    vv = v.clone().requires_grad_(True)
    loss, mse, weight = ops.adaptive_velocity_loss_ref(vv, target, db, p, eps)
    loss.backward()
    assert_rel_close(loss, torch.stack(terms).mean(), 1e-12, "loss")
    assert_rel_close(mse, torch.stack(ms).mean(), 1e-12, "mse")
    assert_rel_close(weight, torch.stack(ws).mean(), 1e-12, "weight")
    assert_rel_close(vv.grad, torch.stack(grads), 1e-12, "grad")


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the fused ops called, recorded by wrapping the kernel package's entry points."""
    module = ops.load_kernels()
    calls = []
    for name in OPS:
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _call_all(dtype=torch.float32, device=DEVICE):
    x, h = torch.randn(2, 3, 8, dtype=dtype, device=device), torch.randn(2, 3, 8, dtype=dtype, device=device)
    gate, shift, scale = (torch.randn(2, 8, dtype=dtype, device=device) for _ in range(3))
    times = torch.tensor([0.9, 0.6], device=device), torch.tensor([0.7, 0.5], device=device)
    t, l = times
    s = torch.tensor([0.1, 0.2], device=device)
    ops.modulated_layer_norm(x, shift, scale)
    ops.gated_residual_modulated_layer_norm(x, h, gate, shift, scale)
    ops.euler_consistency_loss(x, h, x, h, t, l, s, 1.0, 0.01)
    ops.adaptive_velocity_loss(x, h, 1.0, 1.0, 0.01)


def test_cpu_default_is_the_reference(kernel_calls):
    _call_all(device="cpu")
    with ops.set_use_fused_kernels(True):  # without any_device, fused kernels take CUDA tensors only
        _call_all(device="cpu")
    assert kernel_calls == []


def test_any_device_switch(kernel_calls):
    """With any_device every enabled op takes the kernels whatever the device (on a CPU, the
    interpreter); a with block holds the setting and restores the one before it."""
    with ops.set_use_fused_kernels(True, any_device=True):
        _call_all()
        assert kernel_calls == list(OPS)
        with ops.set_use_fused_kernels(False):
            _call_all()
        assert ops.fused_kernels_enabled()
        _call_all()
    _call_all(device="cpu")
    assert kernel_calls == list(OPS) * 2


def test_switch_restored_after_an_error(kernel_calls):
    before = ops.fused_groups()
    with raises_naming(RuntimeError, "inside"):
        with ops.set_use_fused_kernels("losses", any_device=True):
            raise RuntimeError("inside")
    assert ops.fused_groups() == before
    with ops.set_use_fused_kernels(True):  # any_device is off again: CPU tensors take the reference
        _call_all(device="cpu")
    assert kernel_calls == []


def test_uncovered_inputs_take_the_reference(kernel_calls):
    with ops.set_use_fused_kernels(True, any_device=True):
        _call_all(dtype=torch.float64)
        vec = torch.randn(2, 8, device=DEVICE)
        ops.modulated_layer_norm(vec, vec, vec)  # not (B, N, D)
        empty = torch.randn(0, 4, device=DEVICE)
        ops.adaptive_velocity_loss(empty, empty, 1.0, 1.0, 0.01)  # empty batch
    assert kernel_calls == []


def test_fused_results_match_the_reference():
    torch.manual_seed(0)
    x, shift, scale = (torch.randn(*shape, device=DEVICE) for shape in ((2, 3, 8), (2, 8), (2, 8)))
    with ops.set_use_fused_kernels(True, any_device=True):
        fused = ops.modulated_layer_norm(x, shift, scale)
    assert_rel_close(fused, ops.modulated_layer_norm_ref(x, shift, scale), 1e-5)


def test_process_switch_values():
    with ops.set_use_fused_kernels(False):  # restores the process's setting after the test
        assert not ops.fused_kernels_enabled()
        ops.set_use_fused_kernels(True)
        assert ops.fused_kernels_enabled()
        assert ops.fused_groups() == set(ops.FUSED_GROUPS)
        ops.set_use_fused_kernels("losses")
        assert ops.fused_kernels_enabled() and ops.fused_kernels_enabled("losses")
        assert not ops.fused_kernels_enabled("layer_norms")
        ops.set_use_fused_kernels("layer_norms")
        assert ops.fused_groups() == {"layer_norms"}
        ops.set_use_fused_kernels("all")
        assert ops.fused_groups() == set(ops.FUSED_GROUPS)
        ops.set_use_fused_kernels("none")
        assert not ops.fused_kernels_enabled()
        with raises_naming(ValueError, "all, none", "layer_norms, losses", "'ln'"):
            ops.set_use_fused_kernels("ln")
        with raises_naming(ValueError, "'ln'", "layer_norms, losses"):
            ops.fused_kernels_enabled("ln")


def test_config_fused_ops_are_the_ops_groups():
    from soflow_fast.parallel import FUSED_OPS

    assert set(FUSED_OPS) == {"all", *ops.FUSED_GROUPS}
    assert {op for group in ops.FUSED_GROUPS.values() for op in group} == set(OPS)


@pytest.mark.parametrize("group", ["layer_norms", "losses"])
def test_one_group_fuses_only_its_ops(kernel_calls, group):
    """With one group switched on, only its ops take the kernels (on a CPU: the interpreter)."""
    with ops.set_use_fused_kernels(group, any_device=True):
        _call_all()
    assert kernel_calls == list(ops.FUSED_GROUPS[group])


def test_environment_switch_takes_a_group():
    code = "from soflow_fast import ops; print(sorted(ops.fused_groups()))"
    for value, want in (("1", "['layer_norms', 'losses']"), ("losses", "['losses']"), ("0", "[]")):
        env = {**os.environ, ops.USE_FUSED_ENV: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, (value, out.stdout, out.stderr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the switch without any_device")
def test_cuda_tensors_take_the_kernels(kernel_calls):
    with ops.set_use_fused_kernels(True):
        _call_all(device="cuda")
        assert kernel_calls == list(OPS)
        with ops.set_use_fused_kernels(False):
            _call_all(device="cuda")
    assert kernel_calls == list(OPS)


def test_reference_namespace():
    assert ops.reference.modulated_layer_norm is ops.modulated_layer_norm_ref
    assert ops.reference.adaptive_velocity_loss is ops.adaptive_velocity_loss_ref
    x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    expected = F.layer_norm(x, (8,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert torch.equal(ops.modulated_layer_norm(x, shift, scale), expected)
