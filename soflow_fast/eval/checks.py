"""Checks of the ADM evaluator's inputs, cheap enough to run when a command or a training run starts.

``python -m soflow_fast.evaluate`` and the trainer's eval (``eval.eval_reference``) call the same
functions, so a bad file is reported with the same words by both, and before any Inception
forward pass:

- :func:`check_inception_weights`: the weights file exists and is a state dict with the shapes of
  torch-fidelity's Inception-v3 (read with ``weights_only=True``, memory-mapped: no network built);
- :func:`check_reference_batch` / :func:`check_sample_batch`: an npz readable as a zip whose
  ``arr_0`` is uint8 (N, H, W, 3) images, complete (the member holds as many bytes as its header
  says), with at least :data:`MIN_BATCH_IMAGES` images (read from the array header only);
- :func:`check_sample_count`: a number of images is enough for precision and recall, whose
  radii are the distance to the k-th nearest neighbour (ADM's k = 3), so a batch needs k + 1;
- :func:`check_sample_batch` also refuses a latent preview: the npz of a latent model sampled
  without a VAE (``sample --npz`` without ``--vae``, the trainer's eval npz without ``eval.vae``)
  keeps the raw latents under ``latents`` and only a stretched view of their first three channels
  in ``arr_0``, which are not images to score. :func:`check_decoded_samples` is the same rule
  before sampling (a model's channels and whether there is a VAE), with the same words.

Each raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unusable one, with a
message that names the path and the reason. None of them needs torch-fidelity.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "INCEPTION_SHA256",
    "INCEPTION_WEIGHTS_NAME",
    "MIN_BATCH_IMAGES",
    "NPZ_READ_ERRORS",
    "PR_NEIGHBOURS",
    "batch_header",
    "check_image_array",
    "LATENTS_KEY",
    "check_decoded_samples",
    "check_inception_weights",
    "check_reference_batch",
    "check_sample_batch",
    "check_sample_count",
    "latent_preview_error",
    "not_inception_weights",
    "read_npy_header",
]

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
# the start of the file's SHA-256, which torch hub's convention puts in the name of a weights file
INCEPTION_SHA256 = "6726825d"
PR_NEIGHBOURS = 3  # ADM's k of precision and recall
MIN_BATCH_IMAGES = PR_NEIGHBOURS + 1  # a point's k-th neighbour in its own set (itself is the 0-th)

# A few entries of torch-fidelity's FeatureExtractorInceptionV3 state dict, with their shapes: the
# first conv, the conv of ADM's spatial features (mixed_6/conv) and the 1008-class logits.
_INCEPTION_ENTRIES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "fc.weight": (1008, 2048),
}

LATENTS_KEY = "latents"  # the raw latents in an npz of undecoded samples, next to an arr_0 preview

# what reading a damaged npz raises, besides ValueError and OSError
NPZ_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error)


def not_inception_weights(path: Path, reason: str) -> ValueError:
    """The error for a file that is not torch-fidelity's Inception-v3 weights."""
    return ValueError(f"{path}: not torch-fidelity's Inception-v3 weights ({reason})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, in hex, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_inception_weights(path: str | os.PathLike, sha256: str | None = INCEPTION_SHA256) -> Path:
    """The weights file as a Path, if it is torch-fidelity's Inception-v3 weights.

    Args:
        path: the weights file.
        sha256: the start of the file's SHA-256 (torch hub's check of a file named ``...-<hash>.pth``);
            by default torch-fidelity's file, ``INCEPTION_WEIGHTS_NAME``. None checks the entries and
            their shapes only: for other weights, whose scores are not comparable to published ones.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a torch state dict (an npz, a pickle of other objects, a damaged file), one
            without the entries and shapes of torch-fidelity's Inception-v3 (e.g. torchvision's,
            whose classifier has 1000 classes instead of 1008), or other bytes than ``sha256`` says.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Put torch-fidelity's converted TF Inception-v3 there "
            f"({INCEPTION_WEIGHTS_NAME}, from the address in "
            "torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3) and pass it with --inception"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # mmap needs torch's zip format; a legacy file loads without it
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise not_inception_weights(path, _first_line(err)) from err
    if not isinstance(state, dict):
        raise not_inception_weights(path, f"a {type(state).__name__}, not a state dict")
    for key, shape in _INCEPTION_ENTRIES.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise not_inception_weights(path, f"no tensor {key!r}")
        if tuple(value.shape) != shape:
            raise not_inception_weights(path, f"{key!r} is {tuple(value.shape)}, expected {shape}")
    if sha256:
        actual = sha256_of(path)
        if not actual.startswith(sha256.lower()):
            raise not_inception_weights(
                path,
                f"its SHA-256 starts {actual[: len(sha256)]}, torch-fidelity's file {sha256}: other weights give "
                "scores no one can compare; pass --inception_sha256=none to use them anyway",
            )
    return path


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, which is left at the array's first byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def batch_header(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of one array of an npz, from its header; the member must hold
    all the bytes the header announces.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable npz (e.g. truncated by an interrupted write), no ``key`` array,
            or an array whose data end early.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            name = f"{key}.npy"
            if name not in zf.namelist():
                raise ValueError(f"{path}: no {key!r} array in the npz (found {sorted(zf.namelist())})")
            info = zf.getinfo(name)
            with zf.open(info) as f:
                shape, fortran, dtype = read_npy_header(f)
                header = f.tell()
    except NPZ_READ_ERRORS as err:
        raise ValueError(f"{path}: not a readable npz file ({_first_line(err)})") from err
    need = header + int(np.prod(shape)) * dtype.itemsize
    if info.file_size < need:
        raise ValueError(f"{path}: {key!r} ends early ({info.file_size} of {need} bytes)")
    return shape, fortran, dtype


def check_image_array(shape: tuple[int, ...], dtype: np.dtype, path: Path, key: str = "arr_0") -> None:
    """ValueError unless an array of ``shape``/``dtype`` is ADM's uint8 (N, H, W, 3) images."""
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise ValueError(f"{path}: {key!r} must be uint8 images (N, H, W, 3) as ADM's batches, got {dtype} {shape}")


def check_sample_count(n: int, what: str) -> None:
    """ValueError when ``n`` images are too few for precision and recall (see module doc).

    ``what`` names the images in the message: a path, or a setting such as ``eval.eval_num_samples``.
    """
    if n < MIN_BATCH_IMAGES:
        raise ValueError(
            f"{what}: {n} image(s), but precision and recall (k={PR_NEIGHBOURS} nearest neighbours) "
            f"need at least {MIN_BATCH_IMAGES}"
        )


def _check_batch(path: str | os.PathLike, key: str) -> int:
    path = Path(path).expanduser()
    shape, _, dtype = batch_header(path, key)
    check_image_array(shape, dtype, path, key)
    check_sample_count(int(shape[0]), str(path))
    return int(shape[0])


def check_reference_batch(path: str | os.PathLike) -> int:
    """The number of images of a reference batch npz: the checks of a sample batch
    (:func:`check_sample_batch`; a latent preview is no reference either)."""
    return check_sample_batch(path)


def latent_preview_error(what: str) -> ValueError:
    """The error for samples of a latent model that no VAE decoded; ``what`` names them (a path, a setting)."""
    return ValueError(
        f"{what}: a latent preview, not images ('{LATENTS_KEY}' holds the raw latents, 'arr_0' a view of their "
        "first three channels): decode them with a VAE (sample --vae, eval.vae in training) to score them"
    )


def check_decoded_samples(in_channels: int, vae, what: str) -> None:
    """ValueError (:func:`latent_preview_error`) when a model of ``in_channels`` channels samples latents
    (not 1 or 3 channels) and ``vae`` (the VAE, its path or None) is None or empty: its samples
    would be latent previews, as :func:`check_sample_batch` refuses them."""
    if (vae is None or vae == "") and in_channels not in (1, 3):
        raise latent_preview_error(f"{what}: the samples of a {in_channels}-channel latent model without a VAE")


def check_sample_batch(path: str | os.PathLike) -> int:
    """The number of images of a sample batch npz, after the checks of the module doc.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable or truncated npz, no ``arr_0``, not uint8 (N, H, W, 3), fewer than
            :data:`MIN_BATCH_IMAGES` images, or a latent preview (:func:`latent_preview_error`: an npz
            with a ``latents`` array).
    """
    n = _check_batch(path, "arr_0")
    path = Path(path).expanduser()
    with zipfile.ZipFile(path) as zf:
        if f"{LATENTS_KEY}.npy" in zf.namelist():
            raise latent_preview_error(str(path))
    return n
