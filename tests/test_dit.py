"""DiT shapes, conditioning, initialisation and the size registry."""

from __future__ import annotations

import torch

from soflow_fast.models import DIT_SIZES, DiT, build_model, canonical_model_name
from soflow_fast.models.dit import timestep_embedding
from tests.utils import raises_naming


def small(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    return DiT(**args)


def test_forward_shape_and_zero_init():
    m = small()
    x = torch.randn(3, 4, 8, 8)
    out = m(x, torch.rand(3), torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out)), "adaLN-Zero: the output layer starts at zero"


def test_none_label_is_null_row():
    m = small()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    x, t, s = torch.randn(2, 4, 8, 8), torch.rand(2), torch.rand(2)
    torch.testing.assert_close(m(x, t, s, None), m(x, t, s, torch.full((2,), 10)), rtol=0, atol=0)
    assert not torch.allclose(m(x, t, s, None), m(x, t, s, torch.zeros(2, dtype=torch.long)))


def test_second_embedder_sees_interval():
    """F depends on s only through t - s in the s embedder: equal intervals, equal embeddings."""
    m = small()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    t, s = torch.tensor([0.7]), torch.tensor([0.2])
    c1 = m.embed_condition(t, s, None, 1)
    c2 = m.t_embedder(t) + m.s_embedder(t - s) + m.y_embedder(None, 1, t.device)
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    assert m.embed_condition(t, s, None, 1).sub(m.embed_condition(t, t, None, 1)).abs().max() > 0


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 256)
    assert e.shape == (2, 256) and e.dtype == torch.float32
    torch.testing.assert_close(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert abs(e[1, 0].item() - torch.cos(torch.tensor(0.5)).item()) < 1e-7


def test_bad_shapes_raise():
    m = small()
    with raises_naming(ValueError, "(B, 4, 8, 8)", "(2, 3, 8, 8)"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2))
    with raises_naming(ValueError, "(2,)", "(3,)"):
        m(torch.randn(2, 4, 8, 8), torch.rand(3), torch.rand(2))
    with raises_naming(ValueError, "input_size=9", "patch_size=2"):
        small(input_size=9)
    with raises_naming(ValueError, "hidden_size=32", "num_heads=5"):
        small(num_heads=5)


def test_unconditional_model():
    m = small(num_classes=0, class_dropout_prob=0.0)
    assert m.y_embedder.embedding_table.num_embeddings == 1
    assert m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.rand(2)).shape == (2, 4, 8, 8)


def test_no_null_row_without_dropout():
    m = small(class_dropout_prob=0.0)
    assert m.y_embedder.embedding_table.num_embeddings == 10 and m.null_label is None
    with raises_naming(ValueError, "y=None", "class_dropout_prob=0"):
        m(torch.randn(1, 4, 8, 8), torch.rand(1), torch.rand(1), None)


def test_registry_sizes_and_names():
    assert set(DIT_SIZES) >= {"DiT-T/2", "DiT-S/2", "DiT-S/4", "DiT-B/4", "DiT-B/2", "DiT-M/2", "DiT-L/2", "DiT-XL/2"}
    assert canonical_model_name("DiT-B-4") == "DiT-B/4"
    assert canonical_model_name("DiT-XL/2") == "DiT-XL/2"
    with raises_naming(ValueError, "'DiT-Q/3'", "DiT-T/2"):
        canonical_model_name("DiT-Q/3")
    m = build_model("DiT-S/4", input_size=16, in_channels=1, num_classes=10)
    assert (m.patch_size, m.hidden_size, len(m.blocks), m.num_heads) == (4, 384, 12, 6)
    n = sum(p.numel() for p in build_model("DiT-B/2", input_size=32, in_channels=4, num_classes=1000).parameters())
    # DiT-B/2 is ~130M parameters; the second time embedder adds ~0.8M
    assert 125e6 < n < 140e6


def test_pos_embed_is_frozen_buffer():
    m = small()
    assert "pos_embed" in m.state_dict() and "pos_embed" not in dict(m.named_parameters())
    assert m.pos_embed.abs().sum() > 0
