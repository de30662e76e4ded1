"""Save and load diffusion checkpoints: the folder anyone can load, with or without `adapt`.

A checkpoint folder holds:
* sharded safetensors weights (`model-0000x-of-0000n.safetensors` + index, or one `model.safetensors`);
* config.json with the `diffusion` section (mask id, shift, objective, loss normalisation, base model,
  tokens trained, whether annealing finished), the attention state (`is_causal`, `attention_ratio`)
  and `auto_map` pointing at the remote code;
* the tokenizer, its mask token set to the diffusion mask id;
* the remote code: `modeling_adapt_diffusion.py` and the modules it imports, copied verbatim from this
  package (see that file), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` gives
  a bidirectional model with `diffusion_generate` / `diffusion_infill` and no `adapt` install;
* README.md, a model card with YAML metadata and the evaluation figures when known.

The folder is written under a temporary name next to `out_dir` and renamed into place when complete,
so an interrupted export never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .attention import get_attention_ratio, set_attention
from .diffusion import DiffusionConfig
from .errors import UserError
from .outputs import check_output, tensor_bytes, writing
from .settings import from_dict, read_from, read_json
from .structure import unwrap_model

REMOTE_MODULE = "modeling_adapt_diffusion"
# The remote module and every module it imports, relative to this package (checked by the tests: a
# missing one makes the remote load fail).
REMOTE_CODE_FILES = (f"{REMOTE_MODULE}.py", "sampling.py", "draw.py", "speculative.py", "diffusion.py", "attention.py",
                     "mode.py", "bidirectional.py", "block.py", "hybrid.py", "forward.py", "objectives.py",
                     "structure.py", "settings.py", "errors.py", "limits.py")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
REEXPORT = "write the folder again with `adapt export SRC OUT`"


@dataclass
class CardFields:
    """What a model card may say beyond the diffusion settings (`card=` / `adapt export --card`), typed:
    `tags: "chat"` is one tag, not one per letter."""

    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)  # {metric: value}
    description: str | None = None
    base_model: str | None = None


def card_fields(card: dict | None) -> CardFields:
    """`card` checked: its keys are CardFields', each of its type."""
    return from_dict(CardFields, card or {}, "card.")


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    diffusion: DiffusionConfig | None = None,
    card: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Write a complete diffusion checkpoint to `out_dir` and return its path.

    `diffusion` defaults to the settings in `model.config`; `annealing_finished` is set from the model's
    attention ratio. `card` may give `license`, `datasets`, `tags`, `evaluation` ({metric: value}),
    `description` and `base_model` for the model card. An existing non-empty `out_dir` is replaced only
    with `overwrite=True`. Neither the model nor the tokenizer passed in is modified. Merge LoRA
    adapters before saving (`merge_and_unload()`): the checkpoint holds plain weights.
    """
    out_dir = Path(out_dir)
    if any(".lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("the model still has LoRA adapters; merge them first (model = model.merge_and_unload())")
    model = unwrap_model(model)
    diffusion = copy.deepcopy(diffusion or DiffusionConfig.from_model_config(model.config))
    if diffusion is None or diffusion.mask_token_id is None:
        raise UserError("the model has no diffusion settings (config.diffusion with a mask token id); "
                        "convert it first (adapt.ensure_mask_token) before exporting")
    diffusion.annealing_finished = get_attention_ratio(model) >= 1.0
    fields = card_fields(card)
    check_destination(out_dir, overwrite, needed_bytes=tensor_bytes(model.parameters()))
    _check_shard_size(max_shard_size)
    tokenizer = _with_mask_token(tokenizer, diffusion.mask_token_id)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is an ordinary folder
    with writing(out_dir, staging):
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["diffusion"] = diffusion.to_dict()
        # Name the family's own class, also when the model was itself loaded through the remote code.
        base = next(cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith("transformers."))
        config["architectures"] = [base]
        config["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.AdaptDiffusion{base}"}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        package = Path(__file__).parent
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(package / name, staging / name)
        (staging / "README.md").write_text(model_card(model, diffusion, fields))
        for path in staging.iterdir():
            path.chmod(0o644)  # some writers create private files; a checkpoint is meant to be shared
        _move_into_place(staging, out_dir)
    return out_dir


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a diffusion checkpoint: (model, tokenizer, DiffusionConfig), in eval mode, ready to sample.

    The attention state saved with the checkpoint (`attention_ratio`, 1 = bidirectional) is restored.
    The safety switches are `load_model`'s.
    """
    from .modeling import check_device, load_model

    check_device(device)
    model, tokenizer = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    diffusion = DiffusionConfig.from_model_config(model.config)
    if diffusion is None or diffusion.mask_token_id is None:
        raise UserError(f"{path} is not a diffusion checkpoint (config.json has no 'diffusion' section with a "
                        "mask token id); convert or train it with adapt first")
    set_attention(model, get_attention_ratio(model))
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, diffusion


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    card: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Re-export a diffusion checkpoint folder (a training output, say) as a complete checkpoint."""
    check_destination(Path(out_dir), overwrite, reads=(src,))  # before minutes of loading
    _check_shard_size(max_shard_size)
    model, tokenizer, diffusion = load(src, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return save_checkpoint(model, tokenizer, out_dir, diffusion=diffusion, card=card, overwrite=overwrite,
                           max_shard_size=max_shard_size)


def check_export(folder: str | os.PathLike) -> None:
    """Raise UserError naming what is missing if `folder` is not a complete checkpoint from `save_checkpoint`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the output folder of `adapt export`")
    missing = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        missing.append("config.json")
    else:
        missing += _missing_from_config(config_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with read_from(str(index)):
            weight_map = from_dict(_ShardIndex, read_json(index, REEXPORT)).weight_map
        missing += sorted({shard for shard in weight_map.values() if not (folder / str(shard)).is_file()})
    elif not (folder / "model.safetensors").is_file():
        missing.append("safetensors weights")
    if not (folder / "tokenizer_config.json").is_file() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("the tokenizer")
    missing += [name for name in (*REMOTE_CODE_FILES, "README.md") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is not a complete export (missing: {', '.join(missing)}); "
                        "write it with `adapt export SRC OUT`")


@dataclass
class _ShardIndex:
    """model.safetensors.index.json, as far as a push reads it."""

    weight_map: dict
    metadata: dict = field(default_factory=dict)


def _missing_from_config(config_path: Path) -> list[str]:
    """What an export's config.json lacks: its diffusion section (checked as a load checks it) or auto_map."""
    config = read_json(config_path, REEXPORT)
    missing = []
    with read_from(str(config_path)):
        section = config.get("diffusion")
        if section is None or DiffusionConfig.from_dict(section).mask_token_id is None:
            missing.append("the 'diffusion' section of config.json")
    if REMOTE_MODULE not in json.dumps(config.get("auto_map", {})):
        missing.append("'auto_map' in config.json")
    return missing


def model_card(model: nn.Module, diffusion: DiffusionConfig, card: CardFields) -> str:
    """README.md: YAML metadata for the Hub, then how to use the model and what it was trained with."""
    from huggingface_hub import ModelCardData

    base_model = card.base_model or diffusion.base_model
    metadata = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["adapt", "diffusion", "masked-diffusion-lm", *card.tags],
        datasets=card.datasets or None,
        license=card.license,
    )
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {'Diffusion LM adapted from ' + base_model if base_model else 'Masked diffusion LM'}", "",
    ]
    if card.description:
        lines += [card.description, ""]
    if diffusion.tokens_trained > 0:
        lines += [f"A {type(model).__name__} turned into a masked discrete-diffusion language model with `adapt`: "
                  f"DiffuLLaMA-style continued pretraining on {diffusion.tokens_trained:,} tokens, attention "
                  "annealed from causal to bidirectional, shift-by-one alignment kept.", ""]
    else:
        lines += [f"A {type(model).__name__} set up as a masked diffusion language model with `adapt` (mask "
                  "token, attention state, sampler) but not trained under the diffusion objective here "
                  "(tokens_trained = 0).", ""]
    lines += [
        "## Use", "",
        "Plain transformers (the sampler ships with the checkpoint as remote code):", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "path = \"path/or/repo-id\"",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        'print(model.diffusion_generate(tokenizer, "Once upon a time", length=64)[0])',
        'print(model.diffusion_infill(tokenizer, "The capital of France is [MASK:2]."))',
        "```", "",
        "With adapt: `adapt generate path --prompt \"Once upon a time\" --length 64`.", "",
        "## Diffusion settings", "",
        "| setting | value |", "|---|---|",
    ]
    settings = diffusion.to_dict()
    trained_with = settings.pop("trained_with") or {}
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    lines.append(f"| attention_ratio | {get_attention_ratio(model)} |")
    if trained_with:
        lines += ["", "## Training settings (the recipe's `diffusion:` section)", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in trained_with.items()]
    if card.evaluation:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_format_figure(value)} |" for name, value in card.evaluation.items()]
    return "\n".join(lines) + "\n"


