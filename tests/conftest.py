"""Fixtures: the authors' golden values and seeding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "assets" / "golden"


def _load_golden(name: str) -> dict:
    raw = np.load(GOLDEN_DIR / name)
    data = {k: torch.from_numpy(raw[k]) for k in raw.files if k != "meta"}
    data["meta"] = json.loads(str(raw["meta"]))
    return data


@pytest.fixture(scope="session")
def golden():
    """The authors' guided Euler case as a dict of tensors plus its meta (see assets/golden/README.md)."""
    return _load_golden("authors_guided_euler.npz")


@pytest.fixture(scope="session")
def golden_unet():
    """The authors' CIFAR-10 U-Net case, same layout (see assets/golden/README.md)."""
    return _load_golden("authors_unet_euler.npz")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
