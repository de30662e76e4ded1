"""Datasets -> tokenized, packed blocks for training and validation.

(Interface fixed first so the training loop and the data pipeline can be built side by side; the
pipeline itself is filled in by the training issue.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSource:
    """One corpus of a mixture."""

    path: str  # local text/jsonl/parquet file, a folder of them, or a Hub dataset name
    weight: float = 1.0  # relative sampling weight in a mixture
    text_column: str | None = None  # overrides DataConfig.text_column for this source


@dataclass
class DataConfig:
    """The recipe's `data` section."""

    # A single path (shorthand for one source) or a mixture in `sources`.
    path: str | None = None
    sources: list[DataSource] = field(default_factory=list)
    # "pretrain": text packed into blocks with EOS between documents;
    # "sft": jsonl with prompt/response or chat `messages`, one padded example per row, prompt never masked.
    format: str = "pretrain"
    text_column: str = "text"
    seq_len: int = 1024
    # Stream instead of loading the whole corpus (for corpora that don't fit in memory).
    streaming: bool = False
    # Held-out validation: a separate path, or this fraction of documents taken from the training data.
    validation_path: str | None = None
    validation_fraction: float = 0.01
    # Shuffling seed; together with the data position it makes the order reproducible and resumable.
    seed: int = 0
