"""Latent models' samples decoded by a VAE: demo grids, the eval npz and ``sample --vae``, on a tiny
random diffusers AutoencoderKL (4 latent channels, 2x downsampling: the conftest fixture)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from soflow_fast import sample
from tests.utils import assert_one_line_error, train_here

pytest.importorskip("diffusers")
h5py = pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("lat") / "lat.h5"
    with h5py.File(path, "w") as f:
        mean = rng.normal(size=(24, 4, 8, 8)).astype(np.float32)
        f.create_dataset("latents", data=np.concatenate([mean, np.full_like(mean, 0.1)], axis=1))
        f.create_dataset("labels", data=np.arange(24) % 3)
    return path


def _args(latents_file):
    return [
        "--dataset=latents_h5",
        f"--data_path={latents_file}",
        "--in_channels=4",
        "--num_classes=3",
        "--total_steps=2",
        "--eval_steps=2",
        "--eval_num_samples=6",
        "--eval_demo_steps=2",
    ]


def test_eval_npz_and_grids_are_decoded_and_equal_decoding_the_raw_latents(tmp_path, tiny_vae, latents_file):
    from soflow_fast.vae import decode, load_vae
    from soflow_fast.viz import to_uint8

    decoded, raw = tmp_path / "decoded", tmp_path / "raw"
    train_here(decoded, *_args(latents_file), f"--vae={tiny_vae}")
    train_here(raw, *_args(latents_file))
    a = np.load(decoded / "evals" / "step_00000002_1step.npz")
    b = np.load(raw / "evals" / "step_00000002_1step.npz")
    assert a["arr_0"].shape == (6, 16, 16, 3) and a["arr_0"].dtype == np.uint8 and "latents" not in a.files
    assert b["latents"].shape == (6, 4, 8, 8) and b["arr_0"].shape == (6, 8, 8, 3)
    assert "raw latents under 'latents'" in (raw / "log.txt").read_text()
    np.testing.assert_array_equal(a["labels"], b["labels"])
    # the decoded file is the raw run's latents through the VAE (the two runs trained alike)
    want = to_uint8(decode(load_vae(tiny_vae), torch.from_numpy(b["latents"])))
    assert np.abs(want.astype(int) - a["arr_0"].astype(int)).max() <= 1
    from PIL import Image

    grid = Image.open(decoded / "figs" / "step_00000002_1step.png")
    latent_grid = Image.open(raw / "figs" / "step_00000002_1step.png")
    assert grid.mode == "RGB" and grid.size[0] >= latent_grid.size[0]


def test_sample_cli_decodes_with_vae_and_keeps_latents_without(tmp_path, tiny_vae, latents_file):
    run = tmp_path / "run"
    train_here(run, *_args(latents_file), "--eval_steps=0", "--eval_demo_steps=0")
    out = {}
    for name, extra in (("vae", ["--vae", str(tiny_vae)]), ("raw", [])):
        npz = tmp_path / "new_dir" / f"{name}.npz"  # a folder sample makes
        argv = ["--work-dir", str(run), "--num=5", f"--npz={npz}", f"--out={tmp_path / name}.png", *extra]
        assert sample.main(argv) == 0
        out[name] = np.load(npz)
    assert out["vae"]["arr_0"].shape == (5, 16, 16, 3) and "latents" not in out["vae"].files
    assert out["raw"]["latents"].shape == (5, 4, 8, 8)


def test_a_missing_vae_folder_is_one_clear_error(tmp_path, latents_file):
    proc = train_here(tmp_path / "w", *_args(latents_file), f"--vae={tmp_path / 'nope'}", expect_ok=False)
    assert_one_line_error(proc, str(tmp_path / "nope"), "config.json")


def test_a_vae_of_other_channels_than_the_model_is_one_clear_error(tmp_path, tiny_vae):
    # the digits preset trains on 1-channel pixels; the tiny VAE has 4 latent channels
    proc = train_here(tmp_path / "w", "--total_steps=2", f"--vae={tiny_vae}", expect_ok=False)
    assert_one_line_error(proc, str(tiny_vae), "4 latent channels", "the model has 1")


def test_images_to_latents_to_a_run_to_decoded_samples(tmp_path, tiny_vae, image_folder):
    """README's path on a small scale: prepare_latents on an image folder, a run trained on its output
    folder with the eval set sampled at eval_batch_size and eval_nfe, and decoded images from sample."""
    from soflow_fast import prepare_latents

    out = tmp_path / "latents"
    args = ["--data-path", str(image_folder), "--save-path", str(out), "--image-size", "16", "--vae", str(tiny_vae)]
    assert prepare_latents.main([*args, "--num-workers", "0", "--device", "cpu"]) == 0
    run = tmp_path / "run"
    train_here(
        run,
        "--dataset=latents_h5",
        f"--data_path={out}",
        "--in_channels=4",
        "--num_classes=3",
        "--batch_size=6",
        "--total_steps=2",
        "--eval_steps=2",
        "--eval_num_samples=7",
        "--eval_batch_size=3",
        "--eval_nfe=2",
        f"--vae={tiny_vae}",
    )
    ev = np.load(run / "evals" / "step_00000002_2step.npz")  # 2 network calls per sample
    assert ev["arr_0"].shape == (7, 16, 16, 3) and set(ev["labels"].tolist()) <= {0, 1, 2}
    assert json.loads((run / "classes.json").read_text()) == ["cat", "dog", "emu"]  # the folder names, via the file
    npz = tmp_path / "s.npz"
    argv = ["--work-dir", str(run), "--vae", str(tiny_vae), "--num=4", f"--npz={npz}", f"--out={tmp_path / 'g.png'}"]
    assert sample.main(argv) == 0
    assert np.load(npz)["arr_0"].shape == (4, 16, 16, 3)
