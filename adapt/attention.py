"""The attention controller: causal -> annealed -> bidirectional, for any Hugging Face causal LM.

No modeling code is copied or patched. Two public mechanisms of transformers 5 carry everything:

* `config.is_causal = False` makes every mask builder take its bidirectional path and SDPA / flash
  attention run with `is_causal=False`. A 2D padding mask is still honoured, the flag is saved in
  config.json, and with no padding no L x L mask is materialised at all (the fused kernel runs).
* A 4D `attention_mask` of shape (B, 1, Q, K) is passed through to the attention functions as given.
  The annealed mask (causal plus each future position visible with probability `ratio`) travels this
  way: a forward pre-hook on the decoder backbone builds it once per forward, folds in the padding
  mask, and hands it to every layer.

`ratio == 0` removes the hook and restores the causal flag, so the model is exactly the original one.
The ratio is also written to `config.attention_ratio` so `adapt.load` can restore a partial ratio;
ratio 1 reloads bidirectional even in plain transformers, through `is_causal`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .settings import between, config_source, from_dict, read_from
from .structure import decoder_backbone, unwrap_model

# Implementations that accept an arbitrary 4D mask. flash_attention_* take only a causal flag (and
# padding through varlen), so they cannot honour a partial mask: refuse instead of ignoring it.
PARTIAL_MASK_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")

_HOOK_ATTR = "_adapt_attention_hook"


class AnnealedMask:
    """Forward pre-hook that replaces the 2D padding mask with the annealed 4D mask.

    Built once per forward (not per layer) as a bool (B, 1, L, L) tensor, True = attend, broadcast over
    heads: the cheapest form SDPA accepts. Eager attention adds masks, so it gets the additive float form.
    """

    def __init__(self, ratio: float, generator: torch.Generator | None):
        self.ratio = ratio
        self.generator = generator

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if len(args) > 1:
            raise TypeError("adapt.set_attention: call the model with keyword arguments (attention_mask=...)")
        implementation = module.config._attn_implementation
        if implementation not in PARTIAL_MASK_IMPLEMENTATIONS:
            raise RuntimeError(_partial_mask_refusal(implementation, self.ratio))
        padding = kwargs.get("attention_mask")
        if padding is not None and padding.ndim != 2:
            return None  # the caller built its own 4D mask: theirs wins
        if kwargs.get("past_key_values") is not None and kwargs["past_key_values"].get_seq_length() > 0:
            raise RuntimeError(
                "adapt.set_attention: a partial attention ratio cannot be combined with a KV cache; "
                "sample at ratio 1 (set_attention(model, 1.0))"
            )
        tokens = args[0] if args else kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        window = sliding_window(module.config)
        if window is not None and length > window:
            raise RuntimeError(
                f"adapt.set_attention: sequence length {length} exceeds the sliding window ({window}) "
                "and a partial ratio would override the window; use seq_len <= the window while annealing"
            )
        mask = annealed_mask(batch, length, self.ratio, padding=padding, device=tokens.device, generator=self.generator)
        kwargs["attention_mask"] = mask_for_implementation(mask, module)
        return args, kwargs


def mask_for_implementation(mask: torch.Tensor, model: nn.Module):
    """A bool 4D mask (True = attend) in the form the model's attention takes: as it is for SDPA (its
    cheapest form), additive float for eager, which adds masks to the scores, and a FlexAttention
    `BlockMask` for flex_attention, whose kernel skips the blocks nobody sees (the block and hybrid
    layouts leave about three quarters of their 2L x 2L unseen)."""
    model = unwrap_model(model)
    implementation = model.config._attn_implementation
    if implementation not in PARTIAL_MASK_IMPLEMENTATIONS:
        raise RuntimeError(f"attention implementation {implementation!r} cannot apply an explicit attention mask; "
                           "load the model with attn_implementation='sdpa', 'eager' or 'flex_attention'")
    if implementation == "flex_attention":
        return block_mask(mask)
    if implementation != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def block_mask(mask: torch.Tensor):
    """The FlexAttention `BlockMask` of a bool (B or 1, 1, Q, K) mask, every head alike."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows = mask.shape[0]

    def visible(batch, head, query, key):
        return mask[batch if rows > 1 else 0, 0, query, key]

    return create_block_mask(visible, rows if rows > 1 else None, None, mask.shape[-2], mask.shape[-1],
                             device=mask.device)


