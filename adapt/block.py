"""Block diffusion (BD3-LM, Fast-dLLM v2): bidirectional inside blocks of B tokens, causal across them.

The sequence is cut into blocks at positions 0, B, 2B, ...; block b is a masked diffusion given the
clean blocks before it, so p(x) = prod_b p(x_b | x_<b). B = 1 with the shift is the AR model.

Training runs every block at once (BD3-LM's vectorised layout): the noisy copy x_t and the clean copy
x_0 side by side, 2L tokens, both at positions 0..L-1. In the mask, noisy block b sees noisy block b
and clean blocks < b; the clean copy is block-causal (clean block b sees clean blocks <= b); the clean
copy never sees the noisy one.

The shift at block boundaries. Token i is predicted at position i-1. Inside a block, position i-1 is in
the same noisy block. For the first token of block b (i = bB), position i-1 is the last of block b-1,
and it is read from the clean copy: there it has seen the clean blocks < b and nothing of block b, which
is exactly what a sampler has when it starts block b (block b-1 finished, block b all masks). The first
token of each block is so predicted the AR way, from clean context alone.

The sampler's cache follows from the same mask: the keys and values of clean blocks depend only on
clean blocks at or before them, so once a block is finished they never change (`BlockCache`).

`BlockMode` is this kind of model as a conversion mode (adapt/mode.py).

This module depends only on torch and dependency-free modules of this package; `adapt export` copies it
into every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import sliding_window
from .errors import UserError
from .forward import cached_forward, check_targets, forward_against, output_logits
from .mode import Mode
from .settings import at_least, check_settings
from .structure import decoder_backbone


def block_ids(length: int, block_size: int, device=None) -> torch.Tensor:
    """The block of each position (L,)."""
    return torch.arange(length, device=device) // block_size


def training_mask(length: int, block_size: int, *, padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Bool (B or 1, 1, 2L, 2L), True = attend: queries and keys [noisy x_t ; clean x_0]: noisy block b
    sees noisy block b and clean blocks < b, clean block b sees clean blocks <= b."""
    blocks = block_ids(length, block_size, device)
    same = blocks[:, None] == blocks[None, :]
    earlier = blocks[None, :] < blocks[:, None]
    return two_copy_mask(noisy_sees_noisy=same, noisy_sees_clean=earlier, clean_sees_clean=same | earlier,
                         padding=padding)


