"""Datasets and the resumable, rank-sharded training loader.

Conventions shared by everything here:

- ``dataset[i]`` is ``(x, y)``: ``x`` float32 (C, H, W), images in [-1, 1] (latents at their
  scaled VAE range), ``y`` a 0-d int64 tensor. An unlabeled dataset has ``num_classes == 0`` and
  every ``y`` is -1; :meth:`ShardedLoader.next_batch` then returns ``y = None``, which the
  objective reads as "all null label".
- every dataset has ``num_classes`` and ``shape`` (C, H, W).
- nothing is downloaded; missing paths raise FileNotFoundError, unreadable or mis-shaped files
  raise ValueError, both naming the file.

Typical use::

    ds = build_dataset("cifar10", "/data/cifar-10-batches-py", conditional=False)
    loader = build_loader(ds, local_batch_size=128, seed=0, hflip=True, device="cuda")
    x, y = loader.next_batch()
    ...  # checkpoint loader.state_dict() with the model; loader.load_state_dict(...) on resume
"""

from __future__ import annotations

import os

from soflow_fast.data.datasets import (
    ArrayDataset,
    ImageDataset,
    load_cifar10,
    load_digits,
    load_npz,
)
from soflow_fast.data.image_folder import ImageFolderDataset
from soflow_fast.data.latents import SD_VAE_SCALE, LatentH5Dataset
from soflow_fast.data.loader import GlobalStreamSampler, ShardedLoader, build_loader, mix_seeds
from soflow_fast.data.toy import TOY_DATASETS, ActionChunkTask, sample_toy

__all__ = [
    "DATASET_NAMES",
    "SD_VAE_SCALE",
    "TOY_DATASETS",
    "ActionChunkTask",
    "ArrayDataset",
    "GlobalStreamSampler",
    "ImageDataset",
    "ImageFolderDataset",
    "LatentH5Dataset",
    "ShardedLoader",
    "build_dataset",
    "build_loader",
    "load_cifar10",
    "load_digits",
    "load_npz",
    "mix_seeds",
    "sample_toy",
]

DATASET_NAMES = ("digits", "npz", "image_folder", "cifar10", "latents_h5")


def build_dataset(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    conditional: bool = True,
    **kwargs,
) -> ImageDataset:
    """Build a dataset by name.

    Args:
        name: one of ``DATASET_NAMES``:
            "digits" (no path; scikit-learn's bundled 8x8 digits, 10 classes),
            "npz" (path to an .npz; kwargs x_key, y_key, layout, num_classes),
            "image_folder" (path to a class-per-subfolder tree; needs image_size; kwargs channels,
            skip_bad_files, in_memory=True to decode everything once),
            "cifar10" (path to cifar-10-batches-py; kwarg train=True),
            "latents_h5" (path to an HDF5 of VAE moments; kwargs moments_key, labels_key,
            second_half, scale_factor, sample, in_memory, num_classes).
        path: file or folder; required by all but "digits".
        image_size: output side for "image_folder"; for the others, a check that the stored
            data has this size (they are never resized); for "latents_h5" the latent side or
            8x it (the pixel size of SD-VAE latents) both pass.
        conditional: False drops the labels (num_classes 0, the loader yields y=None).
    Returns:
        A map-style dataset with ``num_classes`` and ``shape`` attributes.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; choose one of {DATASET_NAMES}")
    if name == "digits":
        if path is not None:
            raise ValueError(f"the digits dataset ships with scikit-learn and takes no path (got {path!r})")
        ds: ImageDataset = load_digits(**kwargs)
    else:
        if path is None:
            raise ValueError(f"dataset {name!r} needs a path")
        if name == "npz":
            ds = load_npz(path, **kwargs)
        elif name == "cifar10":
            ds = load_cifar10(path, **kwargs)
        elif name == "latents_h5":
            ds = LatentH5Dataset(path, **kwargs)
        else:
            in_memory = kwargs.pop("in_memory", False)
            ds = ImageFolderDataset(path, image_size=image_size, conditional=conditional, **kwargs)
            if in_memory:
                ds = ds.to_memory()
    if image_size is not None:
        sides = {ds.shape[1]} if ds.shape[1] == ds.shape[2] else set()
        if name == "latents_h5":
            # Configs name the pixel resolution the latents were made at; the SD-VAE downsamples 8x.
            sides |= {8 * s for s in sides}
        if image_size not in sides:
            raise ValueError(
                f"dataset {name!r} holds {ds.shape[1]}x{ds.shape[2]} data but image_size={image_size}; "
                "only image_folder resizes"
            )
    if not conditional:
        ds.drop_labels()
    return ds
