"""Shared test helpers: relative errors with a readable failure message, seeding, golden-file checks, the
trainer and the console commands run as a user runs them, and the small data files several tests write."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# a sitecustomize that injects faults into the processes the tests start (see its docstring)
FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"
TRAIN = REPO / "soflow_fast" / "train.py"
# the digits preset shrunk to a run of seconds: a 2-block DiT of width 32, 6 steps, a checkpoint every 2
TINY = [
    "--hidden_size=32",
    "--depth=2",
    "--num_heads=2",
    "--batch_size=16",
    "--log_steps=1",
    "--eval_demo_steps=0",
    "--ckpt_saving_steps=2",
    "--total_steps=6",
    "--warmup_steps=0",
    "--lr=1e-3",
    "--ema_decays=[0.9, 0.99]",
]


def child_env(extra: dict | None = None) -> dict:
    """The environment of a process a test starts: this repository first on the path, one thread per
    process (ranks share 2 cores), the fault injection ready (it acts only when asked), and none of
    pytest-xdist's worker variables."""
    # a pytest started with pytest-xdist's worker variables takes itself for a worker (pytest-benchmark
    # then turns itself off)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(FAULT_INJECTION)]))
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


# ---------------------------------------------------------------------------------------------
# The trainer and the console commands: in processes of their own, or in this one
# ---------------------------------------------------------------------------------------------


def run_command(cmd: list[str], cwd: Path | None = None, env: dict | None = None, expect_ok: bool = True):
    """``cmd`` in a process of its own with ``child_env(env)``; fails the test with its stderr if it fails
    and ``expect_ok``."""
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_command(nproc: int, cwd: Path, *args: str, env: dict | None = None, expect_ok: bool = True):
    """``python soflow_fast/train.py ARGS`` or ``torchrun --nproc_per_node=N soflow_fast/train.py ARGS``,
    run in ``cwd`` as the README types them (torchrun as ``python -m``, so it is this venv's)."""
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN)]
    return run_command(cmd + list(args), cwd, env, expect_ok)


def launch(work: Path, nproc: int, *args: str, env: dict | None = None, expect_ok: bool = True):
    """The trainer on ``TINY`` and ``args`` in the working dir ``work``: plain python for one process,
    torchrun for several."""
    return train_command(nproc, None, f"--working_dir={work}", *TINY, *args, env=env, expect_ok=expect_ok)


