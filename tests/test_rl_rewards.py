"""The rewards of `adapt rl`: GSM8K-style final answers, code run against its tests in the sandbox, a
format pattern, named callables refused in one line when they cannot serve, and a reward that raises on
one completion scoring it 0 without stopping anything."""

import sys
import types

import pytest

from adapt.errors import UserError
from adapt.recipe import RLSection
from adapt.rl.rewards import load_rewards, score


def _rewards(rows, **settings):
    return load_rewards(RLSection(prompts="p.txt", **settings), rows)


def test_exact_match_compares_final_answers_and_a_gsm8k_solution_may_be_the_answer():
    rows = [{"prompt": "q", "answer": "3 + 4 = 7\n#### 7"}]
    rewards = _rewards(rows, rewards=["exact_match"])
    scores = score(rewards, ["q"] * 3, ["it is 7", "#### 8", "7 or 8"], {"answer": [rows[0]["answer"]] * 3})
    assert scores.total == [1.0, 0.0, 0.0]


def test_code_passes_or_fails_its_tests_in_the_sandbox():
    prompt = "def add(a, b):\n"
    row = {"prompt": prompt, "tests": "assert add(2, 3) == 5"}
    rewards = _rewards([row], rewards=["code_tests"], code_timeout=5.0)
    completions = ["    return a + b\n", "    return a - b\n", "    while True: pass\n"]
    scores = score(rewards, [prompt] * 3, completions, {"tests": [row["tests"]] * 3})
    assert scores.total == [1.0, 0.0, 0.0] and scores.errors == 0


def test_the_format_reward_and_the_weights():
    rewards = _rewards([{"prompt": "q"}], rewards=["format", "format"], reward_weights=[1.0, 0.5],
                       format_pattern=r"^Answer: \d+$")
    assert score(rewards, ["q", "q"], ["Answer: 12", "Answer: twelve"], {}).total == [1.5, 0.0]


def _module(name, **functions):
    module = types.ModuleType(name)
    module.__dict__.update(functions)
    sys.modules[name] = module
    return name


def test_a_named_callable_gets_the_rows_fields_and_one_that_raises_on_a_sample_scores_it_zero(capsys):
    def picky(prompts, completions, level, **_):
        if any(c == "boom" for c in completions):
            raise ValueError("cannot read boom")
        return [len(c) * lv for c, lv in zip(completions, level)]

    name = _module("rl_reward_picky", picky=picky)
    rewards = _rewards([{"prompt": "q", "level": 2}], rewards=[f"{name}:picky"])
    scores = score(rewards, ["q"] * 3, ["ab", "boom", "abc"], {"level": [2, 2, 2]})
    assert scores.total == [4.0, 0.0, 6.0] and scores.errors == 1
    assert "raised ValueError: cannot read boom on the prompt, completion 2; it scores 0" in capsys.readouterr().err


@pytest.mark.parametrize("name, functions, message", [
    ("no_such_module_here:f", {}, "cannot import no_such_module_here"),
    ("rl_reward_empty:missing", {}, "has no function 'missing'"),
    ("format_reward", {}, "neither a built-in reward"),
])
def test_a_callable_that_is_not_there_is_refused_in_one_line(name, functions, message):
    if name.startswith("rl_reward_empty"):
        _module("rl_reward_empty")
    with pytest.raises(UserError, match=message):
        _rewards([{"prompt": "q"}], rewards=[name])


@pytest.mark.parametrize("returned", [[1.0], [1.0, 2.0, 3.0], 1.0, ["x", "y"]])
def test_a_reward_of_the_wrong_shape_is_refused(returned):
    name = _module("rl_reward_shape", wrong=lambda prompts, completions, **_: returned)
    rewards = _rewards([{"prompt": "q"}], rewards=[f"{name}:wrong"])
    with pytest.raises(UserError, match="one finite number per completion"):
        score(rewards, ["q", "q"], ["a", "b"], {})


def test_a_built_in_reward_needs_its_field_in_every_row():
    with pytest.raises(UserError, match="row 2 of the prompts has none"):
        _rewards([{"prompt": "q", "answer": "1"}, {"prompt": "r"}], rewards=["exact_match"])


def test_a_format_pattern_that_is_no_regular_expression_is_refused():
    with pytest.raises(UserError, match="is not a regular expression"):
        _rewards([{"prompt": "q"}], rewards=["format"], format_pattern="(unclosed")


def test_a_reward_that_raises_on_every_completion_of_a_prompt_stops_the_run_naming_it(capsys):
    """A group scored all 0 teaches nothing: a function that fails on everything (here a wrong signature)
    stops the run in one line naming the reward, the prompt and the error, without a warning per sample."""
    name = _module("rl_reward_signature", narrow=lambda prompts, completions: [1.0] * len(completions))
    rewards = _rewards([{"prompt": "q", "answer": "1"}], rewards=[f"{name}:narrow"])
    with pytest.raises(UserError) as refused:
        score(rewards, ["q", "q"], ["a", "b"], {"answer": ["1", "1"]}, "prompt 3 of rl.prompts")
    assert str(refused.value).startswith(f"rl.rewards: {name}:narrow raised on every completion of prompt 3 of "
                                         "rl.prompts (TypeError: ")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("returned, problem", [
    ([1.0, float("nan")], "returned nan for completion 2 on prompt 1 of rl.prompts"),
    ([1.0, "high"], "returned 'high' for completion 2"),
    ([1.0], "returned a list of 1 on prompt 1"),
    (None, "returned a NoneType on prompt 1"),
])
def test_what_a_bad_reward_returned_is_named_with_the_prompt(returned, problem):
    name = _module("rl_reward_values", values=lambda prompts, completions, **_: returned)
    rewards = _rewards([{"prompt": "q"}], rewards=[f"{name}:values"])
    with pytest.raises(UserError, match="one finite number per completion") as refused:
        score(rewards, ["q", "q"], ["a", "b"], {}, "prompt 1 of rl.prompts")
    assert problem in str(refused.value)


def test_an_array_of_rewards_is_taken():
    import numpy as np

    name = _module("rl_reward_array", array=lambda prompts, completions, **_: np.array([0.5, 1.0]))
    assert score(_rewards([{"prompt": "q"}], rewards=[f"{name}:array"]), ["q", "q"], ["a", "b"], {}).total == [0.5, 1.0]
