"""Image folders (``root/<class>/...``): listed once, every file checked up front, decoded on access."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from soflow_fast.config_fields import one_of, option
from soflow_fast.data.datasets import IMAGE_EXTENSIONS, ArrayDataset, ImageDataset, require_path
from soflow_fast.data.registry import DataConfig, register_dataset

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------


def _require_pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is a declared dependency
        raise ImportError("image_folder datasets need Pillow: pip install pillow") from err
    return Image


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` in a stable order; symlinked folders are followed once each, so a
    link back up the tree (a loop) or two links to one folder do not count its images twice."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()  # os.walk order is filesystem-dependent; the index -> file map must not be
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _check_image(path: PathLike, decode: Callable[[PathLike], object] | None = None) -> str | None:
    """Why ``path`` cannot be trained on (not an image, damaged or cut short, a decompression bomb), or None.

    Opens the header (format, size, mode), runs PIL's integrity check (for PNG, every chunk's CRC,
    which decoding skips) and then decodes the whole file: ``decode(path)`` where given (the reader's
    own decode, so that a file that passes here also decodes in training), else ``img.load()``.
    ``verify`` alone reads no pixel data of most formats: a JPEG cut short passes it.
    Decompression-bomb warnings count as failures when the caller (``check_images``) makes them errors.
    """
    image = _require_pil()
    try:
        with image.open(path) as img:
            if img.width < 1 or img.height < 1:
                return f"{img.width}x{img.height} pixels"
            img.verify()
        if decode is not None:
            decode(path)
        else:
            with image.open(path) as img:
                img.load()
    except (image.DecompressionBombError, image.DecompressionBombWarning) as err:
        return f"too large to decode safely ({err})"
    except Exception as err:  # PIL raises many types for damaged files (SyntaxError for a bad PNG among them)
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


# folders of at least this many images show a progress bar while they are checked
CHECK_PROGRESS_FROM = 2000


def check_images(paths: Sequence[PathLike], decode: Callable[[PathLike], object] | None = None) -> dict[PathLike, str]:
    """``_check_image`` over many files, on threads (PIL decodes without holding the GIL, and reading
    files waits on the disk), with a progress bar for large folders. Returns the bad files and why,
    in the order of ``paths``."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    image = _require_pil()
    check = functools.partial(_check_image, decode=decode)
    # The filter is process-wide and set once here: catch_warnings inside the threads would race.
    with warnings.catch_warnings():
        warnings.simplefilter("error", image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
            reasons = pool.map(check, paths, chunksize=16)
            show = len(paths) >= CHECK_PROGRESS_FROM
            reasons = list(tqdm(reasons, total=len(paths), desc="checking images", unit="img", disable=not show))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def describe_bad_files(bad: dict[PathLike, str], total: int, limit: int = 20) -> str:
    """One line: 'K of N image file(s) cannot be read: ' and each file with its reason (the first ``limit``)."""
    named = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} of {total} image file(s) cannot be read: {named}{more}"


def empty_class_message(root: Path, empty: list[str], classes: list[str]) -> str:
    """Why class folders without images are refused: labels are positions among the sorted folder
    names, so leaving one out would move the labels of the classes after it (or change their number)."""
    shown = ", ".join(f"{n!r} (label {classes.index(n)} of {len(classes)})" for n in empty[:10])
    more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
    return (
        f"{root}: {len(empty)} class folder(s) hold no images: {shown}{more}. Labels are the positions of the "
        "sorted class folders, so one cannot be left out silently: the classes after it would change labels "
        "and the number of classes would change; remove the folder(s) if the classes should be numbered "
        "without them, or add their images"
    )


def no_class_left_message(root: Path, lost: list[str], classes: list[str]) -> str:
    """The warning when leaving bad files out empties whole classes (their labels stay reserved)."""
    shown = ", ".join(f"{n!r} (label {classes.index(n)})" for n in lost[:10])
    more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
    return (
        f"{root}: no readable image is left in class folder(s) {shown}{more}; their labels stay reserved, "
        "so the other classes keep their labels, but no sample has them"
    )


