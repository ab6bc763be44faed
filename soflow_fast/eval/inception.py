"""Inception-v3 features for the ADM evaluator, and ADM's npz batches.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (``pip install torch-fidelity``),
with its weights read from a local file (``weights-inception-2015-12-05-6726825d.pth``, the
2015-12-05 TensorFlow graph that ADM's evaluator runs, converted by torch-fidelity; its address is
``torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3``). Nothing is downloaded.

Why torch-fidelity and not pytorch-fid: both port the same TensorFlow graph, but torch-fidelity's
port is the one that reproduces ADM's inputs and outputs: it resizes to 299 x 299 with TF1's
bilinear rule (pytorch-fid uses PyTorch's, which samples different pixels), it normalises
``(x - 128) / 128`` like the graph, it returns the logits without the bias (``logits_unbiased``),
which is exactly ADM's ``softmax/logits/MatMul`` input to the Inception Score (pytorch-fid
exposes no logits), its numerics are tested against TensorFlow in its own suite, and it takes a
weights path (pytorch-fid's FID network loads its weights from a URL only).

Features per image, as ADM's evaluator uses them:

- ``pool``: the 2048-d ``pool_3`` features (FID, precision, recall);
- ``logits``: the 1008 unbiased logits; their softmax are ADM's class probabilities (IS);
- ``spatial``: ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``, after its ReLU, 17 x 17 x
  192), its first 7 channels flattened in TensorFlow's (H, W, C) order: 2023 values (sFID).

ADM's batches are ``.npz`` files whose ``arr_0`` is uint8 (N, H, W, 3); a reference batch may also
hold precomputed ``mu``/``sigma`` (FID) and ``mu_s``/``sigma_s`` (sFID) statistics.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from soflow_fast.eval.checks import (
    INCEPTION_SHA256,
    INCEPTION_WEIGHTS_NAME,
    batch_header,
    check_image_array,
    check_inception_weights,
    not_inception_weights,
    read_npy_header,
)

__all__ = [
    "INCEPTION_WEIGHTS_NAME",
    "InceptionFeatures",
    "default_inception_path",
    "iter_npz_images",
    "npz_image_count",
]

SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels


def default_inception_path() -> Path:
    """Where torch-fidelity caches the weights when it downloads them itself (torch hub's folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def _require_torch_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            f"the ADM evaluator needs torch-fidelity (pip install torch-fidelity, or the eval extra: "
            f'pip install "soflow_fast[eval]"): {err}'
        ) from err
    return FeatureExtractorInceptionV3


class InceptionFeatures:
    """torch-fidelity's TF-compatible Inception-v3 with weights from ``weights_path``.

    Call it on uint8 (N, H, W, 3) images (NumPy or torch) to get a dict of float32 CPU tensors
    ``pool`` (N, 2048), ``logits`` (N, 1008) and, when ``spatial_reason`` is None, ``spatial``
    (N, 2023). Features are computed with TF32 off, so they do not depend on that torch setting.
    """

    def __init__(
        self, weights_path: str | os.PathLike, device: torch.device | str = "cpu", sha256: str | None = INCEPTION_SHA256
    ) -> None:
        cls = _require_torch_fidelity()
        path = check_inception_weights(weights_path, sha256)  # the same words as the trainer's start-up check
        try:
            self.model = cls(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except Exception as err:  # a wrong file fails in torch.load or in load_state_dict
            raise not_inception_weights(path, f"{type(err).__name__}: {err}") from err
        self.device = torch.device(device)
        self.model.to(self.device)
        self._spatial: Tensor | None = None
        # ADM reads mixed_6/conv:0 from the TF graph; torch-fidelity's weight map puts that conv in
        # Mixed_6d.branch1x1, so a forward hook there yields the same tensor.
        block = getattr(getattr(self.model, "Mixed_6d", None), "branch1x1", None)
        self.spatial_reason: str | None = None
        if block is None:
            self.spatial_reason = "this torch-fidelity Inception-v3 has no Mixed_6d.branch1x1 (ADM's mixed_6/conv)"
        else:
            block.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: Tensor) -> None:
        kept = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # NCHW -> TF's NHWC before flattening
        self._spatial = kept.reshape(kept.shape[0], -1).float().cpu()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | Tensor) -> dict[str, Tensor]:
        # a copy: batches streamed from an npz are read-only buffers, which torch warns about
        x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).contiguous().to(self.device)
        self._spatial = None
        prev = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            pool, logits = self.model(x)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
        out = {"pool": pool.float().cpu(), "logits": logits.float().cpu()}
        if self._spatial is not None:
            out["spatial"] = self._spatial
        return out

    def activations(self, batches: Iterator[np.ndarray], total: int | None = None, desc: str = "") -> dict:
        """Features of every image of ``batches`` concatenated: a dict of (N, d) float32 NumPy arrays."""
        from tqdm import tqdm

        parts: dict[str, list[Tensor]] = {}
        with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
            for batch in batches:
                for key, value in self(batch).items():
                    parts.setdefault(key, []).append(value)
                bar.update(len(batch))
        return {key: torch.cat(values).numpy() for key, values in parts.items()}


# ---------------------------------------------------------------------------------------------
# ADM's npz batches
# ---------------------------------------------------------------------------------------------


def npz_image_count(path: str | os.PathLike, key: str = "arr_0") -> int:
    """The number of images in an ADM npz, read from the array header only."""
    path = Path(path)
    shape, _, dtype = batch_header(path, key)
    check_image_array(shape, dtype, path, key)
    return int(shape[0])


def iter_npz_images(path: str | os.PathLike, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Yield the uint8 (b, H, W, 3) images of an ADM npz in order, ``batch_size`` at a time.

    The array is streamed from the zip member (a 50,000-image ImageNet-256 batch is 9.8 GB), except
    for a Fortran-ordered array, which is loaded whole.
    """
    path = Path(path)
    shape, fortran, dtype = batch_header(path, key)
    check_image_array(shape, dtype, path, key)
    if fortran:
        arr = np.load(path)[key]
        for start in range(0, shape[0], batch_size):
            yield np.ascontiguousarray(arr[start : start + batch_size])
        return
    per_image = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        read_npy_header(f)  # to the first image
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise ValueError(f"{path}: {key!r} ends early (image {start + len(data) // per_image} of {shape[0]})")
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
