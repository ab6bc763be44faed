"""GPU benchmarks of the fused Triton ops against eager PyTorch and torch.compile of the reference.

Run:  pytest benchmarks/test_kernels_bench.py --benchmark-only
Each row times one implementation (fused / eager / compiled) of one op at one shape, dtype and
mode. pytest-benchmark's own table times rounds of CALLS_PER_ROUND calls closed by one
synchronize (so launch overhead overlaps as in training); the numbers that matter, the CUDA-event
median per call from triton.testing.do_bench (L2 flushed between calls), the achieved bandwidth
and its fraction of the device's measured copy bandwidth, go to extra_info and, at the end of the
module, to benchmarks/results/kernels_<device>.json and .md.

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
    lines = [
        f"Fused kernels on {device} (torch {meta['torch']}, triton {meta['triton']}); median per call.",
        "",
        "| op | mode | shape | dtype | impl | time (us) | GB/s | of copy BW | speed-up vs eager |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    eager = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["us"] for r in _RESULTS if r["impl"] == "eager"}
    for r in _RESULTS:
        base = eager.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        speedup = f"{base / r['us']:.2f}x" if base else "-"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['us']:.1f} | "
            f"{r['gbps']:.0f} | {r['of_copy_bw']:.0%} | {speedup} |"
        )
    (RESULTS_DIR / f"kernels_{slug}.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Cases: each returns (callable for one step, bytes of minimum traffic)
# ----------------------------------------------------------------------------------------------


def _step(fn, inputs, cotangents, grad_inputs):
    """One forward, and with cotangents one backward that returns gradients (none accumulate)."""
    if cotangents is None:

        def run():
            with torch.no_grad():
                fn(*inputs)

        return run

    def run():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out[: len(cotangents)], grad_inputs, cotangents)

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
        inputs = [t(batch, tokens, width), t(batch, width), t(batch, width)]
        fn = _impl_fn(impl, kernels.modulated_layer_norm, ops.modulated_layer_norm_ref)
        n_cot = 1
        # fwd: x in, y out, shift/scale in; bwd: x, dy in, dx out; scale in, dshift/dscale out
        traffic = (2 * rows + 2 * vec) + (3 * rows + 3 * vec if grad else 0)
    else:
        inputs = [t(batch, tokens, width), t(batch, tokens, width), t(batch, width), t(batch, width), t(batch, width)]
        fn = _impl_fn(impl, kernels.gated_residual_modulated_layer_norm, ops.gated_residual_modulated_layer_norm_ref)
        n_cot = 2
        # fwd: x, h in, x_new, y out, 3 vectors in; bwd: dx_new, dy, x_new, h in, dx, dh out, 2 vectors in, 3 out
        traffic = (4 * rows + 3 * vec) + (6 * rows + 5 * vec if grad else 0)
    cot = tuple(torch.randn(shape, device=DEVICE).to(dtype) for _ in range(n_cot)) if grad else None
    return _step(fn, inputs, cot, inputs), traffic * size


def _loss_case(kernels, op, impl, shape, dtype):
    batch = shape[0]
    size = dtype.itemsize
    elems = torch.Size(shape).numel()

    def t(grad=False):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(grad)

    if op == "euler_consistency_loss":
        time = torch.rand(batch, device=DEVICE) * 0.8 + 0.2
        s = time * torch.rand(batch, device=DEVICE)
        inputs = [t(True), t(), t(), t(), time, time + (s - time) * 0.3, s, 1.0, 0.01]
        fn = _impl_fn(impl, kernels.euler_consistency_loss, ops.euler_consistency_loss_ref)
        traffic = 5 * elems * size  # four rows in, one gradient out
    else:
        dbds = torch.rand(batch, device=DEVICE) + 0.5
        inputs = [t(True), t(), dbds, 1.0, 0.01]
        fn = _impl_fn(impl, kernels.adaptive_velocity_loss, ops.adaptive_velocity_loss_ref)
        traffic = 3 * elems * size  # prediction and target in, one gradient out
    cot = (torch.ones((), device=DEVICE),)
    return _step(fn, inputs, cot, [inputs[0]]), traffic


def _measure(benchmark, step, traffic, copy_gbps, info):
    from triton.testing import do_bench

    for _ in range(3):  # compile (for "compiled") and autotune caches before any timing
        step()
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=25, rep=200, return_mode="median")

    def rounds():
        for _ in range(CALLS_PER_ROUND):
            step()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2, iterations=1)
    gbps = traffic / (ms * 1e-3) / 1e9
    record = {**info, "us": ms * 1e3, "gbps": gbps, "of_copy_bw": gbps / copy_gbps, "copy_gbps": copy_gbps}
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
