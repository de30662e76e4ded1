"""adapt: turn pretrained causal LMs into masked discrete-diffusion LMs (DiffuLLaMA-style)."""

from .attention import get_attention_ratio, set_attention
from .diffusion import DiffusionConfig, DiffusionLoss, ELBO, diffusion_loss, elbo_nll
from .errors import UserError
from .export import load, save_checkpoint
from .sampling import SamplingOptions, generate, infill
from .modeling import ensure_mask_token, load_model

__all__ = [
    "DiffusionConfig",
    "DiffusionLoss",
    "ELBO",
    "SamplingOptions",
    "UserError",
    "diffusion_loss",
    "elbo_nll",
    "ensure_mask_token",
    "generate",
    "get_attention_ratio",
    "infill",
    "load",
    "load_model",
    "save_checkpoint",
    "set_attention",
]

__version__ = "0.1.0"
