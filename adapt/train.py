"""The training loop: continued pretraining under the diffusion objective, on accelerate.

One loop for every scale. accelerate carries single-process, DDP and DeepSpeed ZeRO-2/3; FSDP2 is
torch's own `fully_shard` (accelerate's FSDP plugin is silently ignored on CPU, so we shard ourselves and
it shards everywhere). The objective is a small module whose forward is `diffusion_loss`, so every
wrapper sees an ordinary forward/backward.

Reproducibility: the noise levels, the corruption and the annealed attention mask of a micro-batch are
drawn from a generator seeded by (seed, global micro-batch index). They depend on the data, not on how
the batch is split over processes or accumulation steps, and nothing about them needs saving to resume.

Layout of output_dir:
    checkpoints/step-000100/   accelerate state (model, optimizer, scheduler, RNG) + data position +
                               trainer_state.json (written last); built under a .tmp- name, then renamed
    logs/                      TensorBoard event files
    metrics.jsonl              one line per logged step / validation
    model/                     the exported diffusion checkpoint (LoRA merged)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import write_text_atomically
from .attention import set_attention, unwrap_model
from .diffusion import DiffusionConfig, diffusion_loss, elbo_nll
from .errors import UserError
from .recipe import Recipe

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
EXPORT_DIR = "model"
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, as shells report them


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; `exit_code` tells which signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at {checkpoint}; continue with resume=auto")
        self.exit_code = EXIT_CODES[signum]
        self.checkpoint = checkpoint


EXIT_NONFINITE = 3  # stopped on non-finite numbers (bad input is 2; signals 130 and 143)


class NumericalFault(Interrupted):
    """Training stopped because losses, gradients or weights were no longer finite numbers."""

    def __init__(self, message: str, checkpoint: Path | None):
        Exception.__init__(self, message)
        self.exit_code = EXIT_NONFINITE
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    model_dir: Path  # the exported diffusion checkpoint
    steps: int
    tokens_trained: int
    first_loss: float | None  # loss of the first step this process ran (None when resumed at the end)
    last_loss: float | None
    validation: dict | None  # the last validation figures


class DiffusionObjective(nn.Module):
    """The causal LM under the diffusion loss, as one module: DDP/DeepSpeed/FSDP wrap this."""

    def __init__(self, model: nn.Module, config: DiffusionConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, input_ids, attention_mask=None, never_mask=None, generator=None):
        return diffusion_loss(self.model, input_ids, self.config, attention_mask=attention_mask,
                              never_mask=never_mask, generator=generator)


def train(recipe: Recipe, *, overwrite: bool = False) -> TrainResult:
    """Run a recipe to the end (or to a signal) and export the result to output_dir/model.

    A fresh run (resume: null) refuses an output_dir that holds a previous run unless `overwrite`, which
    deletes that run's checkpoints, logs, metrics and model first.
    """
    output_dir = Path(recipe.output_dir)
    accelerator, backend = _make_accelerator(recipe, output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if recipe.resume is None:
        _clear_previous_run(output_dir, overwrite, accelerator)
    resume_from = _resume_checkpoint(recipe, output_dir)

    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    with _no_deepspeed_init():
        # Loaded whole on every process and partitioned by deepspeed.initialize: the mask token's new row
        # is set from the other rows, which zero.Init's partitioned weights would hide (NaN rows).
        model, tokenizer, diffusion = _load_model(recipe)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.r > 0:
        model = _apply_lora(model, recipe, diffusion)
    model_shapes = _model_shapes(model)
    objective = DiffusionObjective(model, diffusion)
    optimizer = _make_optimizer(objective, recipe, backend)
    scheduler = _make_scheduler(optimizer, recipe)

    if backend == "fsdp":
        _fully_shard(objective, recipe, accelerator)
        optimizer = _make_optimizer(objective, recipe, backend)  # over the sharded parameters
        scheduler = _make_scheduler(optimizer, recipe)
    else:
        objective, optimizer = accelerator.prepare(objective, optimizer)
        accelerator.register_for_checkpointing(scheduler)
    inner = objective.model if backend == "fsdp" else _inner_model(accelerator, objective)
    fsdp_root = objective if backend == "fsdp" else None

    from .data import open_dataset

    train_blocks = open_dataset(recipe.data, tokenizer, split="train")
    validation_blocks = open_dataset(recipe.data, tokenizer, split="validation") if recipe.train.eval_batches else None

    step = 0
    if resume_from is not None:
        _check_same_model(resume_from, model_shapes)
        step = _load_checkpoint(resume_from, accelerator, backend, objective, optimizer, scheduler, train_blocks)
        state = json.loads((resume_from / STATE_FILE).read_text())
        diffusion.tokens_trained = state["tokens_trained"]
        _log(accelerator, f"resumed from {resume_from} at step {step}")

    metrics_file = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _forget_metrics_after(metrics_file, step)
    trackers = _start_trackers(accelerator, recipe, output_dir)
    stop = _SignalFlag()
    first_loss = last_loss = validation = None
    nonfinite_in_a_row = 0
    progress = _progress_bar(accelerator, recipe, step)
    micro_batches = train_blocks.batches(recipe.train.batch_size, rank=rank, world_size=world)
    accum = recipe.train.grad_accum
    objective.train()

    try:
        while step < recipe.train.max_steps:
            started = time.perf_counter()
            ratio = diffusion.anneal_ratio(step)
            totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, ce, tokens, stop
            finite = True
            for micro in range(accum):
                batch = {k: v.to(accelerator.device) for k, v in next(micro_batches).items()}
                generator = _micro_batch_generator(recipe.train.seed, (step * accum + micro) * world + rank, accelerator.device)
                set_attention(inner, ratio, generator=generator)
                with accelerator.accumulate(objective), accelerator.autocast():
                    out = objective(**batch, generator=generator)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        grad_norm = _clip_gradients(accelerator, objective, backend, recipe.train.max_grad_norm)
                        # fp16's loss scaler skips overflowing steps and lowers its scale itself: there only
                        # a non-finite loss counts, and its step goes to the scaler (which will skip it).
                        scaled = accelerator.scaler is not None
                        finite = _step_is_finite(totals[0] + out.loss.detach(), None if scaled else grad_norm)
                    if finite or accelerator.scaler is not None:  # else skip: NaN/inf would poison the weights
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                totals += torch.tensor([out.loss.item(), out.unweighted.item(), out.num_tokens, 0.0],
                                       dtype=torch.float64, device=accelerator.device)
            scheduler.step()
            step += 1
            totals[3] = float(stop.signum is not None)
            totals = _all_reduce_sum(totals)
            tokens = int(totals[2])
            diffusion.tokens_trained += tokens
            seconds = time.perf_counter() - started
            record = {
                "step": step,
                "loss": totals[0].item() / (accum * world),
                "masked_ce": totals[1].item() / (accum * world),
                "ratio": ratio,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens / seconds,
                "tokens_trained": diffusion.tokens_trained,
            }
            nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
            if not finite:
                record["skipped"] = True
                _warn(accelerator, f"step {step}: non-finite loss or gradient (loss {record['loss']}, grad norm "
                                   f"{record['grad_norm']}); optimizer step skipped ({nonfinite_in_a_row} in a row, "
                                   f"the run stops at train.max_nonfinite_steps = {recipe.train.max_nonfinite_steps})")
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
                _report(accelerator, record, metrics_file, trackers, progress)
            if progress is not None:
                progress.update(1)

            evaluate_now = recipe.train.eval_every and step % recipe.train.eval_every == 0
            if validation_blocks is not None and (evaluate_now or step == recipe.train.max_steps):
                validation = _validate(accelerator, inner, validation_blocks, diffusion, recipe, ratio, fsdp_root)
                validation["step"] = step
                _report(accelerator, validation, metrics_file, trackers, progress)
                objective.train()

            signum = _signal_agreed(stop, totals[3])
            every = recipe.checkpoint.every
            fault = nonfinite_in_a_row >= recipe.train.max_nonfinite_steps
            if fault or signum is not None or (every and step % every == 0) or step == recipe.train.max_steps:
                checkpoint = _save_checkpoint(output_dir, step, accelerator, backend, objective, optimizer, scheduler,
                                              train_blocks, diffusion, recipe, model_shapes)
                if fault:
                    raise NumericalFault(
                        f"stopped at step {step} after {nonfinite_in_a_row} steps in a row with a non-finite loss or "
                        f"gradient (all skipped); {checkpoint} holds the last finite weights; lower optim.lr or check "
                        "the data, then continue with --resume", checkpoint)
                if signum is not None:
                    raise Interrupted(signum, checkpoint)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if trackers:
            accelerator.end_training()

    model_dir = export(accelerator, backend, objective, tokenizer, diffusion, output_dir / EXPORT_DIR, recipe, validation)
    accelerator.wait_for_everyone()
    return TrainResult(model_dir, step, diffusion.tokens_trained, first_loss, last_loss, validation)


# --------------------------------------------------------------------------------------------------
# Setup


def _make_accelerator(recipe: Recipe, output_dir: Path):
    """The Accelerator for the recipe's backend, and the backend actually used."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = recipe.distributed.backend
    if backend == "auto":
        backend = "deepspeed" if recipe.distributed.deepspeed_config else ("ddp" if world > 1 else "single")
    kwargs = {}
    if world > 1 and not torch.cuda.is_available():
        # On CPU accelerate runs one process per launch unless told `cpu=True` (then it uses DDP over gloo);
        # DeepSpeed instead needs the gloo group passed in, or its world and accelerate's disagree.
        if backend == "deepspeed":
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    if backend == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe, world))
    log_with = ["tensorboard"] if recipe.logging.tensorboard else []
    if recipe.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("logging.wandb is true but wandb is not installed; pip install wandb "
                            "(and set WANDB_API_KEY), or set logging.wandb: false")
        log_with.append("wandb")
    # accelerate keeps its settings in process-wide singletons; a second run in the same process (tests,
    # notebooks) with other settings would be refused. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision if backend != "fsdp" else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=recipe.train.grad_accum, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        **kwargs,
    )
    if backend == "ddp" and accelerator.num_processes == 1:
        backend = "single"
    _log(accelerator, f"backend {backend}, {accelerator.num_processes} process(es) on {accelerator.device}")
    if recipe.train.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        _warn(accelerator, "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is emulated and far "
                           "slower than float32 (a SmolLM2-135M step 26x slower on a 2-core AVX2 machine); set "
                           "train.mixed_precision=no")
    return accelerator, backend


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


