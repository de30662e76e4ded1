"""`adapt chat`: a conversation with a diffusion model in the terminal, each answer shown as it denoises.

A session (`Chat`) holds the system prompt, the turns so far and how to sample. Each user message
becomes one prompt through the tokenizer's chat template (`Chat.plan`). When the prompt and an answer of
`max_tokens` would not fit in the model's positions, the oldest turns are dropped, and the user is told;
a message that leaves no room for any answer is refused for that turn only. The answer comes from the
one sampler, `generate_with_details` (`Chat.answer`). Its `on_step` hook shows the partly denoised
answer (`render_answer`) and ends the decoding as soon as the answer is final: once an end token (EOS,
or the template's end-of-turn token) is committed with everything before it, committed tokens never
change, so nothing after it can change the text. Only a finished answer joins the history
(`Chat.remember`): one stopped with Ctrl-C leaves the history as it was.

`converse` is the loop. It reads messages (and the commands /reset and /exit) from a display and hands
it each answer; a line that is no message (empty, an unknown /command, bytes that are not UTF-8) gets
none, and the display says why. The display is `Terminal` (rich: a prompt, and the answer live as it
denoises unless `live` is off) or `Lines` (stdin not a terminal, or --json: one message per input line,
one answer per output line).
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Callable

from jinja2 import TemplateError
from rich.console import Console
from rich.live import Live
from rich.text import Text

from .chat_template import render_chat
from .errors import UserError, cut
from .limits import check_context, usable_positions
from .sampling import SamplingOptions, check_positive, check_steps, context_ids, generate_with_details, verifies

DEFAULT_MAX_TOKENS = 128
COMMANDS = ("/reset", "/exit")
PLACEHOLDER = "░"  # a still-masked position of the answer, in the live view
_PROBE = "adapt-probe-answer"  # an assistant message whose end in the rendered template shows the end-of-turn token


@dataclass
class Plan:
    """What one turn sends the model."""

    message: str
    prompt: str  # the conversation through the chat template, up to where the answer starts
    prompt_ids: list[int]
    dropped: int  # oldest turns left out so that the prompt and the answer fit
    length: int  # tokens the answer may take
    notices: list[str] = field(default_factory=list)


@dataclass
class Reply:
    text: str
    token_ids: list[int]  # the answer's ids, its end token excluded


def read_template(path: str) -> str:
    """The text of a Jinja chat template file (`--template`)."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the chat template {path}: {err}; pass a Jinja chat template file") from None


def stop_ids(tokenizer) -> set[int]:
    """EOS, and the special token the chat template writes right after an assistant's message
    (`<|im_end|>`, `<|eot_id|>`, ...) if it writes one: either ends an answer."""
    stops = {tokenizer.eos_token_id} - {None}
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except TemplateError:  # a template with its own rules about conversations: EOS alone ends the answer
        return stops
    after = rendered.split(_PROBE, 1)[1] if _PROBE in rendered else ""
    special = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    following = [token for token in tokenizer(after, add_special_tokens=False)["input_ids"] if token in special]
    return stops | set(following[:1])


def answer_end(tokens: list, stops: set[int]) -> int:
    """Where the answer in `tokens` ends: at its first end token, else after the last token."""
    return next((i for i, token in enumerate(tokens) if token in stops), len(tokens))


def final_end(tokens: list[int], committed: list[bool], stops: set[int]) -> int | None:
    """The position of the answer's end token if it and everything before it are committed (the text can
    no longer change), else None."""
    for position, (token, done) in enumerate(zip(tokens, committed)):
        if not done:
            return None
        if token in stops:
            return position
    return None


def render_answer(tokenizer, tokens: list[int], committed: list[bool], stops: set[int],
                  placeholder: str = PLACEHOLDER) -> Text:
    """An answer as far as it is denoised: the committed tokens as text and each masked position as a dim
    `placeholder`, up to the first committed end token (what follows it is not part of the answer)."""
    end = answer_end([token if done else None for token, done in zip(tokens, committed)], stops)
    text = Text()
    for done, run in groupby(zip(tokens[:end], committed[:end]), key=lambda pair: pair[1]):
        run = [token for token, _ in run]
        if done:
            text.append(tokenizer.decode(run, skip_special_tokens=True))
        else:
            text.append(placeholder * len(run), style="dim")
    return text


