"""Checkpoints through torch.distributed.checkpoint (DCP): sharded, verified, resumable at any world size.

Layout under ``ckpts/``: one folder per saved step (``step_00001000/``), a ``COMPLETE`` marker
written into it only after every rank finished writing, and a ``latest`` pointer that moves only
after the marker exists. A save cut short (crash, kill -9, full disk) leaves a folder without a
marker, which is never picked for resuming. The marker records the size and CRC-32 of every file
of the checkpoint, computed from the files on disk after they were synced; resuming takes the
newest checkpoint whose files still match (``Checkpointer.latest_verified``) and names any it skips.
A step that already has a complete checkpoint is never written again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import warnings
import zlib
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
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# disk errors that a save, export or sample reports as one line naming the cause
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}  # fmt: skip


def describe_io_error(e: BaseException, path: Path) -> str:
    """One line for a failed write under ``path``: the disk's reason when it is one, else the error."""
    while e.__cause__ is not None and not isinstance(e, OSError):
        e = e.__cause__
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        where = e.filename or path
        return f"{where}: {DISK_ERRNOS[e.errno]} ({errno.errorcode[e.errno]})"
    # torch's zip writer reports a short write as "unexpected pos N vs M", without an errno
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if free == 0:
        return f"{path}: no space left on the device ({type(e).__name__}: {text})"
    return f"{path}: {type(e).__name__}: {text}"


def file_digest(path: Path) -> list:
    """[size in bytes, CRC-32 as 8 hex digits] of a file, read in 16 MiB blocks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return [size, f"{crc:08x}"]


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None when every recorded file matches.

    Checkpoints whose marker records no files (written before the marker held them) pass on their
    marker and ``.metadata`` alone.
    """
    if not is_complete(path):
        return f"no {MARKER} marker or no .metadata"
    try:
        files = read_marker(path).get("files")
    except CheckpointError as e:
        return str(e)
    for name, (size, crc) in (files or {}).items():
        f = path / name
        try:
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, the marker recorded {size}"
            if file_digest(f)[1] != crc:
                return f"{name} does not match its recorded checksum (the file changed after the save)"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    return None


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
        keep: how many complete checkpoints to keep (oldest removed first); 0 keeps every one.
    """

    def __init__(self, ckpt_dir: str | Path, keep: int = 0):
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

    def latest_verified(self) -> Path | None:
        """The newest checkpoint whose files match its marker, the pointer's target first; each one
        skipped is named in a warning. Rank 0 reads the files and tells the others."""
        chosen = None
        if _is_main():
            candidates = self.complete_checkpoints()[::-1]
            pointed = self.latest()
            if pointed in candidates:  # the pointer's target first, then newest to oldest
                candidates.remove(pointed)
                candidates.insert(0, pointed)
            for path in candidates:
                reason = verify(path)
                if reason is None:
                    chosen = str(path)
                    break
                warnings.warn(f"skipping checkpoint {path}: {reason}", RuntimeWarning, stacklevel=2)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        return Path(chosen) if chosen else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path | None:
        """Write ``state`` from every rank; the marker and pointer follow a complete write.

        Returns the checkpoint's folder, or None when ``step`` already has a complete checkpoint,
        which is kept as it is. A failed write raises ``CheckpointError`` naming the cause and
        leaves the pointer on the previous checkpoint.
        """
        path = self.step_dir(step)
        # rank 0 decides for every rank: keep an intact checkpoint of this step, or write it
        keep = [_is_main() and is_complete(path) and verify(path) is None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(keep, src=0)
        if keep[0]:
            return None
        try:
            if _is_main():
                self.dir.mkdir(parents=True, exist_ok=True)
                if is_complete(path):  # complete but damaged: kept aside for inspection, never deleted
                    path.replace(path.with_name(f"damaged_{path.name}_{int(time.time())}"))
                elif path.exists():  # a partial save of this step from a crashed run (no marker)
                    shutil.rmtree(path)
            _barrier()
            t0 = time.time()
            dcp.save(state, checkpoint_id=str(path))
            _barrier()
            digests = self._digests(path)
            if _is_main():
                info = dict(meta, step=step, saved_at=time.time(), seconds=round(time.time() - t0, 3), files=digests)
                _write_atomic(path / MARKER, json.dumps(info, indent=1))
                _write_atomic(self.dir / POINTER, path.name)
                self._prune()
        except (OSError, RuntimeError, CheckpointException) as e:
            raise CheckpointError(f"could not save checkpoint {describe_io_error(_root_cause(e), path)}") from e
        _barrier()
        return path

    def _digests(self, path: Path) -> dict[str, list]:
        """Size and CRC-32 of every file of a written checkpoint, the files shared out over ranks."""
        names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MARKER)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        mine = {name: file_digest(path / name) for name in names[rank::world]}
        if world == 1:
            return mine
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

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