def two_copy_mask(*, noisy_sees_noisy: torch.Tensor, noisy_sees_clean: torch.Tensor, clean_sees_clean: torch.Tensor,
                  padding: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B or 1, 1, 2L, 2L) over [noisy ; clean] from its three (L, L) parts; the clean copy never sees
    the noisy one. Padding keys (2D `padding`, 0 = padding) are hidden in both copies; every query keeps
    its own position so no row is empty."""
    length, device = noisy_sees_noisy.shape[0], noisy_sees_noisy.device
    nothing = torch.zeros(length, length, dtype=torch.bool, device=device)
    mask = torch.cat([torch.cat([noisy_sees_noisy, noisy_sees_clean], dim=1),
                      torch.cat([nothing, clean_sees_clean], dim=1)], dim=0)[None, None]
    if padding is not None:
        keys = padding.to(device=device, dtype=torch.bool).repeat(1, 2)
        mask = mask & keys[:, None, None, :]
        mask = mask | torch.eye(2 * length, dtype=torch.bool, device=device)
    return mask


def training_hidden(
    model: nn.Module,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    targets: torch.Tensor,
    block_size: int,
    *,
    shift: bool = True,
    attention_mask: torch.Tensor | None = None,
    prefix: BlockCache | None = None,
) -> torch.Tensor:
    """Hidden states (N, H) that predict the N `targets` (bool (B, L)) of the noisy sequence, in
    row-major order: one forward over [noisy ; clean] with the block mask.

    The clean copy ends before the last block holding a target: no target reads a later clean block.
    (The noisy copy stays whole: representation alignment reads its hidden states at every position.)
    With `prefix` (the cached clean blocks before the first target, `clean_prefix`) both copies start
    after it and attend to its keys and values: the noisy copies of those blocks are seen by no query.
    The outputs are the same; the cache is left as it was.
    """
    batch, length = noisy.shape
    check_window(model, length)
    start = 0 if prefix is None else prefix.length
    last = int(targets.any(dim=0).nonzero().max()) if targets.any() else length - 1
    clean_end = last // block_size * block_size
    padding = None if attention_mask is None else attention_mask[:, start:]
    kept = length + clean_end - 2 * start  # noisy [start, length), clean [start, clean_end)
    mask = training_mask(length - start, block_size, padding=padding, device=noisy.device)[..., :kept, :kept]
    positions = torch.cat([torch.arange(start, length, device=noisy.device),
                           torch.arange(start, clean_end, device=noisy.device)])
    ids = torch.cat([noisy[:, start:], clean[:, start:clean_end]], dim=1)
    if prefix is None:
        hidden = cached_forward(model, ids, positions, mask, cache=None)
        before = torch.zeros_like(hidden[:, :1])  # position -1: no target reads it (position 0 is never one)
    else:
        hidden = forward_against(model, ids, positions, mask, prefix.cache)
        before = prefix.last_hidden
    outputs = torch.cat([hidden[:, :length - start], before, hidden[:, length - start:]], dim=1)
    rows, columns = targets.nonzero(as_tuple=True)
    return outputs[rows, _source_positions(start, length, block_size, shift, noisy.device)[columns - start]]


def clean_prefix(model: nn.Module, clean: torch.Tensor, targets: torch.Tensor, block_size: int,
                 shift: bool = True) -> BlockCache | None:
    """The cache of the clean blocks before the first block that holds a target in any row, for
    scoring with `training_hidden`; None when that is block 0. Scoring a continuation given a long
    context then runs the context once, not once per Monte Carlo mask."""
    first = int(targets.any(dim=0).float().argmax()) if targets.any() else 0
    start = first // block_size * block_size
    if start == 0:
        return None
    prefix = BlockCache(model, block_size, shift)
    prefix.extend(clean, start)
    return prefix


def check_window(model: nn.Module, length: int) -> None:
    """Refuse sequences longer than a sliding window: the block mask would silently widen it."""
    window = sliding_window(decoder_backbone(model).config)
    if window is not None and length > window:
        raise ValueError(f"a block model cannot run {length} positions past its sliding window ({window}): the "
                         f"block mask would replace the window; use sequences of at most {window} tokens")


def _source_positions(start: int, end: int, block_size: int, shift: bool, device) -> torch.Tensor:
    """(end - start,): for each position in [start, end), the index of the output that predicts it in
    [noisy copy of start..end ; the clean output at start - 1 ; clean copy from start] (see the module doc)."""
    positions = torch.arange(start, end, device=device)
    if not shift:
        return positions - start
    first_of_block = positions % block_size == 0
    return torch.where(first_of_block, end + positions - 2 * start, positions - 1 - start)


class BlockCache:
    """The keys and values of the finished (clean) prefix, for sampling a block model.

    `extend` appends clean positions, block-causally, as training's clean copy computes them;
    `hidden` runs only the block being denoised against the cache and leaves the cache as it was.
    Exact, not an approximation: the prefix never sees what comes after it.
    """

    def __init__(self, model: nn.Module, block_size: int, shift: bool):
        from transformers import DynamicCache

        self.model, self.block_size, self.shift = model, block_size, shift
        self.cache = DynamicCache()
        self.length = 0  # positions held
        self.last_hidden = None  # (B, 1, H): the output at the last cached position

    def extend(self, ids: torch.Tensor, end: int) -> None:
        """Append the clean positions [length, end) of `ids`."""
        if end <= self.length:
            return
        queries = block_ids(end, self.block_size, ids.device)[self.length:]
        keys = block_ids(end, self.block_size, ids.device)
        mask = (keys[None, :] <= queries[:, None])[None, None]
        hidden = self._forward(ids[:, self.length:end], mask)
        self.last_hidden = hidden[:, -1:]
        self.length = end

    def hidden(self, ids: torch.Tensor, end: int, targets: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, H) predicting `targets` (bool (B, L), all in the block [length, end) that
        starts right after the cache), in row-major order."""
        start = self.length
        check_window(self.model, end)
        visible = torch.ones(1, 1, end - start, end - start, dtype=torch.bool, device=ids.device)
        hidden = forward_against(self.model, ids[:, start:end], torch.arange(start, end, device=ids.device), visible,
                                 self.cache)
        before = self.last_hidden if self.last_hidden is not None else torch.zeros_like(hidden[:, :1])
        outputs = torch.cat([before, hidden], dim=1)  # index j: the output at position start + j - 1
        rows, columns = targets.nonzero(as_tuple=True)
        return outputs[rows, columns - start + (0 if self.shift else 1)]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_window(self.model, mask.shape[-1])
        positions = torch.arange(self.length, self.length + ids.shape[1], device=ids.device)
        return cached_forward(self.model, ids, positions, mask, self.cache)


