"""A recipe search run from a protocol fixed before the runs: ``python -m soflow_fast.experiments.search
--protocol P.json --stage NAME`` trains every (variant, data set, network, seed) of the stage that its
results file does not hold yet, and ``--summary [STAGE]`` ranks the variants (of one stage).

The protocol (JSON) names the data sets, the networks (``hidden_size``, ``num_layers`` of the MLP), the
seeds, the steps and batch, the ``objective_base`` (every SoFlow objective field but ``total_steps``;
without it, ``objective.PRESETS["toy"]`` as it stands), a ``base`` (``lr``, ``lr_schedule``,
``ema_decay``, and any objective field that every variant shares), the ``variants`` (each a name and its
changes to the two bases) and the ``stages``: which variants on which networks, and on the protocol's
data sets unless the stage names its own ``data``. A stage's ``curves`` also score each run at more NFEs,
per method and sampler, on the noise of the primary score: ``{"soflow": {"renoise": [1, 2, 4, 8],
"chained": [...]}, "fm": {"euler": [...]}, ...}``; a stage's ``grid`` (two setting names, such as
``["l_init_ratio", "l_end_ratio"]``) adds to its summary a table and a heat map of the variants that set
both, by those two values. Every run appends one JSON line to ``results.jsonl`` beside the protocol, with
its settings and its scores (or why it diverged), so an interrupted search resumes and nothing is lost;
``--shard K/N`` splits a stage between N processes.
Baselines are variants whose ``method`` is ``fm`` (scored at ``fm_nfe``, 50 by default) or
``meanflow`` (its ``toy`` preset with the variant's MeanFlow fields, scored at 1 NFE). A variant's
``steps`` replaces the protocol's (the objective's ``total_steps`` follows it), and its ``batch`` the
protocol's batch. Method ``teacher`` is SoFlow's teacher mode at equal steps: a flow-matching teacher
trains for ``teacher_share`` (0.5) of the steps, then a SoFlow student for the rest with the teacher in
its objective, starting from the teacher's weights (``warm_start``, true); the record holds the
teacher's own 50-step score and both training times.

The summary scores each run by its primary metric relative to the noise's (the same metric between
plain Gaussian noise and the data: 1.0 is no better than noise), takes the mean and the spread over
seeds per (variant, data set, network), ranks the variants per (data set, network) and orders them
by their mean rank: the recipe is chosen by rank across data sets and networks, never by one set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from soflow_fast import meanflow, objective
from soflow_fast.cli import Parser
from soflow_fast.experiments.tasks import Budget, build_task
from soflow_fast.experiments.training import evaluate, train

TRAINING_KEYS = (
    "lr",
    "lr_schedule",
    "warmup_steps",
    "ema_decay",
    "method",
    "fm_nfe",
    "teacher_share",
    "warm_start",
    "steps",
    "batch",
)


def objective_base(protocol: dict) -> objective.SoFlowConfig:
    """The SoFlow settings that variants change: the protocol's ``objective_base`` (every field, by value,
    so that a later change of a preset does not change what the protocol means), else
    ``objective.PRESETS["toy"]`` as it stands."""
    if "objective_base" in protocol:
        return objective.SoFlowConfig(**protocol["objective_base"])
    return objective.PRESETS["toy"]


def _objective(method: str, steps: int, fields: dict, base: objective.SoFlowConfig, teacher=None):
    if method == "soflow":
        cfg = dataclasses.replace(base, total_steps=steps, **fields)
        return objective.SoFlowObjective(cfg, num_classes=None, teacher=teacher)
    if method == "fm":
        cfg = dataclasses.replace(base, total_steps=steps, velocity_loss_ratio=1.0, p=0.0)
        return objective.SoFlowObjective(cfg, num_classes=None)
    if method == "meanflow":
        return meanflow.MeanFlowObjective(dataclasses.replace(meanflow.PRESETS["toy"], **fields), num_classes=None)
    raise ValueError(f"unknown method {method!r}")


def settings(protocol: dict, variant: str) -> dict:
    """The base with the variant's changes: objective fields and training settings."""
    changes = next(v for v in protocol["variants"] if v["name"] == variant)["changes"]
    merged = dict(protocol["base"], **changes)
    training = {k: merged.pop(k) for k in TRAINING_KEYS if k in merged}
    training.setdefault("method", "soflow")
    training.setdefault("lr_schedule", "cosine")
    training.setdefault("ema_decay", None)
    if training["method"] == "fm":
        merged = {}  # flow matching is the base objective with the velocity loss only
    elif training["method"] == "meanflow":  # MeanFlow fields over its own toy preset, not the SoFlow base
        merged = {k: v for k, v in changes.items() if k not in TRAINING_KEYS}
    return {"objective": merged, "training": training}


