"""Fused gated residual + adaLN modulation, the seam between two DiT sub-blocks:

    x_new = x + gate * h,    y = LayerNorm(x_new) * (1 + scale) + shift

x, h are (B, N, D); gate, shift, scale are per-sample (B, D). One pass reads x and h and writes
both x_new (the residual stream goes on) and y (the next sub-block's input). The LayerNorm
statistics come from the fp32 sum before x_new is rounded to its storage dtype, so y is as close
to the fp32 result as a single rounding allows.

Backward: x_new is an output whose gradient (from the rest of the residual stream) joins the
LayerNorm gradient: dxn = dLN + dx_new; then dx = dxn, dh = gate * dxn, and the three per-sample
sums dgate = sum_n dxn * h, dshift = sum_n dy, dscale = sum_n dy * xhat use the same
token-tile partial-sum scheme as modulated_layer_norm.py (see its docstring for why not atomics).
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
def _gated_fwd_kernel(
    X,  # (B, N, D) residual stream
    H,  # (B, N, D) sub-block output
    GATE,  # (B, D)
    SHIFT,  # (B, D)
    SCALE,  # (B, D)
    XN,  # (B, N, D) output x + gate * h
    Y,  # (B, N, D) output, modulated LayerNorm of x_new
    N,
    D,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, cols, cmask = ln_columns(D, BLOCK_D)
    mask, offs = ln_rows(b, tl.program_id(1).to(tl.int64) * BLOCK_N, N, cols, cmask, N, D, BLOCK_N)
    vec = b * D + cols
    gate = load_f32(GATE, vec, cmask)
    shift = load_f32(SHIFT, vec, cmask)
    scale = load_f32(SCALE, vec, cmask)
    xn = load_f32(X, offs, mask) + gate[None, :] * load_f32(H, offs, mask)
    tl.store(XN + offs, to_storage(xn, XN.dtype.element_ty), mask=mask)
    y = modulate(xn, shift, scale, cmask, D, eps)
    tl.store(Y + offs, to_storage(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DXN,  # (B, N, D) gradient reaching x_new from the residual stream (read only if HAS_DXN)
    DY,  # (B, N, D) gradient of y
    XN,  # (B, N, D) saved x_new
    H,  # (B, N, D)
    GATE,  # (B, D)
    SCALE,  # (B, D)
    DX,  # (B, N, D) gradient of x
    DH,  # (B, N, D) gradient of h
    PGATE,  # (B, T, D) fp32 per-tile partial sums of dxn * h
    PSHIFT,  # (B, T, D) fp32 per-tile partial sums of dy
    PSCALE,  # (B, T, D) fp32 per-tile partial sums of dy * xhat
    N,
    D,
    T,
    ROWS_PER_TILE,
    eps,
    HAS_DXN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    b, cols, cmask = ln_columns(D, BLOCK_D)
    tile = tl.program_id(1).to(tl.int64)
    vec = b * D + cols
    gate = load_f32(GATE, vec, cmask)
    scale1 = 1.0 + load_f32(SCALE, vec, cmask)
    zeros = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_gate, acc_shift, acc_scale = zeros, zeros, zeros
    row_start, row_end = ln_tile(tile, ROWS_PER_TILE, N)
    for r0 in tl.range(row_start, row_end, BLOCK_N, num_stages=STAGES):
        mask, offs = ln_rows(b, r0, row_end, cols, cmask, N, D, BLOCK_N)
        xn = load_f32(XN, offs, mask)
        dy = load_f32(DY, offs, mask)
        h = load_f32(H, offs, mask)
        dxn, xhat = modulate_backward(xn, dy, scale1, cmask, D, eps)
        if HAS_DXN:
            dxn += load_f32(DXN, offs, mask)
        tl.store(DX + offs, to_storage(dxn, DX.dtype.element_ty), mask=mask)
        tl.store(DH + offs, to_storage(gate[None, :] * dxn, DH.dtype.element_ty), mask=mask)
        acc_gate += sum_along(dxn * h, 0)
        acc_shift += sum_along(dy, 0)
        acc_scale += sum_along(dy * xhat, 0)

    store_partial(PGATE, acc_gate, b, tile, T, D, cols, cmask)
    store_partial(PSHIFT, acc_shift, b, tile, T, D, cols, cmask)
    store_partial(PSCALE, acc_scale, b, tile, T, D, cols, cmask)


def gated_residual_modulated_layer_norm_fwd(
    x: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; returns (x_new, y), both (B, N, D). ``traced``: through wrap_triton (triton_op)."""
    x, h, gate, shift, scale = (t.contiguous() for t in (x, h, gate, shift, scale))
    batch, tokens, width = shape = sizes(x)
    x_new = torch.empty(shape, dtype=promote(x, gate, h), device=x.device)
    y = torch.empty(shape, dtype=promote(x_new, shift, scale), device=x.device)
    grid, params = ln_forward_launch(batch, tokens, width)
    kernel = wrap_triton(_gated_fwd_kernel) if traced else _gated_fwd_kernel
    kernel[grid](x, h, gate, shift, scale, x_new, y, tokens, width, eps, **params)
    return x_new, y


