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

import torch
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
def _load_delta(V, TGT, offs, mask):
    return load_f32(V, offs, mask) - load_f32(TGT, offs, mask)


@triton.jit
def _velocity_stream_kernel(
    V,  # (B, D) predicted velocity
    TGT,  # (B, D) target velocity
    DELTA,  # (B, D) output: v_pred - target, in v_pred's dtype (saved for the backward)
    PART,  # (1, B, NS) fp32 output: per-slice sums of delta^2
    D,
    SLICE,
    NS,
    BLOCK_D: tl.constexpr,
):
    i, sl, cols, first, end = row_slice(SLICE, D, BLOCK_D)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(first, end, BLOCK_D):
        mask, offs = slice_block(i, start, end, cols, D)
        delta = _load_delta(V, TGT, offs, mask)
        tl.store(DELTA + offs, to_storage(delta, DELTA.dtype.element_ty), mask=mask)
        acc += delta * delta
    tl.store(PART + i * NS + sl, sum_along(acc, 0))


@triton.jit
def _velocity_finish_kernel(
    DBDS,  # (B,) db/ds at s = t (read only if HAS_DBDS)
    PART,  # (1, B, NS) fp32 per-slice sums from _velocity_stream_kernel
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
    zeros = tl.full([BLOCK_B], 0.0, tl.float32)
    acc_loss, acc_m, acc_w = zeros, zeros, zeros
    for start in range(0, B, BLOCK_B):
        rows, rmask = batch_rows(start, B, BLOCK_B)
        m = slice_sums(PART, rows, rmask, NS, BLOCK_S) / D
        if HAS_DBDS:
            dbds = tl.abs(tl.load(DBDS + rows, mask=rmask, other=1.0).to(tl.float32))
        else:
            dbds = tl.abs(dbds_value)
        w = adaptive_weight(m, p, eps) / dbds
        tl.store(COEF + rows, 2.0 * w * inv_bd, mask=rmask)
        acc_loss, acc_m, acc_w = add_samples(acc_loss, acc_m, acc_w, w * m, m, w, rmask)
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
    run = loss_launch(v_pred, sums=1)
    v, tgt = run.flat(v_pred, target)
    has_dbds = dbds is not None
    dbds = dbds.reshape(run.batch).contiguous() if has_dbds else v  # placeholder pointer, never read
    stream = wrap_triton(_velocity_stream_kernel) if traced else _velocity_stream_kernel
    stream[(run.batch, run.slices)](
        v, tgt, run.rows, run.part, run.width, run.slice_len, run.slices, BLOCK_D=run.block, num_warps=run.warps
    )
    finish = wrap_triton(_velocity_finish_kernel) if traced else _velocity_finish_kernel
    finish[(1,)](
        dbds, run.part, run.coef, *run.means, run.batch, run.width, run.slices, float(dbds_value),
        1.0 / (run.batch * run.width), p, eps, HAS_DBDS=has_dbds, **run.finish(),
    )  # fmt: skip
    return run.outputs()


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
