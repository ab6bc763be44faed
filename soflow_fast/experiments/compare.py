"""SoFlow vs MeanFlow vs plain flow matching at equal training budget, on data with a known answer.

    python -m soflow_fast.experiments.compare --data moons --steps 2000
    python -m soflow_fast.experiments.compare --data actions --steps 1500
    python -m soflow_fast.experiments.compare --data digits --steps 3000
    python -m soflow_fast.experiments.compare --data moons --steps 2000 --ablation

The three methods train the same ``SoFlowMLP`` (same width, depth and initialisation seed) with the
same Adam optimiser, learning-rate schedule (a linear warm-up over ``--warmup_steps``, by default a
tenth of the steps, then a cosine to zero), batch size, number of steps and data stream; only the
objective differs:

* ``soflow``: ``SoFlowObjective(objective.PRESETS["toy"])``, sampled with 1, 2, 4 and 8 network
  calls (the authors' re-noising multi-step sampler);
* ``meanflow``: ``MeanFlowObjective(meanflow.PRESETS["toy"])``, sampled with 1 and 2 calls
  (chained average-velocity jumps, MeanFlow's own multi-step rule);
* ``fm``: plain flow matching, the SoFlow network trained on the velocity loss alone
  (``velocity_loss_ratio=1``, ``p=0``: an unweighted squared error), sampled with 1, 2, 10 and 50
  Euler steps of v(x, t) = d/ds f(x, t, s) at s = t.

Samples are scored against fresh draws from the data distribution: energy distance, sliced
Wasserstein-2 and RBF-MMD everywhere; for ``actions`` also the share of chunks off every valid
mode and the per-mode shares; for ``digits`` the Fréchet distance in the feature space of the
project's own digits classifier and the share classified as their conditioning label.

``--ablation`` trains SoFlow alone, one run per changed setting of ``objective.PRESETS["toy"]``
(with any ``--soflow KEY=VALUE`` overrides applied first: they are the base each row changes).

Writes ``<out>/<data>[_ablation].json``, ``.md`` and ``.png`` (default out: ``runs/compare``).
Progress goes to stderr. Runs single-threaded by default (``--threads``): these models are small
and a second thread mostly adds contention on a shared machine.

This module holds the runs and the CLI; the parts are ``tasks`` (the budget, the data, the networks
and the scores), ``training`` (the methods, training and sampling) and ``reports`` (the tables and
the chart).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from soflow_fast import meanflow, objective
from soflow_fast.cli import Parser
from soflow_fast.experiments.cli_args import arg_type, parse_overrides
from soflow_fast.experiments.reports import HEADLINE, ablation_markdown, markdown, plot
from soflow_fast.experiments.tasks import DATASETS, Budget, Task, build_task
from soflow_fast.experiments.training import EVAL_NFE, METHODS, evaluate, generate, make_objective, train

# the experiment's public names, those of its parts included: callers and tests import them from here
__all__ = [
    "ABLATION",
    "DATASETS",
    "EVAL_NFE",
    "HEADLINE",
    "METHODS",
    "Budget",
    "Task",
    "ablation_markdown",
    "ablation_rows",
    "build_task",
    "evaluate",
    "generate",
    "main",
    "make_objective",
    "markdown",
    "plot",
    "run_ablation",
    "run_compare",
    "train",
]


def _env() -> str:
    return f"CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), python {platform.python_version()}"


def _jsonable(scores: dict) -> dict:
    return {str(k): v for k, v in scores.items()}


def _new_result(data: str, mode: str, budget: Budget, task: Task) -> dict:
    return {"data": data, "mode": mode, "budget": dataclasses.asdict(budget), "primary": task.primary, "runs": {}}


def _finish(result: dict) -> None:
    """Add the metric names (from the first run's 1-NFE scores) and the environment line."""
    result["metric_keys"] = list(next(iter(result["runs"].values()))["scores"]["1"].keys())
    result["env"] = _env()


def run_compare(
    data: str,
    budget: Budget,
    methods=METHODS,
    log_every: int = 500,
    soflow_overrides=None,
    meanflow_overrides=None,
    warmup_steps: int = 0,
):
    task = build_task(data)
    result = _new_result(data, "compare", budget, task)
    result["warmup_steps"] = warmup_steps
    result["presets"] = {
        "soflow": dataclasses.asdict(dataclasses.replace(objective.PRESETS["toy"], **(soflow_overrides or {}))),
        "meanflow": dataclasses.asdict(dataclasses.replace(meanflow.PRESETS["toy"], **(meanflow_overrides or {}))),
    }
    plots = {}
    for method in methods:
        print(f"[compare] {data}: training {method} for {budget.steps} steps", file=sys.stderr)
        obj = make_objective(method, budget.steps, soflow_overrides, meanflow_overrides)
        model, summary = train(method, task, budget, obj, log_every=log_every, warmup_steps=warmup_steps)
        scored, drawn = evaluate(method, model, obj, task, budget, EVAL_NFE[method])
        result["runs"][method] = {**summary, "scores": _jsonable(scored["scores"])}
        result["noise"] = scored["noise"]
        plots[method] = drawn
        best = scored["scores"][EVAL_NFE[method][0]][task.primary]
        print(
            f"[compare] {method}: {task.primary} at {EVAL_NFE[method][0]} NFE = {best:.4g} "
            f"({summary['train_seconds']} s)",
            file=sys.stderr,
        )
    _finish(result)
    return result, plots, task


ABLATION = (
    [("velocity_loss_ratio", v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    + [("l_schedule", v) for v in ("Const", "Linear", "Cosine", "Exponent")]
    + [("coefficient_type", v) for v in ("Euler", "Trig")]
)


def ablation_rows(base_overrides: dict | None = None) -> list[tuple[str, dict, bool]]:
    """(label, the row's SoFlow overrides, whether it is the base's own value) for every ablation row.

    The base is ``objective.PRESETS['toy']`` with ``base_overrides``; each row changes one field of it.
    Every row's config is built here, so a field that clashes with the base (``l_init_ratio=0`` on a
    base with another schedule, then the ``Exponent`` row) is a ValueError before any training.
    """
    base_overrides = dict(base_overrides or {})
    base = dataclasses.replace(objective.PRESETS["toy"], **base_overrides)
    rows = []
    for key, value in ABLATION:
        label = f"{key}={value}"
        row = {**base_overrides, key: value}
        try:
            dataclasses.replace(base, **{key: value})
        except ValueError as e:
            raise ValueError(f"ablation row {label} is invalid on this base: {e}") from None
        rows.append((label, row, getattr(base, key) == value))
    return rows


def run_ablation(
    data: str, budget: Budget, log_every: int = 0, soflow_overrides: dict | None = None, warmup_steps: int = 0
):
    """The paper's Table 1 on a toy set: one SoFlow run per changed setting, scored at 1 and 2 NFE.

    The base is ``objective.PRESETS['toy']``, with ``soflow_overrides`` applied when given. The base
    itself is trained once; its rows in the other groups repeat that run (training is deterministic
    for a seed, so a second run would give the same numbers).
    """
    rows = ablation_rows(soflow_overrides)  # first: a bad row fails before the others train
    task = build_task(data)
    result = _new_result(data, "ablation", budget, task)
    result["soflow_overrides"] = dict(soflow_overrides or {})
    result["warmup_steps"] = warmup_steps
    base = dataclasses.replace(objective.PRESETS["toy"], total_steps=budget.steps, **result["soflow_overrides"])
    result["base"] = dataclasses.asdict(base)
    base_run, base_label = None, ""  # the rows that keep the base's own value are one run
    for label, overrides, is_base in rows:
        if is_base and base_run is not None:
            result["runs"][label] = {**base_run, "same_run_as": base_label}
            continue
        print(f"[ablation] {data}: {label}", file=sys.stderr)
        obj = make_objective("soflow", budget.steps, overrides)
        model, summary = train("soflow", task, budget, obj, log_every=log_every, label=label, warmup_steps=warmup_steps)
        scored, _ = evaluate("soflow", model, obj, task, budget, (1, 2))
        result["runs"][label] = {**summary, "preset": is_base, "scores": _jsonable(scored["scores"])}
        result["noise"] = scored["noise"]
        if is_base:
            base_run, base_label = result["runs"][label], label
        print(f"[ablation] {label}: {task.primary} 1-NFE {scored['scores'][1][task.primary]:.4g}", file=sys.stderr)
    _finish(result)
    return result


_POSITIVE_INT = arg_type(int, lambda v: v >= 1, "a positive integer")


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="python -m soflow_fast.experiments.compare",
        description=__doc__.split("\n\n")[0],
        aliases={"steps": "total_steps", "batch": "batch_size", "hidden": "hidden_size", "layers": "num_layers"},
    )
    p.add_argument("--data", required=True, choices=DATASETS, help="the data set")
    p.add_argument("--total_steps", type=_POSITIVE_INT, default=2000, help="optimiser steps per method (default 2000)")
    p.add_argument("--batch_size", type=_POSITIVE_INT, default=256, help="samples per step (default 256)")
    p.add_argument(
        "--lr", type=arg_type(float, lambda v: v > 0, "a finite number > 0"), default=3e-3, help="Adam's peak lr"
    )
    p.add_argument(
        "--warmup_steps",
        type=arg_type(int, lambda v: v >= 0, "an integer >= 0"),
        default=None,
        help="steps of linear learning-rate warm-up before the cosine (default: a tenth of the steps, as in the "
        "low-dimensional recipe)",
    )
    p.add_argument("--hidden_size", type=_POSITIVE_INT, default=256, help="the MLP's width (default 256)")
    p.add_argument(
        "--num_layers", type=arg_type(int, lambda v: v >= 0, "an integer >= 0"), default=4, help="residual blocks"
    )
    # the generators are seeded with seed + 1, + 2, + 100, + 200: keep them inside torch's 64-bit range
    p.add_argument(
        "--seed", type=arg_type(int, lambda v: abs(v) < 2**62, "an integer, |seed| < 2**62"), default=0, help="seed"
    )
    p.add_argument("--eval_samples", type=_POSITIVE_INT, default=4000, help="fresh samples each method is scored on")
    # default None: --ablation must tell a --methods the user gave from the default
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS) + " (default all)")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="SoFlow ablation (Table 1 of the paper) instead of the comparison; --soflow sets its base",
    )
    p.add_argument(
        "--soflow", nargs="*", default=None, metavar="KEY=VALUE", help="override objective.PRESETS['toy'] fields"
    )
    p.add_argument(
        "--meanflow", nargs="*", default=None, metavar="KEY=VALUE", help="override meanflow.PRESETS['toy'] fields"
    )
    p.add_argument("--threads", type=_POSITIVE_INT, default=1, help="torch threads")
    p.add_argument("--out", default="runs/compare", help="the folder for results")
    args = p.parse_args(argv)

    warmup = args.total_steps // 10 if args.warmup_steps is None else args.warmup_steps
    if warmup >= args.total_steps:
        p.error(f"--warmup_steps: must be less than --total_steps ({args.total_steps}), got {warmup}")
    if args.ablation:
        for flag, given in (("--methods", args.methods), ("--meanflow", args.meanflow)):
            if given is not None:
                p.error(f"{flag} does not apply to --ablation: the ablation trains SoFlow only (use --soflow)")
    try:
        soflow_overrides = parse_overrides(
            args.soflow or [], objective.PRESETS["toy"], reserved={"total_steps": "the l schedule spans --total_steps"}
        )
    except ValueError as e:
        p.error(f"--soflow: {e}")
    try:
        meanflow_overrides = parse_overrides(args.meanflow or [], meanflow.PRESETS["toy"])
    except ValueError as e:
        p.error(f"--meanflow: {e}")
    if args.ablation:
        try:
            ablation_rows(soflow_overrides)
        except ValueError as e:
            p.error(f"--soflow: {e}")
    names = ",".join(METHODS) if args.methods is None else args.methods
    methods = tuple(dict.fromkeys(m.strip() for m in names.split(",") if m.strip()))  # in order, once each
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if not methods:
        p.error(f"--methods: give at least one of {', '.join(METHODS)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)  # now, not after minutes of training
    except OSError as e:
        p.error(f"--out: cannot create the directory {out}: {e.strerror or e}")
    torch.set_num_threads(args.threads)
    budget = Budget(
        args.total_steps, args.batch_size, args.lr, args.hidden_size, args.num_layers, args.seed, args.eval_samples
    )
    start = time.perf_counter()
    if args.ablation:
        result = run_ablation(args.data, budget, soflow_overrides=soflow_overrides, warmup_steps=warmup)
        stem = out / f"{args.data}_ablation"
        stem.with_suffix(".md").write_text(ablation_markdown(result))
    else:
        result, plots, task = run_compare(
            args.data,
            budget,
            methods,
            soflow_overrides=soflow_overrides,
            meanflow_overrides=meanflow_overrides,
            warmup_steps=warmup,
        )
        stem = out / args.data
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, plots, stem.with_suffix(".png"), task)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {stem}.json, .md{'' if args.ablation else ', .png'} in {result['wall_seconds']} s", file=sys.stderr)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
