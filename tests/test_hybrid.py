"""The hybrid mode (TiDAR): the AR model kept whole beside a draft stream, drafts verified by its AR head.

Properties: before any training the clean stream is the source model exactly; no draft sees a clean
token at or after the one it predicts, and the clean stream never sees a draft (by perturbation, every
family); the loss is (alpha L_AR + L_diff) / (1 + alpha); greedy speculative decoding is token for token
the AR model's greedy decoding (every family); speculative sampling follows the AR head's distribution
exactly; a drafter that agrees with the AR head commits its whole draft block per forward; diffusion
decoding of the drafts is the same with and without the cache; scoring is the AR head's exact
likelihood; the export loads in plain transformers as the causal LM it is.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import adapt
from adapt.diffusion import DiffusionTraining, diffusion_loss
from adapt.errors import UserError
from adapt.forward import output_logits
from adapt.hybrid import HybridMode
from adapt.sampling import SamplingOptions, generate_with_details, infill_with_details
from adapt.speculative import verify

from .conftest import FAMILY_IMPLS
from .tiny_runs import HYBRID_DRAFT as DRAFT, hybrid_model, recipe_for, step_records


def _ids(length=12, batch=2, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _streams(model, config, ids, noisy=None):
    """(draft logits for every position 1.., AR logits for every position 1..) of one training forward."""
    targets = torch.ones_like(ids, dtype=torch.bool)
    targets[:, 0] = False
    noisy = ids.masked_fill(targets, config.mask_token_id) if noisy is None else noisy
    with torch.no_grad():
        drafts, ar = config.mode.hidden(model, noisy, ids, targets, shift=True, ar_targets=targets)
    return output_logits(model, drafts).view(len(ids), -1, config.vocab_size), \
        output_logits(model, ar).view(len(ids), -1, config.vocab_size)


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
def test_before_training_the_clean_stream_is_the_source_model(family, impl):
    model, _, config = hybrid_model(family, impl)
    ids = _ids()
    _, ar = _streams(model, config, ids)
    with torch.no_grad():
        source = model(input_ids=ids).logits[:, :-1, :config.vocab_size]
    torch.testing.assert_close(ar, source, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
def test_no_draft_sees_a_clean_token_at_or_after_the_one_it_predicts(family, impl):
    """Changing clean token j changes exactly the drafts of the blocks that start at or after j (their
    targets lie after j); the clean stream never sees the drafts."""
    model, _, config = hybrid_model(family, impl)
    ids = _ids(length=13)
    drafts, ar = _streams(model, config, ids)
    for changed in (3, 4, 9):
        perturbed = ids.clone()
        perturbed[:, changed] = 101
        noisy = ids.masked_fill(torch.arange(13) > 0, config.mask_token_id)  # the draft stream as before
        moved, _ = _streams(model, config, perturbed, noisy=noisy)
        for target in range(1, 13):  # draft of target i sits at position i - 1, in block (i - 1) // D
            sees = changed <= (target - 1) // DRAFT * DRAFT
            same = torch.allclose(moved[:, target - 1], drafts[:, target - 1], rtol=0, atol=1e-6)
            assert same != sees, (family, changed, target)
    other_drafts = ids.masked_fill(torch.arange(13) % 2 == 1, config.mask_token_id)
    _, ar_again = _streams(model, config, ids, noisy=other_drafts)
    torch.testing.assert_close(ar_again, ar, rtol=0, atol=0)


def test_the_loss_is_the_weighted_mean_of_the_ar_and_the_draft_losses():
    model, _, config = hybrid_model()
    ids = _ids(length=12)
    everything = torch.ones_like(ids, dtype=torch.bool)
    everything[:, 0] = False
    drafts, ar = _streams(model, config, ids)
    targets = ids[:, 1:]
    ar_ce = F.cross_entropy(ar.reshape(-1, ar.shape[-1]), targets.reshape(-1))
    draft_ce = F.cross_entropy(drafts.reshape(-1, drafts.shape[-1]), targets.reshape(-1))
    for alpha in (1.0, 3.0):
        training = DiffusionTraining(mode="hybrid", draft_size=DRAFT, t_min=1.0, t_max=1.0, ar_weight=alpha)
        with torch.no_grad():
            out = diffusion_loss(model, ids, config, training)  # all-mask drafts: t = 1 for every sequence
        assert out.num_masked == everything.sum()
        torch.testing.assert_close(out.ar_ce, ar_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss, (alpha * ar_ce + draft_ce) / (1 + alpha), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, impl", FAMILY_IMPLS)
def test_greedy_speculative_decoding_is_the_ar_models_greedy_decoding(family, impl):
    model, tokenizer, _ = hybrid_model(family, impl)
    for groups in ("one", "every"):
        out = generate_with_details(model, tokenizer, "w5 w6 w7", length=11, temperature=0, draft_groups=groups,
                                    num_samples=2, stop_at_eos=False)
        prompt = torch.tensor([out.prompt_ids])
        expected = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=11,
                                  do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        assert out.token_ids == [expected, expected], (family, groups)


def _agreeing(model):
    """The model with its final norm zeroed: every output is the same, so drafts and AR head agree."""
    final_norm = next(module for name, module in model.named_modules() if name.endswith("norm")
                      and "layers" not in name and "h." not in name)
    with torch.no_grad():
        final_norm.weight.zero_()
    return model


@pytest.mark.parametrize("groups", ["one", "every"])
def test_a_drafter_that_agrees_commits_its_whole_block_each_forward(groups):
    """The first forward gives the AR head's token and D - 1 drafts; every later one accepts them all and
    adds the AR head's own: D tokens a forward."""
    model, tokenizer, _ = hybrid_model()
    _agreeing(model)
    out = generate_with_details(model, tokenizer, "w5", length=13, temperature=0, draft_groups=groups,
                                stop_at_eos=False)
    assert out.forwards == 1 + math.ceil((13 - 1) / DRAFT)
    assert out.commit_step[0] == [0] + [1 + i // DRAFT for i in range(12)]


def test_speculative_verification_emits_the_ar_heads_distribution_exactly():
    """One draft from q, accepted with probability min(1, p/q), else a token from norm(max(0, p - q)):
    the emitted token follows p (chi-square over 200,000 draws, vocabulary of 6)."""
    generator = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0, -3.0])
    q_logits = torch.tensor([0.0, 1.5, 0.5, -0.5, 1.0, 0.0])
    rows, options = 200_000, SamplingOptions(temperature=1.0)
    drafts = torch.multinomial(q_logits.softmax(-1).expand(rows, -1), 1, replacement=True, generator=generator)
    verifier = p_logits.expand(rows, 2, -1)  # at the draft, and after it
    accepted, own = verify(verifier, drafts, q_logits.expand(rows, 1, -1), options, generator)
    emitted = torch.where(accepted > 0, drafts[:, 0], own)
    observed = torch.bincount(emitted, minlength=6).double()
    expected = rows * p_logits.softmax(-1).double()
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 20.5, chi_square  # the 0.999 quantile of chi-square with 5 degrees of freedom
    assert 0 < accepted.float().mean() < 1


