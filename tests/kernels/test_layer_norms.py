"""Parity of the fused modulated LayerNorm kernels with the PyTorch reference, output and every gradient."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from soflow_fast import ops
from tests.kernels.utils import DTYPES, check_all, leaves, requires_cuda, seed_all

# (B, N, D): odd widths (100, 1023), one token, batch 3, the DiT widths 768 and 1152 (padded to
# 1024 and 2048 lanes), and enough tokens for several token tiles per sample with a ragged last.
SHAPES = [(3, 17, 100), (2, 1, 1023), (4, 9, 768), (2, 20, 1152), (1, 5, 64)]


def _inputs(shape, dtype, device, gated):
    batch, tokens, width = shape
    # An offset and a spread in x check that the statistics survive a mean far from zero.
    x = (torch.randn(batch, tokens, width, device=device) * 2 + 1).to(dtype)
    vecs = [(0.5 * torch.randn(batch, width, device=device)).to(dtype) for _ in range(3 if gated else 2)]
    h = torch.randn(batch, tokens, width, device=device).to(dtype)
    return x, h, vecs


def _grads(outputs, inputs, cotangents):
    return list(torch.autograd.grad(outputs, inputs, cotangents))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_modulated_layer_norm(kernels, device, shape, dtype):
    seed_all(0)
    x, _, (shift, scale) = _inputs(shape, dtype, device, gated=False)
    dy = torch.randn(shape, device=device).to(dtype)

    args = leaves(x, shift, scale)
    y = kernels.modulated_layer_norm(*args)
    out = [y, *_grads(y, args, dy)]

    low = leaves(x, shift, scale)
    y_low = ops.modulated_layer_norm_ref(*low)
    out_low = [y_low, *_grads(y_low, low, dy)]

    ref = leaves(x.float(), shift.float(), scale.float())
    y_ref = ops.modulated_layer_norm_ref(*ref, upcast=True)
    out_ref = [y_ref, *_grads(y_ref, ref, dy.float())]

    assert [t.dtype for t in out] == [t.dtype for t in out_low]
    check_all(["y", "dx", "dshift", "dscale"], out, out_low, out_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_modulated_layer_norm(kernels, device, shape, dtype):
    seed_all(1)
    x, h, (gate, shift, scale) = _inputs(shape, dtype, device, gated=True)
    dxn = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)

    args = leaves(x, h, gate, shift, scale)
    x_new, y = kernels.gated_residual_modulated_layer_norm(*args)
    out = [x_new, y, *_grads((x_new, y), args, (dxn, dy))]

    low = leaves(x, h, gate, shift, scale)
    x_new_low, y_low = ops.gated_residual_modulated_layer_norm_ref(*low)
    out_low = [x_new_low, y_low, *_grads((x_new_low, y_low), low, (dxn, dy))]

    ref = leaves(*(t.float() for t in (x, h, gate, shift, scale)))
    x_new_ref, y_ref = ops.gated_residual_modulated_layer_norm_ref(*ref, upcast=True)
    out_ref = [x_new_ref, y_ref, *_grads((x_new_ref, y_ref), ref, (dxn.float(), dy.float()))]

    assert [t.dtype for t in out] == [t.dtype for t in out_low]
    check_all(["x_new", "y", "dx", "dh", "dgate", "dshift", "dscale"], out, out_low, out_ref, dtype)


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("used", ["y_only", "x_new_only"])
def test_gated_one_output_used(kernels, device, monkeypatch, used, path):
    """Only one of the two outputs gets a gradient: autograd hands the backward None for the other, on
    the eager path (the autograd.Function) and in a compiled graph (the custom op) alike. Every
    gradient equals the reference's, and an unused x_new is not read (no zeros in its place)."""
    op = sys.modules["soflow_fast.kernels.gated_residual_modulated_layer_norm"].GATED_RESIDUAL_MODULATED_LAYER_NORM
    formula = op.backward
    dx_new_given = []

    def spy(launch, ctx, *grads):
        def launch_spy(dx_new, *args):
            dx_new_given.append(dx_new is not None)
            return launch(dx_new, *args)

        return formula(launch_spy, ctx, *grads)

    # every route's backward calls the op's formula with the backward launch of its own route
    monkeypatch.setattr(op, "backward", spy)
    seed_all(2)
    x, h, (gate, shift, scale) = _inputs((3, 7, 100), torch.float32, device, gated=True)
    weights = torch.linspace(-1, 1, x.shape[-1], device=device)

    def loss(fn, *args):
        x_new, y = fn(*args)
        return ((y if used == "y_only" else x_new) * weights).sum()

    fused = functools.partial(loss, kernels.gated_residual_modulated_layer_norm)
    if path == "compiled":
        torch._dynamo.reset()
        fused = torch.compile(fused, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (fused, functools.partial(loss, ops.gated_residual_modulated_layer_norm_ref)):
        args = leaves(x, h, gate, shift, scale)
        out = fn(*args)
        grads = torch.autograd.grad(out, args, allow_unused=True)  # the reference's x_new needs no shift, scale
        results.append([out, *(torch.zeros_like(a) if g is None else g for g, a in zip(grads, args, strict=True))])
    check_all(["loss", "dx", "dh", "dgate", "dshift", "dscale"], results[0], results[1], results[1], torch.float32)
    assert dx_new_given == [used == "x_new_only"], dx_new_given


def test_mixed_dtypes_follow_type_promotion(kernels, device):
    """An fp32 residual stream with bf16 modulation (as under autocast): dtypes as PyTorch promotes them."""
    seed_all(3)
    x, h, (gate, shift, scale) = _inputs((2, 6, 100), torch.float32, device, gated=True)
    gate, shift, scale = (v.bfloat16() for v in (gate, shift, scale))
    args = leaves(x, h, gate, shift, scale)
    x_new, y = kernels.gated_residual_modulated_layer_norm(*args)
    out = [x_new, y, *_grads((x_new, y), args, (torch.ones_like(x_new), torch.ones_like(y)))]
    low = leaves(x, h, gate, shift, scale)
    x_new_low, y_low = ops.gated_residual_modulated_layer_norm_ref(*low)
    out_low = [x_new_low, y_low, *_grads((x_new_low, y_low), low, (torch.ones_like(x_new), torch.ones_like(y)))]
    assert [t.dtype for t in out] == [t.dtype for t in out_low]
    ref = leaves(*(t.float() for t in (x, h, gate, shift, scale)))
    x_new_ref, y_ref = ops.gated_residual_modulated_layer_norm_ref(*ref, upcast=True)
    out_ref = [x_new_ref, y_ref, *_grads((x_new_ref, y_ref), ref, (torch.ones_like(x_new), torch.ones_like(y)))]
    check_all(["x_new", "y", "dx", "dh", "dgate", "dshift", "dscale"], out, out_low, out_ref, torch.bfloat16)


def test_backward_is_deterministic(kernels, device):
    """The per-sample sums use fixed-order partials, not atomics: two runs agree bit for bit."""
    seed_all(4)
    x, h, (gate, shift, scale) = _inputs((3, 20, 100), torch.bfloat16, device, gated=True)
    runs = []
    for _ in range(2):
        args = leaves(x, h, gate, shift, scale)
        x_new, y = kernels.gated_residual_modulated_layer_norm(*args)
        runs.append(_grads((x_new, y), args, (torch.ones_like(x_new), torch.ones_like(y))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(kernels, device):
    seed_all(5)
    x = torch.randn(3, 100, 9, device=device).transpose(1, 2)  # (3, 9, 100), not contiguous
    shift, scale = (torch.randn(100, 3, device=device).t() for _ in range(2))  # (3, 100), not contiguous
    ref = ops.modulated_layer_norm_ref(x, shift, scale)
    check_all(["y"], [kernels.modulated_layer_norm(x, shift, scale)], [ref], [ref], torch.float32)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dit_shapes_on_gpu(kernels, dtype):
    """Compiled kernels at a DiT-XL shape (many token tiles per sample, padded width 1152)."""
    seed_all(6)
    shape = (8, 256, 1152)
    x, h, (gate, shift, scale) = _inputs(shape, dtype, torch.device("cuda"), gated=True)
    cot = (torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype))
    args = leaves(x, h, gate, shift, scale)
    x_new, y = kernels.gated_residual_modulated_layer_norm(*args)
    out = [x_new, y, *_grads((x_new, y), args, cot)]
    low = leaves(x, h, gate, shift, scale)
    x_new_low, y_low = ops.gated_residual_modulated_layer_norm_ref(*low)
    out_low = [x_new_low, y_low, *_grads((x_new_low, y_low), low, cot)]
    ref = leaves(*(t.float() for t in (x, h, gate, shift, scale)))
    x_new_ref, y_ref = ops.gated_residual_modulated_layer_norm_ref(*ref, upcast=True)
    out_ref = [x_new_ref, y_ref, *_grads((x_new_ref, y_ref), ref, tuple(c.float() for c in cot))]
    check_all(["x_new", "y", "dx", "dh", "dgate", "dshift", "dscale"], out, out_low, out_ref, dtype)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("width", [768, 1152])
def test_pipelined_backward_equals_plain_loop(kernels, device, monkeypatch, stages, width):
    """LN_BWD_STAGES > 1 makes a GPU load each token tile ahead into shared memory (cp.async): where
    the tile is read from changes, the arithmetic does not, so every gradient equals the plain loop's
    bit for bit. Several tiles per sample, several steps per tile, a ragged last tile; on the CPU the
    interpreter ignores num_stages and this checks the plumbing."""
    utils = sys.modules["soflow_fast.kernels.utils"]
    ln = sys.modules["soflow_fast.kernels.modulated_layer_norm"]
    gated = sys.modules["soflow_fast.kernels.gated_residual_modulated_layer_norm"]
    seed_all(7)
    shape = (1, 21, width) if device.type == "cpu" else (2, 1030, width)
    x, h, (gate, _, scale) = _inputs(shape, torch.bfloat16, device, gated=True)
    dy, dxn = (torch.randn(shape, device=device).to(torch.bfloat16) for _ in range(2))
    block_n, block_d, _ = utils.ln_launch(width, backward=True)
    rows_per_tile, _ = utils.tiling(shape[0], shape[1], block_n, device, utils.LN_BWD_PROGRAMS_PER_SM)
    assert rows_per_tile >= 2 * block_n and shape[1] % rows_per_tile != 0  # the loop runs, and a tile is ragged

    def backwards():
        plain = ln.modulated_layer_norm_bwd(dy, x, scale, 1e-6, torch.bfloat16)
        fused = gated.gated_residual_modulated_layer_norm_bwd(
            dxn, dy, x, h, gate, scale, 1e-6, torch.bfloat16, torch.bfloat16
        )
        return [*plain, *fused]

    want = backwards()
    monkeypatch.setattr(utils, "LN_BWD_STAGES", stages)
    assert utils.ln_bwd_stages(block_n, block_d, 4, 2) == stages  # not lowered at these widths
    got = backwards()
    names = ["dx", "dshift", "dscale", "gated dx", "dh", "dgate", "gated dshift", "gated dscale"]
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


def test_prefetch_stages_fit_shared_memory(kernels):
    """Requested stages are lowered until the buffers loaded ahead fit LN_BWD_PREFETCH_BYTES."""
    utils = sys.modules["soflow_fast.kernels.utils"]
    budget = utils.LN_BWD_PREFETCH_BYTES
    # bf16 gated backward with dx_new: 4 tiles of 4 x 1024 per step, 32 KiB per stage ahead
    assert utils.ln_bwd_stages(4, 1024, 4, 2, requested=3) == 3
    # fp32 doubles it: two stages ahead would take 128 KiB
    assert utils.ln_bwd_stages(4, 1024, 4, 4, requested=3) == 1 + budget // (4 * 4096 * 4)
    # one 16384-wide row, 4 tiles: one stage ahead is already 128 KiB, so the plain loop
    assert utils.ln_bwd_stages(1, 16384, 4, 2, requested=2) == 1
    assert utils.ln_bwd_stages(4, 1024, 2, 2, requested=1) == 1
