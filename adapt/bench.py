"""`adapt bench`: what diffusion costs next to the causal-LM work it replaces, measured side by side.

Each figure is a ratio against its baseline measured in the same process and run. The measurements are
interleaved (one of each configuration in turn, the round repeated) so that load from other processes
hits both sides alike; medians are reported with the spread seen across the repeats. Each measurement
records wall-clock time and the process's CPU time: on a machine crowded by other work the CPU time
(all threads of this process) moves far less with the load than the wall clock, so both ratios are given.

* train: one optimizer step (forward, backward, AdamW) under the diffusion objective at attention
  ratio 1 and 0.5, against the causal-LM step a user would run: `model(input_ids, labels=input_ids)`.
* sampling: tokens/s of the diffusion sampler (fixed steps; threshold decoding under each cache mode;
  the same model sampled as a block model) against the source model's `generate` with its KV cache
  (exactly `length` new tokens), at the same batch size and temperature, with tokens per forward and
  the quality of the very samples timed (`adapt.evaluate.samples`: generative perplexity under the
  model as a causal LM, unigram entropy).
* elbo: tokens/s of `adapt.elbo_nll`, counted per Monte Carlo pass, against the AR model's exact
  log-likelihood forward on the same tokens.

Peak memory. On CUDA: `torch.cuda.max_memory_allocated` over the step. On CPU torch keeps no allocator
statistics and the process RSS hides what a step allocates (malloc keeps freed pages, the high-water
mark never comes down), so the step runs once more under `torch.profiler` with `profile_memory=True`,
which reports every allocation and free of torch's CPU allocator; the running sum gives the step's
peak above what was held before it. What was held (weights and optimizer state; gradients are freed
between steps) is added from the tensors themselves, so the total is comparable with the CUDA figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from .atomic import write_text_atomically
from .attention import PARTIAL_MASK_IMPLEMENTATIONS, set_attention
from .bidirectional import BidirectionalMode
from .block import BlockMode
from .hybrid import HybridMode
from .diffusion import DiffusionConfig, diffusion_loss, elbo_nll
from .errors import UserError
from .flags import shown
from .flops import train_flops
from .limits import check_context
from .sampling import MAX_NUM_SAMPLES
from .settings import above, at_least, between, check_settings
from .strict_json import to_json
from .timing import timed

# Where `python scripts/prepare_smollm2.py --out data/smollm2` puts SmolLM2-135M.
SMOLLM2_PATH = "data/smollm2"
# Dense bf16 tensor-core peak in TFLOP/s, for model FLOPs utilisation (no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
TRAIN_RATIOS = (1.0, 0.5)


# The settings whose default depends on `quick` (None in BenchSettings): (full run, quick run).
BY_RUN_LENGTH = {"repeats": (5, 2), "sample_length": (256, 64), "sample_steps": ([32, 64], [8, 16])}
# Measured rounds of one configuration: the median of this many is as steady as timing gets, and more only
# makes the run longer (each round is a full train step, ELBO call or sampling run).
MAX_REPEATS = 100


def _by_run_length(name: str, help: str, most: int | None = None) -> dict:
    """The metadata of a count whose default is in BY_RUN_LENGTH: its help shows both defaults; at most `most`."""
    full, quick = map(shown, BY_RUN_LENGTH[name])
    return {"help": f"{help} (default: {full}, --quick {quick})", **(between(1, most) if most else at_least(1))}


@dataclass
class BenchSettings:
    """What `run` measures and how often; `adapt bench` has one flag per setting (--seq-len for seq_len),
    whose help is the field's (`adapt.flags`). The counts must be at least 1, checked when the settings
    are made."""

    model: str = field(default="smollm2", metadata={
        "help": "a local model folder, 'smollm2' (the prepared SmolLM2-135M), 'llama-1b' (a randomly initialised "
                "Llama-3.2-1B-shaped model, for GPU MFU) or tiny-<family>"})
    dtype: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "weights and compute dtype; auto: bf16 where the device computes it natively, else fp32 (the "
                "choice and its reason are printed)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    attn: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = field(default="sdpa", metadata={
        "help": "attention implementation, printed with the results (flex_attention takes the explicit masks as "
                "block-sparse FlexAttention masks; flash_attention_2 cannot run ratio 0.5, that row is skipped)"})
    batch: int = field(default=4, metadata={"help": "training and ELBO batch size", **between(1, MAX_NUM_SAMPLES)})
    # checked against the model's positions once it is loaded (`check_context`)
    seq_len: int = field(default=256, metadata={"help": "training and ELBO sequence length", **at_least(1)})
    repeats: int | None = field(default=None, metadata=_by_run_length(
        "repeats", "measured rounds of the train and ELBO configurations", MAX_REPEATS))
    sample_length: int | None = field(default=None, metadata=_by_run_length("sample_length", "tokens to sample"))
    sample_steps: list[int] | None = field(default=None, metadata=_by_run_length(
        "sample_steps", "diffusion steps to sample with"))
    sample_batch: list[int] = field(default_factory=lambda: [1, 8], metadata={
        "help": "sampling batch sizes", **between(1, MAX_NUM_SAMPLES)})
    sample_repeats: int = field(default=1, metadata={"help": "measured rounds of sampling",
                                                     **between(1, MAX_REPEATS)})
    sample_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.7], metadata={
        "help": "threshold decoding rows, one per threshold, under each cache mode and as a block model",
        "may_be_empty": True})
    sample_block_size: int = field(default=32, metadata={
        "help": "blocks of the threshold rows: the sampler's for the bidirectional model, the block model's own",
        **at_least(1)})
    elbo_samples: int = field(default=4, metadata={"help": "Monte Carlo samples per ELBO call",
                                                   **between(1, MAX_NUM_SAMPLES)})
    train_block_sizes: list[int] = field(default_factory=lambda: [32], metadata={
        "help": "block diffusion train steps measured beside the bidirectional ones, one per block size",
        "may_be_empty": True})
    parts: list[Literal["train", "sampling", "elbo"]] = field(
        default_factory=lambda: ["train", "sampling", "elbo"], metadata={"help": "what to measure"})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "the device's peak TFLOP/s in this dtype, for MFU (default: known for "
                f"{', '.join(PEAK_BF16_TFLOPS)})", **above(0)})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch (default: torch's choice); 1 is faster on a crowded machine", **at_least(1)})
    quick: bool = field(default=False, metadata={
        "help": "fewer repeats and shorter sampling: a smoke run (CI, under 2 minutes with a tiny model)"})

    def __post_init__(self):
        check_settings(self)


def run(settings: BenchSettings) -> dict:
    """Run the parts of the benchmark that `settings` asks for and return the results as a plain dict."""
    settings = _resolved(settings)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = _device(settings.device)
    dtype_name, dtype_reason = native_dtype(device) if settings.dtype == "auto" else (settings.dtype, "--dtype")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, tokenizer, source = load_bench_model(settings.model, dtype, device, settings.attn)
    _check_lengths(settings, model, tokenizer)
    _log(f"dtype {dtype_name} ({dtype_reason})")  # once the model has loaded: bad input stays one line
    config = _diffusion_config(model, tokenizer)
    vocab = config.vocab_size or model.get_input_embeddings().weight.shape[0]  # never an alignment padding row
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, vocab, (settings.batch, settings.seq_len), generator=generator, device=device)

    results = {
        "model": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype_name,
        "dtype_reason": dtype_reason,
        "attention": model.config._attn_implementation,
        "batch": settings.batch,
        "seq_len": settings.seq_len,
        "repeats": settings.repeats,
        "hardware": hardware(device),
        "torch": torch.__version__,
    }
    peak_tflops = settings.peak_tflops or _known_peak_tflops(device, dtype)
    if "train" in settings.parts:
        _log("train step ...")
        results["train"] = bench_train(model, config, ids, repeats=settings.repeats, peak_tflops=peak_tflops,
                                       block_sizes=settings.train_block_sizes)
    if "elbo" in settings.parts:
        _log("ELBO ...")
        results["elbo"] = bench_elbo(model, config, ids, repeats=settings.repeats, n_samples=settings.elbo_samples)
    if "sampling" in settings.parts:
        _log("sampling ...")
        results["sampling"] = bench_sampling(model, tokenizer, config, length=settings.sample_length,
                                             steps=settings.sample_steps, batches=settings.sample_batch,
                                             repeats=settings.sample_repeats, thresholds=settings.sample_thresholds,
                                             block_size=settings.sample_block_size)
    return results


def _check_lengths(settings: BenchSettings, model, tokenizer) -> None:
    """The sequences the parts will build, against the model's positions, before any part runs."""
    from .sampling import context_ids

    check_context(model.config, settings.seq_len, "--seq-len (the train and ELBO sequence length)", overridable=False)
    if "sampling" in settings.parts:
        length = len(context_ids(tokenizer, None)) + settings.sample_length  # the start bench_sampling puts first
        check_context(model.config, length, f"--sample-length: the start and {settings.sample_length:,} tokens",
                      overridable=False)


