"""Block diffusion: the AR model at block size 1, causal across blocks and bidirectional inside them,
an ELBO that is the exact expectation, the cached sampler identical to the uncached one, and training."""

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adapt
from adapt.bidirectional import BidirectionalMode
from adapt.block import BlockMode
from adapt.diffusion import DiffusionConfig, diffusion_loss, elbo_nll
from adapt.forward import output_logits, predict_logits
from adapt.presets import tiny_model, tiny_tokenizer
from adapt.sampling import generate_with_details, infill_with_details
from adapt.train import train

from .conftest import FAMILY_IMPLS
from .tiny_runs import SEQ_LEN, recipe_for


def block_model(family="llama", impl="sdpa", block_size=4):
    model, tokenizer = tiny_model(family, attn_implementation=impl), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    config = dataclasses.replace(DiffusionConfig.from_model_config(model.config), mode=BlockMode(block_size))
    config.save_to(model.config)
    return model.eval(), tokenizer, config


def block_logits(model, noisy, targets, *, clean, block_size=4, attention_mask=None, prefix=None):
    """The block model's training predictions for `targets`, shift on."""
    hidden, _ = BlockMode(block_size).hidden(model, noisy, clean, targets, shift=True, attention_mask=attention_mask,
                                             prefix=prefix)
    return output_logits(model, hidden)


def _ids(length=12, batch=1, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
def test_block_size_1_is_the_ar_model(family, impl):
    """One masked token at t = 1, the shift on: the loss is the AR cross-entropy of that token."""
    model, _, config = block_model(family, impl, block_size=1)
    ids = _ids()
    for i in (1, 6, 11):
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, i] = True
        with torch.no_grad():
            loss = diffusion_loss(model, ids, config, t=torch.ones(1), mask=mask).loss
            logits = model(input_ids=ids).logits[0, i - 1, :config.vocab_size]
        torch.testing.assert_close(loss, F.cross_entropy(logits[None], ids[0, i:i + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
def test_causal_across_blocks_and_bidirectional_inside(family, impl):
    model, _, config = block_model(family, impl, block_size=4)
    ids = _ids()
    noisy = ids.clone()
    noisy[0, 5:7] = config.mask_token_id
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, 4:7] = True  # block 1: its first token (read from the clean copy) and two masked ones

    def predictions(noisy, clean, block_size=4):
        with torch.no_grad():
            return block_logits(model, noisy, targets, clean=clean, block_size=block_size)

    reference = predictions(noisy, ids)
    later = ids.clone()
    later[0, 9] = 77  # a token of block 2
    noisy_later = noisy.clone()
    noisy_later[0, 9] = 77
    torch.testing.assert_close(predictions(noisy_later, later), reference, rtol=0, atol=0)
    inside = noisy.clone()
    inside[0, 7] = 77  # a clean token of block 1, after the masked ones
    changed = predictions(inside, ids)
    assert not torch.allclose(changed[1:], reference[1:])  # the masked tokens see it
    torch.testing.assert_close(changed[0], reference[0], rtol=0, atol=0)  # the first token does not
    # One bidirectional block (the whole sequence) sees block 2 from block 1.
    with torch.no_grad():
        adapt.set_attention(model, 1.0)
        whole = predict_logits(model, noisy, targets), predict_logits(model, noisy_later, targets)
    assert not torch.allclose(*whole)


def _whole_layout_logits(model, noisy, clean, targets, block_size, padding):
    """The block model's predictions read off the whole [noisy ; clean] layout of 2L positions, shift on."""
    from adapt.attention import mask_for_implementation
    from adapt.block import training_mask
    from adapt.structure import decoder_backbone

    length = noisy.shape[1]
    mask = training_mask(length, block_size, padding=padding)
    hidden = decoder_backbone(model)(input_ids=torch.cat([noisy, clean], dim=1),
                                     position_ids=torch.arange(length).repeat(2)[None].expand(len(noisy), -1),
                                     attention_mask=mask_for_implementation(mask, model)).last_hidden_state
    rows, columns = targets.nonzero(as_tuple=True)
    source = torch.where(columns % block_size == 0, length + columns - 1, columns - 1)
    return output_logits(model, hidden[rows, source])


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
def test_scoring_reads_only_what_the_targets_need_and_gives_the_whole_layouts_logits(family, impl):
    """The context blocks before the first target run once (`clean_prefix`), and each mask runs only
    the blocks a target reads against their keys and values: the logits of the whole two-copy layout,
    for a first target on a block boundary (read from the prefix's last output) and one inside a
    block, with padding; and without a prefix, targets ending before the last block."""
    from adapt.block import clean_prefix

    model, _, config = block_model(family, impl, block_size=4)
    ids = _ids(length=14, batch=2)
    padding = torch.ones_like(ids)
    padding[1, 12:] = 0
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, 8:14] = True  # from a block's first position
    targets[1, 10:12] = True  # from inside the same block
    mask = targets & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.5)
    mask[0, 8] = mask[1, 10] = True
    noisy = ids.masked_fill(mask, config.mask_token_id)
    prefix = clean_prefix(model, ids, targets, 4)
    assert prefix.length == 8
    early = mask.roll(-6, dims=1) & (torch.arange(14) > 0)  # blocks 0-1 only: no prefix, later blocks unread
    assert clean_prefix(model, ids, early, 4) is None
    with torch.no_grad():
        cached = block_logits(model, noisy, mask, clean=ids, attention_mask=padding, prefix=prefix)
        assert prefix.cache.get_seq_length() == 8  # scoring left the cache as it was
        again = block_logits(model, noisy, mask, clean=ids, attention_mask=padding, prefix=prefix)
        whole = _whole_layout_logits(model, noisy, ids, mask, 4, padding)
        early_noisy = ids.masked_fill(early, config.mask_token_id)
        shortened = block_logits(model, early_noisy, early, clean=ids, attention_mask=padding)
        early_whole = _whole_layout_logits(model, early_noisy, ids, early, 4, padding)
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, cached, rtol=0, atol=0)
    torch.testing.assert_close(shortened, early_whole, rtol=1e-4, atol=1e-4)


