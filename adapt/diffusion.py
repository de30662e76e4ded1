"""The absorbing-state (masked) diffusion objective: corruption, shift, loss and ELBO likelihood.

Forward process: per sequence draw t ~ U(eps, 1) and replace each maskable token by the mask token
with probability t. The model denoises all masked positions at once, with no time embedding. With the
shift (as in the AR model it came from) the prediction for token i is read at position i-1, so position
0 is never a target and always stays clean. The loss is the cross-entropy on masked positions weighted
by 1/t: divided by the number of tokens it is the negative ELBO per token, an upper bound on the NLL.

Two records of settings, declared once each:
* `DiffusionConfig`: what a diffusion model *is* (mask token, shift, vocabulary, its mode and the mode's
  size, how its outputs are read), written to config.json's `diffusion` section and read back on load;
* `DiffusionTraining`: what only training uses (the noise band, the loss normalisation, complementary
  masks, the objective's settings), the recipe's `diffusion:` section.
What a kind of model does is its mode's (`MODES`, adapt/mode.py); what each masked token contributes is
its objective's (`OBJECTIVES`, adapt/objectives.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .bidirectional import BidirectionalMode
from .block import BlockMode
from .hybrid import HybridMode
from .errors import UserError, check_type, quoted
from .forward import output_logits
from .mode import Mode
from .objectives import OBJECTIVES, Objective, certainty_entropy, teacher_kl
from .settings import (Range, above, at_least, between, check_settings, config_source, default_of, from_dict,
                       read_from)

MODES = {mode.name: mode for mode in (BidirectionalMode, BlockMode, HybridMode)}
# Keys of config.json's `diffusion` section that checkpoints written before the split recorded: the
# training settings of their last run, kept by nothing now (the run's recipe.yaml has them).
RETIRED_KEYS = ("eps", "anneal_steps", "anneal_from", "loss_norm", "block_schedule", "cart_p",
                "complementary_masks", "t_min", "t_max")


@dataclass
class DiffusionConfig:
    """What a diffusion model is: saved in its config.json under `diffusion` and read back, checked, on
    load, so a checkpoint never depends on guesses from its name."""

    mask_token_id: int | None = field(default=None, metadata=at_least(0))
    # "add" (a new token, embeddings resized) or "reuse" (an existing id); recorded, never inferred.
    mask_token_strategy: Literal["add", "reuse"] | None = None
    # Output at position i-1 predicts token i, as in the AR model.
    shift: bool = True
    # Token ids the model may predict (the tokenizer's size). The embedding may have more rows, padding
    # to a multiple of 64 for tensor cores: their logits are dropped. None: every row is a token.
    vocab_size: int | None = field(default=None, metadata=at_least(1))
    # The kind of model (MODES): config.json records its name as `mode` and its fields beside it.
    mode: Mode = field(default_factory=BidirectionalMode)
    # How its outputs are read (OBJECTIVES): "score-entropy" outputs are log scores, not logits.
    objective: Literal[tuple(OBJECTIVES)] = "mdm"
    # What training measured for the objective (score-entropy: {"offset": mean log Z at its first step}).
    objective_state: dict = field(default_factory=dict)
    base_model: str | None = None
    tokens_trained: int = field(default=0, metadata=at_least(0))  # in diffusion mode, all runs together
    annealing_finished: bool = False  # whether training reached attention ratio 1 (set by save_checkpoint)
    # The `diffusion:` recipe section of the run that wrote it: a record for the model card, read by nothing else.
    trained_with: dict | None = None

    def __post_init__(self):
        check_settings(self, "diffusion.")

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mode"}
        return {**self.mode.to_dict(), **values}

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        """From config.json's section (a checkpoint of any version of adapt), every key checked."""
        if not isinstance(values, dict):
            raise UserError(f"diffusion must be a mapping of keys, got {quoted(values)} "
                            f"({type(values).__name__}); write the section adapt saved, or remove it")
        values = _upgraded(dict(values))
        name = values.pop("mode", BidirectionalMode.name)
        if name not in MODES:
            raise UserError(f"diffusion.mode = {quoted(name)} is not a mode this version of adapt knows; "
                            f"choose one of: {', '.join(MODES)}")
        own = {f.name for f in dataclasses.fields(MODES[name])}
        known = {f.name for kind in (cls, *MODES.values()) for f in dataclasses.fields(kind)}
        unknown = sorted(set(values) - known)
        if unknown:  # a key a newer adapt writes is no typo: say so, rather than list the valid keys
            raise UserError(f"diffusion.{unknown[0]} is a key this version of adapt does not know (a newer one may "
                            "have written it); upgrade adapt, or remove the key")
        mode = from_dict(MODES[name], {key: values.pop(key) for key in own if key in values}, "diffusion.")
        return dataclasses.replace(from_dict(cls, values, "diffusion."), mode=mode)

    def save_to(self, model_config) -> None:
        """Write into a transformers config; `save_pretrained` then puts it in config.json."""
        model_config.diffusion = self.to_dict()

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionConfig | None":
        """The `diffusion` section of a transformers config (None: a causal LM), checked; a mistake in it
        names the config.json it was read from."""
        values = getattr(model_config, "diffusion", None)
        if values is None:
            return None
        with read_from(config_source(model_config)):
            return cls.from_dict(values)


