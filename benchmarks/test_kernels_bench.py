"""GPU benchmarks of the fused Triton ops against eager PyTorch and torch.compile of the reference.

Run:  pytest benchmarks/test_kernels_bench.py --benchmark-only
Each row times one implementation (fused / eager / compiled) of one op at one shape, dtype and
mode. Two times per call go to extra_info and, at the end of the module, to
benchmarks/results/kernels_<device>.json and .md:

* GPU time: the sum of the durations of every kernel and copy the call ran on the device, read
  from the PyTorch profiler over PROFILED_CALLS calls. This is what the kernels cost, whatever the
  host does, and the bandwidth figures come from it.
* Wall time: the CUDA-event median per call from triton.testing.do_bench (L2 flushed between
  calls). When the host (Python, autograd, the op dispatcher) takes longer to issue the work than
  the GPU takes to run it, this is host time; in a training step other GPU work hides part of it.

Inputs rotate among enough copies that one pass over them exceeds the L2 cache, so GPU times are
times from device memory. pytest-benchmark's own table times rounds of CALLS_PER_ROUND calls.

Bandwidth counts the minimum traffic of the op (each input read once, each output written once),
so it is comparable across implementations: a higher fraction means fewer wasted bytes.
Skipped without CUDA: interpreter timings mean nothing.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import pytest
import torch

from soflow_fast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
CALLS_PER_ROUND = 20
PROFILED_CALLS = 30
ROTATE_BYTES = 256 * 2**20  # input copies per case: at least this much in all (the H100's L2 is 50 MB)
MAX_COPIES = 64
IMPLS = ["fused", "eager", "compiled"]
DTYPES = [torch.bfloat16, torch.float32]
# The DiT widths (B/M/XL) at 256 tokens (a 32x32 latent with patch 2), batch 32.
LN_SHAPES = [(32, 256, 768), (32, 256, 1024), (32, 256, 1152)]
# The losses act on network outputs: rows of N * D as above (the streaming path), and the real
# latent shapes, ImageNet SCM share (64 of 256) and full batch, CIFAR-10 batch 1024.
LOSS_SHAPES = [(32, 256, 768), (32, 256, 1024), (32, 256, 1152), (64, 4, 32, 32), (256, 4, 32, 32), (1024, 3, 32, 32)]

_RESULTS: list[dict] = []


# ----------------------------------------------------------------------------------------------
# Fixtures: the kernels, the device's copy bandwidth, the results file
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels():
    return ops.load_kernels()


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write) of a 512 MiB buffer, the practical peak."""
    from triton.testing import do_bench

    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if not _RESULTS:
        return
    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    meta = {
        "device": device,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"kernels_{slug}.json").write_text(json.dumps({"meta": meta, "results": _RESULTS}, indent=1))
    copy = _RESULTS[0]["copy_gbps"]
    lines = [
        f"Fused kernels on {device} (torch {meta['torch']}, triton {meta['triton']}); per call. GPU time: kernels",
        "and copies summed by the profiler; wall: CUDA-event median with the host's issue time (L2 flushed).",
        f"Bandwidth from GPU time over the minimum traffic, as a fraction of a measured copy ({copy:.0f} GB/s).",
        "",
        "| op | mode | shape | dtype | impl | GPU (us) | wall (us) | GB/s | of copy BW | GPU speed-up vs compiled |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    compiled = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["gpu_us"] for r in _RESULTS if r["impl"] == "compiled"}
    for r in _RESULTS:
        base = compiled.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        speedup = f"{base / r['gpu_us']:.2f}x" if base else "-"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['gpu_us']:.1f} | "
            f"{r['wall_us']:.1f} | {r['gbps']:.0f} | {r['of_copy_bw']:.0%} | {speedup} |"
        )
    (RESULTS_DIR / f"kernels_{slug}.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Cases: each returns (callable for one step, bytes of minimum traffic)
# ----------------------------------------------------------------------------------------------


def _copies(nbytes: int) -> int:
    """How many input sets to rotate among so that one round exceeds the L2 cache."""
    return max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(nbytes, 1))))


def _step(fn, input_sets, cotangents, grad_index):
    """One call per invocation, each on the next input set: a forward, and with cotangents a backward
    returning the gradients of the inputs at ``grad_index`` (nothing accumulates)."""
    state = {"i": 0}

    def next_inputs():
        inputs = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        return inputs

    if cotangents is None:

        def run():
            with torch.no_grad():
                fn(*next_inputs())

        return run

    def run():
        inputs = next_inputs()
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out[: len(cotangents)], [inputs[i] for i in grad_index], cotangents)

    return run


def _impl_fn(impl, kernel_fn, ref_fn):
    if impl == "fused":
        return kernel_fn
    if impl == "eager":
        return ref_fn
    torch._dynamo.reset()  # a fresh cache per case: recompiles for new shapes would hit the limit
    return torch.compile(ref_fn, fullgraph=True)


