"""The end of a run: the trained model written as a diffusion checkpoint folder (LoRA merged)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..attention import set_attention
from ..export import save_checkpoint
from ..structure import unwrap_model
from .checkpoint import EXPORT_DIR
from .partitioned import no_zero3_init
from .state import Run


def export_model(run: Run, out_dir: Path | None = None) -> Path:
    """Write the model as it is at step `run.step` to `out_dir` (default output_dir/model). Sharded
    weights are gathered first (every process takes part in the gather); the main process writes."""
    recipe, accelerator = run.recipe, run.accelerator
    out_dir = out_dir or run.output_dir / EXPORT_DIR
    full_state = run.backend.full_state_dict(run.wrapped)
    if accelerator.is_main_process:
        model = run.inner_model
        if full_state is not None:
            model = _materialise(model, full_state, recipe)
        elif out_dir != run.output_dir / EXPORT_DIR:  # mid-run: merging LoRA and the settings below must not
            model = copy.deepcopy(model)  # change the model that goes on training
        if recipe.lora.r > 0:
            model = model.merge_and_unload()
        model = unwrap_model(model)
        # the step just trained: its attention ratio, and its mode (a "grow" schedule cut short, by
        # max_steps or an export mid-run, ends below its target block size)
        mode, ratio = run.layout_at(max(run.step - 1, 0))
        set_attention(model, ratio)
        model.config.use_cache = True
        diffusion = dataclasses.replace(run.diffusion, mode=mode, tokens_trained=run.tokens_trained,
                                        objective_state=run.objective.state_dict())
        card = {"base_model": diffusion.base_model}
        if run.validation:
            card["evaluation"] = {"validation ELBO perplexity": run.validation["val_elbo_ppl"]}
        save_checkpoint(model, run.tokenizer, out_dir, diffusion=diffusion, card=card, overwrite=True)
        print(f"adapt train: exported {out_dir}", flush=True)
    accelerator.wait_for_everyone()
    return out_dir


def _materialise(model: nn.Module, full_state: dict, recipe) -> nn.Module:
    """A plain CPU copy of a sharded model, filled from its gathered state dict."""
    from transformers import AutoModelForCausalLM

    base = unwrap_model(model)
    prefix = "model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full_state.items()}
    with no_zero3_init():
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