def _load_model(recipe: Recipe):
    """The model with its mask token, and the DiffusionConfig this run trains under."""
    from .modeling import ensure_mask_token, load_model

    settings = recipe.model
    model, tokenizer = load_model(settings.path, dtype=settings.dtype, attn_implementation=settings.attn_implementation,
                                  trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle)
    limit = _max_positions(model.config)
    if limit is not None and recipe.data.seq_len > limit:
        raise UserError(f"data.seq_len = {recipe.data.seq_len} exceeds the model's maximum positions ({limit}); "
                        f"set data.seq_len <= {limit}")
    existing = DiffusionConfig.from_model_config(model.config)
    if existing is None or existing.mask_token_id is None:
        token_id = settings.mask_token_id if settings.mask_token == "reuse" else None
        try:
            ensure_mask_token(model, tokenizer, settings.mask_token, token_id)
        except ValueError as err:
            raise UserError(f"model.mask_token_id: {err}") from None
    diffusion = DiffusionConfig.from_model_config(model.config)
    diffusion.anneal_steps = recipe.train.anneal_steps
    diffusion.eps = recipe.train.eps
    diffusion.loss_norm = recipe.train.loss_norm
    diffusion.base_model = diffusion.base_model or settings.path
    return model, tokenizer, diffusion


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _apply_lora(model, recipe: Recipe, diffusion: DiffusionConfig):
    """peft LoRA; with an added mask token its embedding row (and an untied head's row) trains too."""
    from peft import LoraConfig, get_peft_model

    if recipe.distributed.backend == "fsdp":
        raise UserError("lora with distributed.backend: fsdp is not supported; use deepspeed (ZeRO-2/3) or ddp for LoRA")
    settings = recipe.lora
    trainable_tokens = None
    if diffusion.mask_token_strategy == "add":
        names = {model.get_input_embeddings(): [diffusion.mask_token_id]}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            names[head] = [diffusion.mask_token_id]
        by_module = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
        trainable_tokens = {by_module[module]: ids for module, ids in names.items()}
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or "all-linear",
        trainable_token_indices=trainable_tokens,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _make_optimizer(objective: nn.Module, recipe: Recipe, backend: str):
    """AdamW over the trainable parameters (DeepSpeed's CPU Adam when the DS config offloads it)."""
    optim = recipe.optim
    params = [p for p in objective.parameters() if p.requires_grad]
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.adam_eps, weight_decay=optim.weight_decay)
    if backend == "deepspeed" and _offloads_optimizer(recipe):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _offloads_optimizer(recipe: Recipe) -> bool:
    config = json.loads(Path(recipe.distributed.deepspeed_config).read_text())
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") == "cpu"


