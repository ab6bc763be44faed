"""``python -m soflow_fast.prepare_latents``: an image folder to VAE latents in the SoFlow authors' HDF5 layout.

    torchrun --nproc_per_node=8 -m soflow_fast.prepare_latents --data_path imagenet/train \\
        --save_path imagenet_latent --image_size 256 --vae sd-vae-ft-mse

(or plain ``python -m soflow_fast.prepare_latents ...`` for one process). Each image of
``--data_path`` (``<class>/<images>``, classes numbered in sorted order like torchvision's
ImageFolder) is centre-cropped the way ADM prepares ImageNet (halve with a BOX filter while the
short side is at least twice the target, resize the short side to it with BICUBIC, crop the
centre), scaled to [-1, 1] and encoded by the diffusers ``AutoencoderKL`` in the local folder
``--vae`` (nothing is downloaded). The result, ``SAVE/imagenet_latent.hdf5``, is what the
authors' ``latent_dataset.py`` writes and what ``build_dataset("latents_h5", SAVE)`` reads:

- ``latents``: float32 (N, 2C, h, w), the posterior's mean in channels [:C] and its standard
  deviation in [C:]; h = w = image size / the VAE's downsampling factor
  (``2 ** (len(block_out_channels) - 1)``, 8 for SD-VAE: 32 x 32 x 4 for ImageNet-256);
- ``labels``: int64 (N,); ``amount`` and ``latent_size``: int64 scalars (N and h);
- root attributes (additions the authors' reader ignores): ``classes`` (JSON list of the folder
  names by label), ``image_size``, ``scaling_factor`` (the VAE's).

Rank r of W encodes the contiguous block r of the dataset (the first N mod W ranks one image
more) into ``SAVE/imagenet_latent_part_{r}.hdf5``, whose ``done`` attribute counts the rows
written so far (rows are flushed before it grows). A rerun after a kill continues every part from
its ``done``; it must use the same world size and arguments, which the part records. When all
parts are complete, rank 0 merges them in dataset order into ``imagenet_latent.hdf5`` (written
under a temporary name, then renamed) and removes them. ``--seed`` is accepted for the authors'
command line; encoding takes the posterior's moments, so nothing is random.

Before encoding, every image is decoded once the way encoding decodes it (the training reader's
check, shared by the ranks), so a damaged or truncated file is named at the start: the run stops
with one message listing the bad files, or, with ``--skip_bad_files`` (training's
``--skip_bad_files=true``), leaves them out, names them, and keeps every class's label. A class
folder without images is refused, as torchvision's ImageFolder and training refuse it: leaving it
out would shift the labels of the classes after it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from soflow_fast import vae as vae_lib
from soflow_fast.cli import Parser
from soflow_fast.data.image_folder import (
    check_images,
    describe_bad_files,
    empty_class_message,
    no_class_left_message,
)
from soflow_fast.files import atomic_write
from soflow_fast.vae import VAE_HELP, vae_downsampling

FINAL_NAME = "imagenet_latent.hdf5"
PART_NAME = "imagenet_latent_part_{}.hdf5"
# torchvision's ImageFolder extensions, so that the labels and the order match the authors' file
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MERGE_ROWS = 4096  # rows copied at a time when merging the parts


def adm_center_crop(img, size: int):
    """ADM's centre crop of a PIL image to ``size`` x ``size`` (see the module doc)."""
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.Resampling.BICUBIC)
    top, left = (img.size[1] - size) // 2, (img.size[0] - size) // 2
    return img.crop((left, top, left + size, top + size))


def list_image_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under ``root/<class>/`` and the class names, in ImageFolder's order:
    sorted class folders, and within one the files of each sub-folder sorted, folders depth first.
    A class folder without images is a ValueError naming it (and every other such folder)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(name)
        samples += [(f, label) for f in found]
    if not samples:
        raise ValueError(f"{root}: no class sub-folders with images (expected {root}/<class>/<image>)")
    if empty:
        raise ValueError(empty_class_message(root, empty, classes))
    return samples, classes


