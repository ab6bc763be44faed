"""The reference path against values produced by the authors' own SoFlow code."""

from __future__ import annotations

import pytest
import torch

from soflow_fast.interop import load_official_state_dict
from soflow_fast.models import DiT
from soflow_fast.objective import SoFlowConfig, SoFlowObjective
from soflow_fast.sampling import sample
from tests.utils import assert_rel_close, check_loss_and_grads, golden_objective_config

RTOL = 1e-5


@pytest.fixture(scope="module")
def case(golden):
    meta = golden["meta"]
    net = meta["net"]
    model = DiT(
        input_size=net["input_size"],
        patch_size=net["patch_size"],
        in_channels=net["in_channels"],
        hidden_size=net["hidden_size"],
        depth=net["depth"],
        num_heads=net["num_heads"],
        mlp_ratio=net["mlp_ratio"],
        num_classes=net["num_classes"],
        class_dropout_prob=net["class_dropout_prob"],
    )
    load_official_state_dict(model, {k[3:]: v for k, v in golden.items() if k.startswith("sd/")})
    cfg = golden_objective_config(meta)
    labels = golden["in/labels"] if meta["labels"] else None
    return model, SoFlowObjective(cfg, num_classes=net["num_classes"]), labels


def test_network_solution_velocity(golden, case):
    model, obj, y = case
    x, t, s = golden["in/net_x"], golden["in/net_t"], golden["in/net_s"]
    with torch.no_grad():
        assert_rel_close(model(x, t, s, y), golden["out/network"], RTOL, "network")
        assert_rel_close(obj.solution(model, x, t, s, y), golden["out/solution"], RTOL, "solution")
        assert_rel_close(obj.velocity(model, x, t, y), golden["out/velocity"], RTOL, "velocity")


def test_velocity_loss_and_grads(golden, case):
    model, obj, y = case
    out = obj.velocity_loss(model, golden["in/x0"], golden["in/eps_fm"], golden["in/t_fm"], y, golden["in/cfg_mask"])
    check_loss_and_grads(golden, model, out, "fm", RTOL)


def test_consistency_loss_and_grads(golden, case):
    model, obj, y = case
    out = obj.consistency_loss(
        model,
        golden["in/x0"],
        golden["in/eps_scm"],
        golden["in/t_scm"],
        golden["in/l_scm"],
        golden["in/s_scm"],
        y,
        golden["in/cfg_mask"],
    )
    check_loss_and_grads(golden, model, out, "scm", RTOL)


def test_middle_time_matches_authors_l(golden, case):
    """in/l_scm is the authors' Exponent l at k=1000 of K=4000, clamped to t - 1e-4."""
    _, obj, _ = case
    spec = golden["meta"]["l_scm"]
    o = SoFlowObjective(
        SoFlowConfig(
            l_schedule=spec["method"],
            l_init_ratio=spec["init_ratio"],
            l_end_ratio=spec["end_ratio"],
            total_steps=spec["K"],
        )
    )
    t, s = golden["in/t_scm"], golden["in/s_scm"]
    l = torch.minimum(o.middle_time(t, s, spec["k"]), t - 1e-4)
    assert_rel_close(l, golden["in/l_scm"], RTOL, "l_scm")


@pytest.mark.parametrize("schedule", ["Const", "Linear", "Cosine", "Exponent"])
def test_l_schedules(golden, schedule):
    sch = golden["meta"]["schedule"]
    o = SoFlowObjective(
        SoFlowConfig(
            l_schedule=schedule,
            l_init_ratio=sch["init_ratio"],
            l_end_ratio=sch["end_ratio"],
            total_steps=sch["K"],
        )
    )
    got = torch.stack([o.middle_time(torch.ones(()), torch.zeros(()), k) for k in sch["k"]])
    assert_rel_close(got, golden[f"out/schedule_{schedule}"], RTOL, f"schedule_{schedule}")


def test_one_and_two_step_samples(golden, case):
    model, obj, y = case
    noise = golden["in/sample_noise"]
    assert_rel_close(sample(model, obj, noise, y, steps=1), golden["out/sample_1"], RTOL, "sample_1")
    two = sample(model, obj, noise, y, steps=2, renoise=[golden["in/sample_renoise"]])
    assert_rel_close(two, golden["out/sample_2"], RTOL, "sample_2")
