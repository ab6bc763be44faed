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

# the built-in readers: importing each file registers it
from soflow_fast.data.datasets import (  # noqa: I001
    ArrayDataset,
    ImageDataset,
    load_cifar10,
    load_digits,
    load_npz,
)
from soflow_fast.data.image_folder import ImageFolderDataset
from soflow_fast.data.latents import SD_VAE_SCALE, LatentH5Dataset
from soflow_fast.data.loader import GlobalStreamSampler, ShardedLoader, build_loader, mix_seeds
from soflow_fast.data.registry import DataConfig, build_dataset, dataset_names, register_dataset
from soflow_fast.data.toy import TOY_DATASETS, ActionChunkTask, sample_toy

__all__ = [
    "SD_VAE_SCALE",
    "TOY_DATASETS",
    "ActionChunkTask",
    "ArrayDataset",
    "DataConfig",
    "GlobalStreamSampler",
    "ImageDataset",
    "ImageFolderDataset",
    "LatentH5Dataset",
    "ShardedLoader",
    "build_dataset",
    "build_loader",
    "dataset_names",
    "load_cifar10",
    "load_digits",
    "load_npz",
    "mix_seeds",
    "register_dataset",
    "sample_toy",
]