def train_here(work: Path, *args: str, base: list[str] = TINY, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``launch(work, 1, *args)`` in this process: ``train.main`` on ``base`` and ``args``, its exit status
    and output returned as a finished process's. It saves the seconds a new interpreter spends importing
    torch and the data libraries; the run is the same (one intra-op thread, as ``child_env`` gives the
    processes ``launch`` starts, so the numbers are the same bit for bit). Not for runs that need the
    fault injection, several ranks, or torch.compile (whose caches would outlive the run), nor for
    ``parallel.use_fused_kernels`` (the trainer sets the process-wide switch of soflow_fast.ops)."""
    import io
    import signal
    from contextlib import redirect_stderr, redirect_stdout

    from soflow_fast import run_io, train

    argv = [f"--working_dir={work}", *base, *args]
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the trainer installs its own
    threads = torch.get_num_threads()
    # a Trainer() that fails after taking the working dir's lock keeps it; a process's exit frees it, so
    # this process frees it as the run ends
    acquire, locks = run_io.RunLock.acquire, []

    def acquire_and_keep(lock, *args, **kwargs):
        acquire(lock, *args, **kwargs)
        locks.append(lock)

    run_io.RunLock.acquire = acquire_and_keep
    torch.set_num_threads(1)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = train.main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
        run_io.RunLock.acquire = acquire
        for lock in locks:
            lock.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    proc = subprocess.CompletedProcess(["train.main", *argv], code, out.getvalue(), err.getvalue())
    if expect_ok and code != 0:
        raise AssertionError(f"train.main({argv}) failed ({code}):\n{proc.stderr[-4000:]}")
    return proc


def metrics_rows(work: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The rows of a run's metrics.jsonl (or of another JSON-lines file of the run)."""
    return [json.loads(line) for line in (work / name).read_text().splitlines()]


def hidden_files(folder: Path) -> list[str]:
    """The names of the hidden files in ``folder``: what a write left under a temporary name."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def losses(work: Path) -> list[float]:
    return [r["loss"] for r in metrics_rows(work)]


def final_state(work: Path) -> dict[str, torch.Tensor]:
    """Model weights of the latest checkpoint of a ``TINY`` run, read without a process group (and with
    the checkpointer's restricted reader)."""
    from soflow_fast.checkpoint import Checkpointer
    from soflow_fast.models import DiT
    from soflow_fast.presets import build_config

    cfg = build_config("digits", None, TINY)
    sd = {k: torch.zeros_like(v) for k, v in DiT(**cfg.model.build_kwargs()).state_dict().items()}
    ckpts = Checkpointer(work / "ckpts")
    state = {"model": {"model": sd}}
    ckpts.load(ckpts.latest(), state)
    return state["model"]["model"]


def latest_verified(work: Path) -> tuple[Path | None, list[str]]:
    """``Checkpointer.latest_verified()`` of a run, and the messages of the warnings it gave."""
    import warnings

    from soflow_fast.checkpoint import Checkpointer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = Checkpointer(work / "ckpts").latest_verified()
    return path, [str(w.message) for w in caught]


def error_lines(text: str) -> list[str]:
    """The lines of a command's stderr that start with ``error:`` (the run log also goes there); there is
    no traceback."""
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# The one-line-error contract
# ---------------------------------------------------------------------------------------------

# an error line of a console command: "error: ..." (the trainer, export, sample), "config error: ..." (a
# config the trainer cannot build, exit 2) or "<tool>: error: ..." (argparse, evaluate); the run log's
# copy of an error ("[time] error: ...") is not one
ERROR_LINE = re.compile(r"^(?:config |[a-z_]+: )?error: ")


def assert_one_line_error(result, *names: str, code: int = 1) -> str:
    """A command failed as the project promises: exit status ``code``, no traceback, exactly one error
    line, and that line names each of ``names`` (the config key, the file, the flag), whatever the words
    around them. ``result`` is a finished process, or the stderr text of a ``main()`` called in this
    process (whose return value the caller checks). Returns the error line."""
    if isinstance(result, str):
        err = result
    else:
        err = result.stderr
        assert result.returncode == code, f"exit status {result.returncode}, expected {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err[-3000:]}"
    for name in names:
        assert name in lines[0], f"the error line does not name {name!r}: {lines[0]}"
    return lines[0]


@contextlib.contextmanager
def raises_naming(exc_type, *names: str):
    """``pytest.raises(exc_type)`` whose message is one line naming each of ``names`` (a config key, a
    file, an argument, a value), whatever the words around them. Yields pytest's ExceptionInfo."""
    with pytest.raises(exc_type) as info:
        yield info
    message, kind = str(info.value), type(info.value).__name__
    assert "\n" not in message.strip(), f"{kind} of several lines: {message!r}"
    for name in names:
        assert name in message, f"{kind} does not name {name!r}: {message}"


# ---------------------------------------------------------------------------------------------
# Small data files
# ---------------------------------------------------------------------------------------------


def write_image_batch(path: Path, n: int, seed: int, **extra) -> np.ndarray:
    """An ADM-style sample batch: ``n`` random uint8 16x16 RGB images as ``arr_0``, and ``extra`` arrays."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **extra)
    return images


def truncated_copy(src: Path, dst: Path) -> None:
    """``src``'s first half at ``dst``, as an interrupted write leaves a file."""
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


IMAGE_SIZE = 16
# (class, file, width, height, mode): sizes that take 0, 1 and 2 BOX halvings, portrait and landscape
IMAGES = [
    ("cat", "a.png", 40, 23, "RGB"),
    ("cat", "b.jpg", 16, 16, "RGB"),
    ("cat", "c.png", 70, 130, "RGBA"),
    ("dog", "a.png", 33, 64, "L"),
    ("dog", "sub/z.png", 20, 48, "RGB"),
    ("dog", "y.png", 100, 35, "RGB"),
    ("emu", "a.bmp", 17, 19, "RGB"),
    ("emu", "b.png", 64, 64, "RGB"),
    ("emu", "c.webp", 50, 21, "RGB"),
]


def write_image_folder(root: Path) -> Path:
    """``IMAGES`` as an ImageFolder tree at ``root`` (smooth random images, so that resampling matters and
    the crops differ), with a text file among them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, name, w, h, mode in IMAGES:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        img.convert(mode).save(path)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def leave_worker() -> None:
    """The end of a worker process that ``torch.multiprocessing.spawn`` started, once its work passed:
    exit without the interpreter's shutdown, where gloo's teardown now and then aborts the process
    (SIGABRT) after everything is done, as ``soflow_fast/train.py`` leaves a worker of several."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
