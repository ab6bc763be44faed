"""benchmarks/summary.py (issue #18's summary.json) and the trainer-default benchmark variant, on CPU.

The fake run below mirrors the keys that benchmarks/test_train_step.py writes (see
benchmarks/results/h100/step_eager.json); its numbers are made up to hit each check's branches.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from benchmarks import _util, report, summary
from benchmarks._util import CPU_CASES, GPU_CASES, VARIANTS, BenchStep, Case, skip_reason
from soflow_fast.step import StepPlan

PEAK = {"tflops": 800.0, "shape": 8192, "dtype": "bfloat16"}


def _bench(variant: str, case: Case, step_ms: float, flops: float = 1e13, peak_mib: float | None = 9000.0) -> dict:
    """One train-step row as pytest-benchmark writes it (the keys summary.py and report.py read, and more)."""
    info = {
        "variant": variant,
        "case": case.id,
        "model": case.model,
        "input": f"{case.in_channels}x{case.input_size}x{case.input_size}",
        "batch": case.batch,
        "num_classes": case.num_classes,
        "params": 131091472,
        "dtype": "bfloat16",
        "images_per_s": round(case.batch / step_ms * 1e3, 2),
        "step_ms_median": step_ms,
        "flops_per_step": flops,
        "tflops": flops / step_ms / 1e9,
        "mfu": 0.0,
        "saved_for_backward_mib": 100.0,
        "state_mib": 2500.0,
        **({"peak_mib": peak_mib, "peak_method": "cuda allocator peak of one step"} if peak_mib else {}),
    }
    return {
        "group": f"train-step {case.id}",
        "name": f"test_train_step[{variant}-{case.id}]",
        "fullname": f"benchmarks/test_train_step.py::test_train_step[{variant}-{case.id}]",
        "extra_info": info,
        "stats": {"median": step_ms / 1e3, "mean": step_ms / 1e3, "min": step_ms / 1e3, "rounds": 5},
    }


def _run_json(path, rows: list[dict], peak_tflops: float, date: str) -> None:
    meta = {
        "device": "NVIDIA Fake GPU",
        "cpu": "Fake CPU (16 cores)",
        "torch": "2.99.0+cu999",
        "triton": "9.9.9",
        "date": date,
        "matmul_peaks": {
            "cpu": {"tflops": 1.0, "shape": 2048, "dtype": "float32"},
            "cuda": {**PEAK, "tflops": peak_tflops},
        },
    }
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": rows, "soflow": meta}))


@pytest.fixture
def fake_run(tmp_path):
    """Two session JSONs (eager and compiled, different measured peaks) and a trainer log with its config."""
    b64, b256, xl = GPU_CASES
    eager = [
        _bench("soflow-reference-eager", b64, 80.0),
        _bench("meanflow-eager", b64, 186.0),
        _bench("authors-loop", b64, 370.0, peak_mib=None),
        _bench("soflow-reference-eager", Case("DiT-XL/2", 32, 32, 1000, device="cuda"), 164.0),  # an earlier size
    ]
    compiled = [
        # B2-b64: trainer-default the fastest; meanflow-compiled 1.75x slower
        _bench("trainer-default", b64, 40.0),
        _bench("trainer-default-fused", b64, 42.0),
        _bench("soflow-loss-compiled", b64, 41.0),
        _bench("meanflow-compiled", b64, 70.0),
        # B2-b256: 4% behind the fastest; MFU 4e13 / 0.1 s / 780e12 = 51.3%
        _bench("trainer-default", b256, 100.0, flops=4e13),
        _bench("trainer-default-fused", b256, 96.2, flops=4e13),
        # XL2-b128: 10% behind soflow-loss-compiled (fails the first check), MFU 50% (fails the second)
        _bench("trainer-default", xl, 110.0, flops=0.5 * 780e12 * 0.110),
        _bench("soflow-loss-compiled", xl, 100.0, flops=0.5 * 780e12 * 0.110),
    ]
    _run_json(tmp_path / "gpu.json", eager, 760.0, "2030-01-01 10:00 UTC")
    _run_json(tmp_path / "gpu_compiled_B2.json", compiled, 780.0, "2030-01-01 10:05 UTC")
    log = tmp_path / "train_b2_log.txt"
    log.write_text(
        "[t] starting a new run in /tmp/x\n"
        "[t] 131.09M parameters | world 1 | device cuda:0 | fsdp True | compile True | torch.bfloat16 | "
        "global batch 256 | steps 0 -> 200\n"
        + "".join(
            f"[t] step {20 * (k + 1)} | loss 0.7 fm_loss 0.9 | lr 0.0001 | {sps} step/s | {sps * 256:.1f} img/s | "
            f"peak mem 21.776 GiB\n"
            for k, sps in enumerate([0.5, 8.0, 10.0, 12.0])
        )
        + "[t] done at step 80\n"
    )
    (tmp_path / "train_b2_config.yaml").write_text(
        "model:\n  model: DiT-B/2\n  input_size: 32\nrun:\n  batch_size: 256\n"
    )
    return tmp_path


def test_case_names_and_gpu_cases():
    assert [c.short for c in GPU_CASES] == ["B2-b64", "B2-b256", "XL2-b128"]
    assert all(c.device == "cuda" and c.input_size == 32 and c.num_classes == 1000 for c in GPU_CASES)
    assert [c.short for c in CPU_CASES] == ["T2-b16", "T2-b64", "S4-b64"]


def test_skip_rules():
    b64, b256, xl = GPU_CASES
    # every variant the issue names runs at every GPU size, but eager MeanFlow where it cannot fit
    for case in GPU_CASES:
        for variant in ("trainer-default", "trainer-default-fused", "meanflow-compiled", "soflow-loss-compiled"):
            assert skip_reason(variant, case, cuda_available=True) is None, (variant, case.short)
    assert skip_reason("meanflow-eager", b64, cuda_available=True) is None
    assert "does not fit" in skip_reason("meanflow-eager", b256, cuda_available=True)
    assert "does not fit" in skip_reason("meanflow-eager", xl, cuda_available=True)
    assert skip_reason("trainer-default", b64, cuda_available=False) == "GPU size: needs CUDA"
    # on CPU trainer-default is soflow-reference-eager's step: left out unless asked for
    assert "soflow-reference-eager" in skip_reason("trainer-default", CPU_CASES[0])
    assert "fused" in skip_reason("trainer-default-fused", CPU_CASES[0])


def test_trainer_default_config_is_the_trainers():
    """trainer-default leaves what StepPlan.resolve decides at the trainer's defaults; the plan follows the device."""
    b64 = GPU_CASES[0]
    cfg = _util.variant_config("trainer-default", b64)
    assert (cfg.parallel.compile, cfg.parallel.compile_scope, cfg.parallel.fsdp, cfg.parallel.mixed_precision) == (
        None,
        None,
        None,
        "auto",
    )
    assert (
        not cfg.parallel.use_fused_kernels
        and _util.variant_config("trainer-default-fused", b64).parallel.use_fused_kernels
    )
    cuda = StepPlan.resolve(cfg, torch.device("cuda"), 1)
    assert (cuda.fsdp, cuda.compile, cuda.compile_scope, cuda.param_dtype) == (True, True, "blocks", torch.bfloat16)
    cpu = StepPlan.resolve(cfg, torch.device("cpu"), 1)
    ref = StepPlan.resolve(_util.variant_config("soflow-reference-eager", CPU_CASES[0]), torch.device("cpu"), 1)
    assert cpu == ref == StepPlan(False, False, "blocks", torch.float32, 1)
    assert VARIANTS["trainer-default"].compiles("cuda") and not VARIANTS["trainer-default"].compiles("cpu")


