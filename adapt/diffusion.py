"""The absorbing-state (masked) diffusion objective: corruption, shift, loss and ELBO likelihood.

Forward process: per sequence draw t ~ U(eps, 1) and replace each maskable token by the mask token
with probability t. The model denoises all masked positions at once, with no time embedding. With the
shift (as in the AR model it came from) the prediction for token i is read at position i-1, so position
0 is never a target and always stays clean. The loss is the cross-entropy on masked positions weighted
by 1/t: divided by the number of tokens it is the negative ELBO per token, an upper bound on the NLL.

`DiffusionConfig.objective` chooses what each masked token contributes (docs/method.md derives each):
"mdm" the 1/t-weighted CE above; "score-entropy" SEDD's denoising score entropy, the outputs read as log
concrete scores; "cart" Dream's CE weighted by the clean context around each token instead of 1/t.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check_type
from .structure import decoder_backbone, unwrap_model

LOSS_NORMS = ("masked", "tokens")
BLOCK_SCHEDULES = ("constant", "grow")
OBJECTIVES = ("mdm", "score-entropy", "cart")
# What checkpoints exported before `objective` had choices recorded for the one objective there was.
OBJECTIVE_ALIASES = {"masked-diffusion": "mdm"}


@dataclass
class DiffusionConfig:
    """Everything that decides how a model is trained and sampled as a diffusion LM.

    Saved in the model's config.json under the key `diffusion` and read back on load, so a checkpoint
    never depends on guesses from its name.
    """

    mask_token_id: int | None = None
    # "add" (a new token, embeddings resized) or "reuse" (an existing id); recorded, never inferred.
    mask_token_strategy: str | None = None
    # Output at position i-1 predicts token i, as in the AR model.
    shift: bool = True
    # t ~ U(eps, 1); eps keeps the 1/t weight finite.
    eps: float = 1e-3
    # Optimizer steps over which attention goes from `anneal_from` (0 = causal) to bidirectional.
    anneal_steps: int = 10_000
    # The attention ratio training started from: the source's (0 for an AR model; a continued diffusion
    # checkpoint goes on from the ratio it reached instead of starting causal again).
    anneal_from: float = 0.0
    # "masked": divide the weighted sum by the number of masked tokens (DiffuLLaMA); "tokens": by the
    # number of maskable tokens, (L-1) per packed block (SMDM/LLaDA, the ELBO). In training both counts
    # are over the whole optimizer step: every micro-batch and every process.
    loss_norm: str = "masked"
    base_model: str | None = None
    tokens_trained: int = 0  # tokens the model has been trained on in diffusion mode, all runs together
    # Token ids the model may predict (the tokenizer's size). The embedding may have more rows, padding
    # to a multiple of 64 for tensor cores: their logits are dropped. None: every row is a token.
    vocab_size: int | None = None
    # None: the whole sequence is one bidirectional block (DiffuLLaMA). An int B: block diffusion, the
    # sequence cut into blocks of B tokens, bidirectional inside a block and causal across blocks, each
    # block predicted given the clean ones before it; sampling keeps an exact KV cache (adapt.block).
    block_size: int | None = None
    # How training reached block_size: "constant" (from the first step) or "grow" (1, 2, 4, ... up to
    # block_size in equal stages over anneal_steps, LLaDA2.0's warm-up: block size 1 is the AR model).
    block_schedule: str = "constant"
    # What each masked token contributes to the loss (OBJECTIVES): "mdm" its CE weighted 1/t; "score-entropy"
    # SEDD's score entropy of the outputs read as log concrete scores; "cart" its CE weighted by Dream's
    # context-adaptive weight instead of 1/t.
    objective: str = "mdm"
    # "score-entropy": the constant subtracted from the outputs before they are read as log scores. None
    # until the first training step measures it (`log_partition` of the source's outputs): an AR head's
    # logits have log Z about 27.5 (SmolLM2), and exp(27.5) as a loss wipes out what it knew in a few steps.
    score_offset: float | None = None
    # CART's p: a clean token at distance d from a masked one adds p (1-p)^(d-1) / 2 to its weight.
    cart_p: float = 0.1
    # Training only: each sequence twice per micro-batch, masked at t and at 1 - t on complementary
    # positions, so every maskable token is a target exactly once per pair (LLaDA, DiffuCoder).
    complementary_masks: bool = False
    # Training only: t ~ U(t_min, t_max); None for t_min is eps. The ELBO still integrates over (eps, 1).
    t_min: float | None = None
    t_max: float = 1.0
    # Whether training reached attention ratio 1 (written by `adapt.export.save_checkpoint`).
    annealing_finished: bool = False

    def __post_init__(self):
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {self.loss_norm!r}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.anneal_steps < 1:
            raise ValueError(f"anneal_steps must be >= 1, got {self.anneal_steps}")
        if self.block_schedule not in BLOCK_SCHEDULES:
            raise ValueError(f"block_schedule must be one of {BLOCK_SCHEDULES}, got {self.block_schedule!r}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 (or None for one bidirectional block), got {self.block_size}")
        if not 0.0 <= self.anneal_from <= 1.0:
            raise ValueError(f"anneal_from must be in [0, 1], got {self.anneal_from}")
        if self.mask_token_strategy not in (None, "add", "reuse"):
            raise ValueError(f"mask_token_strategy must be 'add' or 'reuse', got {self.mask_token_strategy!r}")
        self.objective = OBJECTIVE_ALIASES.get(self.objective, self.objective)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.score_offset is not None and not math.isfinite(self.score_offset):
            raise ValueError(f"score_offset must be a finite number (or None), got {self.score_offset}")
        if not 0.0 < self.cart_p <= 1.0:
            raise ValueError(f"cart_p must be in (0, 1], got {self.cart_p}")
        self._check_noise_band()

    def _check_noise_band(self) -> None:
        low, high = self.noise_band
        if not 0.0 < high <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {high}")
        if not 0.0 < low < high:
            unset = " (unset: eps)" if self.t_min is None else ""
            raise ValueError(f"t_min = {low}{unset} must be in (0, t_max = {high}); lower t_min or raise t_max")
        if self.complementary_masks and low + high > 1.0:
            raise ValueError(f"complementary_masks needs t_min + t_max <= 1: the copy at level 1 - t would go below "
                             f"t_min ({low}) and its weight 1/(1 - t) grow without bound; set t_max <= {1.0 - low:g}")

    @property
    def noise_band(self) -> tuple[float, float]:
        """(low, high) of the training noise levels t ~ U(low, high)."""
        return (self.eps if self.t_min is None else self.t_min), self.t_max

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown diffusion config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**values)

    def save_to(self, model_config) -> None:
        """Write into a transformers config; `save_pretrained` then puts it in config.json."""
        model_config.diffusion = self.to_dict()

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionConfig | None":
        values = getattr(model_config, "diffusion", None)
        return None if values is None else cls.from_dict(dict(values))

    def anneal_ratio(self, step: int) -> float:
        """Attention ratio at optimizer step `step` (0-based): linear from `anneal_from` to 1,
        min(1, r0 + (1 - r0)(step+1)/anneal_steps). A block model does not anneal: 0, its attention is the
        block mask that every forward is given."""
        if self.block_size is not None:
            return 0.0
        return min(1.0, self.anneal_from + (1.0 - self.anneal_from) * (step + 1) / self.anneal_steps)

    def block_size_at(self, step: int) -> int | None:
        """Block size at optimizer step `step` (0-based): `block_size`, or under "grow" the power of two
        of the current stage, 1 first, the stages sharing anneal_steps equally."""
        if self.block_size is None or self.block_schedule == "constant":
            return self.block_size
        stages = math.ceil(math.log2(self.block_size)) + 1
        stage = min(stages - 1, step * stages // self.anneal_steps)
        return min(self.block_size, 2 ** stage)


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar, differentiable: the weighted masked terms (`objective`), normalised per `loss_norm`
    unweighted: torch.Tensor  # scalar: plain CE averaged over masked tokens (no 1/t), for logging
    num_masked: int  # masked (scored) tokens in the batch
    num_tokens: int  # non-padding tokens in the batch (what a run counts as trained on)


def sample_t(batch: int, low: float, high: float = 1.0, *, device=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels t ~ U(low, high), one per sequence."""
    u = torch.rand(batch, generator=generator, device=_generator_device(generator, device)).to(device)
    return low + (high - low) * u


