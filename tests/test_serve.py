"""`adapt serve`: a real server process on 127.0.0.1 over a tiny diffusion checkpoint, spoken to with the
official `openai` client (and httpx where the client hides the wire: status codes, SSE lines).

Properties: an answer is the sampler's own answer for the same prompt and options (the chat's: for the
prompt its chat template renders); a stream's pieces put together are the whole answer; every refusal
is a 400 (429 for a full queue) with OpenAI's error body, and never a 500; requests that agree are
decoded as one batch and each gets exactly what it gets alone, while a seeded random draw runs alone;
a client that goes away stops its decoding.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import adapt
from adapt.presets import tiny_tokenizer
from adapt.serve.api import ApiError, ChatRequest, prompt_ids
from adapt.sampling import generate_ids, generate_with_details, text_end
from adapt.serve.text import ChoiceText, cut_at_stop, settled

from .tiny_runs import diffusion_folder, hybrid_model, run_cli, serving, wait_until

TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}w3"  # words the tiny vocabulary has
MAX_TOKENS, MAX_QUEUE, MAX_BATCH = 250, 3, 4
LONG = {"prompt": "w20", "max_tokens": MAX_TOKENS, "n": MAX_BATCH, "temperature": 0}  # ~1 s: keeps the model busy


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny checkpoint, its tokenizer given a chat template."""
    from transformers import AutoTokenizer

    path = diffusion_folder(tmp_path_factory.mktemp("serve") / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(folder):
    """(base URL, model id) of `adapt serve` running in its own process."""
    with serving(folder, "--max-queue", MAX_QUEUE, "--max-batch", MAX_BATCH, "--max-tokens", MAX_TOKENS) as url:
        yield url, str(folder)


@pytest.fixture(scope="module")
def local(folder):
    """The same checkpoint in this process: what the sampler answers without a server."""
    model, tokenizer, _ = adapt.load(folder)
    return model, tokenizer


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


def _health(server) -> dict:
    return httpx.get(f"{server[0]}/health").json()


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server[0]}/v1/{path}", json={"model": server[1], **body}, timeout=60)


def _busy(server, pool: ThreadPoolExecutor):
    """Start a long request and return its future once the model is decoding it: later requests wait."""
    before = _health(server)["batches"]
    blocker = pool.submit(_post, server, "completions", LONG)
    wait_until(lambda: _health(server)["running"] == 1 or _health(server)["batches"] > before, "the long request")
    assert _health(server)["running"] == 1, "the long request ended before the test could queue behind it"
    return blocker


def test_a_completion_is_the_samplers_answer(server, local):
    client = _client(server)
    assert [model.id for model in client.models.list().data] == [server[1]]
    out = client.completions.create(model=server[1], prompt="w5 w6", max_tokens=12, temperature=0)
    expected = generate_with_details(*local, "w5 w6", length=12, temperature=0)
    choice = out.choices[0]
    assert choice.text == expected.texts[0] and choice.text
    assert choice.model_extra["forwards"] == expected.forwards == 12  # one step per token by default
    assert choice.model_extra["tokens_per_forward"] == 1.0
    assert out.usage.prompt_tokens == len(expected.prompt_ids) == 2
    assert out.usage.completion_tokens == text_end(expected.token_ids[0], 0, local[1].eos_token_id)  # before EOS
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    health = _health(server)
    assert health["status"] == "ok" and health["model"] == server[1] and health["finished"] >= 1


def test_diffusion_settings_are_extra_fields(server, local):
    settings = {"steps": 4, "block_size": 4, "strategy": "margin", "top_k": 5, "seed": 3}
    out = _client(server).completions.create(model=server[1], prompt="w7", max_tokens=8, extra_body=settings)
    expected = generate_with_details(*local, "w7", length=8, **settings)
    assert out.choices[0].text == expected.texts[0]
    assert out.choices[0].model_extra["forwards"] == expected.forwards <= 4


