"""The data set registry: each reader is one entry, a ``DataConfig`` subclass beside its reader code.

An entry declares its name (``LABEL``), its options (its own fields: ``data.layout`` for npz files,
``data.scale_factor`` for latents, ...), whether it reads a ``data_path``, and ``open``: the dataset
from a path. ``DataConfig.build_train_data`` makes the run's dataset and loader and checks them once
against the model, where data and config meet.

Adding a data set is one file with one decorated class::

    @register_dataset
    @dataclass(kw_only=True)
    class MyData(DataConfig):
        LABEL = "mine"
        split: str = option("train", check=one_of("train", "test"))  # which part to read

        @classmethod
        def open(cls, path, *, image_size, conditional, **options):
            return MyDataset(path, **options)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from soflow_fast.config_fields import Registry, VariantSection, at_least, config_error, one_of, option

_DATASETS = Registry("data set")
register_dataset = _DATASETS.register  # a decorator: adds a DataConfig subclass with its own LABEL


def dataset_names() -> tuple[str, ...]:
    return tuple(_DATASETS)


@dataclass(kw_only=True)
class DataConfig(VariantSection):
    """The training data: ``dataset`` picks the reader, which adds its own options."""

    SECTION: ClassVar[str] = "data"
    VARIANT_KEY: ClassVar[str] = "dataset"
    LABEL: ClassVar[str] = ""
    NEEDS_PATH: ClassVar[bool] = True  # whether the reader reads data_path
    READER_NAMES: ClassVar[dict[str, str]] = {}  # option -> the reader's keyword, where they differ

    dataset: str = option("digits")  # a registered reader; digits is bundled with scikit-learn
    data_path: str | None = option(None)  # file or folder for the readers that read one
    image_size: int | None = option(None, check=at_least(1))  # resize target for image folders; a check elsewhere
    num_workers: int = option(0, check=at_least(0), resume_safe=True)  # loader workers for readers that decode
    random_flip: bool = option(False)  # horizontal flips (keyed by stream position, so resumable)
    augment: str | None = option(None, check=one_of("edm"))  # "edm": EDM's geometric augmentation (x-flip 1/2;
    # scaling, anisotropic scaling and translation each with p = 0.12), drawn per step for the global batch;
    # its 6 labels reach the network
    prefetch_factor: int | None = option(None, check=at_least(1), resume_safe=True)  # batches each loader
    # worker prepares ahead (with num_workers > 0)

    # -- the registry ----------------------------------------------------------------------------

    @classmethod
    def variants(cls) -> dict[str, type[DataConfig]]:
        return dict(_DATASETS)

    @classmethod
    def variant_of(cls, value: Any) -> tuple[type[DataConfig], str]:
        if value not in _DATASETS:
            raise config_error("data.dataset", f"must be one of {', '.join(_DATASETS)}", value)
        return _DATASETS[value], value

    @classmethod
    def describe_owners(cls, owners: list[str]) -> str:
        return f"dataset {' and '.join(owners)} only"

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike | None, *, image_size: int | None, conditional: bool, **options):
        """The dataset at ``path`` (an ``ImageDataset``), with the reader's ``options``."""
        raise NotImplementedError(f"dataset {cls.LABEL} has no open()")

    @classmethod
    def sides(cls, side: int) -> set[int]:
        """The ``image_size`` values that name data of this square side (latents: also 8x it)."""
        return {side}

    def reader_kwargs(self) -> dict[str, Any]:
        """The reader's options that are set, as keyword arguments of ``open`` (None: its default)."""
        return {
            self.READER_NAMES.get(n, n): getattr(self, n) for n in self.own_fields() if getattr(self, n) is not None
        }

    def check(self) -> None:
        if self.NEEDS_PATH and not self.data_path:
            raise ValueError(f"data.data_path is required for dataset {self.dataset!r}")
        if self.augment and self.random_flip:
            raise ValueError("data.augment=edm flips images itself (and labels the flip): set data.random_flip=false")

    def build_train_data(self, model_cfg, dist_info, batch_size: int, seed: int, say=print) -> TrainData:
        """The run's dataset (checked against the model) and this rank's loader; the readers' warnings go
        to ``say``."""
        from soflow_fast.data.loader import build_loader

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = build_dataset(
                self.dataset,
                self.data_path,
                image_size=self.image_size,
                conditional=model_cfg.condition() is not None,
                **self.reader_kwargs(),
            )
        for w in caught:  # the readers' doubts about the data belong in the run's log, not only on stderr
            say(f"warning: {w.message}")
        self.check_against(dataset, model_cfg)
        workers = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor and self.num_workers else {}
        loader = build_loader(
            dataset,
            batch_size // dist_info.world_size,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            seed=seed,
            hflip=self.random_flip,
            device=dist_info.device,
            num_workers=self.num_workers,
            **workers,
        )
        return TrainData(dataset, loader)

    def check_against(self, dataset, model_cfg) -> None:
        """The data fit the model: sample shape, and labels for every class row the model trains."""
        want = tuple(model_cfg.sample_shape())
        if tuple(dataset.shape) != want:
            hint = "set model.in_channels and model.input_size"
            if self.dataset == "image_folder":
                hint += " (or data.channels=1|3 and data.image_size, which image folders convert to)"
            raise ValueError(
                f"dataset {self.dataset!r} holds samples of shape {tuple(dataset.shape)}, but the model expects "
                f"{want}: {hint}"
            )
        # the readers check that labels are integers in [0, num_classes): with these two checks every
        # label the loader yields has a row in the model's table, and the steps need not look at them
        ncls = model_cfg.num_classes
        if ncls and dataset.num_classes == 0:
            raise ValueError(
                f"dataset {self.dataset!r} has no labels, but model.num_classes={ncls}: every step would train on "
                "the null label; set model.num_classes=0 for an unconditional model, or add labels"
            )
        if ncls and dataset.num_classes > ncls:
            raise ValueError(f"dataset has {dataset.num_classes} classes, model.num_classes={ncls}")