def maskable_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    never_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool (B, L): positions that may be corrupted. Never position 0, padding, or `never_mask`."""
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    maskable[:, 0] = False
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    if never_mask is not None:
        maskable &= ~never_mask.bool()
    return maskable


def corrupt(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing-state forward process: each maskable token becomes the mask token with prob t."""
    u = torch.rand(input_ids.shape, generator=generator, device=_generator_device(generator, input_ids.device))
    mask = (u.to(input_ids.device) < t[:, None]) & maskable
    return input_ids.masked_fill(mask, mask_token_id), mask


def predict_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    shift: bool = True,
    attention_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    clean: torch.Tensor | None = None,
    prefix=None,
) -> torch.Tensor:
    """Logits (N, V) for the N positions where `targets` (bool (B, L)) is True, in row-major order.

    With `shift`, the prediction for position i is the model's output at i-1 (targets at position 0 are
    not allowed). The LM head runs on the selected hidden states only, so the (B, L, V) logits of the
    whole batch are never materialised: the diffusion loss scores about half the positions.

    A block model (`block_size`) also needs the `clean` sequence: each block is predicted given the
    clean blocks before it (`adapt.block`), and may take the cached clean blocks before the first target
    (`prefix`, from `adapt.block.clean_prefix`) instead of running them again.
    """
    if shift and targets[:, 0].any():
        raise ValueError("with shift=True position 0 has no prediction; it must never be a target")
    if block_size is not None:
        from .block import training_hidden

        return output_logits(model, training_hidden(model, input_ids, clean, targets, block_size, shift=shift,
                                                    attention_mask=attention_mask, prefix=prefix))
    backbone = decoder_backbone(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    if shift:
        selected = hidden[:, :-1][targets[:, 1:]]
    else:
        selected = hidden[targets]
    return output_logits(model, selected)


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head and any output transform the family's forward applies after it; the logits of
    embedding rows past the recorded `vocab_size` (alignment padding) are dropped, so those ids are
    never predicted, sampled or given probability mass."""
    model = unwrap_model(model)
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    vocab_size = (getattr(config, "diffusion", None) or {}).get("vocab_size")
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    # Families that rescale logits after the head (the head-only path must match `model(...).logits`).
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:  # Granite
        logits = logits / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def draw_noise(
    input_ids: torch.Tensor,
    config: DiffusionConfig,
    maskable: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of one forward, each part drawn unless given: levels t (B,) and the corrupted
    positions (bool (B, L)), always among the `maskable` ones."""
    if t is None:
        t = sample_t(input_ids.shape[0], *config.noise_band, device=input_ids.device, generator=generator)
    t = t.to(device=input_ids.device, dtype=torch.float32)
    if mask is None:
        _, mask = corrupt(input_ids, t, maskable, config.mask_token_id, generator=generator)
    return t, mask.to(input_ids.device).bool() & maskable


def complementary_pairs(batch: dict, maskable: torch.Tensor, t: torch.Tensor, mask: torch.Tensor):
    """Each sequence of `batch` (a dict of (B, L) tensors) twice: the first B rows with its noise (t, mask),
    the next B at level 1 - t, masked exactly on the maskable positions the first copy leaves clean.
    Returns (batch, maskable, t, mask), each with 2B rows."""
    doubled = {name: torch.cat([values, values]) for name, values in batch.items()}
    return doubled, torch.cat([maskable, maskable]), torch.cat([t, 1.0 - t]), torch.cat([mask, maskable & ~mask])


def loss_denominator(config: DiffusionConfig, mask: torch.Tensor, maskable: torch.Tensor) -> int:
    """What the weighted sum of the masked terms is divided by: the masked tokens ("masked") or the
    maskable ones ("tokens": every position that could be a target, so SFT prompts and padding do not count)."""
    return int(mask.sum()) if config.loss_norm == "masked" else int(maskable.sum())


def diffusion_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: DiffusionConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    never_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    denominator: float | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
) -> DiffusionLoss:
    """One Monte Carlo sample of the diffusion loss for a batch of token ids (B, L).

    `t` (B,) fixes the noise levels; `mask` (bool (B, L)) fixes which tokens are corrupted (it is
    intersected with the maskable positions: position 0, `never_mask` and padding always stay clean).
    Padding is never a target. Each masked token's term (`token_terms`: the CE, or the score entropy) is
    weighted (`token_weights`: 1/t of its sequence, or CART's weight), and the sum is divided by
    `denominator`, by default this batch's `loss_denominator`; the training loop passes the count of its
    whole optimizer step (all micro-batches, all processes), so that the objective does not depend on how
    the step is split. `block_size` overrides the config's (a block size schedule).
    """
    check_type("input_ids", input_ids, torch.Tensor, "a tensor of token ids (B, L), e.g. torch.tensor([ids])")
    if config.mask_token_id is None:
        raise ValueError("DiffusionConfig.mask_token_id is not set; call adapt.ensure_mask_token first")
    maskable = maskable_positions(input_ids, attention_mask, never_mask)
    t, mask = draw_noise(input_ids, config, maskable, t=t, mask=mask, generator=generator)
    block_size = block_size or config.block_size
    logits = masked_logits(model, input_ids, mask, config, attention_mask=attention_mask, block_size=block_size)
    terms, ce = token_terms(logits, input_ids[mask], config)
    weights = token_weights(config, t, mask, attention_mask, block_size)

    num_masked = int(mask.sum())
    if denominator is None:
        denominator = loss_denominator(config, mask, maskable)
    return DiffusionLoss(
        loss=(terms * weights).sum() / max(denominator, 1),
        unweighted=ce.detach().sum() / max(num_masked, 1),
        num_masked=num_masked,
        num_tokens=int(attention_mask.sum()) if attention_mask is not None else input_ids.numel(),
    )