def _ln_case(kernels, op, impl, shape, dtype, mode):
    batch, tokens, width = shape
    size = dtype.itemsize
    grad = mode == "fwd+bwd"
    rows = batch * tokens * width
    vec = batch * width

    def t(*s):
        return (torch.randn(*s, device=DEVICE) * 0.5).to(dtype).requires_grad_(grad)

    if op == "modulated_layer_norm":
        n_rows, n_vec = 1, 2
        fn = _impl_fn(impl, kernels.modulated_layer_norm, ops.modulated_layer_norm_ref)
        n_cot = 1
        # fwd: x in, y out, shift/scale in; bwd: x, dy in, dx out; scale in, dshift/dscale out
        traffic = (2 * rows + 2 * vec) + (3 * rows + 3 * vec if grad else 0)
    else:
        n_rows, n_vec = 2, 3
        fn = _impl_fn(impl, kernels.gated_residual_modulated_layer_norm, ops.gated_residual_modulated_layer_norm_ref)
        n_cot = 2
        # fwd: x, h in, x_new, y out, 3 vectors in; bwd: dx_new, dy, x_new, h in, dx, dh out, 2 vectors in, 3 out
        traffic = (4 * rows + 3 * vec) + (6 * rows + 5 * vec if grad else 0)
    sets = [
        [t(batch, tokens, width) for _ in range(n_rows)] + [t(batch, width) for _ in range(n_vec)]
        for _ in range(_copies((n_rows * rows + n_vec * vec) * size))
    ]
    cot = tuple(torch.randn(shape, device=DEVICE).to(dtype) for _ in range(n_cot)) if grad else None
    return _step(fn, sets, cot, range(n_rows + n_vec)), traffic * size


def _loss_case(kernels, op, impl, shape, dtype):
    batch = shape[0]
    size = dtype.itemsize
    elems = torch.Size(shape).numel()

    def t(grad=False):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(grad)

    def euler_inputs():
        time = torch.rand(batch, device=DEVICE) * 0.8 + 0.2
        s = time * torch.rand(batch, device=DEVICE)
        return [t(True), t(), t(), t(), time, time + (s - time) * 0.3, s, 1.0, 0.01]

    def velocity_inputs():
        return [t(True), t(), torch.rand(batch, device=DEVICE) + 0.5, 1.0, 0.01]

    if op == "euler_consistency_loss":
        make, n_rows = euler_inputs, 4
        fn = _impl_fn(impl, kernels.euler_consistency_loss, ops.euler_consistency_loss_ref)
        traffic = 5 * elems * size  # four rows in, one gradient out
    else:
        make, n_rows = velocity_inputs, 2
        fn = _impl_fn(impl, kernels.adaptive_velocity_loss, ops.adaptive_velocity_loss_ref)
        traffic = 3 * elems * size  # prediction and target in, one gradient out
    sets = [make() for _ in range(_copies(n_rows * elems * size))]
    cot = (torch.ones((), device=DEVICE),)
    return _step(fn, sets, cot, [0]), traffic


def gpu_us_per_call(step, calls: int = PROFILED_CALLS) -> float:
    """Device time per call: every kernel, memset and copy the profiler saw, summed, over ``calls``.

    Reads the raw Kineto events, one per device activity, and leaves out the GPU-side spans of
    user annotations (compiled regions, record_function), which cover kernels already counted:
    those the event flags as annotations, and any device span named like a host annotation.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = list(prof.profiler.kineto_results.events())
    annotations = {e.name() for e in events if e.device_type() == DeviceType.CPU and e.is_user_annotation()}
    total_ns = sum(
        e.duration_ns()
        for e in events
        if e.device_type() == DeviceType.CUDA and not e.is_user_annotation() and e.name() not in annotations
    )
    if total_ns <= 0:
        raise RuntimeError("the profiler recorded no device activity: is CUPTI available?")
    return total_ns / 1e3 / calls


def _measure(benchmark, step, traffic, copy_gbps, info):
    from triton.testing import do_bench

    for _ in range(3):  # compile (for "compiled") and autotune caches before any timing
        step()
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=25, rep=200, return_mode="median")
    gpu_us = gpu_us_per_call(step)

    def rounds():
        for _ in range(CALLS_PER_ROUND):
            step()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2, iterations=1)
    gbps = traffic / (gpu_us * 1e-6) / 1e9
    record = {
        **info,
        "gpu_us": gpu_us,
        "wall_us": ms * 1e3,
        "gbps": gbps,
        "of_copy_bw": gbps / copy_gbps,
        "copy_gbps": copy_gbps,
    }
    benchmark.extra_info.update(
        {**record, "device": torch.cuda.get_device_name(), "calls_per_round": CALLS_PER_ROUND, "bytes": traffic}
    )
    _RESULTS.append(record)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["modulated_layer_norm", "gated_residual_modulated_layer_norm"])
def test_layer_norm_bench(benchmark, kernels, copy_gbps, op, shape, dtype, mode, impl):
    step, traffic = _ln_case(kernels, op, impl, shape, dtype, mode)
    info = {"op": op, "mode": mode, "shape": str(shape), "dtype": str(dtype).split(".")[-1], "impl": impl}
    _measure(benchmark, step, traffic, copy_gbps, info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["euler_consistency_loss", "adaptive_velocity_loss"])
def test_loss_bench(benchmark, kernels, copy_gbps, op, shape, dtype, impl):
    step, traffic = _loss_case(kernels, op, impl, shape, dtype)
    info = {"op": op, "mode": "fwd+bwd", "shape": str(shape), "dtype": str(dtype).split(".")[-1], "impl": impl}
    _measure(benchmark, step, traffic, copy_gbps, info)
