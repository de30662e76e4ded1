"""The ways processes share a run: one class per backend, and `BACKENDS`, the table of them by name.

Each backend owns what depends on it: its `Accelerator`'s options; how the model is loaded into the
processes (a whole copy in each; under ZeRO-3 each process's slices; under FSDP2 the meta device, filled
once sharded: partitioned.py); whether LoRA trains under it; the operations the loop calls (prepare,
clip, save and load state, the full weights); and its memory model for `adapt plan`. `choose_backend`
decides "auto", for a run and for a plan alike.

One process, DDP and DeepSpeed ZeRO-2/3 go through accelerate; FSDP2 shards with torch's own
`fully_shard` (accelerate's FSDP plugin is silently ignored on CPU, so we shard ourselves and it shards
everywhere). All sit on an `Accelerator`, which owns the process group, the device, autocast, gradient
accumulation and the trackers. A new backend is a new subclass here and an entry in `BACKENDS`; the
recipe's `distributed.backend` choices and `adapt plan` follow from the table.
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
from ..recipe import BACKEND_CHOICES, ModelSection, Recipe
from ..structure import decoder_layers
from .partitioned import PIECE_BYTES, fill_sharded, is_empty, is_zero3, load_empty, load_partitioned
from .report import log, warn


class Backend:
    """What every backend offers the loop and `adapt plan`. `name` is its recipe value and the one in the log."""

    name: str
    supports_lora = True  # whether peft's LoRA adapters train under it (open_backend refuses them otherwise)

    def __init__(self, accelerator, recipe: Recipe):
        self.accelerator, self.recipe = accelerator, recipe

    @staticmethod
    def accelerator_options(recipe: Recipe, world: int) -> dict:
        """Extra keyword arguments for this backend's `Accelerator` over `world` processes."""
        return {}

    @staticmethod
    def load(settings: ModelSection, load_whole) -> tuple:
        """(model, tokenizer) as each process holds them before `prepare`; `load_whole(settings)` is the
        ordinary loader, a whole copy in every process."""
        return load_whole(settings)

    @classmethod
    def model_states(cls, recipe: Recipe, shape, gpus: int, per_node: int) -> dict:
        """`adapt plan`'s memory model for the model `shape` (plan.py's ModelShape) on `gpus` GPUs, `per_node`
        a node: {"gpu": bytes per GPU of "weights", "gradients" and "optimizer" states, "cpu": bytes of host
        memory per node, by what holds them}."""
        raise NotImplementedError

    @classmethod
    def plan_entry(cls, recipe: Recipe) -> dict:
        """What `adapt plan` reports about the backend (the "backend" of its JSON)."""
        return {"name": cls.name}

    @staticmethod
    def describe(entry: dict) -> str:
        """The backend line of `adapt plan`'s table, from `plan_entry`."""
        return entry["name"]

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


def _adamw_states(recipe: Recipe, shape) -> dict:
    """Bytes of the whole model's weights, gradients and torch AdamW's two moments (in the weights' dtype)."""
    weight = recipe.model.dtype_bytes()
    params, trainable = shape.parameters, shape.trainable
    states = {"weights": weight * params, "gradients": weight * trainable, "optimizer": 2 * weight * trainable}
    if recipe.train.mixed_precision != "no" and weight == 4:
        states["weights"] += 2 * params  # the 16-bit copies autocast casts each weight to, kept for backward
    return states


def _several_cpu_processes(world: int) -> bool:
    """Whether the run is several processes on CPU. accelerate then runs one process per launch unless told
    `cpu=True` (then it uses DDP over gloo); DeepSpeed instead needs the gloo group passed in, or its world
    and accelerate's disagree."""
    return world > 1 and not torch.cuda.is_available()


class AccelerateBackend(Backend):
    """The backends accelerate wraps: it does the wrapping, clipping and state files."""

    def prepare(self, objective, param_groups, make_scheduler):
        optimizer = self.make_optimizer(param_groups(objective))
        scheduler = make_scheduler(optimizer)  # on the plain optimizer, before accelerate wraps it
        objective, optimizer = self.accelerator.prepare(objective, optimizer)
        self.accelerator.register_for_checkpointing(scheduler)
        return objective, optimizer, scheduler

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


class SingleBackend(AccelerateBackend):
    """One process: the whole model, its gradients and optimizer states on its device."""

    name = "single"

    @classmethod
    def model_states(cls, recipe, shape, gpus, per_node):
        # Each process reads the whole checkpoint into CPU RAM once before moving it to its GPU.
        return {"gpu": _adamw_states(recipe, shape),
                "cpu": {"loading": per_node * recipe.model.dtype_bytes() * shape.parameters}}


