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

This module depends only on torch and `attention`; `adapt export` copies it into every checkpoint.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .attention import mask_for_implementation, sliding_window
from .structure import decoder_backbone


def block_ids(length: int, block_size: int, device=None) -> torch.Tensor:
    """The block of each position (L,)."""
    return torch.arange(length, device=device) // block_size


def training_mask(length: int, block_size: int, *, padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Bool (B or 1, 1, 2L, 2L), True = attend: queries and keys [noisy x_t ; clean x_0].

    Padding keys (2D `padding`, 0 = padding) are hidden in both copies; every query keeps its own
    position so no row is empty.
    """
    blocks = block_ids(length, block_size, device)
    same = blocks[:, None] == blocks[None, :]
    earlier = blocks[None, :] < blocks[:, None]
    nothing = torch.zeros(length, length, dtype=torch.bool, device=device)
    mask = torch.cat([torch.cat([same, earlier], dim=1), torch.cat([nothing, same | earlier], dim=1)], dim=0)
    mask = mask[None, None]
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


def cached_forward(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                   cache) -> torch.Tensor:
    """The backbone's last hidden states (B, Q, H) for `ids` (B, Q) at the true `positions` (Q,),
    attending to the keys and values held in `cache` (a `DynamicCache`, or None for no cache) and to
    their own, as the bool `mask` (1 or B, 1, Q, cached + Q; True = attend) says, or as the model's own
    mask does when it is None. Their keys and values are appended to `cache`."""
    backbone = decoder_backbone(model)
    caching = {"use_cache": False} if cache is None else {"use_cache": True, _cache_argument(type(backbone)): cache}
    return backbone(
        input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1),
        attention_mask=None if mask is None else mask_for_implementation(mask, model), **caching,
    ).last_hidden_state


def forward_against(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                    cache) -> torch.Tensor:
    """Hidden states (B, Q, H) of `ids` (B, Q) at `positions` (Q,), every query seeing every key held in
    `cache` and the new keys as the bool `mask` (1 or B, 1, Q, Q) says. The new keys and values are not
    kept: `cache` is left as it was."""
    held = torch.ones(*mask.shape[:-1], cache.get_seq_length(), dtype=torch.bool, device=mask.device)
    hidden = cached_forward(model, ids, positions, torch.cat([held, mask], dim=-1), cache)
    cache.crop(-ids.shape[1])
    return hidden


@functools.cache
def _cache_argument(backbone_class: type) -> str:
    """The name the backbone's forward takes its cache by, looked up once per class (every step calls it):
    transformers 5 renamed `past_key_values` to `cache` (the old name still works, warned)."""
    return "cache" if "cache" in inspect.signature(backbone_class.forward).parameters else "past_key_values"
