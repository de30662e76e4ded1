"""`adapt plan`: what a recipe needs per GPU and per node, and how long it runs, before anything is paid for.

Everything is computed from the model's config on the meta device (accelerate's `init_empty_weights`),
so a config.json is enough: no weights are downloaded or read.

Per GPU, three kinds of memory:

* Model states (weights, gradients, optimizer): each backend's memory model, the `model_states` of its
  class in adapt/train/backends.py. Under DeepSpeed the total is DeepSpeed's own estimator
  (`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, the figures its
  `..._all_cold` tables print) for the recipe's stage and offload settings; the rows beside it split the
  same bytes the way DeepSpeed counts them: 2 bytes per parameter of 16-bit weights, 2 + 4 of 16- and
  32-bit gradients, 4 + 8 of fp32 master weights and Adam moments, divided by the GPUs where ZeRO shards
  them, plus ZeRO-3's 4 bytes per parameter of the largest layer for the gathered weights it works on.
  DDP and FSDP2 are counted by the same rules for torch's AdamW, whose moments take the weights' dtype.
* Activations saved for backward, following Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", arXiv:2205.05198, section 4.1) adapted to the families adapt supports:
  fused attention (SDPA/flash keeps no L x L scores; eager keeps the probabilities), grouped-query
  K/V, gated MLPs, no dropout. Per token and layer, in elements of the compute dtype:
  attention 4h + 2 x kv_width (norm input, normed input, Q, K, V, attention output), MLP 2h + 4i for a
  gated MLP (norm input, normed input, gate, up, activation, product) or 2h + 2i otherwise. Gradient
  checkpointing keeps only each layer's input (h) plus one layer's activations while it is recomputed
  (with the gradients of its MLP's widest tensors), which happens after the LM head's backward has
  freed the logits.
* The LM head and loss at their worst case, every position masked (t near 1): logits, the
  log-softmax cross-entropy keeps and their gradient, three V-wide rows per position in the compute
  dtype; while attention is annealed, the bool B x L x L mask and the float32 uniform draws it is cut from.
* What the recipe's diffusion settings add: block diffusion runs the noisy and the clean copy side by
  side (2L positions, a bool 2L x 2L block mask, L positions scored); complementary masks run every
  sequence twice; alignment (align.weight > 0) holds a whole frozen copy of the source's weights on
  every GPU and the outputs of its aligned layers. Measured against the prediction on CPU in tests/test_plan.py.

Time: PaLM-style model FLOPs (`adapt.flops.train_flops`, the LM head counted on the expected masked
half of the positions) over the GPUs' dense bf16 peak at an assumed model FLOPs utilisation, printed
with the result and set with --mfu.

The same estimate guards `adapt train` (and convert): `check_memory` refuses a micro-batch that clearly
cannot fit in the memory the device has free, in one line, before the data is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from .diffusion import DiffusionConfig
from .errors import UserError
from .mode import Mode
from .settings import at_least, between, check_settings

# Dense bf16 tensor-core peak (FLOP/s) and the memory CUDA reports for the 80 GB A100 and H100 and the H200.
GPUS = {"A100": (312.0e12, 81920 * 2**20), "H100": (989.4e12, 81559 * 2**20), "H200": (989.4e12, 143771 * 2**20)}
GPUS_PER_NODE = 8  # the usual node, when --nodes is not given
# A plan fits when it leaves this share of the GPU free: the CUDA context, NCCL buffers and the
# caching allocator's fragmentation, none of which the formulas count.
HEADROOM = 0.10
# Families whose MLP is up-projection, activation, down-projection (no gate).
UNGATED_MLP = {"gpt2", "gpt_neox", "gpt_neo", "gptj", "opt", "bloom", "falcon", "phi"}
UNITS = {"": 2**30, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}


@dataclass
class PlanSettings:
    """The hardware a recipe is planned for; `adapt plan` has one flag per setting."""

    gpus: int = field(default=8, metadata=at_least(1))  # GPUs in the whole run
    nodes: int | None = field(default=None, metadata=at_least(1))  # None: gpus / 8, at least 1
    gpu: Literal["A100", "H100", "H200"] = "H100"  # for its peak FLOP/s and, by default, its memory
    gpu_memory: str | None = None  # per GPU, e.g. "80GiB" or "141GB"; None: the named GPU's
    mfu: float = field(default=0.40, metadata=between(0.01, 1.0))  # assumed model FLOPs utilisation


@dataclass
class ModelShape:
    """What the plan needs to know about the model, read off the meta-device model."""

    model_type: str
    parameters: int  # tied weights once
    trainable: int  # all of them, or LoRA's
    largest_layer: int  # the most parameters held directly by one module (DeepSpeed's "largest layer")
    largest_block: int  # parameters of one decoder layer (what FSDP2 gathers at a time)
    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    heads: int
    vocab: int
    gated_mlp: bool
    tied: bool  # the output head is the input embedding matrix
    mode: Mode  # the kind of diffusion model the run makes: the layout of its training forward


def plan(recipe, settings: PlanSettings) -> dict:
    """Every figure of the plan, in bytes, seconds and counts (the JSON `adapt plan --json` writes)."""
    check_settings(settings)
    nodes, per_node = _layout(settings)
    peak_flops, default_memory = GPUS[settings.gpu]
    gpu_memory = parse_bytes(settings.gpu_memory) if settings.gpu_memory else default_memory
    model, shape = meta_model(recipe)
    states = model_states(recipe, shape, settings.gpus, per_node)
    fixed = sum(states["gpu"].values())
    budget = gpu_memory * (1 - HEADROOM)
    batch = recipe.train.batch_size
    gpu = {**states["gpu"], **activation_bytes(recipe, shape, batch)}
    total = sum(gpu.values())
    tokens_per_step = batch * recipe.train.grad_accum * settings.gpus * recipe.data.seq_len
    step_flops = _step_flops(model, recipe, shape.mode, settings.gpus)
    seconds = recipe.train.max_steps * step_flops / (settings.gpus * peak_flops * settings.mfu)
    return {
        "hardware": {"gpus": settings.gpus, "nodes": nodes, "gpus_per_node": per_node, "gpu": settings.gpu,
                     "gpu_memory_bytes": gpu_memory, "peak_flops": peak_flops, "mfu": settings.mfu},
        "model": {**asdict(shape), "mode": shape.mode.to_dict()},
        "backend": states["backend"],
        "per_gpu_bytes": {**gpu, "total": total},
        "deepspeed_model_states_estimate": states.get("deepspeed_gpu_estimate"),  # the rows' sum, by DeepSpeed
        "fits": total <= budget,
        "headroom": HEADROOM,
        "largest_micro_batch": largest_micro_batch(recipe, shape, budget - fixed),
        "per_node_cpu_bytes": states["cpu"],
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step * recipe.train.max_steps,
        "flops_per_step": step_flops,
        "seconds": seconds,
    }


def largest_micro_batch(recipe, shape: ModelShape, room: float) -> int:
    """The most sequences whose activations (and LM head, mask, ...) fit in `room` bytes."""
    return max(0, math.floor(room / sum(activation_bytes(recipe, shape, batch=1).values())))


def check_memory(recipe, model, device, processes: int, per_node: int) -> None:
    """Refuse a run whose micro-batch clearly cannot fit on `device` (this process's), before data is read.

    Called with the loaded `model` (so its path and config are known good; a ZeRO-3 slice or FSDP2's meta
    copy is measured whole), the weights already in memory: what the run still needs is the plan's estimate
    without them (gradients, optimizer states, the frozen copies of alignment and distillation, a
    micro-batch's activations), against what the device has free.
    """
    from .outputs import human_size

    shape = _shape(model, model.config, recipe)
    states = model_states(recipe, shape, processes, per_node)["gpu"]
    fixed = sum(states.values()) - states["weights"]
    batch, seq_len = recipe.train.batch_size, recipe.data.seq_len
    needed = fixed + sum(activation_bytes(recipe, shape, batch).values())
    available = available_memory(device)
    if needed <= available:
        return
    largest = largest_micro_batch(recipe, shape, available - fixed)
    fixes = [f"lower train.batch_size to {largest} and raise train.grad_accum to keep the tokens per step"
             if largest else "use a smaller model, lora.r > 0 or a device with more memory"]
    if not recipe.train.gradient_checkpointing:
        fixes.append("set train.gradient_checkpointing: true")
    raise UserError(f"train.batch_size = {batch} with data.seq_len = {seq_len} needs about {human_size(needed)} on "
                    f"{device} besides the loaded weights (adapt plan's estimate), but only {human_size(available)} "
                    f"is free; {', or '.join(fixes)}")


def available_memory(device) -> int:
    """Bytes still free on `device`: CUDA's own count for a GPU, else the RAM the system has available."""
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def _layout(settings: PlanSettings) -> tuple[int, int]:
    nodes = settings.nodes or max(1, settings.gpus // GPUS_PER_NODE)
    if settings.gpus % nodes:
        raise UserError(f"--gpus {settings.gpus} does not split evenly over --nodes {nodes}; "
                        "give a GPU count that is a multiple of the node count")
    return nodes, settings.gpus // nodes


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '81559MiB' or a bare number of GiB, as bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = found and UNITS.get(found.group(2).lower())
    if not unit or float(found.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r} is not an amount of memory; write it like 80GiB, 141GB or 81559MiB")
    return int(float(found.group(1)) * unit)


# ------------------------------------------------------------------------------------------- the model

def meta_model(recipe):
    """The recipe's model on the meta device (no weights read) and its `ModelShape`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .limits import max_positions

    config = read_config(recipe.model.path)
    limit = max_positions(config)
    if limit is not None and recipe.data.seq_len > limit:
        raise UserError(f"data.seq_len = {recipe.data.seq_len} exceeds the model's maximum positions ({limit}); "
                        f"set data.seq_len <= {limit}")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, recipe.model.dtype))
    return model, _shape(model, config, recipe)


def read_config(path: str):
    """The model's config from a config.json file, a folder holding one (weights not needed) or a Hub id."""
    from transformers import AutoConfig

    from .modeling import from_pretrained_args

    source, gguf = from_pretrained_args(path)
    try:
        return AutoConfig.from_pretrained(source, **gguf)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read the model config at {path!r} ({reason}); plan with the config alone: "
                        "model.path=path/to/config.json (e.g. recipes/models/llama2-7b/config.json)") from None


def _shape(model, config, recipe) -> ModelShape:
    from .structure import decoder_layers

    unique = {id(p): p for p in model.parameters()}
    parameters = sum(_numel(p) for p in unique.values())
    largest_layer = max(sum(_numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    blocks = decoder_layers(model)
    heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    embedding = model.get_input_embeddings().weight
    vocab = getattr(embedding, "ds_shape", embedding.shape)[0]
    if recipe.model.mask_token == "add":
        vocab = math.ceil((vocab + 1) / 64) * 64  # a new row, padded as `ensure_mask_token` pads it (at most)
    return ModelShape(
        model_type=config.model_type, parameters=parameters,
        trainable=_lora_parameters(model, recipe.lora) if recipe.lora.r > 0 else parameters,
        largest_layer=largest_layer, largest_block=sum(_numel(p) for p in blocks[0].parameters()),
        layers=config.num_hidden_layers, hidden=hidden,
        kv_width=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        heads=heads, vocab=vocab, gated_mlp=config.model_type not in UNGATED_MLP,
        tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        mode=recipe.diffusion.mode_for(DiffusionConfig.from_model_config(config)))


def _numel(parameter) -> int:
    """A parameter's whole size; ZeRO-3 leaves each process an empty slice and records the whole in `ds_numel`."""
    return getattr(parameter, "ds_numel", parameter.numel())


def _lora_parameters(model, lora) -> int:
    """r x (in + out) for every adapted linear layer (all but the LM head unless target_modules names them)."""
    from torch import nn

    head = model.get_output_embeddings()
    count = 0
    for name, module in model.named_modules():
        targeted = (name.rsplit(".", 1)[-1] in lora.target_modules) if lora.target_modules else module is not head
        if isinstance(module, nn.Linear) and targeted:
            count += lora.r * (module.in_features + module.out_features)
    return count


# -------------------------------------------------------------------------------------- model states

def model_states(recipe, shape: ModelShape, gpus: int, per_node: int) -> dict:
    """Per-GPU bytes of weights, gradients and optimizer states, and per-node CPU bytes: the memory model of
    the backend that runs the recipe on `gpus` GPUs (adapt/train/backends.py), and the frozen copies of
    alignment's source and distillation's teacher (whole on every GPU)."""
    from .train.backends import choose_backend

    backend = choose_backend(recipe, gpus)
    states = backend.model_states(recipe, shape, gpus, per_node)
    if recipe.align.weight > 0:  # the frozen source of the alignment term: a whole copy on every GPU
        states["gpu"]["alignment_source"] = recipe.model.dtype_bytes() * shape.parameters
    if recipe.distill.weight > 0:
        states["gpu"]["distill_teacher"] = recipe.model.dtype_bytes() * _teacher_parameters(recipe, shape)
    return {"backend": backend.plan_entry(recipe), **states}


def _teacher_parameters(recipe, shape: ModelShape) -> int:
    """The teacher's parameters: the source's, or those of distill.teacher's config (no weights read)."""
    if recipe.distill.teacher is None:
        return shape.parameters
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        teacher = AutoModelForCausalLM.from_config(read_config(recipe.distill.teacher), dtype=torch.float32)
    return sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values())


# ---------------------------------------------------------------------------------------- activations

def forward_shape(recipe, mode: Mode, batch: int) -> tuple[int, int, int]:
    """(rows, positions, tokens per row) of one micro-batch's forward: complementary masks run each
    sequence twice; the mode says how many positions a sequence's forward runs (block diffusion and
    hybrid: two copies side by side, 2L)."""
    rows = batch * (2 if recipe.diffusion.complementary_masks else 1)
    return rows, mode.forward_positions(recipe.data.seq_len), recipe.data.seq_len


def activation_bytes(recipe, shape: ModelShape, batch: int) -> dict:
    """Bytes of activations, LM head, attention mask and alignment of one micro-batch of `batch` sequences."""
    train = recipe.train
    rows, length, tokens_per_row = forward_shape(recipe, shape.mode, batch)
    element = 2 if train.mixed_precision != "no" or recipe.model.dtype != "float32" else 4
    h, i = shape.hidden, shape.intermediate
    per_layer = 4 * h + 2 * shape.kv_width + (4 * i if shape.gated_mlp else 2 * i) + 2 * h
    if recipe.model.attn_implementation == "eager":
        per_layer += shape.heads * length  # the attention probabilities
    tokens = rows * length
    lm_head = int(3 * rows * shape.mode.head_positions(tokens_per_row, 1.0) * shape.vocab)  # every position masked
    if train.gradient_checkpointing:
        # A layer is recomputed only after the head's backward has freed the logits, so the two peaks
        # never add up: the layer needs only what it uses beyond the head's share. Its backward adds the
        # gradients of the MLP's widest tensors (gate and up, or the up-projection) and of its output.
        recomputed = per_layer + (2 * i if shape.gated_mlp else i) + h
        saved = tokens * shape.layers * h + max(0, tokens * recomputed - lm_head)
    else:
        saved = tokens * shape.layers * per_layer
    mask = shape.mode.attention_mask_bytes(rows, recipe.data.seq_len)
    result = {"activations": element * saved, "lm_head": element * lm_head, "attention_mask": mask}
    if recipe.align.weight > 0:  # the aligned layers' outputs of the frozen source's no-grad forward
        result["alignment_states"] = element * rows * tokens_per_row * h * len(recipe.align.layers)
    if recipe.distill.weight > 0:  # the teacher's logits at every masked position, and their float32 softmax
        result["teacher_logits"] = (element + 4) * rows * tokens_per_row * shape.vocab
    return result


def _step_flops(model, recipe, mode: Mode, gpus: int) -> float:
    from .flops import train_flops

    train = recipe.train
    rows, length, tokens_per_row = forward_shape(recipe, mode, train.batch_size)
    low, high = recipe.diffusion.noise_band
    expected_masked = (low + high) / 2  # t ~ U(t_min, t_max) masks each position with probability t
    micro = train_flops(model, (rows, length), rows * mode.head_positions(tokens_per_row, expected_masked))
    if recipe.align.weight > 0:  # the frozen source's forward on the clean input: a third of a train step
        micro += train_flops(model, (train.batch_size, tokens_per_row), train.batch_size * tokens_per_row) / 3
    return micro * train.grad_accum * gpus


# ----------------------------------------------------------------------------------------------- report

ROW_NOTES = {
    "weights": "weights (gathered layers included)",
    "gradients": "gradients",
    "optimizer": "optimizer states (fp32 master + Adam moments)",
    "activations": "activations saved for backward",
    "lm_head": "LM head + loss, all positions masked",
    "attention_mask": "attention mask (annealing or block)",
    "alignment_states": "aligned layers' outputs of the frozen source",
    "alignment_source": "frozen source weights (align.weight > 0)",
    "distill_teacher": "frozen teacher weights (distill.weight > 0)",
    "teacher_logits": "teacher logits at the masked positions",
}


def format_plan(result: dict, recipe_path: str) -> str:
    from .train.backends import BACKENDS

    hw, shape, backend = result["hardware"], result["model"], result["backend"]
    gib = 2**30
    lines = [f"adapt plan: {recipe_path} on {hw['gpus']} x {hw['gpu']} ({hw['gpu_memory_bytes'] / gib:.1f} GiB), "
             f"{hw['nodes']} node(s) x {hw['gpus_per_node']}",
             f"model: {shape['model_type']}, {shape['parameters'] / 1e9:.2f}B parameters "
             f"({shape['trainable'] / 1e9:.3f}B trainable), largest layer {shape['largest_layer'] / 1e6:.0f}M",
             f"backend: {BACKENDS[backend['name']].describe(backend)}", "", f"{'per GPU':<48}{'GiB':>8}"]
    for key, value in result["per_gpu_bytes"].items():
        if key != "total":
            lines.append(f"  {ROW_NOTES[key]:<46}{value / gib:>8.2f}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines += [f"  {'total':<46}{result['per_gpu_bytes']['total'] / gib:>8.2f}  {verdict} "
              f"(limit {1 - result['headroom']:.0%} of the GPU)",
              f"  largest micro-batch that fits: {result['largest_micro_batch']}", ""]
    for key, value in result["per_node_cpu_bytes"].items():
        note = ("DeepSpeed's estimate: offloaded states, x1.5 buffer" if key == "deepspeed"
                else "every process loads the model")
        lines.append(f"per node CPU RAM: {value / gib:.1f} GiB ({note})")
    days = result["seconds"] / 86400
    lines += [f"tokens per step: {result['tokens_per_step']:,}; run: {result['tokens'] / 1e9:.2f}B tokens",
              f"time: {result['seconds'] / 3600:,.1f} h ({days:.1f} days) at an assumed {hw['mfu']:.0%} MFU of "
              f"{hw['gpu']}'s {hw['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 ({result['flops_per_step']:.3g} "
              "FLOP per step; --mfu to change)"]
    if backend.get("offload_params"):
        lines.append("  parameters offloaded to CPU cross PCIe in every forward and backward: expect an MFU well "
                     "below a GPU-resident run's")
    return "\n".join(lines)
