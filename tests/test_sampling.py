"""The reverse process: forward counts, fixed tokens, schedules, seeds, infill splicing, bad arguments."""

import pytest
import torch

import adapt
from adapt.diffusion import DiffusionConfig
from adapt.errors import UserError
from adapt.presets import tiny_model, tiny_tokenizer
from adapt.sampling import (
    STRATEGIES,
    SamplingOptions,
    _even_split,
    _share,
    denoise,
    generate_with_details,
    infill_with_details,
    split_infill_text,
)
from adapt.structure import decoder_backbone

from .tiny_runs import diffusion_model


class ForwardCounter:
    """Counts forwards of the decoder backbone (each sampler step that runs the model)."""

    def __init__(self, model):
        self.count = 0
        self.handle = decoder_backbone(model).register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


@pytest.mark.parametrize("strategy", ["confidence", "margin", "entropy"])
@pytest.mark.parametrize("block_size", [None, 3])
def test_scheduled_strategies_run_exactly_steps_forwards(strategy, block_size):
    model, tokenizer = diffusion_model()
    counter = ForwardCounter(model)
    out = generate_with_details(model, tokenizer, "w5 w6", length=10, steps=7, strategy=strategy,
                                block_size=block_size, num_samples=3, seed=0)
    assert counter.count == out.forwards == 7
    steps = torch.tensor(out.commit_step)
    # every step commits at least one token of every sample, every token is committed exactly once
    for row in steps:
        counts = torch.bincount(row, minlength=7)
        assert (counts >= 1).all() and counts.sum() == 10
    if block_size is None:
        assert torch.bincount(steps[0]).tolist() == _even_split(10, 7)


def test_random_strategy_skips_only_forwards_whose_input_did_not_change():
    model, tokenizer = diffusion_model()
    for seed in range(4):
        counter = ForwardCounter(model)
        out = generate_with_details(model, tokenizer, "w5", length=12, steps=12, strategy="random", seed=seed)
        counter.handle.remove()
        committed = set(out.commit_step[0])
        # a forward runs at step 0 and after every step that committed something while tokens were left
        # (none after the step that commits the last one, however early: the steps after it are idle)
        expected = len(committed)
        assert counter.count == out.forwards == expected <= 12
        assert max(out.commit_step[0]) <= 11 and -1 not in out.commit_step[0]


def test_blocks_are_finished_left_to_right():
    model, tokenizer = diffusion_model()
    out = generate_with_details(model, tokenizer, "w5", length=10, steps=6, block_size=4, seed=1)
    steps = out.commit_step[0]
    blocks = [steps[0:4], steps[4:8], steps[8:10]]
    for earlier, later in zip(blocks, blocks[1:]):
        assert max(earlier) < min(later)


