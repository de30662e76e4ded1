"""The ways processes share a run: one object per backend with the few operations that differ.

`AccelerateBackend` carries one process, DDP and DeepSpeed ZeRO-2/3 through accelerate; `FSDP2Backend`
shards with torch's own `fully_shard` (accelerate's FSDP plugin is silently ignored on CPU, so we shard
ourselves and it shards everywhere). Both sit on an `Accelerator`, which owns the process group, the
device, autocast, gradient accumulation and the trackers. A new backend is a new subclass here and an
entry in `BACKENDS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..recipe import Recipe
from ..structure import decoder_layers
from .report import log, warn


class Backend:
    """What every backend offers the loop. `name` is the one in the log: single, ddp, deepspeed, fsdp."""

    def __init__(self, accelerator, recipe: Recipe, name: str):
        self.accelerator, self.recipe, self.name = accelerator, recipe, name

    @staticmethod
    def accelerator_options(recipe: Recipe, name: str, world: int) -> dict:
        """Extra keyword arguments for this backend's `Accelerator`."""
        return {}

    def prepare(self, objective: nn.Module, param_groups, make_scheduler) -> tuple:
        """Wrap (or shard) the objective; build its optimizer over `param_groups(objective)` and the
        scheduler `make_scheduler(optimizer)`. Returns (objective, optimizer, scheduler)."""
        raise NotImplementedError

    def inner_model(self, objective: nn.Module) -> nn.Module:
        """The (peft-wrapped) causal LM inside the prepared objective."""
        raise NotImplementedError

    def clip_gradients(self, objective: nn.Module, max_norm: float):
        """Clip to `max_norm` (0: only measure) and return the global gradient norm before clipping."""
        raise NotImplementedError

    def save_state(self, folder: Path, objective, optimizer, scheduler) -> None:
        raise NotImplementedError

    def load_state(self, folder: Path, objective, optimizer, scheduler) -> None:
        raise NotImplementedError

    def full_state_dict(self, objective: nn.Module) -> dict | None:
        """The whole model's weights where they are sharded (every process calls this); None if not."""
        return None

    def full_weights(self, objective: nn.Module):
        """A context in which the inner model can be called directly (validation) with its full weights."""
        return contextlib.nullcontext()

    def make_optimizer(self, param_groups) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups, **adamw_options(self.recipe))


def adamw_options(recipe: Recipe) -> dict:
    optim = recipe.optim
    return dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.adam_eps, weight_decay=optim.weight_decay)


class AccelerateBackend(Backend):
    """One process, DDP or DeepSpeed ZeRO: accelerate does the wrapping, clipping and state files."""

    @staticmethod
    def accelerator_options(recipe: Recipe, name: str, world: int) -> dict:
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        options = {}
        if world > 1 and not torch.cuda.is_available():
            # On CPU accelerate runs one process per launch unless told `cpu=True` (then it uses DDP over
            # gloo); DeepSpeed instead needs the gloo group passed in, or its world and accelerate's disagree.
            if name == "deepspeed":
                options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            else:
                options["cpu"] = True
        if name == "deepspeed":
            options["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe, world))
        return options

    def prepare(self, objective, param_groups, make_scheduler):
        optimizer = self.make_optimizer(param_groups(objective))
        scheduler = make_scheduler(optimizer)  # on the plain optimizer, before accelerate wraps it
        objective, optimizer = self.accelerator.prepare(objective, optimizer)
        self.accelerator.register_for_checkpointing(scheduler)
        return objective, optimizer, scheduler

    def make_optimizer(self, param_groups):
        if self.name == "deepspeed" and _offloads_optimizer(self.recipe):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **adamw_options(self.recipe))
        return super().make_optimizer(param_groups)

    def inner_model(self, objective):
        return self.accelerator.unwrap_model(objective).model

    def clip_gradients(self, objective, max_norm):
        # Under DeepSpeed the engine has already clipped (gradient_clipping) and stepped inside `backward`;
        # accelerate then returns the norm the engine measured.
        return self.accelerator.clip_grad_norm_(objective.parameters(), max_norm if max_norm > 0 else float("inf"))

    def save_state(self, folder, objective, optimizer, scheduler):
        self.accelerator.save_state(str(folder))  # the scheduler is registered for checkpointing

    def load_state(self, folder, objective, optimizer, scheduler):
        self.accelerator.load_state(str(folder))

    def full_state_dict(self, objective):
        if self.name == "deepspeed" and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return self.accelerator.get_state_dict(objective)  # DeepSpeed's 16-bit gather
        return None


