"""soflow_fast.data.datasets: digits, npz and CIFAR-10 read into [-1, 1] images with their labels, and
their errors naming the file."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.data import build_dataset, build_loader, load_cifar10, load_npz
from tests.utils import raises_naming, write_cifar

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
    with raises_naming(ValueError, "'/somewhere'"):
        build_dataset("digits", "/somewhere")
    with raises_naming(ValueError, "'digits'", "image_size=16"):
        build_dataset("digits", image_size=16)
    assert build_dataset("digits", image_size=8).shape == (1, 8, 8)
    with raises_naming(ValueError, "'mnist'", "'image_folder'"):  # and the names there are
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
    with raises_naming(ValueError, str(tmp_path / "nan.npz"), "NaN"):
        load_npz(tmp_path / "nan.npz")


def test_npz_errors(tmp_path):
    with raises_naming(FileNotFoundError, str(tmp_path / "nope.npz")):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive")
    with raises_naming(ValueError, str(tmp_path / "bad.npz")):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "amb.npz", x=np.zeros((2, 4, 4, 4), np.uint8))
    with raises_naming(ValueError, str(tmp_path / "amb.npz"), "layout='NCHW'", "--layout="):
        load_npz(tmp_path / "amb.npz")
    assert load_npz(tmp_path / "amb.npz", layout="NHWC").shape == (4, 4, 4)
    np.savez(tmp_path / "mis.npz", x=np.zeros((3, 1, 4, 4), np.uint8), y=np.arange(5))
    with raises_naming(ValueError, str(tmp_path / "mis.npz"), "(3,)", "(5,)"):
        load_npz(tmp_path / "mis.npz")
    np.savez(tmp_path / "i16.npz", x=np.zeros((3, 1, 4, 4), np.int16))
    with raises_naming(ValueError, str(tmp_path / "i16.npz"), "int16"):
        load_npz(tmp_path / "i16.npz")
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((3, 1, 4, 4), np.uint8))
    with raises_naming(ValueError, str(tmp_path / "nokey.npz"), "x_key", "['pixels']"):
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
    with raises_naming(FileNotFoundError, str(tmp_path / "no_cifar_here")):
        build_dataset("cifar10", tmp_path / "no_cifar_here")
    root = tmp_path / "c"
    write_cifar(root)
    (root / "data_batch_3").unlink()
    with raises_naming(FileNotFoundError, "'data_batch_3'", str(root)):
        load_cifar10(root)
    (root / "data_batch_3").write_bytes(b"corrupt")
    with raises_naming(ValueError, str(root / "data_batch_3"), "UnpicklingError"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with raises_naming(ValueError, str(root / "data_batch_3"), "(n, 3072)", "(2, 100)"):
        load_cifar10(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Path("arbitrary objects are refused")}, f)
    with raises_naming(ValueError, str(root / "data_batch_3"), "RefusedGlobal"):
        load_cifar10(root)
