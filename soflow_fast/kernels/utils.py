"""Pieces shared by the kernel files: launch heuristics, the row normaliser, the second-stage
reduction of per-sample partial sums over token tiles, and the losses' backward (scale_rows) with
their shared description (scaled_rows_loss)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .registry import FusedOp, interpreting, library_op

# Read once, when the kernels are defined, as Triton itself does. The interpreter casts fp32 to
# bf16 by truncation, where the GPU rounds to nearest even (cvt.rn); under the interpreter the
# kernels round by hand so that CPU parity tests measure the GPU's numerics.
_EMULATE_BF16_RTNE = tl.constexpr(interpreting())


def sizes(t: torch.Tensor) -> tuple[int, ...]:
    """t's sizes as python ints. The launch heuristics are python arithmetic on sizes, and several of
    their results become tl.constexpr; inside a traced triton_op with dynamic shapes a size is a
    SymInt, and int() specialises the compiled graph to its value (a new size recompiles)."""
    return tuple(map(int, t.shape))


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """Cast an fp32 tile to an output dtype, rounding to nearest even on every backend."""
    if _EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. triton.cdiv is a constexpr_function, whose argument unwrapping
    costs several microseconds a call, and a fused op needs up to 8 per launch."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The next power of two >= n (1 for n <= 1), on the host; see cdiv."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_warps_for(elements: int, per_thread: int = 8) -> int:
    """Warps for a program that holds `elements` values per live tensor, `per_thread` per thread."""
    return max(2, min(16, elements // (32 * per_thread)))


# LayerNorm tiles: elements per program step and per thread. Chosen from the H100 sweep
# (benchmarks/kernel_sweep.py, bf16, B = 32, N = 256, D = 768/1024/1152; results/h100/kernel_sweep*.json):
# 4096-element tiles held 32 to a thread (4 warps) are the fastest or within 3% of it for both
# forwards and both backwards at every width; 8 per thread at 16 warps forward, and one row at 8-16
# warps backward, are 7-60% slower forward and 18-71% slower backward.
LN_TILE = 4096
LN_PER_THREAD = 32


def ln_launch(width: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) of the LayerNorm kernels for rows of `width`.

    The forward and the backward take the same tile (``LN_TILE`` elements: 4 rows of 1024, 2 of
    2048); ``backward`` is kept for callers that tune them apart.
    """
    del backward
    block_d = next_pow2(width)
    block_n = max(1, LN_TILE // block_d)
    return block_n, block_d, num_warps_for(block_n * block_d, LN_PER_THREAD)


# Programs per SM for the kernels that split each sample into tiles (the LayerNorm backward's
# token tiles, the losses' row slices). Each program streams its share one block at a time, so
# the memory in flight per SM grows with the programs resident on it; more programs also mean
# more fp32 partials. From the H100 sweep: the losses, with their chosen blocks, are flat between 2
# and 8 (within 2%); the LayerNorm backwards are fastest at 2 with the tiles above (4: up to 24%
# slower, one case 1% faster; 8: 28-65% slower).
PROGRAMS_PER_SM = 4
LN_BWD_PROGRAMS_PER_SM = 2

# Software pipelining of the LayerNorm backwards' loop over token tiles: the loop is a tl.range with
# num_stages=LN_BWD_STAGES. At 1 it compiles to the plain loop the H100 sweep measured: each
# iteration loads its tile, then reduces it behind barriers with nothing in flight. At 2 or more,
# Triton turns the tile loads into asynchronous copies into shared memory (cp.async) issued
# STAGES - 1 iterations ahead (sm_90, bf16, D = 1024, modulated: 158 registers at 1 and 2 stages,
# 16 KiB of shared memory per stage ahead; tests/kernels/gpu_build.py checks the copies are there).
# Not yet timed on a GPU: `kernel_sweep.py --parts pipeline` measures it, and this stays at 1 until
# it has. (Triton leaves the losses' streaming loops unpipelined at any num_stages: they have no stage setting.)
LN_BWD_STAGES = 1
# Most shared memory one LayerNorm-backward program may give to tiles loaded ahead (three such
# programs fit an H100 SM's 227 KiB); wider rows get fewer stages, down to the plain loop.
LN_BWD_PREFETCH_BYTES = 64 * 1024


def ln_bwd_stages(block_n: int, block_d: int, tensors: int, itemsize: int, requested: int | None = None) -> int:
    """num_stages for a LayerNorm backward that loads `tensors` (B, N, D) tiles of `itemsize` bytes per
    step: `requested` (default LN_BWD_STAGES), lowered until its buffers fit LN_BWD_PREFETCH_BYTES."""
    stages = LN_BWD_STAGES if requested is None else requested
    while stages > 1 and (stages - 1) * tensors * block_n * block_d * itemsize > LN_BWD_PREFETCH_BYTES:
        stages -= 1
    return stages


_SM_COUNT: dict[int, int] = {}


def programs_target(device: torch.device, per_sm: int | None = None) -> int:
    """How many programs a split kernel aims for in total (``per_sm`` per SM, default PROGRAMS_PER_SM).

    On the CPU interpreter a small constant keeps several tiles per sample, so the tests exercise
    the cross-tile reduction, the ragged last tile and the single-tile case.
    """
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(index)
    if sms is None:
        sms = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return (PROGRAMS_PER_SM if per_sm is None else per_sm) * sms


def tiling(batch: int, length: int, block: int, device: torch.device, per_sm: int | None = None) -> tuple[int, int]:
    """(tile, num_tiles): split each sample's `length` (tokens, or row elements) into tiles.

    A tile is a multiple of `block` and becomes one program that writes fp32 partial sums for its
    sample, so fewer, longer tiles mean less partial traffic and more tiles more parallelism; aim
    for `programs_target` programs in total.
    """
    tiles = cdiv(programs_target(device, per_sm), batch)
    tiles = max(1, min(tiles, cdiv(length, block)))
    tile = cdiv(cdiv(length, tiles), block) * block
    return tile, cdiv(length, tile)


def promote(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's own elementwise ops would give for these inputs."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# tl.sum's own combine function where this Triton has it: the interpreter recognises it and sums
# with numpy instead of calling the combine function once per element in Python. It keeps its own
# name here: Inductor compiles a user-defined kernel (the triton_op route) from a copy of its source
# and of the @jit functions it calls, each under the name the function was defined with, so an
# alias of another name would be undefined in that copy.
if hasattr(tl.standard, "_sum_combine"):
    _sum_combine = tl.standard._sum_combine
else:

    @triton.jit
    def _sum_combine(a, b):
        return a + b


@triton.jit
def sum_along(x, axis: tl.constexpr):
    """tl.sum rebuilt on the builtin tl.reduce (the same code on the GPU).

    tl.sum and tl.zeros are themselves @jit functions, frozen as compiled or interpreted when
    triton is first imported, and torch._dynamo imports triton early, often before a test has set
    TRITON_INTERPRET. Builtins (tl.reduce, tl.full, ...) are patched by the interpreter at launch,
    so kernels that use only builtins and our own @jit helpers run under the interpreter whenever
    this package was imported after TRITON_INTERPRET was set, whoever imported triton first.
    """
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def normalize_rows(x, cmask, D, eps):
    """(xhat, rstd) for a [BLOCK_N, BLOCK_D] fp32 tile whose padding columns were loaded as 0."""
    mean = sum_along(x, 1) / D
    # Padding columns must not contribute (x - mean) to the variance.
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    var = sum_along(xc * xc, 1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _sum_tiles_kernel(
    P0,  # (B, T, D) fp32 partial sums of the first reduced gradient
    P1,  # (B, T, D) fp32, second (unused when K < 2)
    P2,  # (B, T, D) fp32, third (unused when K < 3)
    O0,  # (B, D) output, any float dtype
    O1,  # (B, D)
    O2,  # (B, D)
    T,
    D,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc0 = tl.full([BLOCK_D], 0.0, tl.float32)
    acc1 = tl.full([BLOCK_D], 0.0, tl.float32)
    acc2 = tl.full([BLOCK_D], 0.0, tl.float32)
    for tile in range(T):
        offs = (b * T + tile) * D + cols
        acc0 += tl.load(P0 + offs, mask=cmask, other=0.0)
        if K > 1:
            acc1 += tl.load(P1 + offs, mask=cmask, other=0.0)
        if K > 2:
            acc2 += tl.load(P2 + offs, mask=cmask, other=0.0)
    out = b * D + cols
    tl.store(O0 + out, to_storage(acc0, O0.dtype.element_ty), mask=cmask)
    if K > 1:
        tl.store(O1 + out, to_storage(acc1, O1.dtype.element_ty), mask=cmask)
    if K > 2:
        tl.store(O2 + out, to_storage(acc2, O2.dtype.element_ty), mask=cmask)


def sum_tiles(partials: list[torch.Tensor], dtypes: list[torch.dtype], traced: bool = False) -> list[torch.Tensor]:
    """Sum (B, T, D) fp32 partials over T into fresh (B, D) tensors of the given dtypes.

    One launch for up to three gradients; the fixed summation order keeps the result bitwise
    reproducible from run to run. ``traced``: launch through wrap_triton (inside a triton_op).
    """
    batch, tiles, width = sizes(partials[0])
    outs = [torch.empty((batch, width), dtype=dt, device=partials[0].device) for dt in dtypes]
    k = len(partials)
    # Unused slots repeat the first tensors; the kernel neither reads nor writes them (K < 3).
    ps = partials + [partials[0]] * (3 - k)
    os_ = outs + [outs[0]] * (3 - k)
    block_d = min(1024, next_pow2(width))
    grid = (batch, cdiv(width, block_d))
    kernel = wrap_triton(_sum_tiles_kernel) if traced else _sum_tiles_kernel
    kernel[grid](*ps, *os_, tiles, width, K=k, BLOCK_D=block_d, num_warps=num_warps_for(block_d))
    return outs


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
