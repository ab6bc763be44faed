"""Sample-set metrics against closed forms, and the digits classifier with its weight cache."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.data import load_digits
from soflow_fast.eval import (
    compare_sets,
    default_cache_dir,
    digits_feature_extractor,
    digits_label_accuracy,
    energy_distance,
    frechet_digits_distance,
    frechet_distance,
    frechet_distance_from_stats,
    mmd_rbf,
    sliced_wasserstein2,
)
from soflow_fast.eval import metrics as M
from tests.utils import raises_naming

SET_METRICS = {"energy": energy_distance, "sw2": sliced_wasserstein2, "mmd": mmd_rbf, "frechet": frechet_distance}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These sets are small: on a shared 2-core machine, OpenMP workers waiting on each other cost
    # more than they save (measured 40x slower per call under load). Restored afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gauss(n: int, d: int, seed: int, mean=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + torch.as_tensor(mean, dtype=torch.float64)


def mean_abs_normal(mu: float, sigma: float, d: int) -> float:
    """E|Z| for Z ~ N(mu e_1, sigma^2 I_d), d in {1, 3} (the mean of a noncentral chi)."""
    r = mu / sigma
    if d == 1:
        return sigma * math.sqrt(2 / math.pi) * math.exp(-(r**2) / 2) + mu * math.erf(r / math.sqrt(2))
    if r == 0:
        return sigma * 2 * math.sqrt(2 / math.pi)
    return sigma * (math.sqrt(2 / math.pi) * math.exp(-(r**2) / 2) + (r + 1 / r) * math.erf(r / math.sqrt(2)))


# ---------------------------------------------------------------------------------------------
# Identical sets, growing shifts
# ---------------------------------------------------------------------------------------------


def test_identical_sets():
    n = 400
    a = gauss(n, 5, 0)
    # The unbiased estimators dip below zero by a known amount when one set is passed twice.
    expected = -(2 / n) * torch.pdist(a).mean().item()
    assert energy_distance(a, a) == pytest.approx(expected, rel=1e-6)
    mmd = mmd_rbf(a, a)
    assert -2 * 3 / n < mmd < 0
    assert sliced_wasserstein2(a, a) == 0.0
    for method in ("scipy", "eigh"):
        assert abs(frechet_distance(a, a, method=method)) < 1e-9
    # The same empirical distribution at a different size: the merged quantile grid is exact.
    assert sliced_wasserstein2(a, torch.cat([a, a])) < 1e-12


@pytest.mark.parametrize("name", list(SET_METRICS))
def test_grows_with_shift(name):
    fn = SET_METRICS[name]
    a = gauss(600, 4, 0)
    b = gauss(600, 4, 1)
    direction = torch.full((4,), 0.5, dtype=torch.float64)  # unit vector
    vals = [fn(a, b + s * direction) for s in (0.5, 1.0, 2.0)]
    assert 0 < vals[0] < vals[1] < vals[2], vals
    assert fn(a, b) < vals[0]


def test_chunked_pair_sums_match_brute_force(monkeypatch):
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 50)  # 2-row chunks: the diagonal offset is exercised
    x, y = gauss(37, 3, 0), gauss(23, 3, 1, mean=0.3)
    dist = lambda p, q: (p[:, None] - q[None]).norm(dim=-1)  # explicit differences: exact zeros on the diagonal
    dxy, dxx, dyy = dist(x, y), dist(x, x), dist(y, y)
    off = lambda d: d.sum() / (d.shape[0] * (d.shape[0] - 1))  # diagonal is zero
    assert energy_distance(x, y) == pytest.approx(float(2 * dxy.mean() - off(dxx) - off(dyy)), rel=1e-10)
    k = lambda d: torch.exp(-d.square() / 2) + torch.exp(-d.square() / 8)
    n, m = 37, 23
    kxx, kyy = k(dxx).sum() - n * 2, k(dyy).sum() - m * 2  # drop the diagonal, where k = 2
    brute = kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * k(dxy).mean()
    assert mmd_rbf(x, y, bandwidths=(1.0, 2.0)) == pytest.approx(float(brute), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_energy_distance_gaussians(d, mu):
    # X - Y ~ N(-mu, 2I) and X - X' ~ N(0, 2I): ED = 2E|N(mu, 2I)| - 2E|N(0, 2I)|.
    exact = 2 * mean_abs_normal(mu, math.sqrt(2), d) - 2 * mean_abs_normal(0.0, math.sqrt(2), d)
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = mu
    val = energy_distance(gauss(2000, d, 0), gauss(2000, d, 1, mean=shift))
    assert val == pytest.approx(exact, abs=0.04 + 0.02 * exact)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_sliced_w2_gaussians(mu):
    # 1-D: W2(N(0,1), N(mu,1)) = mu. d dims: E[(theta . m)^2] = |m|^2 / d, so SW2 = |m| / sqrt(d).
    assert sliced_wasserstein2(gauss(3000, 1, 0), gauss(3000, 1, 1, mean=mu)) == pytest.approx(mu, abs=0.04)
    m = torch.full((4,), mu, dtype=torch.float64)  # |m| = 2 mu, SW2 = mu; unequal sizes on purpose
    val = sliced_wasserstein2(gauss(2000, 4, 2), gauss(1500, 4, 3, mean=m), num_projections=1000)
    assert val == pytest.approx(mu, abs=0.05)


def test_sliced_w2_exact_small_case_and_determinism():
    # Quantile functions of {0, 1} and {0, 0, 1} differ by 1 on (1/2, 2/3]: W2^2 = 1/6.
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.0], [1.0]])
    assert sliced_wasserstein2(a, b) == pytest.approx(math.sqrt(1 / 6), rel=1e-12)
    x, y = gauss(300, 6, 0), gauss(200, 6, 1, mean=0.3)
    assert sliced_wasserstein2(x, y) == sliced_wasserstein2(x, y)
    g = lambda s: torch.Generator().manual_seed(s)
    assert sliced_wasserstein2(x, y, generator=g(5)) == sliced_wasserstein2(x, y, generator=g(5))
    assert sliced_wasserstein2(x, y, generator=g(5)) != sliced_wasserstein2(x, y, generator=g(6))


def _closed_form_2x2(m1, s1, m2, s2) -> float:
    # Eigenvalues l1, l2 of S1 S2 are >= 0; sqrt(l1) + sqrt(l2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    tr_sqrt = math.sqrt(float((s1 @ s2).trace()) + 2 * math.sqrt(float(s1.det() * s2.det())))
    return float((m1 - m2).square().sum() + s1.trace() + s2.trace()) - 2 * tr_sqrt


L1 = torch.tensor([[1.0, 0.0], [0.5, 0.8]], dtype=torch.float64)
L2 = torch.tensor([[0.6, 0.0], [-0.4, 1.2]], dtype=torch.float64)
MU1 = torch.tensor([0.0, 0.0], dtype=torch.float64)
MU2 = torch.tensor([1.0, -0.5], dtype=torch.float64)


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_closed_form(method):
    s1, s2 = L1 @ L1.T, L2 @ L2.T  # non-commuting, so (S1 S2)^{1/2} is not symmetric
    exact = _closed_form_2x2(MU1, s1, MU2, s2)
    assert frechet_distance_from_stats(MU1, s1, MU2, s2, method=method) == pytest.approx(exact, rel=1e-10)
    # A rank-one covariance against a full one: still finite and on the closed form.
    v = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    s_low = v @ v.T
    exact_low = _closed_form_2x2(MU1, s_low, MU2, s2)
    assert frechet_distance_from_stats(MU1, s_low, MU2, s2, method=method) == pytest.approx(exact_low, abs=1e-5)
    # Large samples: the plug-in estimate lands near the population value.
    x = gauss(20000, 2, 0) @ L1.T + MU1
    y = gauss(20000, 2, 1) @ L2.T + MU2
    assert frechet_distance(x, y, method=method) == pytest.approx(exact, abs=0.08)


def test_frechet_scipy_imaginary_parts(monkeypatch):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = L1 @ L1.T, L2 @ L2.T
    exact = _closed_form_2x2(MU1, s1, MU2, s2)
    true_sqrtm = scipy_linalg.sqrtm
    monkeypatch.setattr(scipy_linalg, "sqrtm", lambda a: true_sqrtm(a) + 1e-12j)  # round-off: dropped
    assert frechet_distance_from_stats(MU1, s1, MU2, s2, method="scipy") == pytest.approx(exact, rel=1e-10)
    monkeypatch.setattr(scipy_linalg, "sqrtm", lambda a: 7.0 + 0.5j * np.ones_like(a))  # astray: eigh instead
    assert frechet_distance_from_stats(MU1, s1, MU2, s2, method="scipy") == pytest.approx(exact, rel=1e-10)


def test_frechet_without_scipy_uses_eigh(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)  # makes `import scipy.linalg` fail
    assert M._resolve_method("auto") == "eigh"
    s1, s2 = L1 @ L1.T, L2 @ L2.T
    exact = _closed_form_2x2(MU1, s1, MU2, s2)
    assert frechet_distance_from_stats(MU1, s1, MU2, s2) == pytest.approx(exact, rel=1e-10)


def test_frechet_methods_agree_on_near_singular_features():
    # 40-d features living on 5 dimensions plus tiny noise: covariances nearly singular.
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(5, 40, generator=g, dtype=torch.float64)
    a = gauss(500, 5, 1) @ basis + 1e-6 * gauss(500, 40, 2)
    b = (gauss(500, 5, 3) + 0.3) @ basis + 1e-6 * gauss(500, 40, 4)
    via_scipy, via_eigh = frechet_distance(a, b, method="scipy"), frechet_distance(a, b, method="eigh")
    assert math.isfinite(via_scipy) and via_scipy > 0
    assert via_scipy == pytest.approx(via_eigh, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def test_numpy_torch_and_dtypes_agree():
    a, b = gauss(200, 3, 0), gauss(150, 3, 1, mean=0.5)
    for name, fn in SET_METRICS.items():
        ref = fn(a, b)
        assert fn(a.numpy(), b.numpy()) == pytest.approx(ref, rel=1e-12), name
        assert fn(a.float(), b.numpy().astype(np.float32)) == pytest.approx(ref, rel=1e-5), name
    # trailing dims are flattened: (n, 1, 8, 8) behaves like (n, 64)
    x, y = gauss(50, 64, 2), gauss(50, 64, 3)
    assert energy_distance(x.view(50, 1, 8, 8), y.view(50, 1, 8, 8)) == pytest.approx(energy_distance(x, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu():
    a, b = gauss(300, 5, 0), gauss(250, 5, 1, mean=0.4)
    for name, fn in SET_METRICS.items():
        assert fn(a.cuda().float(), b.cuda()) == pytest.approx(fn(a.float(), b), rel=1e-6), name


def test_compare_sets():
    a, b = gauss(200, 3, 0), gauss(200, 3, 1, mean=0.5)
    out = compare_sets(a, b, metrics=("mmd", "energy", "frechet"))
    assert list(out) == ["mmd", "energy", "frechet"]
    assert out["energy"] == energy_distance(a, b) and out["mmd"] == mmd_rbf(a, b)
    assert set(compare_sets(a, b)) == {"energy", "sw2", "mmd"}
    with raises_naming(ValueError, "['fid']", "energy"):
        compare_sets(a, b, metrics=("fid",))


@pytest.mark.parametrize("name", list(SET_METRICS))
def test_bad_inputs_raise(name):
    fn = SET_METRICS[name]
    a = gauss(20, 4, 0)
    with raises_naming(ValueError, "(20, 4)", "(20, 5)"):
        fn(a, gauss(20, 5, 1))
    with raises_naming(ValueError, "b:", "(0, 4)"):
        fn(a, torch.empty(0, 4))
    bad = a.clone()
    bad[3, 1], bad[7, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 non-finite"):
        fn(bad, a)
    with raises_naming(ValueError, "a:", "list"):
        fn(a.tolist(), a)


def test_bad_arguments_raise():
    a = gauss(20, 4, 0)
    with raises_naming(ValueError, "a:", "got 1"):
        energy_distance(a[:1], a)
    with raises_naming(ValueError, "num_projections", "got 0"):
        sliced_wasserstein2(a, a, num_projections=0)
    with raises_naming(ValueError, "bandwidths", "(1.0, -1.0)"):
        mmd_rbf(a, a, bandwidths=(1.0, -1.0))
    with raises_naming(ValueError, "method", "'svd'"):
        frechet_distance(a, a, method="svd")
    with raises_naming(ValueError, "mu 3 / 2", "(3, 3) / (2, 2)"):
        frechet_distance_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


# ---------------------------------------------------------------------------------------------
# Digits classifier
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A cache dir holding a freshly trained classifier, and the extractor from that first call."""
    root = tmp_path_factory.mktemp("soflow_cache")
    return root, digits_feature_extractor(root)