def test_speculative_sampling_follows_the_ar_models_distribution_end_to_end():
    """Two generated tokens, 4,000 samples in batches of 400 (rows of a batch accept as many drafts as the
    least lucky one): their joint distribution against the AR model's, computed exactly, by chi-square
    over the outcomes expected at least 5 times."""
    model, tokenizer, config = hybrid_model()
    with torch.no_grad():  # a sharper head, so that the outcomes concentrate on a few pairs
        model.lm_head.weight.mul_(8)
    counts = torch.zeros(config.vocab_size, config.vocab_size, dtype=torch.float64)
    for seed in range(10):
        out = generate_with_details(model, tokenizer, "w5", length=2, temperature=1.0, num_samples=400, seed=seed,
                                    stop_at_eos=False)
        for first, second in out.token_ids:
            counts[first, second] += 1
    mask = config.mask_token_id
    with torch.no_grad():
        first = model(input_ids=torch.tensor([out.prompt_ids])).logits[0, -1, :config.vocab_size]
        first[mask] = -torch.inf
        p_first = first.double().softmax(-1)
        pairs = torch.tensor([out.prompt_ids + [token] for token in range(config.vocab_size)])
        second = model(input_ids=pairs).logits[:, -1, :config.vocab_size].double()
        second[:, mask] = -torch.inf
    exact = 4000 * p_first[:, None] * second.softmax(-1)
    kept = exact >= 5
    rest = (~kept)
    observed = torch.cat([counts[kept], counts[rest].sum()[None]])
    expected = torch.cat([exact[kept], exact[rest].sum()[None]])
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    degrees = len(observed) - 1
    assert chi_square < degrees + 4 * math.sqrt(2 * degrees), (chi_square, degrees)