class FSDP2Backend(Backend):
    """torch's `fully_shard` over a device mesh of all processes; state through torch.distributed.checkpoint."""

    @staticmethod
    def accelerator_options(recipe, name, world):
        # The MixedPrecisionPolicy does what autocast would; accelerate only carries the processes.
        options = {"mixed_precision": "no"}
        if world > 1 and not torch.cuda.is_available():
            options["cpu"] = True
        return options

    def prepare(self, objective, param_groups, make_scheduler):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .partitioned import fill_sharded, is_empty

        accelerator = self.accelerator
        if accelerator.num_processes < 2:
            raise UserError("distributed.backend: fsdp needs several processes; launch with torchrun --nproc_per_node N")
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        policy = MixedPrecisionPolicy()
        if self.recipe.train.mixed_precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        empty = is_empty(objective)  # load_model left the weights to be read into the shards
        if not empty:
            objective.to(accelerator.device)
        options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=self.recipe.distributed.fsdp_reshard_after_forward)
        layers = decoder_layers(objective.model)
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(objective, **options)  # the rest (embeddings, norm, head) as the root group
        if empty:
            fill_sharded(objective, objective.model, self.recipe.model, accelerator.device)
        loaded = "weights read into the shards" if empty else "from a whole copy in every process"
        log(accelerator, f"FSDP2: sharded {len(layers)} layers over {accelerator.num_processes} "
                         f"{accelerator.device.type} processes, {loaded}")
        optimizer = self.make_optimizer(param_groups(objective))  # over the sharded parameters
        return objective, optimizer, make_scheduler(optimizer)

    def inner_model(self, objective):
        return objective.model

    def clip_gradients(self, objective, max_norm):
        params = [p for p in objective.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save_state(self, folder, objective, optimizer, scheduler):
        """Sharded model + optimizer through torch.distributed.checkpoint; scheduler and RNG per process."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(objective, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder / "fsdp"))
        torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   folder / f"process_{self.accelerator.process_index}.pt")

    def load_state(self, folder, objective, optimizer, scheduler):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(objective, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "fsdp"))
        set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        # Python and numpy RNG states are not tensors; the file is our own, written by save_state above.
        saved = torch.load(folder / f"process_{self.accelerator.process_index}.pt", weights_only=False)
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])

    def full_state_dict(self, objective):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextlib.contextmanager
    def full_weights(self, objective):
        # Calling the inner model directly skips the root group's hooks that would gather its weights.
        objective.unshard()
        try:
            yield
        finally:
            objective.reshard()


BACKENDS = {"single": AccelerateBackend, "ddp": AccelerateBackend, "deepspeed": AccelerateBackend,
            "fsdp": FSDP2Backend}


def open_backend(recipe: Recipe, output_dir: Path) -> Backend:
    """The Accelerator for the recipe's backend, wrapped in that backend's operations."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = recipe.distributed.backend
    if name == "auto":
        name = "deepspeed" if recipe.distributed.deepspeed_config else ("ddp" if world > 1 else "single")
    backend_class = BACKENDS[name]
    options = backend_class.accelerator_options(recipe, name, world)
    accelerator = _make_accelerator(recipe, output_dir, options)
    if name == "ddp" and accelerator.num_processes == 1:
        name = "single"
    log(accelerator, f"backend {name}, {accelerator.num_processes} process(es) on {accelerator.device}")
    if recipe.train.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        warn(accelerator, "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is emulated and far "
                          "slower than float32 (a SmolLM2-135M step 26x slower on a 2-core AVX2 machine); set "
                          "train.mixed_precision=no")
    return backend_class(accelerator, recipe, name)


def _make_accelerator(recipe: Recipe, output_dir: Path, options: dict):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    log_with = ["tensorboard"] if recipe.logging.tensorboard else []
    if recipe.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("logging.wandb is true but wandb is not installed; pip install wandb "
                            "(and set WANDB_API_KEY), or set logging.wandb: false")
        log_with.append("wandb")
    # accelerate keeps its settings in process-wide singletons; a second run in the same process (tests,
    # notebooks) with other settings would be refused. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    options = {"mixed_precision": recipe.train.mixed_precision, **options}
    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=recipe.train.grad_accum,
                                                                sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        **options,
    )


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 matmuls in hardware; True where that cannot be told (not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def deepspeed_config(recipe: Recipe, world: int) -> dict:
    """The recipe's DeepSpeed JSON with its "auto" values filled in from the recipe."""
    path = Path(recipe.distributed.deepspeed_config)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"distributed.deepspeed_config {path} is not valid JSON: {err}") from None
    train = recipe.train
    filled = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key != "gradient_clipping" and config[key] != value:
            raise UserError(f"{path}: {key} is {config[key]} but the recipe gives {value}; set it to \"auto\"")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = train.mixed_precision == precision
    return config


def _offloads_optimizer(recipe: Recipe) -> bool:
    config = json.loads(Path(recipe.distributed.deepspeed_config).read_text())
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") == "cpu"


@contextlib.contextmanager
def no_zero3_init():
    """Build a model normally even while a ZeRO-3 config is registered with transformers."""
    import transformers.integrations.deepspeed as hf_ds
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    saved = hf_ds._hf_deepspeed_config_weak_ref if is_deepspeed_zero3_enabled() else None
    if saved is not None:
        unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None:
            hf_ds._hf_deepspeed_config_weak_ref = saved


def _rng_state() -> dict:
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
