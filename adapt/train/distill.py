"""Teacher KL: the diffusion model learns the frozen causal teacher's distributions, not only the corpus's tokens.

At every position the diffusion loss scores (a masked token i), the teacher gives its next-token
distribution for token i given the clean prefix x_<i (its output at position i - 1, the AR way, causal),
and the student's prediction for token i is pulled towards it: T^2 KL(teacher_T || student_T) at
temperature T (Hinton et al.), summed over the step's masked tokens and divided by their count. The
teacher is the source (model.path) unless `distill.teacher` names another causal LM with the same
tokenizer; a diffusion checkpoint given as teacher is run causally. docs/method.md says which
conditional each side has.

On-policy (OPDLM, `distill.on_policy_every`): on some steps the tokens scored are the student's own
continuation of each block's start (`student_continuations`), so it learns the teacher's distributions
where its own samples go, not only where the corpus goes.
"""

from __future__ import annotations

import torch

from ..attention import set_attention
from ..errors import UserError, quoted
from ..forward import predict_logits
from ..recipe import Recipe
from .frozen import load_frozen


class Teacher:
    """The frozen teacher; not an nn.Module, so no backend sees (or shards) its weights."""

    def __init__(self, model, vocab: int):
        self.model, self.vocab = model, vocab  # its logits past `vocab` (padding rows) are no tokens

    @torch.no_grad()
    def logits_at(self, batch: dict, targets: torch.Tensor) -> torch.Tensor:
        """Its logits (N, vocab) for the N `targets` (bool (B, L)) of `batch`'s clean ids, row-major, each
        read at the position before it: its next-token distribution given the clean prefix."""
        logits = predict_logits(self.model, batch["input_ids"], targets, attention_mask=batch["attention_mask"])
        return logits[:, :self.vocab]


@torch.no_grad()
def student_continuations(model, config, batch: dict, settings, seed: int) -> dict:
    """`batch` with the last `settings.on_policy_tokens` of each block written by the student (the sampler
    at temperature 1 in `settings.on_policy_steps` steps, seeded by `seed`; a hybrid model's drafts
    diffusion-decode, the student being its diffusion side) and its first tokens never masked: only the
    continuation is scored."""
    from ..sampling import SamplingOptions, denoise

    ids = batch["input_ids"]
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[:, ids.shape[1] - settings.on_policy_tokens:] = True
    options = SamplingOptions(temperature=1.0, decoding="diffusion", seed=seed)
    written = denoise(model, ids, fill, config, steps=settings.on_policy_steps, options=options).ids
    return {**batch, "input_ids": written, "never_mask": batch["never_mask"] | ~fill}


def load_teacher(recipe: Recipe, tokenizer, device) -> Teacher | None:
    """The recipe's teacher (None when distill.weight is 0), checked to share the student's tokenizer."""
    settings = recipe.distill
    if settings.weight == 0:
        return None
    path = settings.teacher or recipe.model.path
    model, teacher_tokenizer = load_frozen(path, recipe.model, device)
    set_attention(model, 0.0)  # the next-token distribution given the clean prefix: causal, whatever it was saved at
    check_same_tokenizer(tokenizer, teacher_tokenizer, f"distill.teacher {path}", "the student's")
    return Teacher(model, len(teacher_tokenizer))


def check_same_tokenizer(tokenizer, other, name: str, whose: str) -> None:
    """Refuse a model (`name` says which: a teacher, a source scored side by side, a reference) whose
    tokenizer `other` gives any of its tokens another id than `tokenizer` (`whose`, e.g. "the student's")
    does: its distributions, losses and perplexities would be over other tokens."""
    known = tokenizer.get_vocab()
    # in id order, so that the example named is the same every run (a vocabulary's dict order is not)
    differing = [token for token, index in sorted(other.get_vocab().items(), key=lambda item: item[1])
                 if known.get(token) != index]
    if differing:
        raise UserError(f"{name}: its tokenizer differs from {whose} ({len(differing)} tokens with other ids, "
                        f"e.g. {quoted(differing[0])}); give a model with the same tokenizer")
