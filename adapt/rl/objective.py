"""GRPO's clipped objective on estimated per-token log-probabilities (DeepSeekMath's GRPO, PPO's clip).

TRL's GRPOTrainer computes the same loss inside its trainer (`_compute_loss`, on exact AR token
log-probabilities from its own forward), not as a function of given log-probabilities, so it is written
here, on whatever the estimator returns; docs/method.md says what else of TRL fits and what does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Terms:
    loss_sum: torch.Tensor  # differentiable: the weighted per-token terms, summed (the caller divides)
    kl_sum: float  # the k3 KL estimate summed over the tokens (0 without a reference)
    clipped: float  # tokens whose term the clip decided (its gradient is 0 there)


def grpo_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
               epsilon: float, kl_weight: float, reference_logps: torch.Tensor | None) -> Terms:
    """Per completion token (all (G, C) but `advantages` (G,)): -min(r A, clip(r, 1 - eps, 1 + eps) A) with
    r = exp(logp - logp_old), plus kl_weight times k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
    unbiased, positive KL estimate, GRPO's), each token weighted by the estimator's weight."""
    ratio = torch.exp(logps - old_logps)
    advantage = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if reference_logps is not None:
        delta = reference_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_weight * kl
    return Terms((weights * per_token).sum(), kl.detach().sum().item(), (clipped < unclipped).sum().item())
