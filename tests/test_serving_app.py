"""kvgen.server: the OpenAI-compatible FastAPI app, in process (httpx over ASGI) and under a real
uvicorn on 127.0.0.1 (httpx and the official `openai` client)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def gen(kv_model):
    return kv_model("llama")


@pytest.fixture(scope="module")
def app(gen):
    from kvgen.server import create_app

    return create_app(gen, model_name="tiny-llama", max_tokens_limit=64, max_prompt_tokens=100)


def _post(app, path, body):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


def _get(app, path):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(go())


def _sse_payloads(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# ---- in process ---------------------------------------------------------------------------


def test_health_and_models(app):
    health = _get(app, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert "running_requests" in health.json()["scheduler"]
    models = _get(app, "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama"


def test_greedy_completion_is_generate_text(app, gen):
    r = _post(app, "/v1/completions", {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
    choice = body["choices"][0]
    assert choice["text"] == gen.generate(PROMPT, max_new_tokens=12)
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(gen.tokenizer.encode(PROMPT))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sampled_completion_follows_the_seed(app, gen):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 42}
    a, b = _post(app, "/v1/completions", body).json(), _post(app, "/v1/completions", body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    expected = gen.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, top_k=0, seed=42)
    assert a["choices"][0]["text"] == expected


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_chunks_concatenate_to_the_plain_result(app, path):
    if path == "/v1/completions":
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "seed": 7, "n": 2}
    else:
        body = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 16, "temperature": 0.9, "seed": 7, "n": 2}
    plain = _post(app, path, body)
    assert plain.status_code == 200, plain.text
    plain = plain.json()
    assert sorted(c["index"] for c in plain["choices"]) == [0, 1], plain
    streamed = _post(app, path, body | {"stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _sse_payloads(streamed.text)
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            piece = choice.get("text") if "text" in choice else choice["delta"].get("content")
            texts[choice["index"]] += piece or ""
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    for choice in plain["choices"]:
        got = choice["text"] if "text" in choice else choice["message"]["content"]
        assert texts[choice["index"]] == got
        assert finish[choice["index"]] == choice["finish_reason"]
    if path.endswith("chat/completions"):
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_chat_applies_the_chat_template(app, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = _post(app, "/v1/chat/completions", {"messages": messages, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    ids = gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = gen.generate([list(ids)], max_new_tokens=10)
    expected = gen.tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True)
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_stop_strings_end_the_text_before_the_stop(app, gen):
    full = _post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[5:8]
    assert stop.strip(), text
    r = _post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == text[: text.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_logprobs_are_the_models_log_softmax(app, gen):
    import numpy as np

    r = _post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["usage"]["completion_tokens"] >= 1, r
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == r["usage"]["completion_tokens"]
    logits = gen.logits([gen.tokenizer.encode(PROMPT)])[0, -1].astype(np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert abs(lp["token_logprobs"][0] - expected.max()) < 1e-4
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the top token
    assert lp["text_offset"][0] == 0

    messages = [{"role": "user", "content": "Hello"}]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    chat = _post(app, "/v1/chat/completions", body).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] >= 1
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)


def test_prompt_batches_and_token_prompts(app, gen):
    ids = gen.tokenizer.encode(PROMPT)
    expected = gen.generate(PROMPT, max_new_tokens=6)
    for prompt in ([PROMPT, PROMPT + " again"], [ids, ids + [5]], ids):
        r = _post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "n": 2}).json()
        texts = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
        assert texts[:2] == [expected] * 2
        assert len(texts) == (2 if prompt is ids else 4)
        if prompt is not ids:
            assert texts[2] == texts[3]


def _assert_openai_error(r, status, param, pattern):
    """An OpenAI-style error: the status, exactly {"error": {message, type, param, code}}, the
    expected param and a message matching `pattern` (a regex naming the value and/or the limit)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error", error
    assert isinstance(error["message"], str) and re.search(pattern, error["message"]), (pattern, error["message"])
    assert error["param"] == param, error
    return error


