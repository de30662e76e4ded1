"""Datasets -> tokenized blocks for training and validation, in a reproducible, resumable order.

Two formats:
- "pretrain": documents are tokenized, each followed by EOS, concatenated and cut into blocks of exactly
  `seq_len` tokens (no padding; a document may span blocks).
- "sft": one example per row, `prompt`/`response` fields or chat `messages`; prompt + response + EOS,
  truncated/padded to `seq_len`; prompt tokens are flagged `never_mask`, padding has attention_mask 0.

The order is a pure function of the seed: epoch e visits every document of the train split in an
order drawn from (seed, e) (for a mixture, each source is shuffled and documents are interleaved with
the weights as probabilities). The train stream is endless and packs straight across epoch boundaries,
so no token is ever dropped. Where the stream stands is a pointer (epoch, document, offset in the
document) to the first token of the next block: `Blocks.state_dict()` is that pointer, and restarting
from it reproduces the rest of the stream exactly. The validation split is one unshuffled pass.

Validation documents are held out before packing (a separate `validation_path`, or a seeded hash of
each document's index selecting `validation_fraction` of them), so no document is in both splits.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from .data_errors import check_not_empty, reading, rows_with_text
from .errors import UserError
from .settings import above, at_least, between, check_settings

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# file suffix -> the `datasets` builder that reads it (a trailing .gz/.bz2/.xz/.zst is decompressed by datasets)
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class DataSource:
    """One corpus of a mixture."""

    path: str  # local text/jsonl/parquet file, a folder of them, or a Hub dataset name
    # relative sampling weight in a mixture (probability of drawing the next document)
    weight: float = field(default=1.0, metadata=above(0))
    text_column: str | None = None  # overrides DataConfig.text_column for this source


@dataclass
class DataConfig:
    """The recipe's `data` section. `check()` holds one built in Python to the same rules as a recipe."""

    # A single path (shorthand for one source) or a mixture in `sources`.
    path: str | None = None
    sources: list[DataSource] = field(default_factory=list)
    # "pretrain": text packed into blocks with EOS between documents;
    # "sft": jsonl with prompt/response or chat `messages`, one padded example per row, prompt never masked.
    format: Literal["pretrain", "sft"] = "pretrain"
    # SFT only. "eos": after the response's EOS the row is filled with EOS to seq_len, and those EOS are
    # real tokens and targets (LLaDA's SFT recipe), so the model learns to end its answer and to fill the
    # positions after it, which a fixed-length sampler asks it to; "pad": pad tokens, attention_mask 0,
    # never a target.
    sft_padding: Literal["eos", "pad"] = "eos"
    text_column: str = "text"
    seq_len: int = field(default=1024, metadata=at_least(2))
    # Stream instead of loading the whole corpus (for corpora that don't fit in memory).
    streaming: bool = False
    # Held-out validation: a separate path, or this fraction of documents taken from the training data.
    validation_path: str | None = None
    validation_fraction: float = field(default=0.01, metadata=between(0, 1, high_open=True))
    # Shuffling seed; together with the data position it makes the order reproducible and resumable.
    seed: int = field(default=0, metadata=at_least(0))
    # Streaming only: documents are shuffled within a buffer of this many (plus the file order).
    shuffle_buffer: int = field(default=10_000, metadata=at_least(1))

    def check(self) -> None:
        """Each setting's declared choices and range, and that exactly one corpus or mixture is given."""
        check_settings(self, "data.")
        if bool(self.path) == bool(self.sources):
            problem = "data.path and data.sources are both set" if self.path else "data.path is required"
            raise UserError(f"{problem}: the data section needs exactly one of data.path and data.sources; "
                            "set data.path to a text/jsonl/parquet file or folder, or data.sources to a mixture")


