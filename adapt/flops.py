"""Model FLOPs of a training step, PaLM-style: what `adapt bench` divides by the time it measures (MFU)
and what `adapt plan` divides by an assumed MFU (the run's time)."""

from __future__ import annotations

import torch

from .structure import decoder_backbone


def train_flops(model, shape: tuple[int, int], head_positions: float) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), PaLM-style.

    6 x (matmul parameters of the decoder) per token, plus 12 x layers x attention width x L per token
    for attention scores and values (counted in full, causal or not), plus 6 x d x V for each position
    the LM head actually runs on (all of them for causal training, the masked ones for diffusion).
    """
    batch, length = shape
    backbone = decoder_backbone(model)
    embedding_weights = {id(m.weight) for m in backbone.modules() if isinstance(m, torch.nn.Embedding)}
    matmul_params = sum(p.numel() for p in backbone.parameters() if p.ndim >= 2 and id(p) not in embedding_weights)
    config = model.config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_dim
    head = model.get_output_embeddings().weight.numel()
    tokens = batch * length
    return 6 * matmul_params * tokens + 12 * layers * attention_width * length * tokens + 6 * head * head_positions
