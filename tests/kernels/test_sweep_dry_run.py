"""benchmarks/kernel_sweep.py runs end to end on the CPU interpreter (--dry), so a GPU call of the
sweep does not spend its device time on a plumbing error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PARTS = ["ln_fwd", "ln_bwd", "pipeline", "loss", "scale", "host"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU host runs the sweep itself (gpu_suite.sh sweep stage)")
def test_kernel_sweep_dry_run(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "kernel_sweep.py"), "--dry", "--out", str(out), "--parts", *PARTS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    errors = [row for row in rows if "error" in row]
    assert not errors, errors
    assert {row["part"] for row in rows} == set(PARTS)
    stages = {row["cfg"]["stages"] for row in rows if row["part"] == "pipeline"}
    assert stages == {1, 2}, stages  # the dry run's first two configurations: the plain loop, then 2 stages
