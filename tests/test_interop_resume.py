"""Continuing the authors' training runs from their ckpts/<step>.pt (soflow_fast.interop).

Each test writes an "authors' checkpoint" the way their train.py does: a Soflow-like module holding
the network as ``.network`` (their DiT's ``pos_embed`` is a frozen nn.Parameter, so it is the first
entry of ``network.parameters()`` and of their optimizer's indices), AdamW or RAdam over
``network.parameters()``, an EMA copy of the whole module, and
``torch.save({'model', 'ema_model', 'optimizer', 'finished_steps', 'finished_epochs'})``. After
loading into a fresh model, optimizer and ``EMA``, one more step must equal one more step of their run.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from soflow_fast.ema import EMA
from soflow_fast.interop import load_official_training_state, official_param_order, optimizer_kind
from soflow_fast.models import DiT, SongUNet
from tests.utils import leave_worker, raises_naming

HP = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)  # their train.py: lr, betas, weight_decay
DECAY = 0.9  # large steps, so a wrong EMA shows
WORLD = 2


def tiny_dit(seed: int, hidden: int = 32, depth: int = 2) -> DiT:
    torch.manual_seed(seed)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth, num_heads=4, num_classes=10)


def tiny_unet(seed: int) -> SongUNet:
    # augment_dim 6 (their CIFAR-10 setting) with no augment labels: map_augment never gets a gradient,
    # so their optimizer holds no state for it
    torch.manual_seed(seed)
    return SongUNet(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                    dropout=0.0)  # fmt: skip


class AuthorsSoflow(nn.Module):
    """Their models.Soflow as far as state goes: a Scheduler (no tensors) and the network."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.scheduler = nn.Module()
        self.network = network


def authors_module(network: nn.Module) -> AuthorsSoflow:
    with torch.no_grad():  # random weights everywhere: adaLN-zero would leave most gradients zero
        for p in network.parameters():
            p.normal_(0, 0.2)
    if "pos_embed" in network._buffers:  # their dit.py: nn.Parameter(..., requires_grad=False)
        network.pos_embed = nn.Parameter(network._buffers.pop("pos_embed"), requires_grad=False)
    return AuthorsSoflow(network)


