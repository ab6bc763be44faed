"""Checkpoints through torch.distributed.checkpoint (DCP): sharded, verified, resumable at any world size.

Layout under ``ckpts/``: one folder per saved step (``step_00001000/``), a ``COMPLETE`` marker
written into it only after every rank finished writing, and a ``latest`` pointer that moves only
after the marker exists. A save cut short (crash, kill -9, full disk, a second Ctrl-C) leaves a
folder without a marker, which is never picked for resuming. The marker records the size and
CRC-32 of every file of the checkpoint, computed from the files on disk after they were synced;
resuming takes the newest checkpoint (by step) whose files still match
(``Checkpointer.latest_verified``), whatever the pointer says, and names any it skips; when
checkpoints exist but none is intact it refuses instead of starting over. A folder with a marker
whose files do not match is damaged: it is set aside as ``damaged_step_*``, never deleted. A step
that already has a complete checkpoint is never written again.

Reading runs no code from the checkpoint (``soflow_fast.checkpoint_reader``); ``verify`` reads the
index and the non-tensor values as a load does, so a checkpoint that holds anything else is damaged
like one whose files changed.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from soflow_fast.checkpoint_reader import CheckpointError, SafeLoadPlanner, SafeReader, check_values, read_metadata
from soflow_fast.config_fields import Section, at_least, option
from soflow_fast.files import atomic_write, describe_io_error

MARKER = "COMPLETE"
POINTER = "latest"
STEP_DIR = re.compile(r"step_(\d+)")  # a checkpoint folder's name


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    """When the run saves and how many checkpoints it keeps; a resume may change both."""

    SECTION: ClassVar[str] = "checkpoint"

    ckpt_saving_steps: int = option(500, check=at_least(0), resume_safe=True)  # save every this many steps (and
    # at the end, and when stopped); 0 = only then
    keep_checkpoints: int = option(0, check=at_least(0), resume_safe=True)  # complete checkpoints kept (the
    # oldest removed first); 0 keeps every one


class SaveInterrupted(KeyboardInterrupt):
    """A second Ctrl-C during a save; the message says what became of the checkpoint."""


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


def _interrupted(e: BaseException) -> bool:
    """Whether ``e`` is a KeyboardInterrupt, or DCP's wrapping of one on any rank."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        return any(isinstance(f, tuple) and f and isinstance(f[0], KeyboardInterrupt) for f in failures.values())
    return isinstance(e, KeyboardInterrupt)


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
    marker and ``.metadata`` alone. The ``.metadata`` and the non-tensor values must read as a load
    reads them (``read_metadata``, ``check_values``): anything that would run code is a reason.
    """
    if not is_complete(path):
        return f"no {MARKER} marker (a save cut short)"
    try:
        files = read_marker(path).get("files")
    except CheckpointError as e:
        return str(e)
    if not (path / ".metadata").is_file():
        return ".metadata is missing (the index of the checkpoint's files)"
    for name, (size, crc) in (files or {}).items():
        f = path / name
        try:
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, the marker recorded {size}"
            if file_digest(f)[1] != crc:
                return f"{name} does not match its recorded checksum (the file changed after the save)"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    try:  # what a load reads as Python objects, read the same way: refused here, it is never loaded
        check_values(path, read_metadata(path))
    except CheckpointError as e:
        return str(e)
    return None


def is_complete(path: Path) -> bool:
    """Whether the save into ``path`` finished (its marker exists); whether its files are still
    intact is ``verify``'s question: one with a marker that fails it is damaged, not partial."""
    return (path / MARKER).is_file()


