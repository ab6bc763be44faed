"""Image folders (``root/<class>/...``): listed once, every file checked up front, decoded on access."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from soflow_fast.data.datasets import IMAGE_EXTENSIONS, ArrayDataset, ImageDataset, require_path

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


def _check_image(path: Path) -> str | None:
    """Why ``path`` cannot be trained on (not an image, damaged, a decompression bomb), or None.

    Opens the header (format, size, mode) and runs PIL's integrity check (for PNG, every chunk's
    CRC: a truncated file fails), without decoding the pixels.
    """
    image = _require_pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image.DecompressionBombWarning)
            with image.open(path) as img:
                if img.width < 1 or img.height < 1:
                    return f"{img.width}x{img.height} pixels"
                img.verify()
    except (image.DecompressionBombError, image.DecompressionBombWarning) as err:
        return f"too large to decode safely ({err})"
    except Exception as err:  # PIL raises many types for damaged files (SyntaxError for a bad PNG among them)
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


def check_images(paths: list[Path]) -> dict[Path, str]:
    """``_check_image`` over many files (threads: the work is reading files), with a progress bar for
    large folders. Returns the bad files and why."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        reasons = pool.map(_check_image, paths, chunksize=64)
        reasons = list(tqdm(reasons, total=len(paths), desc="checking images", unit="img", disable=len(paths) < 5000))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


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
    directly in ``root`` with no class sub-folders make an unlabeled dataset.

    Every image's header and integrity are checked once here (``check_images``), so a damaged file is
    found before training rather than when a batch first reaches it.

    Args:
        root: the folder.
        image_size: side of the square output; the short side is resized to it, then centre-cropped.
        channels: 3 (RGB) or 1 (grayscale).
        skip_bad_files: leave files that fail the check out (with a warning that counts them)
            instead of refusing the folder.
    """

    def __init__(
        self, root: str | os.PathLike, *, image_size: int, channels: int = 3, skip_bad_files: bool = False
    ) -> None:
        self.root = require_path(root, "image folder", directory=True)
        if image_size is None or int(image_size) < 1:
            raise ValueError(f"image_folder needs a positive image_size, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size = int(image_size)
        self.channels = channels
        self.shape = (channels, self.image_size, self.image_size)
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        self.samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        for d in class_dirs:
            files = _list_images(d)
            if files:  # empty sub-folders would otherwise become classes that never occur
                self.samples.extend((f, len(self.classes)) for f in files)
                self.classes.append(d.name)
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
        bad = check_images([f for f, _ in self.samples])
        if bad:
            first, why = next(iter(bad.items()))
            listed = f"{len(bad)} of {len(self.samples)} image file(s) cannot be read (first: {first}: {why})"
            if not skip_bad_files:
                raise ValueError(
                    f"{self.root}: {listed}; remove or repair them, or set data.skip_bad_files=true to leave them out"
                )
            warnings.warn(f"{self.root}: {listed}; left out (data.skip_bad_files)", stacklevel=2)
            self.samples = [s for s in self.samples if s[0] not in bad]
            if not self.samples:
                raise ValueError(f"{self.root}: no readable images")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> np.ndarray:
        """The decoded, resized image ``index`` as a (C, H, W) uint8 array."""
        image = _require_pil()
        path = self.samples[index][0]
        try:
            with image.open(path) as img:
                img = img.convert("RGB" if self.channels == 3 else "L")
                img = resize_center_crop(img, self.image_size)
                arr = np.array(img, dtype=np.uint8)  # a writable copy; PIL's buffer is read-only
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
