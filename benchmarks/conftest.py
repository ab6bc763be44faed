"""Session fixtures and result metadata for ``pytest benchmarks/ --benchmark-only``.

Every JSON written with ``--benchmark-json`` gains a ``soflow`` block (device, torch and triton
versions, date, threads, measured matmul peaks, the load averages around the run), which
``benchmarks/report.py`` prints in its header.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from benchmarks._util import environment, matmul_peak_tflops

_session: dict = {"peaks": {}}


@pytest.fixture(scope="session")
def matmul_peak() -> dict:
    """Measured dense matmul peak per device, once a session: the denominator of MFU."""
    peaks = {"cpu": matmul_peak_tflops("cpu")}
    if torch.cuda.is_available():
        peaks["cuda"] = matmul_peak_tflops("cuda")
    _session["peaks"] = peaks
    return peaks


def pytest_sessionstart(session) -> None:
    _session.update(start=time.time(), loadavg_start=os.getloadavg())


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["soflow"] = environment()


def pytest_benchmark_update_json(config, benchmarks, output_json: dict) -> None:
    output_json["soflow"] = {
        **environment(),
        "matmul_peaks": _session["peaks"],
        "loadavg_start": [round(v, 2) for v in _session.get("loadavg_start", ())],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "session_s": round(time.time() - _session.get("start", time.time()), 1),
    }
