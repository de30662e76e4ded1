"""Loading without a whole copy of the model in any process: under ZeRO-3 and under FSDP2.

ZeRO-3: transformers builds the model inside `deepspeed.zero.Init` (each process allocates only its
slice of every weight) and its own ZeRO-3 loader then has rank 0 read the whole checkpoint into CPU RAM.
Here the checkpoint is streamed instead: one tensor at a time is gathered, filled on rank 0 from the
safetensors file and partitioned again, so rank 0 holds one tensor of the checkpoint beside its slices.

FSDP2: `load_empty` builds the model with its parameters on the meta device (no memory) and only the
input embedding and the output head read from the checkpoint, so that `ensure_mask_token` resizes them
and sets the mask token's rows exactly as on a fully loaded model. The backend then shards the model
with `fully_shard`, and `fill_sharded` allocates each process's shards and fills them: rank 0 reads the
checkpoint a piece at a time and broadcasts it, each process keeps its shards (torch's
`set_model_state_dict`). Buffers no checkpoint holds (RoPE frequencies) come from the constructors.

Either way a checkpoint whose names (or, for FSDP2, shapes) do not match the model's parameters (a .gguf
or pickle source, a layout transformers merges or splits) goes through transformers' loader.

`no_zero3_init` is the way out of zero.Init where a process needs a whole copy after all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..recipe import ModelSection

# How much of the model rank 0 reads before each broadcast under FSDP2: every broadcast also copies each
# process's shards once over (torch's set_model_state_dict), so one per tensor would be slow on CPU.
PIECE_BYTES = 64 * 2**20


def is_zero3() -> bool:
    """Whether a ZeRO-3 config is registered with transformers (accelerate does it for a ZeRO-3 recipe)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def no_zero3_init():
    """Build a model normally even while a ZeRO-3 config is registered with transformers: a whole copy in
    every process (alignment's frozen source, the exported model)."""
    import transformers.integrations.deepspeed as hf_ds
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved = hf_ds._hf_deepspeed_config_weak_ref if is_zero3() else None
    if saved is not None:
        unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None:
            hf_ds._hf_deepspeed_config_weak_ref = saved


def load_partitioned(settings: ModelSection, load_whole):
    """(model, tokenizer) with every weight partitioned over the processes; `load_whole(settings)` is the
    ordinary loader, used for checkpoints this cannot stream."""
    files = safetensors_files(settings)
    if not files:
        return load_whole(settings)
    model = _build(settings)  # inside zero.Init: transformers enters it for a ZeRO-3 config
    if not _stream_into(model, files):
        return load_whole(settings)
    return model, _tokenizer(settings)


def load_empty(settings: ModelSection, load_whole):
    """(model, tokenizer) for FSDP2: every parameter on the meta device but the input embedding's and the
    output head's, which hold the checkpoint's values; `fill_sharded` loads the rest into the shards.
    The ordinary loader (a whole copy) where the checkpoint's names or shapes are not the model's."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    files = safetensors_files(settings)
    if not files:
        return load_whole(settings)
    with init_empty_weights(include_buffers=False):  # buffers (RoPE frequencies) are computed as usual
        model = _build(settings)
    model.tie_weights()  # init_empty_weights gave a tied head a meta parameter of its own
    sources = checkpoint_sources(model, files)
    if sources is None or any(list(model.get_parameter(name).shape) != shape for name, (*_, shape) in sources.items()):
        return load_whole(settings)
    # ensure_mask_token resizes these and averages their rows: on the checkpoint's values, as after a whole load.
    for name in _embedding_names(model):
        param = model.get_parameter(name)
        file, key, _ = sources[name]
        with safe_open(file, framework="pt") as f:
            value = nn.Parameter(f.get_tensor(key).to(param.dtype), requires_grad=param.requires_grad)
        torch.utils.swap_tensors(param, value)  # the same object, so a head tied to it stays tied
    return model, _tokenizer(settings)


def fill_sharded(root: nn.Module, model: nn.Module, settings: ModelSection, device: torch.device) -> None:
    """Allocate on `device` the shards of `model` (from `load_empty`, sharded by `fully_shard` with `root`
    as the root group) and fill those still empty from the checkpoint: rank 0 reads it in pieces and
    broadcasts them, every process keeps its own shard of each tensor."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # The embeddings, the head and the buffers already hold their values; to_empty empties them too.
    held = {name: tensor for name, tensor in _local_tensors(model).items() if not tensor.is_meta}
    root.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in _local_tensors(model).items():
            if name in held:
                tensor.copy_(held[name])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    sources = checkpoint_sources(model, safetensors_files(settings))
    for names in _pieces(model, [name for name in sources if name not in held]):
        piece = {}
        if dist.get_rank() == 0:
            for name in names:
                file, key, _ = sources[name]
                with safe_open(file, framework="pt") as f:  # per tensor: the pages read leave RSS with the copy
                    piece[name] = f.get_tensor(key)
        set_model_state_dict(model, piece, options=options)  # casts to the parameter's dtype as it copies


