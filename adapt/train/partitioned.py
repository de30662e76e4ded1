"""Loading under ZeRO-3 without a whole copy of the model in any process.

transformers builds the model inside `deepspeed.zero.Init` (each process allocates only its slice of
every weight) and its own ZeRO-3 loader then has rank 0 read the whole checkpoint into CPU RAM. Here
the checkpoint is streamed instead: one tensor at a time is gathered, filled on rank 0 from the
safetensors file and partitioned again, so rank 0 holds one tensor of the checkpoint beside its slices.
A checkpoint whose names do not match the model's parameters (a renamed layout, a .gguf or pickle
source) goes through transformers' loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..recipe import ModelSection


def is_zero3() -> bool:
    """Whether a ZeRO-3 config is registered with transformers (accelerate does it for a ZeRO-3 recipe)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def load_partitioned(settings: ModelSection, load_whole):
    """(model, tokenizer) with every weight partitioned over the processes; `load_whole(settings)` is the
    ordinary loader, used for the tokenizer and the checks and for checkpoints this cannot stream."""
    folder = Path(settings.path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return load_whole(settings)
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling import _load_tokenizer, supports_sdpa

    config = AutoConfig.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
    attn = settings.attn_implementation
    if attn == "sdpa" and not supports_sdpa(config):
        attn = "eager"
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, settings.dtype), attn_implementation=attn,
                                                 trust_remote_code=settings.trust_remote_code)
    except ValueError:
        return load_whole(settings)  # not a causal LM: the ordinary loader says so in its own words
    if not _stream_into(model, files):
        return load_whole(settings)
    return model, _load_tokenizer(str(folder), str(folder), {"trust_remote_code": settings.trust_remote_code})


def _stream_into(model, files: list[Path]) -> bool:
    """Fill every parameter from the files, one gathered tensor at a time; False if the names do not match."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    params = dict(model.named_parameters())  # a tied head appears once, under the embedding's name
    prefix = model.base_model_prefix + "."
    sources = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = key if key in params else prefix + key
                if name in params:
                    sources[name] = (file, key)
    if set(sources) != set(params):
        return False
    for name, param in params.items():
        file, key = sources[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if dist.get_rank() == 0:
                # Opened per tensor: the file's mapping, and the RSS of the pages read, ends with the copy.
                with safe_open(file, framework="pt") as f:
                    param.data.copy_(f.get_tensor(key))
    return True

