"""Frozen causal models a run reads beside the one it trains: the alignment's source, the distillation's teacher.

Each is a whole copy on every process, in eval mode, without gradients, and not part of the wrapped
objective, so DDP, DeepSpeed and FSDP2 never see (or shard) its weights; even under ZeRO-3 it is built
whole.
"""

from __future__ import annotations

from ..recipe import ModelSection
from .partitioned import no_zero3_init


def load_frozen(path: str, settings: ModelSection, device):
    """(model, tokenizer) of the causal LM at `path`, loaded as `settings` load the trained one, frozen, on
    `device`."""
    from ..modeling import load_model as load_pretrained

    with no_zero3_init():  # a whole copy on each process, even under ZeRO-3
        model, tokenizer = load_pretrained(path, dtype=settings.dtype, attn_implementation=settings.attn_implementation,
                                           trust_remote_code=settings.trust_remote_code,
                                           allow_pickle=settings.allow_pickle)
    model.requires_grad_(False)
    return model.eval().to(device), tokenizer