def is_empty(model: nn.Module) -> bool:
    """Whether `load_empty` left the model's weights to `fill_sharded`."""
    return any(_local(p).is_meta for p in model.parameters())


def safetensors_files(settings: ModelSection) -> list[Path]:
    folder = Path(settings.path)
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def checkpoint_sources(model: nn.Module, files: list[Path]) -> dict[str, tuple[Path, str, list[int]]] | None:
    """(file, key, shape) of every parameter's tensor in the checkpoint, by parameter name; None unless
    every parameter has one. Keys are renamed as transformers renames them when it loads (legacy names,
    such as GPT-NeoX's `embed_out`, and the base model's prefix); a family whose tensors transformers must
    also merge or split (its converters) gets None. A tied head is one parameter, under the embedding's name."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
    if len(renamings) < len(transforms):
        return None
    params = dict(model.named_parameters())
    sources = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name, _ = rename_source_key(key, renamings, [], model.base_model_prefix, params)
                if name in params:
                    sources[name] = (file, key, f.get_slice(key).get_shape())
    return sources if set(sources) == set(params) else None


def _build(settings: ModelSection):
    """The checkpoint's model, its weights allocated as the surrounding context does (refused, as by the
    ordinary loader, unless its config is a causal LM's)."""
    from transformers import AutoModelForCausalLM

    from ..modeling import _load_config, _supported_implementation

    path = str(settings.path)
    config = _load_config(path, path, {"trust_remote_code": settings.trust_remote_code})
    attn = _supported_implementation(config, settings.attn_implementation)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, settings.dtype), attn_implementation=attn,
                                             trust_remote_code=settings.trust_remote_code)
    return model.eval()  # as from_pretrained returns it (the loop sets train mode, dropout and all, itself)


def _tokenizer(settings: ModelSection):
    from ..modeling import _load_tokenizer

    folder = str(settings.path)
    return _load_tokenizer(folder, folder, {"trust_remote_code": settings.trust_remote_code})


def _embedding_names(model: nn.Module) -> list[str]:
    """The names of the input embedding's weight and of the output head's parameters."""
    head = model.get_output_embeddings()
    wanted = [model.get_input_embeddings().weight, *(head.parameters() if head is not None else ())]
    return [name for name, param in model.named_parameters() if any(param is p for p in wanted)]


def _pieces(model: nn.Module, names: list[str]) -> list[list[str]]:
    """`names` in consecutive pieces of at most PIECE_BYTES of the model's weights (a larger tensor alone)."""
    params = dict(model.named_parameters())
    pieces, size = [[]], 0
    for name in names:
        nbytes = params[name].numel() * params[name].element_size()
        if pieces[-1] and size + nbytes > PIECE_BYTES:
            pieces.append([])
            size = 0
        pieces[-1].append(name)
        size += nbytes
    return pieces


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: a sharded DTensor's shard, any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _local_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """This process's part of every parameter and buffer, by name."""
    return {name: _local(tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


def _stream_into(model, files: list[Path]) -> bool:
    """Fill every parameter from the files, one gathered tensor at a time; False if the names do not match."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    sources = checkpoint_sources(model, files)
    if sources is None:
        return False
    for name, param in model.named_parameters():
        file, key, _ = sources[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if dist.get_rank() == 0:
                # Opened per tensor: the file's mapping, and the RSS of the pages read, ends with the copy.
                with safe_open(file, framework="pt") as f:
                    param.data.copy_(f.get_tensor(key))
    return True
