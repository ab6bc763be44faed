"""The authors' CIFAR-10 U-Net (SongUNet): golden values, architecture variants, dropout masks in the objective."""

from __future__ import annotations

import pytest
import torch

from soflow_fast.interop import load_official_state_dict
from soflow_fast.models import SongUNet, build_model
from soflow_fast.network_calls import rows_of
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from tests.utils import assert_rel_close, check_loss_and_grads, golden_objective_config, raises_naming

RTOL = 1e-5


@pytest.fixture(scope="module")
def golden(golden_unet):
    """Here ``golden`` is the U-Net case (conftest's ``golden`` is the DiT one)."""
    return golden_unet


@pytest.fixture(scope="module")
def case(golden):
    meta = golden["meta"]
    model = SongUNet(**meta["net"])
    load_official_state_dict(model, {f"network.{k[3:]}": v for k, v in golden.items() if k.startswith("sd/")})
    cfg = golden_objective_config(meta)
    return model, SoFlowObjective(cfg, num_classes=None), {"augment_labels": golden["in/augment_labels"]}


def test_state_dict_names_are_the_authors(golden, case):
    model, _, _ = case
    theirs = {k[3:]: tuple(v.shape) for k, v in golden.items() if k.startswith("sd/")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs


def test_network_solution_velocity(golden, case):
    model, obj, kw = case
    x, t, s = golden["in/net_x"], golden["in/net_t"], golden["in/net_s"]
    with torch.no_grad():
        assert_rel_close(model(x, t, s, **kw), golden["out/network"], RTOL, "network")
        assert_rel_close(model(x, t, s), golden["out/network_noaug"], RTOL, "network_noaug")
        assert_rel_close(obj.solution(model, x, t, s, None, kw), golden["out/solution"], RTOL, "solution")
        assert_rel_close(obj.velocity(model, x, t, None, kw), golden["out/velocity"], RTOL, "velocity")


def test_velocity_loss_and_grads(golden, case):
    model, obj, kw = case
    out = obj.velocity_loss(model, golden["in/x0"], golden["in/eps_fm"], golden["in/t_fm"], model_kwargs=kw)
    check_loss_and_grads(golden, model, out, "fm", RTOL)


def test_consistency_loss_and_grads(golden, case):
    model, obj, kw = case
    x0, noise, t, l, s = (golden[f"in/{k}"] for k in ("x0", "eps_scm", "t_scm", "l_scm", "s_scm"))
    check_loss_and_grads(golden, model, obj.consistency_loss(model, x0, noise, t, l, s, model_kwargs=kw), "scm", RTOL)


def test_batched_consistency_rows_reproduce_the_golden_loss(golden, case):
    """loss_from_draws with every row a consistency row (the authors' CIFAR-10 split) gives the same."""
    model, obj, kw = case
    x0, noise, t, l, s = (golden[f"in/{k}"] for k in ("x0", "eps_scm", "t_scm", "l_scm", "s_scm"))
    d = obj.draw(x0)
    d.n_fm, d.noise, d.t, d.l, d.s = 0, noise, t, l, s
    loss, logs = obj.loss_from_draws(model, x0, None, d, kw)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert_rel_close(loss, golden["out/scm_loss"], RTOL, "scm_loss")
    assert_rel_close(logs["scm_mse"], golden["out/scm_mse"], RTOL, "scm_mse")
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, golden[f"grad_scm/{name}"], RTOL, f"grad_scm/{name}")


def test_middle_time_matches_authors_l(golden):
    spec = golden["meta"]["l_scm"]
    cfg = SoFlowConfig(
        l_schedule=spec["method"], l_init_ratio=spec["init_ratio"], l_end_ratio=spec["end_ratio"], total_steps=spec["K"]
    )
    t, s = golden["in/t_scm"], golden["in/s_scm"]
    l = torch.minimum(SoFlowObjective(cfg).middle_time(t, s, spec["k"]), t - 1e-4)
    assert_rel_close(l, golden["in/l_scm"], RTOL, "l_scm")


