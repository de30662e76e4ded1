"""Output paths: checked before any work, and never left half-written when writing fails.

Every command that writes (train, convert, distill, rl, export, import, eval --output, bench --json,
generate/infill --trace) calls `check_output` on its destination before it loads anything, so a path
under a regular file, a folder nobody may write to or a full disk costs one line and no minutes of
loading, and an output that is, holds or sits inside a path the command reads (its model, data, source)
is refused: writing it, or `--overwrite` clearing it, would destroy the input. While writing, every
file goes to a temporary name that `writing` removes on any failure (a disk filling up mid-write
included) and whose `OSError` it turns into one line naming the path.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from .errors import UserError


def check_output(path: str | os.PathLike, *, folder: bool, needed_bytes: int = 0,
                 reads: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an output `path` (a folder, or a file when not `folder`) that cannot be written, or that
    overlaps one of the paths the command `reads` (None and paths that do not exist, such as Hub ids, are
    skipped).

    The path itself may be absent, and so may the folders above an output folder (they are created);
    a file's folder must exist. The nearest existing folder must be one this process can create files
    in (tried, not guessed from permission bits: root, read-only mounts and ACLs differ) with
    `needed_bytes` free.
    """
    path = Path(path).expanduser()
    _refuse_overlap(path, reads)
    if path.exists():
        if folder and not path.is_dir():
            raise UserError(f"{path} is a file, not a folder; choose a folder (new or empty) for the output")
        if not folder and path.is_dir():
            raise UserError(f"{path} is a folder; give a file name for the output, such as {path / 'results.json'}")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is a file, so {path} cannot be created under it; choose another output path")
    if not folder and parent != path.parent:
        raise UserError(f"the folder {path.parent} does not exist; create it first, or write into an existing folder")
    try:
        probe, name = tempfile.mkstemp(prefix=".adapt-write-test-", dir=parent)
        os.close(probe)
        os.unlink(name)
    except OSError as err:
        raise UserError(f"cannot write to {parent} ({err.strerror}), so not to {path}; "
                        "choose a folder you can write to") from None
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise UserError(f"{path} needs about {human_size(needed_bytes)} but {parent} has {human_size(free)} free; "
                        "free some space or choose another output path")


def _refuse_overlap(path: Path, reads: Iterable[str | os.PathLike | None]) -> None:
    """Refuse `path` when it is, holds or sits inside an existing path of `reads` (symlinks resolved)."""
    output = path.resolve()
    for read in filter(None, reads):
        source = Path(read).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if output == source or source in output.parents or output in source.parents:
            relation = "is" if output == source else "sits inside" if source in output.parents else "holds"
            raise UserError(f"the output {path} {relation} {read}, which this command reads, so writing it could "
                            f"overwrite or delete what is read; choose an output path outside {read}")


@contextmanager
def writing(path: str | os.PathLike, partial: str | os.PathLike):
    """Write `path` through `partial` (its temporary file or folder): on any failure `partial` is removed,
    and an `OSError` becomes one line naming `path`."""
    try:
        yield
    except BaseException as err:
        remove(partial)
        if isinstance(err, OSError):
            full = " (the disk is full)" if err.errno == errno.ENOSPC else ""
            raise UserError(f"writing {path} failed{full}: {err.strerror or err}; nothing was written there, "
                            "free some space or choose another output path") from None
        raise


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a folder tree if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def tensor_bytes(tensors) -> int:
    """The bytes `tensors` take (what saving them writes, give or take the headers)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def human_size(count: float) -> str:
    """A number of bytes as a message shows it: 394 KB, 12.3 GB."""
    for unit in ("bytes", "KB", "MB"):
        if count < 1000:
            return f"{count:,.0f} {unit}"
        count /= 1000
    return f"{count:,.1f} GB"