def decode_crop(path: str | os.PathLike, size: int) -> np.ndarray:
    """The image at ``path`` as RGB, ADM-centre-cropped: a (size, size, 3) uint8 array. PIL's errors pass through."""
    from PIL import Image

    with Image.open(path) as img:
        return np.array(adm_center_crop(img.convert("RGB"), size))


def drop_bad_files(
    root: Path, samples: list[tuple[str, int]], classes: list[str], size: int, skip: bool, world: int, rank: int
) -> list[tuple[str, int]]:
    """``samples`` less the files that do not decode, each rank checking every ``world``-th one; every
    rank gets the same list. Bad files exit with one message naming them unless ``skip``."""
    mine = [path for path, _ in samples[rank::world]]
    bad = check_images(mine, decode=functools.partial(decode_crop, size=size))
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, bad)
        bad = {path: why for part in gathered for path, why in part.items()}
    if not bad:
        return samples
    bad = {path: bad[path] for path, _ in samples if path in bad}  # in dataset order
    listed = describe_bad_files(bad, len(samples))
    if not skip:
        sys.exit(
            f"prepare_latents: {root}: {listed}; remove or repair them, or pass --skip_bad_files to leave them out"
        )
    kept = [(path, label) for path, label in samples if path not in bad]
    if rank == 0:
        print(f"prepare_latents: {root}: {listed}; left out (--skip_bad_files)")
        lost = sorted(set(range(len(classes))) - {label for _, label in kept})
        if lost and kept:
            print(f"prepare_latents: warning: {no_class_left_message(root, [classes[i] for i in lost], classes)}")
    if not kept:
        sys.exit(f"prepare_latents: {root}: no readable images")
    return kept


class UnreadableImage(ValueError):
    """An image that stopped decoding after the start-up check (changed on disk since)."""


