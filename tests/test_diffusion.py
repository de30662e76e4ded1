"""The diffusion objective: corruption, shift, weighting, normalisation, ELBO, config round trip."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import adapt
from adapt.block import BlockMode
from adapt.diffusion import DiffusionConfig, DiffusionTraining, corrupt, maskable_positions
from adapt.errors import UserError
from adapt.forward import predict_logits
from adapt.presets import FAMILIES, VOCAB, tiny_model
from adapt.structure import decoder_backbone

from .conftest import FAMILY_IMPLS

MASK_ID = VOCAB - 1


def _config(**overrides):
    return DiffusionConfig(mask_token_id=MASK_ID, **overrides)


def _tokens(batch=2, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 1, (batch, length), generator=g)


def _capture_inputs(model):
    """Record the token ids the backbone actually sees."""
    seen = []
    decoder_backbone(model).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    return seen


@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_head_on_selected_positions_equals_the_full_forward(family, impl):
    model = tiny_model(family, impl)
    ids = _tokens()
    targets = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    targets[:, 0] = False
    with torch.no_grad():
        full = model(input_ids=ids).logits
        torch.testing.assert_close(predict_logits(model, ids, targets, shift=True), full[:, :-1][targets[:, 1:]])
        torch.testing.assert_close(predict_logits(model, ids, targets, shift=False), full[targets])


@pytest.mark.parametrize("family", FAMILIES)
def test_shift_with_one_masked_token_at_t1_is_the_ar_loss(family):
    """Ratio 0, shift on, one masked position i, t = 1: the loss is the AR cross-entropy of token i."""
    model = tiny_model(family, "eager")
    ids = _tokens(batch=1, length=10)
    for i in (1, 4, 9):
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, i] = True
        with torch.no_grad():
            out = adapt.diffusion_loss(model, ids, _config(), t=torch.ones(1), mask=mask)
            ar = F.cross_entropy(model(input_ids=ids).logits[0, i - 1], ids[0, i])
        assert out.num_masked == 1
        torch.testing.assert_close(out.loss, ar, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.unweighted, ar, rtol=1e-6, atol=1e-6)


def test_without_shift_the_prediction_is_read_at_the_same_position():
    model = tiny_model("llama", "eager")
    ids = _tokens(batch=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 5] = True
    noisy = ids.masked_fill(mask, MASK_ID)
    with torch.no_grad():
        out = adapt.diffusion_loss(model, ids, _config(shift=False), t=torch.ones(1), mask=mask)
        expected = F.cross_entropy(model(input_ids=noisy).logits[0, 5], ids[0, 5])
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_loss_is_weighted_by_one_over_t_per_sequence():
    model = tiny_model("llama")
    ids = _tokens()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 3] = mask[1, 6] = True
    with torch.no_grad():
        unit = adapt.diffusion_loss(model, ids, _config(), t=torch.tensor([1.0, 1.0]), mask=mask)
        first_only = adapt.diffusion_loss(model, ids, _config(), t=torch.tensor([0.25, 1.0]), mask=mask)
        single = [
            adapt.diffusion_loss(model, ids[b : b + 1], _config(), t=torch.ones(1), mask=mask[b : b + 1]).loss
            for b in range(2)
        ]
    # "masked" normalisation: (4 * ce0 + ce1) / 2 masked tokens
    torch.testing.assert_close(first_only.loss, (4 * single[0] + single[1]) / 2)
    torch.testing.assert_close(unit.loss, (single[0] + single[1]) / 2)
    torch.testing.assert_close(first_only.unweighted, unit.unweighted)  # the plain CE ignores t


def test_both_normalisations():
    """`masked` divides by the masked tokens, `tokens` by the maskable ones: never position 0, padding
    or a prompt (`never_mask`), which are never targets."""
    model = tiny_model("gpt2")
    ids = _tokens(batch=3, length=16)
    padding = torch.ones_like(ids)
    padding[2, 12:] = 0
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[0, :6] = True
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731 - same corruption for both runs
    with torch.no_grad():
        masked = adapt.diffusion_loss(model, ids, _config(), DiffusionTraining(loss_norm="masked"),
                                      attention_mask=padding, never_mask=prompt, generator=gen())
        tokens = adapt.diffusion_loss(model, ids, _config(), DiffusionTraining(loss_norm="tokens"),
                                      attention_mask=padding, never_mask=prompt, generator=gen())
    assert masked.num_masked == tokens.num_masked > 0
    assert tokens.num_tokens == 3 * 16 - 4
    maskable = tokens.num_tokens - 3 - 5  # position 0 of each row, and the prompt's other 5 positions
    torch.testing.assert_close(masked.loss * masked.num_masked, tokens.loss * maskable)


def test_never_mask_position_zero_and_padding_stay_clean():
    model = tiny_model("qwen2")
    ids = _tokens(batch=2, length=12)
    never = torch.zeros_like(ids, dtype=torch.bool)
    never[:, :5] = True  # a "prompt"
    padding = torch.ones_like(ids)
    padding[1, 9:] = 0
    seen = _capture_inputs(model)
    with torch.no_grad():
        for seed in range(20):
            out = adapt.diffusion_loss(
                model, ids, _config(), attention_mask=padding, never_mask=never,
                t=torch.ones(2), generator=torch.Generator().manual_seed(seed),
            )
    for noisy in seen:
        assert torch.equal(noisy[:, :5], ids[:, :5])
        assert torch.equal(noisy[1, 9:], ids[1, 9:])
    # at t = 1 everything else is masked, padding is not a target
    assert (seen[0][0, 5:] == MASK_ID).all() and (seen[0][1, 5:9] == MASK_ID).all()
    assert out.num_masked == 7 + 4


def test_explicit_mask_cannot_corrupt_protected_positions():
    model = tiny_model("llama")
    ids = _tokens(batch=1)
    seen = _capture_inputs(model)
    with torch.no_grad():
        out = adapt.diffusion_loss(model, ids, _config(), t=torch.ones(1), mask=torch.ones_like(ids, dtype=torch.bool))
    assert seen[0][0, 0] == ids[0, 0] and out.num_masked == ids.shape[1] - 1


def test_corruption_rate_follows_t():
    ids = torch.full((4, 2000), 7)
    maskable = maskable_positions(ids)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    _, mask = corrupt(ids, t, maskable, MASK_ID, generator=torch.Generator().manual_seed(0))
    rates = mask[:, 1:].float().mean(dim=1)
    assert torch.allclose(rates, t, atol=0.04)


def test_random_t_is_in_range_and_seeded():
    model = tiny_model("llama")
    ids = _tokens()
    with torch.no_grad():
        a = adapt.diffusion_loss(model, ids, _config(), generator=torch.Generator().manual_seed(3))
        b = adapt.diffusion_loss(model, ids, _config(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss)
    t = adapt.diffusion.sample_t(10_000, 1e-3, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1.0


def test_loss_is_differentiable():
    model = tiny_model("llama").train()
    out = adapt.diffusion_loss(model, _tokens(), _config(), t=torch.full((2,), 0.5))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_elbo_of_one_token_is_its_cross_entropy_at_every_sample():
    """One target token: E_t[1{masked}/t * CE] = CE, and with t integrated out given the mask every
    sample masks that token with weight 1, so even four samples give the AR CE exactly."""
    model = tiny_model("llama", "eager")
    ids = _tokens(batch=1)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 7] = True
    with torch.no_grad():
        ar = F.cross_entropy(model(input_ids=ids).logits[0, 6], ids[0, 7]).item()
        elbo = adapt.elbo_nll(model, ids, _config(), n_samples=4, target_mask=target,
                              generator=torch.Generator().manual_seed(0))
    assert elbo.num_tokens.tolist() == [1]
    assert elbo.per_token == pytest.approx(ar, rel=1e-5)


def test_exact_count_masks_are_uniform_choices_of_the_stratified_count():
    targets = torch.tensor([[False, True, True, True, True, False], [False] * 6, [True] * 6])
    generator = torch.Generator().manual_seed(0)
    hits = torch.zeros(targets.shape)
    for _ in range(2000):
        mask, weight = adapt.diffusion.mask_exactly(targets, 0.3, generator)
        assert mask.sum(dim=1).tolist() == [2, 0, 2]  # ceil(0.3 * 4), none, ceil(0.3 * 6)
        assert not (mask & ~targets).any()
        hits += mask
    assert weight.tolist() == [2.0, 0.0, 3.0]
    # each target is masked with probability count / n: 1/2 and 1/3, within 4 standard errors
    for row, p in ((0, 0.5), (2, 1 / 3)):
        share = hits[row][targets[row]] / 2000
        assert (share - p).abs().max() < 4 * math.sqrt(p * (1 - p) / 2000), share


def test_elbo_is_deterministic_with_a_seed_and_bounds_are_sane():
    model = tiny_model("gpt2")
    adapt.set_attention(model, 1.0)
    ids = _tokens(batch=2, length=16)
    run = lambda: adapt.elbo_nll(model, ids, _config(), n_samples=8, generator=torch.Generator().manual_seed(1))  # noqa: E731
    a, b = run(), run()
    assert torch.equal(a.nll, b.nll)
    assert a.num_tokens.tolist() == [15, 15]
    assert a.perplexity > 1.0


def test_config_round_trips_through_config_json(tmp_path):
    from transformers import AutoConfig

    model = tiny_model("llama")
    config = DiffusionConfig(mask_token_id=5, mask_token_strategy="reuse", shift=False, mode=BlockMode(4),
                             objective="score-entropy", objective_state={"offset": 27.5}, base_model="tiny-llama",
                             tokens_trained=123, trained_with={"loss_norm": "tokens"})
    config.save_to(model.config)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["diffusion"]
    assert (written["mode"], written["block_size"], written["objective_state"]) == ("block", 4, {"offset": 27.5})
    assert DiffusionConfig.from_model_config(AutoConfig.from_pretrained(tmp_path)) == config


def test_a_section_written_before_modes_and_objective_states_loads_as_what_it_meant():
    """Checkpoints of earlier versions wrote every training setting into the section, a block size
    without a mode, and score-entropy's offset as `score_offset`."""
    old = {"mask_token_id": 5, "mask_token_strategy": "add", "shift": True, "eps": 1e-3, "anneal_steps": 40,
           "anneal_from": 0.0, "loss_norm": "masked", "base_model": "m", "tokens_trained": 7, "vocab_size": 64,
           "block_size": 4, "block_schedule": "constant", "objective": "score-entropy", "score_offset": 27.5,
           "cart_p": 0.1, "complementary_masks": False, "t_min": None, "t_max": 1.0, "annealing_finished": False}
    config = DiffusionConfig.from_dict(old)
    assert config.mode == BlockMode(4) and config.objective_state == {"offset": 27.5}
    assert DiffusionConfig.from_dict({**old, "block_size": None, "score_offset": None}).mode.name == "bidirectional"


