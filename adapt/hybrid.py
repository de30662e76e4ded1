"""The hybrid mode (TiDAR, Liu et al. 2025, arXiv 2511.08923): diffusion drafts, the AR model verifies.

The AR model stays whole inside: a causal clean stream read by its own head, exactly the source's
computation. Beside it runs a draft stream of mask tokens cut into draft blocks of D positions; each
block drafts its D tokens in one step from the clean tokens before it, bidirectionally within itself.

Training runs both streams in one forward over [drafts ; clean], 2L positions at position ids 0..L-1
twice. With the shift, draft position p predicts token p + 1, like the clean stream. Draft block b
(positions bD..bD+D-1) sees itself and the clean tokens at positions <= bD, so it predicts tokens
bD+1..bD+D from the clean prefix up to the block's start: no draft position sees a clean token at or
after the one it predicts. The clean stream is causal and never sees the drafts. The loss is
(alpha L_AR + L_diff) / (1 + alpha): the AR cross-entropy of the clean stream and the diffusion loss of
the drafts (all masks: `diffusion.t_min: 1`, TiDAR's; or a random share, MDM's).

Decoding (`speculate`) is one forward a step: the tokens not yet cached and the previous step's drafts
run causally through the clean stream, whose AR head verifies the drafts (greedy: the longest prefix
that matches its argmax; sampling: speculative rejection sampling, Chen et al. 2023, so the output
follows the AR head's distribution exactly), and in the same forward a group of D masks drafts the
next tokens, assuming every draft accepted (`draft_groups: one`) or one group for each number of
accepted drafts (`every`, TiDAR's pre-drafting). The keys and values of accepted tokens stay in the
cache; those of rejected drafts and of every draft group are cropped off, nothing recomputed.

This module depends only on torch and dependency-free modules of this package; `adapt export` copies it
into every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .block import two_copy_mask
from .errors import UserError
from .forward import cached_forward, check_targets, forward_against, output_logits
from .mode import Mode
from .settings import at_least, check_settings


@dataclass(frozen=True)
class HybridMode(Mode):
    """The AR model with a draft stream of blocks of `draft_size` masks (TiDAR)."""

    name = "hybrid"
    has_ar_head = True
    training_settings = ("ar_weight",)
    draft_size: int = field(metadata=at_least(1))

    def __post_init__(self):
        check_settings(self, "diffusion.")  # where config.json and a recipe hold it

    def describe(self) -> str:
        return f"hybrid: the AR model verifying drafts of {self.draft_size} tokens (TiDAR)"

    def attention_ratio(self, annealed: float) -> float:
        return 0.0  # the clean stream is the AR model, causal; the drafts' mask is given explicitly

    def hidden(self, model, noisy, clean, targets, *, shift, attention_mask=None, prefix=None, ar_targets=None):
        _check_shift(shift)
        check_targets(targets, shift)
        length = noisy.shape[1]
        mask = training_mask(length, self.draft_size, padding=attention_mask, device=noisy.device)
        positions = torch.arange(length, device=noisy.device).repeat(2)
        hidden = cached_forward(model, torch.cat([noisy, clean], dim=1), positions, mask, cache=None)
        drafts, ar = hidden[:, :length - 1][targets[:, 1:]], None  # target i is read at position i - 1
        if ar_targets is not None:
            ar = hidden[:, length:-1][ar_targets[:, 1:]]
        return drafts, ar

    def context_visibility(self, length, shift, device=None):
        """Draft position i - 1 predicts target i and reads the clean tokens up to its block's start,
        whatever is masked in the draft stream, and the draft stream's own block while it is clean."""
        _check_shift(shift)
        block = (torch.arange(length, device=device) - 1).clamp(min=0) // self.draft_size  # of each target
        keys = torch.arange(length, device=device)
        seen_always = keys[None, :] <= (block * self.draft_size)[:, None]
        same_draft_block = (keys // self.draft_size)[None, :] == block[:, None]
        return same_draft_block & ~seen_always, seen_always

    def forward_positions(self, length):
        return 2 * length  # the draft and the clean stream side by side

    def head_positions(self, length, masked_share):
        return length * masked_share + length  # the masked drafts, and the AR head on every clean position

    def attention_mask_bytes(self, rows, length):
        return rows * self.forward_positions(length) ** 2  # the bool mask, built once per forward

    def decoding_blocks(self, fill, options):
        """Blocks of up to D positions to fill, each starting at the first one not yet in a block: a draft
        block reads every token before its first target (a block's place does not matter: the drafts see
        positions relative to their own)."""
        block_of = torch.full(fill.shape, -1, dtype=torch.long, device=fill.device)
        block, start = -1, None
        for position in fill[0].nonzero().squeeze(1).tolist():  # once per call, not per step
            if start is None or position >= start + self.draft_size:
                block, start = block + 1, position
            block_of[:, position] = block
        return block_of

    def check_sampling(self, model, options, length):
        if options.block_size not in (None, self.draft_size):
            raise UserError(f"this hybrid model drafts in blocks of {self.draft_size} tokens; drop the sampler's "
                            f"block size ({options.block_size}) or set it to {self.draft_size}")
        if options.cache not in ("exact", "none"):
            raise UserError(f"cache {options.cache!r} is for fully bidirectional models; this hybrid model has an "
                            "exact cache: use cache 'exact' (the default)")

    def logits_function(self, model, config, cache):
        """Diffusion decoding of the drafts: each step re-drafts the block being denoised, from the clean
        tokens before it (kept in the AR model's own KV cache, or with cache "none" run again every step)
        and its own tokens committed so far; its first draft input is a mask, as the drafts were trained."""
        kept = CleanCache(model)

        def logits_for(ids, candidates, block):
            prefix = kept if cache != "none" else CleanCache(model)
            start = _block_start(block)
            prefix.extend(ids, start)  # every token before the block is known
            drafts = torch.cat([torch.full_like(ids[:, :1], config.mask_token_id), ids[:, start:_block_end(block) - 1]],
                               dim=1)
            return output_logits(model, prefix.drafts(drafts, start - 1, candidates))
        return logits_for


def _check_shift(shift: bool) -> None:
    if not shift:
        raise ValueError("a hybrid model keeps the AR model's shift: its config needs shift=True")


def _block_start(block: torch.Tensor) -> int:
    return int(block.any(dim=0).nonzero()[0])


def _block_end(block: torch.Tensor) -> int:
    return int(block.any(dim=0).nonzero()[-1]) + 1


def training_mask(length: int, draft_size: int, *, padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Bool (B or 1, 1, 2L, 2L), True = attend: queries and keys [drafts ; clean]. Draft block b sees
    itself and the clean positions <= bD; the clean stream is causal."""
    positions = torch.arange(length, device=device)
    blocks = positions // draft_size
    return two_copy_mask(noisy_sees_noisy=blocks[:, None] == blocks[None, :],
                         noisy_sees_clean=positions[None, :] <= (blocks * draft_size)[:, None],
                         clean_sees_clean=positions[None, :] <= positions[:, None], padding=padding)


class CleanCache:
    """The keys and values of the clean stream (causal: the AR model's own cache) for diffusion decoding."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache, self.length = model, DynamicCache(), 0

    def extend(self, ids: torch.Tensor, end: int) -> None:
        """Append the clean positions [length, end) of `ids`, causally."""
        if end <= self.length:
            return
        keys = torch.arange(end, device=ids.device)
        causal = (keys[None, :] <= keys[self.length:, None])[None, None]
        cached_forward(self.model, ids[:, self.length:end], keys[self.length:], causal, self.cache)
        self.length = end

    def drafts(self, draft_ids: torch.Tensor, start: int, targets: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, H) predicting `targets` (bool (B, L)) from one draft block whose inputs
        `draft_ids` (B, Q) sit at positions start..start+Q-1, against every cached clean position."""
        queries = draft_ids.shape[1]
        visible = torch.ones(1, 1, queries, queries, dtype=torch.bool, device=draft_ids.device)
        hidden = forward_against(self.model, draft_ids, torch.arange(start, start + queries, device=draft_ids.device),
                                 visible, self.cache)
        rows, columns = targets.nonzero(as_tuple=True)
        return hidden[rows, columns - 1 - start]


def verify_and_draft(model, cache, clean: torch.Tensor, start: int, group_starts: list[int], draft_size: int,
                     mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding forward: `clean` (B, Q) at positions start.. run causally against `cache` (the AR
    model's own computation, so its head verifies them), and `draft_size` masks at each of `group_starts`,
    a group seeing the clean positions up to its start and itself. Returns the hidden states of the clean
    queries (B, Q, H) and of the groups (B, G, D, H); `cache` then holds all of their keys and values
    (crop it to what was accepted)."""
    batch, queries = clean.shape
    device, held = clean.device, cache.get_seq_length()
    clean_positions = torch.arange(start, start + queries, device=device)
    starts = torch.tensor(group_starts, device=device).repeat_interleave(draft_size)
    group_positions = starts + torch.arange(draft_size, device=device).repeat(len(group_starts))
    group_of = torch.arange(len(group_starts), device=device).repeat_interleave(draft_size)
    drafts = len(group_positions)
    mask = torch.cat([
        torch.cat([clean_positions[None, :] <= clean_positions[:, None],
                   torch.zeros(queries, drafts, dtype=torch.bool, device=device)], dim=1),
        torch.cat([clean_positions[None, :] <= starts[:, None], group_of[:, None] == group_of[None, :]], dim=1)])
    mask = torch.cat([torch.ones(queries + drafts, held, dtype=torch.bool, device=device), mask], dim=1)
    ids = torch.cat([clean, clean.new_full((batch, drafts), mask_token_id)], dim=1)
    hidden = cached_forward(model, ids, torch.cat([clean_positions, group_positions]), mask[None, None], cache)
    return hidden[:, :queries], hidden[:, queries:].reshape(batch, len(group_starts), draft_size, -1)
