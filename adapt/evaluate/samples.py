"""The `samples` task: draw samples, then score how good and how fast they were.

A diffusion model (the sampler, `adapt.sampling.generate_with_details`) or a causal model (its KV-cached
`generate`, the AR reference) draws `num_samples` unconditional samples (after BOS) and as many prompted
ones, each `length` tokens long, one sample per call with seed `seed + i` (i counts the unconditional
samples, then the prompted ones). Each sample's text ends at its first EOS, as the sampler returns it.
Reported over the samples, each with its standard error:

* generative perplexity: exp of the exact NLL per token of the samples' text tokens under the AR
  scorer (the source model), given the prompt (or the BOS the sample started from); low is fluent;
* unigram entropy of each sample's text tokens (nats): repetition collapses it, a constant text has 0;
* tokens/s: the tokens the model generated over the wall-clock time of the call, and tokens per forward:
  the same over the model forwards it ran (1 for the AR model). Both sides stop once the sample has
  ended with EOS (the AR model at once, the sampler at the end of that block), which changes neither
  text; the positions stopping saved are not counted.

The bench (`adapt.bench.bench_sampling`) scores its timed samples with the same `quality`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from ..diffusion import DiffusionConfig
from ..errors import UserError
from ..limits import check_context, max_positions
from ..sampling import (OnStep, SamplingOptions, anchor_id, context_ids, decided_lengths, generate_with_details,
                        text_end)
from ..timing import timed
from .choice import read_jsonl
from .likelihood import continuation_scores
from .metrics import summary
from .perplexity import Perplexity, evaluation_mode, model_device, sampling_ratio

# The default prompts: the openings of documents in the demo's held-out split of the Brown corpus
# (data/brown/validation.jsonl, built by scripts/prepare_brown.py), one from each of eight genres.
DEFAULT_PROMPTS = (
    "The vast Central Valley of California is one of the most",
    "Murray Louis and his dance company appeared at the Henry Street Playhouse",
    "Much more than shelter, housing symbolizes social status,",
    "The popularity of folklore in America stands in direct proportion to",
    "A royal decree issued in 1910, two years after the Belgian government",
    "The safe at Ingleside District Station stands next to the gum machine",
    "With a sneer, the man spread his legs and,",
    "For several months now, Jack Carter, a big overgrown boy of fifteen,",
)


@dataclass
class Sample:
    context: list[int]  # the given ids the sample continues: the prompt's, or the one token it started from
    tokens: list[int]  # the generated ids before the first EOS: the tokens of the sample's text
    generated: int  # positions the model generated (EOS and what follows it included, what stopping saved not)
    forwards: int  # model forwards the sample took
    seconds: float  # wall-clock time it took


def text_tokens(ids: list[int], eos_token_id: int | None) -> list[int]:
    """`ids` up to (not including) the first EOS: the tokens of the text the sampler returns."""
    return list(ids[:text_end(ids, 0, eos_token_id)])


def unigram_entropy(tokens: list[int]) -> float:
    """Entropy in nats of the token frequencies of one sample: 0 for a constant (or empty) one, log k for
    k distinct tokens once each."""
    total = len(tokens)
    return sum(count / total * math.log(total / count) for count in Counter(tokens).values())


def generative_perplexity(scorer, samples: list[Sample], *, batch_size: int = 8) -> Perplexity:
    """The exact NLL per text token of the samples under the causal `scorer`, each given its context;
    the standard error treats each sample as one draw (as `Perplexity.from_blocks` does blocks)."""
    vocab = scorer.get_input_embeddings().num_embeddings
    if any(token >= vocab for sample in samples for token in sample.tokens):
        raise UserError(f"the samples hold token ids past the scorer's vocabulary ({vocab}); score them with the "
                        "AR model the checkpoint was adapted from (--source), which shares its tokenizer")
    scores = continuation_scores(scorer, [s.context + s.tokens for s in samples], [len(s.context) for s in samples],
                                 config=None, batch_size=batch_size, max_length=max_positions(scorer.config))
    return Perplexity.from_blocks(torch.tensor([s.nll for s in scores]), torch.tensor([s.num_tokens for s in scores]))


def quality(scorer, samples: list[Sample], *, batch_size: int = 8) -> dict:
    """Generative perplexity (and its NLL per token), unigram entropy and text length of the samples."""
    nll = generative_perplexity(scorer, samples, batch_size=batch_size)
    scored = nll.tokens > 0  # every text empty: nothing to score
    perplexity = nll.perplexity if scored else math.nan
    return {
        "gen_perplexity": perplexity,
        "gen_perplexity_stderr": perplexity * nll.stderr,  # to first order, from the NLL's
        "gen_nll_per_token": nll.nll_per_token if scored else math.nan,
        "gen_nll_per_token_stderr": nll.stderr,
        **summary("entropy", [unigram_entropy(s.tokens) for s in samples]),
        **summary("text_tokens", [float(len(s.tokens)) for s in samples]),
    }


def speed(samples: list[Sample]) -> dict:
    """Tokens/s and tokens per forward of the samples (the tokens each generated)."""
    return {**summary("tokens_per_s", [s.generated / s.seconds for s in samples]),
            **summary("tokens_per_forward", [s.generated / s.forwards for s in samples])}


@torch.no_grad()
def ar_generate(model, context: torch.Tensor, *, length: int, options: SamplingOptions, seed: int, tokenizer,
                fixed_length: bool = False, stop_strings: list[str] | None = None) -> torch.Tensor:
    """The new ids (B, n) of the causal model's KV-cached `generate` after `context` (B, C), drawn with the
    temperature, top-k and top-p of `options` (greedy at temperature 0) from a generator seeded with `seed`.

    n = `length`, or fewer once every row has ended with EOS or its text holds one of `stop_strings`;
    `fixed_length` forbids EOS until `length` tokens (the bench: the same work every time). Runs the model as it is: the caller sets ratio 0. A
    diffusion checkpoint's mask token and embedding padding rows are never drawn, as the sampler never
    draws them (the padding rows' logits are no tokens' at all).
    """
    if options.temperature > 0:  # top_k=0 and top_p=1 switch off transformers' default filters
        draw = dict(do_sample=True, temperature=options.temperature, top_k=options.top_k or 0,
                    top_p=options.top_p or 1.0)
    else:
        draw = dict(do_sample=False)
    if stop_strings:
        draw.update(stopping_criteria=[_TextHoldsStop(tokenizer, context.shape[1], stop_strings)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    devices = [context.device] if context.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # generate draws from the global generator: leave it as it was
        torch.manual_seed(seed)
        out = model.generate(input_ids=context, attention_mask=torch.ones_like(context), use_cache=True,
                             max_new_tokens=length, min_new_tokens=length if fixed_length else 0,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                             suppress_tokens=_never_drawn(model) or None, **draw)
    return out[:, context.shape[1]:]


class _TextHoldsStop(StoppingCriteria):
    """Ends each row of `generate` once the text of its new tokens (from `start`) holds one of `stops`:
    the sampler's watch (`_stop_watch`) reads it the same way. (transformers' own `stop_strings` cannot
    read a word-level vocabulary.)"""

    def __init__(self, tokenizer, start: int, stops: list[str]):
        self.tokenizer, self.start, self.stops = tokenizer, start, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


def _never_drawn(model) -> list[int]:
    """The ids of a diffusion checkpoint that are no prediction: its mask token and the rows past its
    vocabulary (`DiffusionConfig.vocab_size`); none for a causal model."""
    diffusion = DiffusionConfig.from_model_config(model.config)
    if diffusion is None:
        return []
    rows = model.get_output_embeddings().weight.shape[0]
    mask = [diffusion.mask_token_id] if diffusion.mask_token_id is not None else []
    return mask + list(range(diffusion.vocab_size or rows, rows))


class _StopStringReached(Exception):
    """Raised by `_stop_watch`'s hook: what the sample had decided when its text reached a stop string."""

    def __init__(self, tokens: list[int], generated: int, forwards: int):
        super().__init__("the text reached a stop string")
        self.tokens, self.generated, self.forwards = tokens, generated, forwards


