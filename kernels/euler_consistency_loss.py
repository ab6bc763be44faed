"""Fused SoFlow solution-consistency loss, its logging statistics and its gradient in one pass.

With the solution function f(x, t, s) = a(t, s) x + b(t, s) F (Euler: a = 1, b = s - t; Trig:
a = cos(pi/2 (s - t)), b = sin(pi/2 (s - t))), per sample i over the D flattened dimensions:

    dq = (f(x_t, t, s; nn_t) - f(x_l, l, s; nn_l)) / (t - l)          (a constant: detached)
    m_i = mean_j dq^2,   w_i = (m_i + eps)^-p                         (constants too)
    loss = mean_i sign(b(t_i, s_i)) * mean_j(nn_t * dq) * w_i

The loss is linear in nn_t once dq and w are constants, so its gradient is known during the
forward, d loss / d nn_t = sign * w * dq / (B * D): the kernel writes it (fp32) next to the
statistics, and the backward is one multiply by grad_output. No activation is saved besides it.

The op is usually launch-bound rather than bandwidth-bound (B x C x H x W latents, a few MB), so
a row of up to 8192 elements is one program with the row in registers, and a one-program launch
takes the batch means in a fixed order: two launches where the PyTorch expression takes about
fifteen. Longer rows (a large latent, or few samples) would leave most SMs idle with one program
per sample, so they are split into slices: one launch writes per-slice fp32 partial sums, a second
finishes the per-sample statistics from them, recomputes dq for its slice and writes the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import batch_means, num_warps_for, sum_along, tiling

# Rows up to this many elements stay in registers between the reduction and the gradient store.
_MAX_ONE_BLOCK = 8192
_STREAM_BLOCK = 2048


@triton.jit
def _coefficients(T, L, S, i, TRIG: tl.constexpr):
    """(a_t, b_t, a_l, b_l, 1 / (t - l), sign(b_t)) for sample i, in fp32."""
    t = tl.load(T + i).to(tl.float32)
    l_ = tl.load(L + i).to(tl.float32)
    s = tl.load(S + i).to(tl.float32)
    if TRIG:
        # pi / 2 as a literal: a module-level tl.constexpr times a tensor fails in the interpreter.
        half_pi = 1.5707963267948966
        a_t = tl.cos(half_pi * (s - t))
        b_t = tl.sin(half_pi * (s - t))
        a_l = tl.cos(half_pi * (s - l_))
        b_l = tl.sin(half_pi * (s - l_))
    else:
        a_t = s - t  # unused: Euler's a is 1 (bound so that both branches define the same names)
        b_t = s - t
        a_l = s - l_
        b_l = s - l_
    sign = (b_t > 0).to(tl.float32) - (b_t < 0).to(tl.float32)
    return a_t, b_t, a_l, b_l, 1.0 / (t - l_), sign


@triton.jit
def _load_dq(NN_T, X_T, X_L, NN_L, offs, mask, a_t, b_t, a_l, b_l, inv_dt, TRIG: tl.constexpr):
    """(nn_t, dq) for one block of a row, in fp32; padded lanes come out as 0."""
    nn_t = tl.load(NN_T + offs, mask=mask, other=0.0).to(tl.float32)
    x_t = tl.load(X_T + offs, mask=mask, other=0.0).to(tl.float32)
    x_l = tl.load(X_L + offs, mask=mask, other=0.0).to(tl.float32)
    nn_l = tl.load(NN_L + offs, mask=mask, other=0.0).to(tl.float32)
    if TRIG:
        f_t = a_t * x_t + b_t * nn_t
        f_l = a_l * x_l + b_l * nn_l
    else:
        f_t = x_t + b_t * nn_t
        f_l = x_l + b_l * nn_l
    return nn_t, (f_t - f_l) * inv_dt


@triton.jit
def _consistency_row_kernel(
    NN_T,  # (B, D) network output at (x_t, t, s)
    X_T,  # (B, D)
    X_L,  # (B, D)
    NN_L,  # (B, D) network output at (x_l, l, s), computed without grad
    T,  # (B,) times
    L,  # (B,)
    S,  # (B,)
    GRAD,  # (B, D) fp32 output: d loss / d nn_t
    STATS,  # (3, B) fp32 output: per-sample loss term, mean dq^2, weight
    B,
    D,
    inv_bd,
    p,
    eps,
    TRIG: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    a_t, b_t, a_l, b_l, inv_dt, sign = _coefficients(T, L, S, i, TRIG)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    nn_t, dq = _load_dq(NN_T, X_T, X_L, NN_L, i * D + cols, mask, a_t, b_t, a_l, b_l, inv_dt, TRIG)
    m = sum_along(dq * dq, 0) / D
    c = sum_along(nn_t * dq, 0) / D
    # (m + eps)^-p through exp/log: the interpreter has no libdevice pow.
    w = tl.exp(-p * tl.log(m + eps))
    tl.store(GRAD + i * D + cols, dq * (sign * w * inv_bd), mask=mask)
    tl.store(STATS + i, sign * c * w)
    tl.store(STATS + B + i, m)
    tl.store(STATS + 2 * B + i, w)


@triton.jit
def _consistency_partial_kernel(
    NN_T,  # (B, D)
    X_T,  # (B, D)
    X_L,  # (B, D)
    NN_L,  # (B, D)
    T,  # (B,)
    L,  # (B,)
    S,  # (B,)
    PART,  # (2, B, NS) fp32 output: per-slice sums of dq^2 and nn_t * dq
    B,
    D,
    SLICE,
    NS,
    TRIG: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    a_t, b_t, a_l, b_l, inv_dt, _ = _coefficients(T, L, S, i, TRIG)
    cols = tl.arange(0, BLOCK_D)
    end = tl.minimum(sl * SLICE + SLICE, D)
    acc_m = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_c = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(sl * SLICE, end, BLOCK_D):
        mask = start + cols < end
        nn_t, dq = _load_dq(NN_T, X_T, X_L, NN_L, i * D + start + cols, mask, a_t, b_t, a_l, b_l, inv_dt, TRIG)
        acc_m += dq * dq
        acc_c += nn_t * dq
    tl.store(PART + i * NS + sl, sum_along(acc_m, 0))
    tl.store(PART + B * NS + i * NS + sl, sum_along(acc_c, 0))


@triton.jit
def _consistency_slice_grad_kernel(
    NN_T,  # (B, D)
    X_T,  # (B, D)
    X_L,  # (B, D)
    NN_L,  # (B, D)
    T,  # (B,)
    L,  # (B,)
    S,  # (B,)
    PART,  # (2, B, NS) fp32 per-slice sums from _consistency_partial_kernel
    GRAD,  # (B, D) fp32 output: d loss / d nn_t
    STATS,  # (3, B) fp32 output, written by each sample's first slice
    B,
    D,
    SLICE,
    NS,
    inv_bd,
    p,
    eps,
    TRIG: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    a_t, b_t, a_l, b_l, inv_dt, sign = _coefficients(T, L, S, i, TRIG)
    # Every slice of a sample adds the same partials in the same order: identical m and w.
    slices = tl.arange(0, BLOCK_S)
    smask = slices < NS
    m = sum_along(tl.load(PART + i * NS + slices, mask=smask, other=0.0), 0) / D
    c = sum_along(tl.load(PART + B * NS + i * NS + slices, mask=smask, other=0.0), 0) / D
    w = tl.exp(-p * tl.log(m + eps))
    cols = tl.arange(0, BLOCK_D)
    end = tl.minimum(sl * SLICE + SLICE, D)
    for start in range(sl * SLICE, end, BLOCK_D):
        mask = start + cols < end
        _, dq = _load_dq(NN_T, X_T, X_L, NN_L, i * D + start + cols, mask, a_t, b_t, a_l, b_l, inv_dt, TRIG)
        tl.store(GRAD + i * D + start + cols, dq * (sign * w * inv_bd), mask=mask)
    if sl == 0:
        tl.store(STATS + i, sign * c * w)
        tl.store(STATS + B + i, m)
        tl.store(STATS + 2 * B + i, w)


def euler_consistency_loss_fwd(
    nn_t: torch.Tensor,
    x_t: torch.Tensor,
    x_l: torch.Tensor,
    nn_l: torch.Tensor,
    t: torch.Tensor,
    l: torch.Tensor,
    s: torch.Tensor,
    p: float,
    eps: float,
    trig: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the loss; returns (loss, mse, weight, grad) with grad = d loss / d nn_t in fp32."""
    batch = nn_t.shape[0]
    width = nn_t.numel() // batch
    rows = [v.reshape(batch, width).contiguous() for v in (nn_t, x_t, x_l, nn_l)]
    times = [v.reshape(batch).contiguous() for v in (t, l, s)]
    grad = torch.empty(nn_t.shape, dtype=torch.float32, device=nn_t.device)
    stats = torch.empty((3, batch), dtype=torch.float32, device=nn_t.device)
    inv_bd = 1.0 / (batch * width)
    if width <= _MAX_ONE_BLOCK:
        block_d = triton.next_power_of_2(width)
        _consistency_row_kernel[(batch,)](
            *rows, *times, grad, stats, batch, width, inv_bd, p, eps,
            TRIG=trig, BLOCK_D=block_d, num_warps=num_warps_for(block_d),
        )  # fmt: skip
    else:
        slice_len, slices = tiling(batch, width, _STREAM_BLOCK, nn_t.device)
        part = torch.empty((2, batch, slices), dtype=torch.float32, device=nn_t.device)
        warps = num_warps_for(_STREAM_BLOCK)
        _consistency_partial_kernel[(batch, slices)](
            *rows, *times, part, batch, width, slice_len, slices,
            TRIG=trig, BLOCK_D=_STREAM_BLOCK, num_warps=warps,
        )  # fmt: skip
        _consistency_slice_grad_kernel[(batch, slices)](
            *rows, *times, part, grad, stats, batch, width, slice_len, slices, inv_bd, p, eps,
            TRIG=trig, BLOCK_D=_STREAM_BLOCK, BLOCK_S=triton.next_power_of_2(slices), num_warps=warps,
        )  # fmt: skip
    return (*batch_means(stats), grad)


