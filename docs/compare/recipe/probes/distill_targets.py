"""Probe: is the teacher's target what keeps the student far from fifty steps on action chunks and digits?

With the teacher preset (x_l from 4 Heun steps of the teacher's ODE, r from 0.9 to 0.5) the one-step
student lands next to its teacher's fifty steps on the 2-D sets, but not on action chunks (0.052 of the
noise against 0.0008 at seed 0) or digits (0.018 against 0.011). This trains, through the search's own
``run_one`` and with the protocol's budget (a 3,000-step flow-matching teacher, then 3,000 student steps,
MLP 128x2, batch 256, seed 0), one variant whose consistency target is the teacher's ODE alone: l = s
(r = 1 at every step), so f(x_l, l, s) = x_l, with x_l from 8 Heun steps of the teacher from t to s. If
the target's accuracy were the limit, this would move towards the teacher's fifty steps. One seed, a
probe outside results.jsonl. Writes distill_targets.json beside this file:

    python docs/compare/recipe/probes/distill_targets.py
"""

import json
import time
from pathlib import Path

import torch

from soflow_fast.experiments import search

HERE = Path(__file__).resolve().parent
VARIANT = {
    "name": "teacher-K8-r1-3000s",
    "changes": {
        "method": "teacher",
        "teacher_steps": 8,
        "l_schedule": "Const",
        "l_init_ratio": 1.0,
        "l_end_ratio": 1.0,
        "steps": 6000,
    },
}
NETWORK = {"hidden_size": 128, "num_layers": 2}
REFERENCE = ("teacher_full", "teacher-K4-jumps-3000s")  # the same budget with the preset's l schedule


def main() -> None:
    torch.set_num_threads(1)
    protocol = json.loads((HERE.parent / "protocol.json").read_text())
    protocol["variants"].append(VARIANT)
    recorded = [json.loads(line) for line in (HERE.parent / "results.jsonl").read_text().splitlines() if line]
    out = []
    for data in ("actions", "digits"):
        start = time.perf_counter()
        record = search.run_one(protocol, VARIANT["name"], data, NETWORK, seed=0)
        reference = next(
            r
            for r in recorded
            if (r["stage"], r["variant"]) == REFERENCE
            and r["data"] == data
            and r["network"] == NETWORK
            and r["seed"] == 0
        )
        row = {
            "data": data,
            "variant": VARIANT,
            "relative": record["relative"],
            "teacher_fm50_relative": record["teacher"]["fm50_relative"],
            "reference": {"stage": REFERENCE[0], "variant": REFERENCE[1], "relative": reference["relative"]},
            "record": record,
            "seconds": round(time.perf_counter() - start, 1),
        }
        out.append(row)
        print(data, f"{row['relative']:.4f} (teacher-K4-jumps-3000s {reference['relative']:.4f})", flush=True)
    (HERE / "distill_targets.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