def open_dataset(config: DataConfig, tokenizer, split: str = "train") -> "Blocks":
    """Load, hold out, tokenize: the blocks of `split` ("train" or "validation") ready for `batches()`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    config.check()
    if split == "validation" and not config.validation_path and config.validation_fraction == 0:
        raise UserError("no validation data (data.validation_fraction is 0); "
                        "set data.validation_path or data.validation_fraction > 0")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which separates documents and ends responses; "
                        "set tokenizer.eos_token")
    sources, hub_split = _sources(config), "train"
    hold_out = None  # validation taken out of the training data: True keeps the held-out documents, False the rest
    if not config.validation_path:
        hold_out = split == "validation"
    elif split == "validation":
        sources, hub_split = [DataSource(config.validation_path, 1.0, config.text_column)], "validation"

    encode = _encoder(config.format, tokenizer)
    parts = []
    for source in sources:
        documents = _normalize(_load(source.path, config.streaming, hub_split), config, source, tokenizer)
        if hold_out is not None and config.validation_fraction > 0:
            documents = documents.filter(_hold_out_filter(config.seed, config.validation_fraction, hold_out),
                                         with_indices=True, batched=True)
        # In memory, tokenize once up front (cached by `datasets`); streamed, tokenize lazily after the
        # order is drawn, so resuming skips documents without tokenizing them.
        parts.append(documents if config.streaming else _tokenize(documents, encode, config.format))

    blocks = Blocks(parts, [s.weight for s in sources], config, tokenizer, split,
                    encode=encode if config.streaming else None)
    if blocks.num_tokens == 0:
        where = ", ".join(s.path for s in sources)
        if split == "validation" and hold_out:
            raise UserError(f"validation_fraction = {config.validation_fraction} holds out no document of {where}; "
                            "raise data.validation_fraction or set data.validation_path")
        raise UserError(f"{where} gives no tokens after tokenization (empty documents?); "
                        "check the data path and data.text_column")
    if split == "validation" and blocks.num_blocks == 0:
        raise UserError(f"the validation split has {blocks.num_tokens} tokens, fewer than one block of "
                        f"data.seq_len = {config.seq_len}; hold out more data or lower data.seq_len")
    return blocks


class Blocks:
    """The blocks of one split, as batches for each rank, with a resumable position.

    Each global batch is `batch_size * world_size` consecutive blocks; rank r gets rows
    [r * batch_size, (r + 1) * batch_size), so ranks never share a block and the stream does not depend
    on the world size. The train split never ends; the validation split is one pass and every call of
    `batches()` replays it from the start (its last global batch is split evenly across ranks, filled up
    with all-padding rows so every rank runs the same number of forward passes).
    """

    def __init__(self, parts, weights, config: DataConfig, tokenizer, split: str, encode=None):
        self.split = split
        self.format = config.format
        self.seq_len = config.seq_len
        self.streaming = config.streaming
        self._parts = parts
        self._encode = encode  # for streamed parts, which hold normalized text rather than token ids
        self._probabilities = [w / sum(weights) for w in weights]
        self._seed = config.seed
        self._shuffle_buffer = config.shuffle_buffer
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._eos_id = tokenizer.eos_token_id
        self._fill_with_eos = config.format == "sft" and config.sft_padding == "eos"
        self._position = (0, 0, 0)  # (epoch, document, offset): where the next block starts
        self.num_tokens, self.num_blocks = self._count() if not config.streaming else (None, None)

    @property
    def finite(self) -> bool:
        return self.split == "validation"

    def batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Batches for `rank`: input_ids, attention_mask (LongTensor B x seq_len), never_mask (BoolTensor)."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        per_step = batch_size * world_size
        stream = self._stream(self._position)
        produced = False
        while True:
            group = [item for _, item in zip(range(per_step), stream)]
            if not group:
                break
            produced = True
            rows = batch_size if len(group) == per_step else math.ceil(len(group) / world_size)
            mine = [row for row, _ in group[rank * rows:(rank + 1) * rows]]
            if not self.finite:
                self._position = group[-1][1]
            yield self._collate(mine + [None] * (rows - len(mine)))
        if not produced:
            raise UserError(f"the {self.split} split yields no block of data.seq_len = {self.seq_len} tokens "
                            "(every example too long, or too little text); check the data or lower data.seq_len")

    def state_dict(self) -> dict:
        """Where the stream stands (JSON-serialisable); restore it with `load_state_dict`."""
        epoch, document, offset = self._position
        return {"epoch": epoch, "document": document, "offset": offset}

    def load_state_dict(self, state: dict) -> None:
        self._position = (int(state["epoch"]), int(state["document"]), int(state["offset"]))

    # -- the stream of blocks -------------------------------------------------------------------

    def _stream(self, position):
        """Yield (block, position after it) from `position` on. A block is (ids, real length, prompt length)."""
        epoch, start, offset = position
        pending = np.zeros(0, dtype=np.int64)  # tokens not yet in a block, carried across epochs
        while True:
            documents = self._documents(epoch, start)
            if self.format == "sft":
                produced = yield from self._examples(documents, epoch, start)
            else:
                produced, pending = yield from self._pack(documents, epoch, start, offset, pending)
            if start == 0 and not produced and not self.finite:  # an endless stream would loop forever
                raise UserError(f"an epoch of the {self.split} split yields nothing to train on; "
                                "check the data path, data.text_column and data.seq_len")
            if self.finite:
                return
            epoch, start, offset = epoch + 1, 0, 0

    def _pack(self, documents, epoch, start, offset, pending):
        """Pack documents after `pending` into full blocks; return (tokens read, what is left pending).

        The tokens left over after cutting blocks are always a suffix of the current document (fewer
        than seq_len tokens were pending before it was added), so the position after a block is
        (epoch, document, offset in it), and resuming there needs nothing but that document.
        """
        total = 0
        for index, row in enumerate(documents, start=start):
            ids = row["input_ids"][offset:]
            offset = 0
            total += len(ids)
            pending = np.concatenate([pending, ids])
            cut = 0
            while len(pending) - cut >= self.seq_len:
                block = pending[cut:cut + self.seq_len]
                cut += self.seq_len
                left = len(pending) - cut
                after = (epoch, index, len(row["input_ids"]) - left) if left else (epoch, index + 1, 0)
                yield (block, self.seq_len, 0), after
            pending = pending[cut:]
        return total, pending

    def _examples(self, documents, epoch, start):
        """One SFT example per row; a row whose prompt fills seq_len has no target and is skipped."""
        count = 0
        for index, row in enumerate(documents, start=start):
            if row["prompt_len"] >= self.seq_len:
                continue
            ids = np.asarray(row["input_ids"][:self.seq_len], dtype=np.int64)
            if self._fill_with_eos:
                ids = np.concatenate([ids, np.full(self.seq_len - len(ids), self._eos_id, dtype=np.int64)])
            count += 1
            yield (ids, len(ids), int(row["prompt_len"])), (epoch, index + 1, 0)
        return count

    def _documents(self, epoch: int, start: int):
        """The documents of `epoch` in their order, from the `start`-th on, as numpy rows."""
        from datasets import concatenate_datasets, interleave_datasets

        if self.finite:
            ordered = concatenate_datasets(self._parts) if len(self._parts) > 1 else self._parts[0]
        else:
            seeds = [int(s) for s in np.random.SeedSequence([self._seed, epoch]).generate_state(len(self._parts) + 1)]
            extra = {"buffer_size": self._shuffle_buffer} if self.streaming else {"keep_in_memory": True}
            shuffled = [part.shuffle(seed=s, **extra) for part, s in zip(self._parts, seeds)]
            ordered = shuffled[0] if len(shuffled) == 1 else interleave_datasets(
                shuffled, probabilities=self._probabilities, seed=seeds[-1], stopping_strategy="first_exhausted")
        if start and self.streaming:
            ordered = ordered.skip(start)
        elif start:  # Dataset.skip refuses to skip to the very end, where a saved position can point
            ordered = ordered.select(range(start, len(ordered)) if start < len(ordered) else [])
        if self._encode is not None:
            ordered = _tokenize(ordered, self._encode, self.format, batch_size=64)  # small: first block comes fast
        return ordered.with_format("numpy")

    def _collate(self, rows) -> dict:
        """Rows -> batch tensors; None is a filler row (all padding, attention_mask 0)."""
        input_ids = torch.full((len(rows), self.seq_len), self._pad_id, dtype=torch.long)
        lengths = torch.zeros(len(rows), 1, dtype=torch.long)
        prompts = torch.zeros(len(rows), 1, dtype=torch.long)
        for i, row in enumerate(rows):
            if row is not None:
                ids, lengths[i], prompts[i] = row
                input_ids[i, :len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        positions = torch.arange(self.seq_len)
        return {
            "input_ids": input_ids,
            "attention_mask": (positions < lengths).long(),
            "never_mask": positions < prompts,
        }

    def _count(self) -> tuple[int, int]:
        """(tokens, blocks) in one pass over every document of the split (a mixture's epochs vary)."""
        parts = [part for part in self._parts if len(part)]  # a mapped empty part has no columns at all
        if self.format == "sft":
            tokens = blocks = 0
            for part in parts:
                columns = part.select_columns(["length", "prompt_len"]).with_format("numpy")[:]
                usable = columns["prompt_len"] < self.seq_len
                lengths = self.seq_len if self._fill_with_eos else np.minimum(columns["length"], self.seq_len)
                tokens += int(np.broadcast_to(lengths, usable.shape)[usable].sum())
                blocks += int(usable.sum())
                if not usable.all():
                    logger.warning("%d of %d examples have prompts of seq_len = %d tokens or more and are skipped",
                                   int((~usable).sum()), len(usable), self.seq_len)
            return tokens, blocks
        tokens = sum(int(part.select_columns(["length"]).with_format("numpy")[:]["length"].sum()) for part in parts)
        return tokens, tokens // self.seq_len


# -- loading -------------------------------------------------------------------------------------


def _sources(config: DataConfig) -> list[DataSource]:
    if config.path:
        return [DataSource(config.path, 1.0, config.text_column)]
    return [DataSource(s.path, s.weight, s.text_column or config.text_column) for s in config.sources]


def _load(path: str, streaming: bool, hub_split: str = "train"):
    """A local file, a folder of files of one kind, or a Hub dataset name (its `hub_split`) -> rows."""
    from datasets import load_dataset

    local = Path(path).expanduser()
    if local.exists():
        builder, files = _data_files(local)
        # .txt: one document per paragraph (blank-line separated), so one file can still be split
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        with reading(files):
            return load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                **extra)
    if path.startswith((".", "/", "~")) or _builder(local) or path.count("/") > 1:
        raise UserError(f"data path {path} does not exist; pass an existing file or folder, or a Hub dataset name")
    try:
        return load_dataset(path, split=hub_split, streaming=streaming)
    except ConnectionError:
        raise UserError(f"cannot reach the Hugging Face Hub for dataset {path} (and there is no such local path); "
                        "download it and pass a local path") from None
    except FileNotFoundError:
        raise UserError(f"no local path or Hub dataset named {path}; pass an existing file or folder") from None
    except ValueError as err:  # e.g. a dataset with several configs, or without this split
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the {hub_split} split of Hub dataset {path} ({first_line}); "
                        "download the part you need and pass a local path") from None


