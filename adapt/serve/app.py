"""The FastAPI application of `adapt serve`: OpenAI's completions, chat completions and models endpoints.

A request is read into a `Job` (`adapt.serve.api`) and checked before it waits: a bad body, an unknown
model, max_tokens over the cap or a prompt too long for the context is a 400 with OpenAI's error body,
a full queue a 429, a body larger than any prompt the model could take a 413 (before it is read), a
path or method the server does not have a 404 or 405, each with OpenAI's error body. The worker
(`adapt.serve.batcher`) then decodes it, maybe batched with others. A plain answer is sent when
decoded; a stream (server-sent events) sends each answer's text as its committed prefix grows
(`adapt.serve.text`), then the rest, a last chunk with the finish reason, and `[DONE]`. A stream
answers only after its first step, so a setting the sampler refuses (a UserError, the same for the
whole batch) is still a 400 rather than an error inside a 200. A client that goes
away cancels its job, and a batch whose clients have all gone stops decoding.

Besides OpenAI's fields, each choice carries `forwards` (the model forwards its batch ran) and
`tokens_per_forward` (the positions it decoded over them), and each response `batch_rows`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import UserError
from ..limits import usable_positions
from ..sampling import MAX_NUM_SAMPLES, SamplingOptions, text_end
from ..settings import between, check_settings
from . import api
from .batcher import Batcher, Done, Failed, Job, Progress, QueueFull
from .text import ChoiceText

POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still there
# The largest body read: this many bytes per position the model can take (a token is a few characters,
# JSON escapes one in up to 6 bytes), at least MIN_BODY_BYTES. Larger ones could only be refused after
# seconds of parsing and tokenizing, during which the server answers no one.
BODY_BYTES_PER_POSITION = 64
MIN_BODY_BYTES = 1 << 20
ENDPOINTS = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /health"


@dataclass(frozen=True)
class ServeSettings:
    """The server's own flags (`adapt serve --help`); the sampler's flags are its default options."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on", **between(1, 65535)})
    max_queue: int = field(default=64, metadata={
        "help": "requests that may wait for the model; one more is answered 429", **between(1, 100_000)})
    max_batch: int = field(default=8, metadata={
        "help": "rows (samples of agreeing requests) decoded as one batch", **between(1, MAX_NUM_SAMPLES)})
    max_tokens: int = field(default=256, metadata={
        "help": "the most tokens a request may generate (max_tokens), and the length when it names none",
        **between(1, 1_000_000)})

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class _Kind:
    """How the two endpoints differ: their object names and how a choice holds its text."""

    prefix: str
    answer: str
    chunk: str
    chat: bool

    def text(self, text: str, *, delta: bool = False) -> dict:
        if not self.chat:
            return {"text": text, "logprobs": None}
        return {"delta": {"content": text}} if delta else {"message": {"role": "assistant", "content": text}}

    def opening(self) -> dict | None:
        """What a stream's first chunk of each choice says before any text (chat: who speaks)."""
        return {"delta": {"role": "assistant", "content": ""}} if self.chat else None


