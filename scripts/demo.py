"""The smallest end-to-end path: a causal LM becomes a diffusion LM in a few lines.

Builds a tiny Llama (no download), adds a mask token, shows that with causal attention and the shift
the diffusion loss of one masked token is the AR loss, then anneals attention to bidirectional and
reports the ELBO perplexity. The full demo (real SmolLM2, Brown corpus, CPU adaptation) replaces this
once `adapt train` exists.
"""

import torch
import torch.nn.functional as F

import adapt
from adapt.diffusion import DiffusionConfig
from adapt.presets import tiny_model, tiny_tokenizer

model, tokenizer = tiny_model("llama"), tiny_tokenizer()
mask_id = adapt.ensure_mask_token(model, tokenizer, strategy="add")
config = DiffusionConfig.from_model_config(model.config)
print(f"mask token {tokenizer.mask_token!r} -> id {mask_id}")

ids = tokenizer("<s> w5 w9 w17 w33 w65 w12 w40", return_tensors="pt").input_ids
mask = torch.zeros_like(ids, dtype=torch.bool)
mask[0, 4] = True
with torch.no_grad():
    diffusion = adapt.diffusion_loss(model, ids, config, t=torch.ones(1), mask=mask).loss
    ar = F.cross_entropy(model(input_ids=ids).logits[0, 3], ids[0, 4])
print(f"causal + shift, one masked token: diffusion loss {diffusion:.6f} == AR loss {ar:.6f}")

for step in (0, config.anneal_steps // 2, config.anneal_steps - 1):
    adapt.set_attention(model, config.anneal_ratio(step))
    elbo = adapt.elbo_nll(model, ids, config, n_samples=16, generator=torch.Generator().manual_seed(0))
    print(f"step {step:>5}: attention ratio {config.anneal_ratio(step):.4f}, ELBO perplexity {elbo.perplexity:.1f}")