@pytest.fixture
def fsdp_on_cpu(monkeypatch):
    """trainer-default with fsdp forced on, so that CPU runs the CUDA plan's FSDP2-at-world-1 wiring (gloo)."""
    variant_config = _util.variant_config

    def forced(variant, case):
        cfg = variant_config(variant, case)
        cfg.parallel.fsdp = True
        return cfg

    monkeypatch.setattr(_util, "variant_config", forced)
    was_initialized = dist.is_initialized()
    yield
    if dist.is_initialized() and not was_initialized:
        dist.destroy_process_group()


def test_benchstep_fsdp_world1_on_cpu(fsdp_on_cpu):
    """What the GPU suite's trainer-default rows need from BenchStep under FSDP2: a one-process group, steps
    that move every parameter, FLOPs equal to the plain step's, the memory meters on DTensor parameters."""
    case = Case("DiT-T/2", 8, 4, 10)  # CPU_CASES[0] at batch 4
    runner = BenchStep("trainer-default", case)
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert runner.info()["plan_fsdp"] is True and type(runner.model).__name__.startswith("FSDP")
    before = [p.detach().clone() for p in runner.model.parameters()]
    for _ in range(2):
        assert torch.isfinite(runner.step())
    moved = sum(not torch.equal(p.detach(), b) for p, b in zip(runner.model.parameters(), before, strict=True))
    assert moved == len(before)
    assert runner.ema.num_updates == 2
    assert runner.saved_bytes() > 0 and runner.state_bytes() > 0
    plain = BenchStep("soflow-reference-eager", case)
    assert runner.count_flops() == plain.count_flops() > 0


