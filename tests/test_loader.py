"""Tests for soflow_fast.data: the datasets, their error messages, and the resumable sharded stream."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.data import (
    SD_VAE_SCALE,
    ArrayDataset,
    GlobalStreamSampler,
    ShardedLoader,
    build_dataset,
    build_loader,
    load_cifar10,
    load_npz,
    mix_seeds,
)
from tests.utils import write_cifar

try:
    import h5py
except ImportError:
    h5py = None

requires_h5py = pytest.mark.skipif(h5py is None, reason="h5py is not installed (optional dependency: pip install h5py)")


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def test_digits_shape_range_labels():
    from sklearn.datasets import load_digits as sk_digits

    ds = build_dataset("digits")
    ref = sk_digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.num_classes == 10
    x, y = ds.get_batch(torch.arange(len(ds)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (1797, 1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0
    # 0..16 maps linearly onto [-1, 1]; checked against scikit-learn's own array.
    torch.testing.assert_close(x[:, 0], torch.from_numpy(ref.images).float() / 8.0 - 1.0)
    assert torch.equal(y, torch.from_numpy(ref.target).long())
    assert torch.equal(torch.bincount(y), torch.from_numpy(np.bincount(ref.target)))
    xi, yi = ds[5]
    assert xi.shape == (1, 8, 8) and yi.dtype == torch.int64 and yi.ndim == 0 and int(yi) == ref.target[5]


def test_digits_rejects_path_and_wrong_size():
    with pytest.raises(ValueError, match="takes no path"):
        build_dataset("digits", "/somewhere")
    with pytest.raises(ValueError, match="image_size=16"):
        build_dataset("digits", image_size=16)
    assert build_dataset("digits", image_size=8).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown dataset name 'mnist'"):
        build_dataset("mnist")


def test_unconditional_yields_none_labels():
    ds = build_dataset("digits", conditional=False)
    assert ds.num_classes == 0
    assert int(ds[0][1]) == -1
    x, y = build_loader(ds, 8).next_batch()
    assert y is None and x.shape == (8, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def test_npz_uint8_hwc_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 6, 6, 3), dtype=np.uint8)
    imgs[0, 0, 0] = [0, 255, 128]
    labels = np.array([0, 1, 2, 0, 1, 2, 4])
    np.savez(tmp_path / "d.npz", x=imgs, y=labels)
    ds = build_dataset("npz", tmp_path / "d.npz")
    assert len(ds) == 7 and ds.shape == (3, 6, 6) and ds.num_classes == 5
    x, y = ds.get_batch(torch.arange(7))
    expected = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(x, expected)
    assert x[0, :, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]
    assert y.tolist() == labels.tolist()


def test_npz_chw_float_grayscale_and_unlabeled(tmp_path):
    chw = np.random.default_rng(1).integers(0, 256, size=(4, 3, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "chw.npz", images=chw, labels=np.arange(4))
    ds = load_npz(tmp_path / "chw.npz")
    torch.testing.assert_close(ds.get_batch(torch.arange(4))[0], torch.from_numpy(chw).float() / 127.5 - 1.0)

    lat = np.random.default_rng(2).normal(size=(5, 4, 8, 8)).astype(np.float64) * 3.0
    np.savez(tmp_path / "lat.npz", x=lat)
    ds = load_npz(tmp_path / "lat.npz")
    assert ds.num_classes == 0 and ds.shape == (4, 8, 8)
    x, y = ds.get_batch(torch.arange(5))
    torch.testing.assert_close(x, torch.from_numpy(lat).float())  # floats are taken as is, not rescaled
    assert (y == -1).all()

    gray = np.full((3, 4, 4), 255, dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x=gray)
    assert load_npz(tmp_path / "g.npz")[0][0].shape == (1, 4, 4)


def test_float_npz_that_looks_like_pixels_warns_and_nonfinite_is_an_error(tmp_path):
    rng = np.random.default_rng(3)
    for name, images in {"bytes": rng.uniform(0, 255, (4, 1, 4, 4)), "unit": rng.uniform(0, 1, (4, 1, 4, 4))}.items():
        np.savez(tmp_path / f"{name}.npz", x=images.astype(np.float32))
        with pytest.warns(
            UserWarning, match=r"floating-point images span \[0\.\d+, \d+(\.\d+)?\] and are used as stored"
        ):
            load_npz(tmp_path / f"{name}.npz")
    signed = rng.uniform(-1, 1, (4, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "signed.npz", x=signed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_npz(tmp_path / "signed.npz")  # [-1, 1] pixels (or signed latents): no warning
    signed[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=signed)
    with pytest.raises(ValueError, match=r"nan\.npz: floating-point images hold NaN or infinite values"):
        load_npz(tmp_path / "nan.npz")


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match=r"bad\.npz.*not a readable"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "amb.npz", x=np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"amb\.npz.*channel axis"):
        load_npz(tmp_path / "amb.npz")
    assert load_npz(tmp_path / "amb.npz", layout="NHWC").shape == (4, 4, 4)
    np.savez(tmp_path / "mis.npz", x=np.zeros((3, 1, 4, 4), np.uint8), y=np.arange(5))
    with pytest.raises(ValueError, match=r"mis\.npz.*labels must have shape \(3,\)"):
        load_npz(tmp_path / "mis.npz")
    np.savez(tmp_path / "i16.npz", x=np.zeros((3, 1, 4, 4), np.int16))
    with pytest.raises(ValueError, match="int16"):
        load_npz(tmp_path / "i16.npz")
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((3, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no image array"):
        load_npz(tmp_path / "nokey.npz")
    assert len(load_npz(tmp_path / "nokey.npz", x_key="pixels")) == 3


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def test_cifar10_fake_folder(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = build_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert len(ds) == 15 and ds.shape == (3, 32, 32) and ds.num_classes == 10
    x, y = ds.get_batch(torch.arange(15))
    data, labels = written["data_batch_2"]
    # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
    row = data[1]
    assert x[4, 0, 0, 0] == pytest.approx(row[0] / 127.5 - 1, abs=1e-6)
    assert x[4, 1, 0, 0] == pytest.approx(row[1024] / 127.5 - 1, abs=1e-6)
    assert x[4, 2, 31, 31] == pytest.approx(row[3071] / 127.5 - 1, abs=1e-6)
    assert x[4, 0, 1, 0] == pytest.approx(row[32] / 127.5 - 1, abs=1e-6)
    assert y[3:6].tolist() == labels
    test = load_cifar10(tmp_path, train=False)  # the parent folder works too
    assert len(test) == 3 and test.get_batch(torch.arange(3))[1].tolist() == written["test_batch"][1]


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_cifar_here"):
        build_dataset("cifar10", tmp_path / "no_cifar_here")
    root = tmp_path / "c"
    write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(root)
    (root / "data_batch_3").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR-10 python batch"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3.*\(n, 3072\)"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Path("arbitrary objects are refused")}, f)
    with pytest.raises(ValueError, match="data_batch_3.*refusing"):
        load_cifar10(root)


# ---------------------------------------------------------------------------------------------
# HDF5 latents
# ---------------------------------------------------------------------------------------------


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
    with pytest.raises(FileNotFoundError, match="gone.h5"):
        build_dataset("latents_h5", tmp_path / "gone.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match=r"junk\.h5.*not a readable HDF5"):
        build_dataset("latents_h5", tmp_path / "junk.h5")
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        f.create_dataset("moments", data=np.zeros((2, 7, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"odd\.h5.*\(N, 2C, H, W\)"):
        build_dataset("latents_h5", tmp_path / "odd.h5")
    _write_h5(tmp_path / "k.h5", key="feats")
    with pytest.raises(ValueError, match="no moments dataset"):
        build_dataset("latents_h5", tmp_path / "k.h5")
    assert len(build_dataset("latents_h5", tmp_path / "k.h5", moments_key="feats")) == 6
    with pytest.raises(ValueError, match="second_half"):
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


# ---------------------------------------------------------------------------------------------
# The sharded, resumable stream
# ---------------------------------------------------------------------------------------------


def _indexed(n: int) -> ArrayDataset:
    """A dataset whose image i is the constant i, so batches reveal which indices they hold."""
    return ArrayDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 7)


def _global_steps(n: int, world: int, local: int, steps: int, *, seed: int = 0, state=None) -> list[list[int]]:
    """Per step, the sorted multiset of indices seen by all ranks together."""
    ds = _indexed(n)
    loaders = [ShardedLoader(ds, local, rank=r, world_size=world, seed=seed) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        out.append(sorted(int(v) for ld in loaders for v in ld.next_batch()[0].flatten()))
    return out


def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    sampler = GlobalStreamSampler(50, seed=3)
    world, local = 4, 3
    for _ in range(10):  # 12 per step over 50 samples: includes steps straddling an epoch end
        shards = [sampler.window(world * local, r, world) for r in range(world)]
        positions = torch.cat([s[1] for s in shards])
        assert len(set(positions.tolist())) == world * local  # no stream entry is taken twice
        whole_idx, whole_pos = sampler.window(world * local, 0, 1)
        assert sorted(positions.tolist()) == whole_pos.tolist()
        assert sorted(torch.cat([s[0] for s in shards]).tolist()) == sorted(whole_idx.tolist())
        sampler.advance(world * local)


def test_two_ranks_see_the_same_samples_as_one_rank_with_double_batch():
    a = _global_steps(37, world=2, local=4, steps=12)
    b = _global_steps(37, world=1, local=8, steps=12)
    c = _global_steps(37, world=4, local=2, steps=12)
    assert a == b == c
    assert len({tuple(s) for s in a}) == 12  # the steps differ from each other: it is not a constant


def test_each_epoch_is_a_permutation_and_rollover_reshuffles_deterministically():
    n = 23
    flat = [i for step in _global_steps(n, world=1, local=n, steps=3, seed=1) for i in step]
    assert flat == list(range(n)) * 3  # every epoch visits every sample once
    s1, s2, other = GlobalStreamSampler(n, seed=1), GlobalStreamSampler(n, seed=1), GlobalStreamSampler(n, seed=2)
    assert not torch.equal(s1.permutation(0), s1.permutation(1))
    assert torch.equal(s1.permutation(1), s2.permutation(1))
    assert not torch.equal(s1.permutation(1), other.permutation(1))
    # The epoch-1 order seen through the loader is exactly permutation(1).
    ld = ShardedLoader(_indexed(n), n, seed=1)
    ld.next_batch()
    assert ld.epoch == 1
    assert ld.next_batch()[0].flatten().long().tolist() == s1.permutation(1).tolist()
    assert ld.epoch == 2 and ld.samples_seen == 2 * n


def test_resume_mid_epoch_gives_the_identical_continuation():
    ds = _indexed(41)
    ref = ShardedLoader(ds, 6, rank=1, world_size=2, seed=7, hflip=True)
    for _ in range(5):
        ref.next_batch()
    state = ref.state_dict()
    assert all(type(v) is int for v in state.values())
    assert state["epoch"] == 1 and state["position"] == 5 * 12 - 41
    expected = [ref.next_batch() for _ in range(6)]
    resumed = ShardedLoader(ds, 6, rank=1, world_size=2, seed=123, hflip=True)  # the saved seed wins
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resume_at_a_different_world_size_continues_the_global_stream():
    n = 29
    ds = _indexed(n)
    first = ShardedLoader(ds, 8, rank=0, world_size=1, seed=4)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    reference = _global_steps(n, world=1, local=8, steps=9, seed=4)[3:]
    assert _global_steps(n, world=2, local=4, steps=6, state=state) == reference
    assert _global_steps(n, world=4, local=2, steps=6, state=state) == reference
    # Without the state, a fresh loader would replay the start of the stream instead.
    assert _global_steps(n, world=2, local=4, steps=6, seed=4) != reference


def test_state_from_another_dataset_is_rejected():
    ld = ShardedLoader(_indexed(10), 2)
    with pytest.raises(ValueError, match="10"):
        ld.load_state_dict(ShardedLoader(_indexed(12), 2).state_dict())
    with pytest.raises(ValueError, match="missing"):
        ld.load_state_dict({"epoch": 0})


def test_flips_are_per_sample_and_world_size_invariant():
    img = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(16, 1, 1, 1)
    ds = ArrayDataset(img + 10 * torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1))
    single = ShardedLoader(ds, 8, seed=2, hflip=True).next_batch()[0]
    pair = [ShardedLoader(ds, 4, rank=r, world_size=2, seed=2, hflip=True).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.stack(pair, 1).flatten(0, 1), single)
    flipped = single[..., 0] > single[..., -1]
    assert 0 < int(flipped.sum()) < 8  # some flipped, some not
    plain = ShardedLoader(ds, 8, seed=2).next_batch()[0]
    assert torch.equal(plain.flip(-1)[flipped.flatten()], single[flipped.flatten()])


def test_mix_seeds_is_stable_and_separates_domains():
    a = mix_seeds(0, torch.arange(1000))
    assert a.dtype == torch.int64 and (a >= 0).all() and len(set(a.tolist())) == 1000
    assert torch.equal(a, mix_seeds(0, np.arange(1000)))
    assert not torch.equal(a, mix_seeds(0, torch.arange(1000), tag=1))
    assert not torch.equal(a, mix_seeds(1, torch.arange(1000)))
    assert mix_seeds(5, 3).shape == ()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_round_trip_of_the_loader_state(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    ds = _indexed(30)
    ld = ShardedLoader(ds, 4, seed=8)
    for _ in range(9):
        ld.next_batch()
    dcp.save({"data": ld}, checkpoint_id=str(tmp_path / "ckpt"))
    expected = ld.next_batch()[0]
    fresh = ShardedLoader(ds, 4, seed=8)
    dcp.load({"data": fresh}, checkpoint_id=str(tmp_path / "ckpt"))
    assert fresh.state_dict() == {**ld.state_dict(), "epoch": 1, "position": 6}
    assert torch.equal(fresh.next_batch()[0], expected)


def test_digits_loader_is_fast_enough_for_cpu_training():
    import time

    ld = build_loader(build_dataset("digits"), 256, seed=0)
    ld.next_batch()
    start = time.perf_counter()
    for _ in range(200):
        ld.next_batch()
    per_step = (time.perf_counter() - start) / 200
    assert per_step < 2e-3, f"{per_step * 1e3:.2f} ms per digits batch; the data path must stay negligible"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staged_cuda_loader_matches_cpu():
    ds = build_dataset("digits")
    cpu = build_loader(ds, 32, seed=6, hflip=True)
    gpu = build_loader(ds, 32, seed=6, hflip=True, device="cuda")
    assert gpu.dataset.images.is_cuda  # staged once, not copied per step
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