def test_scoring_continuations_runs_a_batchs_clean_context_once(monkeypatch):
    """The ELBO's masks and the greedy check of a batch of continuations share one `clean_prefix`,
    and sharing it changes no score: the same NLLs as the ELBO building its own."""
    import adapt.block
    from adapt.evaluate import continuation_scores
    from adapt.evaluate.perplexity import evaluation_mode

    model, _, config = block_model(block_size=4)
    ids = _ids(length=12, batch=3)
    built, clean_prefix = [], adapt.block.clean_prefix
    monkeypatch.setattr(adapt.block, "clean_prefix", lambda *a, **k: built.append(1) or clean_prefix(*a, **k))
    scores = continuation_scores(model, ids.tolist(), [9, 9, 9], config=config, n_samples=3, batch_size=3)
    assert len(built) == 1
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, 9:] = True
    with evaluation_mode(model, 1.0):
        alone = elbo_nll(model, ids, config, n_samples=3, target_mask=targets, attention_mask=torch.ones_like(ids),
                         generator=torch.Generator().manual_seed(0)).nll
    assert [s.nll for s in scores] == alone.tolist()


def _exact_block_elbo(model, ids, config, targets_per_block):
    """sum_b sum over non-empty mask sets M of block b: P(M) E[1/t | M] sum_{i in M} CE_i, t ~ U(0, 1)."""
    grid = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    total = 0.0
    for positions in targets_per_block:
        n = len(positions)
        for m in range(1, n + 1):
            weight = torch.trapezoid(grid ** (m - 1) * (1 - grid) ** (n - m), grid).item()
            for subset in itertools.combinations(positions, m):
                mask = torch.zeros_like(ids, dtype=torch.bool)
                mask[0, list(subset)] = True
                noisy = ids.masked_fill(mask, config.mask_token_id)
                with torch.no_grad():
                    logits = block_logits(model, noisy, mask, clean=ids, block_size=config.mode.block_size)
                total += weight * F.cross_entropy(logits, ids[mask], reduction="sum").item()
    return total


def test_the_elbo_is_the_exact_expectation_over_noise_levels_and_masks():
    model, _, config = block_model("llama", block_size=3)
    ids = _ids(length=7)
    exact = _exact_block_elbo(model, ids, config, [[1, 2], [3, 4, 5], [6]])
    rows = 64
    estimate = elbo_nll(model, ids.repeat(rows, 1), config, n_samples=256,
                        generator=torch.Generator().manual_seed(1)).nll
    error = estimate.std().item() / math.sqrt(rows)
    assert abs(estimate.mean().item() - exact) < 4 * error, (estimate.mean().item(), exact, error)


def _cases():
    for family, impl in FAMILY_IMPLS:
        yield family, impl, "confidence", 0.0
    yield "llama", "sdpa", "random", 1.0
    yield "gpt2", "sdpa", "margin", 0.8


@pytest.mark.parametrize("family, impl, strategy, temperature", list(_cases()))
def test_cached_sampling_is_the_uncached_sampling(family, impl, strategy, temperature):
    """Token for token, for prompts that end inside a block and on its boundary, and for infilling."""
    model, tokenizer, _ = block_model(family, impl, block_size=4)
    settings = dict(strategy=strategy, temperature=temperature, seed=3, num_samples=2)
    for prompt in ("w5 w6", "w5 w6 w7 w8"):  # 2 and 4 tokens: ends inside block 0, and on its last position
        cached = generate_with_details(model, tokenizer, prompt, length=10, steps=10, **settings)
        uncached = generate_with_details(model, tokenizer, prompt, length=10, steps=10, cache="none", **settings)
        assert cached.token_ids == uncached.token_ids and cached.commit_step == uncached.commit_step
    text = "w5 [MASK:3] w9 w10 w11 [MASK:2] w12"
    cached = infill_with_details(model, tokenizer, text, **settings)
    uncached = infill_with_details(model, tokenizer, text, cache="none", **settings)
    assert cached.token_ids == uncached.token_ids


