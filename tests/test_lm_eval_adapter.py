"""The lm-evaluation-harness model class, driven by constructed requests (the harness's Hub datasets
are unreachable offline)."""

import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'adapt[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from adapt.attention import set_attention  # noqa: E402
from adapt.lm_eval_adapter import AdaptLM  # noqa: E402

from .tiny_runs import save_adapted  # noqa: E402

# `trained`, the tiny model these tests score with, is a fixture in conftest.py.


def _request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_registered_under_adapt():
    assert get_model("adapt") is AdaptLM


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_loglikelihood_ranks_the_learned_continuation_first(trained, mode):
    model, tokenizer, config = trained
    lm = AdaptLM.from_model(model, tokenizer, config if mode == "diffusion" else None, samples=8, batch_size=2)
    requests = [_request("loglikelihood", "<s> w5 w6 w7", continuation) for continuation in (" w40 w41", " w8 w9", " w13 w14")]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(results) == 3
    logprobs = [logprob for logprob, _ in results]
    assert max(range(3), key=logprobs.__getitem__) == 1
    assert all(lp < 0 for lp in logprobs)
    assert [greedy for _, greedy in results] == [False, True, False]


def test_ar_loglikelihood_rolling_is_the_exact_sum_over_windows(trained):
    model, tokenizer, _ = trained
    text = "w5 w6 w7 w8 w9 w10 w11"
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():  # over the tokens: the embedding's alignment padding rows are never predicted
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :, :len(tokenizer)].log_softmax(-1)
    expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids)))
    whole = AdaptLM.from_model(model, tokenizer, None).loglikelihood_rolling([_request("loglikelihood_rolling", text)], True)
    # windows of 4 positions: the same tokens, each predicted once, with less context
    windowed = AdaptLM.from_model(model, tokenizer, None, max_length=4).loglikelihood_rolling(
        [_request("loglikelihood_rolling", text)], True)
    assert whole[0] == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(windowed[0]) and windowed[0] != pytest.approx(expected, abs=1e-4)


def test_diffusion_loglikelihood_rolling_is_the_elbo_of_the_text(trained):
    from adapt.diffusion import elbo_nll

    model, tokenizer, config = trained
    text = "w5 w6 w7 w8"
    lm = AdaptLM.from_model(model, tokenizer, config, samples=16, seed=3)
    [rolling] = lm.loglikelihood_rolling([_request("loglikelihood_rolling", text)], True)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids])
    set_attention(model, 1.0)
    expected = elbo_nll(model, ids, config, n_samples=16, generator=torch.Generator().manual_seed(3)).nll
    set_attention(model, 0.0)
    assert rolling == pytest.approx(-float(expected), rel=1e-5)


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_generate_until_decodes_and_stops(trained, mode):
    model, tokenizer, config = trained
    lm = AdaptLM.from_model(model, tokenizer, config if mode == "diffusion" else None, max_gen_toks=4)
    [free, stopped] = lm.generate_until([
        _request("generate_until", "<s> w5 w6", {"max_gen_toks": 3}),
        _request("generate_until", "<s> w5 w6", {"until": ["w9"], "max_gen_toks": 5}),
    ], True)
    assert free.split() == ["w7", "w8", "w9"]
    assert stopped.split() == ["w7", "w8"]


def test_sampler_model_arguments_become_the_sampling_options(trained):
    from adapt import SamplingOptions, UserError

    model, tokenizer, config = trained
    lm = AdaptLM.from_model(model, tokenizer, config, seed=4, strategy="margin", block_size=2, max_batch_size=None)
    assert lm.sampling == SamplingOptions(strategy="margin", block_size=2, seed=4)
    with pytest.raises(UserError, match=r"strategy = 'best' \(str\) is not a valid choice"):
        AdaptLM.from_model(model, tokenizer, config, strategy="best")


# One value other than the default for every SamplingOptions field but the four no model argument sets:
# seed (the adapter's `seed` is the sampler's), num_samples (one sample per request), temperature (the
# task's) and progress (the harness shows its own).
SAMPLING_ARGUMENTS = dict(strategy="margin", top_k=5, top_p=0.9, block_size=4, allow_longer=True, cache="none",
                          threshold=0.7, stop_at_eos=False, decoding="diffusion", draft_groups="one")


def test_every_sampling_option_is_a_model_argument(trained):
    """The harness passes model arguments as text (and guesses types: "none" becomes None, even for the
    cache choice "none"); each field given either way builds the SamplingOptions it names."""
    from dataclasses import fields

    from lm_eval.utils import simple_parse_args_string

    from adapt import SamplingOptions

    model, tokenizer, config = trained
    assert set(SAMPLING_ARGUMENTS) == {f.name for f in fields(SamplingOptions)} - {"seed", "num_samples",
                                                                                  "temperature", "progress"}
    for name, value in SAMPLING_ARGUMENTS.items():
        for given in ({name: str(value)}, simple_parse_args_string(f"{name}={value}")):
            lm = AdaptLM.from_model(model, tokenizer, config, seed="4", **given)
            assert lm.sampling == SamplingOptions(seed=4, **{name: value}), given
    lm = AdaptLM.from_model(model, tokenizer, config, top_k="none", cache="none")
    assert lm.sampling == SamplingOptions(seed=0, cache="none")  # None where the field allows it, else the text


