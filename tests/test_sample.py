"""``python -m soflow_fast.sample`` at scale and on bad input: batches converted (and decoded) as they
come, with the npz the same as sampling everything first; a capped grid; a progress bar; one error
line for an ``--official`` file that is not a checkpoint."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from soflow_fast import sample as cli
from soflow_fast.models import build_model
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from soflow_fast.vae import decode, load_vae
from soflow_fast.viz import to_uint8


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