class CroppedImages(torch.utils.data.Dataset):
    """``samples[i]`` decoded as RGB, ADM-centre-cropped, as a float32 (3, size, size) tensor in [-1, 1]."""

    def __init__(self, samples: list[tuple[str, int]], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            arr = decode_crop(path, self.size)
        except (OSError, Image.UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise UnreadableImage(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)
        return x.sub_(0.5).div_(0.5), label  # torchvision's ToTensor + Normalize(0.5, 0.5), as the authors


def rank_block(amount: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share: the first ``amount % world`` ranks get one more."""
    base, extra = divmod(amount, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def load_vae(path: str | os.PathLike, device: torch.device):
    """The diffusers AutoencoderKL in the local folder ``path``; any problem is one SystemExit saying what to do."""
    try:
        return vae_lib.load_vae(path, device)
    except ValueError as err:
        sys.exit(f"prepare_latents: --{err}")


@torch.inference_mode()
def encode_moments(vae, images: Tensor) -> Tensor:
    """(b, 2C, h, w): the posterior's mean and standard deviation for images in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1)


def _require_h5py():
    try:
        import h5py
    except ImportError as err:
        sys.exit(f"prepare_latents: needs h5py (pip install h5py): {err}")
    return h5py


def open_part(path: Path, meta: dict, shape: tuple[int, ...]):
    """The part file for this rank's block, opened for writing, and its ``done`` count.

    An existing part is continued if it records the same ``meta``; one from other arguments is an
    error; one that cannot be opened (killed while HDF5 rewrote its header) is started afresh."""
    h5py = _require_h5py()
    if path.exists():
        f = None
        try:
            f = h5py.File(path, "r+")
            recorded = json.loads(f.attrs["meta"])
            done = int(f.attrs["done"])
        except Exception as err:
            if f is not None:
                f.close()
            print(f"prepare_latents: {path} is unreadable ({type(err).__name__}: {err}); starting that part again")
            path.unlink()
        else:
            if recorded != meta:
                f.close()
                changed = sorted(k for k in set(meta) | set(recorded) if meta.get(k) != recorded.get(k))
                why = ""
                if "amount" in changed:
                    why = (
                        f"; the folder now holds {meta['amount']} images, the part was begun for "
                        f"{recorded.get('amount')} (files added or removed, or left out by --skip_bad_files)"
                    )
                sys.exit(
                    f"prepare_latents: {path} was written with other arguments or another world size "
                    f"(differs in {', '.join(changed)}){why}; rerun as before, or delete the part files to start over"
                )
            return f, done
    f = h5py.File(path, "w")
    f.create_dataset("latents", shape=(meta["rows"], *shape), dtype=np.float32)
    f.create_dataset("labels", shape=(meta["rows"],), dtype=np.int64)
    f.attrs["meta"] = json.dumps(meta, sort_keys=True)
    f.attrs["done"] = 0
    f.flush()
    return f, 0


def merge_parts(save: Path, world: int, amount: int, shape: tuple[int, ...], attrs: dict) -> Path:
    """Concatenate the complete parts 0..world-1 into ``FINAL_NAME`` (temp file, then rename); remove them."""
    h5py = _require_h5py()
    final = save / FINAL_NAME
    with atomic_write(final) as tmp, h5py.File(tmp, "w") as out:
        latents = out.create_dataset("latents", shape=(amount, *shape), dtype=np.float32)
        labels = out.create_dataset("labels", shape=(amount,), dtype=np.int64)
        out.create_dataset("amount", data=np.array(amount, dtype=np.int64))
        out.create_dataset("latent_size", data=np.array(shape[-1], dtype=np.int64))
        for key, value in attrs.items():
            out.attrs[key] = value
        pos = 0
        for rank in range(world):
            with h5py.File(save / PART_NAME.format(rank), "r") as part:
                rows = part["latents"].shape[0]
                if int(part.attrs["done"]) != rows:
                    raise RuntimeError(f"part {rank} holds {int(part.attrs['done'])} of {rows} rows")
                for r0 in range(0, rows, MERGE_ROWS):
                    r1 = min(r0 + MERGE_ROWS, rows)
                    latents[pos + r0 : pos + r1] = part["latents"][r0:r1]
                    labels[pos + r0 : pos + r1] = part["labels"][r0:r1]
                pos += rows
        if pos != amount:
            raise RuntimeError(f"the parts hold {pos} rows, the dataset {amount}")
    for rank in range(world):
        (save / PART_NAME.format(rank)).unlink()
    return final


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        prog="soflow-prepare-latents",
        description=__doc__.split("\n\n")[0] + " (or torchrun ... -m soflow_fast.prepare_latents)",
        aliases={"device_batch_size": "batch_size"},
    )
    p.add_argument("--data_path", required=True, help="image folder: <class>/<images>")
    p.add_argument("--save_path", required=True, help="output folder for imagenet_latent.hdf5")
    p.add_argument("--image_size", type=int, default=256, help="side of the centre crop (default 256)")
    p.add_argument("--vae", required=True, help=VAE_HELP)
    p.add_argument("--batch_size", type=int, default=256, help="images per encoder call on each rank")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per rank decoding images")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument(
        "--skip_bad_files",
        action="store_true",
        help="leave out (and name) images that do not decode, instead of stopping; class labels do not change",
    )
    p.add_argument("--seed", type=int, default=42, help="accepted for the authors' command line; unused")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is not None:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        # The ranks meet once, before the merge; a slow rank may keep the others waiting for long.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    try:
        return _run(args, world, rank, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, world: int, rank: int, device: torch.device) -> int:
    from tqdm import tqdm

    data, save = Path(args.data_path).expanduser(), Path(args.save_path).expanduser()
    if not data.is_dir():
        sys.exit(f"prepare_latents: --data_path {data} is not a folder")
    if args.image_size < 1 or args.batch_size < 1 or args.num_workers < 0:
        sys.exit("prepare_latents: --image_size and --batch_size must be >= 1, --num_workers >= 0")
    save.mkdir(parents=True, exist_ok=True)
    asked = {
        "image_size": args.image_size,
        "data_path": str(data.resolve()),
        "vae": str(Path(args.vae).expanduser().resolve()),
    }
    if (save / FINAL_NAME).exists():
        differ = _differing_settings(save / FINAL_NAME, asked)
        if differ:
            sys.exit(
                f"prepare_latents: {save / FINAL_NAME} exists with other settings ({differ}); delete it or "
                "choose another --save_path"
            )
        # The merge renames its complete output into place before it removes the parts, so parts
        # beside the final file are left over from a run stopped in between.
        if rank == 0:
            for leftover in save.glob(PART_NAME.format("*")):
                leftover.unlink()
            print(f"prepare_latents: {save / FINAL_NAME} exists with these settings; delete it to extract again")
        return 0
    vae = load_vae(args.vae, device)
    factor = vae_downsampling(vae)
    if args.image_size % factor:
        sys.exit(
            f"prepare_latents: --image_size {args.image_size} is not a multiple of the VAE's downsampling {factor}"
        )
    try:
        samples, classes = list_image_folder(data)
    except ValueError as err:
        sys.exit(f"prepare_latents: {err}")
    samples = drop_bad_files(data, samples, classes, args.image_size, args.skip_bad_files, world, rank)
    amount = len(samples)
    latent = args.image_size // factor
    shape = (2 * int(vae.config.latent_channels), latent, latent)
    start, end = rank_block(amount, world, rank)
    meta = {
        "data_path": str(data.resolve()),
        "amount": amount,
        "image_size": args.image_size,
        "vae": str(Path(args.vae).expanduser().resolve()),
        "shape": list(shape),
        "world_size": world,
        "rank": rank,
        "start": start,
        "rows": end - start,
    }
    part, done = open_part(save / PART_NAME.format(rank), meta, shape)
    if done:
        print(f"prepare_latents: rank {rank} resumes at {done} of {end - start} images")
    # tests: rank 0 SIGKILLs itself after this many batches (the others stop when torchrun notices)
    kill_after = int(os.environ.get("SOFLOW_TEST_KILL_AFTER_BATCHES", "-1")) if rank == 0 else -1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(CroppedImages(samples, args.image_size), range(start + done, end)),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    desc = f"rank {rank}: latents of {args.image_size}px images"
    with part, tqdm(total=end - start, initial=done, desc=desc, position=rank, unit="img") as bar:
        for batch, (images, labels) in enumerate(_named_errors(loader), start=1):
            moments = encode_moments(vae, images.to(device, non_blocking=True)).float().cpu().numpy()
            n = moments.shape[0]
            part["latents"][done : done + n] = moments
            part["labels"][done : done + n] = labels.numpy()
            part.flush()  # the rows reach the file before the count that vouches for them
            done += n
            part.attrs["done"] = done
            part.flush()
            bar.update(n)
            if batch == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    if world > 1:
        dist.barrier()
    if rank == 0:
        attrs = {"classes": json.dumps(classes), **asked}
        attrs["scaling_factor"] = float(getattr(vae.config, "scaling_factor", 0.18215))
        final = merge_parts(save, world, amount, shape, attrs)
        print(f"prepare_latents: {amount} latents {shape} of {len(classes)} classes written to {final}")
    return 0


def _differing_settings(final: Path, asked: dict) -> str:
    """The settings an existing output was extracted with that differ from ``asked``, as 'key recorded
    (asked value)' (an output of a version that did not record a setting is not held to it)."""
    h5py = _require_h5py()
    with h5py.File(final, "r") as f:
        recorded = {k: f.attrs[k] for k in asked if k in f.attrs}
    recorded = {k: v.item() if hasattr(v, "item") else v for k, v in recorded.items()}
    return ", ".join(f"{k} {recorded[k]} (asked {asked[k]})" for k in recorded if recorded[k] != asked[k])


def _named_errors(loader):
    """``loader``'s batches; a file that no longer decodes ends the run with the one line naming it
    (a DataLoader worker's error arrives with the worker's traceback in its message)."""
    try:
        yield from loader
    except UnreadableImage as err:
        sys.exit(f"prepare_latents: {str(err).strip().splitlines()[-1].rsplit('UnreadableImage: ', 1)[-1]}")


if __name__ == "__main__":
    raise SystemExit(main())
