"""Bad data contents, named: which file, which row (or byte), what is wrong with it, and the fix.

The `datasets` readers fail on bad bytes or a malformed JSON line with errors that seldom name the
file or the row, and a text column with nulls or numbers in it fails later, inside the tokenizer. Every
data reader (training, convert, eval's elbo and SFT) goes through this module instead:

* `reading(files)` wraps a load: on failure the files are scanned (only then, so a good corpus is read
  once) for the first undecodable byte or malformed line, and that is the message;
* `rows_with_text(rows, columns, where)` checks the text columns after the load. Policy: a row whose
  text is null or missing is skipped and counted (a warning says how many), unless more than
  MAX_ROWS_WITHOUT_TEXT of the rows are, which means the column is the wrong one and is refused; a
  value that is not a string (a number, a list) is refused with its row, since it means the data is
  not what it seems. Empty strings are text: they give no tokens.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError, quoted

MAX_ROWS_WITHOUT_TEXT = 0.5  # fraction of rows with null/missing text above which the data is refused

logger = logging.getLogger(__name__)


def check_not_empty(files: list[Path]) -> None:
    """Refuse a file of zero bytes (the readers fail on it without saying which file)."""
    for file in files:
        if file.stat().st_size == 0:
            raise UserError(f"{file} is empty; remove it or give it text")


@contextmanager
def reading(files: list[Path]):
    """Turn any failure of loading `files` into one line naming the file and the row or byte at fault."""
    readers = logging.getLogger("datasets")  # which logs the failure itself before raising: that is our line
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # datasets wraps the cause in DatasetGenerationError; others come bare
        cause = err.__cause__ or err
        problem = next(filter(None, map(_first_problem, files)), None)
        if problem is None:
            text = str(cause).strip().splitlines()
            problem = (f"{', '.join(map(str, files))} cannot be read ({text[0] if text else type(cause).__name__}); "
                       "convert the data to UTF-8 text, JSON lines or parquet")
        raise UserError(problem) from None
    finally:
        readers.setLevel(level)


def rows_with_text(rows, columns: list[str], where: str):
    """`rows` (a Dataset) without the rows whose text is null, after refusing non-text values (see above)."""
    if not hasattr(rows, "data"):  # a streamed dataset: its rows are only known while training reads them
        return rows
    import numpy as np
    import pyarrow.compute as pc

    missing = np.zeros(len(rows), dtype=bool)
    for column in columns:
        text_typed = getattr(rows.features[column], "dtype", None) in ("string", "large_string")
        wrong = None if text_typed else next(((i, v) for i, v in enumerate(rows[column])
                                              if v is not None and not isinstance(v, str)), None)
        if wrong is not None:
            row, value = wrong
            raise UserError(f"{where}: row {row + 1} has {type(value).__name__} {quoted(value)} in column {column!r}, "
                            "not text; make every value of that column a string (or null to skip the row)")
        missing |= pc.is_null(rows.data.column(column)).to_numpy(zero_copy_only=False)
    skipped = int(missing.sum())
    if not skipped:
        return rows
    names = " or ".join(map(repr, columns))
    if skipped > MAX_ROWS_WITHOUT_TEXT * len(rows):
        raise UserError(f"{where}: {skipped} of {len(rows)} rows have no {names} (null or missing, the first at row "
                        f"{int(np.flatnonzero(missing)[0]) + 1}); check data.text_column, or fill in those rows")
    logger.warning("%s: skipped %d of %d rows with no %s (null or missing)", where, skipped, len(rows), names)
    keep = np.flatnonzero(~missing)
    return rows.select(keep)


def _first_problem(file: Path) -> str | None:
    """The first thing wrong with the bytes or lines of a local text or JSON file, if it can be found."""
    if file.suffix not in (".txt", ".jsonl", ".json"):
        return None  # compressed or binary: the reader's own message is all there is
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        return f"{file}: byte {err.start:,} (line {line}) is not UTF-8 text ({err.reason}); save the file as UTF-8"
    if file.suffix == ".txt":
        return None
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as err:
            return f"{file} is not valid JSON ({err}); fix it, or write one JSON object per line (.jsonl)"
        return next((f"{file}: item {i + 1} is not a JSON object; make every item an object with a text field"
                     for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            return f"{file}: line {number} is not JSON ({err}); fix or remove that line"
        if not isinstance(row, dict):
            return (f"{file}: line {number} is a JSON {type(row).__name__}, not an object; "
                    "write one object with a text field per line")
    return None

