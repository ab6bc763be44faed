"""Fused SoFlow flow-matching loss with the adaptive weight, its statistics and its gradient.

Per sample i over the D flattened dimensions:

    delta = v_pred - target,   m_i = mean_j delta^2,   w_i = 1 / (|db/ds_i| (m_i + eps)^p)  (detached)
    loss = mean_i w_i m_i,   mse = mean_i m_i,   weight = mean_i w_i

With w a constant, d loss / d v_pred = 2 w_i delta / (B * D): the forward saves delta (in v_pred's
dtype) and the per-sample factor 2 w_i / (B * D), and the backward (utils.scale_rows) multiplies
them by grad_output in one pass. Same launch layout as euler_consistency_loss.py (a streaming
kernel over (sample, slice) programs writing delta and fp32 partial sums, then a one-program kernel
for the per-sample weights, the factors and the batch means); see there.
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
def _load_delta(V, TGT, offs, mask):
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    return v - tl.load(TGT + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _velocity_stream_kernel(
    V,  # (B, D) predicted velocity
    TGT,  # (B, D) target velocity
    DELTA,  # (B, D) output: v_pred - target, in v_pred's dtype (saved for the backward)
    PART,  # (B, NS) fp32 output: per-slice sums of delta^2
    D,
    SLICE,
    NS,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    end = tl.minimum(sl * SLICE + SLICE, D)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(sl * SLICE, end, BLOCK_D):
        mask = start + cols < end
        offs = i * D + start + cols
        delta = _load_delta(V, TGT, offs, mask)
        tl.store(DELTA + offs, to_storage(delta, DELTA.dtype.element_ty), mask=mask)
        acc += delta * delta
    tl.store(PART + i * NS + sl, sum_along(acc, 0))


@triton.jit
def _velocity_finish_kernel(
    DBDS,  # (B,) db/ds at s = t (read only if HAS_DBDS)
    PART,  # (B, NS) fp32 per-slice sums from _velocity_stream_kernel
    COEF,  # (B,) fp32 output: 2 w / (B * D), the backward's per-sample factor
    LOSS,  # () fp32 outputs: the batch means
    MSE,
    WEIGHT,
    B,
    D,
    NS,
    dbds_value,
    inv_bd,
    p,
    eps,
    HAS_DBDS: tl.constexpr,
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
        if HAS_DBDS:
            dbds = tl.abs(tl.load(DBDS + rows, mask=rmask, other=1.0).to(tl.float32))
        else:
            dbds = tl.abs(dbds_value)
        # (m + eps)^-p through exp/log: the interpreter has no libdevice pow.
        w = tl.exp(-p * tl.log(m + eps)) / dbds
        tl.store(COEF + rows, 2.0 * w * inv_bd, mask=rmask)
        acc_loss += tl.where(rmask, w * m, 0.0)
        acc_m += tl.where(rmask, m, 0.0)
        acc_w += tl.where(rmask, w, 0.0)
    store_batch_means(acc_loss, acc_m, acc_w, LOSS, MSE, WEIGHT, B)


def adaptive_velocity_loss_fwd(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    dbds: torch.Tensor | None,
    dbds_value: float,
    p: float,
    eps: float,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the loss; returns (loss, mse, weight, delta, coef): d loss / d v_pred = coef[i] * delta[i].

    dbds: (B,) per-sample db/ds, or None to use the python float dbds_value for every sample.
    ``traced``: launch through wrap_triton, as the body of the triton_op.
    """
    shape = sizes(v_pred)
    batch, width = shape[0], math.prod(shape[1:])
    v, tgt = (u.reshape(batch, width).contiguous() for u in (v_pred, target))
    has_dbds = dbds is not None
    dbds = dbds.reshape(batch).contiguous() if has_dbds else v  # placeholder pointer, never read
    dev = v_pred.device
    delta = torch.empty(shape, dtype=v_pred.dtype, device=dev)
    coef = torch.empty((batch,), dtype=torch.float32, device=dev)
    loss, mse, weight = (torch.empty((), dtype=torch.float32, device=dev) for _ in range(3))
    slice_len, slices, block, warps = split_rows(batch, width, dev)
    part = torch.empty((batch, slices), dtype=torch.float32, device=dev)
    stream = wrap_triton(_velocity_stream_kernel) if traced else _velocity_stream_kernel
    stream[(batch, slices)](v, tgt, delta, part, width, slice_len, slices, BLOCK_D=block, num_warps=warps)
    block_b, block_s = finish_launch(batch, slices)
    finish = wrap_triton(_velocity_finish_kernel) if traced else _velocity_finish_kernel
    finish[(1,)](
        dbds, part, coef, loss, mse, weight, batch, width, slices, float(dbds_value), 1.0 / (batch * width), p, eps,
        HAS_DBDS=has_dbds, BLOCK_B=block_b, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return loss, mse, weight, delta, coef


ADAPTIVE_VELOCITY_LOSS = scaled_rows_loss(
    "adaptive_velocity_loss",
    "(Tensor v_pred, Tensor target, Tensor? dbds, float dbds_value, float p, float eps)",
    adaptive_velocity_loss_fwd,
)


def adaptive_velocity_loss(
    v_pred: torch.Tensor, target: torch.Tensor, dbds: torch.Tensor | float, p: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused adaptively weighted velocity loss; returns fp32 0-dim (loss, mse, weight), gradient to v_pred only.

    Args:
        v_pred, target: (B, ...) with B * D elements each.
        dbds: db/ds(t, t) per sample (B elements) or one python float for the whole batch.
        p, eps: the adaptive weight's power and offset.
    """
    if isinstance(dbds, torch.Tensor):
        return ADAPTIVE_VELOCITY_LOSS(v_pred, target, dbds, 0.0, float(p), float(eps))[:3]
    return ADAPTIVE_VELOCITY_LOSS(v_pred, target, None, float(dbds), float(p), float(eps))[:3]