def _data_files(path: Path) -> tuple[str, list[Path]]:
    """(builder, files) for a file or a folder (searched recursively, hidden files skipped)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(f for f in path.rglob("*")
                       if f.is_file() and _builder(f) and not any(p.startswith(".") for p in f.relative_to(path).parts))
    builders = {_builder(f) for f in files}
    if not files or None in builders:
        raise UserError(f"{path} is not a .txt, .jsonl, .json or .parquet file (or a folder of them); "
                        "convert the data to one of these formats")
    if len(builders) > 1:
        raise UserError(f"{path} mixes file types ({', '.join(sorted(builders))}); "
                        "put each type in its own folder and list them in data.sources")
    check_not_empty(files)
    return builders.pop(), files


def _builder(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    return BUILDERS.get(suffixes[-1].lower()) if suffixes else None


def _columns(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())  # streamed data whose schema is only known from a row


def _hold_out_filter(seed: int, fraction: float, keep_held_out: bool):
    """Batched filter: a document is held out when a hash of (seed, its index) falls below `fraction`."""
    def keep(_batch, indices):
        return [_held_out(seed, i, fraction) == keep_held_out for i in indices]
    return keep


def _held_out(seed: int, index: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


# -- tokenization --------------------------------------------------------------------------------


def _normalize(raw, config: DataConfig, source: DataSource, tokenizer):
    """One source's rows -> the columns every source shares, so mixtures can be interleaved.

    pretrain: {"text"}; sft: {"prompt", "response", "chat"} where a chat conversation is rendered with
    the tokenizer's chat template (its prompt then already holds the template's special tokens).
    """
    columns = _columns(raw)
    if config.format == "pretrain":
        column = source.text_column or config.text_column
        if column not in columns:
            raise UserError(f"{source.path} has no column {column!r} (it has: {', '.join(columns)}); "
                            "set data.text_column to the column that holds the text")
        raw = rows_with_text(raw.select_columns([column]), [column], source.path)
        return raw.rename_column(column, "text") if column != "text" else raw

    if "messages" in columns:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{source.path} holds chat messages but the tokenizer has no chat template; "
                            "use a tokenizer with a chat template, or prompt/response fields")

        def render(batch):
            pairs = [_render_chat(messages, tokenizer) for messages in batch["messages"]]
            return {"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs], "chat": [True] * len(pairs)}
        return raw.map(render, batched=True, remove_columns=columns, features=_sft_text_features())
    if not {"prompt", "response"} <= set(columns):
        raise UserError(f"{source.path} has neither prompt/response nor messages fields (it has: "
                        f"{', '.join(columns)}); give each SFT row a prompt and a response, or chat messages")
    raw = rows_with_text(raw.select_columns(["prompt", "response"]), ["prompt", "response"], source.path)
    return raw.map(lambda batch: {"chat": [False] * len(batch["prompt"])}, batched=True,
                   features=_sft_text_features())


def _sft_text_features():
    from datasets import Features, Value

    return Features({"prompt": Value("string"), "response": Value("string"), "chat": Value("bool")})


def _tokenize(documents, encode, data_format: str, batch_size: int = 1000):
    from datasets import Features, List, Value

    features = {"input_ids": List(Value("int32")), "length": Value("int32")}
    if data_format == "sft":
        features["prompt_len"] = Value("int32")
    text_columns = ["prompt", "response", "chat"] if data_format == "sft" else ["text"]  # what _normalize made
    return documents.map(encode, batched=True, batch_size=batch_size, remove_columns=text_columns,
                         features=Features(features))


def _encoder(data_format: str, tokenizer):
    """The batched map function from normalized rows to token ids (one output row per input row)."""
    eos = tokenizer.eos_token_id
    if data_format == "pretrain":
        def encode_text(batch):
            ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False).input_ids
            ids = [doc + [eos] if doc else doc for doc in ids]  # an empty document adds nothing, not a lone EOS
            return {"input_ids": ids, "length": [len(doc) for doc in ids]}
        return encode_text

    def encode_example(batch):
        # a plain prompt gets the tokenizer's usual special tokens (e.g. BOS); a rendered chat has them
        prompts = [tokenizer(prompt, add_special_tokens=not chat, verbose=False).input_ids
                   for prompt, chat in zip(batch["prompt"], batch["chat"])]
        responses = tokenizer(batch["response"], add_special_tokens=False, verbose=False).input_ids
        ids = [p + r + ([] if r and r[-1] == eos else [eos]) for p, r in zip(prompts, responses)]
        return {"input_ids": ids, "length": [len(x) for x in ids], "prompt_len": [len(p) for p in prompts]}
    return encode_example


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, str]:
    """(prompt, response) text: everything up to the last assistant turn, and that turn.

    The prompt is the conversation without its last message, rendered with the generation prompt; the
    response is what the full rendering adds to it (the template's end-of-turn token included; the
    trailing newline some templates add after it is dropped so the response ends on EOS).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError("an SFT conversation does not end with an assistant message; "
                        "end every `messages` list with the assistant's response (the training target)")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise UserError("the tokenizer's chat template renders the conversation differently with and without "
                        "its last turn; use prompt/response fields for this tokenizer")
    return prompt, full[len(prompt):].rstrip()
