"""Probe: how close to fifty flow-matching steps can one call of this network get at all?

The 1.5x bar of issue #29 compares a one-step model with fifty steps of flow matching on the same
network. On moons, digits and action chunks no SoFlow variant, from scratch or with a teacher, has come
within it. This probe asks whether any training of the one-step map could, with the network and budget
of the protocol: it fits the map directly. The student starts from the teacher's weights and regresses
its jump from noise to data, f(z, 1, 0 | y) = z - F(z, 1, 0 | y), onto the teacher's own fifty Euler
steps from the same z and y (the very samples that FM-50 scores), drawn from a pool of such pairs made
once. That is the easiest target a one-step model can have. The loss is the plain mean squared error.

Protocol, fixed before its runs (2026-12-08):
- data: moons, digits, actions (the three sets where the bar is unmet); seeds 0, 1, 2; the MLP 128x2,
  then the MLP 256x4 (added on 2026-12-08 after the first three 128x2 runs, before any 256x4 run);
  batch 1024, the recipe's batch.
- teacher: flow matching for 3,000 steps (Adam 3e-3, cosine), trained by the search's own code with the
  search's seeds, so it is the teacher of the ``teacher_batch`` stage (``teacher-K4-jumps-3000s-b1024``).
- student: the teacher's weights, then 3,000 steps of the regression above (Adam 3e-3, cosine, gradient
  clip 1.0, as every run of the search), each step on 1,024 pairs drawn with replacement from a pool of
  POOL = 204,800 (z, y, teacher sample) made before the student's first step. (The first form of this
  probe made fresh pairs at every step, 50 teacher calls a step; its first run had not finished after
  20 minutes on this CPU, and it was stopped before any result and changed to the pool.) Scored by the
  search's ``evaluate`` at one network call, the same reference, conditions and noise as every run,
  relative to the noise's score.
- reported: the student's score, the teacher's FM-50 score, their ratio, and the held-out mean squared
  distance between the student's one-step samples and the teacher's fifty-step ones on the scoring noise.
  The ratio is left undefined where the teacher's score is 0 (action chunks: no sample off every mode).
  (The first action-chunk run, 128x2 seed 0, printed 0.0235 and then stopped on that undefined ratio
  before it was written; the ratio was fixed and the run made again.)

A probe outside results.jsonl: no recipe changes because of it. Writes regression_ceiling.json beside
this file (runs already there are kept, so it resumes):

    python docs/compare/recipe/probes/regression_ceiling.py
"""

import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from soflow_fast.experiments import search
from soflow_fast.experiments.tasks import Budget, build_task
from soflow_fast.experiments.training import evaluate, generate, train
from soflow_fast.optim import lr_factor

HERE = Path(__file__).resolve().parent
OUT = HERE / "regression_ceiling.json"
DATA = ("moons", "digits", "actions")
SEEDS = (0, 1, 2)
NETWORKS = ({"hidden_size": 128, "num_layers": 2}, {"hidden_size": 256, "num_layers": 4})
STEPS, BATCH, LR, NFE = 3000, 1024, 3e-3, 50
POOL = 200 * BATCH


