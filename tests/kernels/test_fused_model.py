"""The DiT and the SoFlow objective with every fused op on equal the reference path (fp32)."""

from __future__ import annotations

import pytest
import torch

from soflow_fast import ops
from soflow_fast.compiled import CompiledLoss
from soflow_fast.models import DiT
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from tests.utils import assert_rel_close


def _random_dit(device) -> DiT:
    torch.manual_seed(0)
    # odd width (3 heads x 12 = 36) and 16 tokens; every weight random so all paths carry signal
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=36, depth=2, num_heads=3, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.to(device)


def _run(model, obj, x0, y, fused):
    model.zero_grad(set_to_none=True)
    with ops.set_use_fused_kernels(fused, any_device=True):
        out = model(
            x0, torch.full((x0.shape[0],), 0.7, device=x0.device), torch.full((x0.shape[0],), 0.2, device=x0.device), y
        )
        loss, logs = obj.loss(model, x0, y, step=10, generator=torch.Generator(x0.device).manual_seed(4))
        (loss + out.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), loss.detach(), {k: v.detach() for k, v in logs.items()}, grads


def test_dit_and_objective_fused_equal_reference(kernels, device):
    model = _random_dit(device)
    torch.manual_seed(1)
    x0 = torch.randn(5, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (5,), device=device)
    for cfg in (SoFlowConfig(cfg_drop_rate=0.4), SoFlowConfig(coefficient_type="Trig", noising_type="Trig")):
        obj = SoFlowObjective(cfg, num_classes=10)
        ref = _run(model, obj, x0, y, fused=False)
        fused = _run(model, obj, x0, y, fused=True)
        assert_rel_close(fused[0], ref[0], 1e-5, "DiT output")
        assert_rel_close(fused[1], ref[1], 1e-5, "loss")
        for k in ref[2]:
            assert_rel_close(fused[2][k], ref[2][k], 1e-5, f"log {k}")
        assert ref[3].keys() == fused[3].keys() and len(ref[3]) == 35
        for name in ref[3]:
            assert_rel_close(fused[3][name], ref[3][name], 1e-5, f"grad {name}")


@pytest.mark.slow
def test_whole_loss_compile_with_fused_ops_equals_eager_reference(kernels, device):
    """SoFlow's whole-loss compile (Inductor) with the fused custom ops inside the graph: no fallback
    to eager, and loss and every gradient equal the eager reference path's."""
    model = _random_dit(device)
    torch.manual_seed(1)
    x0 = torch.randn(5, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (5,), device=device)
    obj = SoFlowObjective(SoFlowConfig(cfg_drop_rate=0.4), num_classes=10)
    compiled_loss = CompiledLoss(obj.loss_from_draws)

    def run(fused, compiled):
        model.zero_grad(set_to_none=True)
        with ops.set_use_fused_kernels(fused, any_device=True):
            draws = obj.draw(x0, y, step=10, generator=torch.Generator(device).manual_seed(4))
            loss_fn = compiled_loss if compiled else obj.loss_from_draws
            loss, _ = loss_fn(model, x0, y, draws)
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run(fused=False, compiled=False)
    loss, grads = run(fused=True, compiled=True)
    assert compiled_loss.error is None, compiled_loss.error
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-5, f"grad {name}")
