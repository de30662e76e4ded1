"""Representation alignment: keep the adapted model's hidden states close to the frozen AR source's.

Repr-Align (Peng et al. 2026, arXiv:2605.06885, in Open-dLLM) adds to the denoising loss a cosine
loss between the diffusion model's hidden states and those of the frozen AR model it came from (REPA,
Yu et al. 2024, did the same for image diffusion with a pretrained encoder). Here, exactly:

- Inputs. The adapted model's states are those of its training forward on the noisy sequence x_t (at
  the step's attention ratio, or with the block mask; in block mode the noisy copy, the first L of the
  2L positions). The source's are those of its own forward, causal as it was trained, on the clean x_0.
- Positions. Every non-padding position i, the same i in both. With the shift, the state at i is the
  one that predicts token i+1 in both models: the target is how the AR model represents the clean
  prefix x_0[<=i] when it predicts that token.
- Layers. `align.layers` indexes the decoder layers (-1 the last); a layer's state is its output, before
  any final norm. Per position, 1 - cos(adapted, source) is averaged over the layers.
- Normalisation. Those are summed and divided by the non-padding positions of the whole optimizer step
  (all micro-batches and processes), as the diffusion loss is divided by the count of its whole step, so
  the objective does not depend on how the step is split: the mean cosine distance (`align_loss` in the
  log), times `align.weight` in the objective.
- Weight. Constant, or with `align.fade_with_annealing` weight * (1 - (step + 1) / anneal_steps) until
  the annealing ends (or a block model's growth), 0 after: then the source is dropped, so its forward
  and its memory end there.

Memory: a second copy of the source's weights in model.dtype on every process (frozen: no gradients,
no optimizer states, not sharded under ZeRO-3 or FSDP2), and one no-grad forward of it per micro-batch;
a faded alignment frees the copy once its weight is 0 (a run resumed after that loads it and frees it
at its first step).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..recipe import Recipe
from ..structure import decoder_backbone, decoder_layers
from .frozen import load_frozen


class Alignment:
    """The frozen source and the decoder layers whose outputs the adapted model is pulled towards.

    Not an nn.Module, so DDP, DeepSpeed and FSDP2 never see (or shard) the source's weights.
    """

    def __init__(self, source: nn.Module, layers: list[int], weight: float, fade_steps: int | None = None):
        self.source, self.layers, self.weight, self.fade_steps = source, layers, weight, fade_steps

    def weight_at(self, step: int) -> float:
        """The alignment term's weight at optimizer step `step` (0-based): constant, or falling linearly
        to 0 over `fade_steps` steps."""
        if self.fade_steps is None:
            return self.weight
        return self.weight * max(0.0, 1.0 - (step + 1) / self.fade_steps)

    def faded_out_at(self, step: int) -> bool:
        """Whether the weight is 0 from optimizer step `step` on: the source is never read again."""
        return self.fade_steps is not None and step + 1 >= self.fade_steps

    @contextlib.contextmanager
    def watch(self, model: nn.Module):
        """Within the context, the outputs of the aligned layers of `model` land in the yielded list, in
        `layers` order. Hooks live only inside it, so a gradient checkpoint's recomputation in backward
        records nothing."""
        found = decoder_layers(model)
        outputs: dict[int, torch.Tensor] = {}

        def record(index):
            return lambda module, args, output: outputs.__setitem__(
                index, output[0] if isinstance(output, tuple) else output)

        hooks = [found[index].register_forward_hook(record(index)) for index in set(self.layers)]
        states: list[torch.Tensor] = []
        try:
            yield states
            states.extend(outputs[index] for index in self.layers)
        finally:
            for hook in hooks:
                hook.remove()

    def distance_sum(self, adapted_states: list[torch.Tensor], batch: dict) -> torch.Tensor:
        """1 - cos(adapted, source), summed over the non-padding positions of `batch` and averaged over
        the aligned layers (float32, differentiable through `adapted_states`)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad(), self.watch(self.source) as source_states:
            decoder_backbone(self.source)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        keep = attention_mask.bool()
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        for adapted, source in zip(adapted_states, source_states):
            adapted = adapted[:, :input_ids.shape[1]]  # a block model's forward is [x_t ; x_0]: the noisy copy
            cosine = F.cosine_similarity(adapted[keep].float(), source[keep].float(), dim=-1)
            total = total + (1.0 - cosine).sum()
        return total / len(self.layers)


def load_alignment(recipe: Recipe, model: nn.Module, device) -> Alignment | None:
    """The frozen source of `model` (loaded again from model.path, without the mask token: it only ever
    reads clean tokens), or None when align.weight is 0."""
    settings = recipe.align
    if settings.weight == 0:
        return None
    count = len(decoder_layers(model))
    wrong = [index for index in settings.layers if not -count <= index < count]
    if wrong:
        raise UserError(f"align.layers: {wrong[0]} is not a layer of this {count}-layer model; "
                        f"use indices from {-count} to {count - 1} (-1 = the last)")
    source, _ = load_frozen(recipe.model.path, recipe.model, device)
    fade_steps = recipe.train.anneal_steps if settings.fade_with_annealing else None
    layers = [index % count for index in settings.layers]
    return Alignment(source, layers, settings.weight, fade_steps)