def test_a_block_model_decodes_its_blocks_left_to_right():
    model, tokenizer, _ = block_model(block_size=4)
    out = generate_with_details(model, tokenizer, "w5 w6", length=9, steps=9, seed=0)
    start = len(out.prompt_ids)
    block_of = [(start + i) // 4 for i in range(9)]
    by_block = [[step for step, b in zip(out.commit_step[0], block_of) if b == block] for block in sorted(set(block_of))]
    assert len(by_block) == 3
    for earlier, later in zip(by_block, by_block[1:]):
        assert max(earlier) < min(later)
    with pytest.raises(adapt.errors.UserError, match="its own blocks of 4"):
        generate_with_details(model, tokenizer, "w5", length=8, steps=8, block_size=2)


def test_training_a_block_model_and_growing_its_blocks(tmp_path):
    recipe = recipe_for(tmp_path, "diffusion.mode=block", "diffusion.block_size=4", "diffusion.block_schedule=grow",
                        "train.max_steps=8",
                        "train.anneal_steps=6", "train.eval_batches=2")
    result = train(recipe)
    lines = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [s["block_size"] for s in steps] == [1, 1, 2, 2, 4, 4, 4, 4]  # 3 stages over 6 steps
    assert all(s["ratio"] == 0.0 for s in steps) and math.isfinite(lines[-1]["val_elbo_nll"])
    model, tokenizer, config = adapt.load(result.model_dir)
    assert config.mode == BlockMode(4) and config.trained_with["block_schedule"] == "grow"
    assert config.tokens_trained == 8 * 4 * SEQ_LEN
    assert len(adapt.generate(model, tokenizer, "w5", length=6, steps=6, seed=0)) == 1


def test_convert_makes_a_block_model_that_info_describes(tmp_path, capsys):
    from adapt.cli import main

    recipe = recipe_for(tmp_path)
    out = tmp_path / "converted"
    assert main(["convert", recipe.model.path, "--data", recipe.data.path, "--out", str(out), "--steps", "2",
                 "--seq-len", "16", "--batch-size", "2", "--mode", "block", "--block-size", "8"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "model")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["diffusion"]["mode"] == "block" and info["diffusion"]["block_size"] == 8
    assert info["mode"].startswith("block diffusion, blocks of 8")
    assert main(["generate", str(out / "model"), "--prompt", "w5", "--length", "5", "--steps", "5", "--seed", "0",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["samples"][0]["token_ids"]) == 5


def test_generation_stops_after_the_first_block_in_which_every_sample_said_eos():
    model, tokenizer, config = block_model(block_size=4)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = 100.0  # EOS is every position's most likely token
    model.set_output_embeddings(biased)
    settings = dict(length=11, steps=11, temperature=0.0, num_samples=2)  # positions 1..11: blocks 0, 1, 2
    stopped = generate_with_details(model, tokenizer, "w5", **settings)
    assert stopped.forwards == 3 and stopped.texts == ["", ""]  # block 0's three steps, then the stop
    assert all(ids == [tokenizer.eos_token_id] * 11 for ids in stopped.token_ids)
    assert all(steps[3:] == [-1] * 8 for steps in stopped.commit_step)  # not generated
    full = generate_with_details(model, tokenizer, "w5", stop_at_eos=False, **settings)
    assert full.forwards == 11 and full.texts == stopped.texts


def test_a_sequence_past_the_sliding_window_is_refused():
    model, _, config = block_model("gemma2", "eager", block_size=4)  # the tiny Gemma 2 has a window of 64
    ids = _ids(length=65)
    with pytest.raises(ValueError, match="sliding window"):
        diffusion_loss(model, ids, config)
    diffusion_loss(model, ids[:, :64], config)


@pytest.mark.parametrize("block_size", [None, 4])
def test_threshold_decoding_commits_every_sure_position_and_stays_within_the_steps(block_size):
    model, tokenizer, config = block_model(block_size=block_size or 4)
    config = dataclasses.replace(config, mode=BlockMode(block_size) if block_size else BidirectionalMode())
    config.save_to(model.config)
    common = dict(length=12, steps=12, seed=0, temperature=0.0, stop_at_eos=False)
    fixed = generate_with_details(model, tokenizer, "w5", **common)
    assert fixed.forwards == 12
    # A threshold no prediction reaches: one commit per step, exactly the fixed schedule.
    never = generate_with_details(model, tokenizer, "w5", threshold=1.0, **common)
    assert never.token_ids == fixed.token_ids and never.commit_step == fixed.commit_step
    # A threshold every prediction reaches: each block (or the whole sequence) in one forward.
    always = generate_with_details(model, tokenizer, "w5", threshold=1e-9, **common)
    assert always.forwards == (1 if block_size is None else 4)  # positions 1..12: blocks 0 to 3
    # Fewer steps than tokens: the threshold never leaves a block unfinished.
    few = generate_with_details(model, tokenizer, "w5", threshold=0.999, **{**common, "steps": 5})
    assert few.forwards <= 5 and -1 not in few.commit_step[0]
    with pytest.raises(adapt.errors.UserError, match="strategy 'confidence'"):
        generate_with_details(model, tokenizer, "w5", threshold=0.9, strategy="margin", **common)
