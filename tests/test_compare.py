"""The comparison experiment: presets, samplers, the CLI's outputs (tiny budgets; the real runs are in docs/compare)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from soflow_fast import meanflow, objective
from soflow_fast.experiments import compare


def test_toy_presets_exist_and_are_valid():
    sf, mf = objective.PRESETS["toy"], meanflow.PRESETS["toy"]
    assert isinstance(sf, objective.SoFlowConfig) and isinstance(mf, meanflow.MeanFlowConfig)
    assert sf.cfg_scale <= 1  # continuous conditions: no guidance
    assert objective.PRESETS["imagenet"] == objective.SoFlowConfig()
    # re-validating a copy raises nothing
    dataclasses.replace(sf)
    dataclasses.replace(mf)


class _ConstantVelocity(nn.Module):
    """F(x, t, s) = -c for every input: under the Euler parameterisation v = F, so x moves by -c per unit time."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, s, y=None):
        return torch.full_like(x, -self.c)


@pytest.mark.parametrize("nfe", [1, 2, 10])
def test_fm_euler_sampler_integrates_from_noise_to_data(nfe):
    obj = compare.make_objective("fm", 10)
    noise = torch.randn(5, 2)
    out = compare.generate("fm", _ConstantVelocity(0.5), obj, noise, None, nfe, None)
    # d x / d t = v = F = -0.5, integrated from t = 1 down to 0: x0 = noise + 0.5
    torch.testing.assert_close(out, noise + 0.5)


def test_fm_objective_is_plain_flow_matching():
    obj = compare.make_objective("fm", 10)
    assert obj.config.velocity_loss_ratio == 1.0 and obj.config.p == 0.0


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown data"):
        compare.build_task("spirals")
    with pytest.raises(ValueError, match="unknown method"):
        compare.make_objective("ddpm", 10)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        compare.Budget(steps=0)


def test_cli_writes_json_markdown_and_chart(tmp_path, capsys):
    rc = compare.main(
        ["--data", "8gaussians", "--steps", "3", "--batch", "16", "--hidden", "16", "--layers", "1",
         "--eval-samples", "64", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "8gaussians.json").read_text())
    assert set(result["runs"]) == set(compare.METHODS)
    for method, nfes in compare.EVAL_NFE.items():
        assert list(result["runs"][method]["scores"]) == [str(n) for n in nfes]
        for scores in result["runs"][method]["scores"].values():
            assert all(v == v for v in (scores["energy"], scores["sw2"], scores["mmd"]))  # no NaN
    assert (tmp_path / "8gaussians.png").stat().st_size > 1000
    assert "| soflow | 1 |" in (tmp_path / "8gaussians.md").read_text()
    assert "Headline" in capsys.readouterr().out


def test_actions_scores_report_mode_coverage(tmp_path):
    budget = compare.Budget(steps=2, batch=16, hidden=16, layers=1, eval_samples=64)
    result, _, _ = compare.run_compare("actions", budget, methods=("soflow",), log_every=0)
    scores = result["runs"]["soflow"]["scores"]["1"]
    assert 0.0 <= scores["off_mode"] <= 1.0 and len(scores["mode_fractions"]) == 2
    # an untrained network returns its noise: nearly every chunk is off every mode
    assert result["noise"]["off_mode"] > 0.9


def test_ablation_rows(tmp_path):
    budget = compare.Budget(steps=2, batch=16, hidden=16, layers=1, eval_samples=64)
    result = compare.run_ablation("moons", budget)
    assert len(result["runs"]) == len(compare.ABLATION)
    assert sum(run["preset"] for run in result["runs"].values()) == 3  # one per group is the preset's own value
    md = compare.ablation_markdown(result)
    preset = objective.PRESETS["toy"]
    assert f"velocity_loss_ratio={preset.velocity_loss_ratio} *" in md and "coefficient_type=Trig |" in md
