"""Reward training of converted diffusion models: `adapt rl` (GRPO with estimated log-probabilities)."""

from .run import train_rl

__all__ = ["train_rl"]
