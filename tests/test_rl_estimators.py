"""The log-probability estimators of `adapt rl` against the exact ELBO, enumerated over every mask of a
short completion: coupled-GRPO's pair covers each completion token once and is unbiased for the ELBO,
diffu-GRPO's one-step estimate is the all-masked term on a thinned prompt, the AR head is exact; and
the variance of the coupled pair against independent masks of the same cost."""

import dataclasses
import itertools
import math

import torch

import adapt
from adapt.diffusion import DiffusionConfig, masked_logits
from adapt.hybrid import HybridMode
from adapt.presets import tiny_model, tiny_tokenizer
from adapt.rl.estimators import draw_noise, token_logps

from .tiny_runs import SENTENCE

PROMPT, COMPLETION = 4, 5  # of SENTENCE's 9 tokens


def _hybrid():
    """A tiny hybrid conversion of a Llama (untrained), causal, and its DiffusionConfig."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    config = dataclasses.replace(DiffusionConfig.from_model_config(model.config), mode=HybridMode(2))
    config.save_to(model.config)
    adapt.set_attention(model, 0.0)
    return model, config


def _sequence():
    return tiny_tokenizer()(SENTENCE, return_tensors="pt").input_ids  # what the `trained` model has learnt


def _log_p(model, config, ids, mask):
    """log p(x_i | x with `mask` masked) for each masked position i of the one row `ids`, as {i: value}."""
    with torch.no_grad():
        logits = masked_logits(model, ids, mask, config)
    logits[:, config.mask_token_id] = -math.inf
    values = logits.log_softmax(-1).gather(1, ids[mask][:, None]).squeeze(1)
    return dict(zip(mask[0].nonzero()[:, 0].tolist(), values.tolist()))


def _exact_elbo(model, config):
    """The ELBO of the completion given the prompt: sum over mask sizes l of 1/l times the mean, over the
    masks of l completion tokens, of their summed log-probabilities (Bernoulli(t) masks with the 1/t
    weight and t ~ U(0, 1), integrated exactly)."""
    ids, total = _sequence(), 0.0
    positions = range(PROMPT, PROMPT + COMPLETION)
    for size in range(1, COMPLETION + 1):
        masks = list(itertools.combinations(positions, size))
        for chosen in masks:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, list(chosen)] = True
            total += sum(_log_p(model, config, ids, mask).values()) / size / len(masks)
    return total


def _estimates(model, config, estimator, draws, seed=0, prompt_mask_prob=0.0):
    """(draws,) the per-completion estimates sum_i w_i log p_i of `draws` independent noises."""
    ids = _sequence().expand(draws, -1)
    noise = draw_noise(estimator, ids, PROMPT, prompt_mask_prob, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logps = token_logps(model, config, ids, PROMPT, noise.masks)
    return (noise.weights * logps).sum(dim=1).double()


def test_the_coupled_pair_covers_every_completion_token_exactly_once_and_never_the_prompt():
    ids = torch.randint(3, 100, (64, 10), generator=torch.Generator().manual_seed(0))
    noise = draw_noise("coupled", ids, 4, 0.0, torch.Generator().manual_seed(1))
    first, second = noise.masks[:64], noise.masks[64:]
    assert not (first | second)[:, :4].any()
    assert ((first.int() + second.int())[:, 4:] == 1).all()
    sizes = first[:, 4:].sum(dim=1)
    assert len(set(sizes.tolist())) > 3  # the first mask's size varies (uniform on 0..C)
    # a token's weight is (C + 1) / (2 |its mask|): each mask's weights add up to (C + 1) / 2
    own_size = torch.where(first[:, 4:], sizes[:, None], 6 - sizes[:, None]).float()
    torch.testing.assert_close(noise.weights, 7 / (2 * own_size))


def test_diffu_grpo_masks_the_whole_completion_and_thins_the_prompt():
    ids = torch.randint(3, 100, (2000, 12), generator=torch.Generator().manual_seed(0))
    noise = draw_noise("diffu-grpo", ids, 6, 0.3, torch.Generator().manual_seed(1))
    assert noise.masks[:, 6:].all() and not noise.masks[:, 0].any()
    rate = noise.masks[:, 1:6].float().mean().item()
    assert abs(rate - 0.3) < 0.02
    assert (noise.weights == 1).all()


def test_the_coupled_estimate_is_unbiased_for_the_enumerated_elbo(trained):
    model, _, config = trained
    exact = _exact_elbo(model, config)
    estimates = _estimates(model, config, "coupled", draws=4000)
    error = estimates.std().item() / math.sqrt(len(estimates))
    print(f"ELBO {exact:.4f}; coupled mean {estimates.mean():.4f} +- {error:.4f}")
    assert abs(estimates.mean().item() - exact) < 4 * error


def test_diffu_grpo_is_the_all_masked_term_on_a_thinned_prompt(trained):
    """Without prompt masking it is deterministic: every completion token predicted from the prompt alone,
    the l = C term of the ELBO times C. With masking its mean is that term averaged over the prompt's
    masks, enumerated here; and it is not the ELBO (the gap is the estimator's bias, reported)."""
    model, _, config = trained
    ids = _sequence()
    all_masked = torch.zeros_like(ids, dtype=torch.bool)
    all_masked[0, PROMPT:] = True
    one_step = sum(_log_p(model, config, ids, all_masked).values())
    plain = _estimates(model, config, "diffu-grpo", draws=3)
    torch.testing.assert_close(plain, torch.full((3,), one_step, dtype=torch.float64), rtol=1e-5, atol=1e-5)

    p, expected = 0.5, 0.0
    for thinned in itertools.product([False, True], repeat=PROMPT - 1):  # position 0 is never masked
        mask = all_masked.clone()
        mask[0, 1:PROMPT] = torch.tensor(thinned)
        chance = math.prod(p if masked else 1 - p for masked in thinned)
        values = _log_p(model, config, ids, mask)
        expected += chance * sum(values[i] for i in range(PROMPT, PROMPT + COMPLETION))
    estimates = _estimates(model, config, "diffu-grpo", draws=4000, prompt_mask_prob=p)
    error = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - expected) < 4 * error
    elbo = _exact_elbo(model, config)
    print(f"ELBO {elbo:.4f}; diffu-grpo p=0: {one_step:.4f}, p={p}: {expected:.4f} (bias {expected - elbo:+.4f})")
    assert abs(one_step - elbo) > 10 * error  # a different quantity, not a noisy ELBO


