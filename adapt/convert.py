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

from .atomic import write_text_atomically
from .errors import UserError
from .outputs import check_output
from .recipe import Recipe, load_recipe

# What `steps` and `seq_len` left unset become; `adapt convert --help` reads these and the keyword
# defaults of `convert_recipe`, so each default is written once.
DEFAULT_STEPS = 1000
DEFAULT_SEQ_LEN = 512
RECIPE_FILE = "recipe.yaml"  # in the output folder: the recipe the run ran
# A small local corpus gets a larger validation fraction, so that what is held out still fills this
# many blocks (sized from the file size before tokenizing, at a rough BYTES_PER_TOKEN), up to the cap.
VALIDATION_BLOCKS = 4
BYTES_PER_TOKEN = 4
MAX_VALIDATION_FRACTION = 0.1


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
    mode: str | None = None,
    block_size: int | None = None,
    draft_size: int | None = None,
    overrides: list[str] = (),
) -> Recipe:
    """The recipe `adapt convert` runs.

    Budget: `tokens` (rounded up to whole steps) or `steps`, default DEFAULT_STEPS. Annealing takes the
    first half of the run, warmup the first 5%, then cosine decay; seq_len is DEFAULT_SEQ_LEN or the
    model's limit, whichever is lower. `mode` is the kind of model (None: the source's), `block_size` the
    blocks of `mode="block"`, `draft_size` the draft blocks of `mode="hybrid"` (docs/method.md).
    """
    if tokens is not None and steps is not None:
        raise UserError("give the budget as --tokens or --steps, not both")
    check_convert_output(Path(out), reads=(model, data))
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, _model_max_positions(model) or DEFAULT_SEQ_LEN)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tokens is not None:
        if tokens < 1:
            raise UserError(f"--tokens must be positive, got {tokens}")
        # max(1, ...): a batch size or seq_len below 1 is refused by the recipe's own range check below
        steps = math.ceil(tokens / max(1, batch_size * seq_len * world))
    if steps is None:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise UserError(f"--steps must be positive, got {steps}")
    base = {
        "model": {"path": model, "mask_token": mask_token, "mask_token_id": mask_token_id},
        "diffusion": {"mode": mode, "block_size": block_size, "draft_size": draft_size},
        "data": {"path": data, "seq_len": seq_len, "validation_fraction": _validation_fraction(data, seq_len)},
        "train": {"batch_size": batch_size, "max_steps": steps,
                  "anneal_steps": max(1, steps // 2) if anneal_steps is None else anneal_steps, "eval_every": max(1, steps // 10)},
        "optim": {"lr": lr, "schedule": "cosine", "warmup_steps": steps // 20},
        "checkpoint": {"every": max(1, steps // 10)},
        "output_dir": out,
        "resume": "auto",
    }
    return load_recipe(None, list(overrides), base=base)


def write_recipe(recipe: Recipe, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def check_convert_output(out: Path, reads: tuple = ()) -> None:
    """`out` must be writable, overlap none of the paths the command `reads`, and be new, empty, or a
    previous convert run (which resumes); nothing else, since RECIPE_FILE and the run's outputs are written
    into it."""
    from .train.checkpoint import RUN_ARTEFACTS
    from .train.lock import LOCK_FILE, refuse_if_held

    check_output(out, folder=True, reads=reads)
    refuse_if_held(out)  # a run going on there: not even its recipe.yaml may be touched
    ours = {RECIPE_FILE, LOCK_FILE, *RUN_ARTEFACTS}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"{out} already holds other files ({shown}); "
                        "give --out a new or empty folder (or that of a previous convert run, to resume it)")


def _validation_fraction(data: str, seq_len: int) -> float:
    """data.validation_fraction's default, or more for a small local corpus (see VALIDATION_BLOCKS)."""
    from .data import DataConfig
    from .settings import default_of

    default, local = default_of(DataConfig, "validation_fraction"), Path(data).expanduser()
    if not local.exists():
        return default  # a Hub dataset: large, and its size unknown here
    files = [local] if local.is_file() else [f for f in local.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    # twice the blocks wanted: documents are held out whole, by a hash, so the share comes out uneven
    wanted = 2 * VALIDATION_BLOCKS * seq_len * BYTES_PER_TOKEN / max(size, 1)
    return min(max(default, wanted), MAX_VALIDATION_FRACTION)


def _model_max_positions(model: str) -> int | None:
    """The model's position limit from its config alone (no weights loaded); None if unknown."""
    from transformers import AutoConfig

    from .limits import max_positions
    from .modeling import from_pretrained_args

    source, kwargs = from_pretrained_args(model)
    try:
        return max_positions(AutoConfig.from_pretrained(source, **kwargs))
    except (OSError, ValueError):
        return None  # load_model reports the problem properly when training starts