def _upgraded(values: dict) -> dict:
    """A section written before modes and objective states existed, in today's keys: a block size alone
    meant a block model, `score_offset` was score-entropy's state, "masked-diffusion" was "mdm"."""
    if "mode" not in values and "block_size" in values:
        size = values.pop("block_size")
        values["mode"] = BidirectionalMode.name if size is None else BlockMode.name
        if size is not None:
            values["block_size"] = size
    if "score_offset" in values:
        offset = values.pop("score_offset")
        values.setdefault("objective_state", {} if offset is None else {"offset": offset})
    if values.get("objective") == "masked-diffusion":
        values["objective"] = "mdm"
    return {key: value for key, value in values.items() if key not in RETIRED_KEYS}


@dataclass
class DiffusionTraining:
    """The recipe's `diffusion:` section: which kind of model a run makes, and the objective it trains."""

    # The kind of model (MODES); null: the source's kind (bidirectional for an AR model).
    mode: Literal[tuple(MODES)] | None = None
    # mode: block: blocks of this many tokens, bidirectional inside and causal across, exact KV cache.
    block_size: int | None = field(default=None, metadata=at_least(1))
    # mode: hybrid: draft blocks of this many tokens, each drafted in one step from the clean tokens before it.
    draft_size: int | None = field(default=None, metadata=at_least(1))
    # mode: hybrid: alpha, the AR loss's weight in (alpha L_AR + L_diff) / (1 + alpha) (TiDAR: 1).
    ar_weight: float = field(default=1.0, metadata=at_least(0))
    # "constant": the mode's size from the first step; "grow": block sizes 1, 2, 4, ... up to block_size
    # in equal stages over train.anneal_steps (block size 1 with the shift is the AR model, LLaDA2.0).
    block_schedule: Literal["constant", "grow"] = "constant"
    # What each masked token contributes (OBJECTIVES): "mdm" its CE weighted 1/t; "score-entropy" SEDD's
    # score entropy of the outputs read as log scores; "cart" the CE weighted by Dream's context weight.
    objective: Literal[tuple(OBJECTIVES)] = "mdm"
    # CART only: a clean token at distance d adds cart_p (1 - cart_p)^(d-1) / 2 to a masked token's weight.
    cart_p: float = field(default=0.1, metadata={"range": Range(0, 1, low_open=True)})
    # "masked": divide by the masked tokens of the whole optimizer step (DiffuLLaMA); "tokens": by its
    # maskable tokens (the ELBO). Counted over every micro-batch and process.
    loss_norm: Literal["masked", "tokens"] = "masked"
    # Noise levels t ~ U(t_min, t_max); t_min null is eps (which keeps the 1/t weight finite); t_min =
    # t_max is one fixed level (1: every position masked, a hybrid model's all-mask drafts, TiDAR's). The
    # validation ELBO always integrates over all of (0, 1).
    eps: float = field(default=1e-3, metadata=between(1e-9, 0.5))
    t_min: float | None = field(default=None, metadata=between(1e-9, 1))
    t_max: float = field(default=1.0, metadata={"range": Range(0, 1, low_open=True)})
    # Each sequence twice per micro-batch, at t on positions m and at 1 - t on the others, so every
    # maskable token is a target exactly once per pair (LLaDA, DiffuCoder); needs t_min + t_max = 1.
    complementary_masks: bool = False
    # dParallel's certainty forcing: beside the CE, the entropy (at certainty_temperature) of the
    # predictions of masked tokens the model already gets right (argmax = target), times this weight,
    # summed and divided as the CE terms are (loss_norm); 0 = off. It makes right predictions confident, so that more of them pass
    # a confidence threshold in one step (`adapt distill`; dParallel: weight 2, temperature 0.5).
    certainty_weight: float = field(default=0.0, metadata=at_least(0))
    certainty_temperature: float = field(default=0.5, metadata=above(0))

    def __post_init__(self):
        check_settings(self, "diffusion.")
        self._check_noise_band()
        self._check_mode_fields()
        if self.mode is not None:
            self._check_mode_settings(MODES[self.mode])

    @property
    def noise_band(self) -> tuple[float, float]:
        """(low, high) of the training noise levels t ~ U(low, high)."""
        return (self.eps if self.t_min is None else self.t_min), self.t_max

    def _check_noise_band(self) -> None:
        low, high = self.noise_band
        if not low <= high:
            unset = " (unset: eps)" if self.t_min is None else ""
            raise UserError(f"diffusion.t_min = {low}{unset} must be in (0, t_max = {high}]; lower t_min or raise t_max")
        # The second copy is at 1 - t: inside the band for every t only if the band is symmetric about 1/2.
        if self.complementary_masks and not math.isclose(low + high, 1.0, abs_tol=1e-12):
            raise UserError(f"diffusion.complementary_masks needs a noise band symmetric about 1/2 (t_min + t_max = 1), "
                            f"so that the copy at level 1 - t stays in the band; with t_min = {low:g} set t_max: "
                            f"{1.0 - low:g}")

    def _check_mode_fields(self) -> None:
        """The settings of another mode (a block size for a bidirectional model) are refused, not ignored;
        so are a mode's settings without the mode (`mode: null` keeps the source's mode as it is)."""
        own = set() if self.mode is None else {f.name for f in dataclasses.fields(MODES[self.mode])}
        for other in MODES.values():
            for f in dataclasses.fields(other):
                if f.name not in own and getattr(self, f.name) is not None:
                    chosen = "not set" if self.mode is None else repr(self.mode)
                    raise UserError(f"diffusion.{f.name} is a setting of mode {other.name!r} and diffusion.mode is "
                                    f"{chosen}; set diffusion.mode: {other.name} or remove diffusion.{f.name}")
        missing = [name for name in own if getattr(self, name) is None]
        if missing:
            raise UserError(f"diffusion.mode: {self.mode} needs diffusion.{missing[0]}; give it a value")

    def _check_mode_settings(self, mode: type[Mode]) -> None:
        """The training settings of another mode must keep their defaults: a grow schedule for a model
        without blocks, an AR weight for one without an AR stream, are refused, not ignored."""
        for other in MODES.values():
            for name in set(other.training_settings) - set(mode.training_settings):
                if getattr(self, name) != default_of(DiffusionTraining, name):
                    raise UserError(f"diffusion.{name} is a setting of mode {other.name!r} and this run makes a "
                                    f"{mode.name} model; remove diffusion.{name} or set diffusion.mode: {other.name}")

    def mode_for(self, source: DiffusionConfig | None) -> Mode:
        """The mode the run makes: this section's, or with `mode: null` the source's (`source` None: an
        AR model, which becomes bidirectional)."""
        if self.mode is None:
            mode = BidirectionalMode() if source is None else source.mode
            self._check_mode_settings(type(mode))
            return mode
        mode_class = MODES[self.mode]
        return mode_class(**{f.name: getattr(self, f.name) for f in dataclasses.fields(mode_class)})

    def mode_at(self, mode: Mode, step: int, steps: int) -> Mode:
        """The mode optimizer step `step` trains (a "grow" schedule over `steps` steps, or `mode` itself)."""
        return mode.grown(step, steps) if self.block_schedule == "grow" else mode


