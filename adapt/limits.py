"""The model's position limit: the one check every sequence passes before it is built.

A model is trained up to a number of positions (`max_position_embeddings`, GPT-2's `n_positions`).
Past it, learned position embeddings have no row (an IndexError deep in the forward) and rotary ones
(RoPE) run on positions they never saw. So the sampler and the evaluation compare the length they are
about to build with the limit first, and refuse with the fix. Only a RoPE model may be asked to go
past it (`allow_longer`), with a warning, and never past EXTRAPOLATION_FACTOR times the limit: no single
argument may make the work grow without bound.

This module depends on nothing but `errors`: `adapt export` copies it into every checkpoint with the
sampler that calls it.
"""

from __future__ import annotations

import logging

from .errors import UserError

EXTRAPOLATION_FACTOR = 4  # how far past its trained positions `allow_longer` lets a RoPE model run

logger = logging.getLogger(__name__)


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow, by the config's name for it; None if unstated."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def uses_rope(config) -> bool:
    """Whether positions are rotary (computed for any position) rather than rows of a learned table."""
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))


def usable_positions(config, allow_longer: bool = False) -> int | None:
    """The most positions `check_context` lets through: the model's limit, or with `allow_longer` a RoPE
    model's EXTRAPOLATION_FACTOR times it; None if the config states no limit."""
    limit = max_positions(config)
    if limit is not None and allow_longer and uses_rope(config):
        return EXTRAPOLATION_FACTOR * limit
    return limit


def check_context(config, tokens: int, what: str, *, allow_longer: bool = False, overridable: bool = True) -> None:
    """Refuse `tokens` positions beyond the model's limit; `what` names them ("the prompt and 64 new tokens").

    With `allow_longer`, a RoPE model may run up to EXTRAPOLATION_FACTOR times its limit, with a warning.
    `overridable=False` where the caller offers no `allow_longer` (the message then does not suggest it).
    """
    limit = max_positions(config)
    if limit is None or tokens <= limit:
        return
    rope = uses_rope(config)
    if tokens <= usable_positions(config, allow_longer):
        logger.warning("warning: %s: %s tokens, past the %s positions the model was trained on; "
                       "RoPE runs there, but the output may degrade", what, f"{tokens:,}", f"{limit:,}")
        return
    if not rope:
        fix = "make it shorter; this model's positions are a learned table that ends there"
    elif not overridable:
        fix = "make it shorter"
    elif allow_longer:
        fix = f"make it shorter; --allow-longer (allow_longer=True) reaches only {EXTRAPOLATION_FACTOR * limit:,}"
    else:
        fix = (f"make it shorter, or pass --allow-longer (allow_longer=True) to run this RoPE model up to "
               f"{EXTRAPOLATION_FACTOR * limit:,} positions")
    raise UserError(f"{what}: {tokens:,} tokens, more than the model's {limit:,} positions; {fix}")