@dataclass
class TrainData:
    """A run's dataset and this rank's loader over it."""

    dataset: Any
    loader: Any

    @property
    def classes(self) -> list[str] | None:
        """The label -> class-name map (folder names, for instance) that the checkpoints' labels mean."""
        ds = self.dataset
        return list(ds.classes) if ds.num_classes and getattr(ds, "classes", None) else None


def build_dataset(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    conditional: bool = True,
    **kwargs,
):
    """A dataset by reader name (``dataset_names()``), e.g. ``build_dataset("cifar10", "/data/c10")``.

    Args:
        name: a registered reader: "digits" (no path; scikit-learn's bundled 8x8 digits), "npz",
            "image_folder", "cifar10", "latents_h5", or one registered since.
        path: file or folder; required by all but "digits".
        image_size: output side for "image_folder"; for the others, a check that the stored data
            has this size (they are never resized); for "latents_h5" the latent side or 8x it (the
            pixel size of SD-VAE latents) both pass.
        conditional: False drops the labels (num_classes 0, the loader yields y=None).
        kwargs: the reader's options (``DataConfig.reader_kwargs`` of its entry).
    Returns:
        A map-style dataset with ``num_classes`` and ``shape`` attributes.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; choose one of {dataset_names()}")
    entry = _DATASETS[name]
    if entry.NEEDS_PATH and path is None:
        raise ValueError(f"dataset {name!r} needs a path")
    ds = entry.open(path, image_size=image_size, conditional=conditional, **kwargs)
    if image_size is not None:
        sides = entry.sides(ds.shape[1]) if ds.shape[1] == ds.shape[2] else set()
        if image_size not in sides:
            raise ValueError(
                f"dataset {name!r} holds {ds.shape[1]}x{ds.shape[2]} data but image_size={image_size}; "
                "only image_folder resizes"
            )
    if not conditional:
        ds.drop_labels()
    return ds