def test_the_ar_estimate_is_the_ar_heads_exact_log_likelihood():
    model, config = _hybrid()
    ids = _sequence()
    noise = draw_noise("ar", ids, PROMPT, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logps = token_logps(model, config, ids, PROMPT, noise.masks)
        logits = model(input_ids=ids).logits[0, PROMPT - 1:-1, :config.vocab_size]  # the rest pads the rows
    logits[:, config.mask_token_id] = -math.inf
    exact = logits.log_softmax(-1).gather(1, ids[0, PROMPT:, None]).squeeze(1)
    torch.testing.assert_close(logps[0], exact, rtol=1e-5, atol=1e-5)


def test_the_coupled_pair_has_less_variance_than_two_independent_masks(trained):
    """Same cost (two forwards a completion): a complementary pair against the mean of two independent
    single masks (each l ~ U{0..C}, weight (C + 1) / l); the pair's variance is the smaller."""
    model, _, config = trained
    pairs = _estimates(model, config, "coupled", draws=4000, seed=1)
    ids = _sequence().expand(8000, -1)
    noise = draw_noise("coupled", ids, PROMPT, 0.0, torch.Generator().manual_seed(2))
    first = noise.masks[:8000]
    with torch.no_grad():
        logps = token_logps(model, config, ids, PROMPT, noise.masks)
    size = first[:, PROMPT:].sum(dim=1, keepdim=True).clamp(min=1)
    single = ((COMPLETION + 1) / size * (logps * first[:, PROMPT:])).sum(dim=1).double()  # the first mask alone
    independent = single.view(2, 4000).mean(dim=0)
    print(f"variance of the estimate: coupled pair {pairs.var():.3f}, two independent masks "
          f"{independent.var():.3f}, one mask {single.var():.3f}")
    assert pairs.var() < independent.var()
