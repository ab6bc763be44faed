"""Probe: does SoFlow's teacher mode reach the regression ceiling when every consistency row jumps to the data?

``regression_ceiling.py`` fits the one-step map directly onto the teacher's fifty-step samples and lands at
FM-50 on moons and near it on digits, where the teacher preset (``teacher-K4-jumps-3000s-b1024``: pairs
(t, s) anywhere, x_l from 4 Heun steps, r from 0.9 to 0.5) stays at 1.36x and 2.04x. This trains, through
the search's own ``run_one`` and the same teacher (3,000 flow-matching steps at batch 1024, the search's
seeds), one SoFlow teacher-mode variant whose consistency rows are all jumps to the data
(``scm_times="to_data"``: s = 0, t uniform with half the rows at t = 1) with l = s, so that its target is
x_l from 8 Heun steps of the teacher's ODE from t to the data; SoFlow's loss otherwise as the protocol's
base (a quarter of the rows on flow matching, the adaptive weight p = 0.5, eps = 0.1). 3,000 student steps
at batch 1024, MLP 128x2, seed 0, on moons, digits and action chunks. Fixed on 2026-12-08 before its runs.
A probe outside results.jsonl: it can suggest a variant for an amendment, not change a preset. Writes
jump_targets.json beside this file:

    python docs/compare/recipe/probes/jump_targets.py
"""

import json
import time
from pathlib import Path

import torch

from soflow_fast.experiments import search

HERE = Path(__file__).resolve().parent
VARIANT = {
    "name": "teacher-K8-todata-3000s-b1024",
    "changes": {
        "method": "teacher",
        "teacher_steps": 8,
        "scm_times": "to_data",
        "scm_t_one": 0.5,
        "l_schedule": "Const",
        "l_init_ratio": 1.0,
        "l_end_ratio": 1.0,
        "steps": 6000,
        "batch": 1024,
    },
}
NETWORK = {"hidden_size": 128, "num_layers": 2}
DATA = ("moons", "digits", "actions")


def main() -> None:
    torch.set_num_threads(1)
    protocol = json.loads((HERE.parent / "protocol.json").read_text())
    protocol["variants"].append(VARIANT)
    out_path = HERE / "jump_targets.json"
    out = json.loads(out_path.read_text()) if out_path.exists() else []
    for data in DATA:
        if any(row["data"] == data for row in out):
            continue
        start = time.perf_counter()
        record = search.run_one(protocol, VARIANT["name"], data, NETWORK, seed=0)
        out.append(
            {
                "data": data,
                "variant": VARIANT,
                "relative": record["relative"],
                "teacher_fm50_relative": record["teacher"]["fm50_relative"],
                "record": record,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        partial = out_path.with_suffix(".json.partial")  # replaced whole: a stop mid-write loses nothing
        partial.write_text(json.dumps(out, indent=1) + "\n")
        partial.replace(out_path)
        print(data, f"{record['relative']:.4f} (its teacher's FM-50 {record['teacher']['fm50_relative']:.4f})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
