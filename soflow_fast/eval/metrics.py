"""Sample-quality metrics with a known answer: distances between sample sets, and a digits classifier.

FID needs an Inception network and ImageNet-scale data; these need neither, so they work on toy
data, on the bundled 8x8 digits and in unit tests where the right value is known in closed form:

- ``energy_distance``: 2E|X-Y| - E|X-X'| - E|Y-Y'|, zero iff the distributions agree.
- ``sliced_wasserstein2``: W2 averaged over random 1-D projections.
- ``mmd_rbf``: squared maximum mean discrepancy under a sum of Gaussian kernels.
- ``frechet_distance``: the FID formula on any features (or raw low-dimensional samples).
- ``DigitsClassifier`` / ``digits_feature_extractor``: a small CNN the project trains itself on
  ``load_digits()`` (nothing is downloaded), giving a Frechet digits distance and, for
  class-conditional models, the fraction of samples classified as their conditioning label.

Every function takes torch tensors or NumPy arrays of shape (n, *dims) (trailing dims are
flattened), computes in float64 on the device of the first argument, and raises ValueError on
empty sets, mismatched trailing dims or non-finite values.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soflow_fast.files import atomic_write

__all__ = [
    "METRICS",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "compare_sets",
    "default_cache_dir",
    "digits_feature_extractor",
    "digits_label_accuracy",
    "energy_distance",
    "frechet_digits_distance",
    "frechet_distance",
    "frechet_distance_from_stats",
    "mmd_rbf",
    "sliced_wasserstein2",
    "train_digits_classifier",
]

ArrayLike = Tensor | np.ndarray

# Pairwise blocks hold at most this many float64 entries (32 MiB), so 10k x 10k never materialises.
_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name}: expected shape (n, *dims), got a scalar")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the sample set is empty (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name}: samples have no elements (shape {tuple(x.shape)})")
    x = x.detach()
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name}: {bad} non-finite values (NaN or inf) out of {x.numel()}")
    return x


def _pair(a: ArrayLike, b: ArrayLike, min_n: int = 1) -> tuple[Tensor, Tensor]:
    """Both sets as float64 (n, d) / (m, d) matrices on the device of ``a``."""
    ta, tb = _as_tensor(a, "a"), _as_tensor(b, "b")
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(f"trailing dims differ: a is {tuple(ta.shape)}, b is {tuple(tb.shape)} (compare (n, *dims))")
    for name, t in (("a", ta), ("b", tb)):
        if t.shape[0] < min_n:
            raise ValueError(f"{name}: needs at least {min_n} samples, got {t.shape[0]}")
    device = ta.device
    return ta.reshape(ta.shape[0], -1).to(device, torch.float64), tb.reshape(tb.shape[0], -1).to(device, torch.float64)


def _pair_mean(x: Tensor, y: Tensor, kernel: Callable[[Tensor], Tensor], same: bool) -> Tensor:
    """Mean of ``kernel(|x_i - y_j|^2)`` over all pairs, or over i != j when ``same`` (x is y).

    Rows of x are taken in chunks so that no block exceeds ``_BLOCK_ELEMENTS`` entries.
    """
    n, m = x.shape[0], y.shape[0]
    yy = y.square().sum(1)
    rows = max(1, _BLOCK_ELEMENTS // m)
    total = x.new_zeros(())
    for s in range(0, n, rows):
        xb = x[s : s + rows]
        # |x|^2 + |y|^2 - 2 x.y: one matmul per block; float64 keeps the cancellation error ~1e-16 |x|^2.
        sq = (xb.square().sum(1, keepdim=True) + yy - 2.0 * (xb @ y.T)).clamp_min_(0.0)
        vals = kernel(sq)
        if same:
            i = torch.arange(xb.shape[0], device=x.device)
            vals[i, i + s] = 0.0
        total += vals.sum()
    return total / (n * (n - 1) if same else n * m)


# ---------------------------------------------------------------------------------------------
# Distances between sample sets
# ---------------------------------------------------------------------------------------------


def energy_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Squared-form energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean norms, float64).

    The within-set means exclude the diagonal (U-statistics) and the cross term averages all n*m
    pairs, so the estimate is unbiased for independent sets. For ``a`` passed as ``b`` it is
    therefore slightly negative: exactly -(2/n) * mean_{i != j} |a_i - a_j|.
    """
    x, y = _pair(a, b, min_n=2)
    dist = torch.sqrt
    return float(2.0 * _pair_mean(x, y, dist, False) - _pair_mean(x, x, dist, True) - _pair_mean(y, y, dist, True))


