"""Probe of a failure seen in the confirm stage: one-step samples at the noise's own score on checkerboard.

Trains the `long-l` variant (the protocol's objective base, r from 0.5 to 0.01) for 600 steps, Adam,
batch 256, gradients clipped at 1, and records the mean flow-matching error of the last 100 steps
(the error of predicting 0 is the target's variance, about 2.3 here) and the mean size of the network's
velocity at t = 1 on fresh noise. Each row changes one thing. Writes collapse.json beside this file:

    python docs/compare/recipe/probes/collapse.py
"""

import dataclasses
import json
from pathlib import Path

import torch

from soflow_fast import objective
from soflow_fast.experiments import search, training
from soflow_fast.experiments.tasks import Budget, build_task

HERE = Path(__file__).resolve().parent
ROWS = [
    {"data": "checkerboard", "hidden": 256, "layers": 4},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "seed": 1},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "lr": 1e-3},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "warmup": 300},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "warmup": 300, "seed": 1},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "objective": {"velocity_loss_ratio": 1.0}},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "objective": {"p": 0.0}},
    {"data": "checkerboard", "hidden": 256, "layers": 4, "objective": {"scm_times": "uniform"}},
    {"data": "checkerboard", "hidden": 128, "layers": 2},
    {"data": "moons", "hidden": 256, "layers": 4},
]


def probe(data, hidden, layers, lr=3e-3, seed=0, warmup=0, objective_changes=None, steps=600):
    base = search.objective_base(json.loads((HERE.parent / "protocol.json").read_text()))
    cfg = dataclasses.replace(base, total_steps=3000, l_init_ratio=0.5, l_end_ratio=0.01, **(objective_changes or {}))
    obj = objective.SoFlowObjective(cfg, num_classes=None)
    task = build_task(data)
    torch.manual_seed(seed)
    model = task.make_model(Budget(steps=steps, hidden=hidden, layers=layers, seed=seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: training.lr_factor(i, steps, "constant", warmup))
    data_g, draw_g = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    errors = []
    for step in range(steps):
        x0, y = task.draw(256, data_g)
        loss, logs = obj.loss(model, x0, y, step=step, generator=draw_g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        errors.append(float(logs["fm_mse"]))
    with torch.no_grad():
        z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
        one = torch.ones(2000)
        speed = float(model(z, one, one).norm(dim=1).mean())
    return {"fm_mse_last_100": sum(errors[-100:]) / 100, "velocity_norm_at_t1": speed}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = []
    for row in ROWS:
        kw = {k: v for k, v in row.items() if k != "objective"}
        result = probe(**kw, objective_changes=row.get("objective"))
        out.append({"settings": {"lr": 3e-3, "seed": 0, "warmup": 0, "steps": 600, **row}, **result})
        print(out[-1], flush=True)
    (HERE / "collapse.json").write_text(json.dumps(out, indent=1) + "\n")
