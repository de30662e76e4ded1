"""Speculative decoding of a hybrid model: its diffusion drafts, verified by its own AR head.

Each step is one forward (`adapt.hybrid.verify_and_draft`): the tokens not yet in the KV cache and the
drafts of the step before run causally through the clean stream, and its AR head's distribution p at
each draft decides how many are accepted; in the same forward the draft groups propose the next tokens.

* Greedy (temperature 0): drafts are accepted while each equals the AR head's argmax, then the AR head's
  own next token is appended, so the output is token for token the AR model's greedy decoding.
* Sampling: draft x, drawn from the draft distribution q, is accepted with probability min(1, p(x)/q(x));
  at the first rejection a token is drawn from norm(max(0, p - q)) instead, and after the last draft
  from p itself (Chen et al. 2023, arXiv 2302.01318). Every emitted token then follows p exactly: the
  AR head's distribution, shaped by the same temperature, top-k and top-p.

A batch accepts as many drafts as its least lucky row (`n`), so that the rows' caches stay the same
length: each row emits n drafts and then its own next token, which is the draft it accepted at n where
it accepted more (a truncation at a point independent of its own draws, which leaves its output
distribution as it was). Only one count a step is read back to the host: the cache is cropped by it.

This module depends only on torch and dependency-free modules of this package; `adapt export` copies it
into every checkpoint.
"""

from __future__ import annotations

import torch

from .draw import pick, shaped, without_mask_token
from .forward import output_logits
from .hybrid import verify_and_draft

DRAFT_GROUPS = ("one", "every")  # SamplingOptions.draft_groups


@torch.no_grad()
def speculate(model, config, prompt: torch.Tensor, length: int, options, generator: torch.Generator,
              stop_token: int | None = None, on_step=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids (B, P + length), commit step of each position (-1: given), forwards) for `length` tokens after
    `prompt` (B, P). With `stop_token`, decoding ends once every row has produced it; the positions left
    hold it, with commit step -1. `on_step`: as `adapt.sampling.OnStep`, the positions not yet decoded
    shown as the mask id."""
    from transformers import DynamicCache

    cache, tokens, end = DynamicCache(), prompt, prompt.shape[1] + length
    drafts = prompt.new_empty(prompt.shape[0], 0)
    draft_logits = None  # the shaped logits each draft was drawn from (B, m, V)
    commit_step = torch.full((prompt.shape[0], end), -1, dtype=torch.long, device=prompt.device)
    forwards = 0
    while tokens.shape[1] < end:
        known, cached, waiting = tokens.shape[1], cache.get_seq_length(), drafts.shape[1]
        groups = list(range(waiting + 1)) if options.draft_groups == "every" else [waiting]
        # no group reaches past the last position asked for (the model's positions were checked up to it)
        width = min(config.mode.draft_size, end - (known - 1 + waiting))
        clean, grouped = verify_and_draft(model, cache, torch.cat([tokens[:, cached:], drafts], dim=1), cached,
                                          [known - 1 + n for n in groups], width, config.mask_token_id)
        verifier = shaped(without_mask_token(output_logits(model, clean[:, known - 1 - cached:]),
                                             config.mask_token_id), options)
        accepted, own = verify(verifier, drafts, draft_logits, options, generator)
        n = int(accepted.min())  # the one host read of a step: how much of the cache to keep
        emitted = own if n == waiting else torch.where(accepted > n, drafts[:, n], own)
        tokens = torch.cat([tokens, drafts[:, :n], emitted[:, None]], dim=1)
        commit_step[:, known:tokens.shape[1]] = forwards
        cache.crop(known + n - cache.get_seq_length())  # the accepted tokens stay; rejected drafts and every group go
        forwards += 1
        if on_step is not None:
            on_step(torch.cat([tokens, tokens.new_full((tokens.shape[0], max(end - tokens.shape[1], 0)),
                                                       config.mask_token_id)], dim=1)[:, :end], commit_step)
        drafts, draft_logits = _next_drafts(model, config, options, grouped, groups, n, end - tokens.shape[1],
                                            generator)
        if stop_token is not None and (tokens[:, prompt.shape[1]:] == stop_token).any(dim=1).all():
            break
    tokens = tokens[:, :end]
    if tokens.shape[1] < end:  # stopped at the stop token: the rest is it, never generated
        tokens = torch.cat([tokens, tokens.new_full((tokens.shape[0], end - tokens.shape[1]), stop_token)], dim=1)
    return tokens, commit_step, forwards


def _next_drafts(model, config, options, grouped: torch.Tensor, groups: list[int], accepted: int, room: int,
                 generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafts (B, m) for the next step and the shaped logits they were drawn from: those of the group
    that assumed `accepted` drafts (none if no group did), without its first output (the AR head's
    token's position), at most `room` - 1 of them (the next step's own token comes on top)."""
    if accepted not in groups or room <= 1:
        return grouped.new_empty(grouped.shape[0], 0, dtype=torch.long), None
    hidden = grouped[:, groups.index(accepted), 1:room]
    logits = shaped(without_mask_token(output_logits(model, hidden), config.mask_token_id), options)
    return pick(logits, options, generator), logits


def verify(verifier: torch.Tensor, drafts: torch.Tensor, draft_logits: torch.Tensor | None, options, generator):
    """(accepted (B,), own (B,)): how many of the m `drafts` (B, m) each row accepts, and the token it emits
    after them, given the AR head's shaped logits at each draft and after the last, `verifier` (B, m + 1, V),
    and the shaped logits the drafts were drawn from, `draft_logits` (B, m, V)."""
    waiting = drafts.shape[1]
    if options.temperature == 0:
        best = verifier.argmax(dim=-1)
        accepted = (drafts == best[:, :waiting]).long().cumprod(dim=1).sum(dim=1)
        return accepted, best.gather(1, accepted[:, None]).squeeze(1)
    p = verifier.softmax(dim=-1)
    if waiting == 0:
        return drafts.new_zeros(drafts.shape[0]), pick(verifier[:, 0], options, generator)
    q = draft_logits.softmax(dim=-1)
    p_draft, q_draft = p[:, :waiting].gather(-1, drafts[..., None]).squeeze(-1), q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(p_draft.shape, generator=generator, device=generator.device).to(p_draft.device)
    accepted = (u * q_draft < p_draft).long().cumprod(dim=1).sum(dim=1)  # u < p/q, without dividing by 0
    # where a row stopped: the residual norm(max(0, p - q)) after a rejection, p itself after the last draft
    leftover = torch.cat([(p[:, :waiting] - q).clamp(min=0), p[:, waiting:]], dim=1)
    chosen = leftover.gather(1, accepted[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    own = torch.multinomial(chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=1e-30), 1, generator=generator)
    return accepted, own.squeeze(1)
