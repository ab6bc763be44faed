"""The comparison experiment: presets, samplers, the CLI's outputs (tiny budgets; the real runs are in docs/compare)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from soflow_fast import meanflow, objective
from soflow_fast.experiments import compare
from tests.utils import raises_naming


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
    with raises_naming(ValueError, "'spirals'", "checkerboard"):
        compare.build_task("spirals")
    with raises_naming(ValueError, "'ddpm'", "soflow, meanflow, fm"):
        compare.make_objective("ddpm", 10)
    with raises_naming(ValueError, "steps", "got 0"):
        compare.Budget(steps=0)


def test_cli_writes_json_markdown_and_chart(tmp_path, capsys):
    rc = compare.main(
        ["--data", "8gaussians", "--steps", "20", "--batch", "16", "--hidden", "16", "--layers", "1",
         "--eval-samples", "64", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "8gaussians.json").read_text())
    assert set(result["runs"]) == set(compare.METHODS)
    assert result["warmup_steps"] == 2  # the recipe's warm-up, a tenth of the steps, by default
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


_TINY = ["--data", "moons", "--steps", "1", "--batch", "8", "--hidden", "8", "--layers", "1", "--eval-samples", "16"]


# (flags, what the error line says): each names the flag and what it allows, where they used to
# end in a traceback (or, for an empty --methods, in a crash after the setup)
_BAD_FLAGS = [
    (["--soflow", "not_a_field=1"], r"--soflow: unknown key 'not_a_field'; valid keys: .*velocity_loss_ratio"),
    (["--soflow", "p=abc"], r"--soflow: p must be a number"),
    (["--soflow", "p=true"], r"--soflow: p must be a number"),
    (["--soflow", "l_schedule=3"], r"--soflow: l_schedule must be a string"),
    (["--soflow", "time_mean=0.5"], r"--soflow: time_mean must be a list of 3 numbers"),
    (["--soflow", "p"], r"--soflow: 'p' is not KEY=VALUE"),
    (["--soflow", "total_steps=5"], r"--soflow: total_steps cannot be overridden"),
    # a value of the right type that the config's own checks refuse
    (["--soflow", "p=-1"], r"--soflow: soflow.p must be finite and >= 0"),
    (["--soflow", "l_schedule=Bogus"], r"--soflow: soflow.l_schedule must be one of"),
    (["--soflow", "time_mean=[1, 2]"], r"--soflow: soflow.time_mean must be a list of 3 numbers"),
    (["--meanflow", "bogus=1"], r"--meanflow: unknown key 'bogus'; valid keys: .*kappa"),
    (["--meanflow", "kappa=1"], r"--meanflow: meanflow.kappa must be in \[0, 1\)"),
    (["--steps", "0"], r"argument --total_steps: must be a positive integer, got '0'"),
    (["--batch", "-1"], r"argument --batch_size: must be a positive integer"),
    (["--threads", "0"], r"argument --threads: must be a positive integer"),
    (["--eval-samples", "0"], r"argument --eval_samples: must be a positive integer"),
    (["--hidden", "2.5"], r"argument --hidden_size: must be a positive integer"),
    (["--layers", "-1"], r"argument --num_layers: must be an integer >= 0"),
    (["--lr", "nan"], r"argument --lr: must be a finite number > 0"),
    (["--methods", "soflow,ddpm"], r"--methods: unknown method\(s\) ddpm; choose from soflow, meanflow, fm"),
    (["--methods", ","], r"--methods: give at least one of"),
    (["--warmup_steps", "-1"], r"argument --warmup_steps: must be an integer >= 0"),
    (["--warmup_steps", "1"], r"--warmup_steps: must be less than --total_steps \(1\), got 1"),
]


@pytest.mark.parametrize("args, message", _BAD_FLAGS, ids=[" ".join(args) for args, _ in _BAD_FLAGS])
def test_cli_bad_flags_are_one_error_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main([*_TINY, "--out", str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert ": error: " in err[-1], err  # argparse's one line, not a traceback
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_out_that_is_a_file_is_an_error(tmp_path, capsys):
    existing = tmp_path / "results"
    existing.write_text("not a directory")
    for out in (existing, existing / "sub"):
        with pytest.raises(SystemExit) as exc:
            compare.main([*_TINY, "--out", str(out)])
        assert exc.value.code == 2
        assert "--out: " in capsys.readouterr().err.strip().splitlines()[-1]
    assert existing.read_text() == "not a directory"


@pytest.mark.parametrize(
    "args, flag",
    [(["--methods", "soflow"], "--methods"), (["--meanflow", "p=0.3"], "--meanflow"), (["--meanflow"], "--meanflow")],
)
def test_cli_ablation_refuses_other_methods(args, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main([*_TINY, "--ablation", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    assert f"{flag} does not apply to --ablation: the ablation trains SoFlow only" in capsys.readouterr().err


def test_ablation_rows_change_one_field_of_the_base():
    base = {"velocity_loss_ratio": 0.5, "p": 0.3}
    rows = compare.ablation_rows(base)
    assert [label for label, _, _ in rows] == [f"{k}={v}" for k, v in compare.ABLATION]
    for (key, value), (_, overrides, is_base) in zip(compare.ABLATION, rows, strict=True):
        assert overrides == {**base, key: value}
        assert is_base == (value == {**dataclasses.asdict(objective.PRESETS["toy"]), **base}[key])
    assert [label for label, _, is_base in rows if is_base] == [
        "velocity_loss_ratio=0.5", "l_schedule=Exponent", "coefficient_type=Euler"
    ]  # fmt: skip
    assert compare.ablation_rows() == compare.ablation_rows({})  # the preset itself by default
    # a base that makes one row invalid is refused before any training
    with raises_naming(ValueError, "l_schedule=Exponent", "soflow.l_init_ratio"):
        compare.ablation_rows({"l_schedule": "Linear", "l_init_ratio": 0.0})


def test_cli_ablation_uses_soflow_overrides_as_its_base(tmp_path, capsys, monkeypatch):
    used = []
    make_objective = compare.make_objective

    def spy(method, steps, soflow_overrides=None, meanflow_overrides=None):
        obj = make_objective(method, steps, soflow_overrides, meanflow_overrides)
        used.append((method, obj.config))
        return obj

    monkeypatch.setattr(compare, "make_objective", spy)
    rc = compare.main([*_TINY, "--ablation", "--out", str(tmp_path), "--soflow", "p=0.3", "velocity_loss_ratio=0.5"])
    assert rc == 0
    result = json.loads((tmp_path / "moons_ablation.json").read_text())
    assert result["soflow_overrides"] == {"p": 0.3, "velocity_loss_ratio": 0.5}
    assert result["base"]["p"] == 0.3 and result["base"]["total_steps"] == 1
    # every row trained SoFlow on the base with its own field changed; the base's rows are one run
    assert {m for m, _ in used} == {"soflow"} and all(cfg.p == 0.3 for _, cfg in used)
    assert len(used) == len(compare.ABLATION) - 2
    assert [label for label, run in result["runs"].items() if run["preset"]] == [
        "velocity_loss_ratio=0.5", "l_schedule=Exponent", "coefficient_type=Euler"
    ]  # fmt: skip
    assert [cfg.velocity_loss_ratio for _, cfg in used][5:] == [0.5] * (len(used) - 5)
    md = (tmp_path / "moons_ablation.md").read_text()
    assert "`objective.PRESETS['toy']` with `p=0.3`, `velocity_loss_ratio=0.5`" in md
    assert "velocity_loss_ratio=0.5 * |" in md


def test_run_ablation_without_overrides_keeps_its_old_call():
    budget = compare.Budget(steps=1, batch=8, hidden=8, layers=1, eval_samples=16)
    result = compare.run_ablation("moons", budget, 0)
    assert result["soflow_overrides"] == {} and result["base"]["p"] == objective.PRESETS["toy"].p
    assert "from `objective.PRESETS['toy']` per row" in compare.ablation_markdown(result)