def test_diffusion_decoding_of_the_drafts_is_the_same_with_and_without_the_cache():
    model, tokenizer, _ = hybrid_model()
    settings = dict(decoding="diffusion", temperature=0.8, seed=3, num_samples=2)
    cached = generate_with_details(model, tokenizer, "w5 w6", length=10, steps=10, **settings)
    uncached = generate_with_details(model, tokenizer, "w5 w6", length=10, steps=10, cache="none", **settings)
    assert cached.token_ids == uncached.token_ids and cached.commit_step == uncached.commit_step
    text = "w5 [MASK:3] w9 w10 w11 [MASK:2] w12"
    assert infill_with_details(model, tokenizer, text, **settings).token_ids == \
        infill_with_details(model, tokenizer, text, cache="none", **settings).token_ids


def test_scoring_is_the_ar_heads_exact_likelihood():
    from adapt.evaluate import continuation_scores

    model, _, config = hybrid_model()
    ids = _ids(length=10, batch=1)[0].tolist()
    hybrid, = continuation_scores(model, [ids], [6], config=config)
    causal, = continuation_scores(model, [ids], [6], config=None)
    assert hybrid == causal


@pytest.mark.parametrize("options,message", [
    (dict(steps=8), "drop the steps, or pass decoding 'diffusion'"),
    (dict(block_size=2), "drafts in blocks of 4 tokens"),
    (dict(cache="dual"), "this hybrid model has an exact cache"),
    (dict(threshold=0.9, decoding="verify"), "drop the threshold or use decoding 'diffusion'"),
])
def test_bad_sampler_options_for_a_hybrid_model_name_the_fix(options, message):
    model, tokenizer, _ = hybrid_model()
    with pytest.raises(UserError, match=message):
        generate_with_details(model, tokenizer, "w5", length=8, **options)


def test_verification_is_refused_on_a_model_without_an_ar_head():
    from .tiny_runs import diffusion_model

    model, tokenizer = diffusion_model()
    with pytest.raises(UserError, match="decoding 'verify' checks drafts with the model's AR head"):
        generate_with_details(model, tokenizer, "w5", length=8, decoding="verify")
    with pytest.raises(UserError, match="this bidirectional model decodes by diffusion here; drop draft_groups"):
        generate_with_details(model, tokenizer, "w5", length=8, draft_groups="one")