def _stop_watch(tokenizer, start: int, stops: list[str]) -> OnStep:
    """The sampler's `on_step` hook that ends one sample once its decided text holds one of `stops`.

    The decided text is that of the committed positions from `start` (the first generated one) up to the
    first still masked: committed tokens never change, so the text before the stop is final there.
    """
    forwards = 0

    def on_step(ids: torch.Tensor, commit_step: torch.Tensor) -> None:
        nonlocal forwards
        forwards += 1  # every committing step follows one forward (a step committing nothing lends it its logits)
        decided = decided_lengths(commit_step[:1], start)[0]
        tokens = text_tokens(ids[0, start:start + decided].tolist(), tokenizer.eos_token_id)
        if any(stop in tokenizer.decode(tokens, skip_special_tokens=True) for stop in stops):
            raise _StopStringReached(tokens, int((commit_step[0, start:] >= 0).sum()), forwards)

    return on_step


def _diffusion_sample(model, tokenizer, prompt: str | None, *, config, length: int, steps: int | None,
                      options: SamplingOptions, stops: list[str]) -> Sample:
    """One timed sample of the sampler; with `stops`, decoding ends once its text holds one of them."""
    context = context_ids(tokenizer, prompt, anchor=config.shift)  # as the sampler builds it
    watch = _stop_watch(tokenizer, len(context), stops) if stops else None

    def run() -> tuple[list[int], int, int]:
        try:
            out = generate_with_details(model, tokenizer, prompt, length=length, steps=steps, options=options,
                                        on_step=watch)
        except _StopStringReached as stop:
            return stop.tokens, stop.generated, stop.forwards
        generated = sum(step >= 0 for step in out.commit_step[0])  # -1: left as EOS when the sampler stopped
        return out.token_ids[0], generated, out.forwards

    seconds, _, (tokens, generated, forwards) = timed(model_device(model), run)
    return Sample(context or [anchor_id(tokenizer)], text_tokens(tokens, tokenizer.eos_token_id), generated,
                  forwards, seconds)