def fit_one_step(teacher, fm, task, budget: Budget) -> tuple[torch.nn.Module, float]:
    """The student: the teacher's weights trained to jump from z to the teacher's 50-step sample."""
    student = task.make_model(budget)
    student.load_state_dict(teacher.state_dict())
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=budget.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, budget.steps, "cosine", 0))
    data_g = torch.Generator().manual_seed(budget.seed + 1)
    noise_g = torch.Generator().manual_seed(budget.seed + 2)
    pool_z, pool_y, pool_x = [], [], []
    for _ in range(POOL // budget.batch):
        x0, y = task.draw(budget.batch, data_g)
        z = torch.randn(x0.shape, generator=noise_g)
        pool_z.append(z)
        pool_y.append(y)
        pool_x.append(generate("fm", teacher, fm, z, y, NFE, None))
    pool_z, pool_x = torch.cat(pool_z), torch.cat(pool_x)
    pool_y = None if pool_y[0] is None else torch.cat(pool_y)
    t, s = torch.ones(budget.batch), torch.zeros(budget.batch)  # every row the jump from noise to data
    losses = []
    for _ in range(budget.steps):
        idx = torch.randint(0, POOL, (budget.batch,), generator=data_g)
        z, y, target = pool_z[idx], None if pool_y is None else pool_y[idx], pool_x[idx]
        loss = (fm.solution(student, z, t, s, y) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), budget.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-budget.steps // 10 :]
    return student.eval(), sum(tail) / len(tail)


def run(data: str, seed: int, network: dict, protocol: dict) -> dict:
    task = build_task(data)
    budget = Budget(
        steps=STEPS,
        batch=BATCH,
        lr=LR,
        hidden=network["hidden_size"],
        layers=network["num_layers"],
        seed=seed,
        eval_samples=protocol["eval_samples"],
    )
    fm = search._objective("fm", STEPS, {}, search.objective_base(protocol))
    start = time.perf_counter()
    teacher, _ = train("fm", task, budget, fm, lr_schedule="cosine")
    taught, teacher_view = evaluate("fm", teacher, fm, task, budget, (NFE,))
    student, final_loss = fit_one_step(teacher, fm, task, budget)
    scored, student_view = evaluate("soflow", student, fm, task, budget, (1,))
    primary, noise = task.primary, scored["noise"][task.primary]
    gap = (student_view["samples"][1] - teacher_view["samples"][NFE]).square().mean().item()
    student_rel = scored["scores"][1][primary] / noise
    teacher_rel = taught["scores"][NFE][primary] / noise
    return {
        "data": data,
        "seed": seed,
        "network": network,
        "budget": dataclasses.asdict(budget),
        "primary": primary,
        "student_relative": student_rel,
        "teacher_fm50_relative": teacher_rel,
        "ratio": student_rel / teacher_rel if teacher_rel else None,
        "heldout_mse_to_teacher": gap,
        "final_train_mse": final_loss,
        "student_scores": scored["scores"][1],
        "teacher_scores": taught["scores"][NFE],
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarize(rows: list[dict]) -> dict:
    """Per network and data set: mean, sd and count of each reported number (undefined values left out)."""
    out = {}
    for network in NETWORKS:
        for data in DATA:
            got = [r for r in rows if r["network"] == network and r["data"] == data]
            cell = {}
            for key in ("student_relative", "teacher_fm50_relative", "ratio", "heldout_mse_to_teacher"):
                values = [r[key] for r in got if r[key] is not None]
                if values:
                    sd = statistics.stdev(values) if len(values) > 1 else None
                    cell[key] = {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}
            if cell:
                out[f"{network['hidden_size']}x{network['num_layers']} {data}"] = cell
    return out


def main() -> None:
    torch.set_num_threads(1)
    protocol = json.loads((HERE.parent / "protocol.json").read_text())
    rows = json.loads(OUT.read_text())["runs"] if OUT.exists() else []
    done = {(json.dumps(r["network"]), r["data"], r["seed"]) for r in rows}
    # data by data, action chunks first: whether any one call gets near fifty steps there is the first question
    for network, data, seed in itertools.product(NETWORKS, ("actions", "digits", "moons"), SEEDS):
        if (json.dumps(network), data, seed) in done:
            continue
        r = run(data, seed, network, protocol)
        rows.append(r)
        partial = OUT.with_suffix(".json.partial")  # replaced whole: a stop mid-write loses nothing
        text = json.dumps({"protocol": __doc__, "summary": summarize(rows), "runs": rows}, indent=1)
        partial.write_text(text + "\n")
        partial.replace(OUT)
        print(f"{network} {data} seed {seed}: one call {r['student_relative']:.4f}, "
              f"FM-50 {r['teacher_fm50_relative']:.4f} ({r['seconds']:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
