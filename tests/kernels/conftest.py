"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

Triton picks between compiling and interpreting when a kernel is defined, so the switch must be
in the environment before anything imports soflow_fast.kernels. pytest imports this file before
it collects any test module in this folder, and soflow_fast.ops imports the kernels lazily (and
sets the same default itself on a host without CUDA), so setting it here is early enough even
when other tests imported soflow_fast.ops first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kernels():
    """The soflow_fast.kernels module (interpreted on a CPU-only host)."""
    from soflow_fast import ops

    module = ops.load_kernels()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: Triton kernels cannot run on this host")
    return module


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
