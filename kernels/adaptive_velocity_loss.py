"""Fused SoFlow flow-matching loss with the adaptive weight, its statistics and its gradient.

Per sample i over the D flattened dimensions:

    delta = v_pred - target,   m_i = mean_j delta^2,   w_i = 1 / (|db/ds_i| (m_i + eps)^p)  (detached)
    loss = mean_i w_i m_i,   mse = mean_i m_i,   weight = mean_i w_i

With w a constant, d loss / d v_pred = 2 w_i delta / (B * D); the kernel writes it during the
forward and the backward scales it by grad_output. Same launch layout as
euler_consistency_loss.py (one program per sample for rows up to 8192 elements, row slices with
partial sums beyond; then a one-program batch mean); see there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import batch_means, num_warps_for, sum_along, tiling

_MAX_ONE_BLOCK = 8192
_STREAM_BLOCK = 2048


@triton.jit
def _abs_dbds(DBDS, i, dbds_value, HAS_DBDS: tl.constexpr):
    if HAS_DBDS:
        return tl.abs(tl.load(DBDS + i).to(tl.float32))
    return tl.abs(dbds_value)


@triton.jit
def _load_delta(V, TGT, offs, mask):
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    return v - tl.load(TGT + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _velocity_row_kernel(
    V,  # (B, D) predicted velocity
    TGT,  # (B, D) target velocity
    DBDS,  # (B,) db/ds at s = t (read only if HAS_DBDS)
    GRAD,  # (B, D) fp32 output: d loss / d v_pred
    STATS,  # (3, B) fp32 output: per-sample w * m, m, w
    B,
    D,
    dbds_value,
    inv_bd,
    p,
    eps,
    HAS_DBDS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    delta = _load_delta(V, TGT, i * D + cols, mask)
    m = sum_along(delta * delta, 0) / D
    # (m + eps)^-p through exp/log: the interpreter has no libdevice pow.
    w = tl.exp(-p * tl.log(m + eps)) / _abs_dbds(DBDS, i, dbds_value, HAS_DBDS)
    tl.store(GRAD + i * D + cols, delta * (2.0 * w * inv_bd), mask=mask)
    tl.store(STATS + i, w * m)
    tl.store(STATS + B + i, m)
    tl.store(STATS + 2 * B + i, w)


@triton.jit
def _velocity_partial_kernel(
    V,  # (B, D)
    TGT,  # (B, D)
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
        delta = _load_delta(V, TGT, i * D + start + cols, start + cols < end)
        acc += delta * delta
    tl.store(PART + i * NS + sl, sum_along(acc, 0))


@triton.jit
def _velocity_slice_grad_kernel(
    V,  # (B, D)
    TGT,  # (B, D)
    DBDS,  # (B,) (read only if HAS_DBDS)
    PART,  # (B, NS) fp32 per-slice sums from _velocity_partial_kernel
    GRAD,  # (B, D) fp32 output: d loss / d v_pred
    STATS,  # (3, B) fp32 output, written by each sample's first slice
    B,
    D,
    SLICE,
    NS,
    dbds_value,
    inv_bd,
    p,
    eps,
    HAS_DBDS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    slices = tl.arange(0, BLOCK_S)
    m = sum_along(tl.load(PART + i * NS + slices, mask=slices < NS, other=0.0), 0) / D
    w = tl.exp(-p * tl.log(m + eps)) / _abs_dbds(DBDS, i, dbds_value, HAS_DBDS)
    cols = tl.arange(0, BLOCK_D)
    end = tl.minimum(sl * SLICE + SLICE, D)
    for start in range(sl * SLICE, end, BLOCK_D):
        mask = start + cols < end
        delta = _load_delta(V, TGT, i * D + start + cols, mask)
        tl.store(GRAD + i * D + start + cols, delta * (2.0 * w * inv_bd), mask=mask)
    if sl == 0:
        tl.store(STATS + i, w * m)
        tl.store(STATS + B + i, m)
        tl.store(STATS + 2 * B + i, w)


def adaptive_velocity_loss_fwd(
    v_pred: torch.Tensor, target: torch.Tensor, dbds: torch.Tensor | None, dbds_value: float, p: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the loss; returns (loss, mse, weight, grad) with grad = d loss / d v_pred in fp32.

    dbds: (B,) per-sample db/ds, or None to use the python float dbds_value for every sample.
    """
    batch = v_pred.shape[0]
    width = v_pred.numel() // batch
    v, tgt = (u.reshape(batch, width).contiguous() for u in (v_pred, target))
    has_dbds = dbds is not None
    dbds = dbds.reshape(batch).contiguous() if has_dbds else v  # placeholder pointer, never read
    grad = torch.empty(v_pred.shape, dtype=torch.float32, device=v_pred.device)
    stats = torch.empty((3, batch), dtype=torch.float32, device=v_pred.device)
    scalars = (float(dbds_value), 1.0 / (batch * width), p, eps)
    if width <= _MAX_ONE_BLOCK:
        block_d = triton.next_power_of_2(width)
        _velocity_row_kernel[(batch,)](
            v, tgt, dbds, grad, stats, batch, width, *scalars,
            HAS_DBDS=has_dbds, BLOCK_D=block_d, num_warps=num_warps_for(block_d),
        )  # fmt: skip
    else:
        slice_len, slices = tiling(batch, width, _STREAM_BLOCK, v_pred.device)
        part = torch.empty((batch, slices), dtype=torch.float32, device=v_pred.device)
        warps = num_warps_for(_STREAM_BLOCK)
        _velocity_partial_kernel[(batch, slices)](
            v, tgt, part, width, slice_len, slices, BLOCK_D=_STREAM_BLOCK, num_warps=warps
        )
        _velocity_slice_grad_kernel[(batch, slices)](
            v, tgt, dbds, part, grad, stats, batch, width, slice_len, slices, *scalars,
            HAS_DBDS=has_dbds, BLOCK_D=_STREAM_BLOCK, BLOCK_S=triton.next_power_of_2(slices), num_warps=warps,
        )  # fmt: skip
    return (*batch_means(stats), grad)


# ----------------------------------------------------------------------------------------------
# torch.library registration (see euler_consistency_loss.py)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("soflow_fast::adaptive_velocity_loss", mutates_args=())
def _velocity_op(
    v_pred: torch.Tensor, target: torch.Tensor, dbds: torch.Tensor | None, dbds_value: float, p: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaptive_velocity_loss_fwd(v_pred, target, dbds, dbds_value, p, eps)


@_velocity_op.register_fake
def _(v_pred, target, dbds, dbds_value, p, eps):
    scalar = v_pred.new_empty((), dtype=torch.float32)
    return scalar, scalar.new_empty(()), scalar.new_empty(()), v_pred.new_empty(v_pred.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, mse, weight, grad = output
    ctx.mark_non_differentiable(mse, weight, grad)
    ctx.save_for_backward(grad)
    ctx.v_dtype = inputs[0].dtype


def _backward(ctx, grad_loss, _grad_mse, _grad_weight, _grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss).to(ctx.v_dtype), None, None, None, None, None


_velocity_op.register_autograd(_backward, setup_context=_setup_context)


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
        return _velocity_op(v_pred, target, dbds, 0.0, float(p), float(eps))[:3]
    return _velocity_op(v_pred, target, None, float(dbds), float(p), float(eps))[:3]
