"""`adapt convert`: the one-command path from a causal LM and a corpus to a diffusion LM.

It builds a recipe from defaults that suit a first run and hands it to `adapt.train.train`; everything
it decides is printed and stored in output_dir/recipe.yaml, so the run can be repeated or tuned with
`adapt train output_dir/recipe.yaml key=value ...`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from .errors import UserError
from .recipe import Recipe, load_recipe

# What `steps` and `seq_len` left unset become; `adapt convert --help` reads these and the keyword
# defaults of `convert_recipe`, so each default is written once.
DEFAULT_STEPS = 1000
DEFAULT_SEQ_LEN = 512


def convert_recipe(
    model: str,
    data: str,
    out: str,
    *,
    tokens: int | None = None,
    steps: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    lr: float = 1e-4,
    anneal_steps: int | None = None,
    mask_token: str = "add",
    mask_token_id: int | None = None,
    overrides: list[str] = (),
) -> Recipe:
    """The recipe `adapt convert` runs.

    Budget: `tokens` (rounded up to whole steps) or `steps`, default DEFAULT_STEPS. Annealing takes the
    first half of the run, warmup the first 5%, then cosine decay; seq_len is DEFAULT_SEQ_LEN or the
    model's limit, whichever is lower.
    """
    if tokens is not None and steps is not None:
        raise UserError("give the budget as --tokens or --steps, not both")
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, _model_max_positions(model) or DEFAULT_SEQ_LEN)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tokens is not None:
        if tokens < 1:
            raise UserError(f"--tokens must be positive, got {tokens}")
        steps = math.ceil(tokens / (batch_size * seq_len * world))
    steps = steps or DEFAULT_STEPS
    if steps < 1:
        raise UserError(f"--steps must be positive, got {steps}")
    base = {
        "model": {"path": model, "mask_token": mask_token, "mask_token_id": mask_token_id},
        "data": {"path": data, "seq_len": seq_len},
        "train": {"batch_size": batch_size, "max_steps": steps,
                  "anneal_steps": anneal_steps or max(1, steps // 2), "eval_every": max(1, steps // 10)},
        "optim": {"lr": lr, "schedule": "cosine", "warmup_steps": steps // 20},
        "checkpoint": {"every": max(1, steps // 10)},
        "output_dir": out,
        "resume": "auto",
    }
    return load_recipe(None, list(overrides), base=base)


def write_recipe(recipe: Recipe, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _model_max_positions(model: str) -> int | None:
    """The model's position limit from its config alone (no weights loaded); None if unknown."""
    from transformers import AutoConfig

    from .modeling import from_pretrained_args, max_positions

    source, kwargs = from_pretrained_args(model)
    try:
        return max_positions(AutoConfig.from_pretrained(source, **kwargs))
    except (OSError, ValueError):
        return None  # load_model reports the problem properly when training starts
