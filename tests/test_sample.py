"""``python -m soflow_fast.sample``: batches converted (and decoded) as they come, with the npz the same
as sampling everything first; a capped grid; a progress bar; the paths printed as written, existing ones
refused unless --force, a failed write that keeps the old file; bad arguments and an ``--official`` file
that is not a checkpoint as one error line."""

from __future__ import annotations

import argparse
import errno

import numpy as np
import pytest
import torch

from soflow_fast import export
from soflow_fast import sample as cli
from soflow_fast.models import build_model
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from soflow_fast.vae import decode, load_vae
from soflow_fast.viz import to_uint8
from tests.utils import assert_one_line_error, hidden_files


def _official(tmp_path, in_channels: int, num_classes: int):
    """A tiny DiT saved as an authors' state dict, and the ``sample`` arguments that read it."""
    net = build_model("DiT-T/2", input_size=8, in_channels=in_channels, num_classes=num_classes).eval()
    path = tmp_path / "official.pt"
    torch.save(net.state_dict(), path)
    args = ["--official", str(path), "--model=DiT-T/2", "--input-size=8", f"--in-channels={in_channels}"]
    return net, [*args, f"--num-classes={num_classes}", "--device=cpu"]


def _all_at_once(net, num: int, batch: int, seed: int, steps: int, vae=None) -> dict[str, np.ndarray]:
    """What ``sample --npz`` wrote when it kept every batch as float and converted them all at the end."""
    ncls = net.num_classes
    objective = SoFlowObjective(SoFlowConfig(), num_classes=ncls or None)
    g, g_renoise = torch.Generator().manual_seed(seed), torch.Generator("cpu").manual_seed(seed + 1)
    labels = torch.tensor([i % ncls for i in range(num)]) if ncls else None
    outs = []
    for start in range(0, num, batch):
        b = min(batch, num - start)
        noise = torch.randn((b, net.in_channels, 8, 8), generator=g)
        y = None if labels is None else labels[start : start + b]
        outs.append(sample(net, objective, noise, y, steps=steps, generator=g_renoise))
    x = torch.cat(outs)
    latents = x if vae is None and x.shape[1] not in (1, 3) else None
    if vae is not None:
        x = decode(vae, x)
    arrays = {"arr_0": to_uint8(x), "labels": labels.numpy() if labels is not None else np.full(num, -1)}
    if latents is not None:
        arrays["latents"] = latents.numpy()
    return arrays