def test_a_chat_answers_the_prompt_its_template_renders(server, local):
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6"}]
    out = _client(server).chat.completions.create(model=server[1], messages=messages, max_tokens=10, temperature=0)
    rendered = "w9 w5 w6 w3"
    expected = generate_with_details(*local, rendered, length=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.texts[0]
    assert out.usage.prompt_tokens == 4


def test_a_chat_without_a_template_is_refused_with_the_fix():
    tokenizer = tiny_tokenizer()  # no chat template
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "w5"}])
    with pytest.raises(ApiError, match="no chat template") as refusal:
        prompt_ids(body, tokenizer, shift=True)
    assert refusal.value.status == 400 and refusal.value.param == "messages"


def test_messages_the_chat_template_refuses_are_a_400_in_its_words():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "w5"}])
    with pytest.raises(ApiError, match="refuses these messages: roles must alternate") as refusal:
        prompt_ids(body, tokenizer, shift=True)
    assert refusal.value.status == 400 and refusal.value.param == "messages"


@pytest.mark.parametrize("path, body", [
    ("completions", {"prompt": "w5 w6", "max_tokens": 40, "temperature": 0}),
    ("completions", {"prompt": "w5 w6", "max_tokens": 40, "temperature": 0, "block_size": 8}),
    ("chat/completions", {"messages": [{"role": "user", "content": "w8"}], "max_tokens": 40, "temperature": 0}),
])
def test_a_stream_put_together_is_the_whole_answer(server, path, body):
    whole = _post(server, path, body).json()["choices"][0]
    with httpx.stream("POST", f"{server[0]}/v1/{path}", json={"model": server[1], "stream": True, **body}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: "))["choices"][0] for line in lines[:-1]]
    pieces = [chunk.get("text", chunk.get("delta", {}).get("content", "")) for chunk in chunks]
    assert "".join(pieces) == whole.get("text", whole.get("message", {}).get("content"))
    assert sum(bool(piece) for piece in pieces) > 1  # it grew while decoding, not in one piece at the end
    assert chunks[-1]["finish_reason"] == whole["finish_reason"] and chunks[-1]["forwards"] == whole["forwards"]
    assert all(chunk["finish_reason"] is None for chunk in chunks[:-1])


def test_the_openai_client_streams_and_counts_usage(server):
    client = _client(server)
    whole = client.completions.create(model=server[1], prompt="w11", max_tokens=20, temperature=0)
    stream = client.completions.create(model=server[1], prompt="w11", max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage


def test_a_stop_string_ends_the_answer_before_it(server):
    full = _post(server, "completions", {"prompt": "w5", "max_tokens": 30, "temperature": 0}).json()
    words = full["choices"][0]["text"].split()
    stop = f" {words[3]}"  # the answer must end before its first occurrence
    cut = _post(server, "completions", {"prompt": "w5", "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()
    text = cut["choices"][0]["text"]
    assert text == full["choices"][0]["text"][:full["choices"][0]["text"].index(stop)] and stop not in text
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = _client(server).completions.create(model=server[1], prompt="w5", max_tokens=30, temperature=0,
                                                  stop=[stop], stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "w5", "model": "other"}, "model", "unknown model"),
    ({"prompt": " ".join(["w5"] * 250), "max_tokens": 10}, "prompt", "more than the model's 256 positions"),
    ({"prompt": "w5", "max_tokens": MAX_TOKENS + 1}, "max_tokens", "--max-tokens"),
    ({"prompt": "w5", "strategy": "best"}, None, "choose one of"),
    ({"prompt": "w5", "threshold": 2}, None, "threshold = 2.0 is out of range"),
    ({"prompt": "w5", "temperature": -1}, None, "temperature = -1.0 is out of range"),
    ({"prompt": "w5", "logprobs": 2}, "logprobs", "unknown field 'logprobs'"),
    ({"prompt": "w5", "n": MAX_BATCH + 1}, "n", "--max-batch"),
    ({"prompt": "w5", "max_tokens": "8"}, "max_tokens", "valid integer"),
    ({"prompt": ["w5", "w6"]}, "prompt", "valid string"),
    ({"prompt": "w5", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"prompt": "w5", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "w5", "logit_bias": {"5": 100}}, "logit_bias", "not supported"),
    ({"prompt": "w5", "max_tokens": 4, "steps": 9}, None, "use at most 4 steps"),  # refused by the sampler itself
    ({"prompt": "w5", "max_tokens": 4, "steps": 9, "stream": True}, None, "use at most 4 steps"),  # not a 200
])
def test_a_bad_request_is_a_400_naming_the_problem(server, body, param, words):
    reply = _post(server, "completions", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error" and "Traceback" not in reply.text


def test_the_fields_clients_always_send_are_taken_at_their_neutral_values(server):
    body = {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 6, "temperature": 0,
            "user": "someone", "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
    neutral = _post(server, "chat/completions", body)
    plain = _post(server, "chat/completions", {"messages": body["messages"], "max_tokens": 6, "temperature": 0})
    assert neutral.status_code == 200 and neutral.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert neutral.json()["choices"][0]["forwards"] == 6
    both = _post(server, "chat/completions", {**body, "max_tokens": 6})
    assert both.status_code == 400 and both.json()["error"]["param"] == "max_completion_tokens"


def test_bad_json_is_a_400(server):
    reply = httpx.post(f"{server[0]}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_the_openai_client_raises_the_400_with_its_message(server):
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        _client(server).completions.create(model="gpt-4", prompt="w5")


def test_agreeing_requests_are_one_batch_and_each_answer_is_its_answer_alone(server):
    prompts = ["w5 w6", "w7 w8", "w30 w31"]  # one prompt length, so one batch
    with ThreadPoolExecutor(8) as pool:
        blocker = _busy(server, pool)
        waiting = [pool.submit(_post, server, "completions", {"prompt": p, "max_tokens": 24, "temperature": 0})
                   for p in prompts]
        wait_until(lambda: _health(server)["waiting"] == len(prompts) or blocker.done(), "the requests to queue")
        assert not blocker.done()
        batched = [future.result().json() for future in waiting]
    alone = [_post(server, "completions", {"prompt": p, "max_tokens": 24, "temperature": 0}).json() for p in prompts]
    assert [answer["batch_rows"] for answer in batched] == [3, 3, 3]
    assert [answer["batch_rows"] for answer in alone] == [1, 1, 1]
    assert [a["choices"][0]["text"] for a in batched] == [a["choices"][0]["text"] for a in alone]
    assert len({a["choices"][0]["text"] for a in alone}) == 3  # the rows did not all decode the same prompt


def test_a_seeded_random_draw_runs_alone_and_repeats(server):
    body = {"prompt": "w5 w6", "max_tokens": 16, "temperature": 1.0, "seed": 7}
    with ThreadPoolExecutor(8) as pool:
        blocker = _busy(server, pool)
        answers = [pool.submit(_post, server, "completions", body) for _ in range(2)]
        wait_until(lambda: _health(server)["waiting"] == 2 or blocker.done(), "the requests to queue")
        answers = [future.result().json() for future in answers]
    assert [answer["batch_rows"] for answer in answers] == [1, 1]
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]


def test_a_full_queue_is_a_429_and_the_queued_requests_are_answered(server):
    with ThreadPoolExecutor(8) as pool:
        blocker = _busy(server, pool)
        queued = [pool.submit(_post, server, "completions", {"prompt": f"w{40 + i}", "max_tokens": 8})
                  for i in range(MAX_QUEUE)]
        wait_until(lambda: _health(server)["waiting"] == MAX_QUEUE or blocker.done(), "the queue to fill")
        refused = _post(server, "completions", {"prompt": "w5", "max_tokens": 8})
        assert not blocker.done()
        assert [future.result().status_code for future in queued] == [200] * MAX_QUEUE
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error" and "queue is full" in refused.json()["error"]["message"]


def _leave_a_stream(server) -> None:
    body = {"model": server[1], "prompt": "w5", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body) as reply:
        next(line for line in reply.iter_lines() if line.startswith("data: "))  # decoding has started


def _leave_a_plain_request(server) -> None:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up before the answer
        httpx.post(f"{server[0]}/v1/completions", json={"model": server[1], **LONG}, timeout=0.3)


@pytest.mark.parametrize("leave", [_leave_a_stream, _leave_a_plain_request])
def test_a_client_that_goes_away_stops_its_decoding(server, leave):
    before = _health(server)
    leave(server)
    wait_until(lambda: _health(server)["running"] == 0 and _health(server)["waiting"] == 0, "the decoding to stop")
    after = _health(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["stopped_batches"] == before["stopped_batches"] + 1  # stopped mid-way, not run to the end
    assert after["finished"] == before["finished"]


def test_a_stream_sends_only_what_can_no_longer_change():
    assert settled("a b\ufffd", []) == "a b"  # a character whose bytes are not all committed yet
    assert settled("a b STO", ["STOP"]) == "a b "  # may become the stop string
    assert settled("a b ST", ["XY"]) == "a b ST"
    assert cut_at_stop("one two STOP three STOP", ["three", "STOP"]) == ("one two ", True)
    assert cut_at_stop("one two", ["STOP"]) == ("one two", False)


def test_the_pieces_of_a_stream_make_its_text(local):
    _, tokenizer = local
    prompt = tokenizer("w5", add_special_tokens=False)["input_ids"]
    answer = tokenizer("w6 w7 w8 w9 w10", add_special_tokens=False)["input_ids"]
    choice = ChoiceText(tokenizer, prompt, stops=[" w9"])
    pieces = [choice.grow(answer[:k]) for k in range(len(answer))] + [choice.finish(answer)]
    assert "".join(pieces) == " w6 w7 w8" == choice.text_of(answer)[0]
    assert pieces[:3] == ["", " w6", " w7"]


def _app_client(model, tokenizer):
    """The application in this process (no port): for models the server test has no folder of."""
    from fastapi.testclient import TestClient

    from adapt.sampling import SamplingOptions
    from adapt.serve.app import ServeSettings, create_app

    return TestClient(create_app(model, tokenizer, "m", ServeSettings(max_tokens=32), SamplingOptions()))


def test_a_hybrid_model_streams_its_accepted_tokens():
    model, tokenizer, _ = hybrid_model()
    body = {"model": "m", "prompt": "w5 w6", "max_tokens": 24, "temperature": 0}
    with _app_client(model, tokenizer) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data: {")]
    pieces = [json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in lines]
    expected = generate_with_details(model, tokenizer, "w5 w6", length=24, temperature=0)  # verified by the AR head
    assert "".join(pieces) == whole["text"] == expected.texts[0]
    assert sum(bool(piece) for piece in pieces) > 1
    assert whole["forwards"] == expected.forwards


def test_a_failure_inside_the_model_is_a_500_without_its_traceback(local, monkeypatch):
    model, tokenizer = local

    def broken(*args, **kwargs):
        raise RuntimeError("a bug deep inside")

    monkeypatch.setattr(model.model, "forward", broken)  # the sampler runs the body, then the head
    with _app_client(model, tokenizer) as client:
        reply = client.post("/v1/completions", json={"model": "m", "prompt": "w5", "max_tokens": 4})
        assert client.get("/health").json()["failed"] == 1
    assert reply.status_code == 500
    assert reply.json()["error"] == {"message": "internal error (RuntimeError); see the server's log",
                                     "type": "server_error", "param": None, "code": None}


def test_bad_flags_and_a_taken_port_are_refused_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"  # loading it would fail with another message
    refused = run_cli("serve", missing, "--max-batch", "0")
    assert refused.returncode == 2 and "max_batch = 0 is out of range" in refused.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        refused = run_cli("serve", missing, "--port", taken.getsockname()[1])
    assert refused.returncode == 2 and "cannot listen on 127.0.0.1" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("settings", [{}, {"block_size": 4}, {"threshold": 0.5}, {"strategy": "entropy"}])
def test_each_row_of_a_batch_decodes_as_it_would_alone(local, settings):
    """What the server's batching rests on: the sampler's choices are per row (float32, greedy)."""
    model, tokenizer = local
    prompts = [[5, 6], [7, 8], [40, 41]]
    batch = generate_ids(model, tokenizer, prompts, length=16, temperature=0, **settings)
    alone = [generate_ids(model, tokenizer, [prompt], length=16, temperature=0, **settings) for prompt in prompts]
    assert batch.ids.tolist() == [out.ids[0].tolist() for out in alone]
    assert batch.commit_step.tolist() == [out.commit_step[0].tolist() for out in alone]