COMPLETION = _Kind("cmpl", "text_completion", "text_completion", chat=False)
CHAT = _Kind("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)


def create_app(model, tokenizer, name: str, settings: ServeSettings, defaults: SamplingOptions) -> FastAPI:
    """The application serving `model` under the id `name`, with the sampler options `defaults`."""
    from ..diffusion import DiffusionConfig

    app = FastAPI(title="adapt serve", docs_url=None, redoc_url=None)
    shift = DiffusionConfig.from_model_config(model.config).shift
    app.state.batcher = batcher = Batcher(model, tokenizer, max_queue=settings.max_queue, max_batch=settings.max_batch)
    _answer_errors(app)
    app.add_middleware(_BodyLimit, limit=max_body_bytes(model.config))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": batcher.waiting(), "running": batcher.running,
                **batcher.counts}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "adapt"}]}

    async def answer(request: Request, body: api.OpenAIRequest, kind: _Kind):
        if body.model != name:
            raise api.ApiError(400, f"unknown model {body.model!r}; this server serves {name!r} (see /v1/models)",
                               param="model", code="model_not_found")
        stops = api.stop_strings(body)
        job = _job(body, tokenizer, model.config, shift, settings, defaults)  # the last check: then it is queued
        try:
            batcher.submit(job)
        except QueueFull:
            raise api.ApiError(429, f"the queue is full ({settings.max_queue} requests wait); retry later",
                               kind="rate_limit_error", code="queue_full") from None
        reply = _Reply(kind, name, tokenizer, job, stops)
        first = await _first_event(job, request)
        if first is None:
            return Response(status_code=499)  # nginx's "client closed request": there is no one to read it
        if isinstance(first, Failed):
            raise _refusal(first.error)
        if not body.stream:
            return reply.whole(first)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.stream(first, usage), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request, body: api.CompletionRequest):
        return await answer(request, body, COMPLETION)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: api.ChatRequest):
        return await answer(request, body, CHAT)

    return app


def _answer_errors(app: FastAPI) -> None:
    """Every refusal and failure as OpenAI's error body."""

    @app.exception_handler(api.ApiError)
    async def refused(request: Request, error: api.ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(UserError)  # the library's refusal of bad input, in its words
    async def bad_input(request: Request, error: UserError):
        return JSONResponse(_refusal(error).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return JSONResponse(_invalid_body(error).body(), status_code=400)

    @app.exception_handler(HTTPException)  # a path or method the server does not have (404, 405)
    async def not_served(request: Request, error: HTTPException):
        refusal = api.ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}; this server "
                                                  f"has {ENDPOINTS}")
        return JSONResponse(refusal.body(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):  # no traceback for the client; uvicorn logs it
        return JSONResponse(_refusal(error).body(), status_code=500)


def max_body_bytes(model_config) -> int:
    """The largest request body the server reads for this model (see BODY_BYTES_PER_POSITION)."""
    positions = usable_positions(model_config, allow_longer=True) or 0  # a request may set allow_longer
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_POSITION * positions)


class _BodyLimit:
    """A 413 for a body whose Content-Length is over `limit`, before it is read. Plain ASGI: Starlette's
    `BaseHTTPMiddleware` would hide from the endpoints that their client went away."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if scope["type"] == "http" and length.isdigit() and int(length) > self.limit:
            refusal = api.ApiError(413, f"the body is {int(length):,} bytes, more than this server reads for its model "
                                        f"({self.limit:,}); send a shorter prompt", code="body_too_large")
            await JSONResponse(refusal.body(), status_code=413)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _job(body: api.OpenAIRequest, tokenizer, model_config, shift: bool, settings: ServeSettings,
         defaults: SamplingOptions) -> Job:
    """The request as a job, every check that needs no model forward done."""
    body.check_unsupported()
    options = api.sampling_options(body, defaults)
    if body.n > settings.max_batch:
        raise api.ApiError(400, f"n = {body.n} is more than one batch holds on this server ({settings.max_batch}); "
                                "ask for fewer, or start it with a larger --max-batch", param="n")
    length = api.answer_length(body, settings.max_tokens)
    ids = api.prompt_ids(body, tokenizer, shift)
    api.check_fits(model_config, len(ids), length, options)
    return Job(ids, length, body.steps, options, body.stream, asyncio.get_running_loop())


async def _first_event(job: Job, request: Request):
    """The job's first event; None, and the job cancelled, if its client goes away while it waits."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None


def _refusal(error: Exception) -> api.ApiError:
    if isinstance(error, UserError):
        return api.ApiError(400, str(error))
    return api.ApiError(500, f"internal error ({type(error).__name__}); see the server's log", kind="server_error")


