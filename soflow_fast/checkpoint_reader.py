"""Reading a DCP checkpoint without running code from it: run directories are shared and downloaded.

DCP keeps a checkpoint's index as a pickle (``.metadata``), read here with only the classes DCP's
metadata is made of (``METADATA_GLOBALS``; ``soflow_fast.safe_pickle``), and the non-tensor values
(step, positions, optimiser settings) with ``torch.load(weights_only=True)``, as DCP already reads the
tensors. ``SafeReader`` and ``SafeLoadPlanner`` hand both to ``dcp.load``; ``read_metadata`` and
``check_values`` let ``checkpoint.verify`` refuse what a load would refuse.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
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

from soflow_fast.safe_pickle import RefusedGlobal, allowed_table, restricted_load


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message names it and says why."""


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
