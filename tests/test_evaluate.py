import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapt.attention import get_attention_ratio, set_attention
from adapt.diffusion import DiffusionConfig, elbo_nll, predict_logits
from adapt.evaluate import ar_perplexity, elbo_perplexity
from adapt.presets import VOCAB, tiny_model

MASK_ID = VOCAB - 1


def _config(**overrides):
    return DiffusionConfig(mask_token_id=MASK_ID, **overrides)


def _exact_negative_elbo(model, ids, config):
    """E_{t~U(eps,1)} E_{mask~Bernoulli(t)} [sum_masked CE / t], by enumerating every mask pattern.

    P(pattern of size k | t) = t^k (1-t)^(n-k); the t-integral of t^(k-1) (1-t)^(n-k) / (1-eps) is done
    by fine quadrature (the integrand is a polynomial, the quadrature error is far below the MC error).
    """
    n = ids.shape[1] - 1
    grid = np.linspace(config.eps, 1.0, 200_001)
    total = 0.0
    for pattern in itertools.product([False, True], repeat=n):
        k = sum(pattern)
        if k == 0:
            continue
        mask = torch.tensor([[False, *pattern]])
        logits = predict_logits(model, ids.masked_fill(mask, MASK_ID), mask, shift=config.shift)
        loss = float(F.cross_entropy(logits, ids[mask], reduction="sum"))
        weight = np.trapezoid(grid ** (k - 1) * (1 - grid) ** (n - k), grid) / (1 - config.eps)
        total += weight * loss
    return total


@pytest.mark.parametrize("shift", [True, False])
def test_elbo_estimate_matches_enumerated_expectation(shift):
    model = tiny_model("llama")
    set_attention(model, 1.0)
    config = _config(shift=shift)
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        exact = _exact_negative_elbo(model, ids, config)

    # 512 independent estimates (rows) of 64 stratified samples each; their mean is within a few
    # standard errors of the exact value.
    rows = ids.expand(512, -1)
    estimate = elbo_nll(model, rows, config, n_samples=64, generator=torch.Generator().manual_seed(0)).nll
    mean, stderr = float(estimate.mean()), float(estimate.std() / math.sqrt(len(estimate)))
    assert abs(mean - exact) < 4 * stderr + 1e-6, (mean, exact, stderr)
    assert stderr < 0.02 * exact  # the test has power: the tolerance is tight relative to the value


def test_causal_one_target_elbo_converges_to_ar_cross_entropy():
    # At ratio 0 with the shift the prediction for the last token never sees the mask pattern, so the
    # ELBO of one target token is CE * E[1{masked}/t] = CE: the diffusion and AR perplexities agree.
    # Each block is repeated 64 times (independent masks) so the estimate's relative standard error,
    # sqrt(E[(1-t)/t] / (K * repeats)) ~ 1%, makes a 4% tolerance (in nats) a real test.
    model = tiny_model("llama")
    blocks = torch.tensor([[1, 17], [1, 80], [5, 3], [9, 44]]).repeat_interleave(64, dim=0)
    ar = math.log(ar_perplexity(model, blocks, batch_size=256))
    elbo = math.log(elbo_perplexity(model, blocks, _config(), n_samples=256, batch_size=256, attention_ratio=0.0))
    assert elbo == pytest.approx(ar, rel=0.04)


def test_ar_perplexity_is_the_causal_lm_loss():
    model = tiny_model("gpt2")
    blocks = torch.randint(3, VOCAB - 1, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=blocks, labels=blocks).loss))
    assert ar_perplexity(model, blocks, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_perplexities_restore_the_callers_attention_ratio_and_mode():
    model = tiny_model("llama").train()
    set_attention(model, 0.25)
    blocks = torch.randint(3, VOCAB - 1, (2, 8))
    first = elbo_perplexity(model, blocks, _config(), n_samples=4, seed=3)
    ar_perplexity(model, blocks)
    assert get_attention_ratio(model) == 0.25 and model.training
    assert elbo_perplexity(model, blocks, _config(), n_samples=4, seed=3) == first  # seeded: reproducible
