"""Shared test helpers: relative errors with a readable failure message, seeding, golden-file checks."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# a sitecustomize that injects faults into the processes the tests start (see its docstring)
FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"


def child_env(extra: dict | None = None) -> dict:
    """The environment of a process a test starts: this repository first on the path, one thread per
    process (ranks share 2 cores), and the fault injection ready (it acts only when asked)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(FAULT_INJECTION)]))
    env.update(extra or {})
    return env


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """norm(actual - expected) / norm(expected), in float64."""
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual, expected, rtol: float, name: str = "tensor") -> None:
    """Relative-norm check that reports the worst element when it fails."""
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    err = rel_err(a, e)
    if not err <= rtol:
        diff = (a - e).abs()
        idx = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
        n_bad = int((diff > rtol * e.abs().clamp_min(1e-12)).sum())
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; worst at {tuple(int(i) for i in idx)}: "
            f"{a[idx].item():.8g} vs {e[idx].item():.8g}; {n_bad}/{e.numel()} elements off"
        )


def golden_objective_config(meta: dict):
    """The SoFlowConfig of a golden case, from its ``meta`` (the authors' objective settings)."""
    from soflow_fast.objective import SoFlowConfig

    keys = ("noising_type", "coefficient_type", "cfg_scale", "mix_ratio", "cfg_decay_time", "p", "eps")
    return SoFlowConfig(**{k: meta[k] for k in keys})


def check_loss_and_grads(golden: dict, model: torch.nn.Module, out, prefix: str, rtol: float) -> None:
    """Back-propagate ``out = (loss, mse, weight)`` and check them and every parameter gradient
    against the golden ``out/{prefix}_*`` and ``grad_{prefix}/NAME`` entries."""
    loss, mse, weight = out
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert_rel_close(loss, golden[f"out/{prefix}_loss"], rtol, f"{prefix}_loss")
    assert_rel_close(mse, golden[f"out/{prefix}_mse"], rtol, f"{prefix}_mse")
    assert_rel_close(weight, golden[f"out/{prefix}_weight"], rtol, f"{prefix}_weight")
    names = [k[len(f"grad_{prefix}/") :] for k in golden if k.startswith(f"grad_{prefix}/")]
    params = dict(model.named_parameters())
    assert sorted(names) == sorted(params), "golden gradients and model parameters differ in names"
    for name in names:
        assert_rel_close(params[name].grad, golden[f"grad_{prefix}/{name}"], rtol, f"grad_{prefix}/{name}")


def write_cifar(root: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A CIFAR-10 python-pickle folder at ``root`` (five data batches and a test batch of ``per_batch``
    random images each); returns what each file holds."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(4)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(root / name, "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch},
                f,
            )
        written[name] = (data, labels)
    return written


def assert_one_error_line(proc, *names: str, code: int = 1) -> str:
    """A command's one-line-error contract: exit status ``code``, no traceback, exactly one ``error:`` line
    on stderr, and that line names each of ``names`` (a config key, a file, a reason). Returns the line."""
    assert proc.returncode == code, f"exit {proc.returncode}, not {code}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]