@pytest.mark.parametrize("overrides,message", [
    (["diffusion.mode=hybrid"], "diffusion.mode: hybrid needs diffusion.draft_size"),
    (["diffusion.mode=hybrid", "diffusion.draft_size=0"], "diffusion.draft_size = 0 is out of range"),
    (["diffusion.mode=hybrid", "diffusion.draft_size=33"], "diffusion.draft_size = 33 exceeds data.seq_len = 32"),
    (["diffusion.draft_size=4"], "diffusion.draft_size is a setting of mode 'hybrid'"),
    (["diffusion.mode=block", "diffusion.block_size=4", "diffusion.ar_weight=2"],
     "diffusion.ar_weight is a setting of mode 'hybrid' and this run makes a block model"),
])
def test_bad_hybrid_settings_name_the_key_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        recipe_for(tmp_path, *overrides)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_hybrid_conversion_trains_logs_its_ar_loss_and_exports_a_causal_lm(tmp_path, lora):
    from transformers import AutoModelForCausalLM

    settings = ["diffusion.mode=hybrid", "diffusion.draft_size=4", "diffusion.t_min=1", "train.max_steps=2",
                "train.eval_batches=1", *(["lora.r=4"] if lora else [])]
    result = adapt.train.train(recipe_for(tmp_path, *settings))
    records = step_records(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) and r["ar_ce"] > 0 and r["ratio"] == 0.0 for r in records)
    model, tokenizer, config = adapt.load(result.model_dir)
    assert config.mode == HybridMode(4) and adapt.get_attention_ratio(model) == 0.0
    remote = AutoModelForCausalLM.from_pretrained(result.model_dir, trust_remote_code=True).eval()
    drafted = remote.diffusion_generate(tokenizer, "w5 w6 w7 w8", length=9, temperature=0, details=True,
                                        stop_at_eos=False)
    ids = torch.tensor([drafted.prompt_ids])
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, model(ids).logits)
        expected = remote.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=9,
                                   do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert drafted.token_ids[0] == expected and drafted.forwards <= 9


