"""benchmarks/gpu_suite.sh runs its CPU-capable stages end to end in DRY_RUN mode, so a GPU session
(15 minutes of device time) cannot fail on plumbing: the trainer stages (200 steps, and the
sync-debug run) with their real flags, shrunk to seconds; the bench stage's pytest-benchmark JSON
from three rows of the smallest CPU case (trainer-default among them); the compiled stage's loop of one
pytest process and one JSON per variant, on that case; and the report stage, which turns them into
summary.json (benchmarks/summary.py) and report.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.utils import child_env

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = child_env(
        dict(
            DRY_RUN="1",
            SUITE_STAGES="device bench compiled train syncfree report",
            SUITE_DIR=str(tmp_path / "suite"),
            TMPDIR=str(tmp_path),
            PYTHONPATH=str(REPO),
            PYTHON=sys.executable,
            CAP_REPORT="120",  # the GPU machine reports in seconds; a busy 2-core CPU may need more than its 60
        )
    )
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    suite = tmp_path / "suite"
    stages = (suite / "stages.tsv").read_text()
    assert proc.returncode == 0, stages + proc.stdout[-3000:]
    for stage in ("device", "bench", "compiled", "train", "syncfree", "report"):
        assert f"{stage}\tok" in stages, stages
    assert "done at step 4" in (suite / "syncfree_log.txt").read_text()

    # the compiled stage: one JSON per variant, each holding that variant's one row
    for name, variant in (("T2_trainer-default_b16", "trainer-default"), ("T2_meanflow-eager_b16", "meanflow-eager")):
        run = json.loads((suite / f"gpu_compiled_{name}.json").read_text())
        assert [b["extra_info"]["variant"] for b in run["benchmarks"]] == [variant]

    summary = json.loads((suite / "summary.json").read_text())
    assert list(summary)[:5] == ["device", "date", "torch", "triton", "rows"]
    rows = {(r["case"], r["variant"]): r for r in summary["rows"]}
    for key in (("T2-b16", "trainer-default"), ("T2-b16", "soflow-reference-eager"), ("T2-b16", "meanflow-eager")):
        row = rows[key]
        assert list(row) == ["case", "variant", "step_ms", "images_per_s", "peak_gib", "mfu"]
        assert row["step_ms"] > 0 and row["images_per_s"] > 0 and 0 < row["mfu"] and row["peak_gib"] is None
    # the train stage's 2 steps of DiT-T/2 at batch 8: its second interval (no step row of that size: no MFU)
    loop = rows["T2-b8", "trainer-loop"]
    assert loop["step_ms"] > 0 and loop["mfu"] is None
    checks = summary["checks"]
    assert checks["trainer_default_within_5pct_of_fastest_soflow"] in (True, False)  # CPU timing noise decides
    assert checks["trainer_default_mfu"] is None and checks["meanflow_compiled_over_trainer_default"] is None
    assert "## Summary (summary.json)" in (suite / "report.md").read_text()