class DDPBackend(SingleBackend):
    """A whole copy in every process, as one process holds it; the gradients all-reduced between them."""

    name = "ddp"

    @staticmethod
    def accelerator_options(recipe, world):
        return {"cpu": True} if _several_cpu_processes(world) else {}

    @classmethod
    def model_states(cls, recipe, shape, gpus, per_node):
        states = super().model_states(recipe, shape, gpus, per_node)
        states["gpu"]["gradients"] *= 2  # DDP all-reduces through bucket copies of the gradients
        return states


class DeepSpeedBackend(AccelerateBackend):
    """DeepSpeed ZeRO-2 or ZeRO-3 (distributed.deepspeed_config), optionally offloading to CPU."""

    name = "deepspeed"

    @staticmethod
    def accelerator_options(recipe, world):
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        options = {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe, world))}
        if _several_cpu_processes(world):
            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return options

    @staticmethod
    def load(settings, load_whole):
        # A ZeRO-3 config, registered with transformers by accelerate, builds the model inside
        # deepspeed.zero.Init: each process holds only its slice of every weight from the start.
        return load_partitioned(settings, load_whole) if is_zero3() else load_whole(settings)

    def make_optimizer(self, param_groups):
        if _offloaded(_zero_optimization(self.recipe), "offload_optimizer"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **adamw_options(self.recipe))
        return super().make_optimizer(param_groups)

    def full_state_dict(self, objective):
        if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return self.accelerator.get_state_dict(objective)  # DeepSpeed's 16-bit gather
        return None

    @classmethod
    def plan_entry(cls, recipe):
        zero = _zero_optimization(recipe)
        stage = zero.get("stage", 0)
        if stage not in (2, 3):
            raise UserError(f"{recipe.distributed.deepspeed_config}: zero_optimization.stage {stage} cannot be "
                            "planned; use stage 2 or 3 (recipes/deepspeed/zero2.json, zero3.json)")
        return {"name": cls.name, "stage": stage, "offload_optimizer": _offloaded(zero, "offload_optimizer"),
                "offload_params": stage == 3 and _offloaded(zero, "offload_param")}

    @staticmethod
    def describe(entry):
        offload = [name for name, on in (("optimizer", entry["offload_optimizer"]),
                                         ("parameters", entry["offload_params"])) if on]
        return (f"DeepSpeed ZeRO-{entry['stage']}" + (f", {' and '.join(offload)} offloaded to CPU" if offload else "")
                + (", built in zero.Init" if entry["stage"] == 3 else ""))

    @classmethod
    def model_states(cls, recipe, shape, gpus, per_node):
        """DeepSpeed's own estimate for the stage and offload settings, split into the rows the way it counts."""
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        entry = cls.plan_entry(recipe)
        params, nodes = shape.parameters, gpus // per_node
        offload_optimizer, offload_params = entry["offload_optimizer"], entry["offload_params"]
        if entry["stage"] == 3:
            # zero_init: adapt builds a ZeRO-3 model inside deepspeed.zero.Init and streams the checkpoint in.
            cpu, total, gathered = estimate_zero3_model_states_mem_needs(
                params, shape.largest_layer, per_node, nodes, cpu_offload=offload_optimizer,
                cpu_offload_params=offload_params, zero_init=True)
            weights = gathered + (0 if offload_params else 2 * params / gpus)
            gradients = 4 * params / gpus  # DeepSpeed counts 18 bytes a parameter in all: 2 of them are the weights'
        else:
            cpu, total = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=offload_optimizer)
            # The whole 16-bit weights; partitions of the 16- and 32-bit gradients.
            weights, gradients = 2 * params, 6 * params / gpus
        gpu = {"weights": weights, "gradients": 0 if offload_optimizer else gradients,
               "optimizer": 0 if offload_optimizer else 12 * params / gpus}
        assert abs(sum(gpu.values()) - total) <= 2, "the rows must split DeepSpeed's own estimate"
        return {"gpu": gpu, "cpu": {"deepspeed": cpu}, "deepspeed_gpu_estimate": total}