BAD_COMPLETIONS = [
    # (body, status, param, message pattern)
    ({"prompt": PROMPT, "temperature": 3}, 422, "temperature", r"^temperature: .*less than or equal to 2\b"),
    ({"prompt": PROMPT, "top_p": 0}, 422, "top_p", r"^top_p: .*greater than 0\b"),
    ({"prompt": PROMPT, "max_tokens": 0}, 422, "max_tokens", r"^max_tokens: .*greater than or equal to 1\b"),
    ({"prompt": PROMPT, "n": 0}, 422, "n", r"^n: .*greater than or equal to 1\b"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     r"^5 stop sequences exceed this server's limit of 4\b"),
    ({"prompt": PROMPT, "frequency_penalty": 0.5}, 422, "frequency_penalty", r"frequency_penalty=0\.5 is not supported"),
    ({"prompt": PROMPT, "bogus": 1}, 422, "bogus", r"^bogus: Extra inputs are not permitted"),
    ({}, 422, "prompt", r"^prompt: Field required"),
    ({"prompt": PROMPT, "max_tokens": 65}, 400, "max_tokens", r"max_tokens=65 exceeds this server's limit of 64\b"),
    ({"prompt": "word " * 150}, 400, "prompt", r"the prompt has 451 tokens, more than this server's limit of 100\b"),
    ({"prompt": [5, 10**6], "max_tokens": 3}, 400, None,
     r"token id 1000000 at row 0, position 1 is out of range: the model's vocabulary has 386 ids"),
    ({"prompt": PROMPT, "logprobs": 2, "stream": True}, 400, "logprobs", r"logprobs with stream=true is not supported"),
    ({"prompt": PROMPT, "logprobs": 9}, 400, "logprobs", r"^logprobs=9 exceeds this server's limit of 5\b"),
]


@pytest.mark.parametrize(
    "body, status, param, pattern", BAD_COMPLETIONS, ids=[p or "none" for _, _, p, _ in BAD_COMPLETIONS]
)
def test_bad_requests_get_openai_style_errors(app, gen, body, status, param, pattern):
    if body.get("prompt") == "word " * 150:
        assert len(gen.tokenizer.encode(body["prompt"])) == 451, "fixture: the message names the prompt's length"
    _assert_openai_error(_post(app, "/v1/completions", body), status, param, pattern)


def test_bad_chat_requests(app):
    user = [{"role": "user", "content": "x"}]
    _assert_openai_error(
        _post(app, "/v1/chat/completions", {"messages": []}), 422, "messages", r"^messages: .*at least 1 item"
    )
    _assert_openai_error(
        _post(app, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
        422,
        "messages.0.role",
        r"^messages\.0\.role: Input should be 'system', 'user', 'assistant'",
    )
    _assert_openai_error(
        _post(app, "/v1/chat/completions", {"messages": user, "max_completion_tokens": 999}),
        400,
        "max_completion_tokens",
        r"^max_completion_tokens=999 exceeds this server's limit of 64\b",
    )


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": PROMPT, "frequency_penalty": 0.5}, "frequency_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999},
         "max_completion_tokens"),
    ],
    ids=["frequency_penalty", "max_completion_tokens"],
)
def test_refused_fields_are_named_in_param(app, path, body, param):
    assert _post(app, path, body).json()["error"]["param"] == param


def test_concurrent_in_process_requests_match_solo(app):
    bodies = [{"prompt": f"{PROMPT} {i}", "max_tokens": 8 + i, "temperature": 0.7, "seed": i} for i in range(8)]
    solo = [_post(app, "/v1/completions", b).json()["choices"][0]["text"] for b in bodies]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            rs = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(go()) == solo


# ---- a real server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_real_server_httpx_streaming(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.5, "seed": 1}
    plain = httpx.post(f"{server}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", f"{server}/v1/completions", json=body | {"stream": True}, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == plain


def test_openai_client_against_the_real_server(server, gen):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny-llama"]

    done = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=10, temperature=0)
    assert done.choices[0].text == gen.generate(PROMPT, max_new_tokens=10)

    chat = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0.7, seed=3
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0.7,
        seed=3,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == chat.choices[0].message.content

    text_stream = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in text_stream) == done.choices[0].text

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1000)
    assert err.value.status_code == 400
    assert "max_tokens=1000 exceeds this server's limit of 64" in err.value.body["message"], err.value.body
    assert err.value.body["param"] == "max_tokens" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="tiny-llama", prompt=PROMPT, temperature=5)
    assert err.value.status_code == 422
    assert err.value.body["param"] == "temperature" and "less than or equal to 2" in err.value.body["message"]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_its_generation(server, kv_model, stream):
    # A long generation on this server's model, abandoned by its client.
    gen = kv_model("llama")
    before = gen.scheduler_stats()["cancelled"]
    body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0.7, "stream": stream}
    gen._engine._pause_scheduler(True, 5)  # keep it mid-generation until the client has left
    try:
        with httpx.Client(timeout=30) as client:
            if stream:
                with client.stream("POST", f"{server}/v1/completions", json=body) as r:
                    next(r.iter_lines())
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post(f"{server}/v1/completions", json=body, timeout=0.5)
        # The cancellation lands even while the scheduler is held.
        deadline = time.monotonic() + 5
        while gen.scheduler_stats()["cancelled"] != before + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gen._engine._pause_scheduler(False)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = gen.scheduler_stats()
        if stats["cancelled"] == before + 1 and stats["running_sequences"] == 0:
            break
        time.sleep(0.01)
    stats = gen.scheduler_stats()
    assert stats["cancelled"] == before + 1, stats
    assert stats["running_sequences"] == 0
