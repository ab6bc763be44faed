"""Pre-extracted VAE latents stored as posterior moments in HDF5 (the authors' ImageNet format).

File layout (key names configurable, defaults in brackets):

- ``[moments]`` float16/float32 array (N, 2C, H, W): channels ``[:C]`` are the posterior mean,
  channels ``[C:]`` its standard deviation (``second_half="std"``, the default) or its
  log-variance (``second_half="logvar"``, as the SD-VAE's own ``DiagonalGaussianDistribution``
  stores it; clamped to [-30, 20] like there). For SD-VAE latents of 256 px images: (N, 8, 32, 32).
- ``[labels]`` integer array (N,), optional; without it the dataset is unlabeled.

With default key lookup, the first present of ``moments, latents, features, x`` and of
``labels, y, targets`` is used.

A sample is drawn from the posterior at load time: ``x = (mean + std * eps) * scale_factor``,
``eps ~ N(0, I)``, ``scale_factor = 0.18215`` for the SD-VAE (by default the file's
``scaling_factor`` attribute, which prepare_latents copies from the VAE, else 0.18215). Where ``eps``
comes from:

- through the loader (``get_batch`` with ``seeds``): a generator seeded per sample from the data
  seed and the sample's position in the global stream, so the noise is reproducible, independent
  of the world size, and resumes exactly from a checkpointed loader position;
- through ``dataset[i]`` or ``get_batch(indices)`` without seeds: torch's global RNG (in a
  DataLoader worker that is the worker's own generator, seeded by the DataLoader).

``path`` may also be a folder holding ``imagenet_latent.hdf5``, the file that
``python -m soflow_fast.prepare_latents`` and the authors' ``latent_dataset.py`` write (their
``latents`` [mean | std], ``labels``, ``amount`` and ``latent_size``); a JSON ``classes`` attribute
of the file (prepare_latents writes the image folder's class names there) becomes ``classes``.

h5py is optional (``pip install h5py``) and imported only when this dataset is built.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from soflow_fast.config_fields import finite, one_of, option
from soflow_fast.data.datasets import ImageDataset, _check_labels, _pick_key, require_path
from soflow_fast.data.registry import DataConfig, register_dataset

__all__ = ["LATENT_FILE_NAME", "LatentH5Dataset", "SD_VAE_SCALE", "resolve_latent_file"]

SD_VAE_SCALE = 0.18215
LATENT_FILE_NAME = "imagenet_latent.hdf5"  # the file name in a prepare_latents / latent_dataset.py folder

_MOMENT_KEYS = ("moments", "latents", "features", "x")
_LABEL_KEYS = ("labels", "y", "targets")


def _class_names(raw, num_classes: int, source: str) -> list[str] | None:
    """The JSON list of class names in the file's ``classes`` attribute, or None (with a warning) when
    it is not a list of ``num_classes`` names (e.g. a subset read with a larger ``num_classes``)."""
    try:
        names = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != num_classes:
        warnings.warn(
            f"{source}: the 'classes' attribute is not a JSON list of {num_classes} class names; class names unknown",
            stacklevel=3,
        )
        return None
    return [str(n) for n in names]


def _require_h5py():
    try:
        import h5py
    except ImportError as err:
        raise ImportError("the latents_h5 dataset needs h5py, an optional dependency: pip install h5py") from err
    return h5py


def resolve_latent_file(path: str | os.PathLike) -> Path:
    """The HDF5 file ``path`` names: itself, or ``path/imagenet_latent.hdf5`` for a folder."""
    p = require_path(path, "latent HDF5 file or folder")
    if not p.is_dir():
        return p
    f = p / LATENT_FILE_NAME
    if f.is_file():
        return f
    parts = sorted(p.glob("imagenet_latent_part_*.hdf5"))
    hint = (
        f"; it holds {len(parts)} part file(s) of an unfinished extraction: rerun prepare_latents to finish it"
        if parts
        else "; make it with python -m soflow_fast.prepare_latents, or point data_path at the .hdf5 file"
    )
    raise FileNotFoundError(f"latent folder {p} has no {LATENT_FILE_NAME}{hint}")


class LatentH5Dataset(ImageDataset):
    """VAE posterior moments from an HDF5 file, sampled to latents on access.

    Args:
        path: the ``.h5`` / ``.hdf5`` file, or a folder holding ``imagenet_latent.hdf5``.
        moments_key: dataset of (N, 2C, H, W) moments; default: auto-detected (see module doc).
        labels_key: dataset of (N,) labels; default: auto-detected, none means unlabeled.
        second_half: "std" or "logvar", what channels [C:] of the moments hold.
        scale_factor: the VAE's latent scale (0.18215 for SD-VAE, 0.13025 for SDXL's); default: the
            file's ``scaling_factor`` attribute if it has one, else 0.18215.
        sample: False returns ``mean * scale_factor`` (no posterior noise), e.g. for evaluation.
        in_memory: read all moments into RAM once (in their stored dtype) instead of per batch.
        num_classes: override ``max(label) + 1`` (e.g. 1000 for an ImageNet subset).
    """

    uses_seeds = True

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        moments_key: str | None = None,
        labels_key: str | None = None,
        second_half: str = "std",
        scale_factor: float | None = None,
        sample: bool = True,
        in_memory: bool = False,
        num_classes: int | None = None,
    ) -> None:
        h5py = _require_h5py()
        if second_half not in ("std", "logvar"):
            raise ValueError(f"second_half must be 'std' or 'logvar', got {second_half!r}")
        self.path = resolve_latent_file(path)
        self.second_half = second_half
        self.sample = bool(sample)
        src = str(self.path)
        try:
            f = h5py.File(self.path, "r")
        except Exception as err:  # h5py raises OSError for a file that is not HDF5
            raise ValueError(f"{src}: not a readable HDF5 file ({type(err).__name__}: {err})") from err
        with f:
            keys = sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))
            mk = _pick_key(keys, moments_key, _MOMENT_KEYS, src, "moments")
            if mk is None:
                raise ValueError(
                    f"{src}: no moments dataset; expected one of {_MOMENT_KEYS} (or pass moments_key), found {keys}"
                )
            lk = _pick_key(keys, labels_key, _LABEL_KEYS, src, "labels")
            moments = f[mk]
            if moments.ndim != 4 or moments.shape[1] % 2:
                raise ValueError(f"{src}: {mk!r} must be (N, 2C, H, W) mean/{second_half} halves, got {moments.shape}")
            if moments.dtype.kind != "f":
                raise ValueError(f"{src}: {mk!r} must be floating point, got {moments.dtype}")
            self._n = int(moments.shape[0])
            self.moments_key = mk
            self.shape = (moments.shape[1] // 2, int(moments.shape[2]), int(moments.shape[3]))
            try:
                self._moments = torch.from_numpy(moments[...]) if in_memory else None
                labels = f[lk][...] if lk is not None else None
                names = f.attrs.get("classes")
                if scale_factor is None:
                    scale_factor = float(f.attrs.get("scaling_factor", SD_VAE_SCALE))
            except Exception as err:
                raise ValueError(f"{src}: cannot read {mk!r}/{lk!r} ({type(err).__name__}: {err})") from err
        self.scale_factor = float(scale_factor)
        self.labels: Tensor | None = None
        self.num_classes = 0
        if labels is not None:
            self.labels = torch.from_numpy(_check_labels(labels, self._n, src))
            top = int(self.labels.max()) + 1 if self._n else 0
            if num_classes is not None and num_classes < top:
                raise ValueError(f"{src}: num_classes={num_classes} but labels go up to {top - 1}")
            self.num_classes = top if num_classes is None else int(num_classes)
            if names is not None:
                self.classes = _class_names(names, self.num_classes, src)
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict:
        # HDF5 handles cannot cross a process boundary; each worker reopens the file.
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def _read(self, indices: np.ndarray) -> Tensor:
        if self._moments is not None:
            return self._moments[torch.from_numpy(indices)]
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork shares HDF5's internal state with the parent.
            self._file = _require_h5py().File(self.path, "r")
            self._pid = os.getpid()
        # h5py fancy indexing wants strictly increasing indices; a batch can repeat a sample
        # when it straddles an epoch boundary, hence unique + inverse.
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            rows = self._file[self.moments_key][unique]
        except Exception as err:
            raise ValueError(f"{self.path}: cannot read rows of {self.moments_key!r} ({err})") from err
        return torch.from_numpy(rows[inverse])

    def get_batch(self, indices: Tensor, seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Read moments and draw one latent per index.

        Args:
            indices: (b,) int64 dataset indices.
            seeds: (b,) int64 per-sample noise seeds (see module doc); None uses torch's global RNG.
        Returns:
            x (b, C, H, W) float32 latents and y (b,) int64 labels (-1 if unlabeled).
        """
        idx = indices.cpu().numpy().astype(np.int64)
        moments = self._read(idx).to(torch.float32)
        mean, second = moments.chunk(2, dim=1)
        if not self.sample:
            x = mean * self.scale_factor
        else:
            std = second if self.second_half == "std" else torch.exp(0.5 * second.clamp(-30.0, 20.0))
            if seeds is None:
                eps = torch.randn_like(mean)
            else:
                eps = torch.empty_like(mean)
                g = torch.Generator()
                for i, s in enumerate(seeds.tolist()):
                    g.manual_seed(s)
                    eps[i] = torch.randn(mean.shape[1:], generator=g)
            x = (mean + std * eps) * self.scale_factor
        if self.labels is None or self.num_classes == 0:
            y = torch.full((idx.shape[0],), -1, dtype=torch.int64)
        else:
            y = self.labels[torch.from_numpy(idx)]
        return x, y

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([index], dtype=torch.int64))
        return x[0], y[0]

    def drop_labels(self) -> None:
        self.labels = None
        super().drop_labels()


@register_dataset
@dataclass(kw_only=True)
class LatentsH5Data(DataConfig):
    """VAE posterior moments in an HDF5 file (the authors' ``imagenet_latent.hdf5``), sampled per access."""

    LABEL: ClassVar[str] = "latents_h5"
    READER_NAMES: ClassVar[dict[str, str]] = {"x_key": "moments_key", "y_key": "labels_key"}

    x_key: str | None = option(None)  # the moments dataset (default: the first of moments, latents, features, x)
    y_key: str | None = option(None)  # the label dataset (default: the first of labels, y, targets)
    in_memory: bool | None = option(None, resume_safe=True)  # read every moment into RAM once
    second_half: str | None = option(None, check=one_of("std", "logvar"))  # what moment channels [C:] hold
    # (default std)
    scale_factor: float | None = option(None, check=finite(above=0))  # the VAE's latent scale (default: the
    # file's scaling_factor, else 0.18215, SD-VAE)

    @classmethod
    def open(cls, path, *, image_size, conditional, **options) -> LatentH5Dataset:
        return LatentH5Dataset(path, **options)

    @classmethod
    def sides(cls, side: int) -> set[int]:
        return {side, 8 * side}  # configs name the pixel size the latents were made at; SD-VAE downsamples 8x
