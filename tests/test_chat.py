"""adapt chat: the chat template, history trimmed to the context, the live rendering, early stops at the
end of a turn, Ctrl-C during an answer, and a piped session end to end."""

import dataclasses
import io
import json
import subprocess
import sys

import pytest
import torch

import adapt
from adapt.chat import PLACEHOLDER, Chat, Lines, converse, final_end, render_answer, stop_ids
from adapt.cli import main
from adapt.diffusion import DiffusionConfig
from adapt.errors import UserError
from adapt.hybrid import HybridMode
from adapt.sampling import SamplingOptions, context_ids

from .tiny_runs import ENV, diffusion_model

# Words of the tiny vocabulary around each message; its answer ends with </s> (EOS)
TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> {% endif %}")
# the same, with <pad> closing each turn: an end-of-turn token that is not EOS
PAD_TEMPLATE = TEMPLATE.replace("</s>", "<pad>")


def _chat(positions=256, template=TEMPLATE, max_tokens=4, model=None, steps=None, **options):
    model, tokenizer = model or diffusion_model()
    model.config.max_position_embeddings = positions
    config = DiffusionConfig.from_model_config(model.config)
    return Chat(model, tokenizer, config, options=SamplingOptions(seed=0, **options), max_tokens=max_tokens,
                steps=steps, template=template)


def _words(first, count):
    return " ".join(f"w{first + i}" for i in range(count))


def test_trimming_keeps_the_newest_turns_and_says_how_many_it_dropped():
    chat = _chat(positions=40)
    chat.turns = [(_words(10 + 3 * i, 3), _words(60 + 3 * i, 3)) for i in range(6)]  # 10 tokens a turn
    plan = chat.plan("w100 w101")
    kept = chat.turns[plan.dropped:]
    # what is kept fits with a full answer, and one turn more would not
    assert len(plan.prompt_ids) + chat.max_tokens <= 40
    one_more = context_ids(chat.tokenizer, chat._render(chat.turns[plan.dropped - 1:], "w100 w101"))
    assert len(one_more) + chat.max_tokens > 40
    assert plan.dropped == 3 and plan.length == chat.max_tokens
    assert all(user in plan.prompt and answer in plan.prompt for user, answer in kept)
    assert not any(user in plan.prompt for user, _ in chat.turns[:plan.dropped])
    assert plan.notices == ["history trimmed: the oldest 3 of 6 turns no longer fit in the model's 40 positions and "
                            "are dropped"]
    chat.remember(plan, adapt.chat.Reply("w7", [7]))
    assert chat.turns == kept + [("w100 w101", "w7")]


def test_a_message_too_long_for_the_context_is_refused_for_its_turn_only():
    chat = _chat(positions=40)
    chat.turns = [("w5", "w6")]
    with pytest.raises(UserError, match="no room left for an answer in the model's 40 positions"):
        chat.plan(_words(10, 40))
    capped = chat.plan(_words(10, 34))  # <s>, 34 words, </s> <s>: 37 tokens, room for 3
    assert capped.length == 3 and capped.dropped == 1
    assert "capped at 3 tokens" in capped.notices[-1]
    # in the loop: an empty answer line for the refused message, and the session goes on with its history
    out = _converse(chat, [_words(10, 40), "w7"])
    assert out.getvalue().splitlines()[0] == "" and len(out.getvalue().splitlines()) == 2
    assert [user for user, _ in chat.turns] == ["w5", "w7"]


def _converse(chat, lines, display=Lines):
    out = io.StringIO()
    converse(chat, display(io.StringIO("".join(line + "\n" for line in lines)), out, io.StringIO()))
    return out


