"""Pieces shared by the kernel files: launch heuristics, the row normaliser, the LayerNorm kernels'
tile helpers and the second-stage reduction of their per-sample partial sums over token tiles
(sum_tiles). The losses' shared pieces are in loss_utils.py."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .registry import interpreting

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


def ln_forward_launch(batch: int, tokens: int, width: int) -> tuple[tuple[int, int], dict[str, int]]:
    """(grid, launch parameters) of a LayerNorm forward kernel over (B, N, D) tensors."""
    block_n, block_d, warps = ln_launch(width, backward=False)
    return (batch, cdiv(tokens, block_n)), {"BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": warps}


class LnBackwardLaunch(NamedTuple):
    """A LayerNorm backward kernel's launch over (B, N, D) tensors in token tiles."""

    grid: tuple[int, int]  # (B, T)
    sizes: tuple[int, int, int, int]  # (N, D, T, ROWS_PER_TILE), as the kernels take them
    partials: list[torch.Tensor]  # one fresh (B, T, D) fp32 buffer per reduced gradient
    params: dict[str, int]  # BLOCK_N, BLOCK_D, STAGES, num_warps


def ln_backward_launch(loaded: tuple[torch.Tensor, ...], gradients: int) -> LnBackwardLaunch:
    """The launch of a LayerNorm backward that reads the (B, N, D) tensors ``loaded`` (the first gives
    the sizes) at every step and reduces ``gradients`` per-sample gradients over the tokens."""
    batch, tokens, width = sizes(loaded[0])
    device = loaded[0].device
    block_n, block_d, warps = ln_launch(width, backward=True)
    rows_per_tile, tiles = tiling(batch, tokens, block_n, device, LN_BWD_PROGRAMS_PER_SM)
    stages = ln_bwd_stages(block_n, block_d, len(loaded), max(t.element_size() for t in loaded))
    # One buffer per reduced gradient, not views of one: a traced kernel's outputs must not alias.
    partials = [torch.empty((batch, tiles, width), dtype=torch.float32, device=device) for _ in range(gradients)]
    params = {"BLOCK_N": block_n, "BLOCK_D": block_d, "STAGES": stages, "num_warps": warps}
    return LnBackwardLaunch((batch, tiles), (tokens, width, tiles, rows_per_tile), partials, params)


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
def load_f32(PTR, offs, mask):
    """PTR[offs] as fp32, 0 where masked."""
    return tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def normalize_rows(x, cmask, D, eps):
    """(xhat, rstd) for a [BLOCK_N, BLOCK_D] fp32 tile whose padding columns were loaded as 0."""
    mean = sum_along(x, 1) / D
    # Padding columns must not contribute (x - mean) to the variance.
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    var = sum_along(xc * xc, 1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None], rstd


# The LayerNorm kernels: a program works on one sample b (program axis 0) of (B, N, D) tensors, in
# [BLOCK_N, BLOCK_D] tiles of whole rows, with (B, D) per-sample vectors.


@triton.jit
def ln_columns(D, BLOCK_D: tl.constexpr):
    """(b, cols, cmask): this program's sample and the columns of a row, with their mask."""
    cols = tl.arange(0, BLOCK_D)
    return tl.program_id(0).to(tl.int64), cols, cols < D


@triton.jit
def ln_rows(b, r0, row_end, cols, cmask, N, D, BLOCK_N: tl.constexpr):
    """(mask, offs) of the tile of rows r0 .. r0 + BLOCK_N of sample b, rows from row_end on masked."""
    rows = r0 + tl.arange(0, BLOCK_N)
    return (rows < row_end)[:, None] & cmask[None, :], (b * N + rows)[:, None] * D + cols[None, :]


@triton.jit
def ln_tile(tile, ROWS_PER_TILE, N):
    """(row_start, row_end) of token tile ``tile``: ROWS_PER_TILE rows, fewer in the last tile."""
    row_start = tile * ROWS_PER_TILE
    return row_start, tl.minimum(row_start + ROWS_PER_TILE, N)


@triton.jit
def modulate(x, shift, scale, cmask, D, eps):
    """LayerNorm(x) * (1 + scale) + shift for a fp32 tile x and fp32 [BLOCK_D] shift and scale."""
    xhat, _ = normalize_rows(x, cmask, D, eps)
    return xhat * (1.0 + scale)[None, :] + shift[None, :]


@triton.jit
def modulate_backward(x, dy, scale1, cmask, D, eps):
    """(dx, xhat) of modulate for fp32 tiles x and dy, with scale1 = 1 + scale."""
    xhat, rstd = normalize_rows(x, cmask, D, eps)
    # Padded rows and columns carry dy = 0 and xhat = 0, so they add nothing to any sum of the caller.
    g = dy * scale1[None, :]
    c1 = sum_along(g * xhat, 1) / D
    c2 = sum_along(g, 1) / D
    return (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], xhat


@triton.jit
def store_partial(P, acc, b, tile, T, D, cols, cmask):
    """Write a token tile's fp32 [BLOCK_D] partial sum to row (b, tile) of the (B, T, D) buffer P."""
    tl.store(P + (b * T + tile) * D + cols, acc, mask=cmask)


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
