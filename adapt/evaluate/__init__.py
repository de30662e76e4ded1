"""Evaluation: ELBO perplexity, multiple choice, last-word prediction, infilling, code infilling, the
quality and speed of samples, and generative benchmarks (GSM8K, MBPP).

Each task scores a diffusion checkpoint and, with `config=None`, a causal model the AR way on the same
examples, so the two print side by side. docs/evaluation.md says how each task is scored.
"""

from .choice import CHOICE_TASKS, ChoiceItem, load_choice_items, score_choices
from .decoding import Span, fill_span, score_code, score_spans
from .generative import GENERATIVE_TASKS, extract_answer, generative_questions, score_generative
from .likelihood import Score, continuation_scores, encode_pair
from .perplexity import Perplexity, ar_perplexity, elbo_perplexity, evaluation_mode
from .samples import Sample, draw_samples, generative_perplexity, quality, score_samples, unigram_entropy
from .sandbox import run_program
from .tasks import TASKS, EvalSettings, format_table, run_tasks

__all__ = [
    "CHOICE_TASKS",
    "ChoiceItem",
    "EvalSettings",
    "GENERATIVE_TASKS",
    "Perplexity",
    "Sample",
    "Score",
    "Span",
    "TASKS",
    "ar_perplexity",
    "continuation_scores",
    "draw_samples",
    "elbo_perplexity",
    "encode_pair",
    "evaluation_mode",
    "extract_answer",
    "fill_span",
    "format_table",
    "generative_perplexity",
    "generative_questions",
    "load_choice_items",
    "quality",
    "run_program",
    "run_tasks",
    "score_choices",
    "score_code",
    "score_generative",
    "score_samples",
    "score_spans",
    "unigram_entropy",
]
