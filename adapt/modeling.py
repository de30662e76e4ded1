"""Loading causal checkpoints and choosing the mask token.

One loader for every entry point (convert, train, export, eval) so that the safety defaults hold
everywhere: safetensors only unless pickles are explicitly allowed, no remote code unless asked for,
and one clear `UserError` for a path that is not a causal LM.
"""

from __future__ import annotations

import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .attention import attention_ratio_of
from .diffusion import DiffusionConfig
from .errors import UserError
from .settings import config_source
from .structure import unwrap_model

MASK_TOKEN = "<|mdm_mask|>"
EMBEDDING_ROW_MULTIPLE = 64  # an added mask token pads the embedding to a multiple of this


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load (model, tokenizer) from a local HF folder, a .gguf file, or a Hub id.

    `attn_implementation` defaults to "sdpa" (falls back to "eager" for families without it, such as
    Gemma 2), the implementations that can carry the annealed mask.
    """
    path = str(path)
    source, gguf = from_pretrained_args(path)
    load_kwargs: dict = {"trust_remote_code": trust_remote_code, **gguf}
    _check_source(path, source, gguf, allow_pickle)
    config = _load_config(path, source, load_kwargs)
    diffusion = DiffusionConfig.from_model_config(config)  # config.json is input: checked before the weights load
    attention_ratio_of(config)
    kwargs = dict(load_kwargs)
    if dtype is not None:
        kwargs["dtype"] = _torch_dtype(dtype)
    if not gguf:
        # None lets transformers fall back to .bin, which it then reads with weights_only=True.
        kwargs["use_safetensors"] = None if allow_pickle else True
    if attn_implementation is not None:
        kwargs["attn_implementation"] = _supported_implementation(config, attn_implementation)
    model = _load_weights(path, source, kwargs)
    tokenizer = _load_tokenizer(path, source, load_kwargs)
    if diffusion is not None:
        _check_token_ids(diffusion, model, tokenizer)
    if gguf:
        _detach_gguf_quantizer(model)
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """The tokenizer of what `load_model` would load from `path`, without its weights: for the checks that
    must hold before any model is loaded (two models compared side by side must share one)."""
    path = str(path)
    source, gguf = from_pretrained_args(path)
    _check_source(path, source, gguf, allow_pickle)
    return _load_tokenizer(path, source, {"trust_remote_code": trust_remote_code, **gguf})


def _check_token_ids(diffusion: DiffusionConfig, model: nn.Module, tokenizer) -> None:
    """The ids config.json's diffusion section gives must be rows of the embedding the weights brought:
    an out-of-range mask id fails deep inside the first forward, far from the file that holds it."""
    rows = _rows(model.get_input_embeddings().weight)
    source = config_source(model.config)
    if diffusion.mask_token_id is not None and not 0 <= diffusion.mask_token_id < rows:
        own = (f"the tokenizer's mask token has id {tokenizer.mask_token_id}" if tokenizer.mask_token_id is not None
               else "the tokenizer has no mask token")
        raise UserError(f"{source}: diffusion.mask_token_id = {diffusion.mask_token_id} is not a row of the model's "
                        f"embedding ({rows:,} rows); set it to the model's mask token id ({own})")
    if diffusion.vocab_size is not None and diffusion.vocab_size > rows:
        raise UserError(f"{source}: diffusion.vocab_size = {diffusion.vocab_size} is more than the model's embedding "
                        f"has rows ({rows:,}); set it to at most {rows}, or remove it")


def _check_source(path: str, source: str, gguf: dict, allow_pickle: bool) -> None:
    """A missing local path, a file or a run folder for a model folder, or pickle-only weights, refused
    before transformers is asked (which would try the Hub for each, then fail obscurely)."""
    if not path.strip():  # Path("") is the working directory: an empty argument must not load what lies there
        raise UserError("the model path is empty; pass a local model folder, a .gguf file or a Hub id")
    if gguf:
        if not Path(path).is_file():
            raise UserError(f"model file not found: {path}; pass an existing .gguf file")
    elif not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UserError(f"model path not found: {path}; pass a local model folder, a .gguf file or a Hub id")
    elif Path(path).is_file():
        raise UserError(f"{path} is a file; pass the model's folder (the one holding config.json), or a .gguf file")
    elif Path(source).is_dir():
        folder = Path(source)
        if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
            raise UserError(f"{path} is a training run's folder; pass its model folder, {folder / 'model'}")
        _check_weights_format(folder, allow_pickle)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UserError(f"unknown dtype {dtype!r}; pass float32, bfloat16 or float16")
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_device(device: torch.device | str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded for it."""
    if device is None:
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; pass cpu, cuda, cuda:1, mps, ...") from None
    backends = {"cuda": torch.cuda, "mps": torch.backends.mps}
    if device.type in backends and not backends[device.type].is_available():
        raise UserError(f"--device {device} asks for {device.type.upper()}, which this machine (or this build of "
                        "torch) does not have; pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices; "
                        "pass cuda:0 ... or cpu")


