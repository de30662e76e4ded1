"""Remote code shipped inside every exported checkpoint, so that plain transformers can sample it.

`adapt export` copies this file and the modules it imports (the sampler, the diffusion settings, the
modes and objectives; `adapt.export.REMOTE_CODE_FILES`) verbatim into the checkpoint and writes
`auto_map` in config.json, e.g.

    "auto_map": {"AutoModelForCausalLM": "modeling_adapt_diffusion.AdaptDiffusionLlamaForCausalLM"}

Then, without `adapt` installed:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.diffusion_generate(tokenizer, "The", length=32, steps=32)

The class named in `auto_map` is the checkpoint's own transformers class (here `LlamaForCausalLM`) with
the sampling methods mixed in, so the weights, the forward and the attention are exactly those of the
family's modeling code. Any family works without a class per family: the module builds
`AdaptDiffusion<Base>` on first access (PEP 562 module `__getattr__`). Attention: ratio 1 (bidirectional)
is restored by transformers itself from `is_causal` in config.json; a partial ratio (a checkpoint saved
mid-annealing) is restored with `set_attention` when the model is built. The model's mode (`diffusion.mode`
in config.json) decodes it with the same classes as `adapt`: a block model block by block with its exact
KV cache; a bidirectional one, decoded in blocks, takes Fast-dLLM's approximate caches with
`cache="prefix"` or `"dual"`.
"""

from __future__ import annotations

import transformers

from .attention import attention_ratio_of, set_attention
from .diffusion import DiffusionConfig
from .sampling import generate, generate_with_details, infill, infill_with_details

CLASS_PREFIX = "AdaptDiffusion"


class DiffusionGenerationMixin:
    """Diffusion sampling methods; every keyword is that of `adapt.generate` / `adapt.infill`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        DiffusionConfig.from_model_config(config)  # config.json's section, checked before anything samples with it
        ratio = attention_ratio_of(config)
        if ratio > 0:
            set_attention(self, ratio)

    @property
    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig.from_model_config(self.config)

    def diffusion_generate(self, tokenizer, prompt: str | None = None, *, details: bool = False, **kwargs):
        """Generated continuations (list of str), or a `Generation` with `details=True`. `cache` ("exact",
        "none", "prefix", "dual") chooses the key/value cache as for `adapt.generate`."""
        sample = generate_with_details if details else generate
        return sample(self, tokenizer, prompt, **kwargs)

    def diffusion_infill(self, tokenizer, text: str, *, details: bool = False, **kwargs):
        """The text with every [MASK] span filled (str), or an `Infilling` with `details=True`."""
        if details:
            return infill_with_details(self, tokenizer, text, **kwargs)
        return infill(self, tokenizer, text, **kwargs)


def diffusion_class(base: type) -> type:
    """`base` (a transformers causal-LM class) with the diffusion sampling methods."""
    name = CLASS_PREFIX + base.__name__
    if name not in globals():
        globals()[name] = type(name, (DiffusionGenerationMixin, base), {"__module__": __name__})
    return globals()[name]


def __getattr__(name: str):
    if not name.startswith(CLASS_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = getattr(transformers, name[len(CLASS_PREFIX):], None)
    if base is None:
        raise AttributeError(f"{name}: transformers {transformers.__version__} has no class "
                             f"{name[len(CLASS_PREFIX):]!r}; upgrade transformers")
    return diffusion_class(base)
