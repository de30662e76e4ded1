"""`adapt rl RECIPE`: reward training of a diffusion model (GRPO with estimated log-probabilities).

Built on `adapt train`'s machinery (adapt/train/): the same backends (one process, DDP, ZeRO, FSDP2),
LoRA, checkpoints, resume, SIGTERM handling, logging and export. What differs is the step:

1. every `rl.iterations` (mu) steps, a rollout: `train.grad_accum` prompts per process, G completions of
   each by the sampler, their rewards, and advantages normalised within each group (rollout.py); and
   the old policy's log-probability estimates for the rollout's later iterations;
2. per prompt (one micro-batch), the estimated log-probabilities of its completions (estimators.py),
   through the wrapped module so that every backend sees an ordinary forward/backward, and GRPO's
   clipped objective: -min(r A, clip(r, 1 - eps, 1 + eps) A) per completion token, r = exp(log p -
   log p_old) under the same noise, weighted by the estimator's token weights, plus beta times the
   k3 estimate of the KL to a frozen reference; summed and divided by the step's completion tokens.

The held-out reward (rl.eval_prompts: its mean over the prompts and the standard error of that mean,
each prompt's G completions drawn with a seed of its own, the same at every evaluation) is measured
before the first step, every rl.eval_every steps and after the last.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from ..attention import set_attention
from ..recipe import Recipe
from ..train.build import ModelWithLoss, scheduled_lr
from ..train.checkpoint import run_inputs
from ..train.collectives import all_reduce_sum
from ..train.export import export_model
from ..train.lock import run_lock
from ..train.loop import _clip_and_check, _count_finite, end_of_step, micro_batch_generator, start_run
from ..train.state import Run, TrainResult
from .estimators import Noise, draw_noise, token_logps
from .objective import grpo_terms
from .rewards import Reward, load_rewards, score
from .rollout import Group, PromptFeed, Rollout, advantages, completion_lengths, completions_of, figures_of
from .setup import prepared_recipe


class PolicyEstimate(ModelWithLoss):
    """The policy as the backends wrap it: its forward is the estimated log-probabilities (G, C) of a
    group's completion tokens under the given noise."""

    def forward(self, input_ids, masks=None, prompt_len=0, mode=None):
        config = self.config if mode is None else dataclasses.replace(self.config, mode=mode)
        return token_logps(self.model, config, input_ids, prompt_len, masks)


@dataclass
class Parts:
    """What an rl run reads beside the policy: its rewards, the frozen reference and the held-out prompts."""

    rewards: list[Reward]
    reference: torch.nn.Module | None
    eval_rows: list[dict]


def train_rl(recipe: Recipe, *, overwrite: bool = False) -> TrainResult:
    """Run an rl recipe to the end (or to a signal) and export the result to output_dir/model."""
    recipe, rows, eval_rows = prepared_recipe(recipe)
    rewards = load_rewards(recipe.rl, rows + eval_rows)
    with run_lock(recipe.output_dir, reads=run_inputs(recipe)):
        run = start_run(recipe, overwrite, module=PolicyEstimate, open_data=partial(_open_prompts, rows=rows))
        try:
            parts = Parts(rewards, _load_reference(run), eval_rows)
            if run.step == 0 and eval_rows:
                run.reporter.write(held_out_reward(run, parts))
            run.wrapped.train()
            while run.step < recipe.train.max_steps:
                end_of_step(run, rl_step(run, parts))
                every, last = recipe.rl.eval_every, run.step == recipe.train.max_steps
                if eval_rows and ((every and run.step % every == 0) or last):
                    run.reporter.write(held_out_reward(run, parts))
            model_dir = export_model(run)
        finally:
            run.stop.restore()
            run.reporter.close()
    return TrainResult(model_dir, run.step, run.tokens_trained, run.first_loss, run.last_loss, None)


def _open_prompts(recipe: Recipe, tokenizer, accelerator, rows: list[dict]):
    return PromptFeed(rows, recipe.data.seed, accelerator.process_index, accelerator.num_processes,
                      accelerator.device), None


