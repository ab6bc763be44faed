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
    with pytest.raises(ValueError, match=r"not a state dict.*which=.*net \(dict\), step \(Tensor\)"):
        load_official_state_dict(small(), {"net": sd, "step": torch.tensor(5)})
    # weights with a non-tensor entry beside them: not flat, and no known entry to unwrap
    with pytest.raises(ValueError, match=r"not a state dict \(values that are not tensors: epoch \(int\)\).*in all"):
        load_official_state_dict(small(), {**sd, "epoch": 3})
    with pytest.raises(ValueError, match=r"checkpoint entry 'model' is not a state dict.*step \(int\)"):
        load_official_state_dict(small(), {"model": {**sd, "step": 3}})
    with pytest.raises(ValueError, match=r"checkpoint entry 'step' is a Tensor, not a state dict"):
        load_official_state_dict(small(), {"model": sd, "step": torch.tensor(5)}, which="step")
    with pytest.raises(ValueError, match=r"checkpoint is empty"):
        load_official_state_dict(small(), {})
    with pytest.raises(ValueError, match=r"checkpoint entry 'ema' is empty"):
        load_official_state_dict(small(), {"ema": {}, "model": sd}, which="ema")