def _make_scheduler(optimizer, recipe: Recipe):
    from transformers import get_scheduler

    name = "cosine" if recipe.optim.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.optim.warmup_steps,
                         num_training_steps=recipe.train.max_steps)


def _fully_shard(objective: DiffusionObjective, recipe: Recipe, accelerator) -> None:
    """FSDP2: shard every decoder layer, then the rest (embeddings, norm, head) as the root group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if accelerator.num_processes < 2:
        raise UserError("distributed.backend: fsdp needs several processes; launch with torchrun --nproc_per_node N")
    device_type = accelerator.device.type
    mesh = init_device_mesh(device_type, (accelerator.num_processes,))
    policy = MixedPrecisionPolicy()
    if recipe.train.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    objective.to(accelerator.device)
    options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=recipe.distributed.fsdp_reshard_after_forward)
    for layer in _decoder_layers(objective.model):
        fully_shard(layer, **options)
    fully_shard(objective, **options)
    _log(accelerator, f"FSDP2: sharded {len(_decoder_layers(objective.model))} layers over {accelerator.num_processes} "
                      f"{device_type} processes")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the largest ModuleList in the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"{type(model).__name__} has no layer list to shard; use deepspeed or ddp")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def _inner_model(accelerator, objective) -> nn.Module:
    """The (peft-wrapped) causal LM inside the prepared objective."""
    return accelerator.unwrap_model(objective).model


def _micro_batch_generator(seed: int, index: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def _clip_gradients(accelerator, objective, backend: str, max_norm: float):
    """Clip to `max_norm` (0: only measure) and return the global gradient norm before clipping.

    Under DeepSpeed the engine has already clipped (gradient_clipping) and stepped inside `backward`;
    accelerate then returns the norm the engine measured."""
    limit = max_norm if max_norm > 0 else float("inf")
    if backend == "fsdp":
        params = [p for p in objective.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return accelerator.clip_grad_norm_(objective.parameters(), limit)


def _step_is_finite(local_loss: torch.Tensor, grad_norm) -> bool:
    """Whether this step's loss on every process and its global gradient norm are finite numbers."""
    bad = _all_reduce_sum((~torch.isfinite(local_loss)).double().reshape(1))
    return bad.item() == 0 and (grad_norm is None or math.isfinite(float(grad_norm)))


