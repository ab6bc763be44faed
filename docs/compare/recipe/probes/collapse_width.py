"""Probe of how the one-step collapse happens, and why a warm-up does not always prevent it.

The holdout stage saw `long-l-warmup` collapse (one-step samples at the noise's level) on pinwheel
with the MLP 512 wide (seed 2), though its 300-step warm-up had kept the 256-wide network out of that
state. This trains `long-l` as the search does (the protocol's objective base, r from 0.5 to 0.01,
Adam, batch 256, gradients clipped at 1, the same seeds and data streams) for 600 steps, the learning
rate warmed up linearly and then held, and every 50 steps records:

* ``spread``: how much the network's velocity at t = 1 varies with its input (the standard deviation
  over 1,000 noise points, averaged over the output's coordinates); a collapsed network has ~0;
* ``velocity``: the mean size of that velocity;
* ``stream_spread`` and ``stream_size``: the input of the final LayerNorm (the residual stream) in that
  call, its standard deviation over the 1,000 points and its mean absolute value. When the size grows far past the
  spread, the normalised stream, and with it the output, no longer depends on the input.

Each row changes one thing. Exploratory, not a run of the protocol. Writes collapse_width.json:

    python docs/compare/recipe/probes/collapse_width.py
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
    {"data": "checkerboard", "hidden": 256, "layers": 4, "zero_block_outputs": True},
    {"data": "pinwheel", "hidden": 512, "layers": 3, "seed": 2, "warmup": 300},
    {"data": "pinwheel", "hidden": 512, "layers": 3, "seed": 2, "warmup": 300, "lr": 1.5e-3},
    {"data": "checkerboard", "hidden": 512, "layers": 3, "warmup": 300},
    {"data": "checkerboard", "hidden": 512, "layers": 3, "warmup": 300, "lr": 1.5e-3},
]


def probe(
    data,
    hidden,
    layers,
    lr=3e-3,
    seed=0,
    warmup=0,
    zero_block_outputs=False,
    steps=600,
    weight_decay=0.0,
    betas=(0.9, 0.999),
):
    base = search.objective_base(json.loads((HERE.parent / "protocol.json").read_text()))
    cfg = dataclasses.replace(base, total_steps=3000, l_init_ratio=0.5, l_end_ratio=0.01)
    obj = objective.SoFlowObjective(cfg, num_classes=None)
    task = build_task(data)
    torch.manual_seed(seed)
    model = task.make_model(Budget(steps=steps, hidden=hidden, layers=layers, seed=seed))
    if zero_block_outputs:  # each residual block starts as the identity
        for block in model.blocks:
            torch.nn.init.zeros_(block.fc2.weight)
    if weight_decay:  # decoupled (AdamW); without it, Adam as the search trains
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: training.lr_factor(i, steps, "constant", warmup))
    data_g, draw_g = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    stream = {}
    model.final_norm.register_forward_hook(lambda module, inputs, output: stream.update(h=inputs[0].detach()))
    trace = []
    for step in range(steps):
        x0, y = task.draw(256, data_g)
        loss, logs = obj.loss(model, x0, y, step=step, generator=draw_g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
                one = torch.ones(1000)
                v = model(z, one, one)
            h = stream["h"]  # the residual stream of that call
            trace.append(
                {
                    "step": step,
                    "fm_mse": round(float(logs["fm_mse"]), 4),
                    "spread": round(float(v.std(0).mean()), 4),
                    "velocity": round(float(v.norm(dim=1).mean()), 4),
                    "stream_spread": round(float(h.std(0).mean()), 4),
                    "stream_size": round(float(h.abs().mean()), 4),
                }
            )
    return trace


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = []
    for row in ROWS:
        settings = {"lr": 3e-3, "seed": 0, "warmup": 0, "zero_block_outputs": False, **row}
        trace = probe(**settings)
        out.append({"settings": settings, "trace": trace})
        last = trace[-1]
        print(settings, f"spread {last['spread']}, stream {last['stream_spread']} of {last['stream_size']}", flush=True)
    (HERE / "collapse_width.json").write_text(json.dumps(out, indent=1) + "\n")
