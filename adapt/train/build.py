"""The pieces a run is built from, each from its recipe: the model and its mask token, LoRA, the
objective module, the optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

from torch import nn

from ..attention import get_attention_ratio
from ..diffusion import DiffusionConfig, diffusion_loss
from ..errors import UserError
from ..recipe import Recipe


class DiffusionObjective(nn.Module):
    """The causal LM under the diffusion loss, as one module: DDP/DeepSpeed/FSDP wrap this."""

    def __init__(self, model: nn.Module, config: DiffusionConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, input_ids, attention_mask=None, never_mask=None, t=None, mask=None, denominator=None,
                block_size=None, generator=None):
        return diffusion_loss(self.model, input_ids, self.config, attention_mask=attention_mask,
                              never_mask=never_mask, t=t, mask=mask, denominator=denominator, block_size=block_size,
                              generator=generator)


def load_model(recipe: Recipe):
    """The model with its mask token, and the DiffusionConfig this run trains under.

    A source that is already a diffusion checkpoint keeps its mask token, and its annealing goes on
    from the attention ratio it reached: continuing an adapted model (more pretraining, SFT) never
    restarts it near causal attention.
    """
    from ..limits import max_positions
    from ..modeling import ensure_mask_token, load_model as load_pretrained
    from .partitioned import is_zero3, load_partitioned

    settings = recipe.model

    def load_whole(settings):
        return load_pretrained(settings.path, dtype=settings.dtype, attn_implementation=settings.attn_implementation,
                               trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle)

    # Under ZeRO-3 each process holds only its slice of every weight from the start (partitioned.py).
    model, tokenizer = load_partitioned(settings, load_whole) if is_zero3() else load_whole(settings)
    limit = max_positions(model.config)
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
    diffusion.anneal_from = get_attention_ratio(model)
    if recipe.diffusion.block_size is not None:
        diffusion.block_size = recipe.diffusion.block_size
    diffusion.block_schedule = recipe.diffusion.block_schedule
    diffusion.eps = recipe.train.eps
    diffusion.loss_norm = recipe.train.loss_norm
    diffusion.base_model = diffusion.base_model or settings.path
    return model, tokenizer, diffusion


def apply_lora(model, recipe: Recipe, diffusion: DiffusionConfig):
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


def param_groups(objective: nn.Module) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter, at the recipe's rates."""
    return [{"params": [p for p in objective.parameters() if p.requires_grad]}]


def make_scheduler(optimizer, recipe: Recipe):
    from transformers import get_scheduler

    name = "cosine" if recipe.optim.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.optim.warmup_steps,
                         num_training_steps=recipe.train.max_steps)
