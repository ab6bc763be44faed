"""EMA update: soflow_fast._C against torch._foreach_lerp_ and the authors' per-parameter loop.

    pytest benchmarks/test_ema_bench.py --benchmark-only [--benchmark-json=out.json]

CPU cases: three parameter lists (1M, 50M, DiT-B/2-shaped ~130M, all fp32) times one or two decay
rates. Each case records the bytes an ideal update must move (12 B per element for one decay, 20 B
for two: the parameter is read once) and the resulting GB/s. The extension's entry also times all
three candidates in interleaved rounds and records its speedups; a table of them prints at the end. The CUDA case
(675M parameters, DiT-XL/2 shapes) reports bandwidth as a fraction of a measured device copy and
skips without a GPU.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time

import pytest
import torch

from soflow_fast import ema as ema_mod

_C = ema_mod._C
requires_ext = pytest.mark.skipif(_C is None, reason=f"soflow_fast._C not built ({ema_mod._C_IMPORT_ERROR})")

DECAYS = (0.9999, 0.999)


# --------------------------------------------------------------------------------------------- shapes


def dit_shapes(hidden: int, depth: int, patch: int = 2, in_channels: int = 4, classes: int = 1001) -> list[tuple]:
    """Parameter shapes of a DiT with adaLN-Zero blocks and two time embedders (t and s)."""
    h, freq = hidden, 256
    shapes = [(h, in_channels, patch, patch), (h,), (1, 256, h), (classes, h)]  # patch embed, pos, labels
    for _ in range(2):
        shapes += [(h, freq), (h,), (h, h), (h,)]  # time embedder MLP
    for _ in range(depth):
        shapes += [(3 * h, h), (3 * h,), (h, h), (h,)]  # attention qkv, proj
        shapes += [(4 * h, h), (4 * h,), (h, 4 * h), (h,)]  # MLP
        shapes += [(6 * h, h), (6 * h,)]  # adaLN modulation
    shapes += [(2 * h, h), (2 * h,), (patch * patch * in_channels, h), (patch * patch * in_channels,)]  # final
    return shapes


CASES = {
    "1M": [(768, 768), (768,), (512, 768), (512,), (768,), (768,), (32, 512)],
    "50M": [(2048, 1024), (2048,), (1024, 2048), (1024,)] * 12,
    "DiT-B/2": dit_shapes(768, 12),
}
ROUNDS = {"1M": 100, "50M": 8, "DiT-B/2": 6}  # pytest-benchmark rounds per candidate
PAIRED_ROUNDS = {"1M": 400, "50M": 8, "DiT-B/2": 6}  # interleaved rounds; 1M calls are noisy at ~0.1 ms


@functools.cache
def tensors(case: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in CASES[case]]
    return params, [[p.clone() for p in params] for _ in DECAYS]


# ------------------------------------------------------------------------------------------ candidates


def run_ext(emas, params, decays):
    if len(decays) == 1:
        _C.ema_update_(emas[0], params, decays[0], False)
    else:
        _C.ema_update_multi_(emas, params, list(decays), False)


def run_foreach(emas, params, decays):
    for e, d in zip(emas, decays, strict=True):
        torch._foreach_lerp_(e, params, 1.0 - d)


def run_loop(emas, params, decays):
    # the authors' update: one mul_ and one add_ per parameter and decay rate
    for e_list, d in zip(emas, decays, strict=True):
        for e, p in zip(e_list, params, strict=True):
            e.mul_(d).add_(p, alpha=1 - d)


def run_fallback(emas, params, decays):
    if len(decays) == 1:
        ema_mod.ema_update_(emas[0], params, decays[0], use_extension=False)
    else:
        ema_mod.ema_update_multi_(emas, params, list(decays), use_extension=False)


IMPLS = {"loop": run_loop, "foreach": run_foreach, "ext": run_ext}
# (case, decays) -> {other impl: (median of paired time ratios other/ext, ratio of minima)}
_ratios: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}


def interleaved_ratios(emas, params, decays, rounds: int) -> dict[str, tuple[float, float]]:
    """Speedups of the extension from rounds that run every candidate back to back.

    On a shared machine the load drifts over seconds; pairing each extension call with its
    neighbours cancels that drift, which separate pytest-benchmark runs cannot.
    """
    times = {name: [] for name in IMPLS}
    for _ in range(rounds + 1):
        for name, fn in IMPLS.items():
            start = time.perf_counter()
            fn(emas, params, decays)
            times[name].append(time.perf_counter() - start)
    times = {name: t[1:] for name, t in times.items()}  # the first round warms up
    ext = times["ext"]
    return {
        other: (statistics.median(o / e for o, e in zip(times[other], ext, strict=True)), min(times[other]) / min(ext))
        for other in ("foreach", "loop")
    }


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Prints the extension's speedups as a table once the module's benchmarks have run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _ratios:
        return
    lines = [
        "",
        f"EMA CPU speedup of soflow_fast._C, interleaved rounds ({torch.get_num_threads()} threads, ISA "
        f"{_C.cpu_isa()}): median of paired ratios [ratio of minima]",
    ]
    for (case, n), ratios in _ratios.items():
        cells = [f"vs {other} {med:.2f}x [{best:.2f}x]" for other, (med, best) in ratios.items()]
        lines.append(f"  {case:8s} {n} decay(s): " + "  ".join(cells))
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        for line in lines:
            reporter.write_line(line)


# -------------------------------------------------------------------------------------------- CPU cases


@requires_ext
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("num_decays", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_ema_cpu(benchmark, case, num_decays, impl):
    params, emas = tensors(case)
    decays = DECAYS[:num_decays]
    emas = emas[:num_decays]
    numel = sum(p.numel() for p in params)
    nbytes = numel * 4 * (1 + 2 * num_decays)  # read each param once; read and write every EMA buffer
    benchmark.group = f"ema-cpu {case} {num_decays}-decay"
    benchmark.pedantic(IMPLS[impl], args=(emas, params, decays), rounds=ROUNDS[case], warmup_rounds=1, iterations=1)

    med, best = benchmark.stats.stats.median, benchmark.stats.stats.min
    info = benchmark.extra_info
    info.update(
        params=numel,
        tensors=len(params),
        dtype="float32",
        threads=torch.get_num_threads(),
        isa=_C.cpu_isa(),
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        bytes_moved=nbytes,
        gbps_median=round(nbytes / med / 1e9, 2),
        gbps_best=round(nbytes / best / 1e9, 2),
    )
    if impl == "ext":
        ratios = interleaved_ratios(emas, params, decays, PAIRED_ROUNDS[case])
        _ratios[case, num_decays] = ratios
        for other, (paired, minima) in ratios.items():
            info[f"speedup_vs_{other}_paired_median"] = round(paired, 3)
            info[f"speedup_vs_{other}_minima"] = round(minima, 3)


# ------------------------------------------------------------------------------------------- CUDA case


def _cuda_time(fn, reps: int = 10) -> float:
    """Median seconds per call, by CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _copy_gbps(numel: int) -> float:
    """Reference bandwidth: a plain device-to-device copy of the same fp32 footprint (read + write)."""
    src = torch.empty(numel, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _cuda_time(lambda: dst.copy_(src)) / 1e9


@requires_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ema_cuda_675m(benchmark, param_dtype):
    if not _C.cuda_built():
        pytest.skip("soflow_fast._C was built without its CUDA part")
    if os.environ.get("SOFLOW_EMA_EXTENSION", "1") == "0":
        pytest.skip("SOFLOW_EMA_EXTENSION=0: the extension is switched off")
    shapes = dit_shapes(1152, 28)  # DiT-XL/2, ~675M parameters
    params = [torch.randn(s, device="cuda").to(param_dtype) for s in shapes]
    # clone: for fp32 parameters .float() is the parameter itself, and an EMA aliasing its
    # parameter reads the same bytes twice (an earlier version measured 137% of copy bandwidth)
    emas = [[p.float().clone() for p in params] for _ in DECAYS]
    numel = sum(p.numel() for p in params)

    copy_gbps = _copy_gbps(numel)

    p_bytes = params[0].element_size()
    results = {}
    for n in (1, 2):
        nbytes = numel * (p_bytes + 8 * n)
        t_ext = _cuda_time(lambda n=n: run_ext(emas[:n], params, DECAYS[:n]))
        results[f"{n}_decay_ms"] = round(t_ext * 1e3, 3)
        results[f"{n}_decay_fraction_of_copy"] = round(nbytes / t_ext / 1e9 / copy_gbps, 3)
        if param_dtype == torch.float32:
            t_fe = _cuda_time(lambda n=n: run_foreach(emas[:n], params, DECAYS[:n]))
            results[f"{n}_decay_speedup_vs_foreach"] = round(t_fe / t_ext, 3)
        # what soflow_fast.ema does without the extension (bf16: upcast copies, then foreach lerp)
        t_fb = _cuda_time(lambda n=n: run_fallback(emas[:n], params, DECAYS[:n]))
        results[f"{n}_decay_speedup_vs_torch_fallback"] = round(t_fb / t_ext, 3)

    benchmark.group = "ema-cuda 675M"
    benchmark.pedantic(lambda: (run_ext(emas, params, DECAYS), torch.cuda.synchronize()), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(
        params=numel,
        device=torch.cuda.get_device_name(),
        param_dtype=str(param_dtype),
        copy_gbps=round(copy_gbps, 1),
        **results,
    )
