"""The compiled (not interpreted) kernels build for the H100 without a GPU: Triton's own ptxas
lowers every launch configuration to a cubin, and none spills registers (see gpu_build.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _ptxas() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_ptxas() is None, reason="this Triton has no NVIDIA backend (bundled ptxas) to build with")
def test_kernels_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("gpu_build.py")
    result = subprocess.run(
        [sys.executable, str(script), "--arch", "90"], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.strip().splitlines()[-1].startswith("built ")
