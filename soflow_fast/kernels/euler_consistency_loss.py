"""Fused SoFlow solution-consistency loss, its logging statistics and its gradient in one pass.

With the solution function f(x, t, s) = a(t, s) x + b(t, s) F (Euler: a = 1, b = s - t; Trig:
a = cos(pi/2 (s - t)), b = sin(pi/2 (s - t))), per sample i over the D flattened dimensions:

    dq = (f(x_t, t, s; nn_t) - f(x_l, l, s; nn_l)) / (t - l)          (a constant: detached)
    m_i = mean_j dq^2,   w_i = (m_i + eps)^-p                         (constants too)
    loss = mean_i sign(b(t_i, s_i)) * mean_j(nn_t * dq) * w_i

The loss is linear in nn_t once dq and w are constants, d loss / d nn_t = sign * w * dq / (B * D),
so the forward saves dq (in nn_t's dtype) and one fp32 factor sign * w / (B * D) per sample, and the
backward is a single pass, utils.scale_rows, that multiplies the two by grad_output and writes the
gradient in nn_t's dtype. dq does not depend on w, so it is written while the inputs stream past
the first time; nothing reads them twice.

Launches: one streaming kernel over (sample, slice) programs reads the four inputs once, writes dq
and two fp32 partial sums per slice (sum dq^2, sum nn_t * dq); a one-program kernel adds the
partials in a fixed order into the per-sample statistics, the weights, the backward factors and
the three batch means. Rows of any length take this path: a short row is one slice, a long row
(a large latent, or few samples) several, so that the GPU fills. Bytes per element of a bf16
forward + backward: 8 read and 2 written forward, 2 read and 2 written backward (14), against 26
for a gradient written in fp32 during the forward and scaled by two PyTorch ops afterwards.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton

from .loss_utils import (
    adaptive_weight,
    add_samples,
    batch_rows,
    loss_launch,
    row_slice,
    scaled_rows_loss,
    slice_block,
    slice_sums,
    store_batch_means,
)
from .utils import load_f32, sum_along, to_storage


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
    nn_t = load_f32(NN_T, offs, mask)
    x_t = load_f32(X_T, offs, mask)
    x_l = load_f32(X_L, offs, mask)
    nn_l = load_f32(NN_L, offs, mask)
    if TRIG:
        f_t = a_t * x_t + b_t * nn_t
        f_l = a_l * x_l + b_l * nn_l
    else:
        f_t = x_t + b_t * nn_t
        f_l = x_l + b_l * nn_l
    return nn_t, (f_t - f_l) * inv_dt


@triton.jit
def _consistency_stream_kernel(
    NN_T,  # (B, D) network output at (x_t, t, s)
    X_T,  # (B, D)
    X_L,  # (B, D)
    NN_L,  # (B, D) network output at (x_l, l, s), computed without grad
    T,  # (B,) times
    L,  # (B,)
    S,  # (B,)
    DQ,  # (B, D) output: dq, in nn_t's dtype (saved for the backward)
    PART,  # (2, B, NS) fp32 output: per-slice sums of dq^2 and nn_t * dq
    B,
    D,
    SLICE,
    NS,
    TRIG: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i, sl, cols, first, end = row_slice(SLICE, D, BLOCK_D)
    a_t, b_t, a_l, b_l, inv_dt, _ = _coefficients(T, L, S, i, TRIG)
    acc_m = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_c = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(first, end, BLOCK_D):
        mask, offs = slice_block(i, start, end, cols, D)
        nn_t, dq = _load_dq(NN_T, X_T, X_L, NN_L, offs, mask, a_t, b_t, a_l, b_l, inv_dt, TRIG)
        tl.store(DQ + offs, to_storage(dq, DQ.dtype.element_ty), mask=mask)
        acc_m += dq * dq
        acc_c += nn_t * dq
    tl.store(PART + i * NS + sl, sum_along(acc_m, 0))
    tl.store(PART + B * NS + i * NS + sl, sum_along(acc_c, 0))


@triton.jit
def _consistency_finish_kernel(
    T,  # (B,) times
    S,  # (B,)
    PART,  # (2, B, NS) fp32 per-slice sums from _consistency_stream_kernel
    COEF,  # (B,) fp32 output: sign * w / (B * D), the backward's per-sample factor
    LOSS,  # () fp32 outputs: the batch means
    MSE,
    WEIGHT,
    B,
    D,
    NS,
    inv_bd,
    p,
    eps,
    TRIG: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One program, fixed summation order (slices, then samples): bitwise-reproducible results.
    zeros = tl.full([BLOCK_B], 0.0, tl.float32)
    acc_loss, acc_m, acc_w = zeros, zeros, zeros
    for start in range(0, B, BLOCK_B):
        rows, rmask = batch_rows(start, B, BLOCK_B)
        m = slice_sums(PART, rows, rmask, NS, BLOCK_S) / D
        c = slice_sums(PART + B * NS, rows, rmask, NS, BLOCK_S) / D
        t = load_f32(T, rows, rmask)
        s = load_f32(S, rows, rmask)
        if TRIG:
            b_t = tl.sin(1.5707963267948966 * (s - t))
        else:
            b_t = s - t
        sign = (b_t > 0).to(tl.float32) - (b_t < 0).to(tl.float32)
        w = adaptive_weight(m, p, eps)
        tl.store(COEF + rows, sign * w * inv_bd, mask=rmask)
        acc_loss, acc_m, acc_w = add_samples(acc_loss, acc_m, acc_w, sign * c * w, m, w, rmask)
    store_batch_means(acc_loss, acc_m, acc_w, LOSS, MSE, WEIGHT, B)


def euler_consistency_loss_fwd(nn_t, x_t, x_l, nn_l, t, l, s, p, eps, trig, traced=False):
    """Launch the loss (the inputs of euler_consistency_loss, p, eps, trig as python scalars); returns
    (loss, mse, weight, dq, coef): d loss / d nn_t = coef[i] * dq[i].

    ``traced``: launch through wrap_triton, as the body of the triton_op.
    """
    run = loss_launch(nn_t, sums=2)
    times = [v.reshape(run.batch).contiguous() for v in (t, l, s)]
    stream = wrap_triton(_consistency_stream_kernel) if traced else _consistency_stream_kernel
    stream[(run.batch, run.slices)](
        *run.flat(nn_t, x_t, x_l, nn_l), *times, run.rows, run.part, run.batch, run.width, run.slice_len, run.slices,
        TRIG=trig, BLOCK_D=run.block, num_warps=run.warps,
    )  # fmt: skip
    finish = wrap_triton(_consistency_finish_kernel) if traced else _consistency_finish_kernel
    finish[(1,)](
        times[0], times[2], run.part, run.coef, *run.means, run.batch, run.width, run.slices,
        1.0 / (run.batch * run.width), p, eps, TRIG=trig, **run.finish(),
    )  # fmt: skip
    return run.outputs()


EULER_CONSISTENCY_LOSS = scaled_rows_loss(
    "euler_consistency_loss",
    "(Tensor nn_t, Tensor x_t, Tensor x_l, Tensor nn_l, Tensor t, Tensor l, Tensor s, float p, float eps, bool trig)",
    euler_consistency_loss_fwd,
)


def euler_consistency_loss(nn_t, x_t, x_l, nn_l, t, l, s, p, eps, trig=False):
    """Fused solution-consistency loss; returns fp32 0-dim (loss, mse, weight), gradient to nn_t only.

    Args:
        nn_t, x_t, x_l, nn_l: (B, ...) tensors with B * D elements each.
        t, l, s: B times each (tensors of any shape with B elements).
        p, eps: the adaptive weight's power and offset.
        trig: the Trig parameterisation (a = cos, b = sin) instead of Euler (a = 1, b = s - t).
    """
    return EULER_CONSISTENCY_LOSS(nn_t, x_t, x_l, nn_l, t, l, s, float(p), float(eps), bool(trig))[:3]
