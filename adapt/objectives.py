"""The diffusion objectives: what each masked token contributes to the loss (docs/method.md derives each).

Every objective shares the corruption, the shift, the loss normalisation and the step-wide denominator
(adapt/diffusion.py); one differs from another in each masked token's term and weight:

* `mdm` (`MaskedDiffusion`): the cross-entropy, weighted 1/t (DiffuLLaMA, MDLM);
* `score-entropy` (`ScoreEntropy`): SEDD's denoising score entropy of the outputs read as log concrete
  scores, weighted 1/t; its outputs' offset is measured at the first training step (`calibrate`);
* `cart` (`CART`): the cross-entropy weighted by Dream's context-adaptive weight instead of 1/t.

An objective is built from the training settings (`adapt.diffusion.DiffusionTraining`: its own settings
such as `cart_p`) and its state (what it measured, such as the offset: checkpointed and exported in
config.json's `objective_state`). The training loop calls its hooks without knowing its name. A new
objective is a subclass here and an entry in `OBJECTIVES`.

This module depends only on torch; `adapt export` copies it into every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Objective:
    name = ""

    def __init__(self, settings, state: dict | None = None):
        """`settings`: the training settings (`DiffusionTraining`) the objective reads its own from;
        `state`: what an earlier run measured (`state_dict`)."""
        self.load_state_dict(state or {})

    def terms(self, logits: torch.Tensor, targets: torch.Tensor, mask_token_id: int):
        """Per masked token (N,): the term the loss weights, and the plain CE (detached, for logging).

        The CE runs in the logits' own dtype: the kernels already reduce in float32, and the logits are
        rounded to 16 bits by the head, so a float32 copy (plus the float32 log-softmax saved for
        backward) buys no precision; in bf16 on CPU it cost 2.4x the time of the whole CE
        (docs/performance.md)."""
        ce = F.cross_entropy(logits, targets, reduction="none").float()
        return ce, ce.detach()

    def weights(self, t: torch.Tensor, mask: torch.Tensor, attention_mask, mode, shift: bool) -> torch.Tensor:
        """The weight (N,) of each masked token's term (`mask`, bool (B, L)), in row-major order: 1/t of
        its sequence (levels `t`, (B,)), which makes the loss the ELBO."""
        return (1.0 / t)[:, None].expand_as(mask)[mask]

    def needs_calibration(self) -> bool:
        """Whether the first training step must measure something (`calibrate`) before its loss."""
        return False

    def calibration_statistics(self, logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """Sums (float64) over this forward's masked outputs that `calibrate` reads once they are
        summed over every micro-batch and process of the step."""
        raise NotImplementedError

    def calibrate(self, totals: torch.Tensor) -> str:
        """Set the state from the step's summed statistics; return what to log."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take the state `state_dict` gave (a checkpoint's, an export's)."""


class MaskedDiffusion(Objective):
    name = "mdm"


class ScoreEntropy(Objective):
    """SEDD (Lou, Meng, Ermon 2024): the outputs, less an offset, are log concrete scores.

    The offset is what an AR head's logits are far from: SmolLM2's have log Z about 27.5, and exp(27.5)
    as a loss wipes out what the model knew in a few steps. So it is measured (`calibrate`): the mean
    log Z of the first training step's masked outputs, which makes the geometric mean of Z exactly 1
    there (SEDD subtracts log(V-1) for a zero-initialised network for the same reason).
    """

    name = "score-entropy"

    def terms(self, logits, targets, mask_token_id):
        with torch.no_grad():
            ce = F.cross_entropy(logits, targets, reduction="none").float()
        return score_entropy(logits, targets, mask_token_id, offset=self.offset or 0.0), ce

    def needs_calibration(self):
        return self.offset is None

    def calibration_statistics(self, logits, mask_token_id):
        log_z = log_partition(logits.detach(), mask_token_id).double()
        return torch.stack([log_z.sum(), torch.tensor(float(log_z.numel()), dtype=torch.float64, device=log_z.device)])

    def calibrate(self, totals):
        log_z, count = totals.tolist()
        self.offset = log_z / max(count, 1.0)
        return f"score-entropy: outputs offset by {self.offset:.3f} (mean log Z of the step's masked tokens)"

    def state_dict(self):
        return {} if self.offset is None else {"offset": self.offset}

    def load_state_dict(self, state):
        self.offset = state.get("offset")  # None until the first training step measures it


class CART(Objective):
    """Dream 7B (Ye et al. 2025): the CE weighted by how much clean context each masked token's
    prediction reads (`cart_weights`) instead of 1/t. A training reweighting, not a bound: the ELBO of a
    CART model is the plain 1/t one."""

    name = "cart"

    def __init__(self, settings, state: dict | None = None):
        super().__init__(settings, state)
        self.p = settings.cart_p

    def weights(self, t, mask, attention_mask, mode, shift):
        real = torch.ones_like(mask) if attention_mask is None else attention_mask.bool()
        seen_if_clean, seen_always = mode.context_visibility(mask.shape[1], shift, mask.device)
        return cart_weights(mask, real, self.p, seen_if_clean, seen_always)[mask]


OBJECTIVES = {objective.name: objective for objective in (MaskedDiffusion, ScoreEntropy, CART)}


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


def teacher_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)) per row (N,), over the teacher's vocabulary (the
    student's logits past it, its added mask token, are left out: the student never predicts it)."""
    student = (student[:, :teacher.shape[-1]].float() / temperature).log_softmax(dim=-1)
    teacher = (teacher.float() / temperature).log_softmax(dim=-1)
    return temperature ** 2 * (teacher.exp() * (teacher - student)).sum(dim=-1)


def certainty_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float, mask_token_id: int) -> torch.Tensor:
    """dParallel's certainty term (N,): the entropy of softmax(logits / T) over the tokens (never the mask
    token) where the prediction is already right (argmax = target), 0 elsewhere. Its gradient sharpens
    right predictions only; a wrong one is left to the CE."""
    logits = logits.float().index_fill(-1, torch.tensor([mask_token_id], device=logits.device), -torch.inf)
    log_p = (logits / temperature).log_softmax(dim=-1)
    entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(dim=-1)
    return entropy * (logits.argmax(dim=-1) == targets)


def log_partition(outputs: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """log Z (N,), Z = sum over the tokens but the mask of exp(outputs[y]): 0 for normalised scores."""
    others = outputs.index_fill(-1, torch.tensor([mask_token_id], device=outputs.device), -torch.inf)
    return torch.logsumexp(others, dim=-1)


def cart_weights(mask: torch.Tensor, real: torch.Tensor, p: float, seen_if_clean: torch.Tensor,
                 seen_always: torch.Tensor) -> torch.Tensor:
    """Dream's CART weights (B, L): w_n = 1/2 sum_i p (1-p)^(|n-i|-1) over the context tokens i != n that
    the prediction of masked token n reads; 0 where nothing is masked.

    Which tokens it reads is the mode's (`Mode.context_visibility`, (L, L) each): `seen_if_clean` counts
    a position while it is clean (real, not masked; a prompt and position 0 included), `seen_always`
    counts it whenever it is real (a clean copy of it is read). Each side's kernel sums to 1/2 over an
    unbounded context, so 0 <= w_n <= 1.
    """
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)
    distance = (positions[:, None] - positions[None, :]).abs()
    kernel = 0.5 * p * torch.pow(1.0 - p, (distance - 1).clamp(min=0).float())  # [n, i]
    kernel.fill_diagonal_(0.0)
    clean = (real & ~mask).float()
    weights = clean @ (kernel * seen_if_clean).T + real.float() @ (kernel * seen_always).T
    return weights * mask
