"""The samples of `adapt rl`: prompts in a seeded order, G completions of each by the sampler, their
rewards and group-normalised advantages.

A rollout is what `rl.iterations` (mu) optimizer steps learn from: `train.grad_accum` prompts per
process, each one micro-batch of its G completions (a prompt's completions have one length, so no
padding). The prompt feed's state, saved in every checkpoint as a run's data position, holds the rollout
in use, so a run stopped between its mu steps resumes on the same completions and the same old
log-probabilities.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4  # added to a group's reward std: a group that agrees has advantages 0, not 0 / 0


@dataclass
class Group:
    """One prompt's G completions, as the estimators and the loss read them."""

    ids: torch.Tensor  # (G, P + C) prompt then completion; after a completion's first EOS, EOS
    prompt_len: int
    advantages: torch.Tensor  # (G,) float32: (reward - group mean) / (group std + eps)
    # The old policy's log-probabilities (G, C) for iterations 1 .. mu-1 of the rollout, each under that
    # iteration's noise (iteration 0's old policy is the policy itself: its ratio is 1)
    old_logps: list[torch.Tensor]

    def to_state(self) -> dict:
        return {"ids": self.ids.tolist(), "prompt_len": self.prompt_len, "advantages": self.advantages.tolist(),
                "old_logps": [old.tolist() for old in self.old_logps]}

    @classmethod
    def from_state(cls, state: dict, device) -> "Group":
        return cls(torch.tensor(state["ids"], device=device), state["prompt_len"],
                   torch.tensor(state["advantages"], device=device),
                   [torch.tensor(old, device=device) for old in state["old_logps"]])


@dataclass
class Rollout:
    groups: list[Group]
    figures: dict  # reward mean/std, each reward's mean, errors, completion length: logged with each of its steps

    def to_state(self) -> dict:
        return {"groups": [group.to_state() for group in self.groups], "figures": self.figures}

    @classmethod
    def from_state(cls, state: dict, device) -> "Rollout":
        return cls([Group.from_state(group, device) for group in state["groups"]], state["figures"])


class PromptFeed:
    """The prompt rows in a seeded order, a new shuffle each pass; process r of W takes every W-th prompt.
    Stands where `adapt train` has its data (Run.train_blocks): checkpoints save its `state_dict`."""

    def __init__(self, rows: list[dict], seed: int, rank: int, world_size: int, device):
        self.rows, self.seed, self.rank, self.world_size, self.device = rows, seed, rank, world_size, device
        self.drawn = 0  # prompts this process has taken
        self.rollout: Rollout | None = None

    def next_row(self) -> tuple[int, dict]:
        """(the row's index in the prompts, the row)."""
        index = self.drawn * self.world_size + self.rank
        passes, place = divmod(index, len(self.rows))
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + passes).shuffle(order)
        self.drawn += 1
        return order[place], self.rows[order[place]]

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "rollout": None if self.rollout is None else self.rollout.to_state()}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]
        self.rollout = None if state["rollout"] is None else Rollout.from_state(state["rollout"], self.device)


def completions_of(model, tokenizer, prompt: str, settings, count: int, seed: int):
    """(ids (count, P + C), P, the texts): `count` completions of `prompt` by the sampler (any mode; a hybrid
    model verifying with its AR head where rl.decoding says so), each ending at its first EOS: what
    follows it is EOS, as the text reads."""
    from ..sampling import SamplingOptions, generate_with_details

    options = SamplingOptions(temperature=settings.temperature, strategy=settings.strategy,
                              block_size=settings.block_size, num_samples=count, seed=seed,
                              decoding=settings.decoding)
    out = generate_with_details(model, tokenizer, prompt, length=settings.completion_length,
                                steps=settings.steps, options=options)
    completion = torch.tensor(out.token_ids)
    eos = tokenizer.eos_token_id
    if eos is not None:
        after = (completion == eos).long().cumsum(dim=1) > 0
        completion = completion.masked_fill(after, eos)
    prompt_ids = torch.tensor(out.prompt_ids).expand(count, -1)
    return torch.cat([prompt_ids, completion], dim=1), len(out.prompt_ids), out.texts


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's group-normalised advantages of one group's rewards (G,)."""
    return (rewards - rewards.mean()) / (rewards.std() + ADVANTAGE_EPS)


def completion_lengths(ids: torch.Tensor, prompt_len: int, eos_token_id: int | None) -> torch.Tensor:
    """(G,) the tokens of each completion before its first EOS (all of them without one)."""
    completion = ids[:, prompt_len:]
    if eos_token_id is None:
        return torch.full((completion.shape[0],), completion.shape[1])
    return ((completion == eos_token_id).long().cumsum(dim=1) == 0).sum(dim=1)


def figures_of(rewards: list[torch.Tensor], lengths: list[torch.Tensor], by_reward: list[dict], errors: int) -> dict:
    """What a rollout logs: the reward's mean and its mean within-group std, each reward's mean, the
    rewards that raised, and the mean completion length in tokens."""
    stacked = torch.stack(rewards)
    figures = {"reward": stacked.mean().item(), "reward_std": stacked.std(dim=1).mean().item(),
               "reward_errors": errors, "completion_length": torch.cat(lengths).float().mean().item()}
    for name in by_reward[0]:
        figures[f"reward_{name}"] = sum(scores[name] for scores in by_reward) / len(by_reward)
    return figures

