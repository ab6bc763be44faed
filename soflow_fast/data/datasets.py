"""Image datasets: the bundled digits, ``.npz`` arrays, CIFAR-10 batches and image folders.

Every dataset here is map-style and returns ``(x, y)``: ``x`` a float32 tensor (C, H, W), pixel
data in [-1, 1], and ``y`` a 0-d int64 tensor. Label convention: an unlabeled dataset has
``num_classes == 0`` and every ``y`` is -1; the loader then hands the training step ``y = None``
(the objective's "all null label"). Each dataset also exposes ``shape`` (C, H, W) and, for the
in-memory ones, ``get_batch(indices, seeds)`` so that the loader can index tensors directly.

Nothing is ever downloaded: a missing path raises FileNotFoundError naming it, and a file that
cannot be read or has the wrong layout raises ValueError naming the file and the problem.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from soflow_fast.config_fields import one_of, option
from soflow_fast.data.registry import DataConfig, register_dataset
from soflow_fast.safe_pickle import restricted_load

__all__ = [
    "ArrayDataset",
    "ImageDataset",
    "load_cifar10",
    "load_digits",
    "load_npz",
    "require_path",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def require_path(path: str | os.PathLike, what: str, *, directory: bool | None = None) -> Path:
    """Return ``path`` as a Path, or raise a one-line FileNotFoundError saying what was expected there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} not found: {p} (datasets are never downloaded; point data_path at a local copy)"
        )
    if directory is True and not p.is_dir():
        raise FileNotFoundError(f"{what} must be a directory, but {p} is a file")
    if directory is False and p.is_dir():
        raise FileNotFoundError(f"{what} must be a file, but {p} is a directory")
    return p


def _check_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{source}: labels must have shape ({n},) to match the images, got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0 (unlabeled data simply has no label array)")
    return labels.astype(np.int64)


class ImageDataset(Dataset):
    """Common surface of every dataset here: ``num_classes``, ``shape`` and ``drop_labels``."""

    num_classes: int = 0
    shape: tuple[int, int, int] = (0, 0, 0)
    # The class names by label where the source names them (folder names, CIFAR's), else None.
    classes: list[str] | None = None
    # Whether get_batch reads its per-sample `seeds`; the loader skips hashing them otherwise.
    uses_seeds: bool = False

    def drop_labels(self) -> None:
        """Turn the dataset unconditional: ``num_classes`` becomes 0 and every label -1."""
        self.num_classes = 0
        self.classes = None


# ---------------------------------------------------------------------------------------------
# In-memory arrays
# ---------------------------------------------------------------------------------------------