class FSDP2Backend(Backend):
    """torch's `fully_shard` over a device mesh of all processes; state through torch.distributed.checkpoint."""

    name = "fsdp"
    supports_lora = False  # peft's adapters are not sharded here: open_backend refuses LoRA in one line

    @staticmethod
    def accelerator_options(recipe, world):
        # The MixedPrecisionPolicy does what autocast would; accelerate only carries the processes.
        return {"mixed_precision": "no", **({"cpu": True} if _several_cpu_processes(world) else {})}

    @staticmethod
    def load(settings, load_whole):
        # The weights wait on the meta device until `prepare` has sharded them, then fill the shards.
        return load_empty(settings, load_whole)

    @classmethod
    def model_states(cls, recipe, shape, gpus, per_node):
        """One process's states divided by the GPUs, plus the gathered layers; loaded once (partitioned.py)."""
        weight = recipe.model.dtype_bytes()
        gathered = shape.largest_block if recipe.distributed.fsdp_reshard_after_forward else shape.parameters
        compute = 2 if recipe.train.mixed_precision == "bf16" else weight
        gpu = {key: value / gpus for key, value in _adamw_states(recipe, shape).items()}
        gpu["weights"] += 2 * compute * gathered  # the layer being computed and the one prefetched
        # Each process reads the embedding and head for real (the mask row is their mean); rank 0 streams
        # the rest in pieces of PIECE_BYTES.
        embeddings = weight * shape.vocab * shape.hidden * (1 if shape.tied else 2)
        return {"gpu": gpu, "cpu": {"loading": per_node * embeddings + PIECE_BYTES}}

    def prepare(self, objective, param_groups, make_scheduler):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
        # Calling the inner model directly skips the root group's hooks that would gather its weights. And
        # before the root's first forward, FSDP2 would initialise lazily from the first module called
        # (a layer), taking it for the root: initialise from the root first (torch has no public call).
        objective._get_fsdp_state()._lazy_init()
        objective.unshard()
        try:
            yield
        finally:
            objective.reshard()


# The table of backends. adapt/backend_names.py lists the same names for the recipe, whose
# distributed.backend may name any of them but "single"; "auto" chooses among them (choose_backend).
BACKENDS = {backend.name: backend for backend in (SingleBackend, DDPBackend, DeepSpeedBackend, FSDP2Backend)}


def choose_backend(recipe: Recipe, world: int) -> type[Backend]:
    """The backend that runs `recipe` on `world` processes. "auto" is deepspeed when a deepspeed_config is
    set, else ddp for several processes, else single."""
    name = recipe.distributed.backend
    if name == "auto":
        name = "deepspeed" if recipe.distributed.deepspeed_config else ("ddp" if world > 1 else "single")
    return BACKENDS[name]


def open_backend(recipe: Recipe, output_dir: Path) -> Backend:
    """The Accelerator for the recipe's backend, wrapped in that backend's operations; a recipe the
    backend cannot run (LoRA where it does not train) is refused first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend_class = choose_backend(recipe, world)
    if recipe.lora.r > 0 and not backend_class.supports_lora:
        able = " or ".join(name for name in BACKEND_CHOICES if name in BACKENDS and BACKENDS[name].supports_lora)
        raise UserError(f"lora with distributed.backend: {backend_class.name} is not supported; use {able} for LoRA")
    accelerator = _make_accelerator(recipe, output_dir, backend_class.accelerator_options(recipe, world))
    if backend_class is DDPBackend and accelerator.num_processes == 1:
        backend_class = SingleBackend  # what one process runs: accelerate wraps it in nothing
    log(accelerator, f"backend {backend_class.name}, {accelerator.num_processes} process(es) on {accelerator.device}")
    if recipe.train.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        warn(accelerator, "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is emulated and far "
                          "slower than float32 (a SmolLM2-135M step 26x slower on a 2-core AVX2 machine); set "
                          "train.mixed_precision=no")
    return backend_class(accelerator, recipe)


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
    config = _read_deepspeed_config(recipe)
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


def _read_deepspeed_config(recipe: Recipe) -> dict:
    path = Path(recipe.distributed.deepspeed_config)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"distributed.deepspeed_config {path} is not valid JSON: {err}") from None


def _zero_optimization(recipe: Recipe) -> dict:
    """The zero_optimization section of the recipe's DeepSpeed JSON: the stage and what is offloaded."""
    return _read_deepspeed_config(recipe).get("zero_optimization", {})


def _offloaded(zero: dict, key: str) -> bool:
    """Whether zero_optimization's `key` (offload_optimizer, offload_param) puts those states in CPU RAM."""
    return zero.get(key, {}).get("device", "none") == "cpu"


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
