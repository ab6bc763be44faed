"""Checkpoints through torch.distributed.checkpoint (DCP): sharded, resumable at any world size.

Layout under ``ckpts/``: one folder per saved step (``step_00001000/``), a ``COMPLETE`` marker
written into it only after every rank finished writing, and a ``latest`` pointer that moves only
after the marker exists. A save cut short (crash, kill -9, full disk) leaves a folder without a
marker, which is never picked for resuming.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

MARKER = "COMPLETE"
POINTER = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message names it and says why."""


class ModelOptimizerState(Stateful):
    """Model and optimiser state with fully qualified names, so a run can reshard on resume."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_state_dict(self.model, [])[0]}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_state_dict(
                self.model,
                [],
                model_state_dict=state["model"],
                optim_state_dict={},
                options=StateDictOptions(strict=True),
            )
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class ObjectState(Stateful):
    """A plain dict of step counters and positions, saved and restored by value."""

    def __init__(self, get, put):
        self._get, self._put = get, put

    def state_dict(self) -> dict[str, Any]:
        return self._get()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._put(state)


def _root_cause(e: BaseException) -> BaseException:
    """DCP wraps each rank's failure as (exception, stack) in a CheckpointException; take the first."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return e


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / ".metadata").is_file()


def read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MARKER} marker: {e}") from None


class Checkpointer:
    """Saves and finds checkpoints of one run.

    Args:
        ckpt_dir: the run's ``ckpts/`` folder.
        keep: how many complete checkpoints to keep (oldest removed first); 0 keeps all.
    """

    def __init__(self, ckpt_dir: str | Path, keep: int = 3):
        self.dir = Path(ckpt_dir)
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir() and is_complete(p))

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the pointer's target when complete, else the newest complete one."""
        pointer = self.dir / POINTER
        if pointer.is_file():
            target = self.dir / pointer.read_text().strip()
            if is_complete(target):
                return target
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write ``state`` from every rank; the marker and pointer follow a complete write."""
        path = self.step_dir(step)
        if _is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a partial save of this step from a crashed run
                shutil.rmtree(path)
        _barrier()
        t0 = time.time()
        dcp.save(state, checkpoint_id=str(path))
        _barrier()
        if _is_main():
            info = dict(meta, step=step, saved_at=time.time(), seconds=round(time.time() - t0, 3))
            _write_atomic(path / MARKER, json.dumps(info, indent=1))
            _write_atomic(self.dir / POINTER, path.name)
            self._prune()
        _barrier()
        return path

    def load(self, path: Path, state: dict[str, Any]) -> None:
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP's errors are long: give the path and the reason
            e = _root_cause(e)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {first}") from e

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        done = self.complete_checkpoints()
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        # partial folders older than the newest complete one are debris of crashed saves
        if done:
            for p in self.dir.glob("step_*"):
                if p.is_dir() and not is_complete(p) and p.name < done[-1].name:
                    shutil.rmtree(p, ignore_errors=True)
