"""Tiny randomly initialised models of each supported family (2 layers, width 64).

Used by the tests and by `adapt bench --model tiny-<family>`: every property the toolkit promises is
checked on each of these, so a family listed here is a family that is known to work.
"""

from __future__ import annotations

import torch

VOCAB = 128
WIDTH = 64


def _configs() -> dict:
    from transformers import (
        GemmaConfig,
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **special,
    )
    return {
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=256, **special),
        "llama": lambda: LlamaConfig(**llama_like),
        "mistral": lambda: MistralConfig(**llama_like, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**llama_like),
        "qwen3": lambda: Qwen3Config(**llama_like, head_dim=16),
        "gpt_neox": lambda: GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, **special,
        ),
        "phi3": lambda: Phi3Config(**llama_like),
        "gemma": lambda: GemmaConfig(**llama_like, head_dim=16),
        "gemma2": lambda: Gemma2Config(**llama_like, head_dim=16, sliding_window=64),
    }


FAMILIES = tuple(_configs())


def tiny_config(family: str):
    configs = _configs()
    if family not in configs:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(configs)}")
    return configs[family]()


def tiny_model(family: str, attn_implementation: str | None = None, seed: int = 0):
    """A randomly initialised 2-layer causal LM of `family` in eval mode (SDPA where the family has it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    attn_implementation = attn_implementation or implementations(family)[-1]
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def implementations(family: str) -> tuple[str, ...]:
    """The attention implementations a family offers on CPU (Gemma 2 has no SDPA)."""
    from .modeling import supports_sdpa

    return ("eager", "sdpa") if supports_sdpa(tiny_config(family)) else ("eager",)


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB ids ("w3" ... ) with <pad>=0, <s>=1, </s>=2, for offline tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), VOCAB - 1)})
    vocab["<unk>"] = VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
