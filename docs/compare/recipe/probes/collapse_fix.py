"""Probe: does an optimizer setting keep the 512-wide network out of the one-step collapse?

`collapse_width.py` showed the collapse as a residual stream whose input-independent part grows
(size 7-30) while its input-dependent part stays small, so the final LayerNorm's output, and F with
it, no longer depends on the input. Half the learning rate moved that edge; the warm-up only delayed
it. Two settings act on that growth directly and cost nothing at run time:

* decoupled weight decay (AdamW), which shrinks every weight towards 0 at each step, the ones that
  feed the constant part included;
* Adam's second-moment decay at 0.95 instead of 0.999, which lets the step size follow a gradient
  that changes quickly (common in large-model training for loss spikes).

Each row is one of three runs that collapsed or diverged in the wide and holdout stages (the recipe's
settings, warm-up 300, 3e-3 then held; 600 steps, traced as in collapse_width.py) with one change.
Exploratory, not a run of the protocol: a setting that keeps these rows out of the collapse is a
candidate for a registered stage, nothing more. Writes collapse_fix.json:

    python docs/compare/recipe/probes/collapse_fix.py
"""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from collapse_width import probe  # noqa: E402

CASES = [
    {"data": "pinwheel", "hidden": 512, "layers": 3, "seed": 2, "warmup": 300},
    {"data": "checkerboard", "hidden": 512, "layers": 3, "seed": 0, "warmup": 300},
    {"data": "rings", "hidden": 512, "layers": 3, "seed": 0, "warmup": 300},
]
CHANGES = [{}, {"weight_decay": 0.1}, {"betas": (0.9, 0.95)}]


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = []
    for case in CASES:
        for change in CHANGES:
            settings = {"lr": 3e-3, **case, **change}
            trace = probe(**settings)
            out.append({"settings": settings, "trace": trace})
            last = trace[-1]
            said = f"spread {last['spread']}, stream {last['stream_spread']} of {last['stream_size']}"
            print(settings, said, flush=True)
    (HERE / "collapse_fix.json").write_text(json.dumps(out, indent=1) + "\n")