def masked_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, config: DiffusionConfig, *,
                  attention_mask: torch.Tensor | None = None, block_size: int | None = None,
                  prefix=None) -> torch.Tensor:
    """The outputs (N, V) at the masked positions of x_t (`input_ids` with `mask` replaced by the mask
    token), as the training forward computes them (`predict_logits` for `prefix`)."""
    noisy = input_ids.masked_fill(mask, config.mask_token_id)
    return predict_logits(model, noisy, mask, shift=config.shift, attention_mask=attention_mask,
                          block_size=block_size, clean=input_ids, prefix=prefix)


def token_terms(logits: torch.Tensor, targets: torch.Tensor, config: DiffusionConfig):
    """Per masked token (N,): the term the loss weights, and the plain CE (detached, for logging).

    The term is the CE, or for "score-entropy" the score entropy (`score_entropy`). The CE runs in the
    logits' own dtype: the kernels already reduce in float32, and the logits are rounded to 16 bits by the
    head, so a float32 copy (plus the float32 log-softmax saved for backward) buys no precision; in bf16
    on CPU it cost 2.4x the time of the whole CE (docs/performance.md).
    """
    if config.objective != "score-entropy":
        ce = F.cross_entropy(logits, targets, reduction="none").float()
        return ce, ce.detach()
    with torch.no_grad():
        ce = F.cross_entropy(logits, targets, reduction="none").float()
    return score_entropy(logits, targets, config.mask_token_id, offset=config.score_offset or 0.0), ce