def _load_reference(run: Run):
    """The frozen reference (rl.reference, else model.path) at the policy's layout, for kl_weight > 0,
    with the policy's tokenizer (its mask token was checked with the recipe, setup.py)."""
    from ..train.distill import check_same_tokenizer
    from ..train.frozen import load_frozen

    settings = run.recipe.rl
    if settings.kl_weight == 0:
        return None
    path = settings.reference or run.recipe.model.path
    reference, tokenizer = load_frozen(path, run.recipe.model, run.accelerator.device)
    check_same_tokenizer(run.tokenizer, tokenizer, f"rl.reference {path}", "the policy's")
    set_attention(reference, run.layout_at(run.step)[1])
    return reference


def rl_step(run: Run, parts: Parts) -> dict:
    """One optimizer step: a micro-batch per prompt of the rollout (drawn first when one is due)."""
    accelerator, recipe = run.accelerator, run.recipe
    settings, scale = recipe.rl, recipe.train.grad_accum * accelerator.num_processes
    started = time.perf_counter()
    mode, ratio = run.layout_at(run.step)
    config = dataclasses.replace(run.diffusion, mode=mode)
    iteration = run.step % settings.iterations
    if iteration == 0 or run.train_blocks.rollout is None:
        run.train_blocks.rollout = draw_rollout(run, config, ratio, parts)
    lr = scheduled_lr(run.scheduler, recipe)
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss, KL, clipped, tokens, read
    finite, grad_norm = True, None
    for index, group in enumerate(run.train_blocks.rollout.groups):
        noise = _noise(run, run.step, index, group)
        set_attention(run.inner_model, ratio)
        with accelerator.accumulate(run.wrapped), accelerator.autocast():
            logps = run.wrapped(input_ids=group.ids, masks=noise.masks, prompt_len=group.prompt_len, mode=mode)
            old = logps.detach() if iteration == 0 else group.old_logps[iteration - 1]
            reference = _reference_logps(parts, config, group, noise)
            terms = grpo_terms(logps, old, group.advantages, noise.weights, settings.clip_epsilon,
                               settings.kl_weight, reference)
            micro_loss = terms.loss_sum / (logps.numel() * scale)
            accelerator.backward(micro_loss * scale)  # undo accelerate's 1/grad_accum and DDP's averaging
            if accelerator.sync_gradients:
                grad_norm, finite = _clip_and_check(run, totals[0] + micro_loss.detach())
            if finite or accelerator.scaler is not None:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        totals += torch.tensor([micro_loss.item(), terms.kl_sum, terms.clipped, logps.numel(), group.ids.numel()],
                               dtype=torch.float64, device=accelerator.device)
    run.scheduler.step()
    loss, kl_sum, clipped, tokens, read = all_reduce_sum(totals).tolist()
    run.step += 1
    run.tokens_trained += int(read)
    record = {"step": run.step, "loss": loss, **run.train_blocks.rollout.figures, "kl": kl_sum / max(tokens, 1),
              "clip_fraction": clipped / max(tokens, 1), "iteration": iteration, "lr": lr,
              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
              "tokens_per_s": read / (time.perf_counter() - started), "tokens_trained": run.tokens_trained}
    _count_finite(run, record, finite)
    return record


# The three kinds of random draws, each from generators of its own: the estimator's noise, the sampler's
# completions and the held-out completions. Interleaved (index * 3 + kind) rather than offset by a large
# constant: a CPU generator keeps only the low 32 bits of its seed, where such offsets vanish.
DRAWS = ("noise", "sampling", "held_out")


def _draws(run: Run, kind: str, index: int) -> torch.Generator:
    """The generator of draw `index` of `kind` (a prompt's place, or a held-out prompt's number)."""
    return micro_batch_generator(run.recipe.train.seed, len(DRAWS) * index + DRAWS.index(kind), run.accelerator.device)


def _place(run: Run, step: int, index: int) -> int:
    """Prompt `index` of this process at optimizer step `step`, numbered across every process and step: the
    same prompt, samples and noise however the prompts of a step are split over processes."""
    accelerator = run.accelerator
    return (step * run.recipe.train.grad_accum + index) * accelerator.num_processes + accelerator.process_index


def _noise(run: Run, step: int, index: int, group: Group) -> Noise:
    """The estimator's noise for prompt `index` of the rollout at optimizer step `step`: a function of the
    seed and the prompt's place alone, so the old policy's estimate (drawn with the rollout) and a
    resumed run see the same masks."""
    settings = run.recipe.rl
    generator = _draws(run, "noise", _place(run, step, index))
    return draw_noise(settings.estimator, group.ids, group.prompt_len, settings.prompt_mask_prob, generator)