class ArrayDataset(ImageDataset):
    """Images held in memory as one tensor; batches are a single ``index_select``.

    uint8 images are kept as uint8 (a quarter of the memory) and mapped to [-1, 1] when a batch is
    taken, 0 -> -1 and 255 -> 1 exactly; floating images are stored as float32 and returned as is.

    Args:
        images: (N, C, H, W) uint8 or floating tensor.
        labels: (N,) non-negative integer tensor, or None for unlabeled data.
        num_classes: defaults to ``max(labels) + 1``; pass it when a split lacks the top classes.
        name: used in error messages.
    """

    def __init__(
        self, images: Tensor, labels: Tensor | None = None, *, num_classes: int | None = None, name: str = "arrays"
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"{name}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"{name}: images must be uint8 or floating point, got {images.dtype}")
        self.name = name
        self.images = images if images.dtype == torch.uint8 else images.to(torch.float32)
        self.shape = tuple(images.shape[1:])
        self.labels: Tensor | None = None
        self.num_classes = 0
        if labels is not None:
            labels = torch.as_tensor(_check_labels(labels.cpu().numpy(), images.shape[0], name), device=images.device)
            top = int(labels.max()) + 1 if labels.numel() else 0
            if num_classes is not None and num_classes < top:
                raise ValueError(f"{name}: num_classes={num_classes} but labels go up to {top - 1}")
            self.labels = labels
            self.num_classes = top if num_classes is None else int(num_classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        extra = self.labels.numel() * 8 if self.labels is not None else 0
        return self.images.numel() * self.images.element_size() + extra

    def get_batch(self, indices: Tensor, seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gather a batch. ``seeds`` is unused: these datasets are deterministic."""
        del seeds
        indices = indices.to(self.images.device)
        x = self.images.index_select(0, indices)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(127.5).sub_(1.0)
        if self.labels is None or self.num_classes == 0:
            y = torch.full((indices.shape[0],), -1, dtype=torch.int64, device=x.device)
        else:
            y = self.labels.index_select(0, indices)
        return x, y

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([index], dtype=torch.int64))
        return x[0], y[0]

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy whose storage lives on ``device`` (so batches are gathered there)."""
        out = ArrayDataset.__new__(ArrayDataset)
        out.__dict__.update(self.__dict__)
        out.images = self.images.to(device)
        out.labels = self.labels.to(device) if self.labels is not None else None
        return out

    def drop_labels(self) -> None:
        self.labels = None
        super().drop_labels()


def load_digits() -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, shape (1, 8, 8).

    The data ship inside the scikit-learn wheel, so this works offline. Pixel values 0..16 map
    linearly to [-1, 1].
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).div_(8.0).sub_(1.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    ds = ArrayDataset(images, labels, num_classes=10, name="digits")
    ds.classes = [str(k) for k in range(10)]
    return ds


# ---------------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------------

_NPZ_IMAGE_KEYS = ("x", "images", "image", "data", "arr_0")
_NPZ_LABEL_KEYS = ("y", "labels", "label", "targets", "arr_1")


def _channels_first(arr: np.ndarray, layout: str, source: str) -> np.ndarray:
    """Bring a (N, H, W), (N, C, H, W) or (N, H, W, C) array to (N, C, H, W)."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{source}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {arr.shape}")
    if layout == "auto":
        _, a, b, c = arr.shape
        # Channel counts are small and images are usually square; anything else is ambiguous,
        # and guessing wrong would silently scramble every image.
        if a <= 4 < c or (b == c and a != b):
            layout = "NCHW"
        elif c <= 4 < a or (a == b and c != a):
            layout = "NHWC"
        else:
            raise ValueError(
                f"{source}: cannot tell the channel axis of shape {arr.shape}; pass layout='NCHW' or 'NHWC' "
                "(--layout=... in a training run)"
            )
    if layout == "NHWC":
        return arr.transpose(0, 3, 1, 2)
    if layout == "NCHW":
        return arr
    raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")


def _pick_key(keys: list[str], wanted: str | None, candidates: tuple[str, ...], source: str, what: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise ValueError(f"{source}: no {what} key {wanted!r}; the file holds {keys}")
        return wanted
    return next((k for k in candidates if k in keys), None)


def load_npz(
    path: str | os.PathLike,
    *,
    x_key: str | None = None,
    y_key: str | None = None,
    layout: str = "auto",
    num_classes: int | None = None,
) -> ArrayDataset:
    """Images (and optionally labels) from a NumPy ``.npz`` archive.

    Args:
        path: the ``.npz`` file.
        x_key: image array key; default the first present of x, images, image, data, arr_0.
        y_key: label array key; default the first present of y, labels, label, targets, arr_1.
            No label array means an unlabeled dataset.
        layout: "auto", "NCHW" or "NHWC" for 4-D image arrays (3-D ones are single-channel).
        num_classes: override ``max(label) + 1``.
    Returns:
        An ArrayDataset; uint8 images map to [-1, 1], floating ones are taken as is.
    """
    p = require_path(path, "npz file", directory=False)
    try:
        archive = np.load(p, allow_pickle=False)
    except Exception as err:  # BadZipFile, OSError, ValueError from a truncated or foreign file
        raise ValueError(f"{p}: not a readable .npz archive ({type(err).__name__}: {err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{p}: holds a single .npy array, not an .npz archive of named arrays")
    with archive:
        keys = list(archive.keys())
        xk = _pick_key(keys, x_key, _NPZ_IMAGE_KEYS, str(p), "image")
        if xk is None:
            raise ValueError(f"{p}: no image array; expected one of {_NPZ_IMAGE_KEYS} (or pass x_key), found {keys}")
        yk = _pick_key(keys, y_key, _NPZ_LABEL_KEYS, str(p), "label")
        try:
            images = archive[xk]
            labels = archive[yk] if yk is not None and yk != xk else None
        except Exception as err:  # a damaged member inside an intact zip directory
            raise ValueError(f"{p}: cannot read array {xk!r}/{yk!r} ({type(err).__name__}: {err})") from err

    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise ValueError(f"{p}: images must be uint8 (0..255) or floating point, got dtype {images.dtype}")
    if images.dtype.kind == "f" and images.size:
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"{p}: floating-point images hold NaN or infinite values")
        if low >= 0 and high > 0:
            # uint8 pixels are mapped to [-1, 1]; floats are trained on as stored, so pixels saved as
            # 0..1 or 0..255 floats would train silently on a shifted, mis-scaled range
            warnings.warn(
                f"{p}: floating-point images span [{low:g}, {high:g}] and are used as stored; the engine expects "
                "[-1, 1] pixels (or scaled latents): store uint8 pixels, which are mapped to [-1, 1], or rescale",
                stacklevel=2,
            )
    images = np.ascontiguousarray(_channels_first(images, layout, str(p)))
    if labels is not None:
        labels = _check_labels(labels, images.shape[0], str(p))
    return ArrayDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels) if labels is not None else None,
        num_classes=num_classes,
        name=str(p),
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (the python pickle batches)
# ---------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_globals() -> dict[tuple[str, str], object]:
    """What a CIFAR batch's pickle may name (it holds dicts, lists, bytes and numpy arrays), under the
    names NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``) write.

    A pickle can run arbitrary code on load; refusing every other global means a tampered
    batch file fails loudly instead of executing.
    """
    import _codecs

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = multiarray._reconstruct
        table[(module, "scalar")] = multiarray.scalar
    return table


def _get(batch: dict, key: str):
    return batch.get(key.encode(), batch.get(key))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = restricted_load(f, _cifar_globals(), encoding="bytes")
    except Exception as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels' entries, found {list(batch)}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    labels = _check_labels(np.asarray(labels), data.shape[0], str(path))
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{path}: CIFAR-10 labels must lie in 0..9, found {labels.max()}")
    # Rows are the R, G and B planes one after another, each 32x32 row-major: exactly CHW.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | os.PathLike, *, train: bool = True) -> ArrayDataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (or the folder that contains it).

    Args:
        path: the extracted ``cifar-10-batches-py`` directory or its parent.
        train: the five ``data_batch_*`` files (50,000 images) if True, else ``test_batch``.
    Returns:
        An ArrayDataset of (3, 32, 32) uint8 images mapped to [-1, 1] on access, 10 classes.
    """
    root = require_path(path, "CIFAR-10 folder", directory=True)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {missing} not found in {root} (expected the python-pickle release)")
    parts = [_read_cifar_batch(root / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    ds = ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), num_classes=10, name=str(root))
    ds.classes = list(CIFAR10_CLASSES)
    return ds


# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------


@register_dataset
@dataclass(kw_only=True)
class DigitsData(DataConfig):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): nothing to download."""

    LABEL: ClassVar[str] = "digits"
    NEEDS_PATH: ClassVar[bool] = False

    @classmethod
    def open(cls, path, *, image_size, conditional, **options) -> ArrayDataset:
        if path is not None:
            raise ValueError(f"the digits dataset ships with scikit-learn and takes no path (got {path!r})")
        return load_digits(**options)


@register_dataset
@dataclass(kw_only=True)
class NpzData(DataConfig):
    """Images (and labels) in a NumPy ``.npz`` file."""

    LABEL: ClassVar[str] = "npz"

    layout: str | None = option(None, check=one_of("auto", "NCHW", "NHWC"))  # where the channel axis of 4-D
    # images is; None = auto
    x_key: str | None = option(None)  # the image array (default: the first of x, images, image, data, arr_0)
    y_key: str | None = option(None)  # the label array (default: the first of y, labels, label, targets, arr_1)

    @classmethod
    def open(cls, path, *, image_size, conditional, **options) -> ArrayDataset:
        return load_npz(path, **options)


@register_dataset
@dataclass(kw_only=True)
class Cifar10Data(DataConfig):
    """A local ``cifar-10-batches-py`` folder (the python-pickle release), its 50,000 training images."""

    LABEL: ClassVar[str] = "cifar10"

    @classmethod
    def open(cls, path, *, image_size, conditional, **options) -> ArrayDataset:
        return load_cifar10(path, **options)