def run_one(protocol: dict, variant: str, data: str, network: dict, seed: int, curves: dict | None = None) -> dict:
    """Train and score one run; returns its record (with ``curve``: {sampler: {nfe: score relative to the
    noise's}} where ``curves`` names samplers for the run's method)."""
    s = settings(protocol, variant)
    tr = s["training"]
    budget = Budget(
        steps=tr.get("steps", protocol["steps"]),
        batch=tr.get("batch", protocol["batch"]),
        lr=tr.get("lr", 3e-3),
        hidden=network["hidden_size"],
        layers=network["num_layers"],
        seed=seed,
        eval_samples=protocol.get("eval_samples", 4000),
    )
    task = build_task(data)
    base = objective_base(protocol)
    method, extra = tr["method"], {}
    teacher = None
    if method == "teacher":  # the teacher's steps come out of the budget: equal steps in all
        first = dataclasses.replace(budget, steps=round(budget.steps * tr.get("teacher_share", 0.5)))
        fm = _objective("fm", first.steps, {}, base)
        teacher, taught = train("fm", task, first, fm, lr_schedule=tr["lr_schedule"])
        scored, _ = evaluate("fm", teacher, fm, task, first, (50,))
        noise = scored["noise"][task.primary]
        extra["teacher"] = {"steps": first.steps, **taught, "fm50_relative": scored["scores"][50][task.primary] / noise}
        budget, method = dataclasses.replace(budget, steps=budget.steps - first.steps), "soflow"
    obj = _objective(method, budget.steps, s["objective"], base, teacher)
    init = teacher if tr.get("warm_start", True) else None
    model, summary = train(
        method,
        task,
        budget,
        obj,
        lr_schedule=tr["lr_schedule"],
        ema_decay=tr["ema_decay"],
        init=init,
        warmup_steps=tr.get("warmup_steps", 0),
    )
    nfe = tr.get("fm_nfe", 50) if method == "fm" else 1
    result, _ = evaluate(method, model, obj, task, budget, (nfe,))
    primary = task.primary
    value, noise = result["scores"][nfe][primary], result["noise"][primary]
    curve = {}
    for mode, nfes in (curves or {}).get(method, {}).items():
        scored, _ = evaluate(method, model, obj, task, budget, tuple(nfes), None if mode == "euler" else mode)
        curve[mode] = {str(n): scored["scores"][n][primary] / noise if noise else None for n in nfes}
    return {
        "variant": variant,
        "data": data,
        "network": network,
        "seed": seed,
        "settings": s,
        "nfe": nfe,
        "primary": primary,
        "score": value,
        "noise": noise,
        "relative": value / noise if noise else None,
        "scores": result["scores"][nfe],
        # every field of the objective trained with, so a later change of a preset cannot rewrite what ran
        "objective_config": dataclasses.asdict(obj.config),
        **({"curve": curve} if curve else {}),
        **extra,
        **summary,
    }


def _key(record: dict) -> tuple:
    """A run's identity: a stage's runs are its own, even where another stage ran the same cell."""
    network = json.dumps(record["network"], sort_keys=True)
    return (record["stage"], record["variant"], record["data"], network, record["seed"])


