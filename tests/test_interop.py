"""Loading the authors' weights: layouts accepted, mistakes named."""

from __future__ import annotations

import numpy as np
import torch

from soflow_fast.interop import load_official_state_dict
from soflow_fast.models import DiT
from tests.utils import raises_naming


def small():
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=10)


def _random_sd():
    src = small()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    return {k: v.clone() for k, v in src.state_dict().items()}


def test_plain_prefixed_and_checkpoint_layouts():
    sd = _random_sd()
    for layout in (
        sd,
        {f"network.{k}": v for k, v in sd.items()},
        {f"module.network.{k}": v for k, v in sd.items()},
        {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema_model": sd, "opt": {}},
    ):
        m = load_official_state_dict(small(), layout)
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    m = load_official_state_dict(small(), {"model": sd, "ema_model": {}}, which="model")
    assert torch.equal(m.final_layer.linear.weight, sd["final_layer.linear.weight"])


def test_wrong_key_is_named():
    sd = _random_sd()
    sd["blocks.0.attn.qkv.wieght"] = sd.pop("blocks.0.attn.qkv.weight")
    with raises_naming(KeyError, "missing", "'blocks.0.attn.qkv.weight'"):
        load_official_state_dict(small(), sd)
    sd.pop("blocks.0.attn.qkv.wieght")
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    sd["extra.thing"] = torch.zeros(1)
    with raises_naming(KeyError, "unexpected", "'extra.thing'"):
        load_official_state_dict(small(), sd)


def test_wrong_shape_is_named():
    sd = _random_sd()
    sd["y_embedder.embedding_table.weight"] = torch.zeros(12, 32)
    with raises_naming(ValueError, "'y_embedder.embedding_table.weight'", "(12, 32)", "(11, 32)"):
        load_official_state_dict(small(), sd)


def test_missing_checkpoint_entry():
    with raises_naming(KeyError, "'ema_model'", "model"):
        load_official_state_dict(small(), {"model": _random_sd()}, which="ema_model")
    with raises_naming(ValueError, "which=", "optimizer (int)"):
        load_official_state_dict(small(), {"optimizer": 1})


def _loads(state, **kw):
    m = load_official_state_dict(small(), state, **kw)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(got, sd):
    assert set(got) == set(sd)
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k


def test_tensor_beside_nested_weights_is_not_a_flat_state_dict():
    sd = _random_sd()
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    _same(_loads({"model": sd, "step": torch.tensor(5)}), sd)
    _same(_loads({"ema": sd, "some_buffer": torch.zeros(3)}), sd)
    # EMA still preferred, whatever else sits beside it
    _same(_loads({"model": zeros, "ema_model": sd, "step": torch.tensor(5), "epoch": 2}), sd)
    _same(_loads({"model": sd, "ema_model": zeros, "step": torch.tensor(5)}, which="model"), sd)


def test_nested_and_empty_entries():
    sd = _random_sd()
    # a training checkpoint that nests the network's weights one level further
    _same(_loads({"state_dict": {"model": sd, "optimizer": {"lr": 1e-4}}, "step": torch.tensor(3)}), sd)
    # an empty EMA slot (saved without EMA) holds nothing: the raw weights are the ones there are
    _same(_loads({"ema_model": {}, "model": sd, "step": 7}), sd)


def test_ambiguous_dict_is_one_error_listing_its_keys():
    sd = _random_sd()
    with raises_naming(ValueError, "which=", "net (dict), step (Tensor)"):
        load_official_state_dict(small(), {"net": sd, "step": torch.tensor(5)})
    # weights with a non-tensor entry beside them: not flat, and no known entry to unwrap
    with raises_naming(ValueError, "epoch (int)", "in all"):
        load_official_state_dict(small(), {**sd, "epoch": 3})
    with raises_naming(ValueError, "entry 'model'", "step (int)"):
        load_official_state_dict(small(), {"model": {**sd, "step": 3}})
    with raises_naming(ValueError, "entry 'step'", "Tensor"):
        load_official_state_dict(small(), {"model": sd, "step": torch.tensor(5)}, which="step")
    with raises_naming(ValueError, "checkpoint is empty"):
        load_official_state_dict(small(), {})
    with raises_naming(ValueError, "entry 'ema'", "empty"):
        load_official_state_dict(small(), {"ema": {}, "model": sd}, which="ema")


# ----------------------------------------------------------------------------------------------
# The authors' U-Net and unconditional DiT checkpoints, as their trainer writes them
# ----------------------------------------------------------------------------------------------

TINY_UNET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
TINY_UNET_ARGS = ["--model-arg=model_channels=16", "--model-arg=channel_mult=[1, 2]", "--model-arg=num_blocks=1"]
TINY_UNET_ARGS += ["--model-arg=attn_resolutions=[4]"]


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _authors_checkpoint(model, ema):
    """Their train.py's file: the Soflow wrapper's state dicts (``network.`` keys), optimiser, counters."""
    opt = torch.optim.RAdam(model.parameters())
    return {
        "model": {f"network.{k}": v.clone() for k, v in model.state_dict().items()},
        "ema_model": {f"network.{k}": v.clone() for k, v in ema.state_dict().items()},
        "optimizer": opt.state_dict(),
        "finished_steps": 25000,
        "finished_epochs": 512,
    }


def test_authors_unet_checkpoint_loads_ema_or_online_weights():
    from soflow_fast.interop import label_table_rows
    from soflow_fast.models import SongUNet

    online, ema = _randomised(SongUNet(**TINY_UNET)), _randomised(SongUNet(**TINY_UNET))
    ckpt = _authors_checkpoint(online, ema)
    assert label_table_rows(ckpt) is None
    for which, src in ((None, ema), ("ema_model", ema), ("model", online)):
        m = load_official_state_dict(SongUNet(**TINY_UNET), ckpt, which=which)
        for k, v in m.state_dict().items():  # the resampling filters (buffers) included
            assert torch.equal(v, src.state_dict()[k]), k
    with raises_naming(ValueError, "'map_augment.weight'", "(64, 6)", "(128, 6)"):
        load_official_state_dict(SongUNet(**{**TINY_UNET, "model_channels": 32}), ckpt)


def test_sample_official_unet(tmp_path):
    from soflow_fast import sample
    from soflow_fast.models import SongUNet

    path, png, npz = tmp_path / "800000.pt", tmp_path / "grid.png", tmp_path / "s.npz"
    torch.save(_authors_checkpoint(SongUNet(**TINY_UNET), _randomised(SongUNet(**TINY_UNET))), path)
    args = ["--official", str(path), "--model", "UNet", "--input-size", "8", *TINY_UNET_ARGS, "--num", "3"]
    assert sample.main([*args, "--steps", "2", f"--out={png}", f"--npz={npz}", "--device=cpu"]) == 0
    assert png.is_file() and np.load(npz)["arr_0"].shape == (3, 8, 8, 3)
    assert (np.load(npz)["labels"] == -1).all()  # unconditional
    # the authors' full-size settings do not fit this tiny file: one line naming the first mismatch
    again = [f"--out={png}", "--force"]  # the grid exists now: these must fail in the model, not on it
    assert sample.main(["--official", str(path), "--model", "UNet", "--input-size", "8", *again]) == 1
    assert sample.main([*args, "--model-arg=nonsense=1", *again]) == 1
    assert sample.main([*args, "--model-arg", "no-equals-sign", *again]) == 1


def test_sample_official_dit_with_and_without_null_row(tmp_path, capsys):
    """The B/4 unconditional release has a table of num_classes rows (no label dropout, so no null
    row); the conditional ones one more. Both load with the same flags."""
    from soflow_fast import sample
    from soflow_fast.interop import label_table_rows
    from soflow_fast.models import build_model

    png = tmp_path / "grid.png"
    flags = ["--model=DiT-T-2", "--input-size=8", "--in-channels=4", "--num-classes=10", "--num=2", f"--out={png}"]
    flags += ["--force"]  # each load writes the same grid
    for dropout, rows in ((0.0, 10), (0.1, 11)):
        net = _randomised(
            build_model("DiT-T/2", input_size=8, in_channels=4, num_classes=10, class_dropout_prob=dropout)
        )
        path = tmp_path / f"dit_{rows}.pt"
        torch.save(_authors_checkpoint(net, net), path)
        assert label_table_rows(torch.load(path, weights_only=True)) == rows
        assert sample.main(["--official", str(path), *flags]) == 0, capsys.readouterr().err
    assert sample.main(["--official", str(path), *flags, "--model-arg=class_dropout_prob=0"]) == 1
    assert "shape mismatch for 'y_embedder.embedding_table.weight'" in capsys.readouterr().err
