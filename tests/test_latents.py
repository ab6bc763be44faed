"""soflow_fast.data.latents: HDF5 VAE moments (a file, or the folder prepare_latents writes) sampled as
seeded posterior draws, and their errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.data import SD_VAE_SCALE, build_dataset, build_loader
from tests.utils import raises_naming

try:
    import h5py
except ImportError:
    h5py = None

requires_h5py = pytest.mark.skipif(h5py is None, reason="h5py is not installed (optional dependency: pip install h5py)")


def _write_h5(path: Path, n: int = 6, key: str = "moments", second: str = "std") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    mean = rng.normal(size=(n, 4, 4, 4)).astype(np.float32)
    std = rng.uniform(0.1, 0.9, size=(n, 4, 4, 4)).astype(np.float32)
    half = std if second == "std" else np.log(std**2)
    labels = np.arange(n) % 3
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=np.concatenate([mean, half], axis=1))
        f.create_dataset("labels", data=labels)
    return mean, std


@requires_h5py
@pytest.mark.parametrize("second", ["std", "logvar"])
def test_latents_h5_formula_is_seeded(tmp_path, second):
    mean, std = _write_h5(tmp_path / "lat.h5", second=second)
    ds = build_dataset("latents_h5", tmp_path / "lat.h5", second_half=second, image_size=32)
    assert len(ds) == 6 and ds.shape == (4, 4, 4) and ds.num_classes == 3
    idx = torch.tensor([4, 1, 4])  # unsorted with a repeat: h5py needs sorted unique rows
    seeds = torch.tensor([11, 22, 33])
    x, y = ds.get_batch(idx, seeds)
    for row, (i, s) in enumerate(zip(idx.tolist(), seeds.tolist(), strict=True)):
        eps = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s))
        ref = (torch.from_numpy(mean[i]) + torch.from_numpy(std[i]) * eps) * 0.18215
        torch.testing.assert_close(x[row], ref, rtol=1e-5, atol=1e-6)
    assert y.tolist() == [1, 1, 1]
    assert not torch.equal(x[0], x[2])  # same image, different seed: a fresh posterior draw
    torch.testing.assert_close(ds.get_batch(idx, seeds)[0], x, rtol=0, atol=0)

    means = build_dataset("latents_h5", tmp_path / "lat.h5", second_half=second, sample=False, in_memory=True)
    torch.testing.assert_close(means.get_batch(idx)[0], torch.from_numpy(mean[[4, 1, 4]]) * SD_VAE_SCALE)


@requires_h5py
def test_latents_h5_noise_is_world_size_invariant_and_resumable(tmp_path):
    _write_h5(tmp_path / "lat.h5", n=10)
    ds = build_dataset("latents_h5", tmp_path / "lat.h5")
    single = build_loader(ds, 4, rank=0, world_size=1, seed=9)
    pair = [build_loader(ds, 2, rank=r, world_size=2, seed=9) for r in range(2)]
    for _ in range(4):
        x1, y1 = single.next_batch()
        (xa, ya), (xb, yb) = (p.next_batch() for p in pair)
        # rank r holds global entries r, r + 2, ...: interleave to rebuild the global batch.
        torch.testing.assert_close(torch.stack([xa, xb], 1).flatten(0, 1), x1, rtol=0, atol=0)
        assert torch.equal(torch.stack([ya, yb], 1).flatten(), y1)
    resumed = build_loader(ds, 4, seed=0)
    resumed.load_state_dict(single.state_dict())
    torch.testing.assert_close(resumed.next_batch()[0], single.next_batch()[0], rtol=0, atol=0)


@requires_h5py
def test_latents_h5_errors(tmp_path):
    with raises_naming(FileNotFoundError, str(tmp_path / "gone.h5")):
        build_dataset("latents_h5", tmp_path / "gone.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with raises_naming(ValueError, str(tmp_path / "junk.h5"), "HDF5"):
        build_dataset("latents_h5", tmp_path / "junk.h5")
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        f.create_dataset("moments", data=np.zeros((2, 7, 4, 4), np.float32))
    with raises_naming(ValueError, str(tmp_path / "odd.h5"), "(N, 2C, H, W)", "(2, 7, 4, 4)"):
        build_dataset("latents_h5", tmp_path / "odd.h5")
    _write_h5(tmp_path / "k.h5", key="feats")
    with raises_naming(ValueError, str(tmp_path / "k.h5"), "moments_key", "['feats', 'labels']"):
        build_dataset("latents_h5", tmp_path / "k.h5")
    assert len(build_dataset("latents_h5", tmp_path / "k.h5", moments_key="feats")) == 6
    with raises_naming(ValueError, "second_half", "'var'"):
        build_dataset("latents_h5", tmp_path / "k.h5", moments_key="feats", second_half="var")


def test_latents_h5_missing_h5py_message(monkeypatch):
    import builtins

    from soflow_fast.data import latents

    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("simulated")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match="pip install h5py"):
        latents._require_h5py()


@requires_h5py
def test_latents_h5_reads_a_prepare_latents_folder_in_the_authors_layout(tmp_path):
    rng = np.random.default_rng(6)
    moments = np.concatenate([rng.normal(size=(5, 4, 2, 2)), rng.uniform(0.1, 1, size=(5, 4, 2, 2))], 1)
    folder = tmp_path / "imagenet_latent"
    folder.mkdir()
    # the folder without its file: what to do, and whether an extraction is under way
    with pytest.raises(FileNotFoundError, match="has no imagenet_latent.hdf5.*prepare_latents"):
        build_dataset("latents_h5", folder)
    (folder / "imagenet_latent_part_0.hdf5").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="1 part file.*unfinished extraction"):
        build_dataset("latents_h5", folder)
    with h5py.File(folder / "imagenet_latent.hdf5", "w") as f:
        f.create_dataset("latents", data=moments.astype(np.float32))
        f.create_dataset("labels", data=np.array([0, 2, 1, 2, 0], dtype=np.int64))
        f.create_dataset("amount", data=np.array(5, dtype=np.int64))
        f.create_dataset("latent_size", data=np.array(2, dtype=np.int64))
        f.attrs["classes"] = '["ant", "bee", "cow"]'
        f.attrs["scaling_factor"] = 0.5
    for path in (folder, folder / "imagenet_latent.hdf5"):
        ds = build_dataset("latents_h5", path, sample=False)
        assert len(ds) == 5 and ds.shape == (4, 2, 2) and ds.num_classes == 3
        assert ds.classes == ["ant", "bee", "cow"] and ds.scale_factor == 0.5  # the file's VAE scale
        x, y = ds.get_batch(torch.tensor([1, 3]))
        torch.testing.assert_close(x, torch.from_numpy(moments[[1, 3], :4]).float() * 0.5)
        assert y.tolist() == [2, 2]
    # an explicit scale wins; names that do not fit the labels are dropped with a warning
    assert build_dataset("latents_h5", folder, scale_factor=SD_VAE_SCALE).scale_factor == SD_VAE_SCALE
    with pytest.warns(UserWarning, match="not a JSON list of 10 class names"):
        assert build_dataset("latents_h5", folder, num_classes=10).classes is None