def _load_config(path: str, source: str, load_kwargs: dict):
    """The model's config, which must be a causal LM's."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **load_kwargs)
    except OSError as err:
        from huggingface_hub import constants

        if constants.is_offline_mode() and not Path(source).exists():
            raise UserError(f"{path!r} is not a local folder and HF_HUB_OFFLINE is set, so the Hub is not "
                            "consulted; download the model and pass its folder, or unset HF_HUB_OFFLINE") from None
        raise UserError(f"cannot load a model config from {path!r}: {_first_line(err)}; "
                        "pass a local folder with config.json, a .gguf file, or a reachable Hub id") from None
    except ValueError as err:
        raise UserError(f"cannot read the model config at {path!r}: {_first_line(err)}") from None
    if not _is_causal_lm_config(config):
        raise UserError(f"{path} is a {config.model_type!r} model with no causal-LM head; "
                        "adapt needs a decoder-only causal LM (GPT-2, Llama, Mistral, Qwen, ...)")
    return config


def _load_weights(path: str, source: str, kwargs: dict):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        with _load_report_held_back() as report:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        report.replay()
        return model
    except OSError as err:
        raise UserError(f"cannot load model weights from {path!r}: {_first_line(err)}") from None
    except RuntimeError as err:
        if "mismatched_sizes" not in str(err):
            raise
        raise UserError(f"the weights in {path!r} do not fit its config.json (tensor shapes differ); the config "
                        "and the weights come from different models, so copy the model's own config.json") from None
    except SafetensorError as err:
        raise UserError(f"the safetensors weights in {path!r} are damaged or incomplete ({_first_line(err)}); "
                        "copy or download them again") from None
    except pickle.UnpicklingError:  # refused by weights_only; torch's message suggests turning it off: never
        raise UserError(f"the pickle weights in {path!r} are not tensors alone (damaged, or holding objects whose "
                        "loading could run code); copy or download them again, as safetensors if you can") from None


class _HeldRecords(logging.Handler):
    """Log records kept back, to be handed to the handlers they were meant for (or dropped)."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.handlers, self.records = logger, list(logger.handlers), []

    def emit(self, record):
        self.records.append(record)

    def replay(self):
        for record in self.records:
            for handler in self.handlers:
                handler.handle(record)


@contextmanager
def _load_report_held_back():
    """transformers logs a long load report and then raises on weights of the wrong shape: hold its log
    back while loading, so a failure is our one line; `replay()` it after a load that worked."""
    logger = logging.getLogger("transformers")
    held = _HeldRecords(logger)
    logger.handlers = [held]
    try:
        yield held
    finally:
        logger.handlers = held.handlers


def _load_tokenizer(path: str, source: str, load_kwargs: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"no usable tokenizer at {path!r} ({_first_line(err)}); "
                        "save the tokenizer files next to the weights") from None


