"""What a run costs in network rows: the equal-compute side of teacher against scratch (protocol amendment 9).

Trains each named variant of the protocol for a short run through the search's own ``run_one`` and counts,
during training only, the rows that pass through the MLP (the student's and the teacher's): with gradients
(a forward and a backward, about 3 forward rows each) and without (1 each). A step's cost does not depend
on the run length (the l schedule changes where rows go, not how many), so the counts per step scale to
the protocol's 3,000 steps. Writes compute_count.json beside this file:

    python docs/compare/recipe/probes/compute_count.py
"""

import json
from pathlib import Path

import torch

from soflow_fast.experiments import search
from soflow_fast.models.mlp import SoFlowMLP

HERE = Path(__file__).resolve().parent
VARIANTS = ("long-l-warmup", "teacher-K4-jumps", "teacher-K0")
STEPS = 400  # per run (above the recipe's 300 warm-up steps); teacher variants split them as the protocol does


def count(protocol: dict, variant: str) -> dict:
    rows = {"grad": 0, "no_grad": 0}
    training = {"on": False}
    train = search.train

    def counted_train(*args, **kwargs):
        training["on"] = True
        try:
            return train(*args, **kwargs)
        finally:
            training["on"] = False

    def hook(module, inputs, output):
        if training["on"] and isinstance(module, SoFlowMLP):
            rows["grad" if torch.is_grad_enabled() else "no_grad"] += inputs[0].shape[0]

    search.train = counted_train
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        search.run_one(
            dict(protocol, steps=STEPS, eval_samples=200), variant, "moons", {"hidden_size": 64, "num_layers": 1}, 0
        )
    finally:
        handle.remove()
        search.train = train
    units = 3 * rows["grad"] + rows["no_grad"]  # forward-row equivalents: a backward costs about two forwards
    scale = protocol["steps"] / STEPS
    return {**rows, "forward_row_units": units, "units_at_protocol_steps": units * scale}


def main() -> None:
    protocol = json.loads((HERE.parent / "protocol.json").read_text())
    out = {v: count(protocol, v) for v in VARIANTS}
    scratch = out["long-l-warmup"]["units_at_protocol_steps"]
    for v, c in out.items():
        c["relative_to_scratch"] = c["units_at_protocol_steps"] / scratch
        print(
            f"{v:20s} grad rows {c['grad']:8d}  no-grad rows {c['no_grad']:8d}",
            f"x{c['relative_to_scratch']:.2f} of scratch",
        )
    (HERE / "compute_count.json").write_text(
        json.dumps({"steps_counted": STEPS, "batch": protocol["batch"], "runs": out}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