def loss(net: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    c = 4 if isinstance(net, DiT) else 3
    x = torch.randn(4, c, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    s = t * torch.rand(4, generator=g)
    y = torch.randint(0, 10, (4,), generator=g) if isinstance(net, DiT) else None
    target = torch.randn(x.shape, generator=g)
    return (net(x, t, s, y) - target).square().mean()


def authors_step(model: AuthorsSoflow, ema_model: AuthorsSoflow, optimizer, step: int) -> None:
    """Their train.py: loss, backward, step, then the EMA over all of Soflow's parameters and buffers."""
    optimizer.zero_grad()
    loss(model.network, step).backward()
    optimizer.step()
    with torch.inference_mode():
        for e, p in zip(ema_model.parameters(), model.parameters(), strict=True):
            e.mul_(DECAY).add_(p, alpha=1 - DECAY)
        for e, b in zip(ema_model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def authors_run(network: nn.Module, opt_cls, steps: int, path: Path):
    model = authors_module(network)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = opt_cls(model.network.parameters(), **HP)
    for k in range(steps):
        authors_step(model, ema_model, optimizer, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "ema_model": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
                "finished_steps": steps, "finished_epochs": 1}, path)  # fmt: skip
    return model, ema_model, optimizer


def ours(network: nn.Module, opt_cls):
    return network, opt_cls(network.parameters(), foreach=True, **HP), EMA(network, decays=DECAY)


def assert_loaded(model, optimizer, ema, theirs, their_ema, their_opt):
    their_net = theirs.network
    for k, v in their_net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ema_net = their_ema.network.state_dict()
    for k, v in ema.shadow().items():
        assert torch.equal(v, ema_net[k]), k
    for k, v in ema.buffers.items():
        assert torch.equal(v, ema_net[k]), k
    params = dict(model.named_parameters())
    for name, p in their_net.named_parameters():
        if p not in their_opt.state:  # pos_embed (a buffer here), or no gradient yet
            assert name not in params or params[name] not in optimizer.state, name
            continue
        for key, value in their_opt.state[p].items():
            assert torch.equal(optimizer.state[params[name]][key], value), (name, key)


def continue_both(model, optimizer, ema, theirs, their_ema, their_opt, step):
    authors_step(theirs, their_ema, their_opt, step)
    loss(model, step).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model)
    ema_net = their_ema.network.state_dict()
    for k, v in theirs.network.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for k, v in ema.shadow().items():
        torch.testing.assert_close(v, ema_net[k], rtol=1e-5, atol=1e-6, msg=f"EMA {k}")


@pytest.mark.parametrize("opt_cls,steps", [(torch.optim.AdamW, 3), (torch.optim.RAdam, 6)])
def test_dit_continues_their_run(tmp_path, opt_cls, steps):
    path = tmp_path / "ckpts" / f"{steps}.pt"
    theirs, their_ema, their_opt = authors_run(tiny_dit(1), opt_cls, steps, path)
    ckpt = torch.load(path, weights_only=True)
    names = [n for n, _ in tiny_dit(0).named_parameters()]
    assert official_param_order(ckpt["model"], names, ckpt["optimizer"]) == [
        n for n, _ in theirs.network.named_parameters()
    ]

    model, optimizer, ema = ours(tiny_dit(2), opt_cls)
    got = load_official_training_state(path, model, optimizer, ema)
    assert (got.finished_steps, got.finished_epochs) == (steps, 1)
    assert got.optimizer == opt_cls.__name__ and not got.differing_hyperparameters
    assert_loaded(model, optimizer, ema, theirs, their_ema, their_opt)
    assert ema.num_updates == steps
    assert all(optimizer.state[p]["step"].item() == steps for p in model.parameters())

    # a fresh optimizer would step differently: the comparison below tells loaded moments apart
    fresh = tiny_dit(2)
    fresh.load_state_dict(model.state_dict())
    fresh_opt = opt_cls(fresh.parameters(), **HP)
    loss(fresh, steps).backward()
    fresh_opt.step()
    continue_both(model, optimizer, ema, theirs, their_ema, their_opt, steps)
    w = "blocks.0.attn.qkv.weight"
    assert (fresh.state_dict()[w] - model.state_dict()[w]).abs().max() > 1e-4


def test_unet_radam_continues_their_run(tmp_path):
    path = tmp_path / "6.pt"
    theirs, their_ema, their_opt = authors_run(tiny_unet(1), torch.optim.RAdam, 6, path)
    assert theirs.network.map_augment.weight not in their_opt.state
    model, optimizer, ema = ours(tiny_unet(2), torch.optim.RAdam)
    assert load_official_training_state(path, model, optimizer, ema).finished_steps == 6
    assert_loaded(model, optimizer, ema, theirs, their_ema, their_opt)
    assert model.map_augment.weight not in optimizer.state  # as in theirs: no state until a gradient
    assert any("resample_filter" in k for k in ema.buffers)
    continue_both(model, optimizer, ema, theirs, their_ema, their_opt, 6)


@pytest.fixture(scope="module")
def adamw_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "3.pt"
    authors_run(tiny_dit(1), torch.optim.AdamW, 3, path)
    return path


def test_their_hyperparameters_are_reported_ours_kept(adamw_ckpt):
    model, _, ema = ours(tiny_dit(2), torch.optim.AdamW)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.01)
    with pytest.warns(UserWarning, match=r"lr 0.001 \(theirs\) -> 0.002"):
        got = load_official_training_state(adamw_ckpt, model, optimizer, ema)
    assert got.differing_hyperparameters == {"lr": (1e-3, 2e-3)}
    assert got.their_hyperparameters["lr"] == 1e-3 and optimizer.param_groups[0]["lr"] == 2e-3