@pytest.mark.parametrize(
    "in_channels, num_classes, num, batch, steps, decoded",
    [
        (3, 5, 70, 16, 2, False),  # images; 70 is not a multiple of 16
        (1, 0, 10, 3, 1, False),  # unconditional, 1 channel
        (4, 3, 10, 4, 1, False),  # a latent model without --vae: the preview is stretched over all samples
        (4, 3, 150, 40, 2, True),  # decoded in whole 64s from the first sample (as all at once): 64, then 86
    ],
)
def test_npz_is_what_sampling_everything_first_wrote_and_batches_are_converted_as_they_come(
    tmp_path, monkeypatch, capsys, in_channels, num_classes, num, batch, steps, decoded, request
):
    net, args = _official(tmp_path, in_channels, num_classes)
    vae_dir = request.getfixturevalue("tiny_vae") if decoded else None
    converted, decoded_rows = [], []
    monkeypatch.setattr(cli, "to_uint8", lambda x: converted.append(len(x)) or to_uint8(x))
    monkeypatch.setattr(cli, "decode", lambda vae, z, b: decoded_rows.append(len(z)) or decode(vae, z, b))
    npz = tmp_path / "s.npz"
    extra = ["--vae", str(vae_dir)] if decoded else []
    argv = [*args, f"--num={num}", f"--batch={batch}", f"--steps={steps}", f"--npz={npz}", "--seed=5", *extra]
    assert cli.main([*argv, f"--out={tmp_path / 'g.png'}"]) == 0
    want = _all_at_once(net, num, batch, 5, steps, load_vae(vae_dir) if decoded else None)
    with np.load(npz) as got:
        assert got.files == list(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    if in_channels == 4 and not decoded:
        assert converted == [num]  # the preview of the raw latents, which the npz keeps anyway
    else:  # each batch (or decoded chunk) as it comes
        chunks = [64, 86] if decoded else [min(batch, num - s) for s in range(0, num, batch)]
        assert converted == chunks and decoded_rows == (chunks if decoded else [])
    # a progress bar over the samples, on stderr
    assert f"{num}/{num}" in capsys.readouterr().err


def test_the_grid_shows_the_first_64_samples_or_grid(tmp_path):
    from PIL import Image

    _, args = _official(tmp_path, 1, 0)
    assert cli.main([*args, "--num=70", "--batch=32", f"--out={tmp_path / 'a.png'}"]) == 0
    # 8 x 8 images of 8 px shown at 8x (64 px), 1 px apart
    assert Image.open(tmp_path / "a.png").size == (8 * 65 + 1, 8 * 65 + 1)
    assert cli.main([*args, "--num=70", "--grid=70", f"--out={tmp_path / 'b.png'}"]) == 0
    assert Image.open(tmp_path / "b.png").size == (9 * 65 + 1, 8 * 65 + 1)
    assert cli.main([*args, "--num=3", f"--out={tmp_path / 'c.png'}"]) == 0
    assert Image.open(tmp_path / "c.png").size == (2 * 65 + 1, 2 * 65 + 1)


def test_an_official_file_that_is_not_a_checkpoint_is_one_error_line(tmp_path, capsys):
    _, args = _official(tmp_path, 1, 0)
    files = {
        "config.yaml": (b"model:\n  hidden_size: 32\n", "not a torch file of tensors: "),
        "empty.pt": (b"", "an empty file"),
        "random.pt": (np.random.default_rng(0).bytes(4096), "not a torch file of tensors: "),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickle.pt")  # refused by the weights-only loader
    files["pickle.pt"] = (None, "not a torch file of tensors: UnpicklingError")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    files["tensor.pt"] = (None, "checkpoint is a Tensor, not a state dict")
    for name, (_, reason) in files.items():
        path = tmp_path / name
        assert cli.main([*args[:1], str(path), *args[2:], f"--out={tmp_path / 'g.png'}"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: not a checkpoint of the authors' release ({reason}"), err
        assert len(err.splitlines()) == 1 and "weights_only" not in err
    assert not (tmp_path / "g.png").exists()
    assert cli.main([*args[:1], str(tmp_path), *args[2:], f"--out={tmp_path / 'g.png'}"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path}: a directory, not a file\n"


def test_export_and_sample_bad_arguments_are_one_clear_line(tiny_runs, tmp_path, capsys):
    _, one, _ = tiny_runs
    # each bad value is named by the flag's one spelling, whichever spelling or old name was given
    for flag, named in (("--num", "--num"), ("--batch", "--batch_size"), ("--steps", "--nfe"), ("--nfe", "--nfe")):
        with pytest.raises(SystemExit) as info:
            cli.main(["--work-dir", str(one), flag, "0"])
        assert info.value.code == 2 and f"{named} must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["--work-dir", str(one), "--cfg-scale", "nan"])
    assert info.value.code == 2 and "--cfg_scale must be a finite number, got nan" in capsys.readouterr().err
    unconditional = tmp_path / "unconditional.pt"
    tiny = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=0, class_dropout_prob=0.0)
    torch.save(tiny.state_dict(), unconditional)
    official = ["--official", str(unconditional), "--model=DiT-T/2", "--input-size=8", "--in-channels=1"]
    assert cli.main([*official, "--num-classes=0", "--cfg-scale=2", "--num=2"]) == 1
    assert "--cfg_scale needs a class-conditional model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        export.main([str(one), str(tmp_path)])
    assert info.value.code == 2 and "out must be a file path" in capsys.readouterr().err
    pickled = tmp_path / "namespace.pt"
    torch.save(argparse.Namespace(a=1), pickled)  # not a state dict: the safe loader refuses it
    assert cli.main(["--official", str(pickled), "--model=DiT-T/2", "--input-size=8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and assert_one_line_error(err, str(pickled)).startswith("error: ")


@pytest.fixture
def tiny_official(tmp_path) -> list[str]:
    path = tmp_path / "weights" / "unconditional.pt"
    path.parent.mkdir()
    net = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=0, class_dropout_prob=0.0)
    torch.save(net.state_dict(), path)
    return ["--official", str(path), "--model=DiT-T/2", "--input-size=8", "--in-channels=1", "--num-classes=0"]


def test_sample_prints_the_paths_it_writes_and_refuses_existing_ones(tiny_official, tmp_path, capsys):
    args = [*tiny_official, "--num=4", "--device=cpu", f"--out={tmp_path / 'grid'}", f"--npz={tmp_path / 'samp_out'}"]
    assert cli.main(args) == 0
    grid, npz = tmp_path / "grid.png", tmp_path / "samp_out.npz"  # the suffixes the writers add
    assert capsys.readouterr().out == f"wrote {grid}\nwrote {npz}\n"
    assert not (tmp_path / "grid").exists() and not (tmp_path / "samp_out").exists()
    first = np.load(npz)["arr_0"]
    assert first.shape == (4, 8, 8, 3) and grid.stat().st_size > 0
    # refused before the model is read: a missing checkpoint is not what it reports
    moved = [*args[:1], str(tmp_path / "nowhere.pt"), *args[2:]]
    assert cli.main(moved) == 1
    assert capsys.readouterr().err == f"error: {grid} exists; pass --force to replace it\n"
    assert cli.main([*args, f"--out={tmp_path / 'other.png'}"]) == 1
    assert capsys.readouterr().err == f"error: {npz} exists; pass --force to replace it\n"
    assert not (tmp_path / "other.png").exists()
    assert cli.main([*args, "--seed=1", "--force"]) == 0
    assert capsys.readouterr().out == f"wrote {grid}\nwrote {npz}\n"
    assert not np.array_equal(np.load(npz)["arr_0"], first)
    # the default grid goes to samples/ in the weights' folder (as to <run>/samples/), refused the same way
    assert cli.main([*tiny_official, "--num=2", "--device=cpu"]) == 0
    default = tmp_path / "weights" / "samples" / "grid_1step.png"
    assert capsys.readouterr().out == f"wrote {default}\n"
    assert cli.main([*tiny_official, "--num=2", "--device=cpu"]) == 1
    assert capsys.readouterr().err == f"error: {default} exists; pass --force to replace it\n"
    with pytest.raises(SystemExit) as info:
        cli.main([*tiny_official, f"--out={tmp_path / 'grid.txt'}"])
    assert info.value.code == 2 and "'.txt' is not an image type PIL writes" in capsys.readouterr().err
    assert all(hidden_files(folder) == [] for folder in (tmp_path, tmp_path / "weights", default.parent))


def test_sample_failing_mid_write_keeps_the_old_npz(tiny_official, tmp_path, monkeypatch, capsys):
    npz, grid = tmp_path / "s.npz", tmp_path / "g.png"
    args = [*tiny_official, "--num=4", "--batch=2", "--device=cpu", f"--out={grid}", f"--npz={npz}"]
    assert cli.main(args) == 0
    before, grid_before = npz.read_bytes(), grid.read_bytes()
    write = cli.NpyStream.write

    def full_disk_at_the_second_batch(self, rows):
        if self.left < rows.nbytes * 2:  # the first batch went in
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, rows)

    monkeypatch.setattr(cli.NpyStream, "write", full_disk_at_the_second_batch)
    capsys.readouterr()
    assert cli.main([*args, "--force", "--seed=3"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: could not write {npz}: no space left on the device (ENOSPC)"
    assert "Traceback" not in err and err.count("error:") == 1
    assert npz.read_bytes() == before and grid.read_bytes() == grid_before and hidden_files(tmp_path) == []


def test_sample_default_grid_is_in_samples_of_every_source(fake_run, tmp_path, capsys):
    work, _ = fake_run
    weights = tmp_path / "exported" / "ema.safetensors"
    assert export.main([str(work), str(weights)]) == 0
    for src, folder in ((["--work-dir", str(work)], work), (["--weights", str(weights)], weights.parent)):
        capsys.readouterr()
        assert cli.main([*src, "--num=2", "--device=cpu"]) == 0
        assert capsys.readouterr().out == f"wrote {folder / 'samples' / 'grid_1step.png'}\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = "(default: samples/<the npz's name>.png with --npz, else samples/grid_<nfe>step.png, in the --working_dir"
    assert default in text
