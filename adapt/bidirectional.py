"""The bidirectional mode (DiffuLLaMA): the whole sequence is one block, every position sees every other.

Training runs the corrupted sequence once, at the attention ratio of the annealing schedule (causal at
first, bidirectional at the end; adapt/attention.py). The sampler runs the whole sequence every step,
or, decoding in semi-autoregressive blocks (`SamplingOptions.block_size`), with Fast-dLLM's
approximate caches (`ApproximateCache`): a bidirectional model has no exact cache, since at attention
ratio 1 the keys and values of the prompt depend on every later position, which change at each step.

This module depends only on torch and dependency-free modules of this package; `adapt export` copies it
into every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PARTIAL_MASK_IMPLEMENTATIONS, get_attention_ratio, sliding_window
from .errors import UserError
from .forward import cached_forward, forward_against, output_logits, predict_logits, shifted_hidden
from .mode import Mode
from .structure import decoder_backbone, unwrap_model

APPROXIMATE_CACHES = ("prefix", "dual")  # SamplingOptions.cache values only this mode takes


@dataclass(frozen=True)
class BidirectionalMode(Mode):
    name = "bidirectional"

    def describe(self) -> str:
        return "bidirectional diffusion (one block)"

    def attention_ratio(self, annealed: float) -> float:
        return annealed

    def hidden(self, model, noisy, clean, targets, *, shift, attention_mask=None, prefix=None, ar_targets=None):
        return shifted_hidden(model, noisy, targets, shift=shift, attention_mask=attention_mask), None

    def context_visibility(self, length, shift, device=None):
        everything = torch.ones(length, length, dtype=torch.bool, device=device)
        return everything, torch.zeros_like(everything)

    def forward_positions(self, length):
        return length

    def attention_mask_bytes(self, rows, length):
        return (1 + 4) * rows * length * length  # while annealing: the bool mask and the float32 draws it is cut from

    def decoding_blocks(self, fill, options):
        # A position's block is its rank among the row's positions to fill, // the sampler's block size.
        rank = fill.long().cumsum(dim=1) - 1
        return torch.where(fill, rank // (options.block_size or int(fill[0].sum())), -1)

    def check_sampling(self, model, options, length):
        if options.cache in APPROXIMATE_CACHES:
            _check_approximate_cache(model, options, length)

    def logits_function(self, model, config, cache):
        if cache in APPROXIMATE_CACHES:
            return ApproximateCache(model, config.shift, dual=cache == "dual").logits
        # "exact" and "none": a bidirectional model has no exact cache, every step runs the whole sequence
        return lambda ids, candidates, block: predict_logits(model, ids, candidates, shift=config.shift)


def _check_approximate_cache(model, options, length: int) -> None:
    """Refuse an approximate cache where it does not apply, naming the fix."""
    cache = options.cache
    if options.block_size is None:
        raise UserError(f"cache {cache!r} is refreshed at each block of semi-autoregressive decoding; give a "
                        "block size (block_size=32, --block-size 32) or use cache 'exact'")
    ratio = get_attention_ratio(model)
    if ratio != 1.0:
        raise UserError(f"cache {cache!r} needs a fully bidirectional model (attention ratio 1), this one is at "
                        f"ratio {ratio}; use cache 'exact'")
    implementation = unwrap_model(model).config._attn_implementation
    if implementation not in PARTIAL_MASK_IMPLEMENTATIONS:  # a step's mask spans cached and new keys
        raise UserError(f"cache {cache!r} needs an explicit attention mask, which attention implementation "
                        f"{implementation!r} cannot apply; load the model with attn_implementation='sdpa' or use "
                        "cache 'exact'")
    window = sliding_window(decoder_backbone(model).config)
    if window is not None and length > window:
        raise UserError(f"cache {cache!r} cannot run {length} positions past the model's sliding window "
                        f"({window}): its mask would replace the window; use cache 'exact' or at most {window} "
                        "positions")


class ApproximateCache:
    """Fast-dLLM's prefix and dual caches (arXiv 2505.22618) for a fully bidirectional model decoded in blocks.

    At the first step of each block one forward runs the whole sequence, as without a cache, and its
    keys and values are kept for every position outside the window the later steps of the block
    recompute. The window starts at the block's first position (with the shift one position earlier: the
    output there predicts the block's first token) and ends at the end of the sequence (prefix cache: the
    masked suffix is recomputed) or of the block (dual cache: the suffix is kept too). Each later step
    runs only the window, at its true positions, against the kept keys and values, every key visible.

    Keys are held as [prefix ; suffix] and the window's are appended after them: with every key visible
    the order does not matter (attention sums over keys; RoPE and position embeddings were applied at
    each key's true position before it was kept). An approximation: the kept keys and values were
    computed while the block was still masked, and the window's own changes do not reach them.
    """

    def __init__(self, model, shift: bool, *, dual: bool):
        self.model, self.shift, self.dual = model, shift, dual
        self.kept = None  # DynamicCache of the positions outside the window
        self.window = None  # (start, end) of the positions each step recomputes

    def logits(self, ids: torch.Tensor, candidates: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """The logits (N, V) of `candidates` (bool (B, L)), in row-major order; `block` (bool (B, L)) is
        every position of their block, and a block other than the one cached refreshes the cache."""
        positions = block.any(dim=0).nonzero().squeeze(1)
        window = (int(positions[0]) - int(self.shift), int(positions[-1]) + 1 if self.dual else ids.shape[1])
        if window != self.window:
            hidden, offset = self._refresh(ids, window), 0
        else:
            hidden, offset = self._step(ids), window[0]
        rows, columns = candidates.nonzero(as_tuple=True)
        return output_logits(self.model, hidden[rows, columns - offset - int(self.shift)])

    def _refresh(self, ids: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """Run the whole sequence (the uncached forward) and keep the keys and values outside `window`."""
        from transformers import DynamicCache

        full = DynamicCache()
        hidden = cached_forward(self.model, ids, torch.arange(ids.shape[1], device=ids.device), None, full)
        start, end = window
        self.kept = DynamicCache([
            (torch.cat([keys[..., :start, :], keys[..., end:, :]], dim=-2),
             torch.cat([values[..., :start, :], values[..., end:, :]], dim=-2))
            for keys, values, *_ in full
        ])
        self.window = window
        return hidden

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, end - start, H) of the window, against the kept keys and values."""
        start, end = self.window
        visible = torch.ones(1, 1, end - start, end - start, dtype=torch.bool, device=ids.device)
        # the window's keys and values change every step: not kept
        return forward_against(self.model, ids[:, start:end], torch.arange(start, end, device=ids.device), visible,
                               self.kept)
