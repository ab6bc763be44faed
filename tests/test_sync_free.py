"""The training step never reads the device back: 0 host syncs from the project's code per step.

A host read (``.item()``, ``.tolist()``, ``.numpy()``, ``bool()``/``float()``/``int()`` of a tensor)
makes the host wait until the device has caught up, which drains the launch queue on a GPU. The
test wraps those methods, runs the trainer as ``train.py`` builds it (in a child process, so the
process group and the patches stay there), and counts the reads whose caller is a file of
``soflow_fast/``, by the trainer's step at the time of the read. Between logging steps there must
be none; the logging step itself reads the sums, which shows the counter counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import collections, json, sys
from pathlib import Path
import torch
from soflow_fast.presets import build_config
from soflow_fast.train import Trainer

PKG = str(Path("soflow_fast").resolve())
counts = collections.Counter()
where = collections.defaultdict(set)
trainer = None
logging = False  # inside TrainMetrics.maybe_log: its reads are the logging steps' own

def wrap(name):
    original = getattr(torch.Tensor, name)
    def counted(self, *args, **kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_filename.startswith(PKG):
            step = "log" if logging else trainer.state.step if trainer is not None else -1
            counts[step] += 1
            where[step].add(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}")
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, counted)

cfg = build_config("digits", None, sys.argv[2:])
trainer = Trainer(cfg)
maybe_log = trainer.metrics.maybe_log

def logged(*args):
    global logging
    logging = True
    try:
        return maybe_log(*args)
    finally:
        logging = False

trainer.metrics.maybe_log = logged
for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
    wrap(name)
trainer.run()
print(json.dumps({"counts": counts, "where": {k: sorted(v) for k, v in where.items()}, "end": trainer.state.step}))
"""


@pytest.mark.parametrize("objective", ["soflow", "meanflow"])
def test_no_host_sync_between_logging_steps(tmp_path, objective):
    steps = 6
    args = [
        f"--working_dir={tmp_path / 'run'}",
        f"--objective={objective}",
        "--hidden_size=32",
        "--depth=2",
        "--num_heads=2",
        "--batch_size=16",
        f"--total_steps={steps}",
        f"--log_steps={steps}",
        f"--ckpt_saving_steps={steps}",
        "--eval_demo_steps=0",
        "--eval_steps=0",
        "--grad_clip=1.0",  # clipping must not sync either
    ]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "--", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = out["counts"]
    assert out["end"] == steps
    # the logging (at the run's first step and its last) reads the logs; the steps themselves sync nothing
    per_step = {k: v for k, v in counts.items() if k != "log" and int(k) < steps}
    assert per_step == {}, f"host syncs between logging steps: {out['where']}"
    assert counts.get("log", 0) > 0, "the logging steps read the logs: the counter saw nothing"
