"""adapt: turn pretrained causal LMs into masked discrete-diffusion LMs (DiffuLLaMA-style).

The public names are imported on first use (PEP 562), so `import adapt` and the `adapt` command start
without torch: `adapt --help` is instant, and Ctrl-C while a command is still importing its libraries
ends it with one line instead of a traceback.
"""

import importlib

# public name -> the module of the package that defines it
_EXPORTS = {
    "get_attention_ratio": "attention", "set_attention": "attention",
    "DiffusionConfig": "diffusion", "DiffusionLoss": "diffusion", "DiffusionTraining": "diffusion", "ELBO": "diffusion",
    "diffusion_loss": "diffusion", "elbo_nll": "diffusion",
    "UserError": "errors",
    "load": "export", "save_checkpoint": "export",
    "SamplingOptions": "sampling", "generate": "sampling", "infill": "sampling",
    "ensure_mask_token": "modeling", "load_model": "modeling",
}

__all__ = sorted(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    try:  # a submodule, as `adapt.diffusion` after a plain `import adapt`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but needs something missing: say that
        raise AttributeError(f"module 'adapt' has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