def sliced_wasserstein2(
    a: ArrayLike, b: ArrayLike, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean, over random unit directions, of 1-D W2^2.

    Each 1-D W2^2 is exact for the two empirical distributions: with n != m the quantile functions
    are compared on the merged grid {i/n} U {j/m}, interval by interval. For N(0, I) vs N(mu, I)
    in d dimensions the population value is |mu| / sqrt(d) (E[(theta . mu)^2] = |mu|^2 / d).

    Args:
        num_projections: directions, drawn uniformly on the sphere.
        generator: draws the directions; default a CPU generator seeded with 0, so repeated calls
            give the same value.
    """
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    x, y = _pair(a, b)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64, device=generator.device)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    px, _ = (x @ theta).sort(0)  # (n, P)
    py, _ = (y @ theta).sort(0)  # (m, P)
    n, m = px.shape[0], py.shape[0]
    if n == m:
        w2 = (px - py).square().mean(0)
    else:
        # Equal rationals i/n == j/m round to the same double, so unique() merges shared breakpoints.
        grid = [torch.arange(1, k + 1, dtype=torch.float64) / k for k in (n, m)]
        edges = torch.unique(torch.cat(grid))  # sorted, ends at 1.0
        width = torch.diff(edges, prepend=edges.new_zeros(1))
        mid = edges - 0.5 * width
        ix = (mid * n).long().clamp_(max=n - 1).to(x.device)
        iy = (mid * m).long().clamp_(max=m - 1).to(x.device)
        w2 = ((px[ix] - py[iy]).square() * width.to(x.device)[:, None]).sum(0)
    return float(w2.mean().sqrt())


def _median_distance(x: Tensor, y: Tensor, max_points: int = 2048) -> float:
    """Median pairwise distance of the pooled set (a fixed-seed subsample of at most ``max_points``)."""
    pooled = torch.cat([x, y])
    if pooled.shape[0] > max_points:
        keep = torch.randperm(pooled.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        pooled = pooled[keep.to(pooled.device)]
    d = torch.cdist(pooled, pooled)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1, device=d.device)
    return float(d[iu[0], iu[1]].median())


def mmd_rbf(a: ArrayLike, b: ArrayLike, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased squared MMD with the kernel sum_s exp(-|x - y|^2 / (2 s^2)).

    Args:
        bandwidths: the length scales s. Default: the median pairwise Euclidean distance of the
            pooled samples (over a fixed-seed subsample of at most 2,048 points) times
            (0.5, 1, 2); 1.0 if every point coincides.
    Returns:
        MMD^2 (the within-set means exclude the diagonal, so it can dip slightly below zero; for
        ``a`` passed as ``b`` it lies in (-2K/n, 0) with K the number of bandwidths).
    """
    x, y = _pair(a, b, min_n=2)
    if bandwidths is None:
        med = _median_distance(x, y)
        bandwidths = [med * f for f in (0.5, 1.0, 2.0)] if med > 0 else [1.0]
    scales = [float(s) for s in bandwidths]
    if not scales or not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(f"bandwidths must be a non-empty list of finite positive numbers, got {bandwidths}")

    def kernel(sq: Tensor) -> Tensor:
        return sum(torch.exp(sq * (-0.5 / s**2)) for s in scales)

    within = _pair_mean(x, x, kernel, True) + _pair_mean(y, y, kernel, True)
    return float(within - 2.0 * _pair_mean(x, y, kernel, False))


def _sqrt_psd(s: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix; negative round-off eigenvalues are clipped to 0."""
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def _trace_sqrt_product(s1: Tensor, s2: Tensor, method: str) -> Tensor:
    """tr((s1 s2)^{1/2}) for PSD s1, s2."""
    if method == "scipy":
        import scipy.linalg

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            covmean = scipy.linalg.sqrtm(s1.cpu().numpy() @ s2.cpu().numpy())
        singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
        if np.iscomplexobj(covmean):
            # Round-off imaginary parts are dropped; a real one means sqrtm went astray.
            singular |= np.abs(covmean.imag).max() > 1e-6 * max(1.0, float(np.abs(covmean.real).max()))
            covmean = covmean.real
        if singular or not np.isfinite(covmean).all():
            # A singular product (dead feature units, fewer samples than dims) makes the Schur
            # square root inaccurate; the symmetric route below is exact there.
            return _trace_sqrt_product(s1, s2, "eigh")
        return torch.tensor(np.trace(covmean), dtype=torch.float64)
    # (s1 s2) is similar to r s2 r with r = s1^{1/2}, which is symmetric PSD: its eigenvalues are
    # real and >= 0 up to round-off, so this route cannot produce a complex or NaN answer.
    r = _sqrt_psd(s1)
    inner = r @ s2 @ r
    return torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp_min(0.0).sqrt().sum()


def _resolve_method(method: str) -> str:
    if method not in ("auto", "scipy", "eigh"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'eigh', got {method!r}")
    if method != "auto":
        return method
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return "eigh"
    return "scipy"


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, method: str = "auto"
) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2).

    Args:
        method: "scipy" (scipy.linalg.sqrtm of S1 S2, as pytorch-fid does; when scipy reports a
            singular matrix or returns a non-finite or truly complex root, "eigh" is used),
            "eigh" (eigenvalues of S1^{1/2} S2 S1^{1/2}: symmetric, so exact and stable for
            near-singular covariances), or "auto": scipy when importable, else eigh.
    """
    m1, m2 = (torch.as_tensor(v).detach().double().cpu().reshape(-1) for v in (mu1, mu2))
    s1, s2 = (torch.as_tensor(v).detach().double().cpu() for v in (sigma1, sigma2))
    d = m1.numel()
    if m2.numel() != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"stats do not match: mu {d} / {m2.numel()}, sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    for name, v in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise ValueError(f"{name}: {bad} non-finite values (NaN or inf) out of {v.numel()}")
    tr_covmean = _trace_sqrt_product(s1, s2, _resolve_method(method))
    return float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2.0 * tr_covmean)


def _gaussian_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike, method: str = "auto") -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets.

    ``method`` as in :func:`frechet_distance_from_stats`. Needs at least 2 samples per set.
    """
    x, y = _pair(feats_a, feats_b, min_n=2)
    return frechet_distance_from_stats(*_gaussian_stats(x), *_gaussian_stats(y), method=method)


# ---------------------------------------------------------------------------------------------
# Digits classifier: features for a Frechet digits distance, labels for conditional accuracy
# ---------------------------------------------------------------------------------------------

_DIGITS_VERSION = 1  # bump when the architecture or the training recipe changes: old caches retrain


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # Tiny batches on a shared CPU: OpenMP workers spinning against other processes turn a 0.3 s
    # training run into a minute. One thread is both fastest and bitwise reproducible.
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class DigitsClassifier(nn.Module):
    """A small CNN for the (1, 8, 8) digits scaled to [-1, 1]: two 3x3 convs, a max-pool, 64 features."""

    feature_dim = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc = nn.Linear(32 * 4 * 4, self.feature_dim)
            self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))  # (N, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 4, 4)
        return F.relu(self.fc(h.flatten(1)))  # (N, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, 10)


def train_digits_classifier(
    seed: int = 0, epochs: int = 10, holdout: float = 0.2, batch_size: int = 64, lr: float = 2e-3
) -> tuple[DigitsClassifier, float]:
    """Train a :class:`DigitsClassifier` on ``load_digits()``; about 3 s on one CPU thread.

    Returns:
        The model (eval mode, CPU) and its accuracy on a seeded held-out split of ``holdout``.
    """
    from soflow_fast.data.datasets import load_digits

    ds = load_digits()
    x, y = ds.images, ds.labels
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_test = int(round(holdout * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    model = DigitsClassifier(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with _torch_threads(1):
        model.train()
        for _ in range(epochs):
            order = train[torch.randperm(train.numel(), generator=gen)]
            for s in range(0, order.numel() - batch_size + 1, batch_size):
                idx = order[s : s + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x[test]).argmax(1) == y[test]).double().mean().item() if n_test else float("nan")
    return model, acc


def default_cache_dir() -> Path:
    """``$SOFLOW_CACHE_DIR`` if set, else ``~/.cache/soflow_fast``."""
    env = os.environ.get("SOFLOW_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "soflow_fast"


def _as_digit_images(images: ArrayLike, name: str) -> Tensor:
    x = _as_tensor(images, name)
    if x[0].numel() != 64:
        raise ValueError(f"{name}: digits are (n, 1, 8, 8) (64 values each), got shape {tuple(x.shape)}")
    x = x.reshape(-1, 1, 8, 8).to("cpu", torch.float32)
    if float(x.abs().max()) > 1.5:
        # one text per name, so that Python shows it once and not once per batch of an evaluation loop
        warnings.warn(
            f"{name}: values beyond +-1.5; the classifier expects load_digits() scaling (0..16 -> [-1, 1])",
            stacklevel=3,
        )
    return x


class DigitsFeatureExtractor:
    """Callable: digit images (n, 1, 8, 8) in [-1, 1] -> penultimate features (n, 64), float32 CPU.

    Attributes:
        model: the trained :class:`DigitsClassifier` (CPU, eval mode).
        heldout_accuracy: its accuracy on the held-out fifth of ``load_digits()``.
        path: the cache file the weights live in.
        trained: True if this call trained the model, False if it came from the cache.
    """

    def __init__(self, model: DigitsClassifier, heldout_accuracy: float, path: Path, trained: bool) -> None:
        self.model, self.heldout_accuracy, self.path, self.trained = model, heldout_accuracy, path, trained

    @torch.no_grad()
    def _run(self, images: ArrayLike, fn: Callable[[Tensor], Tensor], name: str) -> Tensor:
        x = _as_digit_images(images, name)
        return torch.cat([fn(x[s : s + 4096]) for s in range(0, x.shape[0], 4096)])

    def __call__(self, images: ArrayLike) -> Tensor:
        return self._run(images, self.model.features, "images")

    def predict(self, images: ArrayLike) -> Tensor:
        """Predicted class (n,) int64."""
        return self._run(images, lambda x: self.model(x).argmax(1), "images")


def digits_feature_extractor(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> DigitsFeatureExtractor:
    """The digits classifier's feature map, trained once and cached as a file.

    The weights are made by this project (``train_digits_classifier``), never downloaded. The first
    call trains (a few seconds) and writes ``digits_classifier_v{version}_seed{seed}.pt`` into
    ``cache_dir`` (default :func:`default_cache_dir`); later calls load it. An unreadable or stale
    cache file is retrained and replaced.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"digits_classifier_v{_DIGITS_VERSION}_seed{seed}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("version") != _DIGITS_VERSION or blob.get("seed") != seed:
                raise ValueError(f"version/seed {blob.get('version')}/{blob.get('seed')}")
            model = DigitsClassifier(seed)
            model.load_state_dict(blob["state_dict"])
            return DigitsFeatureExtractor(model.eval(), float(blob["heldout_accuracy"]), path, trained=False)
        except Exception as err:  # truncated file, foreign pickle, old layout: retrain below
            warnings.warn(f"{path}: unusable digits classifier cache ({err}); retraining", stacklevel=2)
    model, acc = train_digits_classifier(seed)
    root.mkdir(parents=True, exist_ok=True)
    blob = {"version": _DIGITS_VERSION, "seed": seed, "heldout_accuracy": acc, "state_dict": model.state_dict()}
    with atomic_write(path) as tmp:  # a concurrent reader sees the old file or the whole new one
        torch.save(blob, tmp)
    return DigitsFeatureExtractor(model, acc, path, trained=True)


