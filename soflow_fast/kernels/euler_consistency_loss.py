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

import math

import torch
import triton
import triton.language as tl

from .utils import (
    finish_launch,
    scaled_rows_loss,
    sizes,
    slice_sums,
    split_rows,
    store_batch_means,
    sum_along,
    to_storage,
    wrap_triton,
)


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
    i = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    a_t, b_t, a_l, b_l, inv_dt, _ = _coefficients(T, L, S, i, TRIG)
    cols = tl.arange(0, BLOCK_D)
    end = tl.minimum(sl * SLICE + SLICE, D)
    acc_m = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_c = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(sl * SLICE, end, BLOCK_D):
        mask = start + cols < end
        offs = i * D + start + cols
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
    acc_loss = tl.full([BLOCK_B], 0.0, tl.float32)
    acc_m = tl.full([BLOCK_B], 0.0, tl.float32)
    acc_w = tl.full([BLOCK_B], 0.0, tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        rmask = rows < B
        m = slice_sums(PART, rows, rmask, NS, BLOCK_S) / D
        c = slice_sums(PART + B * NS, rows, rmask, NS, BLOCK_S) / D
        t = tl.load(T + rows, mask=rmask, other=0.0).to(tl.float32)
        s = tl.load(S + rows, mask=rmask, other=0.0).to(tl.float32)
        if TRIG:
            b_t = tl.sin(1.5707963267948966 * (s - t))
        else:
            b_t = s - t
        sign = (b_t > 0).to(tl.float32) - (b_t < 0).to(tl.float32)
        # (m + eps)^-p through exp/log: the interpreter has no libdevice pow.
        w = tl.exp(-p * tl.log(m + eps))
        tl.store(COEF + rows, sign * w * inv_bd, mask=rmask)
        acc_loss += tl.where(rmask, sign * c * w, 0.0)
        acc_m += tl.where(rmask, m, 0.0)
        acc_w += tl.where(rmask, w, 0.0)
    store_batch_means(acc_loss, acc_m, acc_w, LOSS, MSE, WEIGHT, B)


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
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the loss; returns (loss, mse, weight, dq, coef): d loss / d nn_t = coef[i] * dq[i].

    ``traced``: launch through wrap_triton, as the body of the triton_op.
    """
    shape = sizes(nn_t)
    batch, width = shape[0], math.prod(shape[1:])
    rows = [v.reshape(batch, width).contiguous() for v in (nn_t, x_t, x_l, nn_l)]
    times = [v.reshape(batch).contiguous() for v in (t, l, s)]
    dev = nn_t.device
    dq = torch.empty(shape, dtype=nn_t.dtype, device=dev)
    coef = torch.empty((batch,), dtype=torch.float32, device=dev)
    loss, mse, weight = (torch.empty((), dtype=torch.float32, device=dev) for _ in range(3))
    slice_len, slices, block, warps = split_rows(batch, width, dev)
    part = torch.empty((2, batch, slices), dtype=torch.float32, device=dev)
    stream = wrap_triton(_consistency_stream_kernel) if traced else _consistency_stream_kernel
    stream[(batch, slices)](
        *rows, *times, dq, part, batch, width, slice_len, slices,
        TRIG=trig, BLOCK_D=block, num_warps=warps,
    )  # fmt: skip
    block_b, block_s = finish_launch(batch, slices)
    finish = wrap_triton(_consistency_finish_kernel) if traced else _consistency_finish_kernel
    finish[(1,)](
        times[0], times[2], part, coef, loss, mse, weight, batch, width, slices, 1.0 / (batch * width), p, eps,
        TRIG=trig, BLOCK_B=block_b, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return loss, mse, weight, dq, coef


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
