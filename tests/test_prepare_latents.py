"""python -m soflow_fast.prepare_latents: a tiny random diffusers VAE on a small image folder, 2 ranks
(gloo on CPU), killed and resumed; the merged file equals encoding the ADM-cropped images directly.
Bad input: a truncated image is named at start or left out, an empty class folder is one error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.utils import raises_naming

h5py = pytest.importorskip("h5py")
diffusers = pytest.importorskip("diffusers")

from soflow_fast import prepare_latents as pl  # noqa: E402
from soflow_fast.data import build_dataset  # noqa: E402
from tests.utils import IMAGE_SIZE, IMAGES, child_env  # noqa: E402


def adm_crop_transcription(pil_image, image_size):
    """ADM's center_crop_arr as plain steps: BOX halvings, BICUBIC, then a NumPy slice of the centre."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y : y + image_size, x : x + image_size]


def _expected(image_folder: Path, vae_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Moments and labels from encoding every centre-cropped image at once, in ImageFolder order."""
    from PIL import Image

    # ImageFolder's order: classes sorted; in a class, folder by folder (sorted paths), files sorted
    order = sorted(IMAGES, key=lambda t: (t[0], str(Path(t[1]).parent), t[1]))
    classes = sorted({c for c, *_ in IMAGES})
    crops = []
    for cls, name, *_ in order:
        with Image.open(image_folder / cls / name) as img:
            crops.append(adm_crop_transcription(img.convert("RGB"), IMAGE_SIZE))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = diffusers.AutoencoderKL.from_pretrained(vae_path).eval()
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    moments = torch.cat([post.mean, post.std], 1).numpy()
    return moments, np.array([classes.index(c) for c, *_ in order])


def _launch(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "soflow_fast.prepare_latents", *args]
    return subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=300)


def test_adm_center_crop_matches_the_transcription(image_folder):
    from PIL import Image

    for cls, name, *_ in IMAGES:
        with Image.open(image_folder / cls / name) as img:
            img = img.convert("RGB")
            got = np.asarray(pl.adm_center_crop(img, IMAGE_SIZE))
            np.testing.assert_array_equal(got, adm_crop_transcription(img, IMAGE_SIZE))
            assert got.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_rank_blocks_cover_the_dataset_in_order():
    for amount, world in [(9, 2), (10, 3), (2, 4), (0, 2)]:
        blocks = [pl.rank_block(amount, world, r) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == amount
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        assert max(e - s for s, e in blocks) - min(e - s for s, e in blocks) <= 1


def test_two_ranks_killed_and_resumed_equal_direct_encoding(tiny_vae, image_folder, tmp_path):
    out = tmp_path / "latents"
    args = ["--data-path", str(image_folder), "--save-path", str(out), "--image-size", str(IMAGE_SIZE)]
    args += ["--vae", str(tiny_vae), "--device-batch-size", "2", "--num-workers", "1"]
    killed = _launch(2, *args, env={"SOFLOW_TEST_KILL_AFTER_BATCHES": "1"})
    assert killed.returncode != 0
    assert not (out / pl.FINAL_NAME).exists()
    assert (out / "imagenet_latent_part_0.hdf5").exists(), killed.stderr[-3000:]
    with h5py.File(out / "imagenet_latent_part_0.hdf5", "r") as f:
        assert (int(f.attrs["done"]), f["latents"].shape[0]) == (2, 5)  # rank 0 wrote one batch of its 5 rows
    # the trainer's reader says what the folder holds
    with pytest.raises(FileNotFoundError, match="unfinished extraction"):
        build_dataset("latents_h5", out)

    resumed = _launch(2, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 0 resumes at 2 of 5 images" in resumed.stdout
    assert sorted(p.name for p in out.iterdir()) == [pl.FINAL_NAME]  # the parts are merged and removed

    moments, labels = _expected(image_folder, tiny_vae)
    with h5py.File(out / pl.FINAL_NAME, "r") as f:
        assert f["latents"].dtype == np.float32 and f["labels"].dtype == np.int64
        assert f["latents"].shape == (len(IMAGES), 8, IMAGE_SIZE // 2, IMAGE_SIZE // 2)  # the VAE downsamples 2x
        assert int(f["amount"][()]) == len(IMAGES) and int(f["latent_size"][()]) == IMAGE_SIZE // 2
        np.testing.assert_array_equal(f["labels"][:], labels)
        got = f["latents"][:]
        assert json.loads(f.attrs["classes"]) == ["cat", "dog", "emu"]
    rel = np.abs(got - moments).max() / np.abs(moments).max()
    assert rel <= 1e-4, rel

    ds = build_dataset("latents_h5", out, sample=False)  # the folder, as data_path
    assert len(ds) == len(IMAGES) and ds.shape == (4, 8, 8) and ds.num_classes == 3
    assert ds.classes == ["cat", "dog", "emu"] and ds.scale_factor == pytest.approx(0.18215)
    x, y = ds.get_batch(torch.arange(len(IMAGES)))
    torch.testing.assert_close(x, torch.from_numpy(got[:, :4]) * ds.scale_factor)
    assert y.tolist() == labels.tolist()

    again = _launch(1, *args)  # a finished folder is left as it is
    assert again.returncode == 0 and "exists with these settings; delete it to extract again" in again.stdout


def test_one_process_and_clear_errors(tiny_vae, image_folder, tmp_path, capsys):
    out = tmp_path / "one"
    base = ["--data-path", str(image_folder), "--save-path", str(out), "--image-size", str(IMAGE_SIZE)]
    assert pl.main([*base, "--vae", str(tiny_vae), "--num-workers", "0", "--device", "cpu"]) == 0
    with h5py.File(out / pl.FINAL_NAME, "r") as f:
        assert f["latents"].shape[0] == len(IMAGES)
        assert f.attrs["image_size"] == IMAGE_SIZE and f.attrs["vae"] == str(tiny_vae.resolve())
    # run again: the same settings find their output done; others are refused and the file stays
    written = (out / pl.FINAL_NAME).read_bytes()
    assert pl.main([*base, "--vae", str(tiny_vae), "--num-workers", "0", "--device", "cpu"]) == 0
    assert "exists with these settings" in capsys.readouterr().out
    with raises_naming(SystemExit, str(out / pl.FINAL_NAME), f"image_size {IMAGE_SIZE} (asked 32)", "--save_path"):
        pl.main([*base[:5], "32", "--vae", str(tiny_vae), "--num-workers", "0", "--device", "cpu"])
    assert (out / pl.FINAL_NAME).read_bytes() == written
    with pytest.raises(SystemExit, match=r"no config\.json there.*stabilityai/sd-vae-ft-mse"):
        pl.main([*base[:3], str(tmp_path / "two"), *base[4:], "--vae", str(tmp_path / "no-vae")])
    (tmp_path / "broken-vae").mkdir()
    (tmp_path / "broken-vae" / "config.json").write_text("{}")
    with raises_naming(SystemExit, str(tmp_path / "broken-vae"), "OSError", "sd-vae-ft-mse"):
        pl.main([*base[:3], str(tmp_path / "two"), *base[4:], "--vae", str(tmp_path / "broken-vae")])
    with raises_naming(SystemExit, "--image_size 15", "downsampling 2"):
        pl.main([*base[:5], "15", "--vae", str(tiny_vae), "--save-path", str(tmp_path / "three")])
    # a part from other arguments is refused; an unreadable one (a kill inside HDF5) is started again
    vae_args = ["--vae", str(tiny_vae), "--num-workers", "0"]
    (tmp_path / "four").mkdir()
    f, _ = pl.open_part(tmp_path / "four" / "imagenet_latent_part_0.hdf5", {"rows": 9, "image_size": 32}, (8, 8, 8))
    f.close()
    with raises_naming(SystemExit, str(tmp_path / "four" / "imagenet_latent_part_0.hdf5"), "image_size"):
        pl.main([*base[:3], str(tmp_path / "four"), *base[4:], *vae_args])
    (tmp_path / "four" / "imagenet_latent_part_0.hdf5").write_bytes(b"half an HDF5 header")
    assert pl.main([*base[:3], str(tmp_path / "four"), *base[4:], *vae_args]) == 0
    assert "is unreadable" in capsys.readouterr().out
    with h5py.File(tmp_path / "four" / pl.FINAL_NAME, "r") as f, h5py.File(out / pl.FINAL_NAME, "r") as g:
        np.testing.assert_array_equal(f["latents"][:], g["latents"][:])


def _with_truncated_jpeg(image_folder: Path, root: Path) -> Path:
    """A copy of the image folder with a cut-short JPEG in 'dog' (PIL's verify() passes it)."""
    from PIL import Image

    shutil.copytree(image_folder, root)
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "full.jpg", quality=90)
    whole = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "dog" / "zzz.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    return root


def test_bad_files_are_named_at_start_or_skipped_keeping_the_labels(tiny_vae, image_folder, tmp_path, capsys):
    data = _with_truncated_jpeg(image_folder, tmp_path / "train")
    args = ["--data-path", str(data), "--image-size", str(IMAGE_SIZE), "--vae", str(tiny_vae)]
    args += ["--num-workers", "0", "--device", "cpu", "--device-batch-size", "4"]
    with pytest.raises(
        SystemExit,
        match=r"^prepare_latents: \S*train: 1 of 10 image file\(s\) cannot be read: \S*/dog/zzz\.jpg "
        r"\(OSError: image file is truncated.*; remove or repair them, or pass --skip_bad_files",
    ):
        pl.main([*args, "--save-path", str(tmp_path / "refused")])
    assert list((tmp_path / "refused").iterdir()) == []  # stopped before any part: a rerun starts clean

    assert pl.main([*args, "--save-path", str(tmp_path / "skipped"), "--skip-bad-files"]) == 0
    assert re.search(r"1 of 10 image file\(s\) cannot be read: \S*/dog/zzz\.jpg .*; left out", capsys.readouterr().out)
    clean = ["--data-path", str(image_folder), *args[2:], "--save-path", str(tmp_path / "clean")]
    assert pl.main(clean) == 0
    with h5py.File(tmp_path / "skipped" / pl.FINAL_NAME, "r") as f, h5py.File(tmp_path / "clean" / pl.FINAL_NAME) as g:
        assert f["latents"].shape[0] == len(IMAGES) and json.loads(f.attrs["classes"]) == ["cat", "dog", "emu"]
        np.testing.assert_array_equal(f["labels"][:], g["labels"][:])
        np.testing.assert_array_equal(f["latents"][:], g["latents"][:])


def test_two_ranks_share_the_check_and_agree_on_the_samples(tiny_vae, image_folder, tmp_path):
    data = _with_truncated_jpeg(image_folder, tmp_path / "train")
    args = ["--data-path", str(data), "--image-size", str(IMAGE_SIZE), "--vae", str(tiny_vae)]
    args += ["--device-batch-size", "2", "--num-workers", "0", "--save-path", str(tmp_path / "out")]
    refused = _launch(2, *args)
    assert refused.returncode != 0 and "dog/zzz.jpg (OSError: image file is truncated" in refused.stderr
    done = _launch(2, *args, "--skip-bad-files")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("left out (--skip_bad_files)") == 1  # rank 0 says it once
    moments, labels = _expected(image_folder, tiny_vae)
    with h5py.File(tmp_path / "out" / pl.FINAL_NAME, "r") as f:
        np.testing.assert_array_equal(f["labels"][:], labels)
        rel = np.abs(f["latents"][:] - moments).max() / np.abs(moments).max()
    assert rel <= 1e-4, rel


def test_empty_class_folder_is_one_clear_error(tiny_vae, image_folder, tmp_path):
    shutil.copytree(image_folder, tmp_path / "train")
    (tmp_path / "train" / "cow").mkdir()  # sorts between cat and dog: dog and emu would move
    args = ["--data-path", str(tmp_path / "train"), "--save-path", str(tmp_path / "out"), "--vae", str(tiny_vae)]
    with raises_naming(SystemExit, str(tmp_path / "train"), "'cow' (label 1 of 4)"):
        pl.main([*args, "--image-size", str(IMAGE_SIZE), "--num-workers", "0", "--device", "cpu"])
    # the same folder is the same error in training
    with raises_naming(ValueError, str(tmp_path / "train"), "'cow' (label 1 of 4)"):
        build_dataset("image_folder", tmp_path / "train", image_size=IMAGE_SIZE)


def test_an_image_that_stops_decoding_later_is_named(tmp_path):
    from torch.utils.data import DataLoader

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "gone.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    images = pl.CroppedImages([(str(tmp_path / "x" / "gone.png"), 0)], IMAGE_SIZE)
    for workers in (0, 1):  # a worker's error arrives with its traceback; the exit names the file only
        loader = DataLoader(images, batch_size=1, num_workers=workers)
        with pytest.raises(SystemExit, match=r"^prepare_latents: \S*/x/gone\.png: cannot decode image \(\w+Error"):
            list(pl._named_errors(loader))