def test_one_and_two_step_samples(golden, case):
    """Sampling passes no augmentation labels, as the authors' inference does."""
    model, obj, _ = case
    noise = golden["in/sample_noise"]
    assert_rel_close(sample(model, obj, noise, steps=1), golden["out/sample_1"], RTOL, "sample_1")
    two = sample(model, obj, noise, steps=2, renoise=[golden["in/sample_renoise"]])
    assert_rel_close(two, golden["out/sample_2"], RTOL, "sample_2")


# ----------------------------------------------------------------------------------------------
# The architecture beyond the golden case
# ----------------------------------------------------------------------------------------------


def test_default_is_the_authors_cifar10_network():
    m = build_model("UNet")
    assert isinstance(m, SongUNet) and m.input_size == 32 and m.in_channels == m.out_channels == 3
    assert m.num_classes == 0 and m.augment_dim == 6
    n = sum(p.numel() for p in m.parameters())
    assert n == 55_932_419 and round(n / 1e6, 1) == 55.9
    names = set(m.state_dict())
    assert {"map_augment.weight", "map_layer0.weight", "enc.32x32_conv.weight", "enc.16x16_block3.qkv.weight"} <= names
    assert {"enc.16x16_down.conv0.resample_filter", "dec.32x32_aux_conv.weight", "dec.8x8_in0.proj.weight"} <= names
    assert "enc.32x32_block0.qkv.weight" not in names  # attention at 16x16 only (and in dec.*_in0)
    with raises_naming(ValueError, "'UNet'", "num_classes", "got 10"):
        build_model("UNet", num_classes=10)