def test_summary_schema_mfu_and_checks(fake_run, capsys):
    out = fake_run / "results" / "summary.json"
    runs = [fake_run / "gpu.json", fake_run / "gpu_compiled_B2.json"]
    assert summary.main([*map(str, runs), "--train-log", str(fake_run / "train_b2_log.txt"), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert list(s)[:5] == ["device", "date", "torch", "triton", "rows"]
    assert (s["device"], s["torch"], s["triton"]) == ("NVIDIA Fake GPU", "2.99.0+cu999", "9.9.9")
    assert s["date"] == "2030-01-01 10:00 UTC"  # the run's start
    assert s["mfu_peak"] == {"tflops": 780.0, "dtype": "bfloat16", "shape": 8192}  # the higher measured peak
    for row in s["rows"]:
        assert tuple(row) == summary.ROW_KEYS
    rows = {(r["case"], r["variant"]): r for r in s["rows"]}
    # cases in GPU_CASES order (then others), variants in VARIANTS order (then the trainer's loop)
    assert [r["case"] for r in s["rows"]] == ["B2-b64"] * 7 + ["B2-b256"] * 3 + ["XL2-b128"] * 2 + ["XL2-b32"]
    assert [v for c, v in rows if c == "B2-b64"][:2] == ["trainer-default", "trainer-default-fused"]

    td = rows["B2-b64", "trainer-default"]
    assert td["step_ms"] == 40.0 and td["images_per_s"] == 1600.0 and td["peak_gib"] == pytest.approx(8.789, abs=1e-3)
    assert td["mfu"] == pytest.approx(1e13 / 0.040 / 780e12, abs=1e-4)
    assert rows["B2-b256", "trainer-default"]["mfu"] == pytest.approx(0.5128, abs=1e-4)
    assert rows["B2-b64", "authors-loop"]["peak_gib"] is None  # not measured: null

    # the trainer's loop: intervals after the first (compile), median 10 step/s; FLOPs of the B2-b256 step row
    loop = rows["B2-b256", "trainer-loop"]
    assert loop["step_ms"] == 100.0 and loop["images_per_s"] == 2560.0 and loop["peak_gib"] == 21.776
    assert loop["mfu"] == pytest.approx(4e13 / 0.1 / 780e12, abs=1e-4)
    assert s["sources"] == ["gpu.json", "gpu_compiled_B2.json", "train_b2_log.txt"]

    c, d = s["checks"], s["check_details"]
    assert c == {
        "trainer_default_within_5pct_of_fastest_soflow": False,  # XL2-b128 is 10% behind
        "trainer_default_mfu": False,  # 51% at B2-b256, 50% at XL2-b128 (< 55%)
        "meanflow_compiled_over_trainer_default": True,  # 70 / 40 = 1.75
        "fused_on_vs_off_default_path": None,  # no trainer-default-fused row at XL2-b128
    }
    within = d["trainer_default_within_5pct_of_fastest_soflow"]["cases"]
    assert within["B2-b64"]["fastest"] == "trainer-default" and within["B2-b64"]["ratio"] == 1.0
    assert within["B2-b256"]["fastest"] == "trainer-default-fused" and within["B2-b256"]["ratio"] == pytest.approx(
        100 / 96.2, abs=1e-4
    )
    assert within["XL2-b128"]["ratio"] == pytest.approx(1.1)
    assert d["meanflow_compiled_over_trainer_default"]["cases"]["B2-b64"] == 1.75
    assert d["fused_on_vs_off_default_path"]["cases"]["B2-b64"]["off_over_on"] == pytest.approx(40 / 42, abs=1e-4)
    assert d["fused_on_vs_off_default_path"]["cases"]["XL2-b128"] is None

    # the README's table: one line per row, and each check with its verdict
    md = summary.markdown(s)
    assert "| B2-b64 | trainer-default | 40.0 | 1,600 | 8.8 | 32.0% |" in md
    assert "| B2-b256 | trainer-loop | 100.0 | 2,560 | 21.8 | 51.3% |" in md
    assert sum(line.startswith("- NOT met") for line in md) == 2 and sum(line.startswith("- met") for line in md) == 1
    # report.py renders it first, and keeps an earlier run's cases (XL2-b32 here) in its tables
    assert report.main([*map(str, runs), "--out", str(fake_run / "report"), "--summary", str(out)]) == 0
    text = (fake_run / "report.md").read_text()
    assert "## Summary (summary.json)" in text and "| B2-b64 | trainer-default | 40.0 |" in text
    assert "| cuda | DiT-XL/2 32x32x4 b32 | soflow-reference-eager | bfloat16 | 164.0 |" in text


def test_summary_checks_pass_and_null():
    """All four met; and nothing measured: every check null, not false."""
    rows = []
    for case, fastest in (("B2-b64", 40.0), ("B2-b256", 100.0), ("XL2-b128", 200.0)):
        rows += [
            {"case": case, "variant": "trainer-default", "step_ms": fastest * 1.049, "mfu": 0.6},
            {"case": case, "variant": "trainer-default-fused", "step_ms": fastest * 1.2, "mfu": 0.5},
            {"case": case, "variant": "soflow-loss-compiled", "step_ms": fastest, "mfu": 0.6},
            {"case": case, "variant": "meanflow-compiled", "step_ms": fastest * 1.8, "mfu": 0.4},
            {"case": case, "variant": "trainer-loop", "step_ms": fastest / 2, "mfu": 0.9},  # not a step variant
        ]
    verdicts, _ = summary.checks(rows, [c.short for c in GPU_CASES])
    assert verdicts == dict.fromkeys(summary.CHECK_RULES, True)
    verdicts, details = summary.checks([], [c.short for c in GPU_CASES])
    assert verdicts == dict.fromkeys(summary.CHECK_RULES, None)
    assert set(details) == set(summary.CHECK_RULES)


def test_summary_of_no_rows(tmp_path):
    """The suite's report stage writes summary.json even when no benchmark ran (every check null)."""
    out = tmp_path / "summary.json"
    assert summary.main(["--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["rows"] == [] and set(s["checks"].values()) == {None} and s["torch"] == torch.__version__
