"""The pieces a run is built from, each from its recipe: the model and its mask token, LoRA, the
objective module, the optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from ..diffusion import DiffusionConfig, DiffusionTraining, diffusion_loss
from ..errors import UserError, quoted
from ..objectives import Objective
from ..recipe import OptimSection, Recipe


class ModelWithLoss(nn.Module):
    """The causal LM under the diffusion loss, as one module: DDP/DeepSpeed/FSDP wrap this."""

    def __init__(self, model: nn.Module, config: DiffusionConfig, settings: DiffusionTraining, objective: Objective):
        super().__init__()
        self.model = model
        self.config, self.settings, self.objective = config, settings, objective

    def forward(self, input_ids, attention_mask=None, never_mask=None, t=None, mask=None, denominator=None,
                ar_denominator=None, teacher=None, mode=None, generator=None):
        """The loss of a micro-batch under its noise (`t`, `mask`), laid out as `mode` (a step of a growing
        schedule; None: the model's own mode)."""
        config = self.config if mode is None else dataclasses.replace(self.config, mode=mode)
        return diffusion_loss(self.model, input_ids, config, self.settings, objective=self.objective,
                              attention_mask=attention_mask, never_mask=never_mask, t=t, mask=mask,
                              denominator=denominator, ar_denominator=ar_denominator, teacher=teacher,
                              generator=generator)


def load_model(recipe: Recipe, backend):
    """The model with its mask token, and the DiffusionConfig this run trains under.

    A source that is already a diffusion checkpoint keeps its mask token (and, with `diffusion.mode:
    null`, its mode); the run's annealing goes on from the attention ratio it reached (the loop reads it
    from the model), so continuing an adapted model (more pretraining, SFT) never restarts it near
    causal attention.
    """
    from ..limits import max_positions
    from ..modeling import ensure_mask_token, load_model as load_pretrained

    settings = recipe.model

    def load_whole(settings):
        return load_pretrained(settings.path, dtype=settings.dtype, attn_implementation=settings.attn_implementation,
                               trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle)

    # Each process holds the weights as `backend` (the run's Backend, or its class) wants them: a whole
    # copy, ZeRO-3's slices, or FSDP2's meta device until the backend has sharded them (partitioned.py).
    model, tokenizer = backend.load(settings, load_whole)
    limit = max_positions(model.config)
    if limit is not None and recipe.data.seq_len > limit:
        raise UserError(f"data.seq_len = {recipe.data.seq_len} exceeds the model's maximum positions ({limit}); "
                        f"set data.seq_len <= {limit}")
    source = DiffusionConfig.from_model_config(model.config)  # None: an AR model
    if source is None or source.mask_token_id is None:
        token_id = settings.mask_token_id if settings.mask_token == "reuse" else None
        try:
            ensure_mask_token(model, tokenizer, settings.mask_token, token_id)
        except ValueError as err:
            raise UserError(f"model.mask_token_id: {err}") from None
    return model, tokenizer, run_config(recipe, source, DiffusionConfig.from_model_config(model.config))


def run_config(recipe: Recipe, source: DiffusionConfig | None, masked: DiffusionConfig) -> DiffusionConfig:
    """What the run makes of a source (`source`: its diffusion settings, None for an AR model) that has
    its mask token (`masked`): the recipe's mode and objective, the objective's state kept only if the
    source was trained under the same objective, and the recipe's diffusion section as the record."""
    training = recipe.diffusion
    same_objective = source is not None and source.objective == training.objective
    return dataclasses.replace(masked, mode=training.mode_for(source), objective=training.objective,
                               objective_state=masked.objective_state if same_objective else {},
                               base_model=masked.base_model or recipe.model.path,
                               trained_with=dataclasses.asdict(training))


def apply_lora(model, recipe: Recipe, diffusion: DiffusionConfig):
    """peft LoRA; with an added mask token its embedding row (and an untied head's row) trains too."""
    from peft import LoraConfig, get_peft_model

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
    _check_lora_targets(model, settings.target_modules)
    return get_peft_model(model, config)


def _check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Each of lora.target_modules must name modules of the model (matched as peft matches them): peft
    skips a name that matches nothing as long as another one matches, and fails obscurely when none does."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    names = [name for name, _ in model.named_modules()]
    for index, target in enumerate(targets):
        config = LoraConfig(target_modules=[target])
        if not any(check_target_module_exists(config, name) for name in names):
            layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, (nn.Linear, Conv1D))})
            raise UserError(f"lora.target_modules[{index}] = {quoted(target)} names no module of the model; "
                            f"choose among its linear layers: {', '.join(layers)}")


