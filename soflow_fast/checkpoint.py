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

Reading runs no code from the checkpoint (run directories are shared and downloaded): DCP keeps the
index as a pickle (``.metadata``), which is read with only the classes DCP's metadata is made of
(``METADATA_GLOBALS``), and the non-tensor values (step, positions, optimiser settings) with
``torch.load(weights_only=True)``, as DCP already reads the tensors. ``verify`` reads both, so a
checkpoint that holds anything else is damaged like one whose files changed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
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
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from soflow_fast.safe_pickle import RefusedGlobal, allowed_table, restricted_load

MARKER = "COMPLETE"
POINTER = "latest"
STEP_DIR = re.compile(r"step_(\d+)")  # a checkpoint folder's name


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message names it and says why."""


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


# What a checkpoint's .metadata is made of, and all that its unpickling may name: DCP's metadata
# classes (the index, its entries, chunks and tensor properties, StorageMeta), the file reader's
# _StorageInfo (where each entry lies), torch.Size, the torch dtypes, torch.serialization's
# _get_layout (how a torch.layout pickles) and the path class of StorageMeta.checkpoint_id. These
# are exactly the globals in the .metadata of the project's checkpoints (digits at 1 and 2 ranks,
# with FSDP, MeanFlow, the U-Net), dtypes aside: every torch dtype is admitted.
METADATA_GLOBALS = allowed_table(
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
    _MEM_FORMAT_ENCODING,
    _StorageInfo,
    torch.Size,
    torch.serialization._get_layout,
    type(Path()),
) | {("torch", name): dtype for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)}


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (or only the type when there is no message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_metadata(path: Path) -> Metadata:
    """The ``.metadata`` of the checkpoint at ``path``, unpickled with ``METADATA_GLOBALS`` only.

    Raises:
        CheckpointError: one line naming ``.metadata`` and why: it names another global (nothing of it
            is called), it is not DCP's metadata, or an entry lies outside the checkpoint's folder.
    """
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = restricted_load(f, METADATA_GLOBALS)
    except RefusedGlobal as e:
        raise CheckpointError(
            f".metadata refers to {e.module}.{e.name}, which a checkpoint's metadata never holds"
        ) from None
    except OSError as e:
        raise CheckpointError(f".metadata cannot be read ({e.strerror or e})") from None
    except Exception as e:  # cut short, not a pickle, an allowed class given other arguments
        raise CheckpointError(f".metadata is not a checkpoint's metadata ({_one_line(e)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f".metadata holds a {type(metadata).__name__}, not a checkpoint's metadata")
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(".metadata is not a checkpoint's metadata (no index of entries and files)")
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(index, MetadataIndex) or not isinstance(name, str):
            raise CheckpointError(f".metadata is not a checkpoint's metadata (an entry {index!r:.60})")
        if Path(name).name != name or name in ("", ".", "..") or not (path / name).is_file():
            where = f"{name!r:.60}"
            raise CheckpointError(f".metadata places {index.fqn} in {where}, which is not a file of this checkpoint")
    return metadata


def _load_value(value: io.BytesIO, fqn: str) -> Any:
    """A non-tensor value of a checkpoint, as DCP's writer saved it (``torch.save``), read with
    ``weights_only=True``; a value that needs anything else raises ``CheckpointError``."""
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's refusal: a global, an opcode it does not take
        why = f"is not plain data (torch.load(weights_only=True): {_weights_only_reason(e)})"
    except Exception as e:  # not a torch.save file: damaged
        why = f"cannot be read ({_one_line(e)})"
    raise CheckpointError(f"the value of {fqn} {why}")


def _weights_only_reason(e: BaseException) -> str:
    """The reason in a ``torch.load(weights_only=True)`` error, whose message is mostly advice (to load
    with weights_only=False, or to allowlist the global): the line after "WeightsUnpickler error:",
    else the one naming the GLOBAL, else the first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            why = line.split("WeightsUnpickler error:", 1)[1].strip() or " ".join(lines[i + 1 : i + 2])
            return why.split(" Please use ")[0]
        if "GLOBAL" in line:
            return line
    return lines[0]


def check_values(path: Path, metadata: Metadata) -> None:
    """Read each non-tensor value of the checkpoint at ``path`` as a load does (``SafeLoadPlanner``),
    so that one it would refuse makes the checkpoint damaged; raises ``CheckpointError`` naming it."""
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        try:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                value = io.BytesIO(f.read(info.length))
        except (OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"{info.relative_path} cannot be read at {index.fqn} ({_one_line(e)})") from None
        if len(value.getvalue()) != info.length:
            raise CheckpointError(f"{info.relative_path} ends before the value of {index.fqn} (a file cut short)")
        try:
            _load_value(value, index.fqn)
        except CheckpointError as e:
            raise CheckpointError(f"{info.relative_path}: {e}") from None


class SafeReader(FileSystemReader):
    """DCP's reader of a checkpoint folder, with its ``.metadata`` read by ``read_metadata`` instead of
    ``pickle.load``. It takes no ``rank``, so DCP does not fall back to per-rank ``__<rank>.metadata``
    files (this project writes one ``.metadata``)."""

    def read_metadata(self) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the non-tensor values read by ``torch.load(weights_only=True)``
    where DCP's own reads them with ``weights_only=False`` (which runs whatever code they name)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = _load_value(value, fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


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
        which is kept as it is. A failed write raises ``CheckpointError`` naming the cause and
        leaves the pointer on the previous checkpoint; a KeyboardInterrupt (a second Ctrl-C) raises
        ``SaveInterrupted`` after removing the unfinished folder (it has no marker).
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
                _write_atomic(path / MARKER, json.dumps(info, indent=1))
                _write_atomic(self.dir / POINTER, path.name)
                self._prune()
        except BaseException as e:
            if _interrupted(e):
                raise SaveInterrupted(self._abandon(path, writing)) from None
            if isinstance(e, (OSError, RuntimeError, CheckpointException)):
                raise CheckpointError(f"could not save checkpoint {describe_io_error(_root_cause(e), path)}") from e
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