def score_entropy(outputs: torch.Tensor, targets: torch.Tensor, mask_token_id: int, *, offset: float = 0.0) -> torch.Tensor:
    """SEDD's denoising score entropy (N,) of masked tokens, absorbing process, divided by its weight 1/t.

    The log concrete score of replacing the mask by token y is log r(t) + o_y, o = outputs - offset,
    r(t) = (1-t)/t the true ratio's scale (SEDD's scale-by-sigma parametrisation). The entropy, rate
    sigma'(t) times [sum_y s_y - r log s_x0 + r (log r - 1)], is (1/t) [sum_y exp(o_y) - o_x0 - 1] for
    this schedule (docs/method.md); y runs over the tokens, never the mask itself. With o a log-softmax
    over those tokens the bracket is exactly the CE.
    """
    precise = torch.promote_types(outputs.dtype, torch.float32)  # 16-bit logits: the terms in float32
    total = (log_partition(outputs, mask_token_id).to(precise) - offset).exp()
    return total - (outputs.gather(-1, targets[:, None]).squeeze(-1).to(precise) - offset) - 1.0


def log_partition(outputs: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """log Z (N,), Z = sum over the tokens but the mask of exp(outputs[y]): 0 for normalised scores."""
    others = outputs.index_fill(-1, torch.tensor([mask_token_id], device=outputs.device), -torch.inf)
    return torch.logsumexp(others, dim=-1)


def token_weights(config: DiffusionConfig, t: torch.Tensor, mask: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, block_size: int | None = None) -> torch.Tensor:
    """The weight (N,) of each masked token's term, in row-major order: 1/t of its sequence, or under
    "cart" its context-adaptive weight (`cart_weights`)."""
    if config.objective == "cart":
        real = torch.ones_like(mask) if attention_mask is None else attention_mask.bool()
        return cart_weights(mask, real, config.cart_p, block_size)[mask]
    return (1.0 / t)[:, None].expand_as(mask)[mask]


def cart_weights(mask: torch.Tensor, real: torch.Tensor, p: float, block_size: int | None = None) -> torch.Tensor:
    """Dream's CART weights (B, L): w_n = 1/2 sum_i p (1-p)^(|n-i|-1) over the clean tokens i != n that
    masked token n sees; 0 where nothing is masked.

    Clean: real (not padding) and not masked, prompt and position 0 included. A block model's token
    sees the clean tokens of its own block and every token of the blocks before it, never later blocks.
    Each side's kernel sums to 1/2 over an unbounded clean context, so 0 <= w_n <= 1.
    """
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)
    distance = (positions[:, None] - positions[None, :]).abs()
    kernel = 0.5 * p * torch.pow(1.0 - p, (distance - 1).clamp(min=0).float())  # [n, i]
    kernel.fill_diagonal_(0.0)
    clean = (real & ~mask).float()
    if block_size is None:
        weights = clean @ kernel.T
    else:
        blocks = positions // block_size
        same_block = blocks[:, None] == blocks[None, :]
        earlier_block = blocks[None, :] < blocks[:, None]
        weights = clean @ (kernel * same_block).T + real.float() @ (kernel * earlier_block).T
    return weights * mask


