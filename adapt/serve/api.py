"""The OpenAI request bodies the server reads, and how one becomes a `Job` (or a 400 naming the problem).

The OpenAI fields are pydantic models. Every other field of a body must be a diffusion setting: a
`SamplingOptions` field (all but `num_samples`, which is OpenAI's `n`, and `progress`) or `steps`. They
are read with the same checks as a recipe's (`adapt.settings.from_dict`) and laid over the server's
defaults (its flags), so a bad value is refused by `SamplingOptions` itself, in its own words.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..chat_template import render_chat
from ..errors import UserError
from ..limits import check_context
from ..sampling import SamplingOptions, context_ids
from ..settings import from_dict

NOT_IN_BODY = ("num_samples", "progress")  # n is OpenAI's name for the samples; a server shows no progress bar
MAX_STOPS = 4  # as OpenAI's API
ROLES = ("system", "user", "assistant")  # the roles chat templates render


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """The fields both endpoints share; any other field is a diffusion setting (see the module's doc)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None  # its range is SamplingOptions'
    top_p: float | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    steps: int | None = None  # denoising steps (None: one per token)
    # Accepted so that clients which always send them work: `user` only labels the request, and the
    # penalties and logit bias only at the values that change nothing (the sampler has none of them).
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check_unsupported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by the diffusion sampler; leave it out (or at 0 / "
                                    "empty)", param=name)


class CompletionRequest(OpenAIRequest):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal[ROLES]
    content: str


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens in chat


def sampling_options(request: OpenAIRequest, defaults: SamplingOptions) -> SamplingOptions:
    """The request's sampling options: the server's defaults, with what the request sets."""
    names = [field.name for field in fields(SamplingOptions) if field.name not in NOT_IN_BODY]
    extra = dict(request.model_extra or {})
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; besides OpenAI's fields a body takes the diffusion "
                            f"settings steps, {', '.join(names)}", param=unknown[0])
    for name in ("temperature", "top_p", "seed"):  # OpenAI's names for sampler settings
        if getattr(request, name) is not None:
            extra[name] = getattr(request, name)
    given = from_dict(SamplingOptions, extra)  # types, choices and ranges, field by field
    return replace(defaults, **{name: getattr(given, name) for name in extra}, num_samples=request.n)


def stop_strings(request: OpenAIRequest) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or "" in stops:
        got = "an empty one" if "" in stops else f"{len(stops)}"
        raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings, got {got}; send at most {MAX_STOPS} "
                            "non-empty strings", param="stop")
    return stops


def prompt_ids(request: OpenAIRequest, tokenizer, shift: bool) -> list[int]:
    """The ids the answer continues: the prompt's, or the chat rendered by the tokenizer's chat template."""
    if isinstance(request, CompletionRequest):
        return context_ids(tokenizer, request.prompt, anchor=shift)
    try:
        text = render_chat(tokenizer, [message.model_dump() for message in request.messages])
    except UserError as err:  # no chat template, or one that refuses these messages
        raise ApiError(400, str(err), param="messages") from None
    return context_ids(tokenizer, text, anchor=shift)


def answer_length(request: OpenAIRequest, max_tokens: int) -> int:
    """Tokens to generate: the request's max_tokens, at most the server's cap (also the default)."""
    name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
    if name != "max_tokens" and request.max_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param=name)
    asked = getattr(request, name)
    if asked is not None and asked > max_tokens:
        raise ApiError(400, f"{name} = {asked} is more than this server allows ({max_tokens}); ask for fewer, or "
                            "start the server with a larger --max-tokens", param=name)
    return asked or max_tokens


def check_fits(model_config, prompt_length: int, length: int, options: SamplingOptions) -> None:
    """The model's context limit, before the request waits in the queue."""
    try:
        check_context(model_config, prompt_length + length, f"the prompt ({prompt_length:,} tokens) and "
                      f"max_tokens {length:,}", allow_longer=options.allow_longer)
    except UserError as err:
        raise ApiError(400, str(err), param="prompt", code="context_length_exceeded") from None