def resize_center_crop(img, size: int):
    """Scale the short side to ``size`` and crop the centre square.

    Large downscales go by repeated 2x box filtering first, so a bicubic resize never has to
    shrink by more than 2x, which would alias.
    """
    image = _require_pil()
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(s * scale)) for s in img.size), resample=image.Resampling.BICUBIC)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataset(ImageDataset):
    """Images under ``root/<class>/...`` (ImageFolder style), decoded with PIL on access.

    Class names are the sorted sub-folder names and their positions are the labels. Images lying
    directly in ``root`` with no class sub-folders make an unlabeled dataset. A class folder without
    images is an error when the labels are used (leaving it out would shift the labels after it).

    Every image is decoded once here, exactly as training decodes it (``check_images``), so a damaged
    or truncated file is found before training rather than when a batch first reaches it.

    Args:
        root: the folder.
        image_size: side of the square output; the short side is resized to it, then centre-cropped.
        channels: 3 (RGB) or 1 (grayscale).
        skip_bad_files: leave files that fail the check out (with a warning that names them) instead
            of refusing the folder; the labels of the classes do not change.
        conditional: False when the labels will be dropped: class folders without images are then
            harmless and allowed.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int,
        channels: int = 3,
        skip_bad_files: bool = False,
        conditional: bool = True,
    ) -> None:
        self.root = require_path(root, "image folder", directory=True)
        if image_size is None or int(image_size) < 1:
            raise ValueError(f"image_folder needs a positive image_size, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size = int(image_size)
        self.channels = channels
        self.shape = (channels, self.image_size, self.image_size)
        listed = [(d.name, _list_images(d)) for d in sorted(d for d in self.root.iterdir() if d.is_dir())]
        self.samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        if any(files for _, files in listed):
            empty = [name for name, files in listed if not files]
            if empty and conditional:
                raise ValueError(empty_class_message(self.root, empty, [name for name, _ in listed]))
            for name, files in listed:
                if files:  # (only without labels may a class folder be empty)
                    self.samples.extend((f, len(self.classes)) for f in files)
                    self.classes.append(name)
        loose = sorted(f for f in self.root.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.samples:
            self.samples = [(f, -1) for f in loose]
        elif loose:
            warnings.warn(
                f"{self.root}: {len(loose)} image(s) lie directly in the folder, outside the {len(self.classes)} "
                f"class sub-folders, and are left out (first: {loose[0].name})",
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        bad = check_images([f for f, _ in self.samples], decode=self._decode)
        if bad:
            listed_bad = describe_bad_files(bad, len(self.samples))
            if not skip_bad_files:
                raise ValueError(
                    f"{self.root}: {listed_bad}; remove or repair them, or set data.skip_bad_files=true "
                    "(--skip_bad_files=true) to leave them out"
                )
            warnings.warn(f"{self.root}: {listed_bad}; left out (data.skip_bad_files)", stacklevel=2)
            self.samples = [s for s in self.samples if s[0] not in bad]
            if not self.samples:
                raise ValueError(f"{self.root}: no readable images")
            kept = {label for _, label in self.samples}
            lost = [name for label, name in enumerate(self.classes) if label not in kept]
            if lost:
                warnings.warn(no_class_left_message(self.root, lost, self.classes), stacklevel=2)
        self.num_classes = len(self.classes)

    def _decode(self, path: Path) -> np.ndarray:
        """The file decoded, converted and resized: an (H, W) or (H, W, C) uint8 array. PIL's errors pass through."""
        image = _require_pil()
        with image.open(path) as img:
            img = img.convert("RGB" if self.channels == 3 else "L")
            img = resize_center_crop(img, self.image_size)
            return np.array(img, dtype=np.uint8)  # a writable copy; PIL's buffer is read-only

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> np.ndarray:
        """The decoded, resized image ``index`` as a (C, H, W) uint8 array."""
        image = _require_pil()
        path = self.samples[index][0]
        try:
            arr = self._decode(path)
        except (OSError, image.UnidentifiedImageError, ValueError, image.DecompressionBombError) as err:
            raise ValueError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(self.load_uint8(index))).to(torch.float32).div_(127.5).sub_(1.0)
        label = self.samples[index][1] if self.num_classes > 0 else -1
        return x, torch.tensor(label, dtype=torch.int64)

    def to_memory(self) -> ArrayDataset:
        """Decode every image once into an ArrayDataset (for folders that fit in RAM)."""
        images = torch.from_numpy(np.stack([self.load_uint8(i) for i in range(len(self))]))
        labels = torch.tensor([s[1] for s in self.samples]) if self.num_classes > 0 else None
        ds = ArrayDataset(images, labels, num_classes=self.num_classes or None, name=str(self.root))
        ds.classes = list(self.classes) if self.classes is not None else None
        return ds


@register_dataset
@dataclass(kw_only=True)
class ImageFolderData(DataConfig):
    """A folder of images, one sub-folder per class, decoded and resized to ``data.image_size``."""

    LABEL: ClassVar[str] = "image_folder"

    channels: int | None = option(None, check=one_of(1, 3))  # 3 (RGB, the default) or 1 (grayscale)
    in_memory: bool | None = option(None, resume_safe=True)  # decode everything into RAM once
    skip_bad_files: bool | None = option(None)  # leave unreadable images out (named in the log) instead of
    # refusing the folder

    @classmethod
    def open(cls, path, *, image_size, conditional, in_memory: bool = False, **options) -> ImageDataset:
        ds = ImageFolderDataset(path, image_size=image_size, conditional=conditional, **options)
        return ds.to_memory() if in_memory else ds