def test_convert_makes_a_hybrid_model_that_info_describes(tmp_path, capsys):
    from adapt.cli import main

    recipe = recipe_for(tmp_path)
    out = tmp_path / "converted"
    assert main(["convert", recipe.model.path, "--data", recipe.data.path, "--out", str(out), "--steps", "2",
                 "--seq-len", "16", "--batch-size", "2", "--mode", "hybrid", "--draft-size", "4"]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "model")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["diffusion"]["mode"] == "hybrid" and info["diffusion"]["draft_size"] == 4
    assert info["mode"].startswith("hybrid") and info["attention_ratio"] == 0.0
    assert main(["generate", str(out / "model"), "--prompt", "w5", "--length", "6", "--temperature", "0",
                 "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert len(generated["samples"][0]["token_ids"]) == 6 and generated["forwards"] <= 6


@pytest.mark.parametrize("mode", [HybridMode(4), "block"], ids=["hybrid", "block"])
def test_flex_attention_takes_the_layouts_as_block_masks_with_the_same_logits(mode):
    """The explicit masks become FlexAttention BlockMasks under attn_implementation='flex_attention'
    (compiled on first use of a shape): the training layout's logits equal SDPA's. Each layout compiles
    afresh: torch 2.13's CPU FlexAttention kernel recompiled for a second shape (dynamic shapes) fails to
    compile, an upstream inductor bug (SDPA is the CPU's kernel anyway)."""
    import shutil

    pytest.importorskip("torch.nn.attention.flex_attention")
    if shutil.which("g++") is None:  # FlexAttention runs compiled; on CPU inductor builds it with a C++ compiler
        pytest.skip("no C++ compiler for torch.compile's CPU kernels (apt-get install g++)")
    from adapt.block import BlockMode

    torch._dynamo.reset()  # each layout compiles its own kernel, as a fresh process would
    mode = BlockMode(8) if mode == "block" else mode
    ids = _ids(length=24)
    targets = torch.ones_like(ids, dtype=torch.bool)
    targets[:, 0] = False
    logits = {}
    for impl in ("sdpa", "flex_attention"):
        model, _, config = hybrid_model("llama", impl)
        noisy = ids.masked_fill(targets & (torch.arange(24) % 3 == 0), config.mask_token_id)
        with torch.no_grad():
            hidden, _ = mode.hidden(model, noisy, ids, targets, shift=True)
        logits[impl] = output_logits(model, hidden)
    torch.testing.assert_close(logits["flex_attention"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_the_lm_eval_adapter_scores_and_generates_through_the_ar_head():
    """A hybrid model in the harness: log-likelihoods are its AR head's exact ones (the adapter's `ar=True`
    figures), and greedy generation is the AR model's."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'adapt[eval]'")
    from lm_eval.api.instance import Instance

    from adapt.lm_eval_adapter import AdaptLM

    model, tokenizer, config = hybrid_model()
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=("w5 w6", " w7 w8"), idx=0)]
    hybrid = AdaptLM.from_model(model, tokenizer, config).loglikelihood(requests, True)
    causal = AdaptLM.from_model(model, tokenizer, None).loglikelihood(requests, True)
    assert hybrid == causal
    until = [Instance(request_type="generate_until", doc={}, idx=0,
                      arguments=("w5 w6", {"until": [], "max_gen_toks": 6, "do_sample": False}))]
    drafted = AdaptLM.from_model(model, tokenizer, config).generate_until(until, True)
    expected = AdaptLM.from_model(model, tokenizer, None).generate_until(until, True)
    assert [text.strip() for text in drafted] == [text.strip() for text in expected]  # the AR path drops the space


@pytest.mark.slow  # a minute or two each on 2 busy cores
@pytest.mark.parametrize("backend", ["zero2", "fsdp"])
def test_two_processes_train_a_hybrid_as_one_process_does(tmp_path, backend):
    """The AR loss's denominator is summed over the processes like the diffusion loss's: ZeRO-2 and FSDP2
    over two processes give one process's losses and weights."""
    from pathlib import Path

    from .tiny_runs import assert_close_tensors, tensors, train_two_processes

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    options = {"zero2": [f"distributed.deepspeed_config={recipes / 'deepspeed/zero2.json'}"],
               "fsdp": ["distributed.backend=fsdp"]}[backend]
    common = ("diffusion.mode=hybrid", "diffusion.draft_size=4", "diffusion.t_min=1", "diffusion.ar_weight=2",
              "train.max_steps=2", "train.eval_batches=0")
    reference = adapt.train.train(recipe_for(tmp_path, "train.grad_accum=2", "train.batch_size=2", *common,
                                             output="single"))
    recipe = recipe_for(tmp_path, "train.batch_size=2", *common, *options, output=backend)
    run = train_two_processes(recipe, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for a, b in zip(step_records(tmp_path / "single"), step_records(recipe.output_dir), strict=True):
        for key in ("loss", "ar_ce", "masked_ce", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (backend, key)
    assert_close_tensors(tensors(reference.model_dir), tensors(Path(recipe.output_dir) / "model"), f"{backend}: ")


def test_decoding_up_to_the_last_position_drafts_nothing_past_it():
    """GPT-2's positions are learned embeddings: a draft group reaching past the last position would have
    none. Generating up to the model's limit, the groups shrink and the output is still the AR model's."""
    from adapt.limits import max_positions

    model, tokenizer, _ = hybrid_model("gpt2")
    limit = max_positions(model.config)
    out = generate_with_details(model, tokenizer, "w5 w6", length=limit - 2, temperature=0, stop_at_eos=False,
                                draft_groups="every")
    prompt = torch.tensor([out.prompt_ids])
    expected = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=limit - 2,
                              do_sample=False, pad_token_id=0)[0, 2:].tolist()
    assert len(out.prompt_ids) == 2 and out.token_ids[0] == expected


def test_on_step_shows_the_accepted_tokens_of_each_verifying_forward():
    model, tokenizer, config = hybrid_model()
    _agreeing(model)
    seen = []
    out = generate_with_details(model, tokenizer, "w5", length=9, temperature=0, stop_at_eos=False,
                                on_step=lambda ids, steps: seen.append(ids.clone()))
    start = len(out.prompt_ids)
    assert len(seen) == out.forwards == 3  # 1, then 4, then 4 tokens
    assert [int((ids[0, start:] != config.mask_token_id).sum()) for ids in seen] == [1, 5, 9]
    assert seen[-1][0, start:].tolist() == out.token_ids[0]