def test_steps_are_shared_between_blocks_in_proportion():
    assert _share(6, [4, 4, 2]) == [3, 2, 1]
    for steps in range(3, 11):
        shares = _share(steps, [4, 4, 2])
        assert sum(shares) == steps and all(1 <= s <= size for s, size in zip(shares, [4, 4, 2]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_given_tokens_never_change(strategy):
    model, tokenizer = diffusion_model()
    ids = torch.randint(3, 120, (2, 12))
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[:, 2:5] = True
    fill[:, 8:11] = True
    out = denoise(model, ids, fill, DiffusionConfig.from_model_config(model.config), steps=4, strategy=strategy, seed=0)
    assert torch.equal(out.ids[~fill], ids[~fill])
    assert (out.ids != model.config.diffusion["mask_token_id"]).all()
    assert (out.commit_step[~fill] == -1).all() and (out.commit_step[fill] >= 0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_greedy_one_token_blocks_equal_autoregressive_decoding(family):
    """With causal attention, the shift and blocks of one token, greedy diffusion decoding is AR decoding."""
    model, tokenizer = diffusion_model(family, ratio=0.0)
    prompt = tokenizer("w5 w9 w17", return_tensors="pt").input_ids
    ar = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                        bad_words_ids=[[model.config.diffusion["mask_token_id"]]])[0, 3:].tolist()
    out = generate_with_details(model, tokenizer, "w5 w9 w17", length=8, steps=8, block_size=1, temperature=0)
    assert out.token_ids[0] == ar


def test_seed_reproduces_and_different_seeds_differ():
    model, tokenizer = diffusion_model()
    kwargs = dict(length=12, steps=6, num_samples=2, top_k=50, top_p=0.95)
    first = adapt.generate(model, tokenizer, "w5", seed=3, **kwargs)
    assert adapt.generate(model, tokenizer, "w5", seed=3, **kwargs) == first
    assert adapt.generate(model, tokenizer, "w5", seed=4, **kwargs) != first
    assert len(first) == 2 and first[0] != first[1]  # the samples of a batch are independent draws


def test_top_k_one_is_greedy():
    model, tokenizer = diffusion_model()
    greedy = adapt.generate(model, tokenizer, "w5", length=8, steps=4, temperature=0, seed=0)
    assert adapt.generate(model, tokenizer, "w5", length=8, steps=4, top_k=1, seed=1) == greedy
    assert adapt.generate(model, tokenizer, "w5", length=8, steps=4, top_p=1e-6, seed=2) == greedy


def test_generation_without_prompt_starts_from_bos():
    model, tokenizer = diffusion_model()
    out = generate_with_details(model, tokenizer, None, length=6, steps=3, seed=0)
    assert out.prompt_ids == [tokenizer.bos_token_id] and len(out.token_ids[0]) == 6


def test_infill_keeps_every_given_character():
    model, tokenizer = diffusion_model()
    text = "w5 w6 [MASK:3] w9  w10\n[MASK] w11."
    out = infill_with_details(model, tokenizer, text, span_length=2, num_samples=2, seed=0)
    for filled, spans in zip(out.texts, out.spans):
        assert filled == "w5 w6 " + spans[0] + " w9  w10\n" + spans[1] + " w11."
        assert len(spans) == 2 and all(span.strip() for span in spans)
    assert out.forwards == 5  # default: one step per masked token (3 + 2)
    one = infill_with_details(model, tokenizer, text, span_length=2, seed=0)
    assert adapt.infill(model, tokenizer, text, span_length=2, seed=0) == one.texts[0]


def test_infill_marker_parsing():
    assert split_infill_text("a [MASK:3] b [MASK]", span_length=4) == ["a ", 3, " b ", 4]
    assert split_infill_text("<blank>x<blank:2>", "<blank>", 1) == [1, "x", 2]
    assert split_infill_text("[MASK]", span_length=2) == [2]


def test_infill_at_the_start_gets_an_anchor_token():
    model, tokenizer = diffusion_model()
    out = infill_with_details(model, tokenizer, "[MASK:2] w7", seed=0)
    assert out.token_ids[0][0] == tokenizer.bos_token_id and out.texts[0].endswith(" w7")


@pytest.mark.parametrize("kwargs, message", [
    (dict(length=0, steps=1), "length must be >= 1"),
    (dict(length=4, steps=0), "steps must be >= 1"),
    (dict(length=4, steps=5), "at most 4 steps"),
    (dict(length=4, steps=2, strategy="best"), r"strategy = 'best' \(str\) is not a valid choice"),
    (dict(length=4, steps=2, temperature=-1), "temperature = -1 is out of range; it must be >= 0"),
    (dict(length=4, steps=2, top_k=0), "top_k = 0 is out of range; it must be >= 1"),
    (dict(length=4, steps=2, top_p=1.5), r"top_p = 1.5 is out of range; it must be in \(0, 1\]"),
    (dict(length=4, steps=2, block_size=0), "block_size = 0 is out of range; it must be >= 1"),
    (dict(length=8, steps=2, block_size=2), "cannot cover 4 blocks"),
    (dict(length=4, steps=2, num_samples=0), "num_samples = 0 is out of range; it must be >= 1"),
])
def test_bad_generate_arguments_raise_user_errors(kwargs, message):
    model, tokenizer = diffusion_model()
    with pytest.raises(UserError, match=message):
        adapt.generate(model, tokenizer, "w5", **kwargs)


@pytest.mark.parametrize("text, kwargs, message", [
    ("no marker here", {}, "no '\\[MASK\\]' marker"),
    ("a [MASK:0] b", {}, "at least 1"),
    ("a [MASK:2] b", dict(steps=3), "at most 2 steps"),
    ("a [MASK:2] b", dict(num_samples=2), "use infill_with_details"),
])
def test_bad_infill_arguments_raise_user_errors(text, kwargs, message):
    model, tokenizer = diffusion_model()
    with pytest.raises(UserError, match=message):
        adapt.infill(model, tokenizer, text, **kwargs)


def test_an_options_object_and_keywords_are_the_same_settings():
    model, tokenizer = diffusion_model()
    options = SamplingOptions(strategy="margin", top_k=20, num_samples=2, seed=5)
    by_keywords = adapt.generate(model, tokenizer, "w5", length=8, steps=4, strategy="margin", top_k=20,
                                 num_samples=2, seed=5, temperature=0.7)
    # a keyword overrides the options' field; the other fields are the options'
    assert adapt.generate(model, tokenizer, "w5", length=8, steps=4, options=options, temperature=0.7) == by_keywords
    assert adapt.infill(model, tokenizer, "w5 [MASK:3] w9", options=SamplingOptions(seed=1)) == \
        adapt.infill(model, tokenizer, "w5 [MASK:3] w9", seed=1)
    with pytest.raises(TypeError, match="'temprature'; the options are strategy, temperature, top_k"):
        adapt.generate(model, tokenizer, "w5", length=8, steps=4, temprature=0.7)
    with pytest.raises(UserError, match=r"top_p = 0.0 is out of range; it must be in \(0, 1\]"):
        SamplingOptions(top_p=0.0)  # checked when the options are made, before any model runs


def test_a_model_without_a_mask_token_is_refused():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(UserError, match="no diffusion settings"):
        adapt.generate(model, tokenizer, "w5", length=4, steps=2)


def test_top_k_and_top_p_restrict_the_draw_to_the_expected_tokens():
    from adapt.sampling import _draw

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])  # id 4 plays the mask token
    logits = probs.clamp_min(1e-12).log().expand(2000, 5).clone()
    generator = torch.Generator().manual_seed(0)
    for kwargs, allowed in [(dict(top_k=2, top_p=None), {0, 1}), (dict(top_k=None, top_p=0.7), {0, 1}),
                            (dict(top_k=None, top_p=0.85), {0, 1, 2}), (dict(top_k=None, top_p=0.9), {0, 1, 2}),
                            (dict(top_k=None, top_p=None), {0, 1, 2, 3})]:
        tokens, score = _draw(logits, 4, SamplingOptions(**kwargs), generator)
        assert set(tokens.tolist()) == allowed
        # the confidence score is the model's own probability of the drawn token
        torch.testing.assert_close(score, probs[tokens])


