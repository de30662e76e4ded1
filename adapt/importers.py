"""Import the published DiffuGPT and DiffuLLaMA checkpoints (HKUNLP/DiffuLLaMA) into this format.

Both are masked diffusion LMs adapted from AR models with the shift kept and full bidirectional
attention; they differ in how the weights are laid out:

* DiffuGPT: the training wrapper's state dict over a GPT-2 config. Its wrapper held the token embedding
  as `embed_tokens`, the GPT-2 body without its `wte` as `denoise_model` and the head as `lm_head`, so
  the keys are `embed_tokens.weight`, `denoise_model.h.0.attn.c_attn.weight`, ..., `lm_head.weight`.
  Its mask token is the reused GPT-2 id 10541.
* DiffuLLaMA: plain Llama weights (`model.layers...`, `lm_head.weight`), mask token the reused id 811.
  The wrapper layout (`denoise_model.*` over Llama) is accepted as well.

Neither checkpoint records its mask id, shift or attention in its config; the import writes them into
`config.diffusion` and sets attention to bidirectional (ratio 1), so the result loads with `adapt.load`
and with plain transformers (`trust_remote_code=True` for the sampler).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .attention import set_attention
from .diffusion import DiffusionConfig
from .errors import UserError, quoted
from .export import check_destination, save_checkpoint

# The mask ids the published checkpoints reused (DiffuLLaMA paper and code).
MASK_IDS = {"diffugpt": 10541, "diffullama": 811}
WRAPPER_PREFIXES = ("embed_tokens.", "denoise_model.", "lm_head.")
# Causal-mask buffers that old GPT-2 state dicts carry; transformers 5 builds masks itself.
STALE_BUFFERS = (".attn.bias", ".attn.masked_bias")


def import_checkpoint(
    src: str | os.PathLike,
    *,
    format: str,
    base: str,
    out_dir: str | os.PathLike,
    mask_token_id: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a DiffuGPT / DiffuLLaMA checkpoint folder `src` into a diffusion checkpoint at `out_dir`.

    `base` is the AR model it was adapted from (a local folder or Hub id): its config and tokenizer are
    used where `src` has none, and it is recorded as the base model. `mask_token_id` defaults to the id
    the published checkpoints reused.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if format not in MASK_IDS:
        raise UserError(f"unknown import format {format!r}; choose one of {', '.join(MASK_IDS)}")
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"checkpoint folder not found: {src}; pass the downloaded {format} folder")
    check_destination(Path(out_dir), overwrite, reads=(src, base))  # before the weights are read
    config_source = src if (src / "config.json").is_file() else base
    try:
        config = AutoConfig.from_pretrained(config_source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read a model config from {config_source}: {str(err).splitlines()[0]}; "
                        "pass --base with a local folder or Hub id of the base model") from None
    expected = "gpt2" if format == "diffugpt" else "llama"
    if config.model_type != expected:
        raise UserError(f"{format} checkpoints are {expected} models, but the config is {config.model_type!r}; "
                        "check --format and --base")
    tokenizer = _load_tokenizer(src, base)
    state = _read_weights(src)

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = to_transformers_keys(state, model)
    if _input_embedding_key(model) not in state:
        raise UserError(f"the checkpoint in {src} has no {_input_embedding_key(model)} (its input embedding); "
                        "check --format and --base")
    rows = state[_input_embedding_key(model)].shape[0]
    if rows != model.get_input_embeddings().weight.shape[0]:  # DiffuGPT padded the vocabulary
        model.resize_token_embeddings(rows, mean_resizing=False)
    _load_exactly(model, state)

    mask_token_id = MASK_IDS[format] if mask_token_id is None else mask_token_id
    if not 0 <= mask_token_id < rows:
        raise UserError(f"mask token id {mask_token_id} is outside the vocabulary (0..{rows - 1}); pass --mask-id")
    set_attention(model, 1.0)
    # DiffuGPT's padded vocabulary rows are no tokens: their logits are dropped (never sampled).
    vocab_size = len(tokenizer) if rows > len(tokenizer) > mask_token_id else None
    diffusion = DiffusionConfig(mask_token_id=mask_token_id, mask_token_strategy="reuse", shift=True,
                                base_model=str(base), annealing_finished=True, vocab_size=vocab_size)
    diffusion.save_to(model.config)
    return save_checkpoint(model.eval(), tokenizer, out_dir, diffusion=diffusion, overwrite=overwrite,
                           card={"description": f"Imported from the published {format} checkpoint."})


def to_transformers_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the DiffuGPT/DiffuLLaMA wrapper keys to the transformers model's; plain keys pass through."""
    if not any(key.startswith(WRAPPER_PREFIXES[:2]) for key in state):
        return dict(state)
    backbone = model.base_model_prefix  # "transformer" (GPT-2), "model" (Llama)
    embedding = _input_embedding_key(model).rsplit(".", 1)[0]
    head = _module_name(model, model.get_output_embeddings())
    renamed = {}
    for key, value in state.items():
        if key.startswith("embed_tokens."):
            renamed[embedding + key[len("embed_tokens"):]] = value
        elif key.startswith("denoise_model."):
            renamed[f"{backbone}.{key[len('denoise_model.'):]}"] = value
        elif key.startswith("lm_head."):
            renamed[head + key[len("lm_head"):]] = value
        else:
            raise UserError(f"unexpected weight {key!r} in a wrapper-layout checkpoint; expected keys under "
                            f"{', '.join(WRAPPER_PREFIXES)}")
    return renamed


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state`; every parameter must be covered (a tied head may be absent) and nothing left over."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith(STALE_BUFFERS) and k not in expected)}
    wrong = next((k for k, v in state.items() if k in expected and v.shape != expected[k].shape), None)
    if wrong is not None:
        raise UserError(f"the checkpoint's {wrong} has shape {list(state[wrong].shape)} but the model config wants "
                        f"{list(expected[wrong].shape)}; check --format and --base (the model it was adapted from)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    missing = [k for k in missing if not (tied and k == f"{_module_name(model, head)}.weight")]
    if missing or unexpected:
        raise UserError(f"the checkpoint does not match the model config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}; check --format and --base")


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    if not files:
        raise UserError(f"no weights (*.safetensors or *.bin) in {src}; pass the checkpoint folder")
    state = {}
    for file in files:
        state.update(_read_weights_file(file))
    return state


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    """One weights file as {name: tensor}; a damaged file, a pickle of other objects than tensors (refused
    by weights_only, so no code runs) or one that holds no state dict is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    again = "download it again, or pass the folder of the published checkpoint"
    try:
        state = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                 weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never for a download
        raise UserError(f"{file} is not a pickle of tensors alone (it is damaged, or holds objects whose loading "
                        f"could run code); {again}") from None
    except (SafetensorError, RuntimeError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{file} cannot be read as weights ({reason}); {again}") from None
    if not isinstance(state, dict):
        raise UserError(f"{file} holds a {type(state).__name__}, not a state dict of named tensors; {again}")
    name, value = next(((k, v) for k, v in state.items() if not torch.is_tensor(v)), (None, None))
    if name is not None:
        raise UserError(f"{file} holds {quoted(name)}: a {type(value).__name__}, not a tensor; {again}")
    return state


def _load_tokenizer(src: Path, base: str):
    from transformers import AutoTokenizer

    source = src if (src / "tokenizer_config.json").is_file() else base
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"no usable tokenizer at {source} ({str(err).splitlines()[0]}); "
                        "pass --base with the base model's folder") from None


def _input_embedding_key(model: nn.Module) -> str:
    return _module_name(model, model.get_input_embeddings()) + ".weight"


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)