@torch.no_grad()
def _reference_logps(parts: Parts, config, group: Group, noise: Noise) -> torch.Tensor | None:
    if parts.reference is None:
        return None
    return token_logps(parts.reference, config, group.ids, group.prompt_len, noise.masks)


def draw_rollout(run: Run, config, ratio: float, parts: Parts) -> Rollout:
    """`train.grad_accum` prompts with G completions each, scored, and the old policy's estimates for the
    rollout's later iterations (the weights are those of this step, before any update)."""
    settings, accelerator, model = run.recipe.rl, run.accelerator, run.inner_model
    groups, rewards, lengths, by_reward, errors = [], [], [], [], 0
    set_attention(model, ratio)
    with run.backend.full_weights(run.wrapped), accelerator.autocast():
        for index in range(run.recipe.train.grad_accum):
            number, row = run.train_blocks.next_row()
            seed = _draws(run, "sampling", _place(run, run.step, index)).initial_seed()
            ids, prompt_len, texts = completions_of(model, run.tokenizer, row["prompt"], settings,
                                                    settings.num_generations, seed)
            scores = _scores(parts, row, texts, f"prompt {number + 1} of rl.prompts")
            reward = torch.tensor(scores.total, device=accelerator.device)
            groups.append(Group(ids.to(accelerator.device), prompt_len, advantages(reward), []))
            rewards.append(reward)
            lengths.append(completion_lengths(ids, prompt_len, run.tokenizer.eos_token_id))
            by_reward.append(scores.by_reward)
            errors += scores.errors
        for iteration in range(1, settings.iterations):
            for index, group in enumerate(groups):
                noise = _noise(run, run.step + iteration, index, group)
                with torch.no_grad():
                    group.old_logps.append(token_logps(model, config, group.ids, group.prompt_len, noise.masks))
    return Rollout(groups, _over_processes(figures_of(rewards, lengths, by_reward, errors), accelerator))


def _over_processes(figures: dict, accelerator) -> dict:
    """The rollout's figures over every process: each has `train.grad_accum` groups, so the means are
    the means of the processes' means; the error count is their sum."""
    names = list(figures)  # the same keys in the same order on every process
    values = all_reduce_sum(torch.tensor([float(figures[name]) for name in names], dtype=torch.float64,
                                         device=accelerator.device)).tolist()
    world = accelerator.num_processes
    return {name: int(value) if name == "reward_errors" else value / world for name, value in zip(names, values)}


def _scores(parts: Parts, row: dict, texts: list[str], where: str):
    count = len(texts)
    fields = {key: [value] * count for key, value in row.items() if key != "prompt"}
    return score(parts.rewards, [row["prompt"]] * count, texts, fields, where)


def held_out_reward(run: Run, parts: Parts) -> dict:
    """The mean reward over the held-out prompts (each the mean of its G completions) and the standard
    error of that mean; each process scores every W-th prompt, the sums are reduced."""
    settings, accelerator, model = run.recipe.rl, run.accelerator, run.inner_model
    ratio = run.layout_at(max(run.step - 1, 0))[1]  # the step just trained's, as the export's
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # sum, sum of squares, prompts
    set_attention(model, ratio)
    with run.backend.full_weights(run.wrapped), accelerator.autocast():
        for index in range(accelerator.process_index, len(parts.eval_rows), accelerator.num_processes):
            row = parts.eval_rows[index]
            seed = _draws(run, "held_out", index).initial_seed()  # the same at every evaluation
            _, _, texts = completions_of(model, run.tokenizer, row["prompt"], settings, settings.num_generations,
                                         seed)
            mean = sum(_scores(parts, row, texts, f"prompt {index + 1} of rl.eval_prompts").total) / len(texts)
            totals += torch.tensor([mean, mean * mean, 1.0], dtype=torch.float64, device=accelerator.device)
    total, squares, count = all_reduce_sum(totals).tolist()
    mean = total / count
    variance = max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1)
    return {"step": run.step, "eval_reward": mean, "eval_reward_se": math.sqrt(variance / count),
            "eval_prompts": int(count)}
