"""One run per output folder: an exclusive lock on output_dir/.adapt-run.lock for the run's lifetime.

Two runs writing one folder would race on its checkpoints and metrics, so a second run is refused
with the holder's pid. The lock is an flock, which the kernel releases when its holder exits however
it exits: a lock left by a killed run is never mistaken for a live one. The file holds the holder's pid
and host; a clean release deletes it, so a file found with a holder in it once the lock is taken was
left by a run that died, and the new run says it takes over. Only the launch's main process (global
rank 0, as torchrun and accelerate set RANK) takes the lock; the others share its folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..outputs import check_output

LOCK_FILE = ".adapt-run.lock"

logger = logging.getLogger(__name__)


@contextmanager
def run_lock(output_dir: str | os.PathLike, reads: tuple = ()):
    """Hold the lock of `output_dir` (checked writable and clear of the paths the run `reads`, created if
    absent) while the block runs.

    Folders it had to create are removed again if the run leaves them empty (a run refused at once).
    """
    output_dir = Path(output_dir)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    check_output(output_dir, folder=True, reads=reads)
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = _acquire(output_dir / LOCK_FILE)
    try:
        yield
    finally:
        (output_dir / LOCK_FILE).unlink(missing_ok=True)  # while still held: nobody can take a stale copy
        os.close(fd)
        for folder in created:  # deepest first; stops at the first one the run wrote into
            try:
                folder.rmdir()
            except OSError:
                break


def refuse_if_held(output_dir: str | os.PathLike) -> None:
    """Refuse as `run_lock` would, without keeping the lock: for checks made before anything is written."""
    path = Path(output_dir) / LOCK_FILE
    if path.is_file():
        os.close(_locked(os.open(path, os.O_RDONLY), path))  # closing releases it at once


def _locked(fd: int, path: Path) -> int:
    """`fd` with the lock taken, or the refusal naming the holder (`fd` closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise UserError(f"{path.parent} is in use by another training run ({holder}); wait for it to end, "
                        "or choose another output_dir") from None
    return fd


def _acquire(path: Path) -> int:
    """The open, locked lock file, with this process written in as its holder."""
    while True:
        fd = _locked(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released and deleted this file between our open and our lock: retry
    stale = os.read(fd, 200).decode(errors="replace").strip()
    if stale:
        logger.warning("adapt train: taking over the lock of %s: that run ended without releasing it (%s)",
                       path.parent, stale)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd
