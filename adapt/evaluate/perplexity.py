"""Perplexity of a diffusion LM (the ELBO bound) and of its AR source, on exactly the same tokens.

Both score the targets 1..L-1 of each packed block given position 0 (the shift never predicts position
0), so `ar_perplexity(source)` and `elbo_perplexity(adapted)` are directly comparable: the ELBO is an
upper bound on the diffusion model's NLL, the AR number is an exact NLL.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attention import get_attention_ratio, set_attention
from ..diffusion import DiffusionConfig, elbo_nll, maskable_positions
from ..forward import predict_logits


@contextmanager
def evaluation_mode(model: nn.Module, ratio: float | None):
    """Eval mode (no dropout) at attention `ratio` for the duration; the caller's state is restored after.

    `ratio=None` keeps the model's current ratio. A partial ratio is restored with fresh (unseeded)
    mask draws: a training loop that seeds its annealed masks sets its generator again after evaluating.
    """
    was_training = model.training
    previous = get_attention_ratio(model)
    model.eval()
    if ratio is not None:
        set_attention(model, ratio)
    try:
        yield model
    finally:
        if ratio is not None:
            set_attention(model, previous)
        model.train(was_training)


def sampling_ratio(config: DiffusionConfig | None) -> float:
    """The attention ratio a model is scored and sampled at: a trained model of its mode's (1 for a
    bidirectional model; 0 for a causal one, `config` None, and for the block and hybrid modes, whose
    forwards carry their own masks)."""
    return 0.0 if config is None else config.mode.attention_ratio(1.0)


@dataclass(frozen=True)
class Perplexity:
    """Negative log-likelihood per scored token over a set of blocks, with its standard error."""

    nll_per_token: float  # nats; for a diffusion model the negative ELBO, an upper bound on the NLL
    stderr: float  # standard error of nll_per_token over blocks; nan below two blocks
    tokens: int  # scored tokens
    # Each block's summed NLL and scored tokens: two models scored on the same blocks give a paired
    # difference (`from_blocks` of the NLLs' difference), far tighter than their two errors combined.
    nll_by_block: tuple[float, ...] = ()
    tokens_by_block: tuple[int, ...] = ()

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @classmethod
    def from_blocks(cls, nll: torch.Tensor, tokens: torch.Tensor) -> "Perplexity":
        """From each block's summed NLL and scored-token count.

        The block is the sampling unit, so the standard error counts both how the text varies and the
        Monte Carlo noise of an ELBO estimate. nll_per_token is a ratio (sum of NLL / sum of tokens);
        its standard error is the usual linearised one, which handles blocks of unequal length.
        """
        nll, tokens = nll.double(), tokens.double()
        total = float(tokens.sum())
        ratio = float(nll.sum()) / max(total, 1.0)
        n = nll.numel()
        residuals = nll - ratio * tokens
        # below two blocks, or with nothing scored (every sample empty), there is no spread to measure
        stderr = math.sqrt(float((residuals**2).sum()) * n / (n - 1)) / total if n >= 2 and total > 0 else math.nan
        return cls(ratio, stderr, int(total), tuple(nll.tolist()), tuple(int(k) for k in tokens.tolist()))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batches(blocks: torch.Tensor, attention_mask: torch.Tensor | None, *, batch_size: int, desc: str | None = None):
    """Consecutive row batches (ids, padding mask or None), with a progress bar when `desc` is given."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        rows = slice(start, start + batch_size)
        yield blocks[rows], None if attention_mask is None else attention_mask[rows]


@torch.no_grad()
def elbo_perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    config: DiffusionConfig,
    *,
    n_samples: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    attention_ratio: float | None = 1.0,
    attention_mask: torch.Tensor | None = None,
    desc: str | None = None,
) -> Perplexity:
    """Negative ELBO per token of the packed blocks (N, L), targets 1..L-1, position 0 given;
    `.perplexity` is its exponential, the ELBO perplexity.

    A diffusion model is evaluated as it will be sampled, with bidirectional attention: the function sets
    the ratio to `attention_ratio` (default 1) for the duration and restores the caller's ratio and
    train/eval mode afterwards, so it can be called mid-training, mid-annealing included. Pass None to
    score the model at whatever ratio it has. `n_samples` masks of stratified sizes per block, drawn from
    a generator seeded with `seed`: the same call gives the same number. `attention_mask` (N, L) marks
    padding (a short last block), which is neither context nor target.
    """
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    nll, tokens = [], []
    with evaluation_mode(model, attention_ratio):
        for batch, padding in batches(blocks, attention_mask, batch_size=batch_size, desc=desc):
            elbo = elbo_nll(model, batch.to(device), config, n_samples=n_samples, generator=generator,
                            attention_mask=None if padding is None else padding.to(device))
            nll.append(elbo.nll.cpu())
            tokens.append(elbo.num_tokens.cpu())
    return Perplexity.from_blocks(torch.cat(nll), torch.cat(tokens))


@torch.no_grad()
def ar_perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    desc: str | None = None,
) -> Perplexity:
    """Mean next-token CE of the causal model on the targets 1..L-1 of each block (N, L), an exact NLL.

    Runs at attention ratio 0 (the plain causal model) whatever the model's current setting, restored after.
    """
    device = model_device(model)
    nll, tokens = [], []
    with evaluation_mode(model, 0.0):
        for batch, padding in batches(blocks, attention_mask, batch_size=batch_size, desc=desc):
            batch = batch.to(device)
            padding = None if padding is None else padding.to(device)
            targets = maskable_positions(batch, padding)
            logits = predict_logits(model, batch, targets, shift=True, attention_mask=padding)
            ce = F.cross_entropy(logits.float(), batch[targets], reduction="none").double()
            nll.append(torch.zeros(batch.shape[0], dtype=torch.float64, device=device)
                       .index_add_(0, targets.nonzero()[:, 0], ce).cpu())
            tokens.append(targets.sum(dim=1).cpu())
    return Perplexity.from_blocks(torch.cat(nll), torch.cat(tokens))