def _draw_sample(model, tokenizer, prompt: str | None, *, config, length: int, steps: int | None,
                 options: SamplingOptions, stops: list[str]) -> Sample:
    """One timed sample after `prompt` (None: unconditional): diffusion with `config` in `steps` (None: the
    sampler's default), else AR (`config=None`) with the seed of `options`; either ends early once its
    text holds one of `stops`."""
    if config is not None:
        return _diffusion_sample(model, tokenizer, prompt, config=config, length=length, steps=steps,
                                 options=options, stops=stops)
    context = context_ids(tokenizer, prompt)
    device = model_device(model)
    ids = torch.tensor([context], device=device)
    seconds, _, new = timed(device, lambda: ar_generate(model, ids, length=length, options=options, seed=options.seed,
                                                        tokenizer=tokenizer, stop_strings=stops))
    new = new[0].tolist()
    return Sample(context, text_tokens(new, tokenizer.eos_token_id), len(new), len(new), seconds)  # a token a forward


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file (one a line) or a .jsonl file (a "prompt" field a line)."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        rows = read_jsonl(path)
        if not all(isinstance(row.get("prompt"), str) for row in rows):
            raise UserError(f"{path}: every line needs a \"prompt\" string; or pass a text file, one prompt a line")
        prompts = [row["prompt"] for row in rows]
    elif path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        raise UserError(f"prompts file not found: {path}; pass a text file (one prompt a line) or a .jsonl file")
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise UserError(f"{path} holds no prompts; write one prompt a line")
    return prompts


def draw_samples(model, tokenizer, prompts: list[str | None], *, config, settings,
                 stops: list[list[str]] | None = None, desc: str | None = None) -> list[Sample]:
    """One timed sample after each prompt (None: unconditional), the i-th with seed `settings.seed + i`:
    the diffusion sampler with `config`, else the causal model's `generate` (`config=None`). The i-th
    ends early once its text holds one of `stops[i]` (what it holds is cut by the caller)."""
    longest = max(len(context_ids(tokenizer, prompt)) for prompt in prompts) + settings.length
    check_context(model.config, longest, f"the longest prompt and {settings.length:,} new tokens",
                  allow_longer=settings.sampling.allow_longer)

    def draw(index: int, prompt: str | None) -> Sample:
        options = replace(settings.sampling, num_samples=1, seed=settings.seed + index)
        return _draw_sample(model, tokenizer, prompt, config=config, length=settings.length,
                            steps=settings.steps, options=options,  # None: one per token, or verified drafts
                            stops=stops[index] if stops else [])

    with evaluation_mode(model, sampling_ratio(config)):
        draw(0, prompts[0])  # warm-up, not counted: a first call pays one-off costs (allocations, kernel choices)
        return [draw(i, prompt) for i, prompt in enumerate(tqdm(prompts, desc=desc, disable=desc is None, leave=False))]


def score_samples(model, tokenizer, *, config, scorer, settings, desc: str | None = None) -> dict:
    """The samples task: `settings.num_samples` unconditional and as many prompted samples (the prompts in
    turn), each kind's quality under `scorer` and its speed, as `unconditional_*` and `prompted_*`."""
    prompts = read_prompts(settings.prompts) if settings.prompts else list(DEFAULT_PROMPTS)
    n = settings.num_samples
    prompted = [prompts[i % len(prompts)] for i in range(n)]
    samples = draw_samples(model, tokenizer, [None] * n + prompted, config=config, settings=settings, desc=desc)
    results = {"n": n}
    for kind, drawn in (("unconditional", samples[:n]), ("prompted", samples[n:])):
        metrics = {**quality(scorer, drawn, batch_size=settings.batch_size), **speed(drawn)}
        results.update({f"{kind}_{name}": value for name, value in metrics.items()})
    return results