def test_a_space_before_a_span_is_left_to_the_span():
    """The model sees "w5 w6" + masks (no lone space token); the output has no doubled space."""
    model, tokenizer = diffusion_model()
    out = infill_with_details(model, tokenizer, "w5 w6 [MASK:2] w9", seed=0)
    assert out.token_ids[0][:2] == tokenizer("w5 w6", add_special_tokens=False)["input_ids"]
    assert out.texts[0] == "w5 w6 " + out.spans[0][0] + " w9" and "  " not in out.texts[0]


def test_denoise_runs_a_training_mode_model_in_eval_mode_and_restores_the_flag():
    """Dropout would change greedy picks: the sampler must not depend on the caller's train/eval state."""
    model, tokenizer = diffusion_model("gpt2")
    assert model.config.attn_pdrop > 0 and model.config.resid_pdrop > 0  # the tiny GPT-2 has dropout
    ids = torch.tensor([[1] + list(range(5, 17))])
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[:, 2:] = True
    config = DiffusionConfig.from_model_config(model.config)

    def greedy():
        return denoise(model, ids, fill, config, steps=6, temperature=0, seed=0).ids

    expected = greedy()
    assert not model.training
    model.train()
    assert torch.equal(greedy(), expected) and torch.equal(greedy(), expected)
    assert model.training and all(module.training for module in model.modules())


def test_generated_text_ends_at_the_first_eos(monkeypatch):
    """The text stops before EOS; the details still hold every sampled id, EOS and what follows."""
    import adapt.bidirectional

    model, tokenizer = diffusion_model()
    eos, eos_position = tokenizer.eos_token_id, 3  # prompt "w5" + 2 tokens, then EOS, then 3 more
    real_predict_logits = adapt.bidirectional.predict_logits

    def eos_at_one_position(model, ids, targets, *, shift):
        logits = real_predict_logits(model, ids, targets, shift=shift)
        positions = targets.flatten().nonzero().squeeze(1) % ids.shape[1]  # row-major, like the logits
        logits[positions == eos_position, eos] = 1e4
        return logits

    monkeypatch.setattr(adapt.bidirectional, "predict_logits", eos_at_one_position)
    out = generate_with_details(model, tokenizer, "w5", length=6, steps=6, temperature=0)
    generated = out.token_ids[0]
    assert len(out.prompt_ids) == 1 and len(generated) == 6 and generated.index(eos) == 2
    assert tokenizer.decode(generated[3:], skip_special_tokens=True).strip()  # there was text after EOS
    assert out.texts[0].split() == tokenizer.convert_ids_to_tokens(generated[:2])
    assert adapt.generate(model, tokenizer, "w5", length=6, steps=6, temperature=0) == out.texts


class _Watcher:
    """Records what `on_step` shows: the ids and commit steps after each committing step."""

    def __init__(self, stop_after: int | None = None):
        self.seen, self.stop_after = [], stop_after

    def __call__(self, ids, commit_step):
        self.seen.append((ids.clone(), commit_step.clone()))
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("block_size", [None, 4])
def test_on_step_shows_each_commit_and_ends_at_the_result(block_size):
    model, tokenizer = diffusion_model()
    mask = DiffusionConfig.from_model_config(model.config).mask_token_id
    watch = _Watcher()
    out = generate_with_details(model, tokenizer, "w5 w6", length=8, steps=8, block_size=block_size, seed=0,
                                stop_at_eos=False, on_step=watch)
    assert len(watch.seen) == out.forwards == 8
    start = len(out.prompt_ids)
    for step, (ids, commit_step) in enumerate(watch.seen):
        # exactly the tokens committed up to this step are shown; the rest are still the mask token
        committed = (commit_step[:, start:] >= 0) & (commit_step[:, start:] <= step)
        assert committed.sum() == step + 1 and (commit_step[:, start:] <= step).all()
        assert (ids[:, start:][~committed] == mask).all()
        assert ids[:, start:][committed].tolist() == torch.tensor(out.token_ids)[committed].tolist()
    assert watch.seen[-1][0][:, start:].tolist() == out.token_ids


def test_an_exception_from_on_step_stops_the_decoding_and_restores_the_training_flag():
    model, tokenizer = diffusion_model()
    model.train()
    watch = _Watcher(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        generate_with_details(model, tokenizer, "w5", length=8, steps=8, on_step=watch)
    assert len(watch.seen) == 2 and model.training