def objective_of(config: DiffusionConfig, training: DiffusionTraining | None = None) -> Objective:
    """The model's objective (`config.objective`, with its recorded state), with the settings of `training`
    (None: the defaults)."""
    return OBJECTIVES[config.objective](training or DiffusionTraining(), config.objective_state)


@dataclass
class TeacherTerm:
    """A frozen teacher's logits at a batch's masked positions (row-major, like the student's) and how its
    KL term joins the loss: `weight`, `temperature`, what the summed KL is divided by (None: this batch's
    masked tokens; the training loop passes its whole step's), and whether it is the whole loss (`alone`:
    on-policy distillation, where the tokens are the student's own and their CE would teach nothing)."""

    logits: torch.Tensor
    weight: float
    temperature: float
    denominator: float | None = None
    alone: bool = False


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar, differentiable: the weighted masked terms (the objective's), normalised per `loss_norm`
    unweighted: torch.Tensor  # scalar: plain CE averaged over masked tokens (no 1/t), for logging
    num_masked: int  # masked (scored) tokens in the batch
    num_tokens: int  # non-padding tokens in the batch (what a run counts as trained on)
    # Sums the objective needs before its first step (`Objective.calibration_statistics`); None when it does not.
    calibration: torch.Tensor | None = None
    ar_ce: torch.Tensor | None = None  # scalar: a hybrid model's AR cross-entropy per maskable position, for logging
    distill_kl: torch.Tensor | None = None  # scalar: the teacher KL per masked token (unweighted), for logging


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


def draw_noise(
    input_ids: torch.Tensor,
    config: DiffusionConfig,
    training: DiffusionTraining,
    maskable: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of one forward, each part drawn unless given: levels t (B,) and the corrupted
    positions (bool (B, L)), always among the `maskable` ones."""
    if t is None:
        t = sample_t(input_ids.shape[0], *training.noise_band, device=input_ids.device, generator=generator)
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


def loss_denominator(training: DiffusionTraining, mask: torch.Tensor, maskable: torch.Tensor) -> int:
    """What the weighted sum of the masked terms is divided by: the masked tokens ("masked") or the
    maskable ones ("tokens": every position that could be a target, so SFT prompts and padding do not count)."""
    return int(mask.sum()) if training.loss_norm == "masked" else int(maskable.sum())


def diffusion_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: DiffusionConfig,
    training: DiffusionTraining | None = None,
    *,
    objective: Objective | None = None,
    attention_mask: torch.Tensor | None = None,
    never_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    denominator: float | None = None,
    ar_denominator: float | None = None,
    teacher: TeacherTerm | None = None,
    generator: torch.Generator | None = None,
) -> DiffusionLoss:
    """One Monte Carlo sample of the diffusion loss of token ids (B, L), laid out as `config.mode` trains it.

    `training` gives the noise band and the normalisation (None: the defaults), `objective` the terms
    and weights (None: `objective_of(config, training)`; the training loop passes the one it calibrated).
    `t` (B,) fixes the noise levels, `mask` (bool (B, L)) the corrupted tokens (intersected with the
    maskable positions: position 0, `never_mask` and padding stay clean). The weighted terms are summed
    and divided by `denominator` (default: this batch's `loss_denominator`; the training loop passes its
    whole step's count, all micro-batches and processes, so the objective does not depend on the split).

    A mode with an AR stream (hybrid) adds the AR cross-entropy of every maskable position, read off its
    clean stream in the same forward and divided by `ar_denominator` (by default this batch's maskable
    positions): (alpha L_AR + L_diff) / (1 + alpha), alpha = `training.ar_weight`. Then the certainty
    term (`training.certainty_weight`) and a `teacher`'s weighted KL (adapt/train/distill.py) are added."""
    check_type("input_ids", input_ids, torch.Tensor, "a tensor of token ids (B, L), e.g. torch.tensor([ids])")
    if config.mask_token_id is None:
        raise ValueError("DiffusionConfig.mask_token_id is not set; call adapt.ensure_mask_token first")
    training = training or DiffusionTraining()
    objective = objective or objective_of(config, training)
    maskable = maskable_positions(input_ids, attention_mask, never_mask)
    t, mask = draw_noise(input_ids, config, training, maskable, t=t, mask=mask, generator=generator)
    logits, ar_logits = _outputs(model, input_ids, mask, config, attention_mask=attention_mask, ar_targets=maskable)
    terms, ce = objective.terms(logits, input_ids[mask], config.mask_token_id)
    weights = objective.weights(t, mask, attention_mask, config.mode, config.shift)

    num_masked = int(mask.sum())
    if denominator is None:
        denominator = loss_denominator(training, mask, maskable)
    loss, ar_ce, distill_kl = (terms * weights).sum() / max(denominator, 1), None, None
    if ar_logits is not None:
        loss, ar_ce = _with_ar_loss(loss, ar_logits, input_ids[maskable], training.ar_weight, ar_denominator)
    if training.certainty_weight > 0:
        loss = _with_certainty(loss, logits, input_ids[mask], training, config.mask_token_id, denominator)
    if teacher is not None:
        loss, distill_kl = _with_teacher_kl(loss, logits, teacher, num_masked)
    return DiffusionLoss(
        loss=loss,
        unweighted=ce.detach().sum() / max(num_masked, 1),
        num_masked=num_masked,
        num_tokens=int(attention_mask.sum()) if attention_mask is not None else input_ids.numel(),
        calibration=(objective.calibration_statistics(logits, config.mask_token_id)
                     if objective.needs_calibration() else None),
        ar_ce=ar_ce,
        distill_kl=distill_kl,
    )


def _with_ar_loss(diffusion: torch.Tensor, ar_logits: torch.Tensor, targets: torch.Tensor, weight: float,
                  denominator: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """((alpha L_AR + L_diff) / (1 + alpha), the AR cross-entropy per target for logging): L_AR is the AR
    head's summed CE over `targets` divided by `denominator` (None: their count), alpha `weight`."""
    ar_sum = F.cross_entropy(ar_logits, targets, reduction="none").float().sum()
    count = max(targets.numel(), 1)
    ar_loss = ar_sum / max(count if denominator is None else denominator, 1)
    return (diffusion + weight * ar_loss) / (1 + weight), ar_sum.detach() / count


def _with_certainty(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, training: DiffusionTraining,
                    mask_token_id: int, denominator: float) -> torch.Tensor:
    """The loss with dParallel's certainty term added: the entropy of the right predictions among the
    masked tokens' `logits`, times its weight, divided as the CE terms are."""
    entropy = certainty_entropy(logits, targets, training.certainty_temperature, mask_token_id)
    return loss + training.certainty_weight * entropy.sum() / max(denominator, 1)


def _with_teacher_kl(loss: torch.Tensor, logits: torch.Tensor, teacher: TeacherTerm,
                     num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss with the teacher's weighted KL added, divided by its denominator; or that KL alone, for a
    teacher that is the whole loss; and the KL per masked token for logging)."""
    kl = teacher_kl(logits, teacher.logits, teacher.temperature)
    denominator = num_masked if teacher.denominator is None else teacher.denominator
    term = teacher.weight * kl.sum() / max(denominator, 1)
    return (term if teacher.alone else loss + term), kl.detach().sum() / max(num_masked, 1)


def masked_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, config: DiffusionConfig, *,
                  attention_mask: torch.Tensor | None = None, prefix=None) -> torch.Tensor:
    """The outputs (N, V) at the masked positions of x_t (`input_ids` with `mask` replaced by the mask
    token), as the model's mode computes them in training; `prefix` is the mode's `clean_prefix`."""
    logits, _ = _outputs(model, input_ids, mask, config, attention_mask=attention_mask, prefix=prefix)
    return logits


def _outputs(model, input_ids, mask, config: DiffusionConfig, *, attention_mask=None, prefix=None, ar_targets=None):
    """(the outputs at the masked positions of x_t, and those of the AR head at `ar_targets` where the
    mode has an AR stream, else None), from one forward laid out as the mode trains."""
    noisy = input_ids.masked_fill(mask, config.mask_token_id)
    hidden, ar_hidden = config.mode.hidden(model, noisy, input_ids, mask, shift=config.shift,
                                           attention_mask=attention_mask, prefix=prefix, ar_targets=ar_targets)
    return output_logits(model, hidden), None if ar_hidden is None else output_logits(model, ar_hidden)


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
    objective: Objective | None = None,
) -> ELBO:
    """Monte Carlo estimate of the negative ELBO of the target tokens given the rest (for a score-entropy
    model the score-entropy bound, SEDD's; a CART model is scored by the plain 1/t-weighted ELBO).

    Only target tokens are ever masked; the others are clean context (the prompt of a multiple-choice
    question, say). Default targets: every non-padding position but 0. The estimate is the 1/t form
    with t integrated out given the mask (LLaDA's estimator, docs/method.md): sample k masks exactly
    l_k = ceil(n (k + u)/K) of a row's n targets, chosen uniformly, and weighs its terms n / l_k; one
    shared u ~ U(0, 1) stratifies the counts. Unbiased for the ELBO over t ~ U(0, 1), with far less
    variance than Bernoulli(t) masks weighted 1/t (multiple choice needs it: docs/results.md). The
    mode's `prefix` (`config.mode.clean_prefix` of these targets) is built here unless the caller has it
    already; `objective` (None: the model's own, `objective_of(config)`) gives each masked token's term.
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
        prefix = config.mode.clean_prefix(model, input_ids, target_mask, config.shift)
    objective = objective or objective_of(config)
    for k in range(n_samples):
        mask, weight = mask_exactly(target_mask, (k + offset.item()) / n_samples, generator)
        logits = masked_logits(model, input_ids, mask, config, attention_mask=attention_mask, prefix=prefix)
        terms, _ = objective.terms(logits.float(), input_ids[mask], config.mask_token_id)
        rows = mask.nonzero()[:, 0]
        total.index_add_(0, rows, terms.double() * weight[rows])
    return ELBO(nll=total / n_samples, num_tokens=target_mask.sum(dim=1))


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