def annealed_mask(
    batch: int,
    length: int,
    ratio: float,
    *,
    padding: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool (B, 1, L, L), True = query may attend to key.

    Causal positions are always visible; each future position independently with probability `ratio`.
    Keys that are padding are hidden. Every query keeps its own position so no row is empty (an empty
    row would make softmax return NaN on padded queries).
    """
    gen_device = generator.device if generator is not None else device
    future = torch.rand((batch, 1, length, length), generator=generator, device=gen_device).to(device) < ratio
    positions = torch.arange(length, device=device)
    causal = positions[None, :] <= positions[:, None]
    mask = causal | future
    if padding is not None:
        mask &= padding.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask |= torch.eye(length, dtype=torch.bool, device=device)
    return mask


def set_attention(model: nn.Module, ratio: float, *, generator: torch.Generator | None = None) -> None:
    """Set how much of the future each position sees: 0 = causal (the AR model), 1 = bidirectional.

    Between 0 and 1, each future position is visible with probability `ratio`, drawn fresh on every
    forward from `generator` (seed it for reproducible masks). Works on peft- and DDP-wrapped models.
    """
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0 or ratio != ratio:
        raise ValueError(f"attention ratio must be in [0, 1], got {ratio}; pass 0 for causal, 1 for bidirectional")
    model = unwrap_model(model)
    backbone = decoder_backbone(model)
    implementation = model.config._attn_implementation
    if 0.0 < ratio < 1.0 and implementation not in PARTIAL_MASK_IMPLEMENTATIONS:
        raise ValueError(_partial_mask_refusal(implementation, ratio))

    hook = getattr(backbone, _HOOK_ATTR, None)
    if 0.0 < ratio < 1.0:
        if hook is None:
            hook = AnnealedMask(ratio, generator)
            hook.handle = backbone.register_forward_pre_hook(hook, with_kwargs=True)
            setattr(backbone, _HOOK_ATTR, hook)
        hook.ratio = ratio
        if generator is not None:
            hook.generator = generator
    elif hook is not None:
        hook.handle.remove()
        delattr(backbone, _HOOK_ATTR)

    # Every config that the forward passes read must agree (the backbone may hold its own copy).
    for config in {id(c): c for c in (model.config, backbone.config)}.values():
        config.is_causal = ratio < 1.0
        config.attention_ratio = ratio


def anneal_ratio(step: int, steps: int, start: float = 0.0) -> float:
    """The annealed attention ratio at optimizer step `step` (0-based) of `steps`: linear from `start`
    (the ratio training began at: 0 for an AR model, 1 for an adapted one) to 1,
    min(1, start + (1 - start)(step + 1)/steps)."""
    return min(1.0, start + (1.0 - start) * (step + 1) / steps)


def get_attention_ratio(model: nn.Module) -> float:
    """The ratio last set with `set_attention` (0.0 for an untouched causal model)."""
    return attention_ratio_of(unwrap_model(model).config)


@dataclass
class _SavedAttention:
    attention_ratio: float = field(default=0.0, metadata=between(0, 1))


def attention_ratio_of(model_config) -> float:
    """The attention ratio a transformers config records (0.0 if none), checked: config.json is input,
    and a ratio of 5 or "x" there names that file."""
    if not hasattr(model_config, "attention_ratio"):
        return _SavedAttention.attention_ratio
    with read_from(config_source(model_config)):
        return from_dict(_SavedAttention, {"attention_ratio": model_config.attention_ratio}).attention_ratio


def sliding_window(config) -> int | None:
    """The attention window of a family with sliding-window layers; an explicit 4D mask replaces it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window is None or (layer_types and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _partial_mask_refusal(implementation: str, ratio: float) -> str:
    return (
        f"attention implementation {implementation!r} cannot apply a partial attention mask (ratio {ratio}); "
        f"load the model with attn_implementation='sdpa' or 'eager' for annealing "
        f"(ratios 0 and 1 work with every implementation)"
    )