def test_classifier_trains_once_and_is_reused(digits_cache):
    root, first = digits_cache
    assert first.trained and first.path.parent == root and first.path.is_file()
    assert first.heldout_accuracy >= 0.95
    stamp = os.stat(first.path).st_mtime_ns
    second = digits_feature_extractor(root)
    assert not second.trained and os.stat(second.path).st_mtime_ns == stamp
    assert second.heldout_accuracy == first.heldout_accuracy
    for (k, v1), v2 in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_classifier_training_is_deterministic(digits_cache):
    _, first = digits_cache
    model, acc = M.train_digits_classifier(seed=0)
    assert acc == first.heldout_accuracy
    for (k, v1), v2 in zip(first.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    calls = []

    def fake_train(seed: int = 0):
        calls.append(seed)
        return M.DigitsClassifier(seed).eval(), 0.5

    monkeypatch.setattr(M, "train_digits_classifier", fake_train)
    path = tmp_path / f"digits_classifier_v{M._DIGITS_VERSION}_seed0.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unusable"):
        ext = digits_feature_extractor(tmp_path)
    assert ext.trained and calls == [0]
    assert not digits_feature_extractor(tmp_path).trained and calls == [0]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFLOW_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SOFLOW_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "soflow_fast"


def test_digits_features_and_distances(digits_cache):
    root, ext = digits_cache
    ds = load_digits()
    x, y = ds.images, ds.labels
    assert ext(x[:10]).shape == (10, M.DigitsClassifier.feature_dim)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    half_a, half_b = x[perm[:898]], x[perm[898:]]
    noise = torch.rand(899, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_real = frechet_digits_distance(half_a, half_b, cache_dir=root)
    real_noise = frechet_digits_distance(half_a, noise, cache_dir=root)
    assert 0 < 20 * real_real < real_noise, (real_real, real_noise)
    assert digits_label_accuracy(x, y, cache_dir=root) >= 0.95
    assert digits_label_accuracy(x, y[perm], cache_dir=root) < 0.3
    assert digits_label_accuracy(x.numpy(), y.numpy(), cache_dir=root) == digits_label_accuracy(x, y, cache_dir=root)


def test_digits_bad_inputs(digits_cache):
    root, ext = digits_cache
    x = load_digits().images[:8]
    with raises_naming(ValueError, "images:", "(4, 1, 7, 7)"):
        ext(torch.zeros(4, 1, 7, 7))
    with raises_naming(ValueError, "labels:", "5 labels", "8 images"):
        digits_label_accuracy(x, torch.zeros(5, dtype=torch.long), cache_dir=root)
    with raises_naming(ValueError, "labels:", "0..9", "[10, 10]"):
        digits_label_accuracy(x, torch.full((8,), 10), cache_dir=root)
    with pytest.warns(UserWarning, match="load_digits"):
        ext((x + 1) * 8)  # the raw 0..16 scale
