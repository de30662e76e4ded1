"""Fast-dLLM's prefix and dual caches for bidirectional models, and early stop when decoding in blocks:
a cached step on an unchanged input is the full forward, what each cache keeps fixed, one refresh per
step reproducing the uncached sampler token for token, the refusals, and the same text with fewer forwards."""

import dataclasses
import json

import pytest
import torch

import adapt
from adapt.cli import main
from adapt.bidirectional import ApproximateCache
from adapt.block import BlockMode
from adapt.diffusion import DiffusionConfig
from adapt.forward import predict_logits
from adapt.errors import UserError
from adapt.sampling import SamplingOptions, generate_with_details, infill_with_details

from .conftest import FAMILY_IMPLS
from .tiny_runs import diffusion_folder, diffusion_model

BLOCK = slice(5, 9)  # the block being denoised in the cache-level tests; positions 9.. stay masked


def _masked_sequence(mask_token_id, length=14, batch=2):
    ids = torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    ids[:, BLOCK.start + 1:] = mask_token_id  # the block's first token committed, the rest masked
    block = torch.zeros_like(ids, dtype=torch.bool)
    block[:, BLOCK] = True
    return ids, block


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
@pytest.mark.parametrize("dual", [False, True])
def test_a_cached_step_on_an_unchanged_input_is_the_full_forward(family, impl, dual):
    """Right positions (RoPE / position embeddings), every key visible, the window's output read at the
    right place: if nothing changed since the refresh, the cached step computes what no cache does."""
    model, _ = diffusion_model(family, attn_implementation=impl)
    mask_token_id = model.config.diffusion["mask_token_id"]
    ids, block = _masked_sequence(mask_token_id)
    targets = block & (ids == mask_token_id)
    for shift in (True, False):
        cache = ApproximateCache(model, shift, dual=dual)
        with torch.no_grad():
            full = predict_logits(model, ids, targets, shift=shift)
            refreshed = cache.logits(ids, targets, block)
            stepped = cache.logits(ids, targets, block)
        torch.testing.assert_close(refreshed, full, rtol=0, atol=0)  # the refresh is the uncached forward
        torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)  # the same sums, keys in another order


def test_what_each_cache_keeps_fixed_until_the_next_refresh():
    """The prefix's keys are never recomputed inside a block; the dual cache's suffix neither. A token
    committed in the block reaches the block's predictions through the window."""
    model, _ = diffusion_model()
    mask_token_id = model.config.diffusion["mask_token_id"]
    ids, block = _masked_sequence(mask_token_id)
    targets = block & (ids == mask_token_id)
    targets[:, BLOCK.start + 1] = False  # position 6 is committed below
    prefix_changed, suffix_changed, block_changed = ids.clone(), ids.clone(), ids.clone()
    prefix_changed[:, 2] = 77
    suffix_changed[:, 12] = 77
    block_changed[:, BLOCK.start + 1] = 77
    for dual in (False, True):
        cache = ApproximateCache(model, True, dual=dual)
        with torch.no_grad():
            cache.logits(ids, targets, block)  # the refresh
            reference = cache.logits(ids, targets, block)
            step = {name: cache.logits(changed, targets, block) for name, changed in
                    [("prefix", prefix_changed), ("suffix", suffix_changed), ("block", block_changed)]}
        torch.testing.assert_close(step["prefix"], reference, rtol=0, atol=0)
        assert torch.equal(step["suffix"], reference) == dual  # recomputed by the prefix cache, kept by the dual
        assert not torch.allclose(step["block"], reference)


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_refresh_at_every_step_reproduces_the_uncached_sampler(family, impl, cache):
    """Blocks of one token (or one step per block) run the refresh only: token for token the sampler
    without a cache, sampled at temperature 1. With longer blocks the cached steps run, within `steps`."""
    model, tokenizer = diffusion_model(family, attn_implementation=impl)
    settings = dict(seed=3, num_samples=2, stop_at_eos=False)
    for length, steps, block_size in [(6, 6, 1), (12, 3, 4)]:
        exact = generate_with_details(model, tokenizer, "w5 w6", length=length, steps=steps, block_size=block_size,
                                      cache="none", **settings)
        cached = generate_with_details(model, tokenizer, "w5 w6", length=length, steps=steps,
                                       block_size=block_size, cache=cache, **settings)
        assert cached.token_ids == exact.token_ids and cached.commit_step == exact.commit_step
    out = generate_with_details(model, tokenizer, "w5 w6", length=12, steps=12, block_size=4, cache=cache, **settings)
    mask_token_id = model.config.diffusion["mask_token_id"]
    assert out.forwards == 12 and all(mask_token_id not in row for row in out.token_ids)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_infilling_with_an_approximate_cache(cache):
    """Blocks that straddle given text: the window covers it; one-token blocks are the uncached infill."""
    model, tokenizer = diffusion_model()
    text = "w5 [MASK:3] w9 w10 [MASK:3] w12"
    exact = infill_with_details(model, tokenizer, text, block_size=1, seed=0, num_samples=2, cache="none")
    assert infill_with_details(model, tokenizer, text, block_size=1, seed=0, num_samples=2,
                               cache=cache).token_ids == exact.token_ids
    out = infill_with_details(model, tokenizer, text, block_size=4, seed=0, cache=cache)
    assert out.texts[0].startswith("w5 ") and " w9 w10 " in out.texts[0] and out.texts[0].endswith(" w12")


