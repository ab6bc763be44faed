"""Loading the authors' weights: layouts accepted, mistakes named."""

from __future__ import annotations

import pytest
import torch

from soflow_fast.interop import load_official_state_dict
from soflow_fast.models import DiT


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
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.qkv\.weight"):
        load_official_state_dict(small(), sd)
    sd.pop("blocks.0.attn.qkv.wieght")
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected key .*extra\.thing"):
        load_official_state_dict(small(), sd)


def test_wrong_shape_is_named():
    sd = _random_sd()
    sd["y_embedder.embedding_table.weight"] = torch.zeros(12, 32)
    with pytest.raises(ValueError, match=r"y_embedder\.embedding_table\.weight.*\(12, 32\)"):
        load_official_state_dict(small(), sd)


def test_missing_checkpoint_entry():
    with pytest.raises(KeyError, match="ema_model"):
        load_official_state_dict(small(), {"model": _random_sd()}, which="ema_model")
    with pytest.raises(ValueError, match="not a state dict"):
        load_official_state_dict(small(), {"optimizer": 1})
