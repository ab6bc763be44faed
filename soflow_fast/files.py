"""Writing files so that a crash leaves the old file or the whole new one, and disk errors in one line.

Every file the engine hands a user (checkpoint markers, grids, eval npz, metrics, exports, samples,
latents) is written through ``atomic_write``: into a hidden temporary file in the same folder, synced,
then renamed onto its name. A failed write removes the temporary file and raises ``WriteError``, whose
message names the file and the cause (``could not write runs/x/evals/a.npz: no space left on the device
(ENOSPC)``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# disk errors that a write reports as one line naming the cause
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}  # fmt: skip


class WriteError(OSError):
    """A file that could not be written; the message names it and the cause."""


def describe_io_error(e: BaseException, path: Path) -> str:
    """One line for a failed write under ``path``: the disk's reason when it is one, else the error."""
    while e.__cause__ is not None and not isinstance(e, OSError):
        e = e.__cause__
    if isinstance(e, WriteError):
        return str(e).removeprefix("could not write ")
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


def refuse_existing(path: str | Path, force: bool) -> None:
    """FileExistsError when ``path`` exists and ``force`` is off; IsADirectoryError for a folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file path")
    if not force and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} exists; pass --force to replace it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, *, overwrite: bool = True, sync_dir: bool = False) -> Iterator[Path]:
    """A hidden temporary path in ``path``'s folder (same suffix) for the block to write; synced and
    renamed onto ``path`` when the block ends without an error, removed when it raises.

    Args:
        path: the file to write.
        overwrite: False refuses a ``path`` that exists, before the block and again at the rename
            (``FileExistsError``; ``--force`` turns it on in the tools).
        sync_dir: also sync the folder after the rename, so that the rename itself is on disk (a
            checkpoint's marker and pointer).
    Raises:
        WriteError: the write failed; the message names ``path`` and the cause.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    hidden = "" if path.name.startswith(".") else "."
    tmp = path.with_name(f"{hidden}{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        refuse_existing(path, overwrite)  # another process may have written it meanwhile
        os.replace(tmp, path)
        if sync_dir:
            _fsync(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, (FileExistsError, IsADirectoryError, WriteError)):
            if e.filename == str(tmp):
                e.filename = str(path)
            err = WriteError(f"could not write {describe_io_error(e, path)}")
            err.errno = e.errno
            raise err from e
        raise
