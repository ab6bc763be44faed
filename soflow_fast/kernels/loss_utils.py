"""Pieces shared by the two fused losses (euler_consistency_loss.py, adaptive_velocity_loss.py): the
launch sizes and outputs of their forwards, the helpers of their streaming and finishing kernels,
and their one backward, scale_rows, with the description of such a loss (scaled_rows_loss)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .registry import FusedOp, library_op
from .utils import cdiv, next_pow2, num_warps_for, sizes, sum_along, tiling, to_storage

# The losses' streaming kernels: elements per step (H100 sweep: 2048 at 8 warps is within 1% of the
# best for rows of 196608-294912 elements; rows below 8192 elements, the pixel-space latents, are
# up to 5% faster in steps of 1024 at 4 warps, which pad less of a 3072-element row).
_STREAM_BLOCK = 2048
_STREAM_BLOCK_SHORT = 1024


def split_rows(batch: int, width: int, device: torch.device) -> tuple[int, int, int, int]:
    """(slice length, slices per sample, block, num_warps) for the losses' streaming forward kernels.

    Each program streams one slice of one sample in blocks of ``block`` elements (at most the
    next power of two of the width), so rows of any length take the same path.
    """
    block = min(_STREAM_BLOCK if width >= 8192 else _STREAM_BLOCK_SHORT, next_pow2(width))
    slice_len, slices = tiling(batch, width, block, device)
    return slice_len, slices, block, num_warps_for(block)


def finish_launch(batch: int, slices: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_S) of the one-program finishing kernels: [BLOCK_B, BLOCK_S] partials per step."""
    block_s = next_pow2(slices)
    block_b = max(1, min(1024, next_pow2(batch), 4096 // block_s))
    return block_b, block_s


class LossLaunch(NamedTuple):
    """A fused loss's launch sizes and fresh outputs for a (B, ...) prediction, rows flattened to (B, D)."""

    batch: int
    width: int
    slice_len: int  # row elements per streaming program
    slices: int  # streaming programs per sample: the stream grid is (batch, slices)
    block: int  # the streaming kernel's BLOCK_D
    warps: int
    rows: torch.Tensor  # output: the backward's saved rows, in the prediction's shape and dtype
    coef: torch.Tensor  # output: (B,) fp32 per-sample backward factors
    means: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # outputs: fp32 0-dim loss, mse, weight
    part: torch.Tensor  # (sums, B, slices) fp32 per-slice partial sums

    def flat(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Tensors of the prediction's numel as contiguous (B, D) rows."""
        return [t.reshape(self.batch, self.width).contiguous() for t in tensors]

    def finish(self) -> dict[str, int]:
        """The one-program finishing kernel's launch parameters (BLOCK_B, BLOCK_S, num_warps)."""
        block_b, block_s = finish_launch(self.batch, self.slices)
        return {"BLOCK_B": block_b, "BLOCK_S": block_s, "num_warps": 4}

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """(loss, mse, weight, rows, coef): the forward's outputs."""
        return (*self.means, self.rows, self.coef)


def loss_launch(prediction: torch.Tensor, sums: int) -> LossLaunch:
    """Sizes and outputs of a fused loss whose streaming kernel writes ``sums`` partial sums per slice."""
    shape = sizes(prediction)
    batch, width = shape[0], math.prod(shape[1:])
    dev = prediction.device
    slice_len, slices, block, warps = split_rows(batch, width, dev)
    rows = torch.empty(shape, dtype=prediction.dtype, device=dev)
    coef = torch.empty((batch,), dtype=torch.float32, device=dev)
    means = tuple(torch.empty((), dtype=torch.float32, device=dev) for _ in range(3))
    part = torch.empty((sums, batch, slices), dtype=torch.float32, device=dev)
    return LossLaunch(batch, width, slice_len, slices, block, warps, rows, coef, means, part)


# A streaming program owns slice sl (program axis 1) of sample i's row (program axis 0), and walks
# it in blocks of BLOCK_D elements.


@triton.jit
def row_slice(SLICE, D, BLOCK_D: tl.constexpr):
    """(i, sl, cols, first, end): the program's sample and slice, a block's lanes, the slice's bounds."""
    sl = tl.program_id(1).to(tl.int64)
    first = sl * SLICE
    return tl.program_id(0).to(tl.int64), sl, tl.arange(0, BLOCK_D), first, tl.minimum(first + SLICE, D)


@triton.jit
def slice_block(i, start, end, cols, D):
    """(mask, offs) of the block of sample i's row that starts at element ``start`` (< end)."""
    return start + cols < end, i * D + start + cols


# The finishing kernels: one program walks the batch in vectors of BLOCK_B samples.


@triton.jit
def batch_rows(start, B, BLOCK_B: tl.constexpr):
    """(rows, rmask): the samples start .. start + BLOCK_B, those from B on masked."""
    rows = start + tl.arange(0, BLOCK_B)
    return rows, rows < B


@triton.jit
def adaptive_weight(m, p, eps):
    """(m + eps)^-p, through exp/log: the interpreter has no libdevice pow."""
    return tl.exp(-p * tl.log(m + eps))


@triton.jit
def add_samples(acc_loss, acc_m, acc_w, loss, m, w, rmask):
    """The running per-lane sums of the three batch means, plus a vector of samples' loss, m and w."""
    return acc_loss + tl.where(rmask, loss, 0.0), acc_m + tl.where(rmask, m, 0.0), acc_w + tl.where(rmask, w, 0.0)


@triton.jit
def slice_sums(PART, rows, rmask, NS, BLOCK_S: tl.constexpr):
    """Per-sample totals of a (B, NS) fp32 block of per-slice partial sums, for a vector of samples
    (slices added in a fixed order)."""
    slices = tl.arange(0, BLOCK_S)
    pmask = rmask[:, None] & (slices < NS)[None, :]
    return sum_along(tl.load(PART + rows[:, None] * NS + slices[None, :], mask=pmask, other=0.0), 1)


@triton.jit
def store_batch_means(acc_loss, acc_m, acc_w, LOSS, MSE, WEIGHT, B):
    """The three 0-dim batch means from per-lane running sums (padded lanes hold 0)."""
    tl.store(LOSS, sum_along(acc_loss, 0) / B)
    tl.store(MSE, sum_along(acc_m, 0) / B)
    tl.store(WEIGHT, sum_along(acc_w, 0) / B)


# ----------------------------------------------------------------------------------------------
# The losses' backward: a per-sample scale of a saved row, times grad_output, in one pass
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scale_rows_kernel(
    V,  # (B, D) saved rows (dq or delta), in the prediction's dtype
    COEF,  # (B,) fp32 per-sample factor (d loss / d prediction = COEF * V)
    G,  # () grad_output of the loss
    OUT,  # (B, D) gradient, in the prediction's dtype
    D,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    k = tl.load(COEF + i) * tl.load(G).to(tl.float32)
    v = tl.load(V + i * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + i * D + cols, to_storage(v * k, OUT.dtype.element_ty), mask=mask)


_SCALE_BLOCK = 2048


def scale_rows_launch(
    rows: torch.Tensor, coef: torch.Tensor, grad_output: torch.Tensor, traced: bool = False
) -> torch.Tensor:
    """``coef[i] * grad_output * rows[i]`` in rows' dtype: the fused losses' backward, one launch.

    rows: (B, ...) contiguous; coef: (B,) fp32; grad_output: a 0-dim tensor (read on the device, so
    the backward never synchronises). ``traced``: launch through wrap_triton (inside a triton_op).
    """
    rows = rows.contiguous()
    shape = sizes(rows)
    batch = shape[0]
    width = math.prod(shape[1:])
    out = rows.new_empty(shape)
    if batch * width == 0:
        return out
    block = min(_SCALE_BLOCK, next_pow2(width))
    kernel = wrap_triton(_scale_rows_kernel) if traced else _scale_rows_kernel
    kernel[(batch, cdiv(width, block))](
        rows, coef, grad_output.reshape(()), out, width, BLOCK_D=block, num_warps=num_warps_for(block)
    )
    return out


def _scale_rows_fake(rows, coef, grad_output):
    return rows.new_empty(rows.shape)  # contiguous, as the kernel writes it


SCALE_ROWS = library_op(
    "scale_rows", "(Tensor rows, Tensor coef, Tensor grad_output) -> Tensor", scale_rows_launch, _scale_rows_fake
)
# The opaque registration, for callers that time it (benchmarks/kernel_sweep.py).
scale_rows = SCALE_ROWS.custom_op


def save_scaled_rows(ctx, inputs, output) -> None:
    """The losses' setup_context. Of the outputs (loss, mse, weight, rows, coef) only the loss is
    differentiable, and d loss / d prediction (the first input) = coef[i] * rows[i]. Materialised zero
    gradients are off: autograd would otherwise fill zeros the size of ``rows`` for the unused outputs
    on every backward."""
    _, mse, weight, rows, coef = output
    ctx.mark_non_differentiable(mse, weight, rows, coef)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(rows, coef)
    ctx.num_inputs = len(inputs)


def scaled_rows_backward(launch, ctx, grad_loss, *_unused) -> tuple[torch.Tensor | None, ...]:
    """The losses' backward, after save_scaled_rows: a gradient for the prediction through ``launch``
    (a route of SCALE_ROWS), None for the other inputs."""
    rows, coef = ctx.saved_tensors
    grad = None if grad_loss is None else launch(rows, coef, grad_loss)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


def _scaled_rows_loss_fake(prediction, *_):
    scalar = prediction.new_empty((), dtype=torch.float32)
    coef = prediction.new_empty((prediction.shape[0],), dtype=torch.float32)
    return scalar, scalar.new_empty(()), scalar.new_empty(()), prediction.new_empty(prediction.shape), coef


def scaled_rows_loss(name: str, inputs: str, forward) -> FusedOp:
    """The description of a fused loss whose gradient reaches its first input only, as
    ``coef[i] * grad_output * rows[i]``.

    ``inputs``: the schema's inputs, e.g. ``"(Tensor v_pred, Tensor target, float p)"``; the first is
    the prediction, (B, ...). ``forward(*inputs, traced=False)`` returns fp32 0-dim (loss, mse,
    weight), then rows (the prediction's shape and dtype) and coef ((B,) fp32) for the backward.
    """
    return FusedOp(
        name=name,
        schema=inputs + " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        forward=forward,
        fake=_scaled_rows_loss_fake,
        setup_context=save_scaled_rows,
        backward=scaled_rows_backward,
        backward_op=SCALE_ROWS,
    )