class _Final(Exception):
    """Raised from `on_step` once the answer is final, to end the decoding there."""

    def __init__(self, tokens: list[int]):
        super().__init__("the answer is final")
        self.tokens = tokens


class Chat:
    """A conversation: the system prompt, the turns so far, and how each answer is sampled."""

    def __init__(self, model, tokenizer, config, *, options: SamplingOptions, system: str | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, steps: int | None = None, template: str | None = None):
        if template is not None:
            tokenizer.chat_template = template
        if not tokenizer.chat_template:
            raise UserError("the tokenizer has no chat template; pass one with --template FILE (a Jinja chat "
                            "template, such as the chat_template.jinja of an instruct model of the same family)")
        check_positive(max_tokens=max_tokens)
        if steps is not None:
            check_steps(steps, max_tokens)
        self.verifying = verifies(config, options)
        if steps is not None and self.verifying:
            raise UserError("a hybrid model verifying its drafts takes no steps; drop --steps, or pass "
                            "--decoding diffusion")
        self.model, self.tokenizer, self.config, self.options = model, tokenizer, config, options
        self.system, self.max_tokens, self.steps = system, max_tokens, steps
        self.turns: list[tuple[str, str]] = []  # (user message, answer), oldest first
        self.stops = stop_ids(tokenizer)
        self.positions = usable_positions(model.config, options.allow_longer)
        # A template that refuses the system prompt, or a system prompt that leaves no room for an answer,
        # is refused now, not at every turn.
        shortest = context_ids(tokenizer, self._render([], ""), anchor=config.shift)
        check_context(model.config, len(shortest) + 1, "the system prompt (--system) through the chat template, "
                      "with an empty message and a one-token answer", allow_longer=options.allow_longer)

    def plan(self, message: str) -> Plan:
        """The prompt for `message` after the newest turns that fit with a full answer, and the answer's
        length (the room left, when even the message alone leaves less); `UserError` if no room is left."""
        for dropped in range(len(self.turns) + 1):
            prompt = self._render(self.turns[dropped:], message)
            prompt_ids = context_ids(self.tokenizer, prompt, anchor=self.config.shift)
            if self.positions is None or len(prompt_ids) + self.max_tokens <= self.positions:
                break
        room = self.max_tokens if self.positions is None else min(self.max_tokens, self.positions - len(prompt_ids))
        if room < 1:
            raise UserError(f"this message makes a prompt of {len(prompt_ids):,} tokens, with no room left for an "
                            f"answer in the model's {self.positions:,} positions; send a shorter one")
        notices = []
        if dropped:
            notices.append(f"history trimmed: the oldest {dropped} of {len(self.turns)} turns no longer fit in the "
                           f"model's {self.positions:,} positions and are dropped")
        if room < self.max_tokens:
            notices.append(f"this answer is capped at {room} tokens: the prompt takes {len(prompt_ids):,} of the "
                           f"model's {self.positions:,} positions")
        return Plan(message, prompt, prompt_ids, dropped, room, notices)

    def answer(self, plan: Plan, show: Callable[[Text], None] | None = None) -> Reply:
        """Generate the answer to `plan`, passing `show` its rendering after every committing step."""
        start = len(plan.prompt_ids)
        placeholder = "" if self.verifying else PLACEHOLDER  # verified tokens arrive in order: a stream

        def on_step(ids, commit_step):
            tokens, committed = ids[0, start:].tolist(), (commit_step[0, start:] >= 0).tolist()
            if show is not None:
                show(render_answer(self.tokenizer, tokens, committed, self.stops, placeholder))
            if final_end(tokens, committed, self.stops) is not None:
                raise _Final(tokens)

        steps = None if self.steps is None else min(self.steps, plan.length)
        try:
            tokens = generate_with_details(self.model, self.tokenizer, plan.prompt, length=plan.length, steps=steps,
                                           options=self.options, on_step=on_step).token_ids[0]
        except _Final as final:
            tokens = final.tokens
        tokens = tokens[:answer_end(tokens, self.stops)]
        return Reply(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens)

    def remember(self, plan: Plan, reply: Reply) -> None:
        """Keep the answered turn; the turns its prompt left out are gone for good."""
        self.turns = self.turns[plan.dropped:] + [(plan.message, reply.text)]

    def reset(self) -> None:
        self.turns = []

    def _render(self, turns: list[tuple[str, str]], message: str) -> str:
        """The conversation through the chat template, ready for the assistant's answer."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": message})
        return render_chat(self.tokenizer, messages)


def converse(chat: Chat, display) -> int:
    """Answer each message `display` reads until /exit or the end of the input; the exit code."""
    display.welcome()
    while (line := display.read()) is not None:
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            chat.reset()
            display.notice("history cleared")
            continue
        if (reason := no_message(line)) is not None:
            display.no_answer(f"not answered: {reason}")
            continue
        try:
            plan = chat.plan(line)
        except UserError as refused:  # this turn only: the session goes on
            display.no_answer(f"not answered: {refused}")
            continue
        for notice in plan.notices:
            display.notice(notice)
        try:
            with display.answering() as show:
                reply = chat.answer(plan, show)
        except KeyboardInterrupt:
            display.no_answer("answer stopped; it is not kept in the history")
            continue
        chat.remember(plan, reply)
        display.answer(plan, reply)
    return 0


def no_message(line: str) -> str | None:
    """Why `line` is not a message to answer (None when it is one): empty, a command that does not exist,
    or bytes that are not UTF-8 (which stdin hands over as lone surrogates)."""
    if not line.strip():
        return f"the line is empty; type a message, or {' or '.join(COMMANDS)}"
    if re.fullmatch(r"/\w+", line.strip()):
        return f"unknown command {cut(line.strip())}; the commands are {' and '.join(COMMANDS)}"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:  # a surrogate stands for the byte 0xDC00 below it
        byte = ord(line[err.start]) - 0xDC00
        return f"byte 0x{byte:02x} (character {err.start + 1}) is not UTF-8 text; send UTF-8"
    return None


class Terminal:
    """A person at a terminal: a prompt, notices in colour, each answer shown live as it denoises."""

    def __init__(self, console: Console, live: bool = True):
        self.console, self.live = console, live

    def welcome(self) -> None:
        self.console.print("/reset clears the history, /exit or Ctrl-D ends the chat, Ctrl-C stops an answer",
                           style="dim")

    def read(self) -> str | None:
        try:
            return self.console.input("[bold green]you>[/] ")
        except EOFError:
            return None

    def notice(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def no_answer(self, reason: str) -> None:
        self.console.print(Text(reason, style="red"))

    @contextmanager
    def answering(self):
        """A function showing the answer as it denoises (None without the live view)."""
        if not self.live:
            yield None
            return
        with Live(Text(), console=self.console, transient=True, refresh_per_second=12) as live:
            yield live.update

    def answer(self, plan: Plan, reply: Reply) -> None:
        self.console.print(Text(reply.text, style="cyan"))


class Lines:
    """A script: one message per input line; one answer per output line (its line breaks as spaces, or
    exactly as a JSON object), an empty line where a message gets none; notices on stderr."""

    def __init__(self, stdin, stdout, stderr, as_json: bool = False):
        self.stdin, self.stdout, self.stderr, self.as_json = stdin, stdout, stderr, as_json

    def welcome(self) -> None:
        pass

    def read(self) -> str | None:
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def notice(self, text: str) -> None:
        print(f"adapt chat: {text}", file=self.stderr, flush=True)

    def no_answer(self, reason: str) -> None:
        self.notice(reason)
        self._line(json.dumps({"answer": None, "reason": reason}) if self.as_json else "")

    def answering(self):
        return nullcontext(None)

    def answer(self, plan: Plan, reply: Reply) -> None:
        if self.as_json:
            self._line(json.dumps({"answer": reply.text, "prompt_ids": plan.prompt_ids, "token_ids": reply.token_ids,
                                   "dropped_turns": plan.dropped}))
        else:
            self._line(" ".join(reply.text.splitlines()))

    def _line(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)


def display_for(*, as_json: bool, live: bool):
    """`Terminal` for a person (live when stdout is a terminal too), `Lines` for a script or --json."""
    if sys.stdin.isatty() and not as_json:
        return Terminal(Console(), live=live and sys.stdout.isatty())
    return Lines(sys.stdin, sys.stdout, sys.stderr, as_json)
