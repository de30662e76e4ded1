"""Prompts in a tokenizer's chat template: what `adapt chat`, `adapt serve`'s chat completions, `adapt eval
--chat` and the harness's `apply_chat_template` send.

The template is rendered to text; the text then goes through the same tokenization as any prompt
(`adapt.sampling.context_ids`: the tokenizer's BOS, then the text without special tokens added), so a
chat prompt and a plain one differ only by the template's words and markers.
"""

from __future__ import annotations

from .errors import UserError
from .sampling import context_ids


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {tokenizer.name_or_path or 'this model'} has no chat template; send plain "
                        "prompts (no --chat), or add a chat_template to its tokenizer_config.json")


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The messages (`{"role", "content"}`) in the tokenizer's chat template, as text; a template that
    refuses them (its own rules on roles and order) is a `UserError`."""
    from jinja2 import TemplateError  # what a chat template raises for messages it does not take

    check_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise UserError(f"the chat template refuses these messages: {err}; check their roles and order") from None
    # A template that writes the BOS itself (Llama's "<s>[INST]") would get a second one from the
    # tokenization every prompt goes through, which puts it in front where the tokenizer adds one.
    bos = tokenizer.bos_token
    if bos and context_ids(tokenizer, None, anchor=False) and text.startswith(bos):
        text = text[len(bos):]
    return text


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as the one user message of a chat, the assistant's turn opened after it."""
    return render_chat(tokenizer, [{"role": "user", "content": prompt}])
