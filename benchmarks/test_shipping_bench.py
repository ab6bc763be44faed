"""The shipped one-step sampler against the eager paths: the AOTInductor package (.pt2) and the ONNX file
(onnxruntime) against ``sampling.sample(steps=1)`` and a 50-step flow-matching Euler sampler of the same
network, at batch 1 (the policy case) and 64.

    pytest benchmarks/test_shipping_bench.py --benchmark-only

One test per model x batch x device times every sampler in each round, in turn, so that a change in the
machine's load hits them alike (3 to 15 rounds, ~20 s); a ratio is the median over rounds of that round's
ratio. The fast samplers repeat within a round until it holds ~0.3 s of calls (their per-call mean is the
round's time). Every CPU sampler runs on ``SOFLOW_BENCH_THREADS`` threads (default: torch's); onnxruntime's
threads do not spin after a call, so that they take no core from the sampler timed next. At the end the
module writes ``benchmarks/results/shipping_<device>.json`` and ``.md``: per case the median ms per batch of
each sampler, eager / packaged and FM-50 / packaged, and whether the packaged sampler is at least as fast as
the eager one at batch 1 (the README's claim). The packages are built once per model and device
(AOTInductor compiles C++: 10-40 s a model on this machine).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from benchmarks._util import CpuMeter, environment, randomize_zero_init
from benchmarks.test_sampling_bench import EULER_STEPS, euler_flow_matching
from soflow_fast.models import ModelConfig
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from soflow_fast.shipping import build_sampler, export_program, write_onnx, write_pt2

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # the CPU headline DiT size (benchmarks/_util.py CPU_CASES) and a robot policy's action head
    "DiT-S/4-16px": dict(model="DiT-S/4", input_size=16, in_channels=4, num_classes=10),
    "MLP-policy": dict(model="MLP", obs_size=32, action_dim=7, action_horizon=16, hidden_size=256, num_layers=4),
}
BATCHES = (1, 64)
ROUND_S = 0.3  # seconds of calls per fast sampler and round
CASE_S = 20.0  # seconds of rounds per case: 3 to 15 rounds (FM-50 at batch 64 is ~45 s a round for the DiT)
# On a machine shared with other work, two threads on two cores stall at every OpenMP barrier a
# descheduled thread holds up (DiT-S/4 at batch 1: ~27 ms eager on one thread, ~160 ms on two); one
# thread measures the samplers instead of the sharing.
THREADS = int(os.environ.get("SOFLOW_BENCH_THREADS", "0")) or torch.get_num_threads()

_cases: dict[str, list[dict]] = {}  # device -> rows, written when the module ends


@pytest.fixture(scope="module", autouse=True)
def _threads_and_results():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # before the packages are built and loaded too
    yield
    torch.set_num_threads(before)
    for device, rows in _cases.items():
        write_results(device, rows)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """(model name, device) -> (network, config, {sampler name: callable on the packaged files}), built once."""
    built = {}

    def get(name: str, device: str):
        if (name, device) not in built:
            cfg = ModelConfig.from_dict(MODELS[name])
            torch.manual_seed(0)
            model = cfg.build().to(device).eval()
            randomize_zero_init(model)
            sampler = build_sampler(model, cfg, SoFlowConfig())
            folder = tmp_path_factory.mktemp(name.replace("/", "") + device)
            start = time.perf_counter()
            program = export_program(sampler)
            write_pt2(program, folder / "s.pt2", sampler.describe(), force=False)
            compile_s = time.perf_counter() - start
            runners = {"packaged-pt2": torch._inductor.aoti_load_package(str(folder / "s.pt2"))}
            if device == "cpu":  # onnxruntime here has the CPU provider only
                import onnxruntime as ort

                write_onnx(program, folder / "s.onnx", sampler.describe(), force=False)
                options = ort.SessionOptions()
                options.intra_op_num_threads = THREADS
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                session = ort.InferenceSession(str(folder / "s.onnx"), options, providers=["CPUExecutionProvider"])
                runners["packaged-onnx"] = lambda **feed: torch.from_numpy(
                    session.run(["samples"], {k: v.numpy() for k, v in feed.items()})[0]
                )
            built[name, device] = model, cfg, runners, round(compile_s, 1)
        return built[name, device]

    return get


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_shipping(benchmark, packaged, name, batch, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the CUDA rows need a GPU")
    model, cfg, runners, compile_s = packaged(name, device)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, *cfg.sample_shape(), generator=g).to(device)
    y = cfg.condition_example(batch)
    y = None if y is None else (torch.randn(y.shape, generator=g) if y.is_floating_point() else y).to(device)
    feed = {"noise": noise, **({cfg.condition()[0]: y} if y is not None else {})}
    objective = SoFlowObjective(SoFlowConfig(), num_classes=cfg.num_classes or None)
    samplers = {
        **{k: (lambda r=r: r(**feed)) for k, r in runners.items()},
        "eager-1nfe": lambda: sample(model, objective, noise, y, steps=1),
        f"fm-euler-{EULER_STEPS}": lambda: euler_flow_matching(model, noise, y, EULER_STEPS),
    }
    reference = samplers["eager-1nfe"]()
    calls, cost = {}, 0.0
    for key, run in samplers.items():  # warm-up, and the packaged files compute what `sample` does
        start = time.perf_counter()
        out = run()
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed < ROUND_S:  # a cheap sampler: time a second call, past any first-call setup
            start = time.perf_counter()
            run()
            _sync(device)
            elapsed = time.perf_counter() - start
        calls[key] = max(1, int(ROUND_S / elapsed))
        cost += calls[key] * elapsed
        if key.startswith("packaged"):
            err = (out.to(reference.device) - reference).abs().max().item()
            assert err <= 1e-4, f"{key}: {err:.2e} from sample's output"
    rounds = min(15, max(3, int(CASE_S / cost)))
    times = {key: [] for key in samplers}

    def one_round():
        for key, run in samplers.items():
            start = time.perf_counter()
            for _ in range(calls[key]):
                run()
            _sync(device)
            times[key].append((time.perf_counter() - start) / calls[key])

    benchmark.group = f"shipping {device} {name} b{batch}"
    with torch.no_grad(), CpuMeter() as cpu:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)

    def ratio(a: str, b: str) -> float:  # median over rounds of a / b
        return round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 3)

    fm = f"fm-euler-{EULER_STEPS}"
    row = {
        "model": name,
        "batch": batch,
        "device": device,
        "rounds": rounds,
        "threads": THREADS,
        "calls_per_round": calls,
        "median_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()},
        "eager_over_pt2": ratio("eager-1nfe", "packaged-pt2"),
        "fm50_over_pt2": ratio(fm, "packaged-pt2"),
        "pt2_compile_s": compile_s,
        **cpu.info(),
    }
    if "packaged-onnx" in times:
        row["eager_over_onnx"] = ratio("eager-1nfe", "packaged-onnx")
    benchmark.extra_info.update(row)
    _cases.setdefault(device, []).append(row)


def write_results(device: str, rows: list[dict]) -> None:
    """``shipping_<device>.json`` (environment and rows) and ``.md`` (one table) under benchmarks/results."""
    RESULTS.mkdir(exist_ok=True)
    env = {**environment(), "threads": THREADS}  # the samplers' threads, not torch's default
    doc = {"soflow": {**env, "loadavg_end": [round(v, 2) for v in os.getloadavg()]}, "cases": rows}
    (RESULTS / f"shipping_{device}.json").write_text(json.dumps(doc, indent=1) + "\n")
    fm = f"fm-euler-{EULER_STEPS}"
    lines = [
        f"# The shipped 1-NFE sampler vs eager ({device})",
        "",
        f"{env['cpu'] if device == 'cpu' else env['device']}, torch {env['torch']}, {THREADS} thread(s), "
        f"{env['date']}. Medians over rounds of ms per batch; ratios are medians of per-round ratios (> 1: the "
        "packaged .pt2 is faster). `other load`: cores that other processes used meanwhile (a shared machine).",
        "",
        f"| model | batch | .pt2 ms | .onnx ms | eager 1-NFE ms | FM-{EULER_STEPS} ms | eager / .pt2 | "
        f"FM-{EULER_STEPS} / .pt2 | eager / .onnx | .pt2 >= eager at batch 1 | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ms = r["median_ms"]
        claim = ("yes" if r["eager_over_pt2"] >= 1 else "NO") if r["batch"] == 1 else ""
        onnx = ms.get("packaged-onnx", "")
        lines.append(
            f"| {r['model']} | {r['batch']} | {ms['packaged-pt2']} | {onnx} | {ms['eager-1nfe']} | {ms[fm]} | "
            f"{r['eager_over_pt2']} | {r['fm50_over_pt2']} | {r.get('eager_over_onnx', '')} | {claim} | "
            f"{r.get('other_load_cores', '')} |"
        )
    (RESULTS / f"shipping_{device}.md").write_text("\n".join(lines) + "\n")