def run_stage(protocol_path: Path, stage: str, shard: tuple[int, int] = (0, 1)) -> None:
    """Run the stage's runs that the results file does not hold; ``shard`` (k, n): only the k-th of every n
    of the stage's runs (n processes, one shard each, share the work and the results file)."""
    protocol = json.loads(protocol_path.read_text())
    spec = protocol["stages"][stage]
    results = protocol_path.with_name("results.jsonl")
    done = set()
    if results.is_file():
        done = {_key(json.loads(line)) for line in results.read_text().splitlines() if line.strip()}
    jobs = [
        (v, d, n, s)
        for v in spec["variants"]
        for n in spec["networks"]
        for d in spec.get("data", protocol["data"])
        for s in protocol["seeds"]
    ]
    todo = [
        (i, j) for i, j in enumerate(jobs) if (stage, j[0], j[1], json.dumps(j[2], sort_keys=True), j[3]) not in done
    ]
    left = len(todo)
    # every n-th of all the stage's runs, so that a shard is the same whenever it starts
    todo = [j for i, j in todo if i % shard[1] == shard[0]]
    print(
        f"stage {stage}: {len(jobs)} runs, {len(jobs) - left} done, {left} to go, {len(todo)} of them in this shard",
        file=sys.stderr,
    )
    for i, (variant, data, network, seed) in enumerate(todo, 1):
        t0 = time.time()
        try:
            record = run_one(protocol, variant, data, network, seed, spec.get("curves"))
            if not (isinstance(record["relative"], float) and math.isfinite(record["relative"])):
                raise FloatingPointError(f"the samples score {record['score']} ({record['primary']})")
            said = f"{record['primary']} {record['score']:.4g} (x{record['relative']:.3f} of noise)"
        except FloatingPointError as e:  # a run that diverged is a result: it ranks last in its column
            record = {"variant": variant, "data": data, "network": network, "seed": seed}
            record.update(settings=settings(protocol, variant), relative=None, failed=str(e))
            said = f"failed: {e}"
        record["stage"] = stage
        with open(results, "a") as f:  # one write of one line: shards append without interleaving
            f.write(json.dumps(record) + "\n")
        print(
            f"[{i}/{len(todo)}] {variant} {data} {network} seed {seed}: {said} in {time.time() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )


_NAME_LIMIT = 200  # file systems cap a name at 255 bytes; this leaves room for "_curves.png" and the like


def summary_name(stages: str | None) -> str:
    """The files' stem for ``--summary stages``: ``summary_<stages joined by +>``; where that would pass
    _NAME_LIMIT, ``summary_<N>-stages-<hash of the list>`` (the report's title names every stage)."""
    if not stages:
        return "summary"
    joined = stages.replace(",", "+")
    if len("summary_" + joined) <= _NAME_LIMIT:
        return f"summary_{joined}"
    return f"summary_{len(stages.split(','))}-stages-{hashlib.sha1(joined.encode()).hexdigest()[:10]}"


def summarize(protocol_path: Path, stages: str | None = None) -> dict:
    """Per (variant, data, network): mean and spread of the score relative to noise; per variant: its
    mean rank over (data, network) and how many of the cells it ran. ``stages``: those stages' runs only
    (a name, or names joined by commas; variants are ranked against those they ran beside)."""
    records = [json.loads(line) for line in protocol_path.with_name("results.jsonl").read_text().splitlines() if line]
    records = [r for r in records if stages is None or r.get("stage") in stages.split(",")]
    first = {}  # a cell's seed counts once, where two stages ran the same one
    for r in records:
        first.setdefault(_key(r)[1:], r)
    records = list(first.values())
    seeds = json.loads(protocol_path.read_text())["seeds"]
    cells: dict[tuple, list[float]] = {}
    for r in records:
        cells.setdefault((r["variant"], r["data"], json.dumps(r["network"], sort_keys=True)), []).append(r["relative"])
    table = {}
    for (v, d, n), vals in cells.items():
        failed = sum(x is None for x in vals)  # diverged runs (their record says why)
        cell = {"mean": None, "std": None, "seeds": len(vals)} if failed else _spread(vals)
        table[f"{v}|{d}|{n}"] = {**cell, "failed": failed}
    columns: dict[tuple, list[tuple[float, str]]] = {}
    for (v, d, n), vals in cells.items():
        if len(vals) >= len(seeds):  # a cell counts once every seed of the protocol ran
            mean = math.inf if None in vals else statistics.fmean(vals)  # a diverged run ranks last
            columns.setdefault((d, n), []).append((mean, v))
    ranks: dict[str, list[float]] = {}
    for entries in columns.values():
        entries.sort()
        for rank, (_, v) in enumerate(entries, 1):
            ranks.setdefault(v, []).append(rank)
    order = sorted(ranks, key=lambda v: (statistics.fmean(ranks[v]), v))
    seconds: dict[str, list[float]] = {}  # training wall time, a teacher's counted
    teachers: dict[str, list[float]] = {}  # a teacher's own 50-step score, relative to the noise's
    for r in records:
        network = json.dumps(r["network"], sort_keys=True)
        if "train_seconds" in r:
            taught = r.get("teacher", {}).get("train_seconds", 0.0)
            seconds.setdefault(f"{r['variant']}|{network}", []).append(r["train_seconds"] + taught)
        if "teacher" in r:
            teachers.setdefault(f"{r['variant']}|{r['data']}|{network}", []).append(r["teacher"]["fm50_relative"])
    curves: dict[str, dict] = {}
    for r in records:
        key = f"{r['variant']}|{r['data']}|{json.dumps(r['network'], sort_keys=True)}"
        for mode, points in r.get("curve", {}).items():
            for nfe, value in points.items():
                curves.setdefault(key, {}).setdefault(mode, {}).setdefault(nfe, []).append(value)
    return {
        "cells": table,
        "mean_rank": {v: round(statistics.fmean(ranks[v]), 3) for v in order},
        "columns_ranked": {v: len(ranks[v]) for v in order},
        "order": order,
        "train_seconds": {key: round(statistics.fmean(vals), 1) for key, vals in seconds.items()},
        "teachers": {key: _spread(vals) for key, vals in teachers.items()},
        "curves": {
            key: {mode: {nfe: _spread(vals) for nfe, vals in points.items()} for mode, points in modes.items()}
            for key, modes in curves.items()
        },
    }


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "seeds": len(values),
    }


