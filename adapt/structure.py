"""Where things sit inside a Hugging Face causal LM, for any family: the model inside its wrappers, the
decoder backbone without the LM head, and the repeated decoder layers.

Exported checkpoints carry this module as remote code (attention.py imports it; adapt/export.py's
REMOTE_CODE_FILES), so it imports nothing but torch and this package's errors.py.
"""

from __future__ import annotations

from torch import nn

from .errors import UserError


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside peft / DDP / DeepSpeed / compile wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The transformer stack without the LM head (`model.model`, `model.transformer`, ...)."""
    model = unwrap_model(model)
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        raise TypeError(f"{type(model).__name__} has no separate decoder backbone; is it a causal LM?")
    return backbone


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the largest ModuleList in the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"{type(model).__name__} has no layer list to shard; use deepspeed or ddp")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))