def test_the_default_is_unchanged():
    """Default options: a bidirectional model runs the whole sequence every step, as before the option."""
    model, tokenizer = diffusion_model()
    assert SamplingOptions().cache == "exact"
    settings = dict(length=12, steps=8, block_size=4, seed=1, num_samples=2)
    default = generate_with_details(model, tokenizer, "w5", **settings)
    uncached = generate_with_details(model, tokenizer, "w5", cache="none", **settings)
    assert default.token_ids == uncached.token_ids and default.commit_step == uncached.commit_step
    assert default.forwards == 8


def _block_model():
    model, tokenizer = diffusion_model(ratio=0.0)
    config = dataclasses.replace(DiffusionConfig.from_model_config(model.config), mode=BlockMode(4))
    config.save_to(model.config)
    return model, tokenizer


def _flash_attention_model():
    model, tokenizer = diffusion_model()
    model.config._attn_implementation = "flash_attention_2"  # refused before any forward runs
    return model, tokenizer


@pytest.mark.parametrize("build, settings, message", [
    (_block_model, dict(cache="dual", block_size=4), "this block diffusion model has an exact cache"),
    (diffusion_model, dict(cache="prefix"), "give a block size"),
    (lambda: diffusion_model(ratio=0.5), dict(cache="dual", block_size=4), "at ratio 0.5"),
    (lambda: diffusion_model("gemma2"), dict(cache="prefix", block_size=4, length=70, steps=20),
     "past the model's sliding window \\(64\\)"),
    (_flash_attention_model, dict(cache="dual", block_size=4), "'flash_attention_2' cannot apply"),
    (diffusion_model, dict(cache="full"),
     r"cache = 'full' \(str\) is not a valid choice; choose one of: exact, none, prefix, dual"),
    (diffusion_model, dict(cache=False), r"cache = False \(bool\) is not a valid choice"),  # the old boolean setting
])
def test_approximate_caches_are_refused_where_they_do_not_apply(build, settings, message):
    model, tokenizer = build()
    settings = {"length": 8, "steps": 8, **settings}
    with pytest.raises(UserError, match=message):
        generate_with_details(model, tokenizer, "w5", **settings)


def test_early_stop_in_blocks_keeps_the_text_and_saves_forwards(monkeypatch):
    """A bidirectional model decoded in blocks stops after the block in which every sample said EOS."""
    import adapt.bidirectional

    model, tokenizer = diffusion_model()
    eos, eos_position = tokenizer.eos_token_id, 6  # prompt "w5" at 0: generated positions 1..16, EOS in block 1
    real_predict_logits = adapt.bidirectional.predict_logits

    def eos_at_one_position(model, ids, targets, *, shift):
        logits = real_predict_logits(model, ids, targets, shift=shift)
        positions = targets.nonzero(as_tuple=True)[1]  # row-major, like the logits
        logits[positions == eos_position, eos] = 1e4
        return logits

    monkeypatch.setattr(adapt.bidirectional, "predict_logits", eos_at_one_position)
    settings = dict(length=16, steps=16, block_size=4, seed=0, num_samples=2)
    stopped = generate_with_details(model, tokenizer, "w5", **settings)
    full = generate_with_details(model, tokenizer, "w5", stop_at_eos=False, **settings)
    assert stopped.texts == full.texts and all(text for text in full.texts)
    assert (stopped.forwards, full.forwards) == (8, 16)  # blocks 0 and 1, then the stop
    for kept, every, steps in zip(stopped.token_ids, full.token_ids, stopped.commit_step):
        assert kept[:8] == every[:8] and kept[8:] == [eos] * 8 and steps[8:] == [-1] * 8


def test_the_command_line_and_the_remote_code_take_the_cache(tmp_path, capsys):
    folder = diffusion_folder(tmp_path / "model")
    model, tokenizer, _ = adapt.load(folder)
    expected = adapt.generate(model, tokenizer, "w5", length=8, steps=8, block_size=4, cache="dual", seed=0)
    capsys.readouterr()  # what loading printed

    assert main(["generate", str(folder), "--prompt", "w5", "--length", "8", "--steps", "8", "--block-size", "4",
                 "--cache", "dual", "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"][0]["text"] == expected[0]
    assert main(["generate", str(folder), "--length", "8", "--steps", "8", "--cache", "prefix"]) == 2
    assert "give a block size" in capsys.readouterr().err

    remote, remote_tokenizer, _ = adapt.load(folder, trust_remote_code=True)
    assert type(remote).__name__ == "AdaptDiffusionLlamaForCausalLM"
    assert remote.diffusion_generate(remote_tokenizer, "w5", length=8, steps=8, block_size=4, cache="dual",
                                     seed=0) == expected
    # the checkpoint's own copy of the sampler checks the option (its UserError is that copy's class)
    with pytest.raises(Exception, match="give a block size"):
        remote.diffusion_generate(remote_tokenizer, "w5", length=8, steps=8, cache="prefix")
