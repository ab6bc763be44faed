"""FID during training: with eval.eval_reference and eval.inception, every eval npz is scored against
the reference batch on rank 0 and the numbers land in log.txt and metrics.jsonl (a random-weight
Inception of the real architecture stands in for the real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.utils import launch


@pytest.mark.slow  # two 2048 x 2048 matrix square roots (FID, sFID) on 2 cores
def test_every_eval_npz_is_scored_and_logged(tmp_path, inception_weights):
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8))
    work = tmp_path / "w"
    args = ["--total_steps=2", "--eval_steps=2", "--eval_num_samples=10"]
    launch(work, 1, *args, f"--eval_reference={ref}", f"--inception={inception_weights}")
    log = (work / "log.txt").read_text()
    assert "eval step 2 | IS " in log and "| FID " in log and "| recall " in log
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/FID" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["eval/FID"] > 0
    assert 0 <= evals[0]["eval/prec"] <= 1 and evals[0]["eval/IS"] >= 1


def test_a_missing_reference_or_inception_is_one_clear_error_before_training(tmp_path):
    proc = launch(tmp_path / "w", 1, "--eval_steps=2", f"--eval_reference={tmp_path / 'ref.npz'}", expect_ok=False)
    assert proc.returncode == 2 and "eval.eval_reference needs eval.inception" in proc.stderr
    proc = launch(
        tmp_path / "w",
        1,
        "--eval_steps=2",
        f"--eval_reference={tmp_path / 'ref.npz'}",
        f"--inception={tmp_path / 'inc.pth'}",
        expect_ok=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == [f"error: eval.eval_reference: no such file: {tmp_path / 'ref.npz'}"]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