def test_the_live_rendering_shows_exactly_the_committed_tokens_and_a_placeholder_per_masked_position():
    _, tokenizer = diffusion_model()
    tokens = [5, 6, 99, 99, 9, 2, 99, 11]
    committed = [True, True, False, False, True, True, False, True]
    shown = render_answer(tokenizer, tokens, committed, {2})
    # the committed runs decoded, two placeholders, and nothing from the end token (EOS, id 2) on
    assert shown.plain == "w5 w6" + PLACEHOLDER * 2 + "w9"
    assert [(shown.plain[span.start:span.end], span.style) for span in shown.spans] == [(PLACEHOLDER * 2, "dim")]
    # a hybrid model's stream: no placeholders, the committed tokens only
    assert render_answer(tokenizer, tokens, committed, {2}, placeholder="").plain == "w5 w6w9"
    # an end token counts only once committed: before that, what follows it is still shown
    assert render_answer(tokenizer, [5, 2, 7], [True, False, True], {2}).plain == "w5" + PLACEHOLDER + "w7"


def test_an_answer_is_final_once_its_end_token_and_all_before_it_are_committed():
    assert final_end([5, 2, 7], [True, True, False], {2}) == 1
    assert final_end([5, 2, 7], [False, True, True], {2}) is None  # position 0 may still become an end token
    assert final_end([5, 6, 7], [True, True, True], {2}) is None


def _always(model, token_id):
    """Make `model` predict `token_id` everywhere: its head a zero weight and a bias on that token."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token_id] = 10.0
    model.set_output_embeddings(head)
    return model


def _hybrid():
    model, tokenizer = diffusion_model(ratio=0.0)
    config = dataclasses.replace(DiffusionConfig.from_model_config(model.config), mode=HybridMode(4))
    config.save_to(model.config)
    return model, tokenizer


@pytest.mark.parametrize("kind", ["bidirectional", "hybrid"])
def test_the_answer_ends_at_the_templates_end_of_turn_token_and_decoding_stops_there(kind):
    model, tokenizer = _hybrid() if kind == "hybrid" else diffusion_model()
    _always(model, tokenizer.pad_token_id)
    options = {"temperature": 0} if kind == "hybrid" else {"block_size": 1}
    chat = _chat(template=PAD_TEMPLATE, max_tokens=8, model=(model, tokenizer), **options)
    assert chat.stops == {tokenizer.eos_token_id, tokenizer.pad_token_id}
    shown = []
    reply = chat.answer(chat.plan("w5"), shown.append)
    # the first token is the end of the turn: one step, not eight, and an empty answer
    assert reply.text == "" and reply.token_ids == [] and len(shown) == 1


def test_ctrl_c_during_an_answer_returns_to_the_prompt_and_keeps_the_history_as_it_was():
    chat = _chat()

    class Interrupting(Lines):
        """Raises KeyboardInterrupt from the sampler's on_step while answering the second message."""
        answers = 0

        def answering(self):
            from contextlib import nullcontext

            self.answers += 1
            return nullcontext(self._interrupt if self.answers == 2 else None)

        def _interrupt(self, text):
            raise KeyboardInterrupt

    out = _converse(chat, ["w5", "w6", "w7"], Interrupting)
    assert out.getvalue().splitlines()[1] == ""  # the stopped answer: an empty line, no half answer
    assert [user for user, _ in chat.turns] == ["w5", "w7"]
    # the third prompt holds the first turn and no trace of the second
    fresh = _chat()
    _converse(fresh, ["w5", "w7"])
    assert chat.turns == fresh.turns


def test_sigterm_during_an_answer_ends_the_chat_not_only_the_answer():
    """Ctrl-C stops one answer; SIGTERM (raised by the CLI as `_Terminated`) must end the command."""
    from adapt.cli import _Terminated

    class Terminating(Lines):
        def answering(self):
            from contextlib import nullcontext

            return nullcontext(self._terminate)

        def _terminate(self, text):
            raise _Terminated()

    chat = _chat()
    with pytest.raises(_Terminated):
        _converse(chat, ["w5", "w6"], Terminating)
    assert chat.turns == []