@dataclass(frozen=True)
class BlockMode(Mode):
    """Blocks of `block_size` tokens at positions 0, B, 2B, ...: each a masked diffusion given the clean
    blocks before it. B = 1 with the shift is the AR model."""

    name = "block"
    training_settings = ("block_schedule",)
    block_size: int = field(metadata=at_least(1))

    def __post_init__(self):
        check_settings(self, "diffusion.")  # where config.json and a recipe hold it

    def describe(self) -> str:
        return f"block diffusion, blocks of {self.block_size} tokens (exact KV cache)"

    def attention_ratio(self, annealed: float) -> float:
        return 0.0  # nothing anneals: every forward is given the block mask explicitly

    def grown(self, step: int, steps: int) -> BlockMode:
        """Block sizes 1, 2, 4, ... up to `block_size` in equal stages over `steps` (LLaDA2.0's warm-up)."""
        stages = math.ceil(math.log2(self.block_size)) + 1
        stage = min(stages - 1, step * stages // steps)
        return BlockMode(min(self.block_size, 2 ** stage))

    def hidden(self, model, noisy, clean, targets, *, shift, attention_mask=None, prefix=None, ar_targets=None):
        check_targets(targets, shift)
        return training_hidden(model, noisy, clean, targets, self.block_size, shift=shift,
                               attention_mask=attention_mask, prefix=prefix), None

    def clean_prefix(self, model, clean, targets, shift):
        return clean_prefix(model, clean, targets, self.block_size, shift)

    def context_visibility(self, length, shift, device=None):
        """A target's prediction in the noisy block reads the clean tokens of its own block and every
        token of the earlier blocks. With the shift, a block's first token is predicted at the last
        position of the block before, read from the clean copy: all of the earlier blocks and nothing
        of its own."""
        blocks = block_ids(length, self.block_size, device)
        same, earlier = blocks[:, None] == blocks[None, :], blocks[None, :] < blocks[:, None]
        if shift:
            first_of_block = torch.arange(length, device=device) % self.block_size == 0
            same = same & ~first_of_block[:, None]
        return same, earlier

    def forward_positions(self, length):
        return 2 * length  # the noisy and the clean copy side by side

    def attention_mask_bytes(self, rows, length):
        return rows * self.forward_positions(length) ** 2  # the bool block mask, built once per forward

    def decoding_blocks(self, fill, options):
        """Its own blocks, fixed by position (the ones it was trained on), among those holding a
        position to fill."""
        if options.block_size not in (None, self.block_size):
            raise UserError(f"this block diffusion model decodes in its own blocks of {self.block_size} tokens; "
                            f"drop the sampler's block size ({options.block_size}) or set it to {self.block_size}")
        absolute = block_ids(fill.shape[1], self.block_size, fill.device)
        filled = absolute[fill[0]].unique()  # sorted
        return torch.where(fill, torch.searchsorted(filled, absolute)[None].expand_as(fill), -1)

    def check_sampling(self, model, options, length):
        if options.cache not in ("exact", "none"):
            raise UserError(f"cache {options.cache!r} is for fully bidirectional models; this block diffusion model "
                            "has an exact cache: use cache 'exact' (the default)")

    def logits_function(self, model, config, cache):
        if cache == "none":  # the training computation itself: each block given the clean blocks before it
            return lambda ids, candidates, block: output_logits(model, self.hidden(model, ids, ids, candidates,
                                                                                   shift=config.shift)[0])
        blocks = BlockCache(model, self.block_size, config.shift)

        def cached(ids, candidates, block):
            first = int(candidates.any(dim=0).nonzero()[0])
            start = first // self.block_size * self.block_size
            blocks.extend(ids, start)  # the blocks before this one are finished
            end = min(start + self.block_size, ids.shape[1])
            return output_logits(model, blocks.hidden(ids, end, candidates))
        return cached
