"""The checkpoint format: output_dir/checkpoints/step-NNNNNN/, complete once renamed from .tmp-.

A checkpoint holds the backend's state files (model, optimizer, scheduler, RNG), each process's data
position (data_rank{r}.json) and trainer_state.json (step, tokens, diffusion settings, recipe, model
fingerprint, what the weights are trained for: `run_meaning`), written last. A crash while saving leaves
a .tmp- folder that is never taken for one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..diffusion import DiffusionConfig
from ..errors import UserError
from ..outputs import check_output, tensor_bytes, writing
from ..recipe import Recipe
from ..settings import at_least, from_dict, read_from, read_json
from .collectives import all_reduce_sum
from .report import METRICS_FILE, warn
from .state import Run
from .stops import NumericalFault

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
EXPORT_DIR = "model"
PROGRESS_EXPORTS = "models"  # the models of checkpoint.export_every, one folder per step
RUN_ARTEFACTS = (CHECKPOINTS, EXPORT_DIR, PROGRESS_EXPORTS, "logs", METRICS_FILE)


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its .tmp- name)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_inputs(recipe: Recipe) -> list[str]:
    """The paths a run reads (model, data, teacher, prompts, reference, DeepSpeed config) that its outputs
    must not overlap (`outputs.check_output`). A run writes and clears only its RUN_ARTEFACTS in output_dir,
    so an input beside them is safe; and a resumed run may start from its own output_dir/model, which it
    replaces only once it has finished."""
    data, rl = recipe.data, recipe.rl
    paths = [recipe.model.path, data.path, data.validation_path, *(source.path for source in data.sources),
             recipe.distill.teacher, rl.prompts, rl.eval_prompts, rl.reference, recipe.distributed.deepspeed_config]
    output_dir = Path(recipe.output_dir).expanduser().resolve()
    written = [output_dir / name for name in RUN_ARTEFACTS if not (recipe.resume is not None and name == EXPORT_DIR)]

    def at_risk(path: str) -> bool:  # outside output_dir (it may sit inside), or where the run writes
        path = Path(path).expanduser().resolve()
        return output_dir not in path.parents or any(out == path or out in path.parents for out in written)
    return [path for path in paths if path and at_risk(path)]


def resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint `recipe.resume` asks for (None: a fresh run, which `previous_run` keeps off old checkpoints)."""
    output_dir = Path(recipe.output_dir)
    if recipe.resume is None:
        return None
    existing = complete_checkpoints(output_dir)
    if recipe.resume == "auto":
        return existing[-1] if existing else None
    path = Path(recipe.resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                        f"pass a folder under {output_dir / CHECKPOINTS} or resume=auto")
    return path


def previous_run(output_dir: Path, overwrite: bool) -> list[Path]:
    """The outputs of a previous run in `output_dir`, which a fresh run replaces: refused unless `overwrite`."""
    previous = [output_dir / name for name in RUN_ARTEFACTS if (output_dir / name).exists()]
    if previous and not overwrite:
        raise UserError(f"{output_dir} already has checkpoints or other outputs of a run ({', '.join(p.name for p in previous)}); "
                        "continue it with --resume, replace it with --overwrite, or choose another output_dir")
    return previous