# ----------------------------------------------------------------------------------------------
# torch.library registration. The op returns the gradient as a fourth, non-differentiable output
# so that setup_context can keep it for the backward.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("soflow_fast::euler_consistency_loss", mutates_args=())
def _consistency_op(
    nn_t: torch.Tensor,
    x_t: torch.Tensor,
    x_l: torch.Tensor,
    nn_l: torch.Tensor,
    t: torch.Tensor,
    l: torch.Tensor,
    s: torch.Tensor,
    p: float,
    eps: float,
    trig: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return euler_consistency_loss_fwd(nn_t, x_t, x_l, nn_l, t, l, s, p, eps, trig)


@_consistency_op.register_fake
def _(nn_t, x_t, x_l, nn_l, t, l, s, p, eps, trig):
    scalar = nn_t.new_empty((), dtype=torch.float32)
    return scalar, scalar.new_empty(()), scalar.new_empty(()), nn_t.new_empty(nn_t.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, mse, weight, grad = output
    ctx.mark_non_differentiable(mse, weight, grad)
    ctx.save_for_backward(grad)
    ctx.nn_dtype = inputs[0].dtype


def _backward(ctx, grad_loss, _grad_mse, _grad_weight, _grad_grad):
    (grad,) = ctx.saved_tensors
    # One rounding to the input dtype, after the scaling, as autograd would do on an fp32 loss.
    return (grad * grad_loss).to(ctx.nn_dtype), None, None, None, None, None, None, None, None, None


_consistency_op.register_autograd(_backward, setup_context=_setup_context)


def euler_consistency_loss(
    nn_t: torch.Tensor,
    x_t: torch.Tensor,
    x_l: torch.Tensor,
    nn_l: torch.Tensor,
    t: torch.Tensor,
    l: torch.Tensor,
    s: torch.Tensor,
    p: float,
    eps: float,
    trig: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused solution-consistency loss; returns fp32 0-dim (loss, mse, weight), gradient to nn_t only.

    Args:
        nn_t, x_t, x_l, nn_l: (B, ...) with B * D elements each.
        t, l, s: B times each (any shape with B elements).
        p, eps: the adaptive weight's power and offset.
        trig: the Trig parameterisation (a = cos, b = sin) instead of Euler (a = 1, b = s - t).
    """
    loss, mse, weight, _ = _consistency_op(nn_t, x_t, x_l, nn_l, t, l, s, float(p), float(eps), bool(trig))
    return loss, mse, weight