def test_configured_lr_under_a_scheduler_is_compared(adamw_ckpt):
    model, optimizer, ema = ours(tiny_dit(2), torch.optim.AdamW)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.1)  # group lr 1e-4, initial_lr 1e-3 (theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_official_training_state(adamw_ckpt, model, optimizer, ema)
    assert not got.differing_hyperparameters and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_dict_source_is_neither_changed_nor_aliased(adamw_ckpt):
    ckpt = torch.load(adamw_ckpt, weights_only=True)
    before = copy.deepcopy(ckpt)
    model, optimizer, ema = ours(tiny_dit(2), torch.optim.AdamW)
    load_official_training_state(ckpt, model, optimizer, ema)
    loss(model, 3).backward()
    optimizer.step()
    ema.update(model)
    for part in ("model", "ema_model"):
        assert all(torch.equal(v, before[part][k]) for k, v in ckpt[part].items()), part
    for i, entry in ckpt["optimizer"]["state"].items():
        assert all(torch.equal(v, before["optimizer"]["state"][i][k]) for k, v in entry.items()), i


def test_optimizer_kind_from_saved_groups():
    def saved(cls, drop=()):
        p = nn.Parameter(torch.ones(2))
        opt = cls([p])
        p.grad = torch.ones(2)
        opt.step()
        sd = opt.state_dict()
        return {k: v for k, v in sd["param_groups"][0].items() if k not in drop}, sd["state"][0]

    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RAdam, torch.optim.NAdam):
        assert optimizer_kind(*saved(cls)) == cls.__name__
    # torch versions that saved no decoupled_weight_decay
    assert optimizer_kind(*saved(torch.optim.AdamW, drop=("decoupled_weight_decay",))) == "Adam or AdamW"
    group, state = saved(torch.optim.RAdam, drop=("decoupled_weight_decay",))
    assert (optimizer_kind(group, state), optimizer_kind(group)) == ("RAdam", "unknown")
    assert optimizer_kind(*saved(torch.optim.Adamax)) == "unknown"


def test_other_optimizer_type_is_refused_unless_allowed(tmp_path, adamw_ckpt):
    path = tmp_path / "6.pt"
    theirs, their_ema, their_opt = authors_run(tiny_dit(1), torch.optim.RAdam, 6, path)
    model, optimizer, ema = ours(tiny_dit(2), torch.optim.AdamW)
    with raises_naming(ValueError, str(path), "RAdam", "AdamW", "allow_optimizer_change=True"):
        load_official_training_state(path, model, optimizer, ema)
    assert not optimizer.state and not torch.equal(
        model.final_layer.linear.weight, theirs.network.final_layer.linear.weight
    )
    with pytest.warns(RuntimeWarning, match="RAdam state"):
        load_official_training_state(path, model, optimizer, ema, allow_optimizer_change=True)
    assert_loaded(model, optimizer, ema, theirs, their_ema, their_opt)
    model, optimizer, ema = ours(tiny_dit(2), torch.optim.RAdam)
    with raises_naming(ValueError, str(adamw_ckpt), "AdamW", "RAdam", "allow_optimizer_change=True"):
        load_official_training_state(adamw_ckpt, model, optimizer, ema)


def test_wrong_model_is_one_clear_error(adamw_ckpt):
    for model, names in (  # the key, and what is wrong with it
        (tiny_dit(2, hidden=48), ("'pos_embed'", "(1, 16, 32)", "(1, 16, 48)")),
        (tiny_dit(2, depth=1), ("unexpected", "'blocks.1.")),
        (tiny_dit(2, depth=3), ("missing", "'blocks.2.")),
    ):
        model, optimizer, ema = ours(model, torch.optim.AdamW)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with raises_naming((KeyError, ValueError), str(adamw_ckpt), *names):
            load_official_training_state(adamw_ckpt, model, optimizer, ema)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "loaded before failing"