def frechet_digits_distance(
    images_a: ArrayLike, images_b: ArrayLike, cache_dir: str | os.PathLike | None = None
) -> float:
    """Frechet distance between the digits classifier's 64-d features of two image sets."""
    extract = digits_feature_extractor(cache_dir)
    return frechet_distance(extract(images_a), extract(images_b))


def digits_label_accuracy(images: ArrayLike, labels: ArrayLike, cache_dir: str | os.PathLike | None = None) -> float:
    """Fraction of (generated) digit images that the classifier assigns to their conditioning label."""
    lab = _as_tensor(labels, "labels").reshape(-1)
    if lab.is_floating_point() or lab.dtype == torch.bool:
        raise ValueError(f"labels: expected integers, got {lab.dtype}")
    n = _as_tensor(images, "images").shape[0]
    if lab.numel() != n:
        raise ValueError(f"labels: {lab.numel()} labels for {n} images")
    if int(lab.min()) < 0 or int(lab.max()) > 9:
        raise ValueError(f"labels: digits are 0..9, got values in [{int(lab.min())}, {int(lab.max())}]")
    pred = digits_feature_extractor(cache_dir).predict(images)
    return float((pred == lab.cpu().long()).double().mean())


# ---------------------------------------------------------------------------------------------
# One call for several metrics
# ---------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., float]] = {
    "energy": energy_distance,
    "sw2": sliced_wasserstein2,
    "mmd": mmd_rbf,
    "frechet": frechet_distance,  # on the raw (flattened) samples: for low-dimensional data
    "frechet_digits": frechet_digits_distance,  # digits only; caches the classifier
}


def compare_sets(
    samples: ArrayLike, reference: ArrayLike, metrics: Sequence[str] = ("energy", "sw2", "mmd")
) -> dict[str, float]:
    """Several metrics of ``samples`` against ``reference``: ``{name: value}`` in the order asked.

    Names: keys of :data:`METRICS` (energy, sw2, mmd, frechet, frechet_digits).
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    return {m: METRICS[m](samples, reference) for m in metrics}
