"""soflow_fast.eval.adm against plain NumPy transcriptions of ADM's evaluator formulas and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from soflow_fast.eval import adm
from tests.utils import raises_naming

# ---------------------------------------------------------------------------------------------
# Plain transcriptions of evaluations/evaluator.py (NumPy, float16 distances as TF computes them)
# ---------------------------------------------------------------------------------------------


def ref_fid(acts1: np.ndarray, acts2: np.ndarray, eps: float = 1e-6) -> float:
    mu1, sigma1 = np.mean(acts1, axis=0), np.cov(acts1, rowvar=False)
    mu2, sigma2 = np.mean(acts2, axis=0), np.cov(acts2, rowvar=False)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def ref_inception_score(preds: np.ndarray, split_size: int) -> float:
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def ref_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) on float16 copies (sums accumulated in float32), float32 if that overflows."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is what the check below catches
        nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
        nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
        mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = nu - np.float16(2) * mm + nv
    if not np.isfinite(d).all():
        u32, v32 = u.astype(np.float32), v.astype(np.float32)
        d = np.square(u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + np.square(v32).sum(1)[None, :]
    return np.maximum(d, 0).astype(np.float32)


def ref_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        d = ref_distances(x, x)
        return np.partition(d, np.arange(k + 1), axis=1)[:, k]

    r_ref, r_sample = radii(ref), radii(sample)
    d = ref_distances(ref, sample)  # (n_ref, n_sample)
    precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d <= r_sample[None, :], axis=1))
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_fid_statistics_and_distance_equal_the_transcription():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)).astype(np.float32)
    b = (rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.5).astype(np.float32)
    mu, sigma = adm.fid_statistics(a)
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-12)
    fid = adm.fid_from_stats(*adm.fid_statistics(a), *adm.fid_statistics(b))
    np.testing.assert_allclose(fid, ref_fid(a, b), rtol=1e-6)
    assert abs(adm.fid_from_stats(mu, sigma, mu, sigma)) < 1e-8
    torch_stats = adm.fid_statistics(torch.from_numpy(a))
    np.testing.assert_allclose(torch_stats[1], sigma)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    # diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(adm.fid_from_stats(m1, np.diag(a), m2, np.diag(b)), expected, rtol=1e-10)
    # S2 = c^2 S1 for a full SPD S1: |m1 - m2|^2 + (1 - c)^2 tr(S1)
    q = rng.normal(size=(6, 6))
    s1 = q @ q.T + 0.1 * np.eye(6)
    expected = np.sum((m1 - m2) ** 2) + (1 - 3.0) ** 2 * np.trace(s1)
    np.testing.assert_allclose(adm.fid_from_stats(m1, s1, m2, 9.0 * s1), expected, rtol=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with scalars, as np.atleast_1d/2d make of them
    np.testing.assert_allclose(adm.fid_from_stats(1.0, 4.0, -1.0, 1.0), 4.0 + 1.0, rtol=1e-12)


def test_frechet_distance_singular_fallback_and_imaginary_check(monkeypatch):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(5, 5))
    s1, s2 = q @ q.T, np.diag(rng.uniform(1, 2, size=5))
    real_sqrtm = adm._sqrtm
    calls = []

    def first_not_finite(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(adm, "_sqrtm", first_not_finite)
    with pytest.warns(RuntimeWarning, match="adding 0.001 to the diagonal"):
        got = adm.fid_from_stats(np.zeros(5), s1, np.zeros(5), s2, eps=1e-3)
    # the retry took sqrtm of the product of the offset covariances, the traces stay unshifted
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(5)) @ (s2 + 1e-3 * np.eye(5)))
    covmean = real_sqrtm(calls[1]).real
    np.testing.assert_allclose(got, np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), rtol=1e-12)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="imaginary component"):
        adm.fid_from_stats(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with raises_naming(ValueError, "(2,)", "(3,)"):
        adm.fid_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_transcription_and_known_values():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(53, 11)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for split in (5000, 7):  # one split, and uneven splits (the last holds 4 rows)
        np.testing.assert_allclose(adm.inception_score(probs, split), ref_inception_score(probs, split), rtol=1e-12)
    np.testing.assert_allclose(adm.inception_score(np.eye(10)), 10.0, rtol=1e-12)  # confident and diverse
    np.testing.assert_allclose(adm.inception_score(np.full((8, 4), 0.25)), 1.0, rtol=1e-12)  # uninformative


# ---------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------


def test_precision_recall_equals_the_transcription_and_ignores_block_shape():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(90, 32)).astype(np.float32)
    sample = (rng.normal(size=(70, 32)) * 1.3 + 0.4).astype(np.float32)
    expected = ref_precision_recall(ref, sample)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both numbers are informative
    assert adm.precision_recall(ref, sample) == expected
    assert adm.precision_recall(ref, sample, row_batch_size=16, col_batch_size=9) == expected
    assert adm.precision_recall(torch.from_numpy(ref), torch.from_numpy(sample)) == expected
    # the radii are the k-th neighbour distances, self excluded: identical sets are inside each other
    assert adm.precision_recall(ref, ref) == (1.0, 1.0)
    k5 = ref_precision_recall(ref, sample, k=5)
    assert adm.precision_recall(ref, sample, k=5) == k5 and k5 != expected


def test_precision_recall_float16_overflow_falls_back_to_float32():
    rng = np.random.default_rng(5)
    ref = (rng.normal(size=(40, 16)) * 80).astype(np.float32)  # squared norms ~1e5 > float16's 65504
    sample = (rng.normal(size=(30, 16)) * 80 + 20).astype(np.float32)
    u = torch.from_numpy(ref)
    assert not torch.isfinite(adm._sq_dists_half(u, u)).all()
    d = adm.pairwise_sq_distances(u, u)
    np.testing.assert_allclose(d.numpy(), ref_distances(ref, ref), rtol=1e-6, atol=0.1)  # float32 cancellation
    assert adm.precision_recall(ref, sample) == ref_precision_recall(ref, sample)
    # a small-valued block stays float16: its distances are float16 numbers
    small = torch.from_numpy(ref[:5] / 100)
    assert torch.equal(adm.pairwise_sq_distances(small, small), adm.pairwise_sq_distances(small, small).half().float())


def test_precision_recall_errors():
    with raises_naming(ValueError, "k=3", "got 3"):
        adm.precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
    with raises_naming(ValueError, "ref 4", "sample 5"):
        adm.precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))
