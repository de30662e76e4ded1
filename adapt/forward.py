"""Running the model's pieces: the backbone (plainly, or against a KV cache) and the LM head on chosen states.

Every mode and the sampler build their forwards from these: the LM head runs only on the hidden states
whose logits are wanted (the diffusion loss scores about half the positions, a sampling step a block's),
so the (B, L, V) logits of a whole batch are never materialised.

This module depends only on torch and `attention`; `adapt export` copies it into every checkpoint.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .attention import mask_for_implementation
from .structure import decoder_backbone, unwrap_model


def check_targets(targets: torch.Tensor, shift: bool) -> None:
    """With the shift the prediction for position i is read at i-1: position 0 has none."""
    if shift and targets[:, 0].any():
        raise ValueError("with shift=True position 0 has no prediction; it must never be a target")


def predict_logits(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, *, shift: bool = True,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, V) for the N positions where `targets` (bool (B, L)) is True, in row-major order, from
    one forward of the whole sequence as the model's attention stands (causal, annealed or bidirectional).
    With `shift` the prediction for position i is the model's output at i-1."""
    return output_logits(model, shifted_hidden(model, input_ids, targets, shift=shift, attention_mask=attention_mask))


def shifted_hidden(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, *, shift: bool,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states (N, H) that predict `targets`, from one forward of the whole sequence."""
    check_targets(targets, shift)
    hidden = decoder_backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state
    return hidden[:, :-1][targets[:, 1:]] if shift else hidden[targets]


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head and any output transform the family's forward applies after it; the logits of
    embedding rows past the recorded `vocab_size` (alignment padding) are dropped, so those ids are
    never predicted, sampled or given probability mass."""
    model = unwrap_model(model)
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    vocab_size = (getattr(config, "diffusion", None) or {}).get("vocab_size")
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    # Families that rescale logits after the head (the head-only path must match `model(...).logits`).
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:  # Granite
        logits = logits / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


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
