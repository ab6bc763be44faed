"""benchmarks/gpu_suite.sh runs its CPU-capable stages end to end in DRY_RUN mode, so a GPU session
(15 minutes of device time) cannot fail on plumbing: the trainer stages (200 steps, and the
sync-debug run) with their real flags, shrunk to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_trainer_stages(tmp_path):
    env = dict(
        os.environ,
        DRY_RUN="1",
        SUITE_STAGES="device train syncfree",
        SUITE_DIR=str(tmp_path / "suite"),
        TMPDIR=str(tmp_path),
        PYTHONPATH=str(REPO),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    stages = (tmp_path / "suite" / "stages.tsv").read_text()
    assert proc.returncode == 0, stages + proc.stdout[-3000:]
    for stage in ("device", "train", "syncfree"):
        assert f"{stage}\tok" in stages, stages
    assert "done at step 4" in (tmp_path / "suite" / "syncfree_log.txt").read_text()