def _resolved(settings: BenchSettings) -> BenchSettings:
    """`settings` with the run-length defaults filled in."""
    unset = {name: by_length[settings.quick] for name, by_length in BY_RUN_LENGTH.items()
             if getattr(settings, name) is None}
    settings = dataclasses.replace(settings, **unset)
    from .sampling import SamplingOptions

    for threshold in settings.sample_thresholds:  # refused now, not after the model has loaded
        SamplingOptions(threshold=threshold)
    return settings


# ---------------------------------------------------------------------------------------------- models

def load_bench_model(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    """(model, tokenizer, description) for a preset name or a local folder, in train mode on `device`."""
    from .presets import FAMILIES, tiny_model, tiny_tokenizer

    if name.startswith("tiny-"):
        family = name.removeprefix("tiny-")
        if family not in FAMILIES:
            raise UserError(f"unknown preset {name!r}; choose tiny-<family> with family one of {', '.join(FAMILIES)}")
        model, tokenizer = tiny_model(family, attn_implementation=attn if attn != "sdpa" else None), tiny_tokenizer()
    elif name == "llama-1b":
        model, tokenizer = _llama_1b(attn), _tokenizer_for_random_model()
    else:
        from .modeling import load_model

        path = SMOLLM2_PATH if name == "smollm2" else name
        if not Path(path).exists():
            hint = f" (python scripts/prepare_smollm2.py --out {SMOLLM2_PATH})" if name == "smollm2" else ""
            raise UserError(f"model not found: {path}{hint}; pass a local model folder or a preset "
                            "(smollm2, llama-1b, tiny-<family>)")
        model, tokenizer = load_model(path, dtype=dtype, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).train(), tokenizer, name


def _llama_1b(attn: str):
    """Random-init model of Llama 3.2 1B's shape (1.24 B parameters); throughput does not need weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=500_000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def _tokenizer_for_random_model():
    """Only decoding needs a tokenizer here; ids it does not know decode to nothing."""
    from .presets import tiny_tokenizer

    return tiny_tokenizer()


def _diffusion_config(model, tokenizer) -> DiffusionConfig:
    """The model's own diffusion settings, or a mask token reused from the vocabulary.

    Reusing an id keeps the vocabulary, and so every shape, identical to the causal baseline's.
    """
    from .modeling import ensure_mask_token

    config = DiffusionConfig.from_model_config(model.config)
    if config is None or config.mask_token_id is None:
        reuse = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else model.config.vocab_size - 1
        ensure_mask_token(model, tokenizer, "reuse", token_id=reuse)
        config = DiffusionConfig.from_model_config(model.config)
    return config


# ----------------------------------------------------------------------------------------------- train

def bench_train(model, config: DiffusionConfig, ids: torch.Tensor, *, repeats: int, peak_tflops: float | None,
                block_sizes: list[int] = ()) -> dict:
    """Median step time and peak memory of causal-LM training, of diffusion training per ratio and of
    block diffusion training per block size (its forward runs over the noisy and the clean copy, 2L)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mask_generator = torch.Generator(device=ids.device).manual_seed(0)  # the annealed attention masks
    scored: dict[str, list[int]] = {}  # positions the LM head ran on, per configuration
    losses = _train_losses(model, config, ids, block_sizes, scored)

    def timed_step(ratio, loss_fn):
        def step():
            set_attention(model, ratio, generator=mask_generator)
            return timed(ids.device, lambda: _optimizer_step(optimizer, loss_fn))
        return step

    times = interleave({name: timed_step(*spec) for name, spec in losses.items()}, repeats=repeats, warmup=1)
    held = _held_bytes(model, optimizer)
    results = {}
    for name, (ratio, loss_fn) in losses.items():
        set_attention(model, ratio, generator=mask_generator)
        step_peak = peak_step_memory(ids.device, lambda: _optimizer_step(optimizer, loss_fn))
        results[name] = {
            "ratio": ratio,
            **_summary(times[name]),
            "peak_bytes": held + step_peak,
            "step_peak_bytes": step_peak,
            "head_positions": statistics.mean(scored[name]),
        }
        if peak_tflops:
            flops = train_flops(model, ids.shape, statistics.mean(scored[name]))
            results[name]["mfu"] = flops / results[name]["median_s"] / (peak_tflops * 1e12)
    set_attention(model, 0.0)
    return _against_causal(results)


def _train_losses(model, config: DiffusionConfig, ids: torch.Tensor, block_sizes: list[int], scored: dict) -> dict:
    """name -> (attention ratio, loss function) of each training configuration; each call of a loss
    function appends to `scored[name]` the positions the LM head ran on."""

    def causal_loss():
        scored.setdefault("causal", []).append(ids.numel())
        return model(input_ids=ids, labels=ids).loss

    def diffusion(name, mode):
        # Each configuration draws the same noise levels and masks, step for step: the head then runs on the
        # same number of positions in each, and only the attention (and a block model's clean copy) differs.
        noise = torch.Generator(device=ids.device).manual_seed(0)
        run_config = dataclasses.replace(config, mode=mode)

        def loss():
            out = diffusion_loss(model, ids, run_config, generator=noise)
            # a hybrid's AR head also runs on every clean position but a row's first (no padding here)
            ar_positions = 0 if out.ar_ce is None else out.num_tokens - ids.shape[0]
            scored.setdefault(name, []).append(out.num_masked + ar_positions)
            return out.loss
        return loss

    losses = {"causal": (0.0, causal_loss)}
    for ratio in TRAIN_RATIOS:
        if 0 < ratio < 1 and model.config._attn_implementation not in PARTIAL_MASK_IMPLEMENTATIONS:
            continue  # flash attention takes no partial mask; set_attention refuses it
        losses[f"diffusion_r{ratio:g}"] = (ratio, diffusion(f"diffusion_r{ratio:g}", BidirectionalMode()))
    if model.config._attn_implementation in PARTIAL_MASK_IMPLEMENTATIONS:  # the block mask is an explicit one
        for block_size in block_sizes:  # as a block model, and as a hybrid drafting blocks of that size
            for name, mode in ((f"block_b{block_size}", BlockMode(block_size)),
                               (f"hybrid_d{block_size}", HybridMode(block_size))):
                losses[name] = (mode.attention_ratio(1.0), diffusion(name, mode))
    return losses


def _against_causal(results: dict) -> dict:
    """Each row's time and memory as ratios to the causal row's."""
    causal = results["causal"]
    for row in results.values():
        row["time_ratio"] = row["median_s"] / causal["median_s"]
        row["cpu_time_ratio"] = row["cpu_median_s"] / causal["cpu_median_s"]
        row["memory_ratio"] = row["peak_bytes"] / causal["peak_bytes"]
        row["step_memory_ratio"] = row["step_peak_bytes"] / causal["step_peak_bytes"]
    return results


def _optimizer_step(optimizer, loss_fn) -> None:
    loss_fn().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -------------------------------------------------------------------------------------------- sampling

def sampling_methods(length: int, steps: list[int], thresholds: list[float], block_size: int, *, own=None,
                     explicit_masks: bool = True) -> dict[str, tuple]:
    """name -> (the model's mode, steps, `SamplingOptions`) of each way of sampling.

    A model with an AR head (`own`, its mode: hybrid) is measured as it decodes,
    `verify_{groups}_t{temperature}`: its drafts verified by its AR head, one draft group a forward or one
    per acceptance count, greedy and at temperature 1 (its other rows would read it as another kind of
    model, which its drafts were not trained as). Otherwise:

    `diffusion_s{S}`: S steps, one block. For each threshold T (`steps` = `length`, an upper bound):
    `threshold{T}_{cache}`, the bidirectional model in sampler blocks of `block_size` under each cache
    that applies to it, and `block{B}_threshold{T}_{cache}`, the same model sampled as a block model with
    blocks of B = `block_size` under each of its caches. `hybrid{B}_verify_{groups}`: the same weights
    read as a hybrid model with drafts of B, its drafts verified by its AR head (untrained drafts are
    rarely accepted: what a verifying forward costs beside an AR step). The approximate caches, the
    block and the hybrid model pass explicit attention masks: without `explicit_masks` (flash attention)
    their rows are left out.
    """
    from .bidirectional import APPROXIMATE_CACHES
    from .sampling import CACHES, SamplingOptions
    from .speculative import DRAFT_GROUPS

    if own is not None and own.has_ar_head:
        return {f"verify_{groups}_t{temperature:g}": (own, None, SamplingOptions(draft_groups=groups,
                                                                               temperature=temperature, seed=0))
                for groups in DRAFT_GROUPS for temperature in (0.0, 1.0)}

    # A bidirectional model has no exact cache: "exact" reuses nothing there, the computation of "none".
    bidirectional = ("none", *APPROXIMATE_CACHES) if explicit_masks else ("none",)
    blockwise = [cache for cache in CACHES if cache not in APPROXIMATE_CACHES] if explicit_masks else []
    one_block, blocks = BidirectionalMode(), BlockMode(block_size)
    methods = {f"diffusion_s{s}": (one_block, s, SamplingOptions(seed=0)) for s in steps}
    for threshold in thresholds:
        for cache in bidirectional:
            methods[f"threshold{threshold:g}_{cache}"] = (
                one_block, length, SamplingOptions(threshold=threshold, block_size=block_size, cache=cache, seed=0))
        for cache in blockwise:
            methods[f"block{block_size}_threshold{threshold:g}_{cache}"] = (
                blocks, length, SamplingOptions(threshold=threshold, cache=cache, seed=0))
    if explicit_masks:
        methods.update({f"hybrid{block_size}_verify_{groups}": (HybridMode(block_size), None,
                                                               SamplingOptions(draft_groups=groups, seed=0))
                        for groups in DRAFT_GROUPS})
    return methods


@torch.no_grad()
def bench_sampling(model, tokenizer, config: DiffusionConfig, *, length: int, steps: list[int], batches: list[int],
                   repeats: int, thresholds: list[float], block_size: int) -> list[dict]:
    """Tokens/s, tokens per forward and quality of each way of sampling (`sampling_methods`) per batch size,
    against the same model's KV-cached `generate` at the same length, batch and temperature (1, the
    sampler's default; exactly `length` tokens). No run stops early at EOS: every run does the same work."""
    from .evaluate.samples import ar_generate
    from .sampling import SamplingOptions, context_ids, denoise, draft_and_verify, generate, verifies

    model.eval()
    device = model.device
    start = context_ids(tokenizer, None)  # BOS (or the anchor token) on both sides
    methods = sampling_methods(length, steps, thresholds, block_size, own=config.mode,
                               explicit_masks=model.config._attn_implementation in PARTIAL_MASK_IMPLEMENTATIONS)
    ar_options = SamplingOptions()

    def autoregressive(batch):
        prompt = torch.tensor([start] * batch, device=device)

        def run():
            set_attention(model, 0.0)
            return timed(device, lambda: ar_generate(model, prompt, length=length, options=ar_options, seed=0,
                                                     tokenizer=tokenizer, fixed_length=True))
        return run

    def diffusion(mode, n_steps, options, batch):
        ids = torch.tensor([start + [config.mask_token_id] * length] * batch, device=device)
        fill = torch.zeros_like(ids, dtype=torch.bool)
        fill[:, len(start):] = True
        as_mode = dataclasses.replace(config, mode=mode)

        def sample():
            if verifies(as_mode, options):
                return draft_and_verify(model, ids[:, :len(start)], as_mode, length, None, options)
            return denoise(model, ids, fill, as_mode, steps=n_steps, options=options)

        def run():
            set_attention(model, mode.attention_ratio(1.0))  # the ratio a trained model of this mode samples at
            return timed(device, sample)
        return run

    runs = {}
    for b in batches:
        runs[f"ar_b{b}"] = autoregressive(b)
        runs.update({f"{name}_b{b}": diffusion(*method, b) for name, method in methods.items()})
    # Warm-up on a short run of each kind: first calls pay one-off costs (allocations, kernel choices).
    set_attention(model, 0.0)
    ar_generate(model, torch.tensor([start], device=device), length=4, options=ar_options, seed=0, tokenizer=tokenizer)
    set_attention(model, 1.0)
    generate(model, tokenizer, length=8, steps=2, seed=0, decoding="diffusion")
    times = interleave(runs, repeats=repeats, warmup=0)
    set_attention(model, 0.0)
    rows = [_sampling_row(model, tokenizer, name, method, batch=b, start=start, length=length,
                          timings=times[f"{name}_b{b}"], ar_timings=times[f"ar_b{b}"])
            for b in batches for name, method in {"ar": (None, None, ar_options), **methods}.items()]
    model.train()
    return rows


def _sampling_row(model, tokenizer, name: str, method: tuple, *, batch: int, start: list[int], length: int,
                  timings: list[tuple], ar_timings: list[tuple]) -> dict:
    """One way of sampling at one batch size: its speed against AR and the quality of its last samples,
    scored by the model itself as a causal LM (`adapt.evaluate.samples.quality`)."""
    from .evaluate.samples import Sample, quality, text_tokens

    mode, n_steps, options = method
    measured, ar = _summary(timings), _summary(ar_timings)
    out = timings[-1][2]  # what the last measured run drew
    ids, forwards = (out, out.shape[1]) if name == "ar" else (out.ids[:, len(start):], out.forwards)
    samples = [Sample(start, text_tokens(row, tokenizer.eos_token_id), length, forwards, measured["median_s"])
               for row in ids.tolist()]
    rate, ar_rate = batch * length / measured["median_s"], batch * length / ar["median_s"]
    return {"name": name, "batch": batch, "length": length, "steps": n_steps, "threshold": options.threshold,
            "cache": None if name == "ar" else options.cache, "block_size": options.block_size,
            "model_mode": None if mode is None else mode.to_dict(), "tokens_per_s": rate, "ar_tokens_per_s": ar_rate, "speedup": rate / ar_rate,
            "cpu_speedup": ar["cpu_median_s"] / measured["cpu_median_s"], "tokens_per_forward": length / forwards,
            **quality(model, samples), "spread": measured["spread"], "ar_spread": ar["spread"]}


# ------------------------------------------------------------------------------------------------ elbo

@torch.no_grad()
def bench_elbo(model, config: DiffusionConfig, ids: torch.Tensor, *, repeats: int, n_samples: int) -> dict:
    """Tokens/s of the Monte Carlo ELBO (each pass counted) against the AR model's exact NLL forward."""
    model.eval()
    generator = torch.Generator(device=ids.device).manual_seed(0)

    def ar():
        set_attention(model, 0.0)
        return timed(ids.device, lambda: model(input_ids=ids, labels=ids).loss)

    def elbo():
        set_attention(model, 1.0)
        return timed(ids.device, lambda: elbo_nll(model, ids, config, n_samples=n_samples, generator=generator))

    times = interleave({"ar": ar, "elbo": elbo}, repeats=repeats, warmup=1)
    set_attention(model, 0.0)
    model.train()
    elbo_time, ar_time = _summary(times["elbo"]), _summary(times["ar"])
    rate = ids.numel() * n_samples / elbo_time["median_s"]
    ar_rate = ids.numel() / ar_time["median_s"]
    return {"n_samples": n_samples, "tokens_per_s": rate, "ar_tokens_per_s": ar_rate, "ratio": rate / ar_rate,
            "cpu_ratio": n_samples * ar_time["cpu_median_s"] / elbo_time["cpu_median_s"],
            "spread": elbo_time["spread"], "ar_spread": ar_time["spread"]}


# ------------------------------------------------------------------------------------------- measuring

def interleave(runs: dict[str, Callable[[], tuple]], *, repeats: int, warmup: int) -> dict[str, list[tuple]]:
    """Call each run once per round, in turn; `warmup` rounds are discarded. Each run returns its timing."""
    times: dict[str, list[tuple]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run_once in runs.items():
            seconds = run_once()
            if round_ >= warmup:
                times[name].append(seconds)
        _log(f"  round {round_ + 1}/{warmup + repeats}: " + ", ".join(f"{n} {t[-1][0]:.2f}s" for n, t in times.items() if t))
    return times


def _summary(timings: list[tuple]) -> dict:
    """Median and spread of the wall-clock times of `timings` (each as `timed` returns it), CPU times too."""
    wall = [t[0] for t in timings]
    cpu = [t[1] for t in timings]
    median = statistics.median(wall)
    return {"median_s": median, "times_s": wall, "spread": (max(wall) - min(wall)) / median,
            "cpu_median_s": statistics.median(cpu), "cpu_times_s": cpu}


def peak_step_memory(device: torch.device, step: Callable[[], None]) -> int:
    """Bytes allocated at the step's peak above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Allocations are positive, frees negative; frees of tensors made before the profile began are not
    # reported (their size is unknown to it), so the running sum starts at zero.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _held_bytes(model, optimizer) -> int:
    """Weights and optimizer state: what every step starts from (gradients are freed between steps)."""
    tensors = {id(p): p for p in model.parameters()}
    for state in optimizer.state.values():
        tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but torch sees no CUDA GPU; pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported by the bench; pass cpu or cuda")
    return device


def native_dtype(device: torch.device) -> tuple[str, str]:
    """The dtype the bench runs in unless told (`--dtype auto`), and why: bf16 where the device computes it
    natively, else fp32 (a CPU without bf16 instructions emulates it, about 26x slower than fp32)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} computes bf16 natively"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16"
    from .train import backends

    if backends.cpu_has_native_bf16():
        return "bf16", "auto: this CPU computes bf16 natively (AVX512-BF16 or AMX, or not x86)"
    return "fp32", ("auto: this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated (about 26x slower); "
                    "--dtype bf16 to measure it anyway")


def _known_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for gpu, tflops in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "cpu": _cpu_name(),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()[0]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- report

def format_table(results: dict) -> str:
    """The results as plain-text tables, one per part, ratios against the baseline in the last column."""
    hw = results["hardware"]
    lines = [f"{results['model']} ({results['parameters'] / 1e6:.1f} M parameters), {results['dtype']}, "
             f"{results['attention']}, batch {results['batch']} x {results['seq_len']}, on {hw.get('gpu', hw['cpu'])} "
             f"({hw['cpu_threads']} torch threads), medians of {results['repeats']} interleaved repeats"]
    if "train" in results:
        lines += ["", f"{'train step':<16}{'median s':>10}{'spread':>8}{'peak MiB':>10}{'step MiB':>10}"
                      f"{'head rows':>10}{'time ratio':>12}{'cpu ratio':>11}{'mem ratio':>11}{'step mem':>10}" + ("   MFU" if _has_mfu(results) else "")]
        for name, row in results["train"].items():
            lines.append(f"{name:<16}{row['median_s']:>10.3f}{row['spread']:>8.0%}{row['peak_bytes'] / 2**20:>10.0f}"
                         f"{row['step_peak_bytes'] / 2**20:>10.0f}{row['head_positions']:>10.0f}{row['time_ratio']:>12.3f}"
                         f"{row['cpu_time_ratio']:>11.3f}"
                         f"{row['memory_ratio']:>11.3f}{row['step_memory_ratio']:>10.3f}"
                         + (f"{row['mfu']:>6.1%}" if "mfu" in row else ""))
    if "sampling" in results:
        length = results["sampling"][0]["length"]
        lines += ["", f"{'sampling, length ' + str(length):<30}{'batch':>6}{'tok/s':>10}{'AR tok/s':>10}{'speedup':>9}"
                      f"{'cpu':>7}{'tok/fwd':>9}{'gen ppl':>10}{'entropy':>9}{'spread':>8}"]
        for row in results["sampling"]:
            lines.append(f"{row['name']:<30}{row['batch']:>6}{row['tokens_per_s']:>10.1f}{row['ar_tokens_per_s']:>10.1f}"
                         f"{row['speedup']:>9.2f}{row['cpu_speedup']:>7.2f}{row['tokens_per_forward']:>9.2f}"
                         f"{row['gen_perplexity']:>10.1f}{row['entropy']:>9.2f}{row['spread']:>8.0%}")
    if "elbo" in results:
        row = results["elbo"]
        lines += ["", f"{'ELBO':<16}{'samples':>8}{'tok/s':>10}{'AR tok/s':>10}{'ratio':>8}{'cpu':>7}{'spread':>8}",
                  f"{'per MC pass':<16}{row['n_samples']:>8}{row['tokens_per_s']:>10.0f}{row['ar_tokens_per_s']:>10.0f}"
                  f"{row['ratio']:>8.3f}{row['cpu_ratio']:>7.3f}{row['spread']:>8.0%}"]
    return "\n".join(lines)


def _has_mfu(results: dict) -> bool:
    return any("mfu" in row for row in results.get("train", {}).values())


def write_report(results: dict, json_path: str | None) -> None:
    table = format_table(results)
    if json_path == "-":
        print(table, file=sys.stderr)
        print(json.dumps(to_json(results), indent=2))
        return
    print(table)
    if json_path:
        write_text_atomically(json_path, json.dumps(to_json(results), indent=2) + "\n")

