"""soflow_fast.eval.checks, shared by the trainer and ``evaluate``: a sample or reference batch and an
Inception weights file are checked up front, and the error names the file and the reason."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from tests.utils import raises_naming, truncated_copy, write_image_batch


def test_batch_checks_name_the_file_and_the_reason(tmp_path):
    from soflow_fast.eval.checks import MIN_BATCH_IMAGES, check_reference_batch, check_sample_batch, check_sample_count

    assert MIN_BATCH_IMAGES == 4
    images = write_image_batch(tmp_path / "ok.npz", 4, seed=0)
    assert check_reference_batch(tmp_path / "ok.npz") == 4 and check_sample_batch(tmp_path / "ok.npz") == 4
    truncated_copy(tmp_path / "ok.npz", tmp_path / "cut.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "three.npz", arr_0=images[:3])
    np.savez(tmp_path / "part.npz", **{"arr_0.0": images})  # the trainer's per-rank part file
    cases = {
        "cut.npz": "not a readable npz file (BadZipFile: ",
        "float.npz": "'arr_0' must be uint8 images (N, H, W, 3) as ADM's batches, got float32 (4, 16, 16, 3)",
        "nchw.npz": "'arr_0' must be uint8 images (N, H, W, 3) as ADM's batches, got uint8 (4, 3, 16, 16)",
        "three.npz": "3 image(s), but precision and recall (k=3 nearest neighbours) need at least 4",
        "part.npz": "no 'arr_0' array in the npz (found ['arr_0.0.npy'])",
    }
    for name, reason in cases.items():
        for check in (check_reference_batch, check_sample_batch):
            with pytest.raises(ValueError) as info:
                check(tmp_path / name)
            assert str(info.value).startswith(f"{tmp_path / name}: ") and reason in str(info.value), info.value
    with raises_naming(FileNotFoundError, str(tmp_path / "missing.npz")):
        check_reference_batch(tmp_path / "missing.npz")
    check_sample_count(4, "eval.eval_num_samples")
    with raises_naming(ValueError, "eval.eval_num_samples", "3 image(s)", "at least 4"):
        check_sample_count(3, "eval.eval_num_samples")


def test_inception_weights_check_needs_no_network_and_matches_the_loader(inception_weights, tmp_path):

    from soflow_fast.eval.checks import check_inception_weights
    from soflow_fast.eval.inception import InceptionFeatures

    assert check_inception_weights(inception_weights, sha256=None) == inception_weights
    write_image_batch(tmp_path / "ref.npz", 4, seed=0)
    torchvision_like = dict(torch.load(inception_weights, weights_only=True))
    torchvision_like["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(torchvision_like, tmp_path / "torchvision.pth")
    del torchvision_like["Mixed_6d.branch1x1.conv.weight"]
    torch.save(torchvision_like, tmp_path / "no_mixed6.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save(argparse.Namespace(a=1), tmp_path / "pickle.pth")  # refused by the weights-only loader
    cases = {
        "ref.npz": "(RuntimeError: ",
        "torchvision.pth": "('fc.weight' is (1000, 2048), expected (1008, 2048))",
        "no_mixed6.pth": "(no tensor 'Mixed_6d.branch1x1.conv.weight')",
        "list.pth": "(a list, not a state dict)",
        "pickle.pth": "(UnpicklingError: ",
    }
    for name, reason in cases.items():
        with pytest.raises(ValueError) as info:
            check_inception_weights(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: not torch-fidelity's Inception-v3 weights {reason}")
        with pytest.raises(ValueError) as built:  # the network's loader says the same
            InceptionFeatures(tmp_path / name)
        assert str(built.value) == str(info.value)
    with raises_naming(FileNotFoundError, str(tmp_path / "missing.pth"), "--inception"):
        check_inception_weights(tmp_path / "missing.pth")
