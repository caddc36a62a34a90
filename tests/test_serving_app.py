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
        "messages.0",
        r"^messages\.0: Input tag 'wizard' found using 'role' does not match any of the expected tags: 'system'",
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


# ---- strict types, required content, the vLLM / llama.cpp sampling extensions -----------------


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/chat/completions", "top_logprobs", False),
        ("/v1/chat/completions", "n", True),
        ("/v1/completions", "max_tokens", True),
        ("/v1/completions", "seed", True),
        ("/v1/completions", "logprobs", False),
        ("/v1/completions", "min_tokens", True),
        ("/v1/completions", "top_k", True),
        ("/v1/completions", "stream", 1),
        ("/v1/completions", "ignore_eos", 0),
        ("/v1/completions", "echo", 0),
        ("/v1/completions", "best_of", True),
        ("/v1/completions", "temperature", True),
    ],
)
def test_booleans_are_not_numbers_and_numbers_not_booleans(app, path, field, value):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    _assert_openai_error(_post(app, path, body | {field: value, "max_tokens": 2} if field != "max_tokens" else body | {field: value}),
                         422, field, rf"^{field}: Input should be a valid")


def test_integral_floats_are_integers(app, gen):
    # JSON Schema counts 2.0 as an integer; the strict types still do.
    r = _post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3.0, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == gen.generate(PROMPT, max_new_tokens=3)


def test_prompt_must_not_be_empty(app):
    for prompt in ("", [], [[]], [""]):
        r = _post(app, "/v1/completions", {"prompt": prompt})
        assert r.status_code == 422 and r.json()["error"]["param"].startswith("prompt"), (prompt, r.text)


def test_messages_need_content_where_openai_requires_it(app):
    for role in ("system", "developer", "user", "tool"):
        _assert_openai_error(
            _post(app, "/v1/chat/completions", {"messages": [{"role": role}]}), 422, f"messages.0.{role}.content",
            rf"^messages\.0\.{role}\.content: Field required",
        )
    # The assistant's content is optional (OpenAI: it may carry tool calls instead).
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant"}, {"role": "user", "content": [{"type": "text", "text": "Go"}]}]
    assert _post(app, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}).status_code == 200
    r = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages.0.user.content"), r.text


def test_openapi_documents_errors_and_limits(app):
    spec = _get(app, "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "413", "422", "429"):
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "text/event-stream" in responses["200"]["content"]
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"type": "string", "minLength": 1} in props["prompt"]["anyOf"]
    assert all(b.get("minItems") == 1 for b in props["prompt"]["anyOf"] if b["type"] == "array")
    assert [b["maximum"] for b in props["max_tokens"]["anyOf"] if b["type"] == "integer"] == [64]  # this app's limit


def _sampled(app, body):
    r = _post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12} | body)
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


SAMPLE = dict(do_sample=True, temperature=1.5, top_p=1.0, seed=11)


@pytest.mark.parametrize(
    "field, value, kwargs",
    [
        ("top_k", 3, {"top_k": 3}),
        ("min_p", 0.3, {"min_p": 0.3}),
        ("repetition_penalty", 3.0, {"repetition_penalty": 3.0}),
    ],
)
def test_sampling_extensions_are_generate_kwargs(app, gen, field, value, kwargs):
    """Each field gives what the same kwarg gives Generator.generate, and changes the output."""
    body = {"temperature": 1.5, "seed": 11}
    base = gen.generate(PROMPT, max_new_tokens=12, top_k=0, **SAMPLE)
    expected = gen.generate(PROMPT, max_new_tokens=12, **(SAMPLE | {"top_k": 0} | kwargs))
    assert expected != base, f"fixture: {field}={value} must change the sampled text"
    assert _sampled(app, body) == [base]
    assert _sampled(app, body | {field: value}) == [expected]


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_or_minus_one_disables_it(app, gen, top_k):
    assert _sampled(app, {"temperature": 1.5, "seed": 11, "top_k": top_k}) == [
        gen.generate(PROMPT, max_new_tokens=12, top_k=0, **SAMPLE)
    ]


def test_repetition_penalty_applies_to_greedy(app, gen):
    expected = gen.generate(PROMPT, max_new_tokens=12, repetition_penalty=3.0)
    assert expected != gen.generate(PROMPT, max_new_tokens=12)
    assert _sampled(app, {"temperature": 0, "repetition_penalty": 3.0}) == [expected]


@pytest.fixture(scope="module")
def eos_app(model_dir):
    """An app whose model's EOS is a token its greedy continuation of PROMPT reaches at step 3."""
    import kvgen
    from kvgen.server import create_app

    g = kvgen.Generator.from_pretrained(str(model_dir("llama")))
    ids = g.tokenizer.encode(PROMPT)
    tokens = list(g.generate([ids], max_new_tokens=12, eos_token_id=[])[0][len(ids) :])
    eos = tokens[3]
    assert eos not in tokens[:3], "fixture: pick a token that first appears at step 3"
    g.generation_config.eos_token_id = eos
    return create_app(g, model_name="tiny-llama-eos", max_tokens_limit=64), g


def test_min_tokens_and_ignore_eos(eos_app):
    # Compared by token count: the server's incremental decoding of a torn UTF-8 tail may differ
    # from decoding the whole sequence at once (tiny random models emit such bytes).
    app, g = eos_app
    ids = g.tokenizer.encode(PROMPT)

    def served(body):
        r = _post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0} | body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]

    def generated(**kwargs):
        return len(g.generate([ids], max_new_tokens=12, **kwargs)[0]) - len(ids)

    assert served({}) == (4, "stop") and generated() == 4  # EOS at step 3 ends it
    count, finish = served({"min_tokens": 6})
    assert count == generated(min_new_tokens=6) > 6
    assert served({"ignore_eos": True}) == (12, "length")
    assert generated(eos_token_id=[]) == 12
    # min_tokens over max_tokens: EOS is suppressed to the end, as min_new_tokens > max_new_tokens does.
    assert served({"max_tokens": 5, "min_tokens": 50}) == (5, "length")


def test_seed_per_choice(app, gen):
    """Choice k samples from stream (seed, k): generate(num_return_sequences=n)'s k-th row, the same
    whatever n is, choice 0 the n=1 answer; choices differ from each other."""
    body = {"temperature": 1.5, "seed": 11}
    three = _sampled(app, body | {"n": 3})
    assert three == gen.generate([PROMPT], max_new_tokens=12, num_return_sequences=3, top_k=0, **SAMPLE)
    assert len(set(three)) == 3
    assert _sampled(app, body | {"n": 2}) == three[:2]
    assert _sampled(app, body) == three[:1]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_fields_still_get_a_422_naming_them(app, path):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    _assert_openai_error(_post(app, path, body | {"top_a": 0.5}), 422, "top_a", r"^top_a: Extra inputs are not permitted")