def _nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters (this process's shards of them) holding a NaN or an infinity."""
    bad = []
    for name, param in module.named_parameters():
        local = param.detach()
        local = local.to_local() if hasattr(local, "to_local") else local  # an FSDP2 DTensor shard
        if not torch.isfinite(local).all():
            bad.append(name)
    return bad


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


# --------------------------------------------------------------------------------------------------
# Validation and logging


@torch.no_grad()
def _validate(accelerator, inner: nn.Module, blocks, diffusion: DiffusionConfig, recipe: Recipe, ratio: float,
              fsdp_root=None) -> dict:
    """Held-out negative ELBO per token at the current attention ratio, summed over all processes.

    The validation split gives every process the same number of batches (ZeRO-3 and FSDP need all ranks
    in every forward); a fixed generator makes successive validations comparable.
    """
    was_training = inner.training
    inner.eval()
    batches = list(itertools.islice(
        blocks.batches(recipe.train.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes),
        recipe.train.eval_batches))
    generator = _micro_batch_generator(recipe.train.seed + 1, accelerator.process_index, accelerator.device)
    set_attention(inner, ratio, generator=generator)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with _unsharded(fsdp_root):
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                elbo = elbo_nll(inner, batch["input_ids"], diffusion, n_samples=recipe.train.eval_samples,
                                target_mask=~batch["never_mask"], attention_mask=batch["attention_mask"],
                                generator=generator)
            totals += torch.stack([elbo.nll.sum(), elbo.num_tokens.sum().double()])
    totals = _all_reduce_sum(totals)
    inner.train(was_training)
    per_token = (totals[0] / totals[1].clamp(min=1)).item()
    return {"val_elbo_nll": per_token, "val_elbo_ppl": math.exp(min(per_token, 50.0)), "val_tokens": int(totals[1])}


@contextlib.contextmanager
def _unsharded(fsdp_root):
    """Gather the FSDP2 root group (embeddings, norm, head), which calling the inner model directly skips."""
    if fsdp_root is None:
        yield
        return
    fsdp_root.unshard()
    try:
        yield
    finally:
        fsdp_root.reshard()


def _start_trackers(accelerator, recipe: Recipe, output_dir: Path) -> bool:
    if not (recipe.logging.tensorboard or recipe.logging.wandb):
        return False
    flat = {}
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(values, (int, float, str, bool)):
            flat[section] = values
    run_name = output_dir.name or "adapt"
    init_kwargs = {"wandb": {"name": run_name}} if recipe.logging.wandb else {}
    accelerator.init_trackers(recipe.logging.project if recipe.logging.wandb else run_name, config=flat,
                              init_kwargs=init_kwargs)
    return True


def _progress_bar(accelerator, recipe: Recipe, step: int):
    if not (recipe.logging.progress_bar and accelerator.is_main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=recipe.train.max_steps, initial=step, desc="adapt train", unit="step", dynamic_ncols=True)


def _forget_metrics_after(metrics_file: Path, step: int) -> None:
    """Drop the records of steps after `step`: a run killed between checkpoints logged steps that the
    resumed run repeats, and each step must appear once in metrics.jsonl. A line cut off by the kill
    goes too."""
    if not metrics_file.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) < len(lines):
        write_text_atomically(metrics_file, "".join(kept))