VARIANTS = {
    "three-levels": dict(img_resolution=16, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8, 4]),
    "one-level": dict(img_resolution=8, channel_mult=[2], num_blocks=1, attn_resolutions=[]),
    "skip-encoder-decoder": dict(img_resolution=16, channel_mult=[1, 2], encoder_type="skip", decoder_type="skip"),
    "residual-fourier": dict(
        img_resolution=16, channel_mult=[1, 2], encoder_type="residual", embedding_type="fourier", channel_mult_noise=1
    ),
    "no-augment-1-1-filter": dict(img_resolution=8, channel_mult=[1, 1], augment_dim=0, resample_filter=[1, 1]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_run_forward_and_backward(name):
    kw = dict(in_channels=3, out_channels=2, model_channels=16, num_blocks=1, dropout=0.1, attn_resolutions=[8])
    kw.update(VARIANTS[name])
    m = SongUNet(**kw)
    res, B = kw["img_resolution"], 3
    x, t = torch.randn(B, 3, res, res), torch.rand(B)
    aug = torch.randn(B, m.augment_dim) if m.augment_dim else None
    out = m(x, t, t * 0.5, augment_labels=aug)
    assert out.shape == (B, 2, res, res) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    # every level, block and attention layer is named as the authors name it
    for level, mult in enumerate(kw["channel_mult"]):
        r = res >> level
        for i in range(kw["num_blocks"]):
            blk = m.enc[f"{r}x{r}_block{i}"]
            assert blk.out_channels == 16 * mult and blk.attention == (r in kw["attn_resolutions"])
        assert f"{r}x{r}_block{kw['num_blocks']}" in m.dec
        assert (f"{r}x{r}_down" in m.enc) == (level > 0)


def test_resampling_convolutions_halve_and_double_the_resolution():
    from soflow_fast.models.unet import Conv2d

    x = torch.randn(2, 4, 8, 8)
    for taps in ([1, 1], [1, 3, 3, 1]):
        down = Conv2d(4, 6, 3, down=True, resample_filter=taps)
        up = Conv2d(4, 6, 3, up=True, resample_filter=taps)
        fused = Conv2d(4, 6, 3, down=True, resample_filter=taps, fused=True)
        assert down(x).shape == fused(x).shape == (2, 6, 4, 4) and up(x).shape == (2, 6, 16, 16)
        # a pure resampler (no kernel) keeps a constant image constant, away from the zero padding
        ones = torch.ones(1, 1, 8, 8)
        assert torch.allclose(Conv2d(1, 1, 0, up=True, resample_filter=taps)(ones)[..., 2:-2, 2:-2], torch.ones(1))
        assert torch.allclose(Conv2d(1, 1, 0, down=True, resample_filter=taps)(ones)[..., 1:-1, 1:-1], torch.ones(1))


def test_inputs_are_checked():
    m = SongUNet(img_resolution=8, channel_mult=[1], model_channels=8, num_blocks=1, attn_resolutions=[])
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with raises_naming(ValueError, "SongUNet", "y must be None"):
        m(x, t, t, torch.zeros(2, dtype=torch.long))
    with raises_naming(ValueError, "augment_labels", "(2, 6)", "(2, 5)"):
        m(x, t, t, augment_labels=torch.zeros(2, 5))
    with raises_naming(ValueError, "(B, 3, 8, 8)", "(2, 3, 16, 16)"):
        m(torch.randn(2, 3, 16, 16), t, t)
    with raises_naming(ValueError, "augment_dim=0", "augment_labels"):
        SongUNet(img_resolution=8, channel_mult=[1], model_channels=8, augment_dim=0)(x, t, t, None, torch.zeros(2, 6))
    with raises_naming(ValueError, "img_resolution=10", "2^2"):
        SongUNet(img_resolution=10, channel_mult=[1, 1, 1])
    with raises_naming(ValueError, "encoder_type", "'fancy'"):
        SongUNet(encoder_type="fancy")
    with raises_naming(ValueError, "label_dim", "got 10"):
        SongUNet(label_dim=10)


# ----------------------------------------------------------------------------------------------
# Dropout: the consistency target sees the grad pass's masks
# ----------------------------------------------------------------------------------------------


def tiny_unet(dropout=0.3, seed=0):
    torch.manual_seed(seed)
    m = SongUNet(
        img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=dropout
    )
    with torch.no_grad():  # random weights everywhere: the near-zero output layers would hide the masks
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.double()


def _draws(obj, x0, velocity_loss_ratio, gap):
    """Draws with the middle time at l = t + gap (s - t)."""
    d = obj.draw(x0, generator=torch.Generator().manual_seed(4))
    n_fm = int(velocity_loss_ratio * x0.shape[0])
    sl = slice(n_fm, None)
    d.n_fm = n_fm
    d.s = torch.cat([d.t[:n_fm], d.t[sl] * 0.3])
    d.l = torch.cat([d.t[:n_fm], d.t[sl] + gap * (d.s[sl] - d.t[sl])])
    return d


def _authors_consistency(obj, model, x0, d, kw):
    """The authors' consistency term with their RNG handling: the online pass, then the RNG put
    back, then the target pass (here over the batch the grad pass sees, rows [n_fm:] kept)."""
    n, sl = d.n_fm, slice(d.n_fm, None)
    x_t, v_t = obj.interpolate(x0, d.noise, d.t)
    x_l = x_t[sl] + v_t[sl] * (d.l[sl] - d.t[sl]).view(-1, 1, 1, 1)
    state = torch.get_rng_state()
    nn_t = model(x_t, d.t, d.s, **kw)
    torch.set_rng_state(state)
    with torch.no_grad():
        nn_l = model(torch.cat([x_t[:n], x_l]), torch.cat([d.t[:n], d.l[sl]]), d.s, **kw)[sl]
    f_t = x_t[sl] + (d.s[sl] - d.t[sl]).view(-1, 1, 1, 1) * nn_t[sl]
    f_l = x_l + (d.s[sl] - d.l[sl]).view(-1, 1, 1, 1) * nn_l
    dq = ((f_t - f_l) / (d.t[sl] - d.l[sl]).view(-1, 1, 1, 1)).flatten(1).detach()
    w = 1 / (dq.square().mean(1) + obj.config.eps) ** obj.config.p
    loss = (-(nn_t[sl].flatten(1) * dq * w[:, None]).mean(1)).mean()  # sign(b) = -1: s < t
    return loss, dq.square().mean()


@pytest.mark.parametrize("velocity_loss_ratio", [0.0, 0.5])
def test_dropout_masks_match_between_target_and_grad_pass(velocity_loss_ratio):
    model = tiny_unet()
    obj = SoFlowObjective(SoFlowConfig(cfg_scale=1.0, p=0.75, eps=1e-3, velocity_loss_ratio=velocity_loss_ratio))
    x0 = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    kw = {"augment_labels": torch.randn(6, 6, dtype=torch.float64)}
    d = _draws(obj, x0, velocity_loss_ratio, 1e-2)
    torch.manual_seed(11)
    _, logs = obj.loss_from_draws(model, x0, None, d, kw)
    torch.manual_seed(11)
    ref_loss, ref_mse = _authors_consistency(obj, model, x0, d, kw)
    assert_rel_close(logs["scm_loss"], ref_loss, 1e-10, "scm_loss")
    assert_rel_close(logs["scm_mse"], ref_mse, 1e-10, "scm_mse")
    if velocity_loss_ratio == 0:  # the component term (one consistency call, the authors' structure)
        torch.manual_seed(11)
        comp = obj.consistency_loss(model, x0, d.noise, d.t, d.l, d.s, model_kwargs=kw)
        assert_rel_close(comp[0], ref_loss, 1e-10, "consistency_loss")


def test_fresh_dropout_masks_blow_up_the_difference_quotient():
    """With the masks matched, mean dq^2 stays put as l -> t; with fresh masks it grows like 1/(t - l)^2."""
    model = tiny_unet()
    obj = SoFlowObjective(SoFlowConfig(cfg_scale=1.0, velocity_loss_ratio=0.5))
    x0 = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    kw = {"augment_labels": torch.randn(6, 6, dtype=torch.float64)}
    matched, fresh = [], []
    for gap in (1e-2, 1e-3):
        d = _draws(obj, x0, 0.5, gap)
        matched.append(obj.loss_from_draws(model, x0, None, d, kw)[1]["scm_mse"].item())
        sl = slice(d.n_fm, None)
        x_t, v_t = obj.interpolate(x0, d.noise, d.t)
        x_l = x_t[sl] + v_t[sl] * (d.l[sl] - d.t[sl]).view(-1, 1, 1, 1)
        with torch.no_grad():  # two passes, each with its own masks
            nn_t = model(x_t, d.t, d.s, **kw)[sl]
            nn_l = model(x_l, d.l[sl], d.s[sl], **rows_of(kw, sl))
        f_t = x_t[sl] + (d.s[sl] - d.t[sl]).view(-1, 1, 1, 1) * nn_t
        f_l = x_l + (d.s[sl] - d.l[sl]).view(-1, 1, 1, 1) * nn_l
        fresh.append(((f_t - f_l) / (d.t[sl] - d.l[sl]).view(-1, 1, 1, 1)).square().mean().item())
    assert 0.5 < matched[1] / matched[0] < 2, matched
    assert 50 < fresh[1] / fresh[0] < 200, fresh
    assert fresh[1] > 1000 * matched[1], (fresh, matched)


def test_per_block_compile_matches_eager():
    """The trainer's compile on CUDA (``parallelize(compile=True)``: each block compiled) runs the U-Net,
    whose blocks share one forward: with dynamic shapes the recompile of the second block failed in
    Inductor ("cannot determine truth value of Relational"); static shapes and room for every block.
    One resolution (five blocks: attention in three, a skip projection in two), compiled under a
    recompile limit of 2, which parallelize must raise."""
    from soflow_fast.models import UNetConfig
    from soflow_fast.parallel import parallelize

    torch.manual_seed(0)
    kw = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[32], dropout=0.0)
    eager, compiled = build_model("UNet", **kw), build_model("UNet", **kw)
    compiled.load_state_dict(eager.state_dict())
    x, t, a = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 6)
    outs = []
    with torch._dynamo.config.patch(recompile_limit=2):  # restored afterwards, with what parallelize set
        parallelize(
            compiled,
            UNetConfig,
            device=torch.device("cpu"),
            world_size=1,
            compile=True,
            fsdp=False,
            activation_checkpointing=False,
            param_dtype=torch.float32,
        )
        for model in (eager, compiled):
            out = model(x, t, t * 0.5, None, a)
            out.square().sum().backward()
            outs.append(out)
    assert_rel_close(outs[1], outs[0], 1e-4)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        assert_rel_close(grads[name].grad, p.grad, 1e-4, name)
