"""How a token is drawn from a model's logits: the mask token left out, then temperature, top-k and
top-p shape the distribution, and the token is sampled from it (greedy at temperature 0).

The masked-diffusion sampler (adapt/sampling.py) and speculative decoding (adapt/speculative.py) draw
through these, so a hybrid model's drafts and its AR head's tokens are shaped alike.

This module depends only on torch; `adapt export` copies it into every checkpoint.
"""

from __future__ import annotations

import torch


def without_mask_token(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """float32 logits with the mask token's at -inf: it is never a prediction."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = -torch.inf
    return logits


def shaped(logits: torch.Tensor, options) -> torch.Tensor:
    """The logits a token is drawn from: divided by the temperature (when > 0), then only the `top_k`
    most likely tokens and the smallest set covering `top_p` kept (`options`: a `SamplingOptions`)."""
    if options.temperature > 0:
        logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if options.top_p is not None and options.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first one always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= options.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits


def pick(shaped_logits: torch.Tensor, options, generator: torch.Generator | None) -> torch.Tensor:
    """A token per row of `shaped_logits` (..., V): drawn from their softmax, or the argmax at temperature 0."""
    if options.temperature == 0:
        return shaped_logits.argmax(dim=-1)
    flat = shaped_logits.reshape(-1, shaped_logits.shape[-1]).softmax(dim=-1)
    return torch.multinomial(flat, 1, generator=generator).reshape(shaped_logits.shape[:-1])