def param_groups(objective: nn.Module, optim: OptimSection) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter once, at optim.lr times the multiplier
    of its kind (`parameter_kinds`). The scheduler scales each group's rate by the same schedule.

    Equal multipliers make one group, as before there were multipliers (so older checkpoints resume),
    and need no classification. Weight decay is the optimizer's, the same for every group.
    """
    multipliers = dataclasses.asdict(optim.lr_multipliers)
    trainable = {name: p for name, p in objective.named_parameters() if p.requires_grad}
    if len(set(multipliers.values())) == 1:
        return [{"params": list(trainable.values()), "lr": optim.lr * multipliers["mlp"], "kind": "all"}]
    kinds = parameter_kinds(objective)
    groups = []
    for kind, multiplier in multipliers.items():
        params = [p for name, p in trainable.items() if kinds[name] == kind]
        if params:
            groups.append({"params": params, "lr": optim.lr * multiplier, "kind": kind})
    return groups


def parameter_kinds(objective: nn.Module) -> dict[str, str]:
    """The kind of every parameter, by name: embeddings, attention, mlp, norms or head.

    Decided by the model's structure, not by names, so it holds for every family and under LoRA: a
    parameter belongs to its innermost module that has a role. Roles: the input embeddings (and any
    nn.Embedding, such as GPT-2's positions) are embeddings; the output embeddings are the head; every
    normalisation layer (a leaf whose only parameters are a 1-D weight and bias) is a norm, wherever it
    sits (Qwen3's q_norm/k_norm included); of the other children of a decoder layer, the one whose forward
    takes an attention mask is attention, the rest are the MLP. A LoRA adapter's lora_A/lora_B sit under
    the projection they adapt, and peft's trainable token rows under the embeddings or head they patch.
    A head tied to the embeddings is one tensor, listed once under the embeddings' name: embeddings.
    """
    from ..structure import decoder_layers

    model = objective.model if isinstance(objective, ModelWithLoss) else objective
    roles = {}
    for layer in decoder_layers(model):
        for child in layer.children():
            roles[child] = "attention" if "attention_mask" in inspect.signature(child.forward).parameters else "mlp"
    for module in model.modules():
        if _is_norm(module):
            roles[module] = "norms"
        elif isinstance(module, nn.Embedding):
            roles[module] = "embeddings"
    if model.get_output_embeddings() is not None:
        roles[model.get_output_embeddings()] = "head"
    roles[model.get_input_embeddings()] = "embeddings"
    modules = dict(objective.named_modules())
    return {name: _innermost_role(name, modules, roles) for name, _ in objective.named_parameters()}


def _innermost_role(name: str, modules: dict, roles: dict) -> str:
    owners = name.split(".")[:-1]  # the modules the parameter sits in, outermost first
    for end in range(len(owners), -1, -1):
        role = roles.get(modules[".".join(owners[:end])])
        if role is not None:
            return role
    raise UserError(f"optim.lr_multipliers: cannot tell whether {name} is embeddings, attention, mlp, norms or "
                    "head in this model; give every kind the same multiplier")


def _is_norm(module: nn.Module) -> bool:
    """A LayerNorm/RMSNorm by its shape: a leaf with a 1-D `weight` (and `bias`) and nothing else."""
    own = dict(module.named_parameters(recurse=False))
    if not own or set(own) - {"weight", "bias"} or next(module.children(), None) is not None:
        return False
    # Under ZeRO-3 every parameter is a flat slice; `ds_shape` is its real shape.
    return all(len(getattr(p, "ds_shape", p.shape)) == 1 for p in own.values())


def make_scheduler(optimizer, recipe: Recipe):
    """transformers' schedule as a LambdaLR: every group's rate is its own initial rate times one factor."""
    from transformers import get_scheduler

    name = "cosine" if recipe.optim.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.optim.warmup_steps,
                         num_training_steps=recipe.train.max_steps)


def scheduled_lr(scheduler, recipe: Recipe) -> float:
    """optim.lr times the schedule's factor at the scheduler's current step: the rate the log shows,
    before any group's multiplier."""
    return recipe.optim.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
