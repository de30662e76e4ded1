"""The rewards of `adapt rl`: built-in ones and any Python callable a recipe names.

A reward is a function `reward(prompts, completions, **fields) -> list[float]`, one float per completion,
where `fields` are the prompt rows' other columns, one value per completion (TRL's convention, so a TRL
reward function works here unchanged). Built in:

* `exact_match`: the completion's final answer equals the row's `answer`, both read as the gsm8k task
  reads answers (`adapt.evaluate.generative.extract_answer`: the number after the last 'the answer is'
  or '####', else the last number; written canonically, so '1,234.0' is '1234');
* `code_tests`: the prompt followed by the completion, then the row's `tests`, runs in the sandbox
  (adapt/evaluate/sandbox.py) and exits cleanly;
* `format`: `rl.format_pattern` is found in the completion (re.search).

A reward that raises is called again one completion at a time; a completion on which it still raises
scores 0, with a warning naming the reward, the prompt and the completion, and is counted
(`reward_errors` in the log), so one bad sample never stops a run. A reward that raises on every
completion of a prompt stops the run in one line naming the reward, the prompt and the error: a group
scored all 0 teaches nothing, and a function that fails on everything (a wrong signature, a missing
field) would otherwise train a whole run on zeros. A callable that cannot be imported, or returns
something other than one finite number per completion (a wrong count, a string, NaN), is bad input too.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError, cut, quoted
from ..evaluate.generative import extract_answer  # the gsm8k task's reading of an answer

def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1 where the completion's final answer is the row's `answer` (itself read as a final answer when it
    holds one, so a GSM8K solution with its '####' line may be given whole), else 0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        wanted = extract_answer(str(expected)) or str(expected).strip()
        rewards.append(float(extract_answer(completion) == wanted))
    return rewards


def code_tests(prompts, completions, tests, *, timeout: float, **_) -> list[float]:
    """1 where the prompt, the completion and the row's `tests`, run as one program in the sandbox, pass."""
    from ..evaluate.sandbox import run_program

    return [float(run_program(f"{prompt}{completion}\n\n{test}\n", timeout=timeout).passed)
            for prompt, completion, test in zip(prompts, completions, tests)]


def format_reward(prompts, completions, *, pattern: str, **_) -> list[float]:
    """1 where `pattern` is found in the completion."""
    compiled = re.compile(pattern)
    return [float(compiled.search(completion) is not None) for completion in completions]


# The row field each built-in reads: a prompt row without it is refused before the run starts.
BUILT_IN = {"exact_match": (exact_match, "answer"), "code_tests": (code_tests, "tests"), "format": (format_reward, None)}


@dataclass
class Reward:
    name: str
    function: Callable
    weight: float


def load_rewards(settings, rows: list[dict]) -> list[Reward]:
    """The recipe's rewards (rl.rewards, rl.reward_weights), each checked against the prompt `rows`."""
    weights = settings.reward_weights or [1.0] * len(settings.rewards)
    rewards = []
    for name, weight in zip(settings.rewards, weights):
        if name in BUILT_IN:
            function, needs = BUILT_IN[name]
            _check_field(rows, needs, name)
            rewards.append(Reward(name, _bound(function, _options(name, settings)), weight))
        else:
            rewards.append(Reward(name, import_callable(name), weight))
    return rewards


def _options(name: str, settings) -> dict:
    """The recipe's settings a built-in reward takes."""
    if name == "code_tests":
        return {"timeout": settings.code_timeout}
    if name == "format":
        return {"pattern": _compiled(settings.format_pattern).pattern}
    return {}


def _bound(function, options: dict):
    return lambda prompts, completions, **fields: function(prompts, completions, **options, **fields)


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(f"rl.format_pattern {pattern!r} is not a regular expression ({err}); fix it") from None


def _check_field(rows: list[dict], field: str | None, name: str) -> None:
    if field is None:
        return
    for number, row in enumerate(rows, start=1):
        if field not in row:
            raise UserError(f"rl.rewards has {name}, which reads each prompt row's {field!r}, and row {number} of the "
                            f"prompts has none; give every row a {field!r} field (a .jsonl file)")


def import_callable(name: str) -> Callable:
    """The function `module:function` names, refused in one line when it is not there."""
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"rl.rewards: {name!r} is neither a built-in reward ({', '.join(BUILT_IN)}) nor "
                        "'module:function'; name one of those")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure of the user's module is theirs to fix, in one line
        raise UserError(f"rl.rewards: cannot import {module_name} ({type(err).__name__}: {err}); make it importable "
                        "(on PYTHONPATH) or fix it") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"rl.rewards: {module_name} has no function {attribute!r}; name a function defined there")
    return function


@dataclass
class Scores:
    total: list[float]  # the weighted sum of the rewards, per completion
    by_reward: dict[str, float]  # each reward's mean over the completions
    errors: int  # completions on which a reward raised (scored 0)


def score(rewards: list[Reward], prompts: list[str], completions: list[str], fields: dict[str, list],
          where: str = "the prompt") -> Scores:
    """Every reward of every completion (`fields`: the rows' other columns, one value per completion);
    `where` names the prompt in messages ("prompt 3 of rl.prompts")."""
    total, by_reward, errors = [0.0] * len(completions), {}, 0
    for reward in rewards:
        values, failed = _call(reward, prompts, completions, fields, where)
        errors += failed
        by_reward[reward.name] = sum(values) / len(values)
        total = [t + reward.weight * v for t, v in zip(total, values)]
    return Scores(total, by_reward, errors)


def _call(reward: Reward, prompts, completions, fields, where: str) -> tuple[list[float], int]:
    """(one float per completion, how many scored 0 because the reward raised on them)."""
    try:
        return _checked(reward, reward.function(prompts, completions, **fields), len(completions), where), 0
    except UserError:
        raise
    except Exception:
        pass  # find which completions it fails on
    values, failures = [], {}  # completion index -> what it raised
    for index in range(len(completions)):
        one = {key: column[index:index + 1] for key, column in fields.items()}
        try:
            values += _checked(reward, reward.function(prompts[index:index + 1], completions[index:index + 1], **one),
                               1, f"{where}, completion {index + 1}")
        except UserError:
            raise
        except Exception as err:
            failures[index] = f"{type(err).__name__}: {cut(str(err))}"
            values.append(0.0)
    if len(failures) == len(completions):
        raise UserError(f"rl.rewards: {reward.name} raised on every completion of {where} ({failures[0]}); fix the "
                        "function (it is called as f(prompts, completions, **row_fields)), or return 0 where it "
                        "cannot score")
    for index, error in failures.items():
        print(f"adapt rl: warning: reward {reward.name} raised {error} on {where}, completion {index + 1}; it scores 0",
              file=sys.stderr, flush=True)
    return values, len(failures)


def _checked(reward: Reward, values, count: int, where: str) -> list[float]:
    """`values` (a list, a tuple, an array) as floats, refused unless it is `count` finite numbers."""
    kind = type(values).__name__
    try:
        values = list(values)
    except TypeError:
        problem = f"a {kind}"
    else:
        problem = next((f"{quoted(value)} for completion {index + 1}" for index, value in enumerate(values)
                        if not _finite(value)), None)
        if len(values) != count:
            problem = f"a {kind} of {len(values)}"
        elif problem is None:
            return [float(value) for value in values]
    raise UserError(f"rl.rewards: {reward.name} returned {problem} on {where}; it must return one finite number per "
                    f"completion (a list of {count} floats)")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
