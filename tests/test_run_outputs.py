"""A run's outputs after a kill, a full disk or a scoring failure: grids and eval npz are whole or
absent and a resume makes the missing ones (equal to an uninterrupted run's), no hidden part file
stays, metrics.jsonl and TensorBoard hold each step once, and a failed FID is one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_adm import inception_weights  # noqa: F401 (a fixture)
from tests.test_train import TINY, _env

# the trainer with a fault injected (SOFLOW_TEST_FAULT=kind:step): SIGKILL half-way through writing a
# grid or the merged eval npz of that step, a full disk there, or a stand-in for the FID scorer
# (`fake_scorer`; `fake_scorer_killed`: killed while it scores that step; `failing_scorer`: every
# score fails; `unbuildable_scorer`: the scorer cannot be built, as with bad Inception weights)
FAULTY_TRAIN = r"""
import errno, os, signal, sys
from pathlib import Path
import numpy as np
import soflow_fast.evaluate as E
import soflow_fast.run_io as R
from soflow_fast import train

kind, at = os.environ["SOFLOW_TEST_FAULT"].split(":")  # "none:0": no fault
name = f"step_{int(at):08d}_1step"

def kill_after_half(path):
    os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

save_grid, savez = R.save_grid, np.savez

def grid(x, path, **kw):
    out = save_grid(x, path, **kw)
    if kind == "kill_in_grid" and name in Path(path).name:
        kill_after_half(out)
    return out

def merged_npz(file, *a, **kw):
    if name in Path(file).name and ".rank" not in Path(file).name:  # the merged file, not a rank's part
        if kind == "full_disk":
            Path(file).write_bytes(b"PK" * 2048)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "kill_in_npz":
            savez(file, *a, **kw)
            kill_after_half(file)
    return savez(file, *a, **kw)

class FakeScorer:
    def __init__(self, ref, inception, device, say=print):
        if kind == "unbuildable_scorer":
            raise RuntimeError("Invalid magic number; corrupt file?")
    def score(self, path):
        if kind == "failing_scorer":
            raise ValueError("k=3 nearest neighbours need more than 3 feature vectors, got 3")
        if kind == "fake_scorer_killed" and name in path.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"IS": 1.5, "FID": 12.0, "sFID": 3.0, "prec": 0.5, "recall": 0.25}

R.save_grid, np.savez = grid, merged_npz
if "scorer" in kind:
    E.ReferenceScorer = FakeScorer
sys.argv = ["train.py"] + sys.argv[1:]
sys.exit(train.main())
"""

EVAL_ARGS = ["--total_steps=6", "--ckpt_saving_steps=4", "--eval_demo_steps=4", "--eval_steps=4"]
EVAL_ARGS += ["--eval_num_samples=20", "--eval_batch_size=8"]


def launch_faulty(work: Path, fault: str, *args: str, base: list[str] = TINY) -> subprocess.CompletedProcess:
    """The trainer with ``fault`` (``none:0``: none) on the ``base`` arguments and ``args``."""
    cmd = [sys.executable, "-c", FAULTY_TRAIN, f"--working_dir={work}", *base, *args]
    return subprocess.run(cmd, env=_env({"SOFLOW_TEST_FAULT": fault}), capture_output=True, text=True, timeout=300)


def hidden(work: Path) -> list[str]:
    return sorted(p.name for d in ("figs", "evals") for p in (work / d).iterdir() if p.name.startswith("."))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_full_disk_while_writing_the_eval_npz_names_the_file_and_leaves_no_part_file(tmp_path):
    work = tmp_path / "w"
    args = ["--total_steps=4", "--eval_steps=2", "--eval_num_samples=20", "--eval_batch_size=8"]
    proc = launch_faulty(work, "full_disk:2", *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    npz = work / "evals" / "step_00000002_1step.npz"
    assert errors == [f"error: could not write {npz}: No space left on device (ENOSPC)"], proc.stderr[-3000:]
    assert hidden(work) == [] and not npz.exists()
