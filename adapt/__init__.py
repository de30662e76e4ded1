"""adapt: turn pretrained causal LMs into masked discrete-diffusion LMs (DiffuLLaMA-style)."""

from .attention import get_attention_ratio, set_attention
from .diffusion import DiffusionConfig, DiffusionLoss, ELBO, diffusion_loss, elbo_nll
from .errors import UserError
from .modeling import ensure_mask_token, load_model

__all__ = [
    "DiffusionConfig",
    "DiffusionLoss",
    "ELBO",
    "UserError",
    "diffusion_loss",
    "elbo_nll",
    "ensure_mask_token",
    "get_attention_ratio",
    "load_model",
    "set_attention",
]

__version__ = "0.1.0"
