"""The recipe search: runs every cell of a stage once, resumes where it stopped, ranks by mean rank."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from soflow_fast import objective
from soflow_fast.experiments import search

REPO = Path(__file__).resolve().parents[1]


def _protocol(tmp_path: Path) -> Path:
    p = json.loads((REPO / "docs" / "compare" / "recipe" / "protocol.json").read_text())
    p.update(steps=8, data=["moons", "actions"], seeds=[0, 1, 2], eval_samples=200)
    p["stages"] = {"t": {"networks": [{"hidden_size": 8, "num_layers": 1}], "variants": ["toy-preset", "t1-long-l"]}}
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(p))
    return path


def test_a_stage_runs_each_cell_once_and_resumes(tmp_path, monkeypatch):
    path = _protocol(tmp_path)
    base = json.loads(path.read_text())["objective_base"]
    # the protocol holds its base by value: a later change of the preset does not reach its runs
    monkeypatch.setitem(objective.PRESETS, "toy", dataclasses.replace(objective.PRESETS["toy"], p=0.0, eps=1.0))
    assert search.main(["--protocol", str(path), "--stage", "t"]) == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 3  # variants x data x seeds
    first = json.loads(lines[0])
    assert first["settings"]["objective"] == {} and first["relative"] == first["score"] / first["noise"]
    assert first["objective_config"] == {**base, "total_steps": 8}  # every value, as trained
    long_l = next(json.loads(x) for x in lines if json.loads(x)["variant"] == "t1-long-l")
    assert (
        long_l["settings"]["objective"]["l_init_ratio"] == 0.5
        and long_l["settings"]["objective"]["scm_times"] == "uniform"
    )
    assert search.main(["--protocol", str(path), "--stage", "t", "--summary", "t"]) == 0  # nothing left to run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 12
    summary = json.loads((tmp_path / "summary_t.json").read_text())
    assert set(summary["order"]) == {"toy-preset", "t1-long-l"} and all(
        n == 2 for n in summary["columns_ranked"].values()
    )
    assert all(cell["seeds"] == 3 for cell in summary["cells"].values())
    report = (tmp_path / "summary_t.md").read_text()
    cell = summary["cells"]['toy-preset|moons|{"hidden_size": 8, "num_layers": 1}']
    assert f"{cell['mean']:.3f} ± {cell['std']:.3f}" in report and "| t1-long-l |" in report


def test_a_stage_with_curves_scores_each_sampler_at_each_nfe_and_ranks_within_its_stage(tmp_path):
    """A stage's ``curves`` add the score relative to the noise's at each NFE of each sampler of the
    run's method; at the primary NFE it equals the primary score. Each stage's summary ranks its own runs."""
    path = _protocol(tmp_path)
    p = json.loads(path.read_text())
    p.update(data=["moons"], seeds=[0])
    p["stages"]["t"]["data"] = ["moons", "grid25"]  # a stage's own data sets
    curves = {"soflow": {"renoise": [1, 2], "chained": [1, 2]}, "fm": {"euler": [1, 50]}}
    p["stages"]["c"] = {
        "networks": [{"hidden_size": 8, "num_layers": 1}],
        "variants": ["t1-long-l", "fm-50"],
        "curves": curves,
    }
    path.write_text(json.dumps(p))
    assert search.main(["--protocol", str(path), "--stage", "t"]) == 0
    assert search.main(["--protocol", str(path), "--stage", "c", "--summary=c"]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_stage = {stage: [r for r in records if r["stage"] == stage] for stage in ("t", "c")}
    assert len(by_stage["t"]) == 4 and all("curve" not in r for r in by_stage["t"])
    assert {r["data"] for r in by_stage["t"]} == {"moons", "grid25"} and {r["data"] for r in by_stage["c"]} == {"moons"}
    soflow, fm = sorted(by_stage["c"], key=lambda r: r["variant"] != "t1-long-l")
    assert set(soflow["curve"]) == {"renoise", "chained"} and set(fm["curve"]) == {"euler"}
    assert soflow["curve"]["renoise"]["1"] == soflow["curve"]["chained"]["1"] == soflow["relative"]
    assert soflow["curve"]["renoise"]["2"] != soflow["curve"]["chained"]["2"]  # the two samplers differ from 2 NFE
    assert fm["curve"]["euler"]["50"] == fm["relative"] and fm["curve"]["euler"]["1"] != fm["relative"]
    assert set(json.loads((tmp_path / "summary_c.json").read_text())["order"]) == {"t1-long-l", "fm-50"}
    assert (tmp_path / "summary_c_curves.png").stat().st_size > 0 and not (tmp_path / "summary_t_curves.png").exists()
    assert search.main(["--protocol", str(path), "--summary=t,c"]) == 0  # both stages' runs
    both = json.loads((tmp_path / "summary_t+c.json").read_text())
    assert set(both["order"]) == {"toy-preset", "t1-long-l", "fm-50"}
    assert both["cells"]['t1-long-l|moons|{"hidden_size": 8, "num_layers": 1}']["seeds"] == 1  # ran in both: once


def test_shards_share_a_stage_and_each_run_is_done_once(tmp_path):
    path = _protocol(tmp_path)
    for k in (0, 1, 2):
        assert search.main(["--protocol", str(path), "--stage", "t", "--shard", f"{k}/3"]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len({search._key(r) for r in records}) == 12


def test_a_teacher_variant_trains_its_teacher_within_the_steps_then_a_warm_started_student(tmp_path, monkeypatch):
    """Method teacher: an FM teacher for teacher_share of the steps, then the student (the teacher in its
    objective, K Heun steps) for the rest, from the teacher's weights; the record scores both."""
    from soflow_fast.experiments import training

    path = _protocol(tmp_path)
    p = json.loads(path.read_text())
    p.update(data=["moons"], seeds=[0])
    p["variants"].append(
        {"name": "teach", "changes": {"method": "teacher", "teacher_share": 0.25, "teacher_steps": 2}, "why": "test"}
    )
    p["stages"] = {"k": {"networks": [{"hidden_size": 8, "num_layers": 1}], "variants": ["teach"]}}
    path.write_text(json.dumps(p))
    calls = []
    train = training.train

    def watched(method, task, budget, obj, **kw):
        calls.append((method, budget.steps, getattr(obj, "teacher", None), kw.get("init")))
        return train(method, task, budget, obj, **kw)

    monkeypatch.setattr(search, "train", watched)
    assert search.main(["--protocol", str(path), "--stage", "k"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    (m1, steps1, teacher1, init1), (m2, steps2, teacher2, init2) = calls
    assert (m1, steps1, teacher1, init1) == ("fm", 2, None, None) and (m2, steps2) == ("soflow", 6)
    assert teacher2 is init2 and teacher2 is not None  # the student's teacher is the network it starts from
    assert record["settings"]["objective"]["teacher_steps"] == 2 and record["teacher"]["steps"] == 2
    assert record["teacher"]["fm50_relative"] > 0 and record["relative"] == record["score"] / record["noise"]
    # the summary counts the teacher's training in the run's cost and reports the teacher's own score
    assert search.main(["--protocol", str(path), "--summary", "k"]) == 0
    summary = json.loads((tmp_path / "summary_k.json").read_text())
    network = '{"hidden_size": 8, "num_layers": 1}'
    spent = record["train_seconds"] + record["teacher"]["train_seconds"]
    assert summary["train_seconds"][f"teach|{network}"] == round(spent, 1)
    assert summary["teachers"][f"teach|moons|{network}"]["mean"] == record["teacher"]["fm50_relative"]
    assert "The teachers' own scores" in (tmp_path / "summary_k.md").read_text()


def test_a_grid_stage_reports_its_variants_by_the_two_settings(tmp_path):
    path = _protocol(tmp_path)
    p = json.loads(path.read_text())
    p.update(data=["moons"], seeds=[0])
    names = ["l-0.005-0.001", "l-0.005-0.1", "l-0.5-0.001", "l-0.5-0.1"]
    p["stages"] = {
        "g": {
            "networks": [{"hidden_size": 8, "num_layers": 1}],
            "variants": names,
            "grid": ["l_init_ratio", "l_end_ratio"],
        }
    }
    path.write_text(json.dumps(p))
    assert search.main(["--protocol", str(path), "--stage", "g", "--summary", "g"]) == 0
    summary = json.loads((tmp_path / "summary_g.json").read_text())
    report = (tmp_path / "summary_g.md").read_text()
    table = report[report.index("## The grid") :].splitlines()
    network = '{"hidden_size": 8, "num_layers": 1}'
    assert f"moons, {network}:" in table and "| l_init_ratio | 0.001 | 0.1 |" in table
    cell = {name: search._cell_text(summary["cells"][f"{name}|moons|{network}"]) for name in names}
    rows = {line.split(" | ")[0]: line.strip("| ").split(" | ")[1:] for line in table if line.startswith("| 0.")}
    assert rows == {  # rows r_init, columns r_end
        "| 0.005": [cell["l-0.005-0.001"], cell["l-0.005-0.1"]],
        "| 0.5": [cell["l-0.5-0.001"], cell["l-0.5-0.1"]],
    }
    assert (tmp_path / "summary_g_grid.png").stat().st_size > 0
    # each cell in its place, by values that differ
    made = {f"{name}|moons|n": {"mean": 0.1 * i, "std": 0.0, "seeds": 3, "failed": 0} for i, name in enumerate(names)}
    lines = search.grid_report({"cells": made}, p, ["l_init_ratio", "l_end_ratio"]).splitlines()
    assert "| 0.005 | 0.000 ± 0.000 | 0.100 ± 0.000 |" in lines and "| 0.5 | 0.200 ± 0.000 | 0.300 ± 0.000 |" in lines


def test_a_run_that_diverges_is_recorded_and_ranks_last(tmp_path, monkeypatch):
    from soflow_fast.experiments import training

    path = _protocol(tmp_path)
    train = training.train

    def diverging(method, task, budget, obj, **kw):
        if obj.config.l_init_ratio == 0.5 and budget.seed == 1:  # t1-long-l, seed 1
            raise FloatingPointError(f"{method}: loss is nan at step 3")
        return train(method, task, budget, obj, **kw)

    monkeypatch.setattr(search, "train", diverging)
    assert search.main(["--protocol", str(path), "--stage", "t", "--summary", "t"]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    failed = [r for r in records if "failed" in r]
    assert len(records) == 12 and len(failed) == 2  # moons and actions, seed 1
    assert all(
        r["variant"] == "t1-long-l" and r["seed"] == 1 and "loss is nan at step 3" in r["failed"] for r in failed
    )
    summary = json.loads((tmp_path / "summary_t.json").read_text())
    assert summary["order"] == ["toy-preset", "t1-long-l"] and summary["mean_rank"]["t1-long-l"] == 2
    cell = summary["cells"]['t1-long-l|moons|{"hidden_size": 8, "num_layers": 1}']
    assert cell == {"mean": None, "std": None, "seeds": 3, "failed": 1}
    assert "diverged in 1 of 3" in (tmp_path / "summary_t.md").read_text()
    # the stage is complete: a rerun does not try the diverged runs again
    assert search.main(["--protocol", str(path), "--stage", "t"]) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 12


def test_a_variant_can_warm_the_learning_rate_up(tmp_path, monkeypatch):
    """``warmup_steps``: the rate rises linearly over those steps, then follows the schedule; the search
    passes it from the variant to the training, and the training refuses a warm-up as long as the run."""
    from soflow_fast.experiments import training
    from soflow_fast.experiments.tasks import Budget, build_task

    assert training.lr_factor(0, 100, "cosine", 10) == pytest.approx(0.1)
    assert training.lr_factor(4, 100, "constant", 10) == pytest.approx(0.5)
    assert training.lr_factor(9, 100, "constant", 10) == training.lr_factor(60, 100, "constant", 10) == 1.0
    assert training.lr_factor(50, 100, "cosine", 10) == training.lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    path = _protocol(tmp_path)
    p = json.loads(path.read_text())
    p.update(data=["moons"], seeds=[0])
    p["variants"].append({"name": "warm", "changes": {"warmup_steps": 4}, "why": "test"})
    p["stages"] = {"w": {"networks": [{"hidden_size": 8, "num_layers": 1}], "variants": ["warm"]}}
    path.write_text(json.dumps(p))
    seen = []
    train = training.train

    def watched(method, task, budget, obj, **kw):
        seen.append(kw["warmup_steps"])
        return train(method, task, budget, obj, **kw)

    monkeypatch.setattr(search, "train", watched)
    assert search.main(["--protocol", str(path), "--stage", "w"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert seen == [4] and record["settings"]["training"]["warmup_steps"] == 4
    budget = Budget(steps=8, hidden=8, layers=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        training.train("soflow", build_task("moons"), budget, None, warmup_steps=8)


def test_a_variant_sets_its_own_steps_batch_and_meanflow_fields(tmp_path, monkeypatch):
    """A variant's ``steps`` replaces the protocol's, in the budget and in the objective's ``total_steps``,
    and its ``batch`` the protocol's batch; a MeanFlow variant's fields change MeanFlow's toy preset, and
    no SoFlow field reaches it."""
    from soflow_fast import meanflow

    path = _protocol(tmp_path)
    p = json.loads(path.read_text())
    p.update(data=["moons"], seeds=[0])
    p["base"]["velocity_loss_ratio"] = 0.5  # a SoFlow field that every SoFlow variant shares
    p["variants"] += [
        {"name": "longer", "changes": {"l_init_ratio": 0.5, "steps": 12}, "why": "test"},
        {
            "name": "mf-ratio",
            "changes": {"method": "meanflow", "ratio_r_neq_t": 0.75, "steps": 6, "batch": 24},
            "why": "test",
        },
    ]
    p["stages"] = {"s": {"networks": [{"hidden_size": 8, "num_layers": 1}], "variants": ["longer", "mf-ratio"]}}
    path.write_text(json.dumps(p))
    seen = []
    train = search.train

    def watched(method, task, budget, obj, **kw):
        seen.append((method, budget.steps, obj.config, budget.batch))
        return train(method, task, budget, obj, **kw)

    monkeypatch.setattr(search, "train", watched)
    assert search.main(["--protocol", str(path), "--stage", "s"]) == 0
    (soflow, mf) = seen
    assert soflow[:2] == ("soflow", 12) and soflow[2].total_steps == 12 and soflow[2].l_init_ratio == 0.5
    assert soflow[2].velocity_loss_ratio == 0.5
    assert soflow[3] == p["batch"] != 24 and mf[3] == 24
    assert mf[:2] == ("meanflow", 6)
    assert mf[2] == dataclasses.replace(meanflow.PRESETS["toy"], ratio_r_neq_t=0.75)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["settings"]["training"]["steps"] for r in records] == [12, 6]
    assert records[1]["settings"]["training"]["batch"] == 24
    assert records[1]["settings"]["objective"] == {"ratio_r_neq_t": 0.75}


def test_a_table_sets_chosen_variants_side_by_side(tmp_path, capsys):
    path = _protocol(tmp_path)
    assert search.main(["--protocol", str(path), "--stage", "t"]) == 0
    args = ["--protocol", str(path), "--summary", "t", "--table", "t1-long-l,toy-preset"]
    assert search.main(args) == 0
    summary = json.loads((tmp_path / "summary_t.json").read_text())
    lines = (tmp_path / "table_t.md").read_text().splitlines()
    assert lines[0] == "| network | data | t1-long-l | toy-preset |"
    network = '{"hidden_size": 8, "num_layers": 1}'
    want = [search._cell_text(summary["cells"][f"{v}|actions|{network}"]) for v in ("t1-long-l", "toy-preset")]
    assert f"| MLP 8x1 | actions | {want[0]} | {want[1]} |" in lines and len(lines) == 2 + 2  # two data sets
    with pytest.raises(SystemExit):
        search.main([*args[:-1], "t1-long-l,nonesuch"])
    assert "no runs of nonesuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.main(["--protocol", str(path), "--stage", "t", "--table", "toy-preset"])
    assert "--table goes with --summary" in capsys.readouterr().err


def test_a_summary_of_many_stages_gets_a_short_file_name(tmp_path):
    """Stage names joined by + can pass the file system's 255-byte limit on a name; such a summary is
    written under a short name with a hash of the list, and its report still names every stage."""
    path = _protocol(tmp_path)
    assert search.main(["--protocol", str(path), "--stage", "t"]) == 0
    many = ",".join(["t"] * 120)  # 239 characters joined: the summary and table names would pass 255 bytes
    name = search.summary_name(many)
    assert name.startswith("summary_120-stages-") and len(name) < 40 and name == search.summary_name(many)
    assert search.summary_name("a,b") == "summary_a+b" and search.summary_name(None) == "summary"
    assert search.main(["--protocol", str(path), "--summary", many, "--table", "toy-preset"]) == 0
    assert (tmp_path / f"{name}.md").read_text().startswith(f"# Recipe search: stage {many}")
    assert search.main(["--protocol", str(path), "--summary", "t", "--table", "toy-preset"]) == 0
    long_table = (tmp_path / f"{name.replace('summary', 'table', 1)}.md").read_text()
    assert long_table == (tmp_path / "table_t.md").read_text()  # the same runs, under the short name


def test_the_presets_are_the_recipe_the_search_chose():
    """``objective.PRESETS["toy"]`` and ``functional.recommended_defaults()`` hold the variant that the
    protocol's ranking chose and its mix_confirm stages kept, at the batch its batch stages chose
    (``mix25-long-l-warmup-b1024``, README there): its objective changes on the protocol's base, and its
    training (the base's rate and schedule, its batch, the warm-up as the same share of the run)."""
    from soflow_fast import functional

    p = json.loads((REPO / "docs" / "compare" / "recipe" / "protocol.json").read_text())
    chosen = next(v for v in p["variants"] if v["name"] == "mix25-long-l-warmup-b1024")["changes"]
    fields = {k: v for k, v in chosen.items() if k not in search.TRAINING_KEYS}
    recipe = dataclasses.replace(search.objective_base(p), total_steps=p["steps"], **fields)
    assert objective.PRESETS["toy"] == recipe
    d = functional.recommended_defaults(p["steps"])
    assert d["objective"] == dataclasses.asdict(recipe)
    train = d["training"]
    assert (train["lr"], train["lr_schedule"], train["batch_size"]) == (p["base"]["lr"], "cosine", chosen["batch"])
    assert train["warmup_steps"] == chosen["warmup_steps"] and train["steps"] == p["steps"]
    # another run length scales the l schedule and the warm-up with it
    short = functional.recommended_defaults(1000)
    assert short["objective"]["total_steps"] == short["training"]["steps"] == 1000
    assert short["training"]["warmup_steps"] == 100


def test_lr_scheduler_follows_the_recommended_training():
    import torch

    from soflow_fast import functional

    train = functional.recommended_defaults(100)["training"]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=train["lr"])
    sched = functional.lr_scheduler(opt, train)
    rates = []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(train["lr"] / 10)  # the first of 10 warm-up steps
    assert rates[9] == pytest.approx(train["lr"] * 0.5 * (1 + math.cos(math.pi * 9 / 100)))
    assert max(rates) == rates[9] and rates[-1] < train["lr"] * 1e-3  # then the cosine to zero
    with pytest.raises(KeyError, match="warmup_steps"):
        functional.lr_scheduler(opt, {"steps": 10, "lr_schedule": "cosine"})
    with pytest.raises(ValueError, match="'linear'"):
        functional.lr_scheduler(opt, {**train, "lr_schedule": "linear"})
    with pytest.raises(ValueError, match="positive integer, got 0"):
        functional.lr_scheduler(opt, {**train, "steps": 0})
    for bad in (0, 9, 10.0, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 10"):
            functional.recommended_defaults(bad)


def test_the_teacher_preset_is_the_best_of_the_teacher_stage():
    """``objective.PRESETS["toy-teacher"]`` is the teacher stage's first by mean rank, as its recorded
    runs rank it: that variant's objective changes on the protocol's base, over the student's share of
    the steps."""
    path = REPO / "docs" / "compare" / "recipe" / "protocol.json"
    p = json.loads(path.read_text())
    best = search.summarize(path, "teacher")["order"][0]
    changes = next(v for v in p["variants"] if v["name"] == best)["changes"]
    fields = {k: v for k, v in changes.items() if k not in search.TRAINING_KEYS}
    student_steps = p["steps"] - round(p["steps"] * changes.get("teacher_share", 0.5))
    expected = dataclasses.replace(search.objective_base(p), total_steps=student_steps, **fields)
    assert objective.PRESETS["toy-teacher"] == expected
    assert expected.teacher_steps > 0 and changes.get("warm_start", True)