@dataclass
class ELBO:
    nll: torch.Tensor  # (B,) negative ELBO of each sequence's target tokens, in nats (summed over tokens)
    num_tokens: torch.Tensor  # (B,) number of target tokens per sequence

    @property
    def per_token(self) -> float:
        return float(self.nll.sum() / self.num_tokens.sum().clamp(min=1))

    @property
    def perplexity(self) -> float:
        return math.exp(self.per_token)


@torch.no_grad()
def elbo_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: DiffusionConfig,
    *,
    n_samples: int = 32,
    target_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prefix=None,
) -> ELBO:
    """Monte Carlo estimate of the negative ELBO of the target tokens given the rest (for a score-entropy
    model the score-entropy bound, SEDD's; a CART model is scored by the plain 1/t-weighted ELBO).

    Only target tokens are ever masked; the others are clean context (the prompt of a multiple-choice
    question, say). Default targets: every non-padding position but 0. The estimate is the 1/t form
    with t integrated out given the mask (LLaDA's estimator, docs/method.md): sample k masks exactly
    l_k = ceil(n (k + u)/K) of a row's n targets, chosen uniformly, and weighs its terms n / l_k; one
    shared u ~ U(0, 1) stratifies the counts. Unbiased for the ELBO over t ~ U(0, 1), with far less
    variance than Bernoulli(t) masks weighted 1/t (multiple choice needs it: docs/results.md). A block
    model's `prefix` (`block_prefix` of these targets) is built here unless the caller has it already.
    """
    check_type("input_ids", input_ids, torch.Tensor, "a tensor of token ids (B, L), e.g. torch.tensor([ids])")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if target_mask is None:
        target_mask = maskable_positions(input_ids, attention_mask)
    else:
        target_mask = target_mask.bool() & maskable_positions(input_ids, attention_mask)
    batch = input_ids.shape[0]
    offset = torch.rand((), generator=generator, device=_generator_device(generator, input_ids.device))
    total = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
    if prefix is None:
        prefix = block_prefix(model, input_ids, target_mask, config)
    for k in range(n_samples):
        mask, weight = mask_exactly(target_mask, (k + offset.item()) / n_samples, generator)
        logits = masked_logits(model, input_ids, mask, config, attention_mask=attention_mask,
                               block_size=config.block_size, prefix=prefix)
        terms, _ = token_terms(logits.float(), input_ids[mask], config)
        rows = mask.nonzero()[:, 0]
        total.index_add_(0, rows, terms.double() * weight[rows])
    return ELBO(nll=total / n_samples, num_tokens=target_mask.sum(dim=1))