def _format_figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _with_mask_token(tokenizer, mask_token_id: int):
    """The tokenizer with `mask_token` set to the diffusion mask id (a copy when it has to change)."""
    if tokenizer.mask_token_id == mask_token_id:
        return tokenizer
    if tokenizer.mask_token is not None:
        raise UserError(f"the tokenizer's mask token {tokenizer.mask_token!r} (id {tokenizer.mask_token_id}) is "
                        f"not the diffusion mask id {mask_token_id}; fix config.diffusion.mask_token_id")
    tokenizer = copy.deepcopy(tokenizer)  # a reused id: name its existing token the mask token
    tokenizer.mask_token = tokenizer.convert_ids_to_tokens(mask_token_id)
    return tokenizer


def check_destination(out_dir: Path, overwrite: bool, needed_bytes: int = 0, reads: tuple = ()) -> None:
    """A folder we may write (`outputs.check_output`) that is new, empty, or to be replaced (`overwrite`), and
    that overlaps none of the paths the command `reads` (`overwrite` must never delete them)."""
    check_output(out_dir, folder=True, needed_bytes=needed_bytes, reads=reads)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) "
                        "to replace it, or choose another output folder")


def _check_shard_size(max_shard_size: str | int) -> None:
    """A shard size transformers can read: a number of bytes, or a string such as "2GB" or "500MB"."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size < 1:
        raise UserError(f"max shard size {max_shard_size!r} is not a size; pass bytes or a size such as 2GB or 500MB")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`; an old `out_dir` is removed only after the rename."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old)