@pytest.mark.parametrize("values,message", [
    ({"mask_token_strategy": "guess"}, "diffusion.mask_token_strategy = 'guess' (str) is not a valid choice"),
    ({"vocab_size": 0}, "diffusion.vocab_size = 0 is out of range"),
    ({"mode": "block", "block_size": 0}, "diffusion.block_size = 0 is out of range"),
    ({"mode": "spiral"}, "diffusion.mode = 'spiral' is not a mode this version of adapt knows"),
    ({"mode": "block"}, "diffusion.block_size is missing"),
    ({"mystery": 1}, "diffusion.mystery is a key this version of adapt does not know"),
    ({"mode": "bidirectional", "block_size": 4}, "unknown key diffusion.block_size"),  # known, but not this mode's
    ("block", "diffusion must be a mapping of keys, got 'block' (str)"),
])
def test_config_json_is_checked_key_by_key(values, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DiffusionConfig.from_dict({"mask_token_id": 5, **values} if isinstance(values, dict) else values)


@pytest.mark.parametrize("field,value", [("loss_norm", "mean"), ("eps", 0.0), ("t_max", 1.5), ("objective", "x")])
def test_training_settings_reject_invalid_values(field, value):
    with pytest.raises(UserError, match=f"diffusion.{field}"):
        DiffusionTraining(**{field: value})


def test_anneal_ratio_schedule():
    assert [adapt.attention.anneal_ratio(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert adapt.attention.anneal_ratio(0, 1) == 1.0
    assert adapt.attention.anneal_ratio(0, 2, start=0.5) == 0.75  # a partly annealed source goes on from its ratio