def plot_curves(summary: dict, path: Path) -> None:
    """Quality against NFE: one panel per (data set, network), a line per (variant, sampler), the mean over
    seeds with its spread shaded, on log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list] = {}
    for key, modes in summary["curves"].items():
        variant, data, network = key.split("|")
        panels.setdefault(f"{data}, {network}", []).extend((variant, mode, points) for mode, points in modes.items())
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, sorted(panels.items()), strict=False):
        for variant, mode, points in sorted(lines):
            nfes = sorted(points, key=int)
            mean = [points[n]["mean"] for n in nfes]
            std = [points[n]["std"] for n in nfes]
            x = [int(n) for n in nfes]
            ax.plot(x, mean, marker="o", ms=3, label=f"{variant} ({mode})")
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(x, low, high, alpha=0.15)
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="score / noise's", title=title)
        ticks = sorted({int(n) for _, _, points in lines for n in points})
        ax.set_xticks(ticks, [str(n) for n in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grid_cells(summary: dict, protocol: dict, axes: list[str]) -> dict[str, dict]:
    """A stage that varies two settings over a grid (its ``grid``: their two names): per (data set,
    network), {(row value, column value): cell} of the variants that set both."""
    panels: dict[str, dict] = {}
    for key, cell in summary["cells"].items():
        variant, data, network = key.split("|")
        changes = next(v for v in protocol["variants"] if v["name"] == variant)["changes"]
        if all(a in changes for a in axes):
            panels.setdefault(f"{data}, {network}", {})[tuple(changes[a] for a in axes)] = cell
    return panels


def grid_report(summary: dict, protocol: dict, axes: list[str]) -> str:
    """The grid as Markdown: a table per (data set, network), rows the first setting, columns the second."""
    lines = [f"## The grid: {axes[0]} (rows) by {axes[1]} (columns)", ""]
    for title, cells in sorted(grid_cells(summary, protocol, axes).items()):
        rows, cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
        lines += [f"{title}:", "", f"| {axes[0]} | " + " | ".join(str(c) for c in cols) + " |"]
        lines.append("|---:|" + "---:|" * len(cols))
        for r in rows:
            lines.append(f"| {r} | " + " | ".join(_cell_text(cells.get((r, c))) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_grid(summary: dict, protocol: dict, axes: list[str], path: Path) -> None:
    """A heat map per (data set, network) of the grid's mean scores (relative to the noise's), each cell
    written with its mean and spread; one colour scale per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(grid_cells(summary, protocol, axes).items())
    cols_n = min(4, len(panels))
    rows_n = -(-len(panels) // cols_n)
    fig, grid = plt.subplots(rows_n, cols_n, figsize=(3.6 * cols_n, 3.2 * rows_n), squeeze=False)
    for ax, (title, cells) in zip(grid.flat, panels, strict=False):
        rows, cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
        means = [[(cells.get((r, c)) or {}).get("mean") for c in cols] for r in rows]
        image = [[math.nan if m is None else m for m in row] for row in means]
        ax.imshow(image, cmap="viridis_r", aspect="auto")
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                ax.text(
                    j, i, _cell_text(cells.get((r, c))).replace(" ± ", "\n± "), ha="center", va="center", fontsize=6
                )
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set(xlabel=axes[1], ylabel=axes[0], title=title)
        ax.title.set_fontsize(8)
    for ax in list(grid.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(summary: dict, variants: list[str]) -> str:
    """A Markdown table of chosen variants: a row per (network, data set), a column per variant, each cell
    the score relative to the noise's, mean ± spread over seeds."""
    split = {tuple(key.split("|")): cell for key, cell in summary["cells"].items()}
    rows = sorted({(n, d) for (_, d, n) in split}, key=lambda nd: (json.loads(nd[0])["hidden_size"], nd))
    lines = ["| network | data | " + " | ".join(variants) + " |", "|---|---|" + "---:|" * len(variants)]
    for n, d in rows:
        net = json.loads(n)
        cells = [_cell_text(split.get((v, d, n))) for v in variants]
        lines.append(f"| MLP {net['hidden_size']}x{net['num_layers']} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return ""
    if cell.get("failed"):
        return f"diverged in {cell['failed']} of {cell['seeds']}"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def report(summary: dict, title: str) -> str:
    """The summary as Markdown: per network, each variant's score relative to the noise's (mean ± spread
    over seeds) on each data set and its mean rank; then the curves (quality against NFE), if any."""
    lines = [f"# {title}", "", "Score relative to the noise's (1.0: no better than Gaussian noise; lower is better),"]
    lines += ["mean ± standard deviation over seeds; rank: the mean over the data set columns. Made by"]
    lines += ["`python -m soflow_fast.experiments.search --summary NAME` from `results.jsonl`; a rank over fewer"]
    lines += ["columns than the others' (a variant whose seeds have not all run everywhere) is marked.", ""]
    split = [(key.split("|"), cell) for key, cell in summary["cells"].items()]
    for network in sorted({n for (_, _, n), _ in split}):
        data = sorted({d for (_, d, n), _ in split if n == network})
        lines += [f"## Network {network}", ""]
        lines += [
            "| variant | mean rank | " + " | ".join(data) + " | train s |",
            "|---|---:|" + "---:|" * (len(data) + 1),
        ]
        for v in summary["order"] + sorted({v for (v, _, _), _ in split} - set(summary["order"])):
            cells = {d: c for (vv, d, n), c in split if vv == v and n == network}
            if not cells:
                continue
            rank = summary["mean_rank"].get(v)
            full = max(summary["columns_ranked"].values(), default=0)
            if rank is not None and summary["columns_ranked"][v] < full:
                rank = f"{rank:.2f} ({summary['columns_ranked'][v]} of {full})"
            elif rank is not None:
                rank = f"{rank:.2f}"
            row = [_cell_text(cells.get(d)) for d in data]
            seconds = summary.get("train_seconds", {}).get(f"{v}|{network}")
            row.append("" if seconds is None else f"{seconds:.0f}")
            lines.append(f"| {v} | {rank or ''} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["train s: the mean wall-clock seconds of a run's training, its teacher's included (CPU, one thread;"]
    lines += ["other processes shared the machine, so read them as rough costs).", ""]
    if summary.get("teachers"):
        lines += ["## The teachers' own scores (flow matching, 50 Euler steps, after their share of the steps)", ""]
        lines += ["| variant, data, network | teacher FM-50 (mean ± sd) |", "|---|---:|"]
        for key, cell in sorted(summary["teachers"].items()):
            lines.append(f"| {key.replace('|', ', ')} | {_cell_text(cell)} |")
        lines.append("")
    if summary.get("curves"):
        lines += [
            "## Quality against NFE",
            "",
            "| variant, data, network | sampler | NFE: score (mean ± sd) |",
            "|---|---|---|",
        ]
        for key in sorted(summary["curves"]):
            for mode, points in sorted(summary["curves"][key].items()):
                text = ", ".join(
                    f"{n}: {p['mean']:.3f} ± {p['std']:.3f}" for n, p in sorted(points.items(), key=lambda x: int(x[0]))
                )
                lines.append(f"| {key.replace('|', ', ')} | {mode} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m soflow_fast.experiments.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", required=True, help="the protocol JSON (results.jsonl is written beside it)")
    p.add_argument("--stage", help="the stage to run (its variants on its networks)")
    p.add_argument(
        "--summary",
        nargs="?",
        const="*",
        default=None,
        help="write summary.json, .md and _curves.png (when runs have curves) beside the protocol, of every stage, or "
        "with a stage's name (or names joined by commas) summary_<stage>.* of their runs; print the order",
    )
    p.add_argument(
        "--table",
        metavar="VARIANT[,VARIANT]",
        help="with --summary: also write table_<stages>.md, those variants side by side per network and data set",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--shard", default="0/1", help="K/N: run the K-th (from 0) of every N runs left, to share a stage")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = Path(a.protocol)
    k, _, n = a.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        p.error(f"--shard must be K/N with 0 <= K < N, got {a.shard!r}")
    if a.table and not a.summary:
        p.error("--table goes with --summary")
    if a.stage:
        run_stage(path, a.stage, (int(k), int(n)))
    if a.summary:
        stage = None if a.summary == "*" else a.summary
        out = summarize(path, stage)
        name = summary_name(stage)
        path.with_name(name + ".json").write_text(json.dumps(out, indent=1) + "\n")
        title = f"Recipe search: stage {stage}" if stage else "Recipe search: every stage"
        text = report(out, title)
        protocol = json.loads(path.read_text())
        axes = protocol["stages"].get(stage or "", {}).get("grid")
        if axes:  # a stage that varies two settings over a grid
            text += "\n" + grid_report(out, protocol, axes)
            plot_grid(out, protocol, axes, path.with_name(name + "_grid.png"))
        path.with_name(name + ".md").write_text(text)
        if out["curves"]:
            plot_curves(out, path.with_name(name + "_curves.png"))
        if a.table:
            ran = {key.split("|")[0] for key in out["cells"]}
            missing = [v for v in a.table.split(",") if v not in ran]
            if missing:
                p.error(f"--table: no runs of {', '.join(missing)} in the summary's stages")
            path.with_name(name.replace("summary", "table", 1) + ".md").write_text(table(out, a.table.split(",")))
        for v in out["order"]:
            print(f"{v:28s} mean rank {out['mean_rank'][v]:.2f} over {out['columns_ranked'][v]} columns")
    if not (a.stage or a.summary):
        p.error("give --stage NAME, --summary [STAGE], or both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