def block_prefix(model: nn.Module, clean: torch.Tensor, targets: torch.Tensor, config: DiffusionConfig):
    """A block model's cached clean blocks before its first target, run once for every mask that
    scores `targets` (`adapt.block.clean_prefix`); None for a bidirectional model."""
    if config.block_size is None:
        return None
    from .block import clean_prefix

    return clean_prefix(model, clean, targets, config.block_size, config.shift)


def mask_exactly(target_mask: torch.Tensor, level: float | torch.Tensor, generator: torch.Generator | None = None):
    """(mask, weight): in each row ceil(level * n) of its n targets (at least one), a uniform choice,
    and the row's weight n / that count (0 for a row without targets). `level`: one, or one per row.

    Why n / count: under Bernoulli(t) masks with t ~ U(0, 1) a mask's size l is uniform on 0..n, given
    l the mask is a uniform choice, and E[1/t | l] = (n + 1) / l (t | l ~ Beta(l + 1, n - l + 1)). So the
    1/t-weighted sum f of the masked terms has expectation sum_{l>=1} E[f | l] / l, which is what a
    count uniform on 1..n (level ~ U(0, 1)) weighted n / l gives, without the 1/t spikes of small t.
    """
    n = target_mask.sum(dim=1)
    count = torch.ceil(level * n).clamp(min=1)
    draws = torch.rand(target_mask.shape, generator=generator, device=_generator_device(generator, target_mask.device))
    draws = draws.to(target_mask.device).masked_fill(~target_mask, 2.0)  # non-targets rank last
    rank = draws.argsort(dim=1).argsort(dim=1)
    return (rank < count[:, None]) & target_mask, n.double() / count.double()


def _generator_device(generator: torch.Generator | None, fallback) -> torch.device | str | None:
    return generator.device if generator is not None else fallback