def test_created_from_a_harness_argument_string(trained, tmp_path):
    save_adapted(trained, tmp_path)
    lm = AdaptLM.create_from_arg_string(f"pretrained={tmp_path / 'adapted'},samples=4,seed=2",
                                        {"batch_size": "auto", "max_batch_size": None, "device": "cpu"})
    assert lm.config is not None and lm.samples == 4 and lm.seed == 2 and lm.batch_size == 8
    [(logprob, _)] = lm.loglikelihood([_request("loglikelihood", "<s> w5", " w6")], True)
    assert logprob > -1.0


def test_the_harness_runs_a_local_task_end_to_end(trained, tmp_path):
    """`lm_eval.simple_evaluate(model="adapt")` on a multiple-choice task read from a local file."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    save_adapted(trained, tmp_path)
    rows = [{"q": "<s> w5 w6 w7", "choices": [" w40 w41", " w8 w9", " w13 w14"], "label": 1},
            {"q": "<s> w5", "choices": [" w6 w7", " w50 w51"], "label": 0}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tinychoice.yaml").write_text(
        "task: tinychoice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n")
    results = simple_evaluate(model="adapt", model_args=f"pretrained={tmp_path / 'adapted'},samples=8",
                              tasks=["tinychoice"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                              device="cpu")
    assert results["results"]["tinychoice"]["acc,none"] == 1.0


def _spy(monkeypatch, name):
    """Record the options of every call to the adapter's `name` (generate / ar_generate), then make it."""
    import adapt.lm_eval_adapter as adapter

    real, seen = getattr(adapter, name), []

    def spy(*args, options, **kwargs):
        seen.append(options)
        return real(*args, options=options, **kwargs)

    monkeypatch.setattr(adapter, name, spy)
    return seen


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_generate_until_takes_the_tasks_sampler_options(trained, monkeypatch, mode):
    """do_sample with its temperature (else 1), greedy without it, and any SamplingOptions field a task's
    generation settings name reach the sampler (diffusion) or the causal model's generate (AR)."""
    from adapt import SamplingOptions

    model, tokenizer, config = trained
    seen = _spy(monkeypatch, "generate" if mode == "diffusion" else "ar_generate")
    lm = AdaptLM.from_model(model, tokenizer, config if mode == "diffusion" else None, seed=3, strategy="margin")
    lm.generate_until([
        _request("generate_until", "<s> w5", {"max_gen_toks": 2, "do_sample": True, "temperature": 0.5, "top_k": 5,
                                               "top_p": 0.9, "block_size": 2}),
        _request("generate_until", "<s> w5", {"max_gen_toks": 2, "do_sample": True, "top_k": "3"}),
        _request("generate_until", "<s> w5", {"max_gen_toks": 2, "do_sample": False, "temperature": 0.7}),
    ], True)
    assert seen == [SamplingOptions(seed=3, strategy="margin", temperature=0.5, top_k=5, top_p=0.9, block_size=2),
                    SamplingOptions(seed=3, strategy="margin", temperature=1.0, top_k=3),
                    SamplingOptions(seed=3, strategy="margin", temperature=0.0)]


def test_generate_until_refuses_a_setting_that_is_no_sampler_option(trained):
    from adapt import UserError

    model, tokenizer, config = trained
    lm = AdaptLM.from_model(model, tokenizer, config)
    with pytest.raises(UserError, match="generation setting 'num_beams' is no sampler option"):
        lm.generate_until([_request("generate_until", "<s> w5", {"num_beams": 4})], True)


CHAT_TEMPLATE = ("{% for m in messages %}w40 {{ m['content'] }} w41{% endfor %}"
                 "{% if add_generation_prompt %} w42{% endif %}")


def test_chat_template_interface(trained):
    import copy

    from adapt import UserError

    model, tokenizer, config = trained
    plain = AdaptLM.from_model(model, tokenizer, config)
    with pytest.raises(UserError, match="has no chat template"):
        plain.chat_template(True)
    assert plain.chat_template(False) is None
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template, tokenizer.name_or_path = CHAT_TEMPLATE, "org/tiny"
    lm = AdaptLM.from_model(model, tokenizer, config)
    assert lm.chat_template(True) == CHAT_TEMPLATE and lm.tokenizer_name == "org__tiny"
    history = [{"role": "user", "content": "w5 w6"}]
    assert lm.apply_chat_template(history) == "w40 w5 w6 w41 w42"
    assert lm.apply_chat_template(history, add_generation_prompt=False) == "w40 w5 w6 w41"


def test_the_harness_applies_the_chat_template_to_a_generative_task(trained, tmp_path):
    """`simple_evaluate(apply_chat_template=True)` on a local generate_until task: the prompt the model
    got is the template around the question, and the answer is the causal model's greedy continuation of it."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer, _ = trained
    save_adapted(trained, tmp_path, CHAT_TEMPLATE)
    (tmp_path / "data.jsonl").write_text(json.dumps({"q": "<s> w5 w6", "a": "w7 w8"}))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tinygen.yaml").write_text(
        "task: tinygen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        "generation_kwargs:\n  until: [w9]\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    results = simple_evaluate(model="adapt", model_args=f"pretrained={tmp_path / 'adapted'},ar=True",
                              tasks=["tinygen"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                              device="cpu", apply_chat_template=True, log_samples=True)
    [sample] = results["samples"]["tinygen"]
    [(prompt, _)] = sample["arguments"]
    assert prompt == "w40 <s> w5 w6 w41 w42"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3,
                            pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert sample["resps"] == [[tokenizer.decode(greedy, skip_special_tokens=True).split("w9")[0]]]