def gated_residual_modulated_layer_norm_bwd(
    dx_new: torch.Tensor | None,
    dy: torch.Tensor,
    x_new: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    x_dtype: torch.dtype,
    shift_dtype: torch.dtype,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (dx, dh, dgate, dshift, dscale)."""
    dy, x_new, h, gate, scale = (t.contiguous() for t in (dy, x_new, h, gate, scale))
    has_dxn = dx_new is not None
    dx_new = dx_new.contiguous() if has_dxn else dy  # a placeholder pointer the kernel never reads
    run = ln_backward_launch((x_new, dy, h, dx_new) if has_dxn else (x_new, dy, h), gradients=3)
    dx = torch.empty_like(x_new, dtype=x_dtype)
    dh = torch.empty_like(h)
    kernel = wrap_triton(_gated_bwd_kernel) if traced else _gated_bwd_kernel
    kernel[run.grid](
        dx_new, dy, x_new, h, gate, scale, dx, dh, *run.partials, *run.sizes, eps, HAS_DXN=has_dxn, **run.params
    )
    dgate, dshift, dscale = sum_tiles(run.partials, [gate.dtype, shift_dtype, scale.dtype], traced)
    return dx, dh, dgate, dshift, dscale


def _fake(x, h, gate, shift, scale, eps):
    x_new = x.new_empty(x.shape, dtype=promote(x, gate, h))
    return x_new, x.new_empty(x.shape, dtype=promote(x_new, shift, scale))


def _backward_fake(dx_new, dy, x_new, h, gate, scale, eps, x_dtype, shift_dtype):
    batch, width = x_new.shape[0], x_new.shape[-1]
    return (
        x_new.new_empty(x_new.shape, dtype=x_dtype),
        h.new_empty(h.shape),
        gate.new_empty((batch, width)),
        gate.new_empty((batch, width), dtype=shift_dtype),
        scale.new_empty((batch, width)),
    )


def _setup_context(ctx, inputs, output):
    x, h, gate, shift, scale, eps = inputs
    # An output that receives no gradient reaches the backward as None rather than as zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[0], h, gate, scale)
    ctx.eps = eps
    ctx.x_dtype = x.dtype
    ctx.shift_dtype = shift.dtype


def _backward(launch, ctx, dx_new, dy):
    """(dx, dh, dgate, dshift, dscale, None).

    Without dx_new (x_new unused) the kernel skips that read; without dy (y unused) it reads zeros.
    """
    if dx_new is None and dy is None:
        return None, None, None, None, None, None
    x_new, h, gate, scale = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x_new)
    return *launch(dx_new, dy, x_new, h, gate, scale, ctx.eps, ctx.x_dtype, ctx.shift_dtype), None


GATED_RESIDUAL_MODULATED_LAYER_NORM = FusedOp(
    name="gated_residual_modulated_layer_norm",
    schema="(Tensor x, Tensor h, Tensor gate, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor)",
    forward=gated_residual_modulated_layer_norm_fwd,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_op=library_op(
        "gated_residual_modulated_layer_norm_backward",
        "(Tensor? dx_new, Tensor dy, Tensor x_new, Tensor h, Tensor gate, Tensor scale, float eps,"
        " ScalarType x_dtype, ScalarType shift_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        gated_residual_modulated_layer_norm_bwd,
        _backward_fake,
    ),
)


def gated_residual_modulated_layer_norm(
    x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused x_new = x + gate * h and y = LayerNorm(x_new) * (1 + scale) + shift; returns (x_new, y).

    x, h: (B, N, D); gate, shift, scale: (B, D) (GATED_RESIDUAL_MODULATED_LAYER_NORM).
    """
    return GATED_RESIDUAL_MODULATED_LAYER_NORM(x, h, gate, shift, scale, eps)
