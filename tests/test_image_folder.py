"""Tests for soflow_fast.data.image_folder: labels from class folders, resizing, and bad input (damaged or
truncated files found at start or left out, class folders without images refused)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_fast.data import ArrayDataset, build_dataset, build_loader
from tests.utils import raises_naming


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _stripes(h: int, w: int) -> np.ndarray:
    """Left third red, middle green, right third blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 3, 0] = 255
    arr[:, w // 3 : 2 * w // 3, 1] = 255
    arr[:, 2 * w // 3 :, 2] = 255
    return arr


def test_image_folder_labels_resize_crop(tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "cat" / "a.png", np.full((20, 20, 3), 255, np.uint8))
    _write_png(tmp_path / "cat" / "sub" / "b.png", np.zeros((9, 13, 3), np.uint8))
    _write_png(tmp_path / "dog" / "c.png", _stripes(8, 24))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = build_dataset("image_folder", tmp_path, image_size=8)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 3 and ds.shape == (3, 8, 8)
    xs, ys = zip(*(ds[i] for i in range(3)), strict=True)
    assert [int(y) for y in ys] == [0, 0, 1]
    assert all(x.shape == (3, 8, 8) and x.dtype == torch.float32 for x in xs)
    assert torch.all(xs[0] == 1.0) and torch.all(xs[1] == -1.0)
    # 8x24 is already short-side 8, so only the centre crop acts: it keeps exactly the green third.
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(xs[2], green)

    mem = build_dataset("image_folder", tmp_path, image_size=8, in_memory=True)
    assert isinstance(mem, ArrayDataset)
    torch.testing.assert_close(mem.get_batch(torch.arange(3))[0], torch.stack(xs))


def test_image_folder_unlabeled_grayscale_and_errors(tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "flat" / "a.png", np.full((16, 16, 3), 255, np.uint8))
    _write_png(tmp_path / "flat" / "b.png", np.full((32, 40, 3), 255, np.uint8))
    ds = build_dataset("image_folder", tmp_path / "flat", image_size=4, channels=1)
    assert ds.num_classes == 0 and len(ds) == 2 and ds.shape == (1, 4, 4)
    x, y = ds[1]
    assert x.shape == (1, 4, 4) and int(y) == -1 and torch.allclose(x, torch.ones_like(x))

    with raises_naming(FileNotFoundError, str(tmp_path / "missing_dir")):
        build_dataset("image_folder", tmp_path / "missing_dir", image_size=8)
    with raises_naming(ValueError, "image_size", "None"):
        build_dataset("image_folder", tmp_path / "flat")
    (tmp_path / "none").mkdir()
    with raises_naming(ValueError, str(tmp_path / "none"), ".png"):
        build_dataset("image_folder", tmp_path / "none", image_size=8)
    (tmp_path / "broken" / "k").mkdir(parents=True)
    (tmp_path / "broken" / "k" / "x.png").write_bytes(b"\x89PNG garbage")
    with raises_naming(ValueError, "1 of 1", str(tmp_path / "broken" / "k" / "x.png")):
        build_dataset("image_folder", tmp_path / "broken", image_size=8)


def test_image_folder_bad_files_are_found_up_front_or_skipped_and_counted(tmp_path, monkeypatch):
    from PIL import Image

    for i in range(4):
        _write_png(tmp_path / "k" / f"good{i}.png", np.full((12, 12, 3), 60 * i, np.uint8))
    (tmp_path / "k" / "text.png").write_text("this is a text file named .png")
    whole = (tmp_path / "k" / "good0.png").read_bytes()
    (tmp_path / "k" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with raises_naming(ValueError, "2 of 6", "data.skip_bad_files=true"):
        build_dataset("image_folder", tmp_path, image_size=8)
    with pytest.warns(UserWarning, match=r"2 of 6 image file\(s\) cannot be read.*left out"):
        ds = build_dataset("image_folder", tmp_path, image_size=8, skip_bad_files=True)
    assert len(ds) == 4 and all(ds[i][0].shape == (3, 8, 8) for i in range(4))
    # a decompression bomb (more pixels than PIL decodes safely) is one clear error, not a traceback
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(ValueError, match="too large to decode safely"):
        build_dataset("image_folder", tmp_path / "k", image_size=8, skip_bad_files=False)


def _write_jpeg(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def _abc_folder(root: Path, per_class: int = 3) -> None:
    """Classes a, b, c of ``per_class`` small noise images each, PNG and JPEG."""
    rng = np.random.default_rng(7)
    for cls in "abc":
        for i in range(per_class):
            arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            (_write_jpeg if i % 2 else _write_png)(root / cls / f"{i}.{'jpg' if i % 2 else 'png'}", arr)


def test_image_folder_truncated_jpeg_is_found_at_start_and_skipped_for_good(tmp_path):
    # PIL's verify() reads no JPEG pixel data: a cut-short JPEG passed the old check and failed mid-run
    _abc_folder(tmp_path)
    _write_jpeg(tmp_path / "full.jpg", np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    whole = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "b" / "zzz.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    with raises_naming(ValueError, "1 of 10", str(tmp_path / "b" / "zzz.jpg"), "OSError", "data.skip_bad_files=true"):
        build_dataset("image_folder", tmp_path, image_size=8, channels=1)
    with pytest.warns(UserWarning, match=r"1 of 10 image file\(s\) cannot be read: \S*/b/zzz\.jpg .*left out"):
        ds = build_dataset("image_folder", tmp_path, image_size=8, channels=1, skip_bad_files=True)
    assert len(ds) == 9 and ds.classes == ["a", "b", "c"]
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(p.name != "zzz.jpg" for p, _ in ds.samples)
    loader = build_loader(ds, 4, seed=0)
    for _ in range(7):  # three epochs: every sample is decoded, none fails
        x, y = loader.next_batch()
        assert x.shape == (4, 1, 8, 8)
    # a resume rebuilds the same dataset, so the saved stream position fits it
    with pytest.warns(UserWarning, match="left out"):
        again = build_dataset("image_folder", tmp_path, image_size=8, channels=1, skip_bad_files=True)
    resumed = build_loader(again, 4, seed=0)
    resumed.load_state_dict(loader.state_dict())
    torch.testing.assert_close(resumed.next_batch(), loader.next_batch())
    # a PNG whose pixel data is damaged (its CRC fails; decoding alone skips CRCs) is refused too
    png = bytearray((tmp_path / "a" / "0.png").read_bytes())
    idat = png.index(b"IDAT") + 8
    png[idat] ^= 0xFF
    (tmp_path / "a" / "0.png").write_bytes(bytes(png))
    with raises_naming(ValueError, "2 of 10", str(tmp_path / "a" / "0.png"), str(tmp_path / "b" / "zzz.jpg")):
        build_dataset("image_folder", tmp_path, image_size=8)


def test_image_folder_bad_files_are_all_named_up_to_a_limit():
    from soflow_fast.data.image_folder import describe_bad_files

    bad = {Path(f"d/{i}.png"): "OSError: x" for i in range(23)}
    text = describe_bad_files(bad, 100)
    assert text.startswith("23 of 100 image file(s) cannot be read: d/0.png (OSError: x); d/1.png (OSError: x);")
    assert "d/19.png (OSError: x); and 3 more" in text and "d/20.png" not in text


def test_image_folder_empty_class_folder_is_an_error_naming_it(tmp_path):
    # leaving the empty folder out would make 'c' label 1, with no word said
    _abc_folder(tmp_path, per_class=2)
    for f in (tmp_path / "b").iterdir():
        f.unlink()
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(
        ValueError,
        match=r"1 class folder\(s\) hold no images: 'b' \(label 1 of 3\)\. Labels are the positions of the sorted "
        r"class folders, so one cannot be left out silently",
    ):
        build_dataset("image_folder", tmp_path, image_size=8)
    (tmp_path / ".cache").mkdir()  # every empty folder is named, wherever it sorts
    with raises_naming(ValueError, "'.cache' (label 0 of 4)", "'b' (label 2 of 4)"):
        build_dataset("image_folder", tmp_path, image_size=8, in_memory=True)
    # without labels nothing can shift: the images of the other folders are used
    ds = build_dataset("image_folder", tmp_path, image_size=8, conditional=False)
    assert len(ds) == 4 and ds.num_classes == 0 and ds.classes is None


def test_image_folder_class_left_without_readable_images_keeps_every_label(tmp_path):
    _abc_folder(tmp_path, per_class=2)
    for f in (tmp_path / "b").iterdir():
        f.write_bytes(b"not an image")
    with pytest.warns(UserWarning) as caught:
        ds = build_dataset("image_folder", tmp_path, image_size=8, skip_bad_files=True)
    messages = [str(w.message) for w in caught]
    assert any("2 of 6 image file(s) cannot be read" in m and "left out" in m for m in messages), messages
    assert any("no readable image is left in class folder(s) 'b' (label 1); their labels stay" in m for m in messages)
    assert ds.classes == ["a", "b", "c"] and ds.num_classes == 3
    assert [label for _, label in ds.samples] == [0, 0, 2, 2]


def test_image_folder_follows_a_symlinked_folder_once(tmp_path):
    for i in range(5):
        _write_png(tmp_path / "data" / "c" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "data" / "c" / "loop").symlink_to(tmp_path / "data" / "c")  # a link back up the tree
    (tmp_path / "data" / "c" / "again").symlink_to(tmp_path / "data" / "c")
    assert len(build_dataset("image_folder", tmp_path / "data", image_size=8)) == 5


def test_image_folder_loose_images_beside_class_folders_warn_and_unlabelled_drops_names(tmp_path):
    pytest.importorskip("PIL")
    _write_png(tmp_path / "cat" / "a.png", np.full((8, 8, 3), 255, np.uint8))
    _write_png(tmp_path / "dog" / "b.png", np.zeros((8, 8, 3), np.uint8))
    _write_png(tmp_path / "stray.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.warns(
        UserWarning, match=r"1 image\(s\) lie directly in the folder, outside the 2 class sub-folders.*stray\.png"
    ):
        ds = build_dataset("image_folder", tmp_path, image_size=8)
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    with pytest.warns(UserWarning, match="lie directly in the folder"):
        plain = build_dataset("image_folder", tmp_path, image_size=8, conditional=False, in_memory=True)
    assert plain.num_classes == 0 and plain.classes is None
    assert build_dataset("digits").classes == [str(k) for k in range(10)]


def test_image_folder_workers_match_main_process(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(3)
    for i in range(10):
        _write_png(tmp_path / f"c{i % 3}" / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    ds = build_dataset("image_folder", tmp_path, image_size=8)
    inline = build_loader(ds, 4, seed=5)
    workers = build_loader(ds, 4, seed=5, num_workers=2)
    for _ in range(4):  # crosses an epoch boundary (10 samples, 4 per step)
        (xa, ya), (xb, yb) = inline.next_batch(), workers.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Workers prefetch ahead, but the checkpointed position is the consumed one.
    assert workers.state_dict() == inline.state_dict() == {**inline.state_dict(), "epoch": 1, "position": 6}
