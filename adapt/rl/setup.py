"""What `adapt rl` checks before anything loads: the prompts, the policy it is given, and the lengths."""

from __future__ import annotations

import dataclasses

from ..diffusion import DiffusionConfig
from ..errors import UserError
from ..recipe import Recipe, TrainSection
from ..settings import default_of


def prepared_recipe(recipe: Recipe) -> tuple[Recipe, list[dict], list[dict]]:
    """(the recipe with data.seq_len set to the longest sequence the run forms, the prompt rows, the held-out
    rows), after refusing what the run could not do: no prompts, a policy that is not a diffusion model
    (or has no AR head for estimator: ar, or outputs scores rather than logits), a prompt too long for the
    model with rl.completion_length tokens after it."""
    from ..self_distill import read_prompt_rows

    settings = recipe.rl
    if not settings.prompts:
        raise UserError("rl.prompts is not set, so there is nothing to train on; set it to a .txt or .jsonl file of "
                        "prompts (docs/recipes.md, the rl section)")
    if recipe.train.batch_size != default_of(TrainSection, "batch_size"):
        raise UserError("train.batch_size is not read by adapt rl: a micro-batch is one prompt's "
                        "rl.num_generations completions; set train.grad_accum (prompts per step per process) instead")
    rows = read_prompt_rows(settings.prompts, "rl.prompts")
    eval_rows = read_prompt_rows(settings.eval_prompts, "rl.eval_prompts") if settings.eval_prompts else []
    config, tokenizer = _policy(recipe)
    if settings.kl_weight > 0 and settings.reference is not None:
        _check_reference(recipe, DiffusionConfig.from_model_config(config))
    longest = max(_prompt_tokens(tokenizer, row["prompt"]) for row in rows + eval_rows)
    from ..limits import check_context

    check_context(config, longest + settings.completion_length,
                  f"the longest prompt ({longest} tokens) and rl.completion_length ({settings.completion_length})",
                  overridable=False)
    data = dataclasses.replace(recipe.data, seq_len=longest + settings.completion_length)
    return dataclasses.replace(recipe, data=data), rows, eval_rows


def _policy(recipe: Recipe):
    """(the model's config, its tokenizer), the config checked to be a diffusion model the estimator reads."""
    from transformers import AutoConfig, AutoTokenizer

    path, trust = recipe.model.path, recipe.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise UserError(f"model.path {path}: cannot load its config and tokenizer ({str(err).splitlines()[0]}); "
                        "give a diffusion checkpoint folder (adapt train / adapt convert output)") from None
    diffusion = DiffusionConfig.from_model_config(config)
    if diffusion is None or diffusion.mask_token_id is None:
        raise UserError(f"model.path {path} is a causal LM, not a diffusion model; adapt rl trains a converted "
                        "model: convert it first (adapt convert / adapt train) and give that output's model folder")
    if recipe.rl.estimator == "ar" and not diffusion.mode.has_ar_head:
        raise UserError(f"rl.estimator: ar reads an AR head, and this {diffusion.mode.name} model has none; use "
                        "estimator coupled or diffu-grpo")
    from ..sampling import SamplingOptions, verifies

    if verifies(diffusion, SamplingOptions(decoding=recipe.rl.decoding)) and recipe.rl.steps is not None:
        raise UserError(f"rl.steps: this {diffusion.mode.name} model samples by verifying its drafts (rl.decoding: "
                        f"{recipe.rl.decoding}), which takes no steps; drop rl.steps or set rl.decoding: diffusion")
    if diffusion.objective == "score-entropy":
        raise UserError("model.path was trained with score entropy, whose outputs are log scores, not the "
                        "log-probabilities the estimators read; use a model trained with objective mdm or cart")
    return config, tokenizer


def _check_reference(recipe: Recipe, policy: DiffusionConfig) -> None:
    """rl.reference must be a diffusion model with the policy's mask token: the same noise means the same."""
    from transformers import AutoConfig

    path = recipe.rl.reference
    try:
        reference = DiffusionConfig.from_model_config(
            AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code))
    except (OSError, ValueError) as err:
        raise UserError(f"rl.reference {path}: cannot load its config ({str(err).splitlines()[0]}); give a diffusion "
                        "checkpoint folder, or null for model.path") from None
    if reference is None or reference.mask_token_id != policy.mask_token_id:
        raise UserError(f"rl.reference {path} is not a diffusion model with the policy's mask token "
                        f"({policy.mask_token_id}); give the model the policy was converted to, or null")


def _prompt_tokens(tokenizer, prompt: str) -> int:
    from ..sampling import context_ids

    return len(context_ids(tokenizer, prompt))