def _invalid_body(error: RequestValidationError) -> api.ApiError:
    """Pydantic's first complaint about a body as an OpenAI error naming the field."""
    problem = error.errors()[0]
    where = [str(part) for part in problem.get("loc", ()) if part != "body"]
    if problem.get("type") == "json_invalid":
        return api.ApiError(400, "the body is not valid JSON; send a JSON object")
    param = ".".join(where) or None
    return api.ApiError(400, f"{param or 'the body'}: {problem.get('msg', 'invalid')}; see the OpenAI API's "
                             "fields for this endpoint", param=param)


class _Reply:
    """The answers to one job, whole or as a stream of chunks."""

    def __init__(self, kind: _Kind, name: str, tokenizer, job: Job, stops: list[str]):
        self.kind, self.job, self.tokenizer = kind, job, tokenizer
        self.head = {"id": f"{kind.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        self.choices = [ChoiceText(tokenizer, job.prompt_ids, stops) for _ in range(job.options.num_samples)]

    def whole(self, done: Done) -> dict:
        choices = []
        for index, (choice, generated) in enumerate(zip(self.choices, done.generated)):
            text, stopped = choice.text_of(generated)
            choices.append({"index": index, **self.kind.text(text), **self._ending(done, index, stopped)})
        return {**self.head, "object": self.kind.answer, "choices": choices, "usage": self._usage(done),
                "batch_rows": done.batch_rows}

    async def stream(self, event, usage: bool):
        try:
            if self.kind.opening() is not None:
                for index in range(len(self.choices)):
                    yield self._chunk(index, self.kind.opening())
            while isinstance(event, Progress):
                for index, (choice, committed) in enumerate(zip(self.choices, event.committed)):
                    if new := choice.grow(committed):
                        yield self._chunk(index, self.kind.text(new, delta=True))
                event = await self.job.events.get()
            if isinstance(event, Failed):  # after the 200: the error goes in the stream, as OpenAI's does
                yield _sse(_refusal(event.error).body())
                return
            for index, (choice, generated) in enumerate(zip(self.choices, event.generated)):
                new = choice.finish(generated)
                stopped = choice.text_of(generated)[1]
                yield self._chunk(index, {**self.kind.text(new, delta=True), **self._ending(event, index, stopped)})
            if usage:
                yield _sse({**self.head, "object": self.kind.chunk, "choices": [], "usage": self._usage(event)})
            yield b"data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream (the response is cancelled)
            if not isinstance(event, (Done, Failed)):
                self.job.cancel()

    def _chunk(self, index: int, fields: dict) -> bytes:
        choice = {"index": index, "finish_reason": None, **fields}
        return _sse({**self.head, "object": self.kind.chunk, "choices": [choice]})

    def _ending(self, done: Done, index: int, stopped: bool) -> dict:
        """A choice's finish reason (stop: EOS or a stop string; length: neither) and its decoding figures."""
        ended = stopped or self._answer_tokens(done.generated[index]) < len(done.generated[index])
        return {"finish_reason": "stop" if ended else "length", "forwards": done.forwards,
                "tokens_per_forward": done.decoded[index] / max(done.forwards, 1)}

    def _answer_tokens(self, generated: list[int]) -> int:
        """The tokens of an answer: its generated ids before the first EOS."""
        return text_end(generated, 0, self.tokenizer.eos_token_id)

    def _usage(self, done: Done) -> dict:
        prompt = len(self.job.prompt_ids)
        completion = sum(self._answer_tokens(generated) for generated in done.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def check_address(settings: ServeSettings) -> None:
    """Refuse an address the server could not listen on, before minutes of loading the model."""
    import socket

    try:
        with socket.create_server((settings.host, settings.port)):
            pass
    except OSError as err:  # the system's words, without the address create_server appends (the message has it)
        reason = (err.strerror or str(err)).split(" (while attempting to bind")[0]
        raise UserError(f"cannot listen on {settings.host}:{settings.port} ({reason}); pass another --port, or a "
                        "--host of this machine") from None


def serve(model, tokenizer, name: str, settings: ServeSettings, defaults: SamplingOptions) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(model, tokenizer, name, settings, defaults)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=1)