def test_the_end_of_turn_token_is_read_off_the_template():
    _, tokenizer = diffusion_model()
    tokenizer.chat_template = PAD_TEMPLATE
    assert stop_ids(tokenizer) == {2, 0}
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # no end marker
    assert stop_ids(tokenizer) == {2}


def test_a_tokenizer_without_a_chat_template_is_one_line_naming_the_fix(tmp_path, capsys):
    folder = adapt.save_checkpoint(*diffusion_model(), tmp_path / "model")
    capsys.readouterr()
    assert main(["chat", str(folder)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the loader's progress bar
    assert last.startswith("adapt chat: error: the tokenizer has no chat template; pass one with --template FILE")
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    sys.stdin, saved = io.StringIO("w5\n"), sys.stdin
    try:
        assert main(["chat", str(folder), "--template", str(tmp_path / "template.jinja"), "--max-tokens", "3"]) == 0
    finally:
        sys.stdin = saved
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_piped_session_answers_each_line_and_reset_clears_the_history(tmp_path):
    model, tokenizer = diffusion_model()
    tokenizer.chat_template = TEMPLATE
    folder = adapt.save_checkpoint(model, tokenizer, tmp_path / "model")
    script = "w5 w6\nw7\n/reset\nw5 w6\n/exit\nw9\n"
    result = subprocess.run([sys.executable, "-m", "adapt", "chat", str(folder), "--max-tokens", "4", "--seed", "0",
                             "--json"], input=script, capture_output=True, text=True, timeout=120,
                            env={**ENV, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    first, second, after_reset = (json.loads(line) for line in result.stdout.splitlines())  # none after /exit
    # the second prompt carries the first turn, the prompt after /reset is the first one again
    turn = first["prompt_ids"] + first["token_ids"]
    assert second["prompt_ids"][:len(turn)] == turn and len(second["prompt_ids"]) > len(turn)
    assert after_reset["prompt_ids"] == first["prompt_ids"] and after_reset["answer"] == first["answer"]
    assert "history cleared" in result.stderr



def test_steps_that_cannot_apply_are_refused_when_the_chat_starts():
    with pytest.raises(UserError, match="a hybrid model verifying its drafts takes no steps"):
        _chat(model=_hybrid(), steps=4)
    with pytest.raises(UserError, match="9 steps for 8 tokens would waste forwards"):  # the sampler's own check
        _chat(max_tokens=8, steps=9)


def test_lines_that_are_no_message_get_no_answer_and_the_session_goes_on():
    """An empty line, an unknown /command and bytes that are not UTF-8 (stdin hands them over as lone
    surrogates) are not sent to the model: each gets an empty answer line and a reason on stderr."""
    chat = _chat()
    out, err = io.StringIO(), io.StringIO()
    lines = ["", "/unknown", "w5 \udcff w6", "w7"]
    converse(chat, Lines(io.StringIO("".join(line + "\n" for line in lines)), out, err))
    assert out.getvalue().splitlines()[:3] == ["", "", ""] and out.getvalue().splitlines()[3]
    assert [user for user, _ in chat.turns] == ["w7"]  # only the real message reached the model
    assert err.getvalue().splitlines() == [
        "adapt chat: not answered: the line is empty; type a message, or /reset or /exit",
        "adapt chat: not answered: unknown command /unknown; the commands are /reset and /exit",
        "adapt chat: not answered: byte 0xff (character 4) is not UTF-8 text; send UTF-8"]


def test_a_system_prompt_that_leaves_no_room_for_an_answer_is_refused_when_the_chat_starts():
    model, tokenizer = diffusion_model()
    model.config.max_position_embeddings = 40
    config = DiffusionConfig.from_model_config(model.config)
    with pytest.raises(UserError, match=r"the system prompt \(--system\).*: 4[0-9] tokens, more than the model's 40"):
        Chat(model, tokenizer, config, options=SamplingOptions(), system=_words(10, 38), template=TEMPLATE)
    Chat(model, tokenizer, config, options=SamplingOptions(), system=_words(10, 30), template=TEMPLATE)  # fits
