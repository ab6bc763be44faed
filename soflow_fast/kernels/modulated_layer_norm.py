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
    LN_BWD_PROGRAMS_PER_SM,
    cdiv,
    ln_bwd_stages,
    ln_launch,
    normalize_rows,
    promote,
    sizes,
    sum_along,
    sum_tiles,
    tiling,
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
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    offs = (b * N + rows)[:, None] * D + cols[None, :]

    shift = tl.load(SHIFT + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, _ = normalize_rows(x, cmask, D, eps)
    y = xhat * (1.0 + scale)[None, :] + shift[None, :]
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
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale1 = 1.0 + tl.load(SCALE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_scale = tl.full([BLOCK_D], 0.0, tl.float32)

    row_start = tile * ROWS_PER_TILE
    row_end = tl.minimum(row_start + ROWS_PER_TILE, N)
    for r0 in tl.range(row_start, row_end, BLOCK_N, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_N)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        offs = (b * N + rows)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = normalize_rows(x, cmask, D, eps)
        # Padded rows and columns carry dy = 0 and xhat = 0, so they add nothing to any sum below.
        g = dy * scale1[None, :]
        c1 = sum_along(g * xhat, 1) / D
        c2 = sum_along(g, 1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + offs, to_storage(dx, DX.dtype.element_ty), mask=mask)
        acc_shift += sum_along(dy, 0)
        acc_scale += sum_along(dy * xhat, 0)

    poffs = (b * T + tile) * D + cols
    tl.store(PSHIFT + poffs, acc_shift, mask=cmask)
    tl.store(PSCALE + poffs, acc_scale, mask=cmask)


def modulated_layer_norm_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, traced: bool = False
) -> torch.Tensor:
    """Launch the forward on contiguous (B, N, D) x and (B, D) shift, scale; returns y.

    ``traced``: launch through wrap_triton, as the body of the triton_op (see registry.py).
    """
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    batch, tokens, width = sizes(x)
    y = torch.empty((batch, tokens, width), dtype=promote(x, shift, scale), device=x.device)
    block_n, block_d, warps = ln_launch(width, backward=False)
    grid = (batch, cdiv(tokens, block_n))
    kernel = wrap_triton(_modln_fwd_kernel) if traced else _modln_fwd_kernel
    kernel[grid](
        x, shift, scale, y, tokens, width, eps,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return y


def modulated_layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float, shift_dtype: torch.dtype, traced: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (dx, dshift, dscale) in the dtypes of x, shift and scale."""
    dy, x, scale = dy.contiguous(), x.contiguous(), scale.contiguous()
    batch, tokens, width = sizes(x)
    block_n, block_d, warps = ln_launch(width, backward=True)
    rows_per_tile, tiles = tiling(batch, tokens, block_n, x.device, LN_BWD_PROGRAMS_PER_SM)
    stages = ln_bwd_stages(block_n, block_d, 2, max(x.element_size(), dy.element_size()))
    dx = torch.empty_like(x)
    # One buffer per reduced gradient, not views of one: a traced kernel's outputs must not alias.
    pshift, pscale = (torch.empty((batch, tiles, width), dtype=torch.float32, device=x.device) for _ in range(2))
    kernel = wrap_triton(_modln_bwd_kernel) if traced else _modln_bwd_kernel
    kernel[(batch, tiles)](
        dy, x, scale, dx, pshift, pscale, tokens, width, tiles, rows_per_tile, eps,
        BLOCK_N=block_n, BLOCK_D=block_d, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    dshift, dscale = sum_tiles([pshift, pscale], [shift_dtype, scale.dtype], traced)
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