def from_pretrained_args(path: str) -> tuple[str, dict]:
    """(what to pass transformers' from_pretrained, extra keywords): a .gguf file is its folder + gguf_file."""
    if path.endswith(".gguf"):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def ensure_mask_token(model: nn.Module, tokenizer, strategy: str = "add", token_id: int | None = None) -> int:
    """Give the model a mask token and return its id; the choice is recorded in `config.diffusion`.

    "add": add `mask_token` to the tokenizer (unless it has one already) and resize the embeddings,
    setting the new row of the input embedding (and of an untied output head) to the mean of the rows
    it had, so the new token starts as a neutral vector rather than a random one.
    "reuse": use the existing id `token_id` (e.g. 10541 for GPT-2 small, 811 for LLaMA-2 in DiffuLLaMA).
    """
    inner = unwrap_model(model)
    vocab_rows = _rows(inner.get_input_embeddings().weight)
    if len(tokenizer) > vocab_rows:  # its last ids have no embedding row: a mismatched tokenizer, not a mask token
        raise UserError(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding has {vocab_rows:,} "
                        "rows; use the tokenizer the model was trained with")
    if strategy == "reuse":
        if token_id is None or not 0 <= token_id < vocab_rows:
            raise ValueError(f"strategy 'reuse' needs token_id in [0, {vocab_rows}), got {token_id}")
        mask_id = int(token_id)
    elif strategy == "add":
        if token_id is not None:
            raise ValueError("strategy 'add' chooses the id itself; pass token_id only with strategy 'reuse'")
        if tokenizer.mask_token is None:
            tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        mask_id = int(tokenizer.mask_token_id)
        _init_new_row(inner, mask_id)
    else:
        raise ValueError(f"mask token strategy must be 'add' or 'reuse', got {strategy!r}")

    diffusion = DiffusionConfig.from_model_config(inner.config) or DiffusionConfig()
    diffusion.mask_token_id = mask_id
    diffusion.mask_token_strategy = strategy
    if strategy == "add":
        diffusion.vocab_size = max(len(tokenizer), mask_id + 1)
    diffusion.save_to(inner.config)
    return mask_id


def _init_new_row(model: nn.Module, row: int) -> None:
    """Make room for embedding row `row` and set it (in and out) to the mean of the existing rows.

    The embedding grows to a multiple of EMBEDDING_ROW_MULTIPLE, as tensor cores want its matmul sizes;
    the padding rows past `row` get the same mean (never random values) and are never predicted: their
    logits are dropped (`DiffusionConfig.vocab_size`).
    """
    old_rows = _rows(model.get_input_embeddings().weight)
    existing = min(old_rows, row)
    new_rows = slice(row, row + 1)
    if row >= old_rows:
        model.resize_token_embeddings(row + 1, pad_to_multiple_of=EMBEDDING_ROW_MULTIPLE, mean_resizing=False)
        new_rows = slice(old_rows, _rows(model.get_input_embeddings().weight))
    inputs, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    with torch.no_grad(), _gathered([inputs, *(head.parameters() if head is not None else [])]):
        inputs[new_rows] = inputs[:existing].mean(dim=0)
        if head is not None and head.weight is not inputs:
            head.weight[new_rows] = head.weight[:existing].mean(dim=0)
            if getattr(head, "bias", None) is not None:
                head.bias[new_rows] = head.bias[:existing].mean()


def _rows(weight: torch.Tensor) -> int:
    """An embedding's rows, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(weight, "ds_shape", weight.shape)[0]


@contextmanager
def _gathered(params):
    """Whole ZeRO-3-partitioned parameters for an update (rank 0's values are kept); others as they are.

    A model built inside `deepspeed.zero.Init` holds only a slice of each weight per process, so the
    mean of the existing rows must be taken on the gathered matrix.
    """
    partitioned = list({id(p): p for p in params if hasattr(p, "ds_id")}.values())  # a tied head once
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def _is_causal_lm_config(config) -> bool:
    """Whether the checkpoint was trained as a decoder-only causal LM.

    The class it was saved from says so (config.architectures: BertForMaskedLM is an encoder even though
    a BertLMHeadModel class exists; remote-code models name their own classes). `is_decoder` is no
    guide: transformers 5 writes is_decoder: false for GPT-NeoX, a causal LM. Without architectures
    (a bare config), the family decides, and an encoder family only when the config says decoder.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.architectures:
        return any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in config.architectures)
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return False
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def supports_sdpa(config) -> bool:
    """Whether the family offers SDPA attention (Gemma 2 does not, because of its logit softcapping)."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return model_class is None or bool(getattr(model_class, "_supports_sdpa", False))


def _supported_implementation(config, wanted: str) -> str:
    return "eager" if wanted == "sdpa" and not supports_sdpa(config) else wanted


def _check_weights_format(folder: Path, allow_pickle: bool) -> None:
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UserError(f"{folder} holds only pickle weights (.bin/.pt), which can run code when loaded; "
                        "convert them to safetensors, or pass --allow-pickle if you trust the source")


def _detach_gguf_quantizer(model: nn.Module) -> None:
    """GGUF loads dequantised to full precision but keeps a quantizer that blocks save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
