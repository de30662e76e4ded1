"""What a kind of diffusion model is made of: one `Mode` object per kind, asked by everything else.

A conversion mode decides how the model is laid out in training (which positions a forward runs and
what each may see), how its likelihood is scored, how the sampler caches and decodes it, and what it
writes to config.json. The kinds (`adapt.diffusion.MODES`):

* `BidirectionalMode` (adapt/bidirectional.py): one bidirectional block, attention annealed from causal
  (DiffuLLaMA);
* `BlockMode` (adapt/block.py): blocks of B tokens, bidirectional inside and causal across, each block
  predicted given the clean ones before it (BD3-LM), sampled with an exact KV cache.

Code outside the mode classes asks the mode; it never tests which kind it has. A new kind is a subclass
with these methods and an entry in `MODES`. Modes are frozen dataclasses: their fields are their size
(the block size), written to config.json beside the mode's name.

This module depends only on dataclasses; `adapt export` copies it into every checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class Mode:
    name: ClassVar[str]
    # Whether the model keeps an AR head on a causal clean stream (hybrid): its likelihood is exact and it
    # can verify drafts (speculative decoding); the others are scored by the ELBO and decode by diffusion.
    has_ar_head: ClassVar[bool] = False
    # The recipe's training settings (`DiffusionTraining` fields) only this kind of model reads.
    training_settings: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        """What config.json records of the mode: its name and its fields."""
        return {"mode": self.name, **self.fields()}

    def fields(self) -> dict:
        """The mode's own settings (a block size), also logged with every training step."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for `adapt info`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ training

    def attention_ratio(self, annealed: float) -> float:
        """The attention ratio a forward runs at, given the annealing schedule's ratio."""
        raise NotImplementedError

    def grown(self, step: int, steps: int) -> Mode:
        """The mode at optimizer step `step` of a schedule that grows it over `steps` steps (block sizes
        1, 2, 4, ...); a mode without a size to grow is itself."""
        return self

    def hidden(self, model, noisy, clean, targets, *, shift: bool, attention_mask=None, prefix=None, ar_targets=None):
        """(hidden states (N, H) that predict the N `targets` (bool (B, L)) of `noisy` (the corrupted ids),
        in row-major order, as the training forward computes them; and, for a mode with an AR stream,
        those (M, H) that predict `ar_targets` (bool (B, L)) through it, else None). `clean` is the
        uncorrupted sequence and `prefix` what `clean_prefix` cached of it."""
        raise NotImplementedError

    def clean_prefix(self, model, clean, targets, shift: bool):
        """The part of the clean context that every mask scoring `targets` shares, run once (a KV
        cache), or None when there is none to share."""
        return None

    def context_visibility(self, length: int, shift: bool, device=None):
        """(seen_if_clean, seen_always), bool (L, L): whether the output that predicts target n reads
        position i only while i is not masked (the noisy stream) or always (a clean copy). CART weighs
        each target by the clean context its prediction reads."""
        raise NotImplementedError

    def forward_positions(self, length: int) -> int:
        """Positions one training forward runs over a sequence of `length` tokens (for `adapt plan`)."""
        raise NotImplementedError

    def head_positions(self, length: int, masked_share: float) -> float:
        """Positions of a sequence of `length` tokens the LM head runs on in training when a share
        `masked_share` of them is masked (for `adapt plan`): the masked ones."""
        return length * masked_share

    def attention_mask_bytes(self, rows: int, length: int) -> int:
        """Bytes of the attention mask a training forward builds for `rows` sequences of `length` tokens
        (its explicit mask, or the annealed one while annealing), for `adapt plan`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ sampling

    def decoding_blocks(self, fill, options):
        """(B, L) long: the index of the block each position to fill (`fill`, bool) is decoded in,
        left to right; -1 for given positions."""
        raise NotImplementedError

    def check_sampling(self, model, options, length: int) -> None:
        """Refuse sampler options this kind of model cannot honour (a UserError naming the fix)."""

    def logits_function(self, model, config, cache: str):
        """logits_for(ids, candidates, block): the logits (N, V) of the positions `candidates` (bool (B, L))
        predicted from `ids`, where `block` (bool (B, L)) is every position of their block; with the
        mode's cache (`SamplingOptions.cache`); `config` is the model's `DiffusionConfig`."""
        raise NotImplementedError
