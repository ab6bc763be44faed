"""The ADM evaluator's statistics (openai/guided-diffusion, ``evaluations/evaluator.py``) without TensorFlow.

The authors of SoFlow report FID-50K, sFID, Inception Score, precision and recall as computed by
ADM's evaluator. This module computes the same numbers from Inception features, following the
same formulas, conventions and numerical shortcuts; ``soflow_fast.eval.inception`` produces the
features (torch-fidelity's TF-compatible Inception-v3, chosen there and explained in its
docstring) and ``python -m soflow_fast.evaluate`` runs the whole evaluation.

- ``fid_statistics(features)``: the mean and the ``np.cov`` covariance (rows are samples,
  normalised by n - 1) of 2048-d pool features (FID) or of flattened spatial features (sFID).
- ``fid_from_stats(mu1, sigma1, mu2, sigma2, eps)``:
  ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrtm(sigma1 @ sigma2)``. When the matrix square
  root of the product is not finite, ``eps`` is added to both diagonals and it is taken again
  (with a warning); a complex result whose diagonal has an imaginary part above 1e-3 is an error,
  a smaller one is dropped.
- ``inception_score(probs, split_size)``: per split of ``split_size`` consecutive rows,
  ``exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j)))``; the score is the mean over the splits.
  ADM's class probabilities are the softmax of the pool features times the 1008-class logit
  weights, without the bias.
- ``precision_recall(ref, sample, k)``: the k-NN manifold estimate of improved precision and
  recall. Each set's radii are the squared distance of every point to its k-th nearest neighbour
  in its own set (the point itself, at distance 0, is the 0-th). Precision is the fraction of
  samples within the radius of at least one reference point, recall the fraction of reference
  points within the radius of at least one sample. Squared distances are computed in blocks
  (10,000 x 10,000 by default, as ADM) in float16 arithmetic and converted to float32; a block
  in which float16 overflows is recomputed in float32.

Every function takes NumPy arrays or torch tensors of shape (n, d).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "fid_statistics",
    "fid_from_stats",
    "inception_score",
    "pairwise_sq_distances",
    "precision_recall",
]

ArrayLike = np.ndarray | Tensor


def _numpy_2d(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected an (n, d) array with n >= 1, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
    return x


def fid_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of ``features`` (n, d), in float64, as ``np.cov(rowvar=False)``."""
    x = _numpy_2d(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"features: a covariance needs at least 2 samples, got {x.shape[0]}")
    return x.mean(axis=0, dtype=np.float64), np.cov(x, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    # scipy >= 1.16 warns (LinAlgWarning) for a singular or ill-conditioned input; whether the
    # result is usable is decided by the finiteness check of the caller, as in ADM.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def fid_from_stats(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), ADM's way (see module doc)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"the means have different lengths: {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances of shape {sigma1.shape} and {sigma2.shape} do not fit means {mu1.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid_from_stats: sqrtm(sigma1 @ sigma2) is not finite (singular product); adding {eps} to the "
            "diagonal of both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid_from_stats: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: ArrayLike, split_size: int = 5000) -> float:
    """ADM's Inception Score of class probabilities ``probs`` (n, classes), computed in float64.

    A probability of exactly 0 contributes 0 to the KL sum (its limit); ADM's float32 formula would
    give NaN there, and agrees with this one everywhere else.
    """
    p = _numpy_2d(probs, "probs").astype(np.float64)
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------


def _sq_dists_half(u: Tensor, v: Tensor) -> Tensor:
    """Squared distances in float16 arithmetic: every elementwise result is rounded to float16, the
    sums over features (the norms and the dot products) accumulate in float32 (as GPU float16 GEMMs
    and reductions do) and are rounded once. float16 values are exact in float32 (and in TF32), so
    the float32 GEMM below is a float16 GEMM with float32 accumulation on any device."""
    u16, v16 = u.half(), v.half()
    nu = (u16 * u16).float().sum(1).half()
    nv = (v16 * v16).float().sum(1).half()
    dots = (u16.float() @ v16.float().T).half()
    return (nu[:, None] - 2 * dots) + nv[None, :]


def _sq_dists_float(u: Tensor, v: Tensor) -> Tensor:
    u32, v32 = u.float(), v.float()
    nu, nv = (u32 * u32).sum(1), (v32 * v32).sum(1)
    return (nu[:, None] - 2 * (u32 @ v32.T)) + nv[None, :]


class _NoTF32:
    """Turns TF32 matmuls off for a float32 block (TF32 would round the features to 10 mantissa bits)."""

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def pairwise_sq_distances(u: Tensor, v: Tensor) -> Tensor:
    """(len(u), len(v)) float32 squared distances of one block: float16 arithmetic, or float32 for a
    block where float16 overflows (as ADM's DistanceBlock), clamped at 0."""
    d = _sq_dists_half(u, v)
    if not bool(torch.isfinite(d).all()):
        with _NoTF32():
            d = _sq_dists_float(u, v)
    return d.float().clamp_min_(0.0)


def _as_tensor(x: ArrayLike, name: str, device: torch.device | None) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(_numpy_2d(x, name)))
    elif not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected an (n, d) array with n >= 1")
    return x.detach().to(device=device if device is not None else x.device, dtype=torch.float32)


def manifold_radii(features: Tensor, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000) -> Tensor:
    """(n,) squared distance of every row of ``features`` to its k-th nearest row (itself is the 0-th)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0 : r0 + row_batch_size]
        # The k + 1 smallest distances so far, merged block by block: the same values as
        # partitioning the whole row of distances at once.
        best = None
        for c0 in range(0, n, col_batch_size):
            d = pairwise_sq_distances(rows, features[c0 : c0 + col_batch_size])
            d = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + rows.shape[0]] = best[:, k]
    return radii


def precision_recall(
    ref_features: ArrayLike,
    sample_features: ArrayLike,
    k: int = 3,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """ADM's improved precision and recall of ``sample_features`` against ``ref_features``.

    Args:
        ref_features, sample_features: (n_ref, d) and (n_sample, d) pool features.
        k: the neighbourhood size of the radii (ADM: 3).
        row_batch_size, col_batch_size: the block shape of the distance computation; it matters
            only for which blocks fall back to float32.
        device: where to compute; default: the device of ``ref_features`` (CPU for NumPy input).
    Returns:
        (precision, recall) as floats in [0, 1].
    """
    if device is None and isinstance(ref_features, Tensor):
        device = ref_features.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    ref = _as_tensor(ref_features, "ref_features", device)
    sample = _as_tensor(sample_features, "sample_features", device)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"feature sizes differ: ref {ref.shape[1]}, sample {sample.shape[1]}")
    ref_radii = manifold_radii(ref, k, row_batch_size, col_batch_size)
    sample_radii = manifold_radii(sample, k, row_batch_size, col_batch_size)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)
    sample_in = torch.zeros(sample.shape[0], dtype=torch.bool, device=device)
    for r0 in range(0, ref.shape[0], row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, sample.shape[0], col_batch_size):
            c1 = c0 + col_batch_size
            d = pairwise_sq_distances(ref[r0:r1], sample[c0:c1])
            ref_in[r0:r1] |= (d <= sample_radii[None, c0:c1]).any(dim=1)
            sample_in[c0:c1] |= (d <= ref_radii[r0:r1, None]).any(dim=0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())
