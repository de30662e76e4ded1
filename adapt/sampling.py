"""The reverse process: generate and infill with a masked diffusion LM.

Start with the positions to fill set to the mask token. Each step predicts every still-masked position
of the current block at once (with the shift: the prediction for position i is read at i-1, and the LM
head runs only on those positions), draws a token for each, and commits
some of them; the rest stay masked for the next step. Given tokens (a prompt, the text around infill
spans) are never changed. Which predictions are committed:

* `random`: each masked position with probability 1/(steps left), as in DiffuLLaMA;
* `confidence`: the highest probability of the drawn token first (MaskGIT, LLaDA);
* `margin`: the largest gap between the top two probabilities first;
* `entropy`: the lowest entropy of the predicted distribution first (Dream).

For the last three the number committed per step is fixed in advance: the tokens are split as evenly
as possible over the steps, so exactly `steps` forwards run and each commits at least one token. With
`random` a step can commit nothing; the next step then sees the same input, so its logits are reused
instead of recomputed, and fewer than `steps` forwards may run.

`block_size` decodes semi-autoregressively: the positions to fill are cut into blocks of `block_size`
left to right, and a block is finished before the next one starts (the later blocks stay masked in the
input); a block model decodes in its own blocks. The steps are shared between blocks in proportion to
their sizes. Which blocks, and how a step's logits are computed, is the model's mode's (adapt/mode.py).

The settings of the draw and the commit order (strategy, temperature, top-k, top-p, block size, number
of samples, seed, progress bar) are one `SamplingOptions`, validated when it is made. Every public
function takes it as `options=` and any of its fields as keywords, which override `options`.

A generated continuation ends at its first EOS: the texts `generate` returns stop before it (the model
has said the text is finished; what it drew after EOS is not part of the answer). The details keep all
`length` ids and commit steps, EOS and what follows included. Decoding in blocks, `generate` stops
once every sample has an EOS in the finished blocks (`stop_at_eos`): the text is final by then, and
the positions not generated are EOS with commit step -1. Infill spans are not cut: they sit between
given texts, and the text is the whole input with the spans filled.

The sampler puts the model in eval mode for the duration (dropout would make even greedy samples
random) and restores the caller's training flag afterwards.

Key/value caches (`cache`), each mode's own. A block diffusion model is causal across its blocks, so
the keys and values of finished blocks never change and its cache is exact (`adapt.block.BlockCache`).
A fully bidirectional model has no exact cache: at attention ratio 1 the keys and values of the prompt
depend on the masked (and then committed) positions after it and change at every step. By default it
runs the whole sequence every step; `cache="prefix"` or `"dual"` opt in to Fast-dLLM's approximate
caches for semi-autoregressive decoding (`adapt.bidirectional.ApproximateCache`), refreshed at the
start of every block.

This module depends only on torch, tqdm and dependency-free modules of this package
(`adapt.export.REMOTE_CODE_FILES`). `adapt export` copies all of them verbatim into every checkpoint,
where the remote code (`modeling_adapt_diffusion.py`) calls this same sampler: one implementation, no
copy to drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from .diffusion import DiffusionConfig
from .draw import pick, shaped, without_mask_token
from .errors import UserError, check_type
from .limits import EXTRAPOLATION_FACTOR, check_context
from .speculative import DRAFT_GROUPS, speculate
from .settings import TORCH_SEEDS, at_least, between, check_settings, default_of

STRATEGIES = ("random", "confidence", "margin", "entropy")
CACHES = ("exact", "none", "prefix", "dual")  # see SamplingOptions.cache
DECODINGS = ("auto", "verify", "diffusion")  # see SamplingOptions.decoding
DEFAULT_SPAN_LENGTH = 8  # tokens a plain "[MASK]" stands for
DEFAULT_MASK_MARKER = "[MASK]"
MAX_NUM_SAMPLES = 1024  # samples are one batch: its memory grows with them, so one argument must not be unbounded


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are drawn and committed. Invalid values raise `UserError` when the options are made.

    Each field's help is the help of its `adapt generate` flag (`adapt.flags`).
    """

    strategy: Literal[STRATEGIES] = field(default="confidence", metadata={
        "help": "which predictions to commit each step: random, or the surest first by the drawn token's "
                "probability (confidence), the gap between the top two (margin) or the entropy"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy", **at_least(0)})
    top_k: int | None = field(default=None, metadata={
        "help": "draw from the k most likely tokens only (default: all)", **at_least(1)})
    top_p: float | None = field(default=None, metadata={
        "help": "draw from the smallest set of tokens with probability >= p (default: all)",
        **between(0, 1, low_open=True)})
    block_size: int | None = field(default=None, metadata={
        "help": "denoise in blocks of this many tokens, left to right (default: one block)", **at_least(1)})
    num_samples: int = field(default=1, metadata={"help": "samples denoised as one batch", **at_least(1)})
    seed: int | None = field(default=None, metadata={"help": "same seed, same output (default: a fresh one)",
                                                       **TORCH_SEEDS})
    progress: bool | None = field(default=False, metadata={"help": "a progress bar; None = when stderr is a terminal"})
    # what limits.check_context allows past the model's positions
    allow_longer: bool = field(default=False, metadata={
        "help": f"let a RoPE model (Llama, Qwen, ...) run up to {EXTRAPOLATION_FACTOR}x its trained positions, "
                "with a warning (default: refused)"})
    # Which keys and values a step reuses. "exact": a block model keeps its finished blocks, so a step
    # runs only the current block (the same output as "none"); a bidirectional model reuses nothing.
    # "none": every step runs the whole sequence. "prefix" / "dual" (Fast-dLLM, bidirectional models
    # with a `block_size`): keep the keys and values before the current block ("dual": and after it)
    # from one full forward at the block's start, so a step runs the block and what follows it ("dual":
    # the block only). An approximation: the kept keys were computed while the block was masked.
    cache: Literal[CACHES] = field(default="exact", metadata={
        "help": "keys and values reused between steps: exact (a block model's finished blocks), none (recompute "
                "every step), prefix or dual (Fast-dLLM's approximate caches for bidirectional models with a "
                "block size)"})
    # Commit every position of the current block whose confidence (the drawn token's probability) is at
    # least this, and at least an even share of what is left (Fast-dLLM's parallel decoding); `steps`
    # becomes an upper bound. None: a fixed number per step. Needs strategy "confidence".
    threshold: float | None = field(default=None, metadata={
        "help": "commit every position at least this confident each step (e.g. 0.9, Fast-dLLM); the steps "
                "become an upper bound (default: a fixed number per step)", **between(0, 1, low_open=True)})
    # Decoding in blocks (a block model, or a `block_size`): `generate` stops at the end of the first block
    # after which every sample has produced EOS; the positions left are EOS (the text ends at the first
    # EOS anyway) and the forwards they would cost are saved.
    stop_at_eos: bool = field(default=True, metadata={
        "help": "decoding in blocks: stop after the first block at whose end every sample has produced EOS"})
    # How a model with an AR head (hybrid) turns its drafts into tokens: "verify" checks them with the AR
    # head (speculative decoding: exactly the AR head's output distribution, several tokens a forward);
    # "diffusion" denoises them as any diffusion model; "auto" verifies where the model can, unless a
    # threshold asks for diffusion decoding.
    decoding: Literal[DECODINGS] = field(default="auto", metadata={
        "help": "a model with an AR head (hybrid): verify its drafts with it (speculative decoding, the AR "
                "head's exact distribution), or diffusion-decode them; auto: verify where the model can, "
                "unless a threshold is given"})
    # Verifying: one draft group a forward, which assumes every draft accepted ("one"), or one for each
    # number of drafts accepted ("every", TiDAR's pre-drafting: D times the draft positions a forward).
    # "every" by measurement: on SmolLM2 after 245,760 tokens of hybrid conversion it committed 1.38 tokens
    # a forward against 1.21, at 1.16x the AR model's tokens/s against 1.15x on a 2-core CPU (bf16,
    # docs/performance.md); on a GPU the extra positions cost even less.
    draft_groups: Literal[DRAFT_GROUPS] = field(default="every", metadata={
        "help": "verifying: draft the next tokens assuming every draft accepted (one), or for each number "
                "accepted (every, TiDAR's pre-drafting, more positions a forward)"})

    def __post_init__(self):
        check_settings(self)
        if self.num_samples > MAX_NUM_SAMPLES:
            raise UserError(f"num samples = {self.num_samples} is more than one batch may hold ({MAX_NUM_SAMPLES}); "
                            "draw them in several calls, each with its own seed")
        if self.threshold is not None and self.strategy != "confidence":
            raise UserError(f"threshold decoding commits by confidence; use strategy 'confidence', not {self.strategy!r}")
        if self.threshold is not None and self.decoding == "verify":
            raise UserError("a threshold commits drafts by the diffusion model's confidence, verification by the AR "
                            "head's; drop the threshold or use decoding 'diffusion'")

    @classmethod
    def with_overrides(cls, options: SamplingOptions | None, overrides: dict) -> SamplingOptions:
        """`options` (None: the defaults) with the fields named in `overrides` replaced."""
        names = [field.name for field in fields(cls)]
        unknown = [name for name in overrides if name not in names]
        if unknown:
            raise TypeError(f"unknown sampling option {', '.join(map(repr, unknown))}; the options are "
                            f"{', '.join(names)}")
        return replace(options if options is not None else cls(), **overrides)


# Called after every step that commits tokens, with the sequences so far (B, L: the mask id where nothing
# is committed yet) and each position's commit step (-1: given or not yet committed). It may raise to
# stop the decoding (a chat's Ctrl-C, a server whose client has gone); it must not change the tensors.
OnStep = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class Denoised:
    ids: torch.Tensor  # (B, L) the sequences with every masked position filled
    commit_step: torch.Tensor  # (B, L) the step (0-based) at which each position was committed; -1 = given
    forwards: int  # model forwards that ran


@dataclass
class Generation:
    texts: list[str]  # one continuation per sample, prompt excluded, ending before the first EOS
    prompt_ids: list[int]
    token_ids: list[list[int]]  # all generated ids of each sample, EOS and what follows it included
    commit_step: list[list[int]]  # the step at which each generated token was committed
    forwards: int


@dataclass
class Infilling:
    texts: list[str]  # the full text with the spans filled, one per sample
    spans: list[list[str]]  # the text of each filled span, per sample
    token_ids: list[list[int]]  # the whole sequence fed to the model, per sample
    commit_step: list[list[int]]  # -1 for given tokens
    forwards: int


def generate(
    model,
    tokenizer,
    prompt: str | None = None,
    *,
    length: int,
    steps: int | None = None,
    options: SamplingOptions | None = None,
    **overrides,
) -> list[str]:
    """Generate `length` tokens after `prompt` (or after BOS) in `steps` denoising steps (None: one per
    token), or, on a model that verifies its drafts with its AR head, in as many forwards as they take.

    Returns one continuation per sample, prompt excluded, ending before its first EOS. The sampling
    settings are `options` with any `SamplingOptions` field given as a keyword (`temperature=0.8`,
    `seed=0`, ...) overriding it.
    """
    return generate_with_details(model, tokenizer, prompt, length=length, steps=steps, options=options,
                                 **overrides).texts


def generate_with_details(
    model,
    tokenizer,
    prompt: str | None = None,
    *,
    length: int,
    steps: int | None = None,
    options: SamplingOptions | None = None,
    on_step: OnStep | None = None,
    **overrides,
) -> Generation:
    """`generate`, also returning the token ids, the step each token was committed at, and the forwards.

    The ids and commit steps cover all `length` positions; only the texts end at the first EOS.
    `on_step` watches the decoding (see `OnStep`).
    """
    options = SamplingOptions.with_overrides(options, overrides)
    prompt_ids = context_ids(tokenizer, prompt, anchor=_diffusion_config(model).shift)
    out = generate_ids(model, tokenizer, [prompt_ids] * options.num_samples, length=length, steps=steps,
                       options=options, on_step=on_step)
    rows = out.ids.tolist()
    start = len(prompt_ids)
    return Generation(
        texts=[continuation_text(tokenizer, row, start) for row in rows],
        prompt_ids=prompt_ids,
        token_ids=[row[start:] for row in rows],
        commit_step=out.commit_step[:, start:].tolist(),
        forwards=out.forwards,
    )


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    length: int,
    steps: int | None = None,
    options: SamplingOptions | None = None,
    on_step: OnStep | None = None,
    **overrides,
) -> Denoised:
    """The decoding of `generate_with_details` for one row per prompt (token ids, all of one length; BOS
    included where the tokenizer adds one, see `context_ids`): a caller's own batch, such as a server's
    concurrent requests. `num_samples` is not read here: the rows are the samples. Sampling settings: as
    for `generate`. Returns the whole sequences, prompts included."""
    options = SamplingOptions.with_overrides(options, overrides)
    check_positive(length=length)
    if len({len(prompt) for prompt in prompts}) != 1:
        raise ValueError("every prompt must have the same number of tokens (one or more prompts)")
    config = _diffusion_config(model)
    verifying = verifies(config, options)
    if verifying and steps is not None:
        raise UserError("a hybrid model verifying its drafts takes as many forwards as its drafts are accepted; "
                        "drop the steps, or pass decoding 'diffusion' to denoise in that many steps")
    steps = length if steps is None else steps  # one per token; 0 stays 0 and is refused
    check_steps(steps, length)
    prompt_length = len(prompts[0])
    check_context(model.config, prompt_length + length, f"the prompt and {length:,} new tokens",
                  allow_longer=options.allow_longer)
    ids = torch.tensor([prompt + [config.mask_token_id] * length for prompt in prompts], device=_device(model))
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[:, prompt_length:] = True
    # Stopping cannot change the texts: it happens only at the end of a block, once every sample has an
    # EOS in the finished blocks; everything before that EOS is committed, and committed tokens never
    # change, so the text (which ends there) is final. Only the positions after it are left ungenerated.
    stop = tokenizer.eos_token_id if options.stop_at_eos else None
    if verifying:
        return draft_and_verify(model, ids[:, :prompt_length], config, length, stop, options, on_step=on_step)
    return denoise(model, ids, fill, config, steps=steps, stop_token=stop, options=options, on_step=on_step)


def infill(
    model,
    tokenizer,
    text: str,
    *,
    mask_marker: str = DEFAULT_MASK_MARKER,
    span_length: int = DEFAULT_SPAN_LENGTH,
    steps: int | None = None,
    options: SamplingOptions | None = None,
    **overrides,
) -> str:
    """Fill every marker in `text` and return the whole text; every given character is kept unchanged.

    `[MASK:5]` stands for 5 tokens, a plain `[MASK]` for `span_length` tokens (for another
    `mask_marker`, the count goes before its closing bracket, `<blank:5>`, or at its end, `___:5`).
    `steps` defaults to one step per masked token. Sampling settings: as for `generate`.
    """
    options = SamplingOptions.with_overrides(options, overrides)
    if options.num_samples != 1:
        raise UserError(f"infill returns one text, not {options.num_samples}; use infill_with_details for "
                        "several samples")
    return infill_with_details(model, tokenizer, text, mask_marker=mask_marker, span_length=span_length,
                               steps=steps, options=options).texts[0]


def infill_with_details(
    model,
    tokenizer,
    text: str,
    *,
    mask_marker: str = DEFAULT_MASK_MARKER,
    span_length: int = DEFAULT_SPAN_LENGTH,
    steps: int | None = None,
    options: SamplingOptions | None = None,
    on_step: OnStep | None = None,
    **overrides,
) -> Infilling:
    """`infill` for `num_samples` samples, also returning the spans, token ids and commit steps; `on_step`
    watches the decoding (see `OnStep`)."""
    options = SamplingOptions.with_overrides(options, overrides)
    if options.decoding == "verify":
        raise UserError("verification decodes left to right, and infilling fills spans between given texts; use "
                        "decoding 'auto' or 'diffusion'")
    check_positive(span_length=span_length)
    config = _diffusion_config(model)
    pieces = split_infill_text(text, mask_marker, span_length)
    # the spans alone first, before lists of their size are built
    check_context(model.config, sum(p for p in pieces if isinstance(p, int)), "the spans together",
                  allow_longer=options.allow_longer)

    # Tokenize each given piece on its own so that the spans sit exactly between them. Spaces right
    # before a span are left to the span: BPE vocabularies attach a space to the word after it, so a
    # lone trailing space token would be an input the model never saw in training.
    sequence, spans = _infill_sequence(tokenizer, pieces, config)
    masked = sum(end - start for start, end in spans)
    steps = masked if steps is None else steps
    check_steps(steps, masked)
    check_context(model.config, len(sequence), "the text with its spans", allow_longer=options.allow_longer)

    ids = torch.tensor([sequence] * options.num_samples, device=_device(model))
    fill = torch.zeros_like(ids, dtype=torch.bool)
    for start, end in spans:
        fill[:, start:end] = True
    out = denoise(model, ids, fill, config, steps=steps, options=options, on_step=on_step)
    rows = out.ids.tolist()
    # Splice the decoded spans into the original pieces, so every given character is kept as written;
    # a span's leading space is dropped where the given text already ends with one.
    filled, texts = [], []
    for row in rows:
        span_texts, parts = iter(_decode_after(tokenizer, row, start, end) for start, end in spans), []
        for piece in pieces:
            if isinstance(piece, int):
                span = next(span_texts)
                if parts and parts[-1].endswith(" ") and span.startswith(" "):
                    span = span[1:]
                piece = span
            parts.append(piece)
        filled.append([part for part, piece in zip(parts, pieces) if isinstance(piece, int)])
        texts.append("".join(parts))
    return Infilling(texts=texts, spans=filled, token_ids=rows, commit_step=out.commit_step.tolist(),
                     forwards=out.forwards)


def _infill_sequence(tokenizer, pieces: list, config: DiffusionConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of the text with each span as mask tokens, and each span's (start, end)."""
    sequence, spans = _leading_ids(tokenizer), []
    for index, piece in enumerate(pieces):
        if isinstance(piece, int):
            if not sequence and config.shift:
                sequence.append(anchor_id(tokenizer))  # position 0 is never predicted
            spans.append((len(sequence), len(sequence) + piece))
            sequence += [config.mask_token_id] * piece
        else:
            before_span = index + 1 < len(pieces) and isinstance(pieces[index + 1], int)
            given = piece.rstrip(" ") if before_span else piece
            sequence += tokenizer(given, add_special_tokens=False)["input_ids"] if given else []
    return sequence, spans


def split_infill_text(
    text: str, mask_marker: str = DEFAULT_MASK_MARKER, span_length: int = DEFAULT_SPAN_LENGTH
) -> list:
    """Split `text` into given strings and span lengths (ints), in order; empty strings are dropped.

    "a [MASK:3] b [MASK]" -> ["a ", 3, " b ", span_length].
    """
    if not mask_marker:
        raise UserError("the mask marker is empty; pass a marker such as '[MASK]'")
    head, tail = _marker_parts(mask_marker)
    # A count is whatever stands between ':' and the tail, so a malformed one ("[MASK:abc]") is refused
    # rather than kept as literal text.
    pattern = re.escape(head) + (rf"(?::([^{re.escape(tail)}]*))?" if tail else r"(?::(\d+))?") + re.escape(tail)
    pieces, start = [], 0
    for match in re.finditer(pattern, text):
        if match.start() > start:
            pieces.append(text[start:match.start()])
        if match.group(1) is not None and not match.group(1).isdecimal():
            raise UserError(f"span {match.group(0)!r} has no token count; write a count of tokens, "
                            f"such as {_sized(mask_marker, 5)!r}")
        count = span_length if match.group(1) is None else int(match.group(1))
        if count < 1:
            raise UserError(f"span {match.group(0)!r} asks for {count} tokens; give a span length of at least 1")
        pieces.append(count)
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    if not any(isinstance(piece, int) for piece in pieces):
        raise UserError(f"the text has no {mask_marker!r} marker to fill; mark each span with "
                        f"{mask_marker!r} or a sized marker such as {_sized(mask_marker, 5)!r}")
    return pieces


def verifies(config: DiffusionConfig, options: SamplingOptions) -> bool:
    """Whether generating verifies the model's drafts with its AR head (`SamplingOptions.decoding`)."""
    if options.decoding == "verify" and not config.mode.has_ar_head:
        raise UserError(f"decoding 'verify' checks drafts with the model's AR head, and a {config.mode.name} model "
                        "has none; use decoding 'auto' or 'diffusion'")
    verifying = config.mode.has_ar_head and options.decoding != "diffusion" and options.threshold is None
    if not verifying and options.draft_groups != default_of(SamplingOptions, "draft_groups"):
        raise UserError(f"draft groups are how a hybrid model drafts while its AR head verifies, and this "
                        f"{config.mode.name} model decodes by diffusion here; drop draft_groups")
    return verifying


def draft_and_verify(model, prompt: torch.Tensor, config: DiffusionConfig, length: int, stop_token: int | None,
                     options: SamplingOptions, on_step: OnStep | None = None) -> Denoised:
    """`length` tokens after `prompt` (B, P) by speculative decoding (adapt/speculative.py), in eval mode."""
    config.mode.check_sampling(model, options, prompt.shape[1] + length)
    was_training = model.training
    model.eval()
    try:
        ids, commit_step, forwards = speculate(model, config, prompt, length, options,
                                               _generator(options.seed, prompt.device), stop_token, on_step)
    finally:
        model.train(was_training)
    return Denoised(ids=ids, commit_step=commit_step, forwards=forwards)


@torch.no_grad()
def denoise(
    model,
    ids: torch.Tensor,
    fill: torch.Tensor,
    config: DiffusionConfig,
    *,
    steps: int,
    stop_token: int | None = None,
    options: SamplingOptions | None = None,
    on_step: OnStep | None = None,
    **overrides,
) -> Denoised:
    """Fill the positions where `fill` (bool (B, L)) is True; every other token is held fixed.

    Every row must have the same number of positions to fill (the commit schedule is shared). The rows
    are the samples: `num_samples` is not read here. Sampling settings: as for `generate`. The model's
    mode (`config.mode`) says in which blocks the positions are decoded, left to right, and with which
    cache (a block model: its own blocks, each given the finished ones before it through its exact KV
    cache unless `cache="none"`). With `stop_token`, the loop ends after the first block at whose end
    every row has generated that token; the positions still to fill get it, with commit step -1.
    `on_step` watches the decoding (see `OnStep`).
    """
    options = SamplingOptions.with_overrides(options, overrides)
    counts = fill.sum(dim=1)
    if len(set(counts.tolist())) != 1:
        raise ValueError("every row must have the same number of positions to fill")
    check_steps(steps, int(counts[0]))
    if config.shift and fill[:, 0].any():
        raise UserError("position 0 cannot be generated with the shift (it is never predicted); start with a "
                        "given token such as BOS")
    config.mode.check_sampling(model, options, ids.shape[1])
    block_of = config.mode.decoding_blocks(fill, options)
    sizes = torch.bincount(block_of[0][fill[0]]).tolist()
    if steps < len(sizes):
        raise UserError(f"{steps} steps cannot cover {len(sizes)} blocks of {options.block_size} tokens; "
                        f"use at least {len(sizes)} steps or a larger block size")

    was_training = model.training
    model.eval()  # dropout would make even greedy samples random
    try:
        logits_for = config.mode.logits_function(model, config, options.cache)
        return _denoise_blocks(logits_for, ids.masked_fill(fill, config.mask_token_id), block_of, sizes,
                               mask_token_id=config.mask_token_id, steps=steps, stop_token=stop_token,
                               options=options, on_step=on_step)
    finally:
        model.train(was_training)


def _denoise_blocks(logits_for, ids, block_of, sizes, *, mask_token_id, steps, stop_token, options,
                    on_step) -> Denoised:
    """The loop of `denoise`: block after block (`block_of` (B, L): -1 = given), each in its share of steps."""
    generator = _generator(options.seed, ids.device)
    commit_step = torch.full_like(ids, -1)
    masked = block_of >= 0
    forwards, step = 0, 0
    bar = tqdm(total=steps, desc="denoising", unit="step",
               disable=None if options.progress is None else not options.progress)
    for block, block_steps in enumerate(_share(steps, sizes)):
        schedule = _even_split(sizes[block], block_steps)
        logits = None  # reused while the input is unchanged
        in_block = block_of == block
        for block_step, quota in enumerate(schedule):
            candidates = masked & in_block
            if not candidates.any():  # `random` or a threshold finished the block early: its other steps are idle
                step += 1
                bar.update(1)
                continue
            if logits is None:
                logits = logits_for(ids, candidates, in_block)
                forwards += 1
            tokens, score = _draw(logits, mask_token_id, options, generator)
            commit = _choose(candidates, score, quota=quota, steps_left=block_steps - block_step, options=options,
                             generator=generator)
            proposal = torch.zeros_like(ids)
            proposal[candidates] = tokens
            ids = torch.where(commit, proposal, ids)
            commit_step[commit] = step
            masked &= ~commit
            if commit.any():
                logits = None
                if on_step is not None:
                    on_step(ids, commit_step)
            step += 1
            bar.update(1)
        generated = (block_of >= 0) & ~masked
        if stop_token is not None and ((ids == stop_token) & generated).any(dim=1).all():
            ids = ids.masked_fill(masked, stop_token)
            break
    bar.close()
    return Denoised(ids=ids, commit_step=commit_step, forwards=forwards)


def _choose(candidates, score, *, quota: int, steps_left: int, options: SamplingOptions, generator) -> torch.Tensor:
    """Which candidates (bool (B, L)) to commit this step, from their scores (row-major, one each)."""
    commit = torch.zeros_like(candidates)
    if options.strategy == "random":
        u = torch.rand(score.shape, generator=generator, device=generator.device)
        commit[candidates] = u.to(score.device) < 1.0 / steps_left
        return commit
    dense = torch.full(candidates.shape, -torch.inf, device=candidates.device)
    dense[candidates] = score
    if options.threshold is None:
        return commit.scatter_(1, dense.topk(quota, dim=1).indices, True)
    # Every candidate at least as confident as the threshold, and never fewer than an even share of
    # what is left over the steps left (one at the least), so the block still ends within its steps.
    left = candidates.sum(dim=1)
    count = torch.maximum((dense >= options.threshold).sum(dim=1), (left + steps_left - 1) // steps_left)
    rank = dense.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return (rank < count[:, None]) & candidates


def _draw(logits, mask_token_id, options: SamplingOptions, generator):
    """Draw a token for each row of `logits` (N, V); return it and its commit score (higher = sooner).

    Temperature, top-k and top-p shape the draw only; the scores are read from the model's unmodified
    distribution, so they rank positions by how certain the model is whatever the sampling settings.
    """
    logits = without_mask_token(logits, mask_token_id)
    model_probs = logits.softmax(dim=-1)  # the scores use the model's own distribution
    tokens = pick(shaped(logits, options), options, generator)

    probs, strategy = model_probs, options.strategy
    if strategy == "confidence":
        score = probs.gather(1, tokens[:, None]).squeeze(1)
    elif strategy == "margin":
        top2 = probs.topk(2, dim=-1).values
        score = top2[:, 0] - top2[:, 1]
    elif strategy == "entropy":
        score = (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # minus the entropy
    else:  # random: the commit decision is a coin flip per position
        score = torch.zeros_like(tokens, dtype=torch.float)
    return tokens, score


def _even_split(total: int, steps: int) -> list[int]:
    """`total` tokens over `steps` steps, as evenly as possible, larger shares first."""
    return [total // steps + (1 if i < total % steps else 0) for i in range(steps)]


def _share(steps: int, sizes: list[int]) -> list[int]:
    """Steps per block: proportional to the block sizes, each block between 1 and its size."""
    total = sum(sizes)
    quota = [steps * size / total for size in sizes]
    shares = [min(size, max(1, int(q))) for q, size in zip(quota, sizes)]
    while sum(shares) < steps:  # give the next step to the block furthest below its quota
        room = [i for i in range(len(sizes)) if shares[i] < sizes[i]]
        shares[max(room, key=lambda i: quota[i] - shares[i])] += 1
    while sum(shares) > steps:  # only possible through the minimum of 1: take from the furthest above
        spare = [i for i in range(len(sizes)) if shares[i] > 1]
        shares[max(spare, key=lambda i: shares[i] - quota[i])] -= 1
    return shares


def continuation_text(tokenizer, ids: list[int], start: int) -> str:
    """The text of the continuation ids[start:] (after the context ids[:start]), ending before its first EOS."""
    return _decode_after(tokenizer, ids, start, text_end(ids, start, tokenizer.eos_token_id))


def decided_lengths(commit_step: torch.Tensor, start: int) -> list[int]:
    """For each row of an `OnStep` hook's commit steps (B, L): how many positions from `start` on are
    committed before the first one that is not. Committed tokens never change, so the text of those
    positions is final while the rest is still being decoded."""
    return (commit_step[:, start:] >= 0).long().cumprod(dim=1).sum(dim=1).tolist()


def text_end(ids: list[int], start: int, eos_token_id: int | None) -> int:
    """Where the text of the continuation ids[start:] ends: at its first EOS, else at the end of `ids`."""
    if eos_token_id is not None and eos_token_id in ids[start:]:
        return ids.index(eos_token_id, start)
    return len(ids)


def _decode_after(tokenizer, ids: list[int], start: int, end: int) -> str:
    """The text of ids[start:end] as it reads after ids[:start].

    Decoding the span alone can lose its leading space (SentencePiece drops it at the start of a text),
    so decode with the context and cut the context's text off.
    """
    before = tokenizer.decode(ids[:start], skip_special_tokens=True)
    both = tokenizer.decode(ids[:end], skip_special_tokens=True)
    if both.startswith(before):
        return both[len(before):]
    return tokenizer.decode(ids[start:end], skip_special_tokens=True)


def _diffusion_config(model) -> DiffusionConfig:
    check_type("model", model, torch.nn.Module, "the diffusion model (a torch module; the tokenizer goes second)")
    config = DiffusionConfig.from_model_config(model.config)
    if config is None or config.mask_token_id is None:
        raise UserError("the model has no diffusion settings (no mask token in config.diffusion); "
                        "load an adapted checkpoint, or give it a mask token with adapt.ensure_mask_token")
    return config


def context_ids(tokenizer, text: str | None, *, anchor: bool = True) -> list[int]:
    """Token ids of a given left context: BOS where the tokenizer adds one, then `text`.

    With `anchor`, an empty context becomes one given token (`anchor_id`): with the shift, position 0 is
    never predicted, so whatever follows must not start there.
    """
    ids = _leading_ids(tokenizer)
    if text:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids and anchor:
        ids = [anchor_id(tokenizer)]
    return ids


def _leading_ids(tokenizer) -> list[int]:
    """The BOS id if the tokenizer puts one in front of every text (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        return [bos]
    return []


def anchor_id(tokenizer) -> int:
    """A given first token when there is no prompt: with the shift, position 0 is never predicted."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise UserError("the tokenizer has no BOS or EOS token to start from; pass a prompt")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def check_positive(**values) -> None:
    """Counts that must be whole and at least 1 (the sampler's; chat and distill check theirs with it)."""
    for name, value in values.items():
        check_type(name, value, int, "a whole number")
        if value < 1:
            raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {value}")


def check_steps(steps: int, tokens: int) -> None:
    """Denoising steps for `tokens` tokens: at least 1, at most one a token."""
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if steps > tokens:
        raise UserError(f"{steps} steps for {tokens} tokens would waste forwards (each step commits at "
                        f"least one token); use at most {tokens} steps")


def _marker_parts(marker: str) -> tuple[str, str]:
    """Where a span size goes: before a closing bracket ("[MASK" + ":5" + "]"), else at the end."""
    return (marker[:-1], marker[-1]) if marker[-1] in ")]}>" else (marker, "")


def _sized(marker: str, count: int) -> str:
    head, tail = _marker_parts(marker)
    return f"{head}:{count}{tail}"