def test_optimizer_that_does_not_match_its_model_is_one_clear_error(adamw_ckpt):
    ckpt = torch.load(adamw_ckpt, weights_only=True)
    ckpt["optimizer"]["param_groups"][0]["params"].pop()
    model, optimizer, ema = ours(tiny_dit(2), torch.optim.AdamW)
    with raises_naming(ValueError, "35 parameters", "36 parameters"):
        load_official_training_state(ckpt, model, optimizer, ema)
    ckpt = torch.load(adamw_ckpt, weights_only=True)
    ckpt["optimizer"]["state"][2]["exp_avg"] = torch.zeros(3)
    with raises_naming(ValueError, "'exp_avg'", "'x_embedder.proj.bias'", "(3,)", "(32,)"):
        load_official_training_state(ckpt, model, optimizer, ema)
    assert not optimizer.state


def test_file_weights_only_cannot_read_says_why(tmp_path, adamw_ckpt):
    ckpt = torch.load(adamw_ckpt, weights_only=True)
    ckpt["args"] = argparse.Namespace(lr=1e-3)  # a Python object weights_only does not unpickle
    torch.save(ckpt, tmp_path / "odd.pt")
    model, optimizer, ema = ours(tiny_dit(2), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused it .*weights_only=False"):
        load_official_training_state(tmp_path / "odd.pt", model, optimizer, ema)


# ---------------------------------------------------------------------------------------- FSDP2, 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, ckpt_path: str, ref_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.tensor import DTensor

        from soflow_fast.models import DiTConfig
        from soflow_fast.parallel import parallelize

        model = tiny_dit(2)
        parallelize(model, DiTConfig, device=torch.device("cpu"), world_size=WORLD, compile=False, fsdp=True,
                    activation_checkpointing=False, param_dtype=torch.float32)  # fmt: skip
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), foreach=True, **HP)
        ema = EMA(model, decays=DECAY)
        got = load_official_training_state(ckpt_path, model, optimizer, ema)
        assert got.finished_steps == 3

        ref = torch.load(ref_path, weights_only=True)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.full_tensor(), ref["loaded"][name], rtol=0, atol=0, msg=name)
            for key in ("exp_avg", "exp_avg_sq"):
                got_state = optimizer.state[p][key]
                assert isinstance(got_state, DTensor), (name, key)
                assert torch.equal(got_state.full_tensor(), ref["moments"][name][key]), (name, key)
            assert optimizer.state[p]["step"].item() == 3, name
            assert torch.equal(ema.shadow()[name].full_tensor(), ref["ema_loaded"][name]), name
        assert torch.equal(model.pos_embed, ref["loaded"]["pos_embed"])

        loss(model, 3).backward()  # every rank the same batch: the averaged gradient is the full one
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.full_tensor(), ref["next"][name], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(
                ema.shadow()[name].full_tensor(), ref["ema_next"][name], rtol=1e-5, atol=1e-6, msg=f"EMA {name}"
            )
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_fsdp2_two_ranks_continue_their_run(tmp_path):
    ckpt_path = tmp_path / "ckpts" / "3.pt"
    theirs, their_ema, their_opt = authors_run(tiny_dit(1), torch.optim.AdamW, 3, ckpt_path)
    net = theirs.network
    ref = {
        "loaded": {k: v.clone() for k, v in net.state_dict().items()},
        "ema_loaded": {k: v.clone() for k, v in their_ema.network.state_dict().items()},
        "moments": {
            n: {k: their_opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
            for n, p in net.named_parameters()
            if p.requires_grad
        },  # fmt: skip
    }
    authors_step(theirs, their_ema, their_opt, 3)
    ref["next"] = {k: v.clone() for k, v in net.state_dict().items()}
    ref["ema_next"] = {k: v.clone() for k, v in their_ema.network.state_dict().items()}
    torch.save(ref, tmp_path / "ref.pt")
    mp.spawn(_worker, args=(_free_port(), str(ckpt_path), str(tmp_path / "ref.pt")), nprocs=WORLD, join=True)
