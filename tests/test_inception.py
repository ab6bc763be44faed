"""soflow_fast.eval.inception: torch-fidelity's Inception-v3 features of uint8 batches, with a random-weight
Inception (the conftest fixture)."""

from __future__ import annotations

import numpy as np
import torch

from tests.utils import raises_naming, write_image_batch


def test_inception_features_shapes_spatial_order_and_streaming(inception_weights, tmp_path):
    from soflow_fast.eval.inception import InceptionFeatures, iter_npz_images, npz_image_count

    net = InceptionFeatures(inception_weights, sha256=None)
    assert net.spatial_reason is None
    images = write_image_batch(tmp_path / "b.npz", 5, seed=1)
    out = net(images)
    assert out["pool"].shape == (5, 2048) and out["logits"].shape == (5, 1008) and out["spatial"].shape == (5, 2023)
    assert out["pool"].std() > 0 and torch.isfinite(out["spatial"]).all()
    # spatial: Mixed_6d.branch1x1's first 7 channels in TF's (H, W, C) order
    seen = {}
    hook = net.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("o", o.clone()))
    net(images[:2])
    hook.remove()
    torch.testing.assert_close(out["spatial"][:2], seen["o"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    # streamed batches of the npz give the same features as the whole array
    assert npz_image_count(tmp_path / "b.npz") == 5
    acts = net.activations(iter_npz_images(tmp_path / "b.npz", batch_size=2), total=5)
    np.testing.assert_allclose(acts["pool"], out["pool"].numpy(), rtol=1e-4, atol=1e-5)
    with raises_naming(ValueError, str(tmp_path / "chw.npz"), "(N, H, W, 3)", "(5, 3, 16, 16)"):
        np.savez(tmp_path / "chw.npz", arr_0=images.transpose(0, 3, 1, 2))
        npz_image_count(tmp_path / "chw.npz")
    with raises_naming(FileNotFoundError, str(tmp_path / "missing.pth"), "--inception"):
        InceptionFeatures(tmp_path / "missing.pth")
