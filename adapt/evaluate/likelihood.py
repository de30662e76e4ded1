"""Log-likelihood of a continuation given its context: diffusion ELBO or exact AR.

The one scoring primitive behind multiple choice and the lm-evaluation-harness adapter. A diffusion
model (a `DiffusionConfig` given) masks only the continuation's tokens and averages the weighted CE
over masks of stratified sizes (`elbo_nll`): its NLL is the negative ELBO, an upper bound. A causal model
(`config=None`) gives the exact sum of next-token log-probabilities, on the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import DiffusionConfig, elbo_nll, masked_logits
from ..forward import predict_logits
from ..errors import UserError
from ..sampling import context_ids
from .perplexity import evaluation_mode, model_device, sampling_ratio


@dataclass
class Score:
    nll: float  # nats, summed over the continuation's tokens (negative ELBO for a diffusion model)
    num_tokens: int  # continuation tokens scored
    greedy: bool  # every continuation token is the model's argmax (diffusion: with the whole continuation masked)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(ids of context + continuation, index of the first continuation token).

    The two are tokenized separately, so the continuation's tokens never depend on the context and the
    boundary is exact. A BOS goes first where the tokenizer adds one; an empty context gets BOS (or EOS)
    so that position 0, which the shift never predicts, is never part of the continuation.
    """
    given = context_ids(tokenizer, context)
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return given + continuation_ids, len(given)


@torch.no_grad()
def continuation_scores(
    model: nn.Module,
    sequences: list[list[int]],
    starts: list[int],
    *,
    config: DiffusionConfig | None,
    n_samples: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[Score]:
    """Score tokens `sequences[i][starts[i]:]` given `sequences[i][:starts[i]]`, in batches.

    `config=None`, or a model with an AR head (hybrid): the exact AR log-likelihood, at attention ratio 0.
    Otherwise the diffusion ELBO, at the ratio the model samples at, with `n_samples` masks; each batch
    draws from a generator seeded with `seed`, so choices scored in one batch share the levels that set
    their mask sizes (common random numbers make their comparison sharper).
    Sequences longer than `max_length` lose context tokens from the left (after the first token).
    """
    scores = []
    if config is not None and config.mode.has_ar_head:
        config = None  # its AR head's exact likelihood: no Monte Carlo, no cap on what it can score
    with evaluation_mode(model, sampling_ratio(config)):
        for first in range(0, len(sequences), batch_size):
            rows = [_truncate(seq, start, max_length) for seq, start in
                    zip(sequences[first:first + batch_size], starts[first:first + batch_size])]
            scores += _score_batch(model, rows, config, n_samples, seed)
    return scores


def _truncate(sequence: list[int], start: int, max_length: int | None) -> tuple[list[int], int]:
    if max_length is None or len(sequence) <= max_length:
        return sequence, start
    drop = len(sequence) - max_length
    if drop >= start - 1:
        raise UserError(f"a continuation of {len(sequence) - start} tokens does not fit in the model's {max_length} "
                        "positions; leave that example out of the --data file")
    return sequence[:1] + sequence[1 + drop:], start - drop


def _score_batch(model, rows, config, n_samples, seed) -> list[Score]:
    device = model_device(model)
    length = max(len(seq) for seq, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    padding = torch.zeros_like(ids)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    for i, (seq, start) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq, device=device)
        padding[i, :len(seq)] = 1
        targets[i, start:len(seq)] = True
    row_of_target = targets.nonzero()[:, 0]

    if config is None:
        logits = predict_logits(model, ids, targets, shift=True, attention_mask=padding).float()
        token_nll = F.cross_entropy(logits, ids[targets], reduction="none").double()
        nll = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of_target, token_nll)
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        prefix = config.mode.clean_prefix(model, ids, targets, config.shift)  # the clean context, run once for both
        nll = elbo_nll(model, ids, config, n_samples=n_samples, target_mask=targets, attention_mask=padding,
                       generator=generator, prefix=prefix).nll
        # Greedy check: one forward with the whole continuation masked.
        logits = masked_logits(model, ids, targets, config, attention_mask=padding, prefix=prefix).float()
    wrong = (logits.argmax(dim=-1) != ids[targets]).long()
    misses = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(0, row_of_target, wrong)
    counts = targets.sum(dim=1)
    return [Score(nll=float(nll[i]), num_tokens=int(counts[i]), greedy=bool(misses[i] == 0)) for i in range(len(rows))]
