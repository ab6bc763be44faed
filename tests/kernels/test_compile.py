"""torch.compile(fullgraph=True) traces through the fused ops (triton_ops on CUDA, custom ops on the
CPU under the interpreter, each with an autograd registration): no graph break, forward and backward
equal to eager."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from soflow_fast import ops
from tests.kernels.utils import block_and_losses, block_inputs, check_all, run_block, seed_all

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_ops_compile_fullgraph(kernels, device, backend):
    seed_all(0)
    inputs = block_inputs(device)
    torch._dynamo.reset()
    with ops.set_use_fused_kernels(True, any_device=True):
        eager = run_block(block_and_losses, inputs)
        compiled = run_block(torch.compile(block_and_losses, fullgraph=True, backend=backend), inputs)
    with ops.set_use_fused_kernels(False):
        reference = run_block(block_and_losses, inputs)
    names = ["loss", "stats", "dx", "dh", "dgate", "dshift", "dscale", "dshift2", "dscale2", "d nn_t", "d v"]
    check_all(names, compiled, eager, eager, torch.float32)
    if device.type == "cpu":
        check_all(names, eager, reference, reference, torch.float32)


@pytest.mark.parametrize("triton_op_on_cuda", [True, False], ids=["triton_op_on_cuda", "custom_op_everywhere"])
def test_compiled_graph_holds_the_fused_ops(kernels, device, monkeypatch, triton_op_on_cuda):
    """The Triton path really is inside the compiled graph (not the reference traced instead), as the
    triton_ops on CUDA (unless registry.TRITON_OP_ON_CUDA is off) and as the custom ops otherwise."""
    monkeypatch.setattr(kernels.registry, "TRITON_OP_ON_CUDA", triton_op_on_cuda and kernels.registry.TRITON_OP_ON_CUDA)
    seed_all(1)
    inputs = block_inputs(device)
    seen = set()

    def capture(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    with ops.set_use_fused_kernels(True, any_device=True):
        torch.compile(block_and_losses, fullgraph=True, backend=capture)(*inputs)
    torch._dynamo.reset()
    route = "_triton_op" if device.type == "cuda" and kernels.registry.TRITON_OP_ON_CUDA else ""
    names = [
        "soflow_fast.modulated_layer_norm_forward",
        "soflow_fast.gated_residual_modulated_layer_norm_forward",
        "soflow_fast.euler_consistency_loss_forward",
        "soflow_fast.adaptive_velocity_loss_forward",
    ]
    ours = sorted(target for target in seen if "soflow_fast." in target)
    want = sorted(f"{name}{route}.default" for name in names)
    assert ours == want, f"the graph holds {ours}, expected {want}"


def test_first_kernel_import_inside_compile():
    """In a fresh process with the fused kernels on for any device, the first Triton-path call happens
    while Dynamo is tracing, so the lazy kernel import must not break the graph."""
    script = textwrap.dedent(
        """
        import torch
        from soflow_fast import ops
        ops.set_use_fused_kernels(True, any_device=True)
        assert ops._kernels is None
        torch.manual_seed(0)
        def f(x, shift, scale):
            return ops.modulated_layer_norm(x, shift, scale).square().sum()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        x = torch.randn(2, 3, 40, device=device, requires_grad=True)
        shift, scale = torch.randn(2, 40, device=device), torch.randn(2, 40, device=device)
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, shift, scale).backward()
        assert ops._kernels is not None
        g = x.grad.clone()
        x.grad = None
        with ops.set_use_fused_kernels(False):
            f(x, shift, scale).backward()
        err = ((g - x.grad).norm() / x.grad.norm()).item()
        assert err <= 1e-5, err
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)  # ops must choose the interpreter by itself
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_group_switch_is_traced_and_guarded(kernels, device):
    """The switch's groups decide the path inside a compiled graph: with "losses" on, the graph holds
    the loss ops and not the LayerNorm ops; switching the groups afterwards recompiles rather than
    running the stale path."""
    seed_all(2)
    inputs = block_inputs(device)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(block_and_losses, fullgraph=True, backend=capture)
    with ops.set_use_fused_kernels("losses", any_device=True):
        compiled(*inputs)
    with ops.set_use_fused_kernels("layer_norms", any_device=True):
        compiled(*inputs)
    assert len(graphs) == 2, "switching the groups must recompile"
    for graph, fused, plain in ((graphs[0], "loss", "layer_norm"), (graphs[1], "layer_norm", "loss")):
        ours = {target for target in graph if "soflow_fast." in target}
        assert ours and all(fused in target for target in ours), sorted(ours)
        assert not any(plain in target for target in ours), sorted(ours)
