"""Fixtures: the authors' golden values, seeding, and the files several test modules read (a random-weight
Inception-v3, a tiny VAE, a small image folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from tests.utils import IMAGE_SIZE, launch, train_here, write_image_folder

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


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: torch's thread pool takes its share (one thread
    each on the 2-core CI machine), as more threads than cores run several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """NumPy's and SciPy's BLAS on one thread, as in the processes the tests start (``child_env``): two
    threads on the 2 shared cores take about twice as long over FID's 2048 x 2048 matrix square roots."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it BLAS keeps its own thread count
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as a local weights file. BatchNorm
    statistics are set from one forward pass in training mode, so the features are well scaled."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save({}, path)
    torch.manual_seed(0)
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        model = fe.FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path=str(path))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 3, 75, 75), dtype=torch.uint8))
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A random AutoencoderKL with two blocks (downsampling 2), 4 latent channels, saved like a hub folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """The 9 images of ``tests.utils.IMAGES`` in 3 class folders (read only: copy it to change it)."""
    pytest.importorskip("PIL")
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run folder with a log.txt, whose weights (a tiny digits DiT, seeded by the call count) come
    from a stand-in for ``load_run_weights``; ``calls`` counts the loads."""
    from soflow_fast import export
    from soflow_fast.presets import build_config

    cfg = build_config("digits", None, ["--hidden_size=32", "--depth=2", "--num_heads=2"])
    calls = []

    def load_run_weights(work_dir, decay=None, which="ema", step=None):
        calls.append(work_dir)
        torch.manual_seed(len(calls))
        return cfg.model.build().eval(), {"step": len(calls), "decay": 0.9, "config": cfg}

    monkeypatch.setattr(export, "load_run_weights", load_run_weights)
    work = tmp_path / "run"
    work.mkdir()
    (work / "log.txt").write_text("the run's log\n")
    return work, calls


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Uninterrupted ``TINY`` runs shared by tests that read them (copy one to change it): the base folder,
    1 process standing in for 2 ranks, and 2 ranks."""
    base = tmp_path_factory.mktemp("runs")
    one, two = base / "one", base / "two"
    train_here(one, "--draw_groups=2")
    launch(two, 2)
    return base, one, two
