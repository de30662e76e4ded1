"""Files written so that a reader, or a run killed midway, never finds them half-written."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a sibling `<name>.partial`, then rename it over `path` (atomic on one file system)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
