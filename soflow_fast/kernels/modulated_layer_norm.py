"""Fused adaLN modulation: y = LayerNorm(x) * (1 + scale) + shift, forward and backward.

x is (B, N, D); shift and scale are per-sample (B, D) vectors; the LayerNorm carries no affine
weights. Statistics and accumulation run in fp32 whatever the input dtypes.

Reduction design for dshift = sum_n dy and dscale = sum_n dy * xhat (sums over the N tokens of
each sample, the step that makes Liger's LayerNorm backward slow at width 1024): a program owns
one token tile of one sample, keeps the two running sums for its tile in registers while it
streams its rows, and writes one fp32 partial row per gradient to a (B, T, D) buffer; a second,
tiny launch (utils.sum_tiles) adds the T partials in a fixed order. T is chosen so that B * T is
a few programs per SM (utils.PROGRAMS_PER_SM), which keeps the partial buffer at a few percent of
the main traffic (and mostly in L2). Atomics onto a (B, D) fp32 buffer would save that second launch, but their
arrival order changes from run to run, and bitwise-reproducible gradients are worth more to us
than a few microseconds.

The backward recomputes the row mean and rstd from x instead of saving them: it loads x anyway,
so the recomputation is free in a bandwidth-bound kernel, and the op keeps a single output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import FusedOp, library_op
from .utils import (
    ln_backward_launch,
    ln_columns,
    ln_forward_launch,
    ln_rows,
    ln_tile,
    load_f32,
    modulate,
    modulate_backward,
    promote,
    sizes,
    store_partial,
    sum_along,
    sum_tiles,
    to_storage,
    wrap_triton,
)


@triton.jit
def _modln_fwd_kernel(
    X,  # (B, N, D) input
    SHIFT,  # (B, D)
    SCALE,  # (B, D)
    Y,  # (B, N, D) output
    N,
    D,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, cols, cmask = ln_columns(D, BLOCK_D)
    mask, offs = ln_rows(b, tl.program_id(1).to(tl.int64) * BLOCK_N, N, cols, cmask, N, D, BLOCK_N)
    shift = load_f32(SHIFT, b * D + cols, cmask)
    scale = load_f32(SCALE, b * D + cols, cmask)
    y = modulate(load_f32(X, offs, mask), shift, scale, cmask, D, eps)
    tl.store(Y + offs, to_storage(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _modln_bwd_kernel(
    DY,  # (B, N, D) gradient of y
    X,  # (B, N, D) forward input
    SCALE,  # (B, D)
    DX,  # (B, N, D) gradient of x
    PSHIFT,  # (B, T, D) fp32 per-tile partial sums of dy
    PSCALE,  # (B, T, D) fp32 per-tile partial sums of dy * xhat
    N,
    D,
    T,
    ROWS_PER_TILE,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    b, cols, cmask = ln_columns(D, BLOCK_D)
    tile = tl.program_id(1).to(tl.int64)
    scale1 = 1.0 + load_f32(SCALE, b * D + cols, cmask)
    zeros = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_shift, acc_scale = zeros, zeros
    row_start, row_end = ln_tile(tile, ROWS_PER_TILE, N)
    for r0 in tl.range(row_start, row_end, BLOCK_N, num_stages=STAGES):
        mask, offs = ln_rows(b, r0, row_end, cols, cmask, N, D, BLOCK_N)
        x = load_f32(X, offs, mask)
        dy = load_f32(DY, offs, mask)
        dx, xhat = modulate_backward(x, dy, scale1, cmask, D, eps)
        tl.store(DX + offs, to_storage(dx, DX.dtype.element_ty), mask=mask)
        acc_shift += sum_along(dy, 0)
        acc_scale += sum_along(dy * xhat, 0)

    store_partial(PSHIFT, acc_shift, b, tile, T, D, cols, cmask)
    store_partial(PSCALE, acc_scale, b, tile, T, D, cols, cmask)


def modulated_layer_norm_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, traced: bool = False
) -> torch.Tensor:
    """Launch the forward on contiguous (B, N, D) x and (B, D) shift, scale; returns y.

    ``traced``: launch through wrap_triton, as the body of the triton_op (see registry.py).
    """
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    batch, tokens, width = sizes(x)
    y = torch.empty((batch, tokens, width), dtype=promote(x, shift, scale), device=x.device)
    grid, params = ln_forward_launch(batch, tokens, width)
    kernel = wrap_triton(_modln_fwd_kernel) if traced else _modln_fwd_kernel
    kernel[grid](x, shift, scale, y, tokens, width, eps, **params)
    return y


def modulated_layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float, shift_dtype: torch.dtype, traced: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (dx, dshift, dscale) in the dtypes of x, shift and scale."""
    dy, x, scale = dy.contiguous(), x.contiguous(), scale.contiguous()
    run = ln_backward_launch((x, dy), gradients=2)
    dx = torch.empty_like(x)
    kernel = wrap_triton(_modln_bwd_kernel) if traced else _modln_bwd_kernel
    kernel[run.grid](dy, x, scale, dx, *run.partials, *run.sizes, eps, **run.params)
    dshift, dscale = sum_tiles(run.partials, [shift_dtype, scale.dtype], traced)
    return dx, dshift, dscale


def _fake(x, shift, scale, eps):
    return x.new_empty(x.shape, dtype=promote(x, shift, scale))


def _backward_fake(dy, x, scale, eps, shift_dtype):
    batch, width = x.shape[0], x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((batch, width), dtype=shift_dtype), scale.new_empty((batch, width))


def _setup_context(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _backward(launch, ctx, dy):
    """(dx, dshift, dscale, None)."""
    x, scale = ctx.saved_tensors
    return *launch(dy, x, scale, ctx.eps, ctx.shift_dtype), None


MODULATED_LAYER_NORM = FusedOp(
    name="modulated_layer_norm",
    schema="(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor",
    forward=modulated_layer_norm_fwd,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_op=library_op(
        "modulated_layer_norm_backward",
        "(Tensor dy, Tensor x, Tensor scale, float eps, ScalarType shift_dtype) -> (Tensor, Tensor, Tensor)",
        modulated_layer_norm_bwd,
        _backward_fake,
    ),
)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused LayerNorm(x) * (1 + scale) + shift for (B, N, D) x and (B, D) shift, scale (MODULATED_LAYER_NORM)."""
    return MODULATED_LAYER_NORM(x, shift, scale, eps)