def _report(accelerator, record: dict, metrics_file: Path, trackers: bool, progress) -> None:
    if not accelerator.is_main_process:
        return
    with metrics_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    line = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items())
    if progress is not None:
        progress.write(line)
    else:
        print(line, flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(f"adapt train: {message}", flush=True)


def _warn(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(f"adapt train: warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Signals


class _SignalFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits. A second
    signal of the same kind gets the default behaviour (kill), for when saving hangs."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _signal_agreed(stop: _SignalFlag, any_rank_flag: torch.Tensor):
    """A signal seen by any process stops all of them at the same step."""
    if stop.signum is not None:
        return stop.signum
    return signal.SIGTERM if float(any_rank_flag) > 0 else None


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _resume_checkpoint(recipe: Recipe, output_dir: Path) -> Path | None:
    existing = complete_checkpoints(output_dir)
    if recipe.resume is None:
        if existing:
            raise UserError(f"{output_dir} already has checkpoints ({existing[-1].name}); continue with --resume "
                            "(resume=auto), or choose another output_dir")
        return None
    if recipe.resume == "auto":
        return existing[-1] if existing else None
    path = Path(recipe.resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                        f"pass a folder under {output_dir / CHECKPOINTS} or resume=auto")
    return path


RUN_ARTEFACTS = (CHECKPOINTS, EXPORT_DIR, "logs", "metrics.jsonl")


def _clear_previous_run(output_dir: Path, overwrite: bool, accelerator) -> None:
    """Refuse to start a fresh run over a previous one unless `overwrite`, which deletes that run."""
    previous = [output_dir / name for name in RUN_ARTEFACTS if (output_dir / name).exists()]
    if not previous:
        return
    if not overwrite:
        raise UserError(f"{output_dir} already has checkpoints or other outputs of a run ({', '.join(p.name for p in previous)}); "
                        "continue it with --resume, replace it with --overwrite, or choose another output_dir")
    if accelerator.is_main_process:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def _model_shapes(model: nn.Module) -> dict:
    """A fingerprint of the model's parameters (names and shapes), recorded in every checkpoint."""
    import hashlib

    listing = "\n".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _check_same_model(checkpoint: Path, shapes: dict) -> None:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved = state.get("model_shapes")
    if saved is not None and saved != shapes:
        raise UserError(f"{checkpoint} was written for a different model ({saved['parameters']:,} parameters, "
                        f"model.path {state['recipe']['model']['path']}) than this run's ({shapes['parameters']:,}); "
                        "resume with the model it was trained from, or start a fresh output_dir")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its .tmp- name)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(output_dir, step, accelerator, backend, objective, optimizer, scheduler, blocks, diffusion, recipe,
                     model_shapes=None) -> Path:
    bad = _nonfinite_parameters(objective)
    if _all_reduce_sum(torch.tensor([float(len(bad))], device=accelerator.device)).item() > 0:
        previous = complete_checkpoints(output_dir)
        raise NumericalFault(f"weights became non-finite by step {step} ({', '.join(bad[:3]) or 'on another process'}); "
                             "no checkpoint written; lower optim.lr and continue from the last complete checkpoint "
                             f"({previous[-1] if previous else 'none yet'}) with --resume", None)
    final = Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"
    temp = final.with_name(".tmp-" + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if backend == "fsdp":
        _save_fsdp_state(temp, accelerator, objective, optimizer, scheduler)
    else:
        accelerator.save_state(str(temp))
    (temp / f"data_rank{accelerator.process_index}.json").write_text(json.dumps(blocks.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "tokens_trained": diffusion.tokens_trained, "world_size": accelerator.num_processes,
                 "diffusion": diffusion.to_dict(), "recipe": recipe.to_dict(), "model_shapes": model_shapes}
        (temp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
        for old in complete_checkpoints(output_dir)[: -recipe.checkpoint.keep]:
            shutil.rmtree(old)
        print(f"adapt train: checkpoint {final}", flush=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(path: Path, accelerator, backend, objective, optimizer, scheduler, blocks) -> int:
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != accelerator.num_processes:
        raise UserError(f"{path} was written by {state['world_size']} processes but this run has "
                        f"{accelerator.num_processes}; resume with the same process count")
    if backend == "fsdp":
        _load_fsdp_state(path, accelerator, objective, optimizer, scheduler)
    else:
        accelerator.load_state(str(path))
    blocks.load_state_dict(json.loads((path / f"data_rank{accelerator.process_index}.json").read_text()))
    return int(state["step"])


def _save_fsdp_state(folder: Path, accelerator, objective, optimizer, scheduler) -> None:
    """Sharded model + optimizer through torch.distributed.checkpoint; scheduler and RNG per process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(objective, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder / "fsdp"))
    torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state()},
               folder / f"process_{accelerator.process_index}.pt")


def _load_fsdp_state(folder: Path, accelerator, objective, optimizer, scheduler) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(objective, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder / "fsdp"))
    set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    saved = torch.load(folder / f"process_{accelerator.process_index}.pt", weights_only=False)
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])


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


# --------------------------------------------------------------------------------------------------
# Export


def export(accelerator, backend, objective, tokenizer, diffusion: DiffusionConfig, out_dir: Path, recipe: Recipe,
           validation: dict | None = None) -> Path:
    """Write the trained model as a diffusion checkpoint folder (LoRA merged into full weights).

    Sharded weights are gathered first: DeepSpeed ZeRO-3 through its 16-bit gather, FSDP2 as a full
    state dict; every process takes part, the main process writes.
    """
    full_state = None
    if backend == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif backend == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        full_state = accelerator.get_state_dict(objective)
    if accelerator.is_main_process:
        model = _inner_model(accelerator, objective) if backend != "fsdp" else objective.model
        if full_state is not None:
            model = _materialise(model, full_state, recipe)
        if recipe.lora.r > 0:
            model = model.merge_and_unload()
        model = unwrap_model(model)
        set_attention(model, diffusion.anneal_ratio(max(recipe.train.max_steps - 1, 0)))
        model.config.use_cache = True
        _save(model, tokenizer, diffusion, out_dir, recipe, validation)
        print(f"adapt train: exported {out_dir}", flush=True)
    accelerator.wait_for_everyone()
    return out_dir


def _materialise(model: nn.Module, full_state: dict, recipe: Recipe) -> nn.Module:
    """A plain CPU copy of a sharded model, filled from its gathered state dict."""
    from transformers import AutoModelForCausalLM

    base = unwrap_model(model)
    prefix = "model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full_state.items()}
    with _no_deepspeed_init():
        fresh = AutoModelForCausalLM.from_config(base.config, dtype=getattr(torch, recipe.model.dtype))
    if recipe.lora.r > 0:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, model.peft_config["default"])
    fresh.load_state_dict(state, strict=False)
    missing = set(fresh.state_dict()) - set(state)
    tied = {n for n in missing if "lm_head" in n or "embed_out" in n}
    if missing - tied:
        raise RuntimeError(f"gathered state dict lacks {sorted(missing - tied)[:5]}")
    fresh.tie_weights()
    return fresh


@contextlib.contextmanager
def _no_deepspeed_init():
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


def _save(model, tokenizer, diffusion: DiffusionConfig, out_dir: Path, recipe: Recipe, validation: dict | None) -> None:
    from .export import save_checkpoint

    card = {"base_model": diffusion.base_model}
    if validation:
        card["evaluation"] = {"validation ELBO perplexity": validation["val_elbo_ppl"]}
    save_checkpoint(model, tokenizer, out_dir, diffusion=diffusion, card=card, overwrite=True)