def delete_previous_run(previous: list[Path], accelerator) -> None:
    """Delete what `previous_run` found, once the new run has passed every check (a refused run deletes nothing)."""
    if previous and accelerator.is_main_process:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def model_shapes(model: nn.Module) -> dict:
    """A fingerprint of the model's parameters (names and shapes), recorded in every checkpoint."""
    # ZeRO-3 (zero.Init) leaves each process an empty slice; `ds_shape` / `ds_numel` are the whole weight's.
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    listing = "\n".join(f"{name}:{shape}" for name, shape in shapes.items())
    return {"parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def run_meaning(run: Run) -> dict:
    """What a checkpoint's weights are trained for beyond their shapes: the kind of model and its size, the
    sequence length, the objective, the shift and the mask token. Recorded in every checkpoint: resuming
    under other values would silently go on training towards another model from these weights."""
    diffusion = run.diffusion
    return {**{f"diffusion.{key}": value for key, value in diffusion.mode.to_dict().items()},
            "data.seq_len": run.recipe.data.seq_len, "diffusion.objective": diffusion.objective,
            "shift": diffusion.shift, "mask_token_id": diffusion.mask_token_id}


def optimizer_groups(optimizer) -> list[str]:
    """The kinds of the optimizer's parameter groups (build.param_groups), in order: what its state's layout
    depends on, so a resume with other lr_multipliers is refused before torch fails to load it."""
    return [group.get("kind", "all") for group in optimizer.param_groups]


def save_checkpoint(run: Run) -> Path:
    """Write step `run.step` under a .tmp- name on every process, then rename it on the main one."""
    accelerator = run.accelerator
    _refuse_nonfinite_weights(run)
    final = run.output_dir / CHECKPOINTS / f"step-{run.step:06d}"
    temp = final.with_name(".tmp-" + final.name)
    check_output(final.parent, folder=True, needed_bytes=_checkpoint_bytes(run))
    with writing(final, temp):  # a failure (a full disk, say) leaves no .tmp- folder behind
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        run.backend.save_state(temp, run.wrapped, run.optimizer, run.scheduler)
        (temp / f"data_rank{accelerator.process_index}.json").write_text(json.dumps(run.train_blocks.state_dict()))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            diffusion = dataclasses.replace(run.diffusion, objective_state=run.objective.state_dict())
            state = {"step": run.step, "tokens_trained": run.tokens_trained, "world_size": accelerator.num_processes,
                     "diffusion": diffusion.to_dict(), "recipe": run.recipe.to_dict(),
                     "model_shapes": run.model_shapes, "optimizer_groups": optimizer_groups(run.optimizer),
                     "meaning": run_meaning(run)}
            (temp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            temp.rename(final)
        for old in complete_checkpoints(run.output_dir)[: -run.recipe.checkpoint.keep]:
            shutil.rmtree(old)
        print(f"adapt train: checkpoint {final}", flush=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoint_bytes(run: Run) -> int:
    """About what this process writes into a checkpoint: its (shard of the) weights and optimizer state."""
    state = getattr(run.optimizer, "state", None) or {}
    moments = [t for entry in state.values() if isinstance(entry, dict) for t in entry.values() if torch.is_tensor(t)]
    weights = [p.to_local() if hasattr(p, "to_local") else p for p in run.wrapped.parameters()]  # FSDP2: a shard
    return tensor_bytes(weights) + tensor_bytes(moments)


@dataclass
class TrainerState:
    """trainer_state.json, as a resume reads it (keys it does not read are left alone)."""

    step: int = field(metadata=at_least(0))
    tokens_trained: int = field(metadata=at_least(0))
    world_size: int = field(metadata=at_least(1))
    diffusion: dict
    recipe: dict
    model_shapes: dict | None = None
    optimizer_groups: list[str] | None = None  # None: written before lr_multipliers existed
    meaning: dict | None = None  # run_meaning; None: written before it was recorded


def read_checkpoint_file(path: Path, name: str, cls):
    """File `name` of checkpoint `path` as dataclass `cls`: a damaged or edited one is a UserError naming
    it, and the way on without it."""
    values = read_json(path / name, _damaged(path))
    with read_from(str(path / name), _damaged(path)):
        known = {f.name for f in dataclasses.fields(cls)}
        return from_dict(cls, {key: value for key, value in values.items() if key in known}, whole="the file")


def _load_data_position(run: Run, path: Path) -> None:
    """Restore where this process's data stream stood from its data_rank{r}.json. Each stream (training
    blocks, rl's prompt feed) has its own layout, so its `load_state_dict` is what checks it."""
    file = path / f"data_rank{run.accelerator.process_index}.json"
    try:
        run.train_blocks.load_state_dict(read_json(file, _damaged(path)))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{file} does not hold the data position this run reads (its keys or values are not those "
                        f"adapt writes); {_damaged(path)}") from None


def _damaged(path: Path) -> str:
    """What to do about a checkpoint whose files are damaged: go on from the one before it, or another."""
    return f"the checkpoint is damaged: delete {path} to resume from the one before it, or resume from another (resume=PATH)"


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore the state and the progress (step, tokens) that `save_checkpoint` wrote into `run`."""
    state = read_checkpoint_file(path, STATE_FILE, TrainerState)
    with read_from(str(path / STATE_FILE), _damaged(path)):
        diffusion = DiffusionConfig.from_dict(state.diffusion)
    saved_shapes = state.model_shapes
    if saved_shapes is not None and saved_shapes != run.model_shapes:
        raise UserError(f"{path} was written for a different model ({saved_shapes.get('parameters', 0):,} parameters, "
                        f"model.path {state.recipe.get('model', {}).get('path')}) than this run's "
                        f"({run.model_shapes['parameters']:,}); resume with the model it was trained from, or "
                        "start a fresh output_dir")
    _refuse_other_meaning(run, path, state.meaning)
    accelerator = run.accelerator
    if state.world_size != accelerator.num_processes:
        raise UserError(f"{path} was written by {state.world_size} processes but this run has "
                        f"{accelerator.num_processes}; resume with the same process count")
    groups = optimizer_groups(run.optimizer)
    if state.optimizer_groups is not None and state.optimizer_groups != groups:
        raise UserError(f"{path} was written with optimizer groups {', '.join(state.optimizer_groups)} "
                        f"(optim.lr_multipliers {state.recipe.get('optim', {}).get('lr_multipliers')}) but this run "
                        f"has {', '.join(groups)}; resume with the lr_multipliers it was trained with, or start a "
                        "fresh output_dir")
    _load_data_position(run, path)  # before the weights and optimizer: a damaged file costs no minutes of loading
    run.backend.load_state(path, run.wrapped, run.optimizer, run.scheduler)
    run.step, run.tokens_trained = state.step, state.tokens_trained
    # what the objective measured at the run's first step (checkpoints of every version of adapt)
    run.objective.load_state_dict(diffusion.objective_state)


def _refuse_other_meaning(run: Run, path: Path, saved: dict | None) -> None:
    """Refuse to resume `path` (whose recorded `run_meaning` is `saved`) under other settings, naming each."""
    if saved is None:  # written before checkpoints recorded it
        warn(run.accelerator, f"{path} does not record its mode, seq_len and objective (an older adapt wrote it), "
                              "so a resume under other settings cannot be refused; check they are the run's")
        return
    now = run_meaning(run)
    changed = [f"{key} (was {saved[key]}, now {value})" for key, value in now.items()
               if key in saved and saved[key] != value]  # a key added later: not recorded, not compared
    if changed:
        raise UserError(f"{path} was written under other settings: {', '.join(changed)}; resume with the settings "
                        "it was written with (a convert or distill run: its recipe.yaml), or start afresh with "
                        "--overwrite or another output_dir")


def _refuse_nonfinite_weights(run: Run) -> None:
    bad = []
    for name, param in run.wrapped.named_parameters():
        local = param.detach()
        local = local.to_local() if hasattr(local, "to_local") else local  # an FSDP2 DTensor shard
        if not torch.isfinite(local).all():
            bad.append(name)
    if all_reduce_sum(torch.tensor([float(len(bad))], device=run.accelerator.device)).item() > 0:
        previous = complete_checkpoints(run.output_dir)
        raise NumericalFault(f"weights became non-finite by step {run.step} ({', '.join(bad[:3]) or 'on another process'}); "
                             "no checkpoint written; lower optim.lr and continue from the last complete checkpoint "
                             f"({previous[-1] if previous else 'none yet'}) with --resume", None)