def step_of(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name)[1])


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
        every: for a training run, ``maybe_save`` saves every this many steps (0: never).
        states: for a training run, the ``Stateful`` parts that ``save_run`` writes and ``load`` restores.
        meta: for a training run, what the marker records besides the files (the config, the classes, ...).
        before_save: called before a save of the run (the trainer checks the loss is finite).
        say: where ``save_run`` says what it did (the run's log).
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        keep: int = 0,
        *,
        every: int = 0,
        states: dict[str, Any] | None = None,
        meta=dict,
        before_save=None,
        say=print,
    ):
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.every, self.states, self.meta, self.before_save, self.say = every, states, meta, before_save, say

    def maybe_save(self, step: int) -> None:
        """Save the run at ``step`` when the interval asks for it."""
        if self.every and step % self.every == 0:
            self.save_run(step)

    def save_run(self, step: int, final: bool = False) -> Path | None:
        """Save the run's ``states`` at ``step``; the ``final`` save of a run that ended is left to the
        interval when it saved this step."""
        if final and self.every and step % self.every == 0:
            return None
        if self.before_save is not None:
            self.before_save(step)
        path = self.save(step, self.states, self.meta())
        kept = f"step {step} already has a complete checkpoint: kept as it is"
        self.say(kept if path is None else f"saved checkpoint {path}")
        return path

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def _step_dirs(self) -> list[Path]:
        """Every ``step_<N>`` folder, by step."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=step_of)

    def complete_checkpoints(self) -> list[Path]:
        """The folders whose save finished (a marker), oldest step first; some may be damaged."""
        return [p for p in self._step_dirs() if is_complete(p)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint by step, unverified (``latest_verified`` checks its files)."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def pointer(self) -> tuple[Path | None, str | None]:
        """(the complete checkpoint the ``latest`` pointer names, None) or (None, why it names none);
        (None, None) when there is no pointer. It only informs: a resume takes the newest intact one."""
        pointer = self.dir / POINTER
        if not pointer.exists() and not pointer.is_symlink():
            return None, None
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            return None, f"it cannot be read ({type(e).__name__}: {e})"
        if not STEP_DIR.fullmatch(name):
            return None, f"it names no checkpoint folder ({name[:40]!r})"
        if not is_complete(self.dir / name):
            return None, f"it names {name}, which is not a complete checkpoint"
        return self.dir / name, None

    def latest_verified(self) -> Path | None:
        """The newest checkpoint (by step) whose files match its marker, whatever the pointer names;
        each one skipped is named in a warning, and so is a pointer that cannot be followed or lags
        behind. None when there is no complete checkpoint; ``CheckpointError`` naming them when there
        are some and none is intact (starting over would overwrite the run's outputs). Rank 0 reads
        the files and tells the others."""
        chosen, error = None, None
        if _is_main():
            candidates, skipped = self.complete_checkpoints()[::-1], []
            for path in candidates:
                reason = verify(path)
                if reason is None:
                    chosen = str(path)
                    break
                skipped.append(f"{path.name} ({reason})")
                warnings.warn(f"skipping checkpoint {path}: {reason}", RuntimeWarning, stacklevel=2)
            if candidates and chosen is None:
                error = (
                    f"every checkpoint under {self.dir} is damaged: {'; '.join(skipped)}. Nothing was changed. "
                    f"Restore their files to resume, or move {self.dir} aside (e.g. mv {self.dir} "
                    f"{self.dir}.damaged) to start the run over in this working dir"
                )
            pointed, why = self.pointer()
            if why is not None:
                warnings.warn(f"ignoring {self.dir / POINTER}: {why}", RuntimeWarning, stacklevel=2)
            elif chosen and pointed is not None and step_of(pointed) < step_of(Path(chosen)):
                warnings.warn(
                    f"{self.dir / POINTER} names {pointed.name}, but {Path(chosen).name} is newer and intact "
                    "(a save ended before it moved the pointer): using the newer one",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [chosen, error]
            dist.broadcast_object_list(box, src=0)
            chosen, error = box
        if error:
            raise CheckpointError(error)
        return Path(chosen) if chosen else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path | None:
        """Write ``state`` from every rank; the marker and pointer follow a complete write.

        Returns the checkpoint's folder, or None when ``step`` already has a complete checkpoint,
        which is kept as it is. A failed write (a full disk, say) raises ``CheckpointError`` naming the
        cause, removes the unfinished folder and leaves the pointer on the previous checkpoint; a
        KeyboardInterrupt (a second Ctrl-C) raises ``SaveInterrupted`` after removing the unfinished
        folder too (it has no marker).
        """
        path = self.step_dir(step)
        # rank 0 decides for every rank: keep an intact checkpoint of this step, or write it
        keep = [_is_main() and is_complete(path) and verify(path) is None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(keep, src=0)
        if keep[0]:
            return None
        writing = False  # from then on the folder is this save's own
        try:
            if _is_main():
                self.dir.mkdir(parents=True, exist_ok=True)
                if is_complete(path):  # complete but damaged: kept aside for inspection, never deleted
                    path.replace(path.with_name(f"damaged_{path.name}_{int(time.time())}"))
                elif path.exists():  # a partial save of this step from a crashed run (no marker)
                    shutil.rmtree(path)
            _barrier()
            writing = True
            t0 = time.time()
            dcp.save(state, checkpoint_id=str(path))
            _barrier()
            digests = self._digests(path)
            if _is_main():
                info = dict(meta, step=step, saved_at=time.time(), seconds=round(time.time() - t0, 3), files=digests)
                with atomic_write(path / MARKER, sync_dir=True) as tmp:
                    tmp.write_text(json.dumps(info, indent=1))
                with atomic_write(self.dir / POINTER, sync_dir=True) as tmp:
                    tmp.write_text(path.name)
                self._prune()
        except BaseException as e:
            if _interrupted(e):
                raise SaveInterrupted(self._abandon(path, writing)) from None
            if isinstance(e, (OSError, RuntimeError, CheckpointException)):
                why = describe_io_error(_root_cause(e), path)
                if writing and _is_main() and not is_complete(path):
                    shutil.rmtree(path, ignore_errors=True)  # no marker: a part of a save, which nothing reads
                raise CheckpointError(f"could not save checkpoint {why}") from e
            raise
        _barrier()
        return path

    def _abandon(self, path: Path, writing: bool) -> str:
        """After a KeyboardInterrupt in a save: remove its unfinished folder (rank 0); what became of it."""
        if writing and is_complete(path):
            return f"a second Ctrl-C came after checkpoint {path} was complete: it is kept and a rerun resumes from it"
        if writing and _is_main():
            shutil.rmtree(path, ignore_errors=True)  # no marker: never loaded, and no other save writes it
        last = self.latest()
        return (
            f"a second Ctrl-C interrupted the save of {path}; its unfinished folder was removed and the last "
            f"complete checkpoint ({last if last else 'none'}) stays the latest"
        )

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
        """Load ``state`` from the checkpoint at ``path`` through ``SafeReader`` and ``SafeLoadPlanner``:
        nothing in the checkpoint runs code; what would is a ``CheckpointError`` naming it."""
        try:
            read_metadata(path)  # refused here, before DCP, which would log its own traceback first
            with warnings.catch_warnings():
                # export and sample read a checkpoint in one process without a group, as DCP then assumes
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        except CheckpointError as e:
            raise CheckpointError(f"could not load checkpoint {path}: {e}") from None
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
        # folders without a marker older than the newest complete one are debris of crashed saves
        if done:
            for p in self._step_dirs():
                if not is_complete(p) and step_of(p) < step_of(done[-1]):
                    shutil.rmtree(p, ignore_errors=True)
