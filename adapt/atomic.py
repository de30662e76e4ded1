"""Files written so that a reader, or a run killed midway, never finds them half-written."""

from __future__ import annotations

import os
from pathlib import Path

from .outputs import writing


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a sibling `<name>.partial`, then rename it over `path` (atomic on one file system).

    A failure removes the partial file and leaves `path` as it was (see `outputs.writing`).
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with writing(path, partial):
        partial.write_bytes(data)
        partial.replace(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`write_bytes_atomically` of `text` in UTF-8."""
    write_bytes_atomically(path, text.encode("utf-8"))
