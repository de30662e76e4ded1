"""The log-probability of a completion under a diffusion policy, estimated: what GRPO's ratio is made of.

An AR policy has log p(completion | prompt) exactly, as a sum over its tokens. A masked diffusion model
has only a bound (the ELBO), an expectation over masks, so the policy ratio is built from estimates,
and the estimator's variance decides how well the policy learns. Each estimator here gives, for a
group of G completions of C tokens after a prompt of P tokens, a log-probability per completion token
(G, C) and a weight per token, such that the weighted sum over a row is that completion's estimate:

* `diffu-grpo` (d1, Zhao et al. 2025): one forward with every completion token masked and each prompt
  token masked with probability `prompt_mask_prob` (position 0 never: it is never predicted); weights
  1. Its expectation is not the ELBO but the all-masked term of it (each token predicted from the prompt
  alone), on a randomly thinned prompt: cheap, biased, and the random prompt mask makes the inner and
  outer steps of mu > 1 see the policy at different masks.
* `coupled` (coupled-GRPO, DiffuCoder, Gong et al. 2025): two forwards whose masks are complementary
  over the completion, so every completion token is predicted exactly once; the prompt stays clean. A
  mask of l of the C tokens (l uniform on 0..C, the tokens a uniform choice) weighs its tokens
  (C + 1) / l: that is E[1/t | l] for Bernoulli(t) masks with t ~ U(0, 1), the 1/t weight with t
  integrated out given the mask (adapt/diffusion.py's `mask_exactly` explains it), which keeps every
  weight at most C + 1 where 1/t itself has infinite variance. Each mask of the pair is then an unbiased
  estimate of the ELBO, and so is their mean: weights (C + 1) / (2 l).
* `ar` (a hybrid model, TiDAR): the AR head's exact log-probabilities, one causal forward; weights 1.

tests/test_rl_estimators.py checks the expectations against the ELBO enumerated over every mask, and
docs/method.md gives the measured variances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import DiffusionConfig, masked_logits
from ..draw import without_mask_token
from ..forward import predict_logits


@dataclass
class Noise:
    """What one estimate of a group draws: the masked positions of each forward, the token weights."""

    masks: torch.Tensor | None  # (passes * G, P + C) bool: masked positions, pass after pass; None: `ar`
    weights: torch.Tensor  # (G, C) float32: each completion token's weight in its row's estimate


def draw_noise(estimator: str, ids: torch.Tensor, prompt_len: int, prompt_mask_prob: float,
               generator: torch.Generator) -> Noise:
    """The noise of one estimate of the group `ids` (G, P + C), from `generator` alone (a resumed run,
    and the old policy's estimate of a later iteration, draw it again the same)."""
    rows, completion = ids.shape[0], ids.shape[1] - prompt_len
    device = generator.device
    if estimator == "ar":
        return Noise(None, torch.ones(rows, completion, device=ids.device))
    if estimator == "diffu-grpo":
        masks = torch.ones(rows, ids.shape[1], dtype=torch.bool, device=device)
        masks[:, :prompt_len] = torch.rand(rows, prompt_len, generator=generator, device=device) < prompt_mask_prob
        masks[:, 0] = False  # with the shift it is never predicted
        return Noise(masks.to(ids.device), torch.ones(rows, completion, device=ids.device))
    return _coupled(rows, prompt_len, completion, generator, ids.device)


def _coupled(rows: int, prompt_len: int, completion: int, generator: torch.Generator, device) -> Noise:
    """Complementary masks over the completion: l ~ U{0..C} tokens (a uniform choice) in the first, the
    rest in the second; each token weighs (C + 1) / (2 * the size of the mask it is in)."""
    counts = torch.randint(0, completion + 1, (rows, 1), generator=generator, device=generator.device)
    rank = torch.rand(rows, completion, generator=generator, device=generator.device).argsort(1).argsort(1)
    first = (rank < counts).to(device)
    counts = counts.to(device)
    clean = torch.zeros(rows, prompt_len, dtype=torch.bool, device=device)
    masks = torch.cat([torch.cat([clean, first], dim=1), torch.cat([clean, ~first], dim=1)])
    size = torch.where(first, counts, completion - counts).float()
    return Noise(masks, (completion + 1) / (2 * size))


def token_logps(model, config: DiffusionConfig, ids: torch.Tensor, prompt_len: int,
                masks: torch.Tensor | None) -> torch.Tensor:
    """(G, C) float32: the estimated log-probability of each completion token of `ids` (G, P + C) under the
    noise's `masks` (None: the AR head), differentiable through `model`. Each completion token is masked
    in exactly one forward (or, for `ar`, read by the AR head once), so each has one value."""
    rows, length = ids.shape
    if masks is None:
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[:, prompt_len:] = True
        logits = predict_logits(model, ids, targets, shift=config.shift)
        return _selected(logits, ids[targets], config).view(rows, length - prompt_len)
    passes = masks.shape[0] // rows
    copies = ids.repeat(passes, 1)
    logits = masked_logits(model, copies, masks, config)
    scores = torch.zeros(copies.shape, dtype=torch.float32, device=ids.device)
    scores = scores.masked_scatter(masks, _selected(logits, copies[masks], config))
    return scores[:, prompt_len:].view(passes, rows, length - prompt_len).sum(dim=0)


def _selected(logits: torch.Tensor, tokens: torch.Tensor, config: DiffusionConfig) -> torch.Tensor:
    """log p(token) under each row of `logits`, the mask token left out as the sampler leaves it out."""
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(without_mask_token(logits, config.mask_token_id), tokens)
